#!/usr/bin/env python
"""Cost per sampling step: unguided model vs naive two-pass PAG (the authors' strategy) vs our engine
(benchmarks/bench_guidance.py).

    python scripts/bench_guidance.py                      # CPU-sized: 64 channels, batch 1
    python scripts/bench_guidance.py --num_channels 256 --batch_size 8 --device cuda --fp16
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_guidance import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
