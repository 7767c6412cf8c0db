#!/usr/bin/env python
"""Run a sweep: a base configuration and a grid of values, one resumable sampling run per cell.

    python scripts/sweep.py configs/experiments/ablation_scale.yaml --dry_run    # list cells and commands
    mpiexec -n 8 python scripts/sweep.py configs/experiments/ablation_scale.yaml # sample every cell (resumable)

See docs/sampling.md#sweeps for the config format.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sampling.cli import sweep_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
