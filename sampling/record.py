"""A run's record, ``config.yaml`` in its ``out_dir``: the identity (``settings``, with the checkpoints' content
hashes), its hash ``run_id`` (stored in every shard), the first session's ``runtime``, ``provenance`` and the later
``sessions``. Resume and the table read it back."""

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch as th
import yaml

from adm_common.files import atomic_write_text
from guided_diffusion import dist_util

from .layout import RECORD_NAME
from .settings import plain, read_yaml_mapping, sampler_label

CODE_ROOT = Path(__file__).resolve().parents[1]


def read_run_record(out_dir):
    """The ``config.yaml`` of the run in ``out_dir`` as a mapping ({} when there is none)."""
    path = os.path.join(out_dir, RECORD_NAME)
    return read_yaml_mapping(path, what="run record") if os.path.exists(path) else {}


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


def _session(plan, device):
    r, m, s = plan.settings.runtime, plan.settings.model, plan.settings.sampling
    values = {"batch_size": r.batch_size, "keep_shards": r.keep_shards, "model": r.model, "device": str(device),
              "world_size": dist_util.get_world_size(), "launcher": dist_util.launcher(),
              "num_samples": s.num_samples, "shard_size": s.shard_size, "claim_lease": r.claim_lease,
              "model_path": m.model_path, "classifier_path": m.classifier_path}
    if device.type == "cuda":
        values["gpu"] = th.cuda.get_device_name(device)
    return values


def write_run_record(plan, device):
    """``config.yaml``: the first session writes it whole, each later one appends to ``sessions``; a record from before
    run ids is brought up to date (its shards stay accepted). ``sampler_label`` and ``labels`` (``none``: no labels)
    are stored so that a table reads them and derives none."""
    session = _session(plan, device)
    record_path = plan.layout.record_path
    if os.path.exists(record_path):
        doc = read_run_record(plan.out_dir)
        if doc.get("run_id") != plan.run_id:
            doc["settings"], doc["run_id"], doc["legacy_shards"] = plan.identity, plan.run_id, True
        when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        doc.setdefault("sessions", []).append(dict(session, started=when, host=socket.gethostname(),
                                                   command=" ".join(sys.argv)))
    else:
        doc = {"settings": plan.identity, "run_id": plan.run_id, "runtime": session, "provenance": provenance()}
    doc["sampler_label"] = sampler_label(plan.settings)
    doc["labels"] = plan.settings.sampling.labels if plan.settings.with_labels else "none"
    text = ("# Sampling run record (sampling/record.py). `settings` identify the run (with the checkpoints' content\n"
            "# hashes): the same out_dir is resumed only with the same settings; `run_id` is their hash, stored in\n"
            "# every shard. `runtime` is that of the first session, `sessions` lists the later ones.\n")
    atomic_write_text(record_path, text + yaml.safe_dump(plain(doc), sort_keys=True))
