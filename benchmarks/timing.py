"""Timing and cost of model calls: device synchronisation, interleaved median timing, peak memory, FLOP counting,
the devices' dense fp16 peaks, and the authors' two-pass PAG step that the benchmarks compare against."""

import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import pag

from .models import PAG_SCALE

# Dense (no sparsity) fp16/bf16 tensor-core peaks with fp32 accumulation, TFLOP/s, by device-name substring
# (first match wins). Unknown devices get no share of peak.
PEAK_DENSE_FP16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0,  # "H100": SXM
                          "A100": 312.0, "V100": 125.0, "L40S": 362.0, "RTX 4090": 165.0}


def peak_fp16_tflops(device_name):
    """The dense fp16 tensor peak of a device by name (:data:`PEAK_DENSE_FP16_TFLOPS`), None when unknown."""
    return next((value for key, value in PEAK_DENSE_FP16_TFLOPS.items() if key in device_name), None)


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


def naive_two_pass(model, layers):
    """The authors' strategy: a full clean pass and a full perturbed pass, then the formula."""

    def step(x, t, **kwargs):
        eps_and_var = model(x, t, **kwargs)
        with pag.perturbed_attention(model, layers):
            eps_perturbed = model(x, t, **kwargs)[:, :3]
        guided = pag.guidance_step(eps_and_var[:, :3], (eps_perturbed, torch.full((x.shape[0],), PAG_SCALE)))
        return torch.cat([guided, eps_and_var[:, 3:]], dim=1)

    return step


def guided_variants(model, layers, x, t, kwargs, doubled=False):
    """The calls a PAG step can make on ``x`` (batch B): unguided, the authors' two passes, the engine batched and
    sequential; with ``doubled`` also the unguided call at 2B (the bound for the batched engine's memory)."""
    config = pag.GuidanceConfig(pag_scale=PAG_SCALE, pag_layers=layers)
    engine, sequential = pag.guide(model, config), pag.guide(model, config, batch_passes=False)
    naive = naive_two_pass(model, layers)
    variants = {
        "unguided": lambda: model(x, t, **kwargs),
        "two_pass": lambda: naive(x, t, **kwargs),
        "engine": lambda: engine(x, t, **kwargs),
        "engine_sequential": lambda: sequential(x, t, **kwargs),
    }
    if doubled:
        x2, t2, kwargs2 = torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([v, v]) for k, v in kwargs.items()}
        variants["unguided_2b"] = lambda: model(x2, t2, **kwargs2)
    return variants


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
    """Peak allocated GPU memory of one call, MiB; None off CUDA (no per-call peak there)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def count_flops(fn):
    """Floating-point operations of one call (matmuls, convolutions, attention; 2 per multiply-add)."""
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's table
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v))  # query, key and value shapes
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()
