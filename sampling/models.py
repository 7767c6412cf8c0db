"""The networks of a run, built once: on the meta device from the run's flags, where every check that needs no
weights runs, then materialised on the run's device and loaded (``sampling.checkpoint_files``). The builder applies
the compute dtype and channels-last weights (``GuidedModel`` only computes guidance); ``--compile`` compiles the
guided model's two pieces (the shared prefix and the rest)."""

import dataclasses
import json
from typing import Any, Optional

import torch as th

import pag
from adm_common.flags import FlagParser
from guided_diffusion.script_util import (call_with, create_classifier, create_model, create_model_from_flags,
                                          diffusion_from, flags_of)

from .checkpoint_files import check_checkpoint, load_weights
from .model_configs import load_model_config
from .settings import COMPUTE_DTYPES, SampleConfigError, parse_overrides

# torch.compile keywords of ``--compile`` (tests choose a cheap backend here).
COMPILE_OPTIONS = {}


@dataclasses.dataclass
class Networks:
    """What a run samples with: the U-Net (and classifier), the diffusion process, and the U-Net guided by the
    run's guidance settings (None for a network loaded for another run: the sampler guides it)."""

    model: th.nn.Module
    classifier: Optional[th.nn.Module] = None
    diffusion: Any = None
    guided: Any = None  # pag.GuidedModel of model


def guide(model, settings, diffusion):
    """``model`` guided by the run's guidance settings (compiled with ``--compile``)."""
    try:
        return pag.guide(model, settings.guidance, diffusion=diffusion, num_classes=settings.sampling.num_classes,
                         compile=dict(COMPILE_OPTIONS) if settings.runtime.compile else False)
    except ValueError as e:
        raise SampleConfigError(f"guidance settings: {e}") from None


def build_networks(settings):
    """The run's networks on the meta device (no memory, no weights), checked before anything in out_dir is read,
    written or deleted: the model flags build a model, the guidance settings resolve on it (layers exist, SAG has
    what it needs), and the checkpoints exist (and, where they can be memory-mapped, fit the model flags)."""
    m, flags = settings.model, settings.flat()
    try:
        with th.device("meta"):
            model = call_with(create_model, flags)
            classifier = call_with(create_classifier, flags) if m.classifier_path else None
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise SampleConfigError(f"model flags: {type(e).__name__}: {e}") from None
    diffusion = diffusion_from(flags)
    guided = guide(model, settings, diffusion)
    for net, flag in ((model, "model_path"), (classifier, "classifier_path")):
        if net is not None:
            check_checkpoint(net, getattr(m, flag), flag)
    return Networks(model, classifier, diffusion, guided)


def set_compute_dtype(model, dtype, channels_last=False):
    """Make the U-Net (or classifier) compute in ``dtype`` (a torch dtype or its name), in place, with its weights
    channels-last if asked; returns it. float16 is upstream's ``convert_to_fp16`` (the torso's convolutions);
    bfloat16 and float32 convert the same convolutions. The activations are cast on entry to the torso, GroupNorm,
    the timestep embedding and the output layer stay float32. Module conversion rather than ``torch.autocast``:
    weights cast once, and float16 is exactly upstream's numerics for the official ``use_fp16`` checkpoints."""
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
    return model.to(memory_format=th.channels_last) if channels_last else model


def load_networks(networks, settings, device, cache=None):
    """``networks`` (:func:`build_networks`) materialised on ``device`` and loaded, with the run's compute dtype
    and layout (a classifier: float16 with classifier_use_fp16). ``cache`` ({key: network}) hands a network
    loaded for an earlier run of the same flags, checkpoint, device, dtype and layout (sweep cells) instead."""
    cache = {} if cache is None else cache
    m, flags = settings.model, settings.flat()
    wanted = [(networks.model, m.model_path, "model_path", create_model, settings.compute_dtype,
               settings.runtime.channels_last)]
    if m.classifier_path:
        wanted.append((networks.classifier, m.classifier_path, "classifier_path", create_classifier,
                       "float16" if m.classifier_use_fp16 else "float32", False))
    loaded = []
    for net, path, flag, builder, dtype, channels_last in wanted:
        key = json.dumps([path, str(device), flags_of(builder, flags), dtype, channels_last], default=str)
        if key not in cache:
            cache[key] = set_compute_dtype(load_weights(net, path, flag, device), dtype, channels_last)
        loaded.append(cache[key])
    model, classifier = (loaded + [None])[:2]
    return Networks(model, classifier, networks.diffusion, networks.guided if model is networks.model else None)


def load_models(settings, device, cache=None):
    """The run's networks built, checked and loaded on ``device`` in one call (analysis, benchmarks, tests)."""
    return load_networks(build_networks(settings), settings, device, cache)


def list_attention_blocks(argv=None):
    """Print every attention block of a model (name, resolution, channels, heads) for choosing PAG layers: the
    model of an official checkpoint name (256x256_diffusion_uncond) or a model config YAML, or of --set flags
    (--set image_size=32 --set channel_mult=1,2,2). Built on the meta device: no weights, memory or checkpoint."""
    parser = FlagParser(description=list_attention_blocks.__doc__)
    parser.add_argument("model", nargs="?", help="official checkpoint name or model config YAML")
    parser.add_argument("--kind", default="diffusion", help="with --set: diffusion, upsampler or classifier")
    parser.add_argument("--set", "--flag", dest="flags", action="append", default=[], metavar="KEY=VALUE",
                        help="model flag (repeatable, a YAML scalar as sweep.py's --set), applied over the config "
                        "or the upstream defaults")
    args = parser.parse_args(argv)
    if not (args.model or args.flags):
        parser.error("give a model name / config, or --set KEY=VALUE flags")
    try:
        config = load_model_config(args.model) if args.model else {"kind": args.kind, "flags": {}}
        with th.device("meta"):
            model = create_model_from_flags(config["kind"], dict(config["flags"], **parse_overrides(args.flags)))[0]
    except ValueError as e:  # ModelConfigError, SampleConfigError (--set), flags the model refuses
        parser.error(str(e))
    print(pag.format_attention_blocks(model))
    return 0
