"""The embedded CPU demo: its generated shapes data set (``data``), its feature network (``features``), the
training of both (``train``) and the bookends of ``make demo`` (``pipeline``). Repository-only: it needs the
checkpoints in ``checkpoints/demo/`` and is not part of the installed package."""
