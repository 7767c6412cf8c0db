"""Checkpoint files as a run names them (``--model_path``, ``--classifier_path``: a local path, ``file://`` or a
URL): whether they exist and fit the run's networks, loading them (through ``guided_diffusion.checkpoint``), and
what identifies their content in the run record."""

import os

from adm_common.files import HashMemo
from guided_diffusion.blobs import local_path
from guided_diffusion.checkpoint import CheckpointError, check_state_dict, read_state_dict

from .model_configs import DEFAULT_MODEL_DIR, model_configs
from .settings import SampleConfigError


def _checkpoint_hint(path):
    base = os.path.basename(path)
    for name, entry in model_configs().items():
        if entry.get("file") == base:
            return (f"It is the official {name} checkpoint: download it with `make download-models "
                    f"MODELS={name}` (into {DEFAULT_MODEL_DIR}/), or point the flag at your copy.")
    return (f"Download the official checkpoints with `make download-models` (into {DEFAULT_MODEL_DIR}/, "
            "see configs/models/), or check the path.")


def check_checkpoint(net, path, flag):
    """A local checkpoint exists, is a file and fits ``net`` (on the meta device): names and shapes, reading only
    its index (memory-mapped). URLs, and checkpoints that cannot be mapped, are checked when they are loaded."""
    local = local_path(path)
    if local is None:
        return
    if not os.path.exists(local):
        raise SampleConfigError(f"checkpoint not found: {path} (--{flag}). {_checkpoint_hint(local)}")
    if os.path.isdir(local):
        raise SampleConfigError(f"--{flag} {path} is a directory, not a checkpoint file")
    try:
        state = read_state_dict(local, mmap=True)
    except (CheckpointError, OSError):  # an old (non-zip) format, unreadable, not a state dict: the load reports it
        return
    check_state_dict(net, state, source=f"--{flag} {path}")


def load_weights(net, path, flag, device):
    """``net`` (on the meta device) on ``device`` with the checkpoint's weights, in place, for inference."""
    try:
        state = read_state_dict(path)
    except (OSError, RuntimeError, ValueError) as e:  # CheckpointError included
        raise SampleConfigError(f"cannot load --{flag} {path}: {e}") from None
    check_state_dict(net, state, source=f"--{flag} {path}")
    net.to_empty(device=device)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def checkpoint_identity(path):
    """A checkpoint's content: ``sha256:<hex>`` of a local file (remembered beside it), else ``url:<url>``."""
    local = local_path(path)
    return f"url:{path}" if local is None else f"sha256:{HashMemo().sha256(local)}"
