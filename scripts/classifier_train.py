#!/usr/bin/env python
"""Train a noisy-image classifier for classifier guidance (upstream guided-diffusion's flags).

    python scripts/classifier_train.py --data_dir data/train --val_data_dir data/val --image_size 128 \
        --classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128 \
        --classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True \
        --iterations 300000 --batch_size 256 --lr 3e-4 --weight_decay 0.05

Labels come from file names (the part before the first underscore). Writes model{step:06d}.pt and
opt{step:06d}.pt to $OPENAI_LOGDIR every --save_interval steps and at the end; --resume_checkpoint
DIR/model{step:06d}.pt continues (with opt{step:06d}.pt from the same folder when it exists).
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch as th  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim import AdamW  # noqa: E402

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.checkpoint import load_checkpoint  # noqa: E402
from guided_diffusion.fp16_util import MixedPrecisionTrainer  # noqa: E402
from guided_diffusion.image_datasets import load_data  # noqa: E402
from guided_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion.train_util import (  # noqa: E402
    load_optimizer_state,
    log_loss_dict,
    parse_resume_step_from_filename,
    save_training_state,
    script_parser,
    set_lr,
    start_script,
    wrap_ddp,
)


def main(argv=None):
    args, model, diffusion = start_script(create_argparser(), argv, "classifier")
    if args.noised:
        schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    resume_step = 0
    if args.resume_checkpoint:
        resume_step = parse_resume_step_from_filename(args.resume_checkpoint)
        logger.log(f"loading model from checkpoint: {args.resume_checkpoint}... at {resume_step} step")
        load_checkpoint(model, args.resume_checkpoint)

    # Needed for creating correct EMAs and fp16 parameters.
    dist_util.sync_params(model.parameters())

    mp_trainer = MixedPrecisionTrainer(model=model, use_fp16=args.classifier_use_fp16, initial_lg_loss_scale=16.0)
    model = wrap_ddp(model, broadcast_buffers=False)

    logger.log("creating data loader...")
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                     class_cond=True, random_crop=True)
    val_data = load_data(data_dir=args.val_data_dir, batch_size=args.batch_size, image_size=args.image_size,
                         class_cond=True) if args.val_data_dir else None

    logger.log("creating optimizer...")
    opt = AdamW(mp_trainer.master_params, lr=args.lr, weight_decay=args.weight_decay)
    if args.resume_checkpoint:
        load_optimizer_state(opt, args.resume_checkpoint, resume_step)

    logger.log("training classifier model...")

    def forward_backward_log(data_loader, prefix="train"):
        batch, extra = next(data_loader)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        if args.noised:
            t, _ = schedule_sampler.sample(batch.shape[0], dist_util.dev())
            batch = diffusion.q_sample(batch, t)
        else:
            t = th.zeros(batch.shape[0], dtype=th.long, device=dist_util.dev())

        for i, (sub_batch, sub_labels, sub_t) in enumerate(split_microbatches(args.microbatch, batch, labels, t)):
            logits = model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")

            log_loss_dict(diffusion, sub_t, {
                f"{prefix}_loss": loss.detach(),
                **{f"{prefix}_acc@{k}": compute_top_k(logits, sub_labels, k=k, reduction="none") for k in (1, 5)}})
            loss = loss.mean()
            if loss.requires_grad:
                if i == 0:
                    mp_trainer.zero_grad()
                mp_trainer.backward(loss * len(sub_batch) / len(batch))

    step = 0
    for step in range(args.iterations - resume_step):
        logger.logkv("step", step + resume_step)
        logger.logkv("samples", (step + resume_step + 1) * args.batch_size * dist_util.get_world_size())
        if args.anneal_lr:
            set_lr(opt, args.lr * (1 - (step + resume_step) / args.iterations))
        forward_backward_log(data)
        mp_trainer.optimize(opt)
        if val_data is not None and not step % args.eval_interval:
            no_sync = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
            with th.no_grad(), no_sync:
                model.eval()
                forward_backward_log(val_data, prefix="val")
                model.train()
        if not step % args.log_interval:
            logger.dumpkvs()
        if step and not (step + resume_step) % args.save_interval:
            save_training_state(step + resume_step, mp_trainer, opt)
    save_training_state(step + resume_step, mp_trainer, opt)


def compute_top_k(logits, labels, k, reduction="mean"):
    """Whether each label is among the top ``k`` logits (reduction "none"), or the mean of that (upstream's)."""
    _, top_ks = th.topk(logits, min(k, logits.shape[-1]), dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return hits.mean().item() if reduction == "mean" else hits


def split_microbatches(microbatch, *args):
    """The tensors of ``args`` cut into chunks of ``microbatch`` rows (whole when -1 or large enough)."""
    bs = len(args[0])
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i : i + microbatch] if x is not None else None for x in args)


def create_argparser():
    return script_parser(__doc__, "classifier", data_dir="", val_data_dir="", noised=True, iterations=150000,
                         lr=3e-4, weight_decay=0.0, anneal_lr=False, batch_size=4, microbatch=-1,
                         schedule_sampler="uniform", resume_checkpoint="", log_interval=10, eval_interval=5,
                         save_interval=10000)


if __name__ == "__main__":
    main()
