#!/usr/bin/env python
"""Run a sweep: a base configuration and a grid of values, one resumable sampling run per cell; ``--dry_run``
lists and checks the cells (sampling/sweep.py; the config format: docs/sampling.md#sweeps)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from sampling.cli import sweep_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
