"""The networks of a run, built once (stage 3 of ``sampling.run``): on the meta device from the run's flags, where
every check that needs no weights runs (the flags build a model, the guidance layers exist, the checkpoints
exist and fit), then materialised on the run's device and loaded from their checkpoints through
``guided_diffusion.checkpoint`` (local path or URL; rank 0 reads, the others receive).

The builder applies what changes a network's numbers or layout: the compute dtype and channels-last weights
(``GuidedModel`` only computes guidance). ``--compile`` compiles the guided model's own two pieces (the shared
prefix and the rest), each ``GuidedModel`` its own copies.
"""

import dataclasses
import inspect
import json
from typing import Any, Optional

import torch as th

import pag
from guided_diffusion.checkpoint import CheckpointError, check_state_dict, read_state_dict
from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion, create_model

from .checkpoint_files import check_checkpoint_path, is_url, local_path
from .settings import COMPUTE_DTYPES, SampleConfigError

# torch.compile keywords of ``--compile`` (tests choose a cheap backend here).
COMPILE_OPTIONS = {}


@dataclasses.dataclass
class Networks:
    """What a run samples with: the U-Net (and classifier), the diffusion process, and the U-Net guided by the
    run's guidance settings."""

    model: th.nn.Module
    classifier: Optional[th.nn.Module] = None
    diffusion: Any = None
    guided: Any = None  # pag.GuidedModel of model


def _call_with(fn, flags):
    names = inspect.signature(fn).parameters
    return fn(**{k: flags[k] for k in names if k in flags})


def build_model(settings):
    """The diffusion network of ``settings`` (random weights; build under ``th.device("meta")`` to check
    flags without memory)."""
    return _call_with(create_model, settings.flat())


def build_classifier(settings):
    return _call_with(create_classifier, settings.flat())


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


def guide(model, settings, diffusion):
    """``model`` guided by the run's guidance settings (compiled with ``--compile``)."""
    try:
        return pag.guide(model, settings.guidance, diffusion=diffusion, num_classes=settings.sampling.num_classes,
                         compile=dict(COMPILE_OPTIONS) if settings.runtime.compile else False)
    except ValueError as e:
        raise SampleConfigError(f"guidance settings: {e}") from None


def _check_fit(net, path, flag):
    """Names and shapes of a local checkpoint against ``net`` (on the meta device), reading only the checkpoint's
    index (memory-mapped); a checkpoint that cannot be mapped is checked when it is loaded."""
    if is_url(path):
        return
    try:
        state = read_state_dict(local_path(path), mmap=True)
    except (CheckpointError, OSError):  # an old (non-zip) format, unreadable, not a state dict: the load reports it
        return
    check_state_dict(net, state, source=f"--{flag} {path}")


def build_networks(settings):
    """The run's networks on the meta device (no memory, no weights), checked before anything in out_dir is read,
    written or deleted: the checkpoints exist (and, where they can be memory-mapped, fit the model flags), the
    model flags build a model, and the guidance settings resolve on it (layers exist, SAG has what it needs)."""
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
    diffusion = build_diffusion(settings)
    guided = guide(model, settings, diffusion)
    _check_fit(model, m.model_path, "model_path")
    if classifier is not None:
        _check_fit(classifier, m.classifier_path, "classifier_path")
    return Networks(model, classifier, diffusion, guided)


def set_compute_dtype(model, dtype):
    """Make the U-Net (or classifier) compute in ``dtype`` (a torch dtype or its name), in place; returns it.

    float16 is upstream's ``convert_to_fp16`` (the torso's convolutions in float16); bfloat16 and float32 convert
    the same convolutions to that type. Either way the activations are cast on entry to the torso
    (``model.dtype``), GroupNorm computes in float32, the timestep embedding and the output layer stay float32.
    Module conversion rather than ``torch.autocast``: the weights are cast once, not on every call, and float16
    is exactly upstream's numerics for the official ``use_fp16`` checkpoints."""
    dtype = getattr(th, dtype) if dtype in COMPUTE_DTYPES else dtype
    if dtype not in tuple(getattr(th, name) for name in COMPUTE_DTYPES):
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


def _materialise(net, path, flag, device):
    """``net`` (on the meta device) on ``device`` with the checkpoint's weights, in place, for inference."""
    try:
        state = read_state_dict(path)
    except (OSError, RuntimeError, ValueError) as e:  # CheckpointError included
        raise SampleConfigError(f"cannot load --{flag} {path}: {e}") from None
    check_state_dict(net, state, source=f"--{flag} {path}")
    net.to_empty(device=device)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def _cache_key(settings, fn, path, device, **extra):
    flags = settings.flat()
    names = inspect.signature(fn).parameters
    return json.dumps({"path": path, "device": str(device), "flags": {k: flags[k] for k in names if k in flags},
                       **extra}, sort_keys=True, default=str)


def load_networks(networks, settings, device, cache=None):
    """``networks`` (:func:`build_networks`) materialised on ``device`` and loaded, with the run's compute dtype
    and layout. ``cache`` ({key: network}) hands a network loaded for an earlier run of the same flags,
    checkpoint, device, dtype and layout (sweep cells) instead; the guided model is then made for it."""
    cache = {} if cache is None else cache
    m, r = settings.model, settings.runtime
    key = _cache_key(settings, create_model, m.model_path, device, dtype=settings.compute_dtype,
                     channels_last=r.channels_last)
    if key not in cache:
        model = set_compute_dtype(_materialise(networks.model, m.model_path, "model_path", device),
                                  settings.compute_dtype)  # use_fp16: float16, upstream's conversion
        cache[key] = model.to(memory_format=th.channels_last) if r.channels_last else model
    model = cache[key]
    guided = networks.guided if model is networks.model else guide(model, settings, networks.diffusion)
    classifier = None
    if m.classifier_path:
        key = _cache_key(settings, create_classifier, m.classifier_path, device)
        if key not in cache:
            cache[key] = _materialise(networks.classifier, m.classifier_path, "classifier_path", device)
            if m.classifier_use_fp16:
                cache[key].convert_to_fp16()
        classifier = cache[key]
    return Networks(model, classifier, networks.diffusion, guided)


def load_models(settings, device, cache=None):
    """The run's networks built, checked and loaded on ``device`` in one call (analysis, benchmarks, tests).
    Model flags that do not fit the checkpoint raise :class:`CheckpointError` naming the flag."""
    return load_networks(build_networks(settings), settings, device, cache)
