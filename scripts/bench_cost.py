#!/usr/bin/env python
"""FLOPs and GPU-hours of the paper's ADM 256x256 runs, counted on meta (make bench-cost; benchmarks/cost.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from benchmarks.cost import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
