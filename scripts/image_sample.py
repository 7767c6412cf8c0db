#!/usr/bin/env python
"""Sample from an ADM model with PAG into resumable, sharded npz; upstream's flags work (sampling/cli.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from sampling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
