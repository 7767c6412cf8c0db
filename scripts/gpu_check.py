#!/usr/bin/env python
"""GPU acceptance check: whether this machine samples correctly and how fast (benchmarks/gpu_check.py).

    make gpu-check                                    # = python scripts/gpu_check.py (the local rank's GPU)
    python scripts/gpu_check.py --device cpu --tiny   # the same report on the CPU at tiny widths (the test suite)

Writes results/gpu_check/report.{json,md} and prints the Markdown; --help lists the sections and flags.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
