"""Gather evaluation results of many runs into tables (Markdown, CSV, LaTeX) and plots (evaluations/table.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from evaluations.table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
