"""GPU acceptance check: one command that says whether this machine samples correctly and how fast.

    make gpu-check                                    # = python scripts/gpu_check.py (the local rank's GPU)
    python scripts/gpu_check.py --device cpu --tiny   # the same report on the CPU at tiny widths (the test suite)

Random weights at the real widths of the paper's models (``--model_dir DIR``: the official checkpoints there when
they exist). Writes and prints ``OUT/report.md`` and ``OUT/report.json`` (default ``results/gpu_check/``); sections
(docs/gpu.md): 1. float16 health, 2. speed per guided step, options and goals, 3. the sampler end to end, 4. the
evaluator's feature throughput. Exit status 0 when every correctness check passed (speed goals are reported), 1
otherwise; 2 at once when no GPU is usable and ``--device cpu`` was not given (the message names why).
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, make_dataclass, replace
from pathlib import Path

import torch

from adm_common.files import atomic_write_text
from adm_common.flags import FlagParser

from .end_to_end import check_features, check_sampler
from .health import check_health
from .models import log
from .report import to_markdown
from .speed import check_speed, evaluate_goals
from .timing import device_info

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
# How much each section measures: FULL (make gpu-check) and TINY (--tiny, the test suite).
Profile = make_dataclass("Profile", ["batch_sizes", "repeats", "warmup", "health_batch", "sampler_samples",
                                     "sampler_batch", "sync_batches", "feature_batch", "feature_repeats"])
FULL = Profile(batch_sizes=(1, 8, 32, 64), repeats=10, warmup=2, health_batch=2, sampler_samples=64,
               sampler_batch=32, sync_batches=(1, 4), feature_batch=64, feature_repeats=5)
TINY = Profile(batch_sizes=(1, 2), repeats=2, warmup=1, health_batch=1, sampler_samples=4, sampler_batch=2,
               sync_batches=(1, 3), feature_batch=2, feature_repeats=2)


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def nvidia_driver_version():
    """(version, where it was read) of the NVIDIA kernel driver, or None: /proc/driver/nvidia/version, else
    ``nvidia-smi --query-gpu=driver_version``."""
    try:
        text = Path(DRIVER_VERSION_FILE).read_text(errors="replace")
        found = (re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
                 or re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", text))
        if found:
            return found.group(1), DRIVER_VERSION_FILE
    except OSError:
        pass
    try:  # no nvidia-smi on the PATH raises FileNotFoundError
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        version = out.stdout.strip().split("\n")[0].strip() if out.returncode == 0 else ""
        if version:
            return version, "nvidia-smi"
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def no_gpu_message():
    """One line: why this check will not run on a GPU here, and what to do."""
    build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is a CPU-only build")
    found = nvidia_driver_version()
    driver = f"NVIDIA driver {found[0]} ({found[1]})" if found else "no NVIDIA driver found"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = (f", CUDA_VISIBLE_DEVICES={visible!r} hides the GPUs" if visible is not None
              and visible.strip() in ("", "-1", "none", "NoDevFiles") else "")
    fix = ("install a torch wheel built for a CUDA version this driver supports (nvidia-smi's \"CUDA Version\" is "
           "the newest)" if found else "install the NVIDIA driver, or give this container the GPUs (--gpus all)")
    return (f"no usable CUDA GPU (torch.cuda.is_available() is False): {build}, {driver}{hidden}; {fix}, or run the "
            "check on the CPU: --device cpu --tiny (make gpu-check GPU_CHECK_FLAGS=\"--device cpu --tiny\")")


def main(argv=None):
    args = parse_args(argv)
    wants_gpu = not args.device or torch.device(args.device).type == "cuda"
    if wants_gpu and not torch.cuda.is_available():  # never the real widths on the CPU by accident
        print(f"error: {no_gpu_message()}", file=sys.stderr, flush=True)
        return 2
    started = time.perf_counter()
    from guided_diffusion import dist_util

    device = torch.device(args.device) if args.device else dist_util.dev()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    profile = TINY if args.tiny else FULL
    if args.batch_sizes:
        profile = replace(profile, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    if args.repeats:
        profile = replace(profile, repeats=args.repeats)
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    dtype = args.dtype or ("float16" if device.type == "cuda" else "bfloat16")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":  # as the sampling entry points do (large activations would page-fault in each step)
        from sampling.process import tune_cpu_allocator

        tune_cpu_allocator()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    report = {"schema": SCHEMA, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": info, "gpu_run": info["gpu"], "tiny": args.tiny, "profile": asdict(profile),
              "low_precision": dtype, "compile_measured": compile_on, "errors": {}}
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
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    markdown = to_markdown(report)
    atomic_write_text(out / "report.md", markdown)
    print(markdown)
    torch.set_num_threads(threads)
    return 0 if report["ok"] else 1
