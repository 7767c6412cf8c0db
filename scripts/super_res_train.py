#!/usr/bin/env python
"""Train a super-resolution diffusion model (upstream guided-diffusion's flags).

    python scripts/super_res_train.py --data_dir data/train --large_size 256 --small_size 64 \
        --num_channels 192 --num_res_blocks 2 --learn_sigma True --lr 1e-4 --batch_size 16

The low-resolution input of each image is its area-downsampled copy (``--small_size``). Checkpoints and
logs as in scripts/image_train.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch.nn.functional as F  # noqa: E402

from guided_diffusion import logger  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.train_util import TrainLoop, script_parser, start_script, training_defaults  # noqa: E402


def main(argv=None):
    args, model, diffusion = start_script(create_argparser(), argv, "upsampler")
    logger.log("creating data loader...")
    data = load_superres_data(args.data_dir, args.batch_size, large_size=args.large_size,
                              small_size=args.small_size, class_cond=args.class_cond)
    logger.log("training...")
    TrainLoop.from_args(args, model=model, diffusion=diffusion, data=data).run_loop()


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False):
    """load_data at ``large_size``, with each batch's area-downsampled copy as ``kwargs["low_res"]``."""
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=large_size, class_cond=class_cond)
    for large_batch, model_kwargs in data:
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs


def create_argparser():
    return script_parser(__doc__, "upsampler", **training_defaults())


if __name__ == "__main__":
    main()
