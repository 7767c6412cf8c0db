#!/usr/bin/env python
"""Per-step analysis of PAG (and SAG / CG): strips, curves, attention per kind (analysis/cli.py; docs/analysis.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from analysis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
