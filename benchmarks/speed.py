"""Section 2 of the GPU check, speed per guided step: unguided, the authors' two-pass strategy and the engine
(batched and sequential) at each batch size, with time, throughput, peak memory and FLOP rate; the execution options
(float16 / bfloat16 / channels_last / torch.compile) at the goal batch size; the goals of issue 14."""

import copy
import time

import torch

import pag
from sampling.models import set_compute_dtype

from .models import ARCHS, DDIM_STEPS, PAG_SCALE, TIMESTEP, build, diffusion_flags, log, step_inputs
from .timing import count_flops, guided_variants, peak_memory, time_interleaved

GOALS = (
    ("engine_vs_unguided", "engine PAG step / unguided step at batch 32", "<=", 1.80),
    ("naive_vs_engine", "two-pass PAG step / engine PAG step at batch 32", ">=", 1.10),
    ("unguided_peak_share", "unguided forward at batch 32, best float16/bfloat16 option, share of dense peak",
     ">=", 0.40),
)


def goal_batch(profile):
    return 32 if 32 in profile.batch_sizes else max(profile.batch_sizes)


def check_speed(device, profile, tiny, num_channels, seed, compile_on, peak, dtype):
    flags = diffusion_flags(ARCHS[0], tiny, num_channels)
    master, _, _ = build("diffusion", flags, device, seed)
    model = set_compute_dtype(copy.deepcopy(master), dtype)  # float16: upstream's use_fp16, the default
    layers = pag.resolve_layers(model, pag.PAPER_LAYERS_256)
    rows = []
    for batch in profile.batch_sizes:
        variants = guided_variants(model, layers, *step_inputs(flags, batch, device))
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
    return {"dtype": dtype + (" (upstream's use_fp16 conversion)" if dtype == "float16" else ""), "arch": ARCHS[0],
            "layers": layers, "pag_scale": PAG_SCALE, "timestep": TIMESTEP, "repeats": profile.repeats,
            "warmup": profile.warmup, "rows": rows, "options": options,
            "note": "ms per guided model call (one sampling step without the diffusion update); images/s of a "
                    f"DDIM-{DDIM_STEPS} image = batch / ({DDIM_STEPS} x step time); FLOPs counted by "
                    "torch.utils.flop_counter (convolutions, matmuls, attention)"}


def check_options(master, flags, device, profile, compile_on, layers, peak, rows):
    """Unguided and engine step at the goal batch size for each execution option."""
    batch = goal_batch(profile)
    unguided_flops = next((r["gflop"] for r in rows if r["batch"] == batch and r["variant"] == "unguided"), None)
    options = [("float16", {}), ("bfloat16", {}), ("float16 + channels_last", {"channels_last": True}),
               ("bfloat16 + channels_last", {"channels_last": True}),
               ("float16 + compile", {"compile": True}),  # one compiled dtype: minutes each
               ("float32" + (" (TF32 convolutions)" if device.type == "cuda" else ""), {})]
    results = []
    x, t, kwargs = step_inputs(flags, batch, device)
    for name, execution in options:
        dtype = name.split()[0]
        row = {"option": name, "batch": batch, "unguided_ms": None, "engine_ms": None, "engine_vs_unguided": None,
               "tflops_per_s": None, "peak_share": None, "error": None}
        if execution.get("compile") and not compile_on:
            row["error"] = "skipped (compile measured on a GPU, or with --compile on)"
        elif dtype == "float16" and device.type == "cpu":
            row["error"] = "skipped on the CPU (no fast float16 convolution kernels)"
        if row["error"]:
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
            row.update({f"{k}_ms": v * 1e3 for k, v in median.items() if v is not None})
            if row["unguided_ms"] and unguided_flops:
                row["tflops_per_s"] = unguided_flops / row["unguided_ms"]  # GFLOP per ms
                row["peak_share"] = row["tflops_per_s"] / peak if peak else None
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
    for key, slow, fast in (("engine_vs_unguided", "engine", "unguided"), ("naive_vs_engine", "two_pass", "engine")):
        if step.get((batch, slow)) and step.get((batch, fast)):
            value[key] = step[(batch, slow)] / step[(batch, fast)]
    low = [o for o in speed["options"] if not o["option"].startswith("float32") and o["peak_share"] is not None]
    best = max(low, key=lambda o: o["peak_share"], default=None)
    if best is not None:
        value["unguided_peak_share"] = best["peak_share"]
    goals = []
    for key, what, op, target in GOALS:
        measured = value.get(key)
        if not gpu:
            status = "not measured (no GPU)"
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
