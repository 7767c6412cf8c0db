"""The networks of a run: the diffusion model (and classifier) built from the run's flags and loaded from their
checkpoints through ``guided_diffusion.checkpoint`` (local path or URL; rank 0 reads, the others receive), and
the diffusion process."""

import dataclasses
import inspect
import json
import os

import torch as th

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


def _cache_key(settings, fn, path, device):
    flags = settings.flat()
    names = inspect.signature(fn).parameters
    return json.dumps({"path": path, "device": str(device), "flags": {k: flags[k] for k in names if k in flags}},
                      sort_keys=True, default=str)


def load_models(settings, device, cache=None):
    """The diffusion model (and classifier) of ``settings`` on ``device``; ``cache`` reuses loaded ones.

    Model flags that do not fit the checkpoint raise :class:`CheckpointError` naming the flag.
    """
    cache = {} if cache is None else cache
    m = settings.model
    key = _cache_key(settings, create_model, m.model_path, device)
    if key not in cache:
        cache[key] = _load_network(build_model(settings), m.model_path, "model_path", device, m.use_fp16)
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
