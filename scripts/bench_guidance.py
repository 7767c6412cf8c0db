#!/usr/bin/env python
"""Cost per sampling step: unguided vs the authors' two passes vs our engine (benchmarks/bench_guidance.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from benchmarks.bench_guidance import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
