"""The networks of a run: the diffusion model (and classifier) built from the run's flags and loaded from their
checkpoints through ``guided_diffusion.checkpoint`` (local path or URL; rank 0 reads, the others receive), and
the diffusion process."""

import dataclasses
import inspect
import json
import os

import torch as th

import pag
from guided_diffusion.checkpoint import check_state_dict, read_state_dict
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion, create_model

from .model_configs import DEFAULT_MODEL_DIR, model_configs
from .settings import SampleConfigError


@dataclasses.dataclass
class Models:
    model: th.nn.Module
    classifier: th.nn.Module = None


def _call_with(fn, flags):
    names = inspect.signature(fn).parameters
    return fn(**{k: flags[k] for k in names if k in flags})


def build_model(settings):
    """The diffusion network of ``settings`` (random weights; build under ``th.device("meta")`` to check
    flags without memory)."""
    return _call_with(create_model, settings.flat())


def build_classifier(settings):
    return _call_with(create_classifier, settings.flat())


def _load_network(net, path, flag, device, use_fp16):
    try:
        state = read_state_dict(path)
    except (OSError, RuntimeError, ValueError) as e:  # CheckpointError included
        raise SampleConfigError(f"cannot load --{flag} {path}: {e}") from None
    check_state_dict(net, state, source=f"--{flag} {path}")
    net.load_state_dict(state, strict=True)
    net.to(device)
    if use_fp16:
        net.convert_to_fp16()
    net.eval()
    net.requires_grad_(False)
    return net


def _cache_key(settings, fn, path, device, **extra):
    flags = settings.flat()
    names = inspect.signature(fn).parameters
    return json.dumps({"path": path, "device": str(device), "flags": {k: flags[k] for k in names if k in flags},
                       **extra}, sort_keys=True, default=str)


COMPUTE_DTYPES = {"float16": th.float16, "bfloat16": th.bfloat16, "float32": th.float32}


def set_compute_dtype(model, dtype):
    """Make the U-Net (or classifier) compute in ``dtype`` (a torch dtype or its name), in place; returns it.

    float16 is upstream's ``convert_to_fp16`` (the torso's convolutions in float16); bfloat16 and float32 convert
    the same convolutions to that type. Either way the activations are cast on entry to the torso
    (``model.dtype``), GroupNorm computes in float32, the timestep embedding and the output layer stay float32.
    Module conversion rather than ``torch.autocast``: the weights are cast once, not on every call, and float16
    is exactly upstream's numerics for the official ``use_fp16`` checkpoints."""
    dtype = COMPUTE_DTYPES.get(dtype, dtype)
    if dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if dtype == th.float16:
        model.convert_to_fp16()
    else:  # the torso: input, middle and (U-Net) output blocks
        for part in (getattr(model, name, None) for name in ("input_blocks", "middle_block", "output_blocks")):
            for module in part.modules() if part is not None else ():
                if isinstance(module, (th.nn.Conv1d, th.nn.Conv2d, th.nn.Conv3d)):
                    module.to(dtype)
    model.dtype = dtype
    return model


def load_models(settings, device, cache=None):
    """The diffusion model (and classifier) of ``settings`` on ``device``; ``cache`` reuses loaded ones.

    Model flags that do not fit the checkpoint raise :class:`CheckpointError` naming the flag.
    """
    cache = {} if cache is None else cache
    m = settings.model
    # channels_last changes the weights' layout in place (pag.guide): such a model is not shared with other runs.
    key = _cache_key(settings, create_model, m.model_path, device, dtype=settings.compute_dtype,
                     channels_last=settings.runtime.channels_last)
    if key not in cache:
        net = _load_network(build_model(settings), m.model_path, "model_path", device, use_fp16=False)
        cache[key] = set_compute_dtype(net, settings.compute_dtype)  # use_fp16: float16, upstream's conversion
    models = Models(cache[key])
    if m.classifier_path:
        key = _cache_key(settings, create_classifier, m.classifier_path, device)
        if key not in cache:
            cache[key] = _load_network(build_classifier(settings), m.classifier_path, "classifier_path", device,
                                       m.classifier_use_fp16)
        models.classifier = cache[key]
    return models


def build_diffusion(settings):
    d = settings.diffusion
    return create_gaussian_diffusion(
        steps=d.diffusion_steps,
        learn_sigma=d.learn_sigma,
        noise_schedule=d.noise_schedule,
        use_kl=d.use_kl,
        predict_xstart=d.predict_xstart,
        rescale_timesteps=d.rescale_timesteps,
        rescale_learned_sigmas=d.rescale_learned_sigmas,
        timestep_respacing=d.timestep_respacing,
    )


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
    if "://" in path and not path.startswith("file://"):
        return
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(local):
        raise SampleConfigError(f"checkpoint not found: {path} (--{flag}). {_checkpoint_hint(local)}")
    if os.path.isdir(local):
        raise SampleConfigError(f"--{flag} {path} is a directory, not a checkpoint file")


def _is_url(path):
    return "://" in path and not path.startswith("file://")


def _local(path):
    return path[len("file://"):] if path.startswith("file://") else path


def _check_fit(net, path, flag):
    """Names and shapes of a local checkpoint against ``net`` (on the meta device), reading only the checkpoint's
    index (memory-mapped); a checkpoint that cannot be mapped is checked when it is loaded."""
    if _is_url(path):
        return
    try:
        state = th.load(_local(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old (non-zip) format, or unreadable: the real load reports it
        return
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and all(isinstance(v, th.Tensor) for v in state.values()):
        check_state_dict(net, state, source=f"--{flag} {path}")


def check_run(settings):
    """Every check of a run that needs no weights, before anything is written or deleted: the checkpoints exist
    (and, where they can be memory-mapped, fit the model flags), the model flags build a model (on the meta
    device: no memory), and the guidance settings resolve on it (layers exist, SAG has what it needs)."""
    m = settings.model
    check_checkpoint_path(m.model_path, "model_path")
    if m.classifier_path:
        check_checkpoint_path(m.classifier_path, "classifier_path")
    try:
        with th.device("meta"):
            model = build_model(settings)
            classifier = build_classifier(settings) if m.classifier_path else None
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise SampleConfigError(f"model flags: {type(e).__name__}: {e}") from None
    try:
        pag.guide(model, settings.guidance, diffusion=build_diffusion(settings))
    except ValueError as e:
        raise SampleConfigError(f"guidance settings: {e}") from None
    _check_fit(model, m.model_path, "model_path")
    if classifier is not None:
        _check_fit(classifier, m.classifier_path, "classifier_path")


def checkpoint_identity(path):
    """What identifies a checkpoint's content: ``sha256:<hex>`` of a local file (remembered beside it, see
    ``adm_common.files.cached_file_sha256``), ``url:<url>`` of a URL (read on every rank 0 anew)."""
    from adm_common.files import cached_file_sha256

    if _is_url(path):
        return f"url:{path}"
    return f"sha256:{cached_file_sha256(_local(path))}"

