"""Cost per sampling step: unguided model vs naive two-pass PAG (the authors' strategy) vs our engine (``pag.guide``,
as sampling runs it; "engine_sequential": its lower-memory ``batch_passes=False``), one guided model call each on
the ADM 256x256 topology with random weights at the paper's layers (identity map), interleaved so machine load
affects them alike; prints the ratios measured in this one run, and on CUDA each variant's peak memory.
``--num_channels`` shrinks the width for CPU runs (the topology stays); on the CPU the host allocator is tuned as
the sampling entry points do. Goals on the 2-core CPU: engine / unguided <= 1.80, naive / engine >= 1.10.

    python scripts/bench_guidance.py                      # CPU-sized: 64 channels, batch 1
    python scripts/bench_guidance.py --num_channels 256 --batch_size 8 --device cuda --fp16
"""

import argparse
import json

import torch

import pag
from adm_common.files import atomic_write_text
from adm_common.flags import FlagParser
from sampling.process import tune_cpu_allocator
from sampling.models import set_compute_dtype

from .models import build, diffusion_flags, step_inputs
from .timing import guided_variants, peak_memory, time_interleaved


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="256x256_diffusion_uncond")
    parser.add_argument("--num_channels", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="convert the torso to fp16 (GPU)")
    parser.add_argument("--layers", default=",".join(pag.PAPER_LAYERS_256))
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    allocator = "glibc heap kept (as in sampling)" if device.type == "cpu" and tune_cpu_allocator() else "default"
    flags = diffusion_flags(args.model, tiny=False, num_channels=args.num_channels)
    model = build("diffusion", flags, device, seed=0)[0]
    if args.fp16:
        set_compute_dtype(model, torch.float16)  # upstream's convert_to_fp16
    layers = pag.resolve_layers(model, args.layers)
    variants = guided_variants(model, layers, *step_inputs(flags, args.batch_size, device))
    median, failed = time_interleaved(variants, device, args.repeats, warmup=1)
    if failed:
        raise SystemExit("; ".join(f"{name}: {error}" for name, error in failed.items()))
    peak = {name: peak_memory(fn, device) for name, fn in variants.items()} if device.type == "cuda" else {}
    print(f"device={device} model={args.model} num_channels={args.num_channels} batch={args.batch_size} "
          f"fp16={args.fp16} layers={','.join(layers)} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"host allocator: {allocator}")
    for name in variants:
        memory = f"  peak {peak[name]:8.1f} MiB" if name in peak else ""
        print(f"{name:>15}: {median[name] * 1000:9.1f} ms/step (median){memory}")
    ratios = {
        "engine/unguided": median["engine"] / median["unguided"],
        "naive/unguided": median["two_pass"] / median["unguided"],
        "naive/engine": median["two_pass"] / median["engine"],
    }
    for name, value in ratios.items():
        print(f"{name:>15}: {value:.3f}")
    print(f"goals: engine/unguided <= 1.80 -> {'met' if ratios['engine/unguided'] <= 1.80 else 'NOT met'}; "
          f"naive/engine >= 1.10 -> {'met' if ratios['naive/engine'] >= 1.10 else 'NOT met'}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"median_s": median, "ratios": ratios, "peak_mib": peak,
                                                 "args": vars(args)}, indent=2))
    return 0
