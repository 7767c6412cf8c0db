"""Small building blocks shared by the U-Net, the classifier and the diffusion code."""

import math

import torch as th
import torch.nn as nn
import torch.nn.functional as F


class SiLU(nn.SiLU):
    """x * sigmoid(x) (upstream hand-wrote it for old PyTorch; this is torch's own kernel)."""

    def forward(self, x):
        return F.silu(x)


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


def scale_module(module, scale):
    """Multiply a module's parameters by ``scale`` in place and return the module."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def update_ema(target_params, source_params, rate=0.99):
    """Move each target parameter towards its source: target = rate * target + (1 - rate) * source."""
    with th.no_grad():
        for target, source in zip(target_params, source_params):
            target.mul_(rate).add_(source, alpha=1 - rate)


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


def checkpoint(func, inputs, params, flag):
    """Evaluate ``func(*inputs)``, recomputing its activations in the backward pass when ``flag`` is set.
    ``params``: the parameters ``func`` uses without taking them as arguments (they receive gradients)."""
    if not flag:
        return func(*inputs)
    inputs, params = tuple(inputs), tuple(params)
    return CheckpointFunction.apply(func, len(inputs), *inputs, *params)


class CheckpointFunction(th.autograd.Function):
    """Upstream's gradient checkpoint (:func:`checkpoint`'s ``apply(func, len(inputs), *inputs, *params)``): forward
    without saving activations, recompute them for backward."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with th.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [
            x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, th.Tensor) else x
            for x in ctx.input_tensors
        ]
        with th.enable_grad():
            # view_as: the function may modify its first input in place, which a detached leaf forbids.
            outputs = ctx.run_function(*[x.view_as(x) if isinstance(x, th.Tensor) else x for x in inputs])
        if isinstance(outputs, th.Tensor):
            outputs = (outputs,)
        wrt = [x for x in inputs + ctx.input_params if isinstance(x, th.Tensor) and x.requires_grad]
        grads = iter(th.autograd.grad(outputs, wrt, output_grads, allow_unused=True))
        result = [next(grads) if isinstance(x, th.Tensor) and x.requires_grad else None
                  for x in inputs + ctx.input_params]
        del ctx.input_tensors, ctx.input_params
        return (None, None, *result)
