"""ADM-compatible evaluation on PyTorch (``evaluator.evaluate``: a sample batch against a reference batch) and
result tables (``table.make_table``: many runs' results into tables and plots)."""
