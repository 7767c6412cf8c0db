#!/usr/bin/env python
"""Cost per sampling step: unguided vs naive two-pass PAG (the authors' strategy) vs our engine
(benchmarks/bench_guidance.py; docs/gpu.md; ``--help``)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from benchmarks.bench_guidance import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
