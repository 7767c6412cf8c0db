"""FLOPs and GPU-hours of the paper's ADM 256x256 runs, counted on the ``meta`` device (shapes without storage: the
full-width U-Nets cost no memory and a forward takes milliseconds) by ``torch.utils.flop_counter`` (2 FLOPs per
multiply-add; :func:`attention_check` compares its attention count with a hand count). Per image and step, at batch 1:
unguided, the PAG engine (``pag.guide``: shared prefix, then ``[x; x]``) and the authors' two passes; GPU-hours per
50,000 images at an assumed ``--peak_fraction`` (default 40 %) of each device's dense fp16 peak, not a measurement.
The classifier of PAG + CG and SAG are not counted (docs/reproduction.md#cost-estimates).

    python scripts/bench_cost.py                      # = make bench-cost; seconds on a CPU
    python scripts/bench_cost.py --peak_fraction 0.3
"""

import argparse
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

import pag
from adm_common.flags import FlagParser
from evaluations.table import markdown_table as table
from guided_diffusion.unet import attention_block_info

from .models import ARCHS, PAG_SCALE, TIMESTEP, build, diffusion_flags, step_inputs
from .timing import count_flops, guided_variants, peak_fp16_tflops

SAMPLERS = (("DDPM-250", 250), ("DDIM-25", 25))
NUM_SAMPLES = 50_000
DEVICES = ("H100 SXM", "A100")  # peaks from benchmarks.timing.PEAK_DENSE_FP16_TFLOPS
DEFAULT_PEAK_FRACTION = 0.40
GUIDANCE = ("unguided", "PAG engine (batched)", "PAG two-pass (authors')")
# The paper's layers: those of configs/experiments/table1_*.yaml (tests check that they agree).
PAPER_LAYERS = tuple(pag.PAPER_LAYERS_256)


def meta_model(name):
    """The official ``name`` U-Net at full width on the meta device (no storage). float32: ``use_fp16`` changes
    the bytes, not the operations counted."""
    flags = diffusion_flags(name, tiny=False)
    return build("diffusion", flags, "meta", seed=0)[0], flags


@functools.lru_cache(maxsize=None)
def model_step_flops(name):
    """FLOPs per image (batch 1) of one sampling step's model calls of the official ``name`` U-Net on meta:
    ``{guidance: flops}`` for :data:`GUIDANCE`, counted once per process."""
    model, flags = meta_model(name)
    variants = guided_variants(model, list(PAPER_LAYERS), *step_inputs(flags, 1, "meta"))
    return {guidance: count_flops(variants[key]) for guidance, key in zip(GUIDANCE, ("unguided", "engine", "two_pass"))}


def attention_check(model, flags, batch=1):
    """``(counted, by_hand)`` FLOPs of the attention itself (softmax(q k^T) v, without the qkv and output
    projections) in one unguided forward: what FlopCounterMode counted inside the attention modules, and
    4 B T^2 C per block (two matmuls of B T^2 C multiply-adds; T tokens, C channels)."""
    x, t, kwargs = step_inputs(flags, batch, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, **kwargs)
    counted = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                  if name.endswith(".attention"))
    by_hand = sum(4 * batch * (resolution ** 2) ** 2 * channels
                  for _, resolution, channels, _ in attention_block_info(model))
    return counted, by_hand


def cost_rows(peak_fraction=DEFAULT_PEAK_FRACTION, archs=ARCHS):
    """One row per model, sampler and guidance: FLOPs per image and step, per image, per 50k run, and GPU-hours per
    50k images at ``peak_fraction`` of each of :data:`DEVICES`' dense fp16 peak."""
    if not 0 < peak_fraction <= 1:
        raise ValueError(f"the peak fraction must lie in (0, 1], got {peak_fraction}")
    rows = []
    for name in archs:
        per_step = model_step_flops(name)
        for sampler, steps in SAMPLERS:
            for guidance in GUIDANCE:
                run = per_step[guidance] * steps * NUM_SAMPLES
                hours = {device: run / (peak_fraction * peak_fp16_tflops(device) * 1e12) / 3600
                         for device in DEVICES}
                rows.append({"model": name, "sampler": sampler, "steps": steps, "guidance": guidance,
                             "forwards": per_step[guidance] / per_step[GUIDANCE[0]],
                             "tflop_per_step": per_step[guidance] / 1e12,
                             "tflop_per_image": per_step[guidance] * steps / 1e12,
                             "pflop_per_run": run / 1e15, "hours": hours})
    return rows


def cost_markdown(peak_fraction=DEFAULT_PEAK_FRACTION, archs=ARCHS):
    """What ``make bench-cost`` prints (as docs/reproduction.md): the assumptions, the attention check, the table."""
    rows = cost_rows(peak_fraction, archs)
    model, flags = meta_model(archs[0])
    counted, by_hand = attention_check(model, flags)
    peaks = ", ".join(f"{device} {peak_fp16_tflops(device):g}" for device in DEVICES)
    lines = [
        "FLOPs: torch.utils.flop_counter (2 per multiply-add) on the meta device, full-width 256x256 U-Nets, batch 1, "
        f"t = {TIMESTEP}; PAG s = {PAG_SCALE:g} at {', '.join(PAPER_LAYERS)} (identity attention).",
        f"Attention of one unguided forward ({archs[0]}): {counted / 1e9:.3f} GFLOP counted, "
        f"{by_hand / 1e9:.3f} by hand (4 B T^2 C per block).",
        f"GPU-hours per {NUM_SAMPLES:,} images at {peak_fraction:.0%} of the dense fp16 peak ({peaks} TFLOP/s): "
        "an assumption, not measured.",
        "",
    ]
    header = ["model", "sampler", "guidance", "forwards / step", "TFLOP / image / step", "TFLOP / image",
              f"PFLOP / {NUM_SAMPLES // 1000}k"] + [f"{d} h / {NUM_SAMPLES // 1000}k" for d in DEVICES]
    lines += table(header, [[r["model"], r["sampler"], r["guidance"], f"{r['forwards']:.3f}",
                             f"{r['tflop_per_step']:.3f}", f"{r['tflop_per_image']:,.1f}", f"{r['pflop_per_run']:,.0f}"]
                            + [f"{r['hours'][d]:,.1f}" for d in DEVICES] for r in rows], right=range(3, len(header)))
    return "\n".join(lines)


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak_fraction", type=float, default=DEFAULT_PEAK_FRACTION,
                        help="assumed fraction of the dense fp16 peak the sampler sustains (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.peak_fraction <= 1:
        parser.error(f"--peak_fraction must lie in (0, 1], got {args.peak_fraction}")
    print(cost_markdown(args.peak_fraction))
    return 0
