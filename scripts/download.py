#!/usr/bin/env python
"""Download the official ADM checkpoints, reference batches and Inception weights (sampling/downloads.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from adm_common.flags import respell_flags  # noqa: E402
from sampling.downloads import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(respell_flags(sys.argv[1:], "-")))  # the downloads' flags use hyphens
