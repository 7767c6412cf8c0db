#!/usr/bin/env python
"""Approximate an image model's negative log-likelihood in bits/dim (upstream guided-diffusion's flags).

    python scripts/image_nll.py --model_path model.pt --data_dir data/val --num_samples 1000 \
        --image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True --diffusion_steps 4000

Evaluates the full variational bound (``diffusion.calc_bpd_loop``: every diffusion step) and logs the
running mean bits/dim; writes the per-step means of the vb, mse and xstart_mse terms to
$OPENAI_LOGDIR/{vb,mse,xstart_mse}_terms.npz.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import numpy as np  # noqa: E402

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.checkpoint import load_checkpoint  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.train_util import script_parser, start_script  # noqa: E402


def main(argv=None):
    args, model, diffusion = start_script(create_argparser(), argv, "diffusion")
    load_checkpoint(model, args.model_path)
    if args.use_fp16:
        model.convert_to_fp16()
    model.eval()
    logger.log("creating data loader...")
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                     class_cond=args.class_cond, deterministic=True)
    logger.log("evaluating...")
    run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised)


def run_bpd_evaluation(model, diffusion, data, num_samples, clip_denoised):
    """Mean total bits/dim over ``num_samples`` images (all ranks together); returns it."""
    world = dist_util.get_world_size()
    all_bpd = []
    all_metrics = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)

        for key, term_list in all_metrics.items():
            terms = metrics[key].mean(dim=0) / world
            dist_util.all_reduce(terms)
            term_list.append(terms.detach().cpu().numpy())

        total_bpd = metrics["total_bpd"].mean() / world
        dist_util.all_reduce(total_bpd)
        all_bpd.append(total_bpd.item())
        num_complete += world * batch.shape[0]

        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")

    if dist_util.get_rank() == 0:
        for name, terms in all_metrics.items():
            out_path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            np.savez(out_path, np.mean(np.stack(terms), axis=0))

    dist_util.barrier()
    logger.log("evaluation complete")
    return float(np.mean(all_bpd))


def create_argparser():
    return script_parser(__doc__, "diffusion", data_dir="", clip_denoised=True, num_samples=1000, batch_size=1,
                         model_path="")


if __name__ == "__main__":
    main()
