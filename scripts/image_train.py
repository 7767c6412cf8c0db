#!/usr/bin/env python
"""Train a diffusion model on a folder of images, with upstream guided-diffusion's flags.

    python scripts/image_train.py --data_dir data/train --image_size 64 --num_channels 128 \
        --num_res_blocks 3 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine \
        --lr 1e-4 --batch_size 128
    mpiexec -n 8 python scripts/image_train.py ...        # or torchrun / srun: data-parallel (DDP)

Checkpoints (model/ema/opt{step:06d}.pt) and logs go to $OPENAI_LOGDIR (default: a new temporary
directory); --resume_checkpoint DIR/model{step:06d}.pt continues a run; --lr_anneal_steps N stops after
N steps (annealing the learning rate to 0). With --class_cond True the label of a file is its name's
part before the first underscore. See guided_diffusion/train_util.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.train_util import TrainLoop, script_parser, start_script, training_defaults  # noqa: E402


def main(argv=None):
    args, model, diffusion = start_script(create_argparser(), argv, "diffusion")
    logger.log("creating data loader...")
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                     class_cond=args.class_cond)
    logger.log("training...")
    TrainLoop.from_args(args, model=model, diffusion=diffusion, data=data).run_loop()


def create_argparser():
    return script_parser(__doc__, "diffusion", **training_defaults())


if __name__ == "__main__":
    main()
