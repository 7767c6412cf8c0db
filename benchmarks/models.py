"""The networks the GPU check measures and the settings its sections share: the paper's architectures at their real
widths (or tiny ones for the CPU test run) from the official model configs, with random weights unless the official
checkpoint is at hand; the guidance scale and sampler steps; the progress log."""

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.script_util import create_model_from_flags
from sampling.model_configs import load_model_config

ARCHS = ("256x256_diffusion_uncond", "256x256_diffusion")
CLASSIFIER = "256x256_classifier"
PAG_SCALE = 3.0  # the authors' ADM --guide_scale 4.0
DDIM_STEPS = 25
TIMESTEP = 500  # of the single model calls that are timed and counted
# The tiny widths: the same block names (the paper's PAG layers exist), 64x64 inputs, 32 base channels.
TINY_FLAGS = dict(image_size=64, num_channels=32, channel_mult="1,1,2,2,4,4", attention_resolutions="8,4,2")
TINY_CLASSIFIER_FLAGS = dict(image_size=64, classifier_width=64)


def log(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def diffusion_flags(name, tiny, num_channels=None):
    """The official flags of ``name`` (:data:`CLASSIFIER` too), at the tiny widths with ``tiny``."""
    flags = dict(load_model_config(name)["flags"])
    if tiny:
        flags.update(TINY_CLASSIFIER_FLAGS if name == CLASSIFIER else TINY_FLAGS)
    if num_channels:
        flags["num_channels"] = num_channels
    return flags


def step_inputs(flags, batch, device):
    """``(x, t, kwargs)`` of one model call at ``batch``: x standard normal (seed 0; on ``meta`` without values),
    t = :data:`TIMESTEP`, and labels 0 for a class-conditional model."""
    shape = (batch, 3, flags["image_size"], flags["image_size"])
    x = torch.empty(shape, device=device) if torch.device(device).type == "meta" else torch.randn(
        shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), TIMESTEP, dtype=torch.long, device=device)
    return x, t, {"y": torch.zeros(batch, dtype=torch.long, device=device)} if flags.get("class_cond") else {}


def build(kind, flags, device, seed, model_dir=None, name=None):
    """``(network, diffusion, weights)``: the official checkpoint ``name`` when ``model_dir`` holds it, else random
    weights in which every layer counts: PyTorch's default initialisation for every convolution and linear layer
    (ADM zero-initialises the output convolutions and attention projections). A U-Net computes in float32 (no
    ``use_fp16``); callers convert it with ``sampling.models.set_compute_dtype``."""
    with torch.device(device):
        net, diffusion = create_model_from_flags(kind, dict(flags, use_fp16=False) if kind == "diffusion" else flags)
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.reset_parameters()
    path = Path(model_dir) / load_model_config(name)["file"] if model_dir else None
    official = path is not None and path.is_file()
    if official:
        load_checkpoint(net, path)
    return net.eval().requires_grad_(False), diffusion, "official checkpoint" if official else "random"
