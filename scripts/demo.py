#!/usr/bin/env python
"""The CPU demo's bookends around the sweep (make demo): prepare the reference, finish the table (demo/pipeline.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from adm_common.flags import respell_flags  # noqa: E402
from demo.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(respell_flags(sys.argv[1:], "_")))  # the demo's flags use underscores
