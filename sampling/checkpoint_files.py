"""Checkpoint files as a run names them (``--model_path``, ``--classifier_path``: a local path, ``file://`` or a
URL): whether they exist, and what identifies their content in the run record."""

import os

from adm_common.files import cached_file_sha256

from .model_configs import DEFAULT_MODEL_DIR, model_configs
from .settings import SampleConfigError


def is_url(path):
    return "://" in path and not path.startswith("file://")


def local_path(path):
    return path[len("file://"):] if path.startswith("file://") else path


def _checkpoint_hint(path):
    base = os.path.basename(path)
    for name, entry in model_configs().items():
        if entry.get("file") == base:
            return (f"It is the official {name} checkpoint: download it with `make download-models "
                    f"MODELS={name}` (into {DEFAULT_MODEL_DIR}/), or point the flag at your copy.")
    return (f"Download the official checkpoints with `make download-models` (into {DEFAULT_MODEL_DIR}/, "
            "see configs/models/), or check the path.")


def check_checkpoint_path(path, flag):
    """A local checkpoint must exist and be a file (URLs are checked when read)."""
    if is_url(path):
        return
    local = local_path(path)
    if not os.path.exists(local):
        raise SampleConfigError(f"checkpoint not found: {path} (--{flag}). {_checkpoint_hint(local)}")
    if os.path.isdir(local):
        raise SampleConfigError(f"--{flag} {path} is a directory, not a checkpoint file")


def checkpoint_identity(path):
    """What identifies a checkpoint's content: ``sha256:<hex>`` of a local file (remembered beside it, see
    ``adm_common.files.cached_file_sha256``), ``url:<url>`` of a URL (read on every rank 0 anew)."""
    return f"url:{path}" if is_url(path) else f"sha256:{cached_file_sha256(local_path(path))}"
