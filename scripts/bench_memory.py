#!/usr/bin/env python
"""Peak activation memory of a PAG step at the real ADM-256 widths, counted on meta (benchmarks/memory.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from benchmarks.memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
