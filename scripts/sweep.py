#!/usr/bin/env python
"""Run a sweep: one resumable sampling run per grid cell, --dry_run lists them (sampling/sweep.py, docs/sampling.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from sampling.cli import sweep_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
