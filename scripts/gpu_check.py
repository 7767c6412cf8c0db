#!/usr/bin/env python
"""GPU acceptance check: one command that says whether this machine samples correctly and how fast.

    make gpu-check                                    # = python scripts/gpu_check.py (the local rank's GPU)
    python scripts/gpu_check.py --device cpu --tiny   # the same report on the CPU at tiny widths (the test suite)

Random weights at the real widths of the paper's models (nothing is downloaded; ``--model_dir DIR`` uses the
official checkpoints there instead when they exist). Writes ``OUT/report.json`` and ``OUT/report.md``
(default ``results/gpu_check/``) and prints the Markdown. Sections:

1. float16 health: the 256x256 unconditional and class-conditional U-Nets after ``convert_to_fp16()``, unguided,
   PAG with every perturbation of ``pag.REGISTRY``, SAG, and PAG + classifier guidance (256x256_classifier, also
   float16), at t = 999, 500, 10: no inf/NaN in any attention block's output (forward hooks) or in eps, and eps
   within a stated tolerance of a float32 run of the same weights (TF32 off).
2. speed per guided step at batch sizes 1, 8, 32, 64: unguided, the authors' two-pass strategy, the engine
   (``pag.guide``, batched and sequential), with ms/step, images/s of a DDIM-25 image, peak memory and achieved
   TFLOP/s (``torch.utils.flop_counter``) against the device's dense fp16 peak; then the execution options
   (float16 / bfloat16 / channels_last / torch.compile) at batch 32; the goals of issue 14.
3. the sampler end to end: ``scripts/image_sample.py`` (its ``main``, in this process) on 64 samples, DDIM-25,
   PAG, then the same command again (a no-op), the npz checked; host synchronisations per step.
4. the evaluator's Inception feature extraction throughput (random weights, marked so).

Exit status 0 when every correctness check passed (speed goals are reported, not enforced), 1 otherwise.
"""

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import platform
import shutil
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import pag  # noqa: E402
from bench_guidance import naive_two_pass  # noqa: E402
from guided_diffusion.script_util import create_model_from_flags  # noqa: E402
from guided_diffusion.unet import attention_blocks  # noqa: E402
from sampling.model_configs import load_model_config  # noqa: E402
from sampling.models import set_compute_dtype  # noqa: E402

SCHEMA = 1
ARCHS = ("256x256_diffusion_uncond", "256x256_diffusion")
CLASSIFIER = "256x256_classifier"
HEALTH_TIMESTEPS = (999, 500, 10)
PAG_SCALE = 3.0  # the authors' ADM --guide_scale 4.0
SAG_SCALE = 1.0
DDIM_STEPS = 25
# The tiny widths: the same block names (the paper's PAG layers exist), 64x64 inputs, 32 base channels.
TINY_FLAGS = dict(image_size=64, num_channels=32, channel_mult="1,1,2,2,4,4", attention_resolutions="8,4,2")
TINY_CLASSIFIER_FLAGS = dict(image_size=64, classifier_width=64)

# Dense (no sparsity) fp16/bf16 tensor-core peaks with fp32 accumulation, TFLOP/s, by device-name substring
# (first match wins). Unknown devices get no share of peak.
PEAK_DENSE_FP16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("V100", 125.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)

# Low precision vs float32 agreement of eps: relative RMS difference ||e_low - e32|| / ||e32||, same weights and
# inputs, float32 without TF32. float16 rounds to 2^-11 (4.9e-4) relative per operation; through the U-Net's ~80
# layers (GroupNorm re-normalising after every residual branch) that adds up to a few 1e-3 for one pass. A guided
# eps, eps + s (eps - eps'), weighs the errors of two passes by 1 + s and s (s = 3): a few times more. Measured on
# the CPU at tiny widths (every method, t = 999, 500, 10; random weights): float16 <= 2.0e-3 unguided, <= 5.9e-3
# guided; bfloat16 (2^-8, 8 times coarser) <= 1.5e-2 and <= 4.7e-2. The bounds are 5 times that. A real failure
# (overflow, a saturated softmax, a wrong cast) shows as inf/NaN or an error of order 1.
TOLERANCE = {"float16": {"unguided": 1e-2, "guided": 3e-2}, "bfloat16": {"unguided": 8e-2, "guided": 0.24}}
TOLERANCE_WHY = (
    "relative RMS difference of eps vs float32 (TF32 off), same weights and inputs. float16 rounds to 2^-11 per "
    "operation; ~80 layers accumulate a few 1e-3 in one pass, and guidance eps + s (eps - eps') weighs two "
    "passes' errors by 1 + s and s. Measured on the CPU at tiny widths: float16 <= 2.0e-3 unguided, <= 5.9e-3 "
    "guided; bfloat16 (2^-8) <= 1.5e-2 and <= 4.7e-2; the bounds are 5 times that. Overflow or a wrong cast "
    "shows as inf/NaN or an error of order 1. Random weights keep activations small (see max abs attention "
    "output): overflow that only trained weights provoke needs --model_dir with the official checkpoints.")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

GOALS = (
    ("engine_vs_unguided", "engine PAG step / unguided step at batch 32", "<=", 1.80),
    ("naive_vs_engine", "two-pass PAG step / engine PAG step at batch 32", ">=", 1.10),
    ("unguided_peak_share", "unguided forward at batch 32, best float16/bfloat16 option, share of dense peak",
     ">=", 0.40),
)
NO_GPU = "not measured (no GPU)"


@dataclass
class Profile:
    batch_sizes: tuple
    repeats: int
    warmup: int
    health_batch: int
    sampler_samples: int
    sampler_batch: int
    sync_batches: tuple
    feature_batch: int
    feature_repeats: int


FULL = Profile(batch_sizes=(1, 8, 32, 64), repeats=10, warmup=2, health_batch=2, sampler_samples=64,
               sampler_batch=32, sync_batches=(1, 4), feature_batch=64, feature_repeats=5)
TINY = Profile(batch_sizes=(1, 2), repeats=2, warmup=1, health_batch=1, sampler_samples=4, sampler_batch=2,
               sync_batches=(1, 3), feature_batch=2, feature_repeats=2)


def log(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models


def diffusion_flags(name, tiny, num_channels=None):
    flags = dict(load_model_config(name)["flags"])
    if tiny:
        flags.update(TINY_FLAGS)
    if num_channels:
        flags["num_channels"] = num_channels
    return flags


def classifier_flags(tiny):
    flags = dict(load_model_config(CLASSIFIER)["flags"])
    if tiny:
        flags.update(TINY_CLASSIFIER_FLAGS)
    return flags


def randomize(model, seed):
    """Random weights in which every layer counts: PyTorch's default initialisation for every convolution and
    linear layer (ADM zero-initialises the output convolutions and attention projections)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.reset_parameters()
    return model


def load_official(model, model_dir, name):
    """Load the official checkpoint ``name`` from ``model_dir`` when it is there; returns whether it was."""
    if not model_dir:
        return False
    path = Path(model_dir) / load_model_config(name)["file"]
    if not path.is_file():
        return False
    from guided_diffusion.checkpoint import read_state_dict

    model.load_state_dict(read_state_dict(str(path)), strict=True)
    return True


def build(kind, flags, device, seed, model_dir=None, name=None):
    """``(network, diffusion, weights)``: random weights unless ``model_dir`` holds the official checkpoint."""
    with torch.device(device):
        net, diffusion = create_model_from_flags(kind, flags)
    randomize(net, seed)
    weights = "official checkpoint" if load_official(net, model_dir, name) else "random"
    return net.eval().requires_grad_(False), diffusion, weights


@contextlib.contextmanager
def exact_float32():
    """float32 without TF32 (cuDNN convolutions use TF32 by default on Ampere and later)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def peak_fp16_tflops(device_name):
    """The dense fp16 tensor peak of a device by name (:data:`PEAK_DENSE_FP16_TFLOPS`), None when unknown."""
    return next((value for key, value in PEAK_DENSE_FP16_TFLOPS if key in device_name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device):
    info = {"type": device.type, "gpu": device.type == "cuda", "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        peak = peak_fp16_tflops(name)
        info.update(name=name, cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, peak_fp16_tflops=peak,
                    peak_note=("dense fp16/bf16 tensor-core peak from this script's table" if peak else
                               f"unknown device {name!r}: not in this script's table of peaks, no share of peak"))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    peak_fp16_tflops=None, peak_note="CPU: no tensor-core peak, no share of peak")
    return info


# ------------------------------------------------------------------------------------------ 1. health


def _hooks(networks):
    """Forward hooks on every attention block: record whether its output is finite and its largest value."""
    stats = {"nonfinite_blocks": set(), "max_abs": 0.0}
    handles = []
    for prefix, net in networks.items():
        for name, block in attention_blocks(net).items():
            def hook(module, inputs, output, name=f"{prefix}{name}"):
                out = output.detach()
                if not bool(torch.isfinite(out).all()):
                    stats["nonfinite_blocks"].add(name)
                else:
                    stats["max_abs"] = max(stats["max_abs"], float(out.abs().max()))
            handles.append(block.register_forward_hook(hook))
    return stats, handles


def _guided_eps(model, classifier, diffusion, method, x, t, y, row_seeds):
    """eps of ``method`` (first 3 output channels); with classifier guidance, upstream's condition_score."""
    settings = dict(method["guidance"])
    guided = pag.guide(model, pag.GuidanceConfig(**settings), diffusion=diffusion)
    kwargs = {"y": y} if model.num_classes else {}
    with torch.no_grad():
        eps = guided(x, t, row_seeds=row_seeds, **kwargs)[:, :3].float()
    if method.get("classifier"):
        cond_fn = pag.classifier_cond_fn(classifier, method["classifier_scale"])
        abar = torch.as_tensor(diffusion.alphas_cumprod, device=x.device)[t].float().reshape(-1, 1, 1, 1)
        eps = eps - (1 - abar).sqrt() * cond_fn(x, t, y=y).float()
    return eps


def health_methods(class_cond, classifier_scale, tiny=False):
    methods = [{"name": "unguided", "guidance": {}}]
    for kind in pag.REGISTRY:
        guidance = dict(pag_scale=PAG_SCALE, perturbation=kind)
        if tiny and kind == "blur":  # the tiny model's 2x2 blocks: a 4x4 map takes no 9x9 reflect-padded kernel
            guidance["blur_kernel_size"] = 3
        methods.append({"name": f"pag {kind}", "guidance": guidance})
    methods.append({"name": "sag", "guidance": dict(sag_scale=SAG_SCALE)})
    methods.append({"name": "pag identity + classifier", "guidance": dict(pag_scale=PAG_SCALE),
                    "classifier": True, "classifier_scale": classifier_scale})
    return methods


def check_health(device, profile, tiny, num_channels, model_dir, seed, dtype):
    """Every method at every health timestep in ``dtype`` (float16 on a GPU: upstream's ``convert_to_fp16``) against
    float32 with the same weights."""
    name = str(dtype).replace("torch.", "")
    cases, weights = [], {}
    for arch in ARCHS:
        flags = diffusion_flags(arch, tiny, num_channels)
        model32, diffusion, weights[arch] = build("diffusion", dict(flags, use_fp16=False), device, seed, model_dir,
                                                  arch)
        model_low = set_compute_dtype(copy.deepcopy(model32), dtype)  # float16: convert_to_fp16()
        classifier32, _, weights[CLASSIFIER] = build("classifier", classifier_flags(tiny), device, seed + 1,
                                                     model_dir, CLASSIFIER)
        classifier_low = set_compute_dtype(copy.deepcopy(classifier32), dtype)
        scale = float(load_model_config(arch).get("classifier", {}).get("scale", 1.0))
        size, batch = flags["image_size"], profile.health_batch
        for method in health_methods(flags.get("class_cond", False), scale, tiny):
            log(f"health: {arch} {method['name']}")
            for step in HEALTH_TIMESTEPS:
                gen = torch.Generator().manual_seed(seed * 1000 + step)
                x = torch.randn(batch, 3, size, size, generator=gen).to(device)
                y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
                t = torch.full((batch,), step, device=device, dtype=torch.long)
                row_seeds = tuple(range(batch))
                stats, handles = _hooks({"": model_low, "classifier:": classifier_low})
                try:
                    eps_low = _guided_eps(model_low, classifier_low, diffusion, method, x, t, y, row_seeds)
                finally:
                    for handle in handles:
                        handle.remove()
                with exact_float32():
                    eps32 = _guided_eps(model32, classifier32, diffusion, method, x, t, y, row_seeds)
                finite = bool(torch.isfinite(eps_low).all())
                diff = (eps_low - eps32) if finite else None
                rel_rms = float(diff.norm() / eps32.norm().clamp_min(1e-30)) if finite else None
                rel_max = float(diff.abs().max() / eps32.abs().max().clamp_min(1e-30)) if finite else None
                tolerance = TOLERANCE[name]["unguided" if method["name"] == "unguided" else "guided"]
                ok = finite and not stats["nonfinite_blocks"] and rel_rms <= tolerance
                cases.append({"arch": arch, "method": method["name"], "t": step, "finite_eps": finite,
                              "nonfinite_attention_blocks": sorted(stats["nonfinite_blocks"]),
                              "max_abs_attention_output": stats["max_abs"], "rel_rms": rel_rms,
                              "rel_max": rel_max, "tolerance": tolerance, "ok": ok})
        del model_low, model32, classifier_low, classifier32
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": name, "cases": cases, "ok": all(c["ok"] for c in cases), "tolerance": TOLERANCE[name],
            "tolerance_why": TOLERANCE_WHY, "weights": weights, "batch": profile.health_batch,
            "pag_scale": PAG_SCALE, "sag_scale": SAG_SCALE, "timesteps": list(HEALTH_TIMESTEPS),
            "classifier": f"256x256_classifier flags, converted to {name} in the {name} run"}


# ------------------------------------------------------------------------------------------ 2. speed


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn):
    """Floating-point operations of one call (matmuls, convolutions, attention; 2 per multiply-add)."""
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's table
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def time_interleaved(variants, device, repeats, warmup):
    """Median seconds per call of each variant; the variants alternate so machine load affects them alike.
    Variants that run out of memory get None."""
    times = {name: [] for name in variants}
    failed = {}
    with torch.no_grad():
        for name, fn in variants.items():
            try:
                for _ in range(warmup):
                    fn()
                sync(device)
            except torch.cuda.OutOfMemoryError as e:
                failed[name] = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
        for _ in range(repeats):
            for name, fn in variants.items():
                if name in failed:
                    continue
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(v) if v else None) for name, v in times.items()}, failed


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _inputs(flags, batch, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = flags["image_size"]
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    kwargs = {"y": torch.zeros(batch, dtype=torch.long, device=device)} if flags.get("class_cond") else {}
    return x, t, kwargs


def goal_batch(profile):
    return 32 if 32 in profile.batch_sizes else max(profile.batch_sizes)


def check_speed(device, profile, tiny, num_channels, seed, compile_on, peak, dtype):
    flags = diffusion_flags(ARCHS[0], tiny, num_channels)
    master, _, _ = build("diffusion", dict(flags, use_fp16=False), device, seed)
    model = set_compute_dtype(copy.deepcopy(master), dtype)  # float16: upstream's use_fp16, the default
    layers = pag.resolve_layers(model, pag.PAPER_LAYERS_256)
    config = pag.GuidanceConfig(pag_scale=PAG_SCALE, pag_layers=layers)
    engine, sequential = pag.guide(model, config), pag.guide(model, config, batch_passes=False)
    naive = naive_two_pass(model, layers)
    rows = []
    for batch in profile.batch_sizes:
        x, t, kwargs = _inputs(flags, batch, device)
        variants = {
            "unguided": lambda: model(x, t, **kwargs),
            "two_pass": lambda: naive(x, t),
            "engine": lambda: engine(x, t, **kwargs),
            "engine_sequential": lambda: sequential(x, t, **kwargs),
        }
        log(f"speed: batch {batch}")
        median, failed = time_interleaved(variants, device, profile.repeats, profile.warmup)
        for name, fn in variants.items():
            seconds = median[name]
            row = {"batch": batch, "variant": name, "ms_per_step": None, "images_per_s_ddim25": None,
                   "peak_mib": None, "gflop": None, "tflops_per_s": None, "peak_share": None,
                   "error": failed.get(name)}
            if seconds is not None:
                flops = count_flops(fn)
                row.update(ms_per_step=seconds * 1e3, images_per_s_ddim25=batch / (DDIM_STEPS * seconds),
                           peak_mib=peak_memory(fn, device), gflop=flops / 1e9,
                           tflops_per_s=flops / seconds / 1e12)
                if peak:
                    row["peak_share"] = row["tflops_per_s"] / peak
            rows.append(row)
    options = check_options(master, flags, device, profile, compile_on, layers, peak, rows)
    dtype_name = str(dtype).replace("torch.", "")
    return {"dtype": dtype_name + (" (upstream's use_fp16 conversion)" if dtype == torch.float16 else ""),
            "arch": ARCHS[0], "layers": layers,
            "pag_scale": PAG_SCALE, "timestep": 500, "repeats": profile.repeats, "warmup": profile.warmup,
            "rows": rows, "options": options,
            "note": "ms per guided model call (one sampling step without the diffusion update); images/s of a "
                    f"DDIM-{DDIM_STEPS} image = batch / ({DDIM_STEPS} x step time); FLOPs counted by "
                    "torch.utils.flop_counter (convolutions, matmuls, attention)"}


def check_options(master, flags, device, profile, compile_on, layers, peak, rows):
    """Unguided and engine step at the goal batch size for each execution option."""
    batch = goal_batch(profile)
    unguided_flops = next((r["gflop"] for r in rows if r["batch"] == batch and r["variant"] == "unguided"), None)
    options = [("float16", torch.float16, {}), ("bfloat16", torch.bfloat16, {}),
               ("float16 + channels_last", torch.float16, {"channels_last": True}),
               ("bfloat16 + channels_last", torch.bfloat16, {"channels_last": True}),
               ("float16 + compile", torch.float16, {"compile": True}),  # one compiled dtype: minutes each
               ("float32" + (" (TF32 convolutions)" if device.type == "cuda" else ""), torch.float32, {})]
    results = []
    x, t, kwargs = _inputs(flags, batch, device)
    for name, dtype, execution in options:
        row = {"option": name, "batch": batch, "unguided_ms": None, "engine_ms": None, "engine_vs_unguided": None,
               "tflops_per_s": None, "peak_share": None, "error": None}
        if execution.get("compile") and not compile_on:
            row["error"] = "skipped (compile measured on a GPU, or with --compile on)"
            results.append(row)
            continue
        if dtype == torch.float16 and device.type == "cpu":
            row["error"] = "skipped on the CPU (no fast float16 convolution kernels)"
            results.append(row)
            continue
        log(f"options: {name}")
        try:
            model = set_compute_dtype(copy.deepcopy(master), dtype)
            unguided = pag.guide(model, pag.GuidanceConfig(pag_scale=0.0), **execution)
            engine = pag.guide(model, pag.GuidanceConfig(pag_scale=PAG_SCALE, pag_layers=layers), **execution)
            start = time.perf_counter()
            median, failed = time_interleaved({"unguided": lambda: unguided(x, t, **kwargs),
                                               "engine": lambda: engine(x, t, **kwargs)},
                                              device, profile.repeats, profile.warmup)
            if execution.get("compile"):
                row["compile_and_warmup_s"] = time.perf_counter() - start
            row["error"] = "; ".join(f"{k}: {v}" for k, v in failed.items()) or None
            if median["unguided"] is not None:
                row["unguided_ms"] = median["unguided"] * 1e3
                if unguided_flops:
                    row["tflops_per_s"] = unguided_flops / 1e3 / median["unguided"]
                    row["peak_share"] = row["tflops_per_s"] / peak if peak else None
            if median["engine"] is not None:
                row["engine_ms"] = median["engine"] * 1e3
            if row["unguided_ms"] and row["engine_ms"]:
                row["engine_vs_unguided"] = row["engine_ms"] / row["unguided_ms"]
        except Exception as e:  # an option this machine cannot run is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            model = unguided = engine = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
    return results


def evaluate_goals(speed, device, profile):
    gpu = device.type == "cuda"
    batch = goal_batch(profile)
    step = {(r["batch"], r["variant"]): r["ms_per_step"] for r in speed["rows"]}
    value = {}
    if step.get((batch, "unguided")) and step.get((batch, "engine")):
        value["engine_vs_unguided"] = step[(batch, "engine")] / step[(batch, "unguided")]
    if step.get((batch, "two_pass")) and step.get((batch, "engine")):
        value["naive_vs_engine"] = step[(batch, "two_pass")] / step[(batch, "engine")]
    low = [o for o in speed["options"] if not o["option"].startswith("float32") and o["peak_share"] is not None]
    best = max(low, key=lambda o: o["peak_share"], default=None)
    if best is not None:
        value["unguided_peak_share"] = best["peak_share"]
    goals = []
    for key, what, op, target in GOALS:
        measured = value.get(key)
        if not gpu:
            status = NO_GPU
        elif measured is None:
            status = "not measured (" + ("device peak unknown" if key == "unguided_peak_share" else "failed") + ")"
        else:
            status = "met" if (measured <= target if op == "<=" else measured >= target) else "NOT met"
        goal = {"goal": key, "what": what, "target": f"{op} {target}", "value": measured if gpu else None,
                "batch": batch, "status": status}
        if not gpu:  # what this CPU measured at its largest batch size: information, not the goal's figure
            goal["cpu_value"] = measured
        if key == "unguided_peak_share" and best is not None:
            goal["best_option"] = best["option"]
        goals.append(goal)
    return goals


# ------------------------------------------------------------------------------------------ 3. sampler


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor values by the host (``.item()``, ``bool()``, ``int()``): on CUDA each one waits
    for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(sampler, indices, device, steps):
    """Host synchronisations per sampling step of ``sampler.sample(indices)``: on CUDA every synchronising call
    (``torch.cuda.set_sync_debug_mode``: item/bool reads, blocking copies); on the CPU the value reads that would
    synchronise on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampler.sample(indices)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count = sum("synchroniz" in str(w.message) for w in caught)
    else:
        with HostReads() as reads:
            sampler.sample(indices)
        count = reads.count
    return count / steps


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sampler(device, profile, tiny, num_channels, seed, out_dir):
    import sampling
    from sampling import cli

    arch = ARCHS[1]  # class-conditional: the npz holds labels
    flags = diffusion_flags(arch, tiny, num_channels)
    work = Path(out_dir) / "sampler"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "random_weights.pt"
    net, _, _ = build("diffusion", dict(flags, use_fp16=False), torch.device("cpu"), seed)
    torch.save(net.state_dict(), ckpt)
    del net
    n, batch = profile.sampler_samples, profile.sampler_batch
    run_dir = work / "run"
    argv = ["--model", arch, "--model_path", str(ckpt), "--out_dir", str(run_dir), "--device", str(device),
            "--timestep_respacing", f"ddim{DDIM_STEPS}", "--use_ddim", "True", "--pag_scale", str(PAG_SCALE),
            "--num_samples", str(n), "--batch_size", str(batch), "--seed", str(seed)]
    for key in TINY_FLAGS if tiny else ():
        argv += [f"--{key}", str(flags[key])]
    if num_channels:
        argv += ["--num_channels", str(num_channels)]
    if device.type == "cpu":  # float16 convolutions have no fast CPU kernels (upstream's use_fp16 would crawl)
        argv += ["--dtype", "bfloat16"]
    command = "python scripts/image_sample.py " + " ".join(argv)
    result = {"command": command, "num_samples": n, "batch_size": batch, "ok": False}
    size = flags["image_size"]
    final = run_dir / f"samples_{n}x{size}x{size}x3.npz"
    start = time.perf_counter()
    code = cli.main(argv)
    result["first_run_s"] = time.perf_counter() - start
    result["first_exit_code"] = code
    result["images_per_s"] = n / result["first_run_s"]
    if code != 0 or not final.exists():
        result["error"] = f"first run exited {code}; {final.name} {'exists' if final.exists() else 'missing'}"
        return result
    before = (_sha256(final), final.stat().st_mtime_ns)
    start = time.perf_counter()
    code = cli.main(argv)
    result["second_run_s"] = time.perf_counter() - start
    result["second_exit_code"] = code
    log_text = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists() else ""
    result["resume_noop"] = (code == 0 and (_sha256(final), final.stat().st_mtime_ns) == before
                             and "the run is complete" in log_text)
    with np.load(final) as npz:
        images, labels = npz["arr_0"], npz.get("arr_1")
        result["npz"] = {"file": final.name, "arrays": sorted(npz.files), "shape": list(images.shape),
                         "dtype": str(images.dtype),
                         "labels_shape": None if labels is None else list(labels.shape),
                         "labels_dtype": None if labels is None else str(labels.dtype)}
    expected_labels = sampling.sample_labels(seed, range(n))
    checks = {
        "shape": list(images.shape) == [n, size, size, 3],
        "dtype": images.dtype == np.uint8,
        "labels": labels is not None and labels.dtype == np.int64 and np.array_equal(labels, expected_labels),
        "not_constant": float(images.std()) > 1.0,
        "resume_noop": result["resume_noop"],
    }
    result["checks"] = checks

    # Host synchronisations per step, at two batch sizes (they must not grow with the batch).
    settings = cli.resolve_cli(argv + ["--out_dir", str(work / "sync")])
    device_obj = torch.device(device)
    sampler = sampling.Sampler(settings, sampling.load_models(settings, device_obj), device_obj)
    steps = sampler.diffusion.num_timesteps
    result["host_syncs_per_step"] = {str(b): count_host_syncs(sampler, list(range(b)), device_obj, steps)
                                     for b in profile.sync_batches}
    result["host_syncs_method"] = ("torch.cuda.set_sync_debug_mode warnings" if device_obj.type == "cuda" else
                                   "CPU: host reads of tensor values (aten._local_scalar_dense), which synchronise "
                                   "on CUDA; blocking host-to-device copies are not visible on the CPU")
    counts = list(result["host_syncs_per_step"].values())
    checks["syncs_do_not_grow_with_batch"] = max(counts) == min(counts)
    result["ok"] = all(checks.values())
    ckpt.unlink()
    return result


# ------------------------------------------------------------------------------------------ 4. features


def check_features(device, profile, tiny):
    from evaluations.features import InceptionFeatures

    features = InceptionFeatures(allow_random_weights=True, device=str(device))
    size = 64 if tiny else 256
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (profile.feature_batch, size, size, 3), dtype=np.uint8)
    features(images)  # warm-up
    times = []
    for _ in range(profile.feature_repeats):
        sync(device)
        start = time.perf_counter()
        out = features(images)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"batch": profile.feature_batch, "image_size": size, "images_per_s": profile.feature_batch / seconds,
            "ms_per_batch": seconds * 1e3, "random_weights": bool(features.random_weights),
            "marker": features.marker, "pool_shape": list(out["pool"].shape),
            "note": "uint8 images to pool/logits/spatial features, host copies included (as the evaluator runs)"}


# ------------------------------------------------------------------------------------------ report


def _fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(report):
    d = report["device"]
    lines = [f"# GPU acceptance check ({'GPU' if d['gpu'] else 'CPU'}{', tiny widths' if report['tiny'] else ''})",
             ""]
    if not d["gpu"]:
        lines += ["**No GPU: this report was not run on a GPU.** Its figures are CPU figures"
                  + (" at tiny widths" if report["tiny"] else "") + "; the GPU goals are not measured.", ""]
    lines += [f"Device: {d['name']} ({d['type']}), torch {d['torch']}"
              + (f", CUDA {d.get('cuda')}, {d.get('memory_gib')} GiB" if d["gpu"] else "")
              + f". Peak: {_fmt(d.get('peak_fp16_tflops'), 0)} TFLOP/s ({d['peak_note']}).",
              f"Created {report['created']}, {report['elapsed_s']:.0f} s. Verdict: "
              f"**{'PASS' if report['ok'] else 'FAIL'}** (correctness; speed goals below are reported).", ""]
    if "health" in report:
        h = report["health"]
        bad = [c for c in h["cases"] if not c["ok"]]
        worst = {}
        for c in h["cases"]:
            key = (c["arch"], c["method"])
            if c["rel_rms"] is not None:
                worst[key] = max(worst.get(key, 0.0), c["rel_rms"])
        lines += [f"## 1. {h['dtype']} health", "",
                  f"{len(h['cases'])} cases ({len(bad)} failed): {', '.join(ARCHS)} x "
                  f"{len(health_methods(False, 1.0))} methods x t in {h['timesteps']}, batch {h['batch']}; "
                  f"weights: {', '.join(f'{k}: {v}' for k, v in h['weights'].items())}.",
                  f"Tolerance (relative RMS of eps vs float32): unguided {h['tolerance']['unguided']}, "
                  f"guided {h['tolerance']['guided']}. Why: {h['tolerance_why']}", "",
                  "| model | method | worst rel. RMS | max abs attention output | ok |", "|---|---|---|---|---|"]
        for (arch, method), value in worst.items():
            rows = [c for c in h["cases"] if c["arch"] == arch and c["method"] == method]
            lines.append(f"| {arch} | {method} | {value:.2e} | "
                         f"{max(c['max_abs_attention_output'] for c in rows):.3g} | "
                         f"{'yes' if all(c['ok'] for c in rows) else '**NO**'} |")
        for c in bad:
            lines.append(f"- FAILED: {c['arch']} {c['method']} t={c['t']}: finite eps {c['finite_eps']}, "
                         f"non-finite attention blocks {c['nonfinite_attention_blocks']}, rel. RMS {c['rel_rms']}")
        lines.append("")
    if "speed" in report:
        s = report["speed"]
        lines += ["## 2. Speed per guided step", "",
                  f"{s['arch']}, {s['dtype']}, PAG s = {s['pag_scale']} on {', '.join(s['layers'])}, t = "
                  f"{s['timestep']}; median of {s['repeats']} after {s['warmup']} warm-up. {s['note']}.", "",
                  "| batch | variant | ms/step | img/s (DDIM-25) | peak MiB | GFLOP | TFLOP/s | share of peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            share = f"{100 * r['peak_share']:.1f} %" if r["peak_share"] is not None else "-"
            lines.append(f"| {r['batch']} | {r['variant']} | {_fmt(r['ms_per_step'], 2)} | "
                         f"{_fmt(r['images_per_s_ddim25'], 2)} | {_fmt(r['peak_mib'], 0)} | {_fmt(r['gflop'], 1)} | "
                         f"{_fmt(r['tflops_per_s'], 3)} | {share}{' ' + r['error'] if r['error'] else ''} |")
        lines += ["", "Execution options (unguided and engine step):", "",
                  "| option | batch | unguided ms | engine ms | engine / unguided | unguided TFLOP/s | share of peak |",
                  "|---|---|---|---|---|---|---|"]
        for o in s["options"]:
            share = f"{100 * o['peak_share']:.1f} %" if o["peak_share"] is not None else "-"
            lines.append(f"| {o['option']} | {o['batch']} | {_fmt(o['unguided_ms'], 2)} | {_fmt(o['engine_ms'], 2)} "
                         f"| {_fmt(o['engine_vs_unguided'], 3)} | {_fmt(o['tflops_per_s'], 3)} | {share}"
                         f"{' (' + o['error'] + ')' if o['error'] else ''} |")
        lines.append("")
    if "goals" in report:
        lines += ["## Goals (issue 14)", "", "| goal | target | value | status |", "|---|---|---|---|"]
        for g in report["goals"]:
            value = _fmt(g["value"], 3) + (f" ({g['best_option']})" if g.get("best_option") else "")
            if g.get("cpu_value") is not None:
                value = f"- (this CPU at batch {g['batch']}: {g['cpu_value']:.3f})"
            lines.append(f"| {g['what']} | {g['target']} | {value} | {g['status']} |")
        lines.append("")
    if "sampler" in report:
        r = report["sampler"]
        lines += ["## 3. Sampler end to end", "", f"`{r['command']}` (run twice)", ""]
        if "checks" in r:
            lines += [f"- first run: {r['first_run_s']:.1f} s ({r['images_per_s']:.2f} img/s including model load), "
                      f"second run {r['second_run_s']:.1f} s, a no-op: {r['resume_noop']}",
                      f"- npz: {r['npz']['file']}, arrays {r['npz']['arrays']}, images {r['npz']['shape']} "
                      f"{r['npz']['dtype']}, labels {r['npz']['labels_shape']} {r['npz']['labels_dtype']}",
                      f"- host synchronisations per step by batch size: {r['host_syncs_per_step']} "
                      f"({r['host_syncs_method']})",
                      f"- checks: {', '.join(f'{k} {v}' for k, v in r['checks'].items())}"]
        else:
            lines.append(f"- FAILED: {r.get('error')}")
        lines.append("")
    if "features" in report:
        f = report["features"]
        lines += ["## 4. Evaluator feature extraction", "",
                  f"Inception (torch-fidelity inception-v3-compat){' **' + f['marker'] + '**' if f['marker'] else ''}"
                  f": {f['images_per_s']:.1f} images/s at batch {f['batch']} ({f['image_size']}x{f['image_size']} "
                  f"uint8 in, {f['ms_per_batch']:.1f} ms per batch). {f['note']}.", ""]
    for section, error in report.get("errors", {}).items():
        lines.append(f"- section {section} FAILED: {error}")
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: this process's local-rank GPU)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny widths (64x64, 32 channels), batch sizes 1 and 2, fewer repeats: the test suite's run")
    p.add_argument("--out", default=str(ROOT / "results" / "gpu_check"), help="report directory")
    p.add_argument("--sections", default="health,speed,sampler,features", help="comma-separated subset")
    p.add_argument("--batch_sizes", default="", help="override, e.g. 1,8,32,64")
    p.add_argument("--repeats", type=int, default=0, help="override the timed repeats")
    p.add_argument("--num_channels", type=int, default=0, help="override the U-Net width (default: the real one)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="measure torch.compile options (auto: on a GPU only; compiling takes minutes)")
    p.add_argument("--model_dir", default="",
                   help="use the official checkpoints in this directory for the health check where present")
    p.add_argument("--dtype", default="", choices=("", "float16", "bfloat16"),
                   help="the low precision checked and timed (default: float16 on a GPU, bfloat16 on the CPU, "
                        "where float16 convolutions have no fast kernels)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    from guided_diffusion import dist_util

    device = torch.device(args.device) if args.device else dist_util.dev()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    profile = TINY if args.tiny else FULL
    if args.batch_sizes:
        profile = Profile(**dict(asdict(profile), batch_sizes=tuple(int(b) for b in args.batch_sizes.split(","))))
    if args.repeats:
        profile = Profile(**dict(asdict(profile), repeats=args.repeats))
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "bfloat16")]
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":  # as the sampling entry points do (large activations would page-fault in each step)
        from sampling.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    report = {"schema": SCHEMA, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": info, "gpu_run": info["gpu"], "tiny": args.tiny, "profile": asdict(profile),
              "low_precision": str(dtype).replace("torch.", ""), "compile_measured": compile_on, "errors": {}}
    num_channels = args.num_channels or None
    log(f"device {device} ({info['name']}), tiny={args.tiny}, sections {', '.join(sections)}")
    steps = {
        "health": lambda: check_health(device, profile, args.tiny, num_channels, args.model_dir, args.seed, dtype),
        "speed": lambda: check_speed(device, profile, args.tiny, num_channels, args.seed, compile_on,
                                     info.get("peak_fp16_tflops"), dtype),
        "sampler": lambda: check_sampler(device, profile, args.tiny, num_channels, args.seed, out),
        "features": lambda: check_features(device, profile, args.tiny),
    }
    unknown = [name for name in sections if name not in steps]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(steps)}")
    for name in sections:
        log(f"section {name}")
        section_start = time.perf_counter()
        try:
            report[name] = steps[name]()
        except Exception as e:  # report and carry on with the other sections
            report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        log(f"section {name}: {time.perf_counter() - section_start:.1f} s")
        if name == "speed" and name in report:
            report["goals"] = evaluate_goals(report["speed"], device, profile)
    report["ok"] = (not report["errors"] and report.get("health", {}).get("ok", True)
                    and report.get("sampler", {}).get("ok", True))
    report["elapsed_s"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = to_markdown(report)
    (out / "report.md").write_text(markdown)
    print(markdown)
    torch.set_num_threads(threads)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
