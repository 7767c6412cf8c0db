#!/usr/bin/env python
"""FLOPs and GPU-hours of the paper's ADM 256x256 runs, counted on the meta device (benchmarks/cost.py).

    python scripts/bench_cost.py                      # = make bench-cost; seconds on a CPU, no model memory
    python scripts/bench_cost.py --peak_fraction 0.3  # another assumed share of the dense fp16 peak
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cost import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
