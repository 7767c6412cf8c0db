"""ADM-compatible evaluation (FID, sFID, IS, precision, recall) on PyTorch, and result tables.

``evaluations.evaluator.evaluate`` evaluates a sample batch against a reference batch;
``evaluations.table.make_table`` gathers many runs' results into tables and plots.
"""


def evaluate(*args, **kwargs):
    from evaluations.evaluator import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def make_table(*args, **kwargs):
    from evaluations.table import make_table as _make_table

    return _make_table(*args, **kwargs)
