"""Sections 3 and 4 of the GPU check, end to end: the sampler's command (``scripts/image_sample.py``'s ``main``, in
this process) run twice, the second a no-op, with its npz checked and its host synchronisations per step counted;
the evaluator's Inception feature extraction throughput."""

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adm_common.files import file_sha256
from adm_common.npz import samples_filename

from .models import ARCHS, DDIM_STEPS, PAG_SCALE, TINY_FLAGS, build, diffusion_flags
from .timing import time_interleaved


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


def count_host_syncs(sampler, indices, device):
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
    return count / sampler.diffusion.num_timesteps


def check_sampler(device, profile, tiny, num_channels, seed, out_dir):
    import sampling
    from sampling import cli

    arch = ARCHS[1]  # class-conditional: the npz holds labels
    flags = diffusion_flags(arch, tiny, num_channels)
    work = Path(out_dir) / "sampler"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "random_weights.pt"
    net, _, _ = build("diffusion", flags, torch.device("cpu"), seed)
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
    final = run_dir / samples_filename(n, size, size)
    start = time.perf_counter()
    code = cli.main(argv)
    result["first_run_s"] = time.perf_counter() - start
    result["first_exit_code"] = code
    result["images_per_s"] = n / result["first_run_s"]
    if code != 0 or not final.exists():
        result["error"] = f"first run exited {code}; {final.name} {'exists' if final.exists() else 'missing'}"
        return result
    before = (file_sha256(final), final.stat().st_mtime_ns)
    start = time.perf_counter()
    code = cli.main(argv)
    result["second_run_s"] = time.perf_counter() - start
    result["second_exit_code"] = code
    log_text = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists() else ""
    result["resume_noop"] = (code == 0 and (file_sha256(final), final.stat().st_mtime_ns) == before
                             and "the run is complete" in log_text)
    with np.load(final) as npz:
        images, labels = npz["arr_0"], npz.get("arr_1")
        result["npz"] = {"file": final.name, "arrays": sorted(npz.files), "shape": list(images.shape),
                         "dtype": str(images.dtype), "labels_shape": None if labels is None else list(labels.shape),
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
    sampler = sampling.Sampler(settings, sampling.load_models(settings, device), device)
    result["host_syncs_per_step"] = {str(b): count_host_syncs(sampler, list(range(b)), device)
                                     for b in profile.sync_batches}
    result["host_syncs_method"] = ("torch.cuda.set_sync_debug_mode warnings" if device.type == "cuda" else
                                   "CPU: host reads of tensor values (aten._local_scalar_dense), which synchronise "
                                   "on CUDA; blocking host-to-device copies are not visible on the CPU")
    counts = list(result["host_syncs_per_step"].values())
    checks["syncs_do_not_grow_with_batch"] = max(counts) == min(counts)
    result["ok"] = all(checks.values())
    ckpt.unlink()
    return result


def check_features(device, profile, tiny):
    from evaluations.features import InceptionFeatures, full_float32

    features = InceptionFeatures(allow_random_weights=True, device=str(device))
    size = 64 if tiny else 256
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (profile.feature_batch, size, size, 3), dtype=np.uint8)
    with full_float32():  # the evaluator's numerics (evaluations.reference.extract_features): TF32 off
        out = features(images)  # warm-up
        median, _ = time_interleaved({"features": lambda: features(images)}, device, profile.feature_repeats, 0)
    seconds = median["features"]
    return {"batch": profile.feature_batch, "image_size": size, "images_per_s": profile.feature_batch / seconds,
            "ms_per_batch": seconds * 1e3, "random_weights": bool(features.random_weights),
            "marker": features.marker, "pool_shape": list(out["pool"].shape),
            "note": "uint8 images to pool/logits/spatial features, host copies included, float32 without TF32 "
                    "(as the evaluator runs)"}
