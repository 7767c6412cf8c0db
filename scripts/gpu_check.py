#!/usr/bin/env python
"""GPU acceptance check (make gpu-check): results/gpu_check/report.{json,md} (benchmarks/gpu_check.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
