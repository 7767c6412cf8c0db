#!/usr/bin/env python
"""Sample from an ADM model with PAG (and SAG / classifier guidance) into resumable, sharded npz output.

    python scripts/image_sample.py --model 256x256_diffusion --pag_scale 3 \
        --timestep_respacing 250 --num_samples 50000 --batch_size 32 --out_dir results/pag_s3
    mpiexec -n 8 python scripts/image_sample.py ...       # or torchrun / srun: same images, faster

Upstream guided-diffusion's flags work unchanged (model flags, --model_path, --classifier_path, ...);
--config FILE.yaml supplies flags (command-line flags win). See sampling/settings.py for every setting.
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sampling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
