"""Small building blocks shared by the U-Net, the classifier and the diffusion code."""

import math

import torch as th
import torch.nn as nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 so fp16 activations do not lose precision in the statistics."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def normalization(channels):
    """The U-Net's normalisation layer: 32 groups, float32 statistics."""
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero a module's parameters (used for residual branches' last layers) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def mean_flat(tensor):
    """Mean over every dimension except the batch dimension."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal timestep embeddings [N] -> [N, dim], as in ADM (cos half first, then sin)."""
    half = dim // 2
    freqs = th.exp(
        -math.log(max_period) * th.arange(half, dtype=th.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
