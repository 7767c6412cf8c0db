#!/usr/bin/env python
"""Sample from an ADM model with PAG (and SAG / classifier guidance) into resumable, sharded npz output; upstream
guided-diffusion's flags work unchanged, ``--config FILE.yaml`` supplies flags (sampling/cli.py; docs/sampling.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from sampling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
