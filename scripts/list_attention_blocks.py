#!/usr/bin/env python
"""Print every attention block of a model for choosing PAG layers (sampling/models.py; docs/api.md)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from sampling.models import list_attention_blocks as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
