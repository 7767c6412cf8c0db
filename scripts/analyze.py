#!/usr/bin/env python
"""Per-step analysis of PAG (and SAG / CG): strips of x_t and the predicted x0 of the clean and perturbed passes,
guidance-term curves, attention maps and entropies, for each perturbation kind. See analysis/cli.py.

    python scripts/analyze.py --model checkpoints/demo/adm_demo.yaml --num_classes 10 --pag_scale 2 \
        --pag_layers input_blocks.3.1,input_blocks.5.1,middle_block.1 --timestep_respacing ddim25 --use_ddim True \
        --device cpu --name demo --kinds identity,seg --compare_kinds all    # -> results/analysis/demo/summary.md
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
