"""Planning a run in its ``out_dir``: where it stands (resume), whether it may continue there, and its record.

Output layout (``--out_dir``): samples ``[k * shard_size, (k + 1) * shard_size)`` form shard k, written to
``shards/shard_{k:06d}.npz`` atomically once complete; when all exist they are merged into
``samples_{N}x{H}x{W}x3.npz`` (upstream's format). ``config.yaml`` records the run's identity (the settings that
decide the samples, flat, by flag name), its first session's runtime and provenance.

Resume: the same settings in the same directory skip finished shards and end with the same npz. A different
configuration is refused with the differing settings named; ``--overwrite`` deletes that run's outputs and
starts afresh (the same configuration always resumes, so a requeued ``--overwrite`` job never loses work).
"""

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch as th
import yaml

from adm_common.files import atomic_write_text, is_tmp_file
from adm_common.npz import npz_header, samples_filename
from guided_diffusion import dist_util

from .models import check_checkpoint_path
from .settings import SampleConfigError, config_differences, plain, read_yaml_mapping
from .shards import SHARD_DIR, shard_filename, shard_index

PROGRESS_DIR, FAILED_DIR = ".progress", ".failed"
OUTPUT_FILES = ("config.yaml", "grid.png", "eval.json")
RECORD_NAME = "config.yaml"
CODE_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class RunPlan:
    """What a run in ``out_dir`` still has to do (decided by rank 0, the same on every rank)."""

    settings: object  # RunSettings
    identity: dict
    device: str
    num_shards: int
    remaining: list
    done_images: int
    complete: bool
    notes: list = dataclasses.field(default_factory=list)  # what preparing did (logged by execute)

    @property
    def out_dir(self):
        return self.settings.out_dir

    @property
    def final_path(self):
        size = self.settings.model.image_size
        return os.path.join(self.out_dir, samples_filename(self.settings.sampling.num_samples, size, size))

    @property
    def record_path(self):
        return os.path.join(self.out_dir, RECORD_NAME)

    def shard_path(self, k):
        return os.path.join(self.out_dir, SHARD_DIR, shard_filename(k))

    def shard_bounds(self, k):
        size, total = self.settings.sampling.shard_size, self.settings.sampling.num_samples
        return k * size, min((k + 1) * size, total)


def resolve_device(settings):
    name = settings.runtime.device
    if not name:
        return dist_util.dev()
    device = th.device(name)
    if device.type == "cuda":
        if not th.cuda.is_available():
            raise SampleConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            local = dist_util.dev()
            return local if local.type == "cuda" else th.device("cuda", 0)
    return device


def _shard_problem(path, plan, k):
    start, end = plan.shard_bounds(k)
    size = plan.settings.model.image_size
    try:
        shape, dtype = npz_header(path, "arr_0")
    except Exception as e:  # a damaged zip shows up as several exception types
        return f"unreadable ({type(e).__name__}: {e})"
    if dtype != np.uint8 or shape != (end - start, size, size, 3):
        return f"arr_0 is {dtype} {shape}, expected uint8 {(end - start, size, size, 3)}"
    return None


def _remove_outputs(out_dir):
    """Delete the samples and records of the run in ``out_dir`` (used by --overwrite only)."""
    removed = []
    for name in OUTPUT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(name)
    for name in os.listdir(out_dir):
        if name.startswith("samples_") and name.endswith(".npz"):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    for name in (SHARD_DIR, PROGRESS_DIR, FAILED_DIR):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name + "/")
    return removed


def _existing_samples(out_dir):
    names = [n for n in os.listdir(out_dir) if n.startswith("samples_") and n.endswith(".npz")]
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(shard_dir):
        names += [f"{SHARD_DIR}/{n}" for n in os.listdir(shard_dir) if shard_index(n) is not None]
    return sorted(names)


def read_run_record(out_dir):
    """The ``config.yaml`` of the run in ``out_dir`` as a mapping ({} when there is none)."""
    path = os.path.join(out_dir, RECORD_NAME)
    return read_yaml_mapping(path, what="run record") if os.path.exists(path) else {}


def _prepare_rank0(settings, device_type):
    m = settings.model
    for key, path in (("model_path", m.model_path), ("classifier_path", m.classifier_path)):
        if path:
            check_checkpoint_path(path, key)
    out_dir = settings.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SampleConfigError(f"out_dir {out_dir} is not a writable directory: "
                                f"{e.strerror or e}") from None
    ident = settings.identity(device_type)
    notes = []
    overwrite = settings.runtime.overwrite
    if os.path.exists(os.path.join(out_dir, RECORD_NAME)):
        recorded = read_run_record(out_dir).get("settings") or {}
        diffs = config_differences(recorded, ident, device_type)
        if diffs:
            if not overwrite:
                raise SampleConfigError(
                    f"{out_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                    + "\nUse another --out_dir, or --overwrite to delete that run's samples and start afresh.")
            notes.append(f"--overwrite: removed {', '.join(_remove_outputs(out_dir))} of a run with other "
                         f"settings ({'; '.join(diffs)})")
    else:
        existing = _existing_samples(out_dir)
        if existing:
            if not overwrite:
                raise SampleConfigError(
                    f"{out_dir} holds samples ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}) "
                    "but no config.yaml, so it cannot be resumed safely; use another --out_dir, or "
                    "--overwrite to delete them")
            notes.append(f"--overwrite: removed {', '.join(_remove_outputs(out_dir))} (no config.yaml)")

    shard_dir = os.path.join(out_dir, SHARD_DIR)
    for directory in (out_dir, shard_dir):
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if is_tmp_file(name):  # left by a killed process: an unfinished shard
                os.remove(os.path.join(directory, name))
    for name in (PROGRESS_DIR, FAILED_DIR):  # the previous session's
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)

    s = settings.sampling
    num_shards = math.ceil(s.num_samples / s.shard_size)
    plan = RunPlan(settings, ident, device_type, num_shards, [], 0, False)
    if os.path.exists(plan.final_path):
        plan.complete, plan.done_images = True, s.num_samples
        return plan, notes
    for k in range(num_shards):
        path = plan.shard_path(k)
        if os.path.exists(path):
            problem = _shard_problem(path, plan, k)
            if problem:
                raise SampleConfigError(f"{path} is not a shard of this run: {problem}; delete it to have it "
                                        "sampled again")
            start, end = plan.shard_bounds(k)
            plan.done_images += end - start
        else:
            plan.remaining.append(k)
    return plan, notes


def prepare(settings, device=None):
    """Check the checkpoints' presence and ``out_dir``, and plan the work (collective).

    Rank 0 decides; every rank gets the plan, or raises the same :class:`SampleConfigError`.
    """
    dist_util.setup_dist()
    device = device or resolve_device(settings)
    result = None
    if dist_util.get_world_size() == 1:
        result = ("ok",) + _prepare_rank0(settings, device.type)
    elif dist_util.get_rank() == 0:
        try:
            result = ("ok",) + _prepare_rank0(settings, device.type)
        except SampleConfigError as e:
            result = ("error", str(e))
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            result = ("error", f"{type(e).__name__}: {e}")
    result = dist_util.broadcast_object(result)
    if result[0] == "error":
        raise SampleConfigError(result[1])
    plan = result[1]
    plan.notes = list(result[2])
    plan.settings = settings  # this rank's own copy (identical)
    return plan


# ------------------------------------------------------------------------------------------ the record


def git_commit():
    """HEAD of the code's repository (+"-dirty" with uncommitted changes), or "unknown"."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True,  # noqa: E731
                                           text=True, timeout=30, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance():
    try:
        version = importlib.metadata.version("pag-adm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "package": "pag-adm",
        "version": version,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": str(th.__version__),
        "numpy": str(np.__version__),
        "host": socket.gethostname(),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def write_run_record(plan, device):
    """``config.yaml``: identity (``settings``), the first session's ``runtime`` and ``provenance``."""
    if os.path.exists(plan.record_path):
        return
    r = plan.settings.runtime
    runtime = {"batch_size": r.batch_size, "keep_shards": r.keep_shards, "model": r.model, "device": str(device),
               "world_size": dist_util.get_world_size(), "launcher": dist_util.launcher()}
    if device.type == "cuda":
        runtime["gpu"] = th.cuda.get_device_name(device)
    doc = {"settings": plan.identity, "runtime": runtime, "provenance": provenance()}
    text = ("# Sampling run record (sampling/plan.py). `settings` identify the run: the same\n"
            "# out_dir is resumed only with the same settings. `runtime` is that of the first session.\n")
    atomic_write_text(plan.record_path, text + yaml.safe_dump(plain(doc), sort_keys=True))
