"""ADM-compatible evaluation (FID, sFID, IS, precision, recall) on PyTorch, and result tables.

``evaluations.evaluator.evaluate`` evaluates a sample batch against a reference batch;
``evaluations.table.make_table`` gathers many runs' results into tables and plots.
"""
