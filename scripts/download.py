#!/usr/bin/env python
"""Download the official ADM checkpoints, the evaluator's reference batches and the Inception weights
(``python scripts/download.py --help``; the work is in sampling/downloads.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adm_common.flags import respell_flags  # noqa: E402
from sampling.downloads import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(respell_flags(sys.argv[1:], "-")))  # the downloads' flags use hyphens
