#!/usr/bin/env python
"""Train the embedded demo's models (``make train-demo``). See demo/train.py for the flags and outputs."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from adm_common.flags import respell_flags  # noqa: E402
from demo.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(respell_flags(sys.argv[1:], "_")))  # the demo's flags use underscores
