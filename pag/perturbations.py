"""Perturbations of self-attention: the paper's identity map and the ablation's alternatives.

Each perturbation is an attention function ``(q, k, v) -> output`` (see ``guided_diffusion/attention.py``
for the shapes) that an attention block applies to the batch rows it is told to perturb. Random ones
draw from one generator per batch row, seeded from ``(seed, row seed)``, so results repeat exactly and,
when the sampler passes each sample's index as its row seed, do not depend on batching.
"""

import contextlib
from dataclasses import dataclass

import torch as th

from guided_diffusion.attention import (
    AttentionOverride,
    attend_with_map,
    attention_logits,
    attention_map,
    identity_attention,
)
from guided_diffusion.unet import attention_blocks

PERTURBATIONS = ("identity", "random_mask", "noise", "blur", "drop")


@dataclass(frozen=True)
class PerturbationParams:
    """Parameters of the perturbations; each kind reads only its own."""

    drop_rate: float = 0.5  # random_mask, drop
    noise_std: float = 1.0  # noise
    blur_kernel_size: int = 9  # blur
    blur_sigma: float = 1.0  # blur
    seed: int = 0  # random_mask, noise, drop

    def validate(self, kind):
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}")
        if kind in ("random_mask", "drop") and not 0.0 <= self.drop_rate <= 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1], got {self.drop_rate}")
        if kind == "noise" and self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if kind == "blur":
            if self.blur_sigma <= 0:
                raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
            if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
                raise ValueError(f"blur_kernel_size must be a positive odd integer, got {self.blur_kernel_size}")


class _RowRandom:
    """One generator per batch row; row i's draws depend only on (seed, row_seeds[i])."""

    def __init__(self, seed, row_seeds=None):
        self.seed = int(seed)
        self.row_seeds = None if row_seeds is None else [int(s) for s in row_seeds]
        self._generators = None

    def _generators_for(self, rows):
        if self._generators is None:
            seeds = self.row_seeds if self.row_seeds is not None else list(range(rows))
            if len(seeds) != rows:
                raise ValueError(f"{len(seeds)} row seeds for {rows} perturbed rows")
            self._generators = [
                th.Generator().manual_seed((self.seed * 1_000_003 + s) % (2**63)) for s in seeds
            ]
        return self._generators

    def rand(self, shape, device):
        """Uniform [0, 1) draws of shape (rows, *rest), row by row from each row's generator."""
        gens = self._generators_for(shape[0])
        return th.stack([th.rand(shape[1:], generator=g) for g in gens]).to(device)

    def randn(self, shape, device):
        gens = self._generators_for(shape[0])
        return th.stack([th.randn(shape[1:], generator=g) for g in gens]).to(device)


def make_attention_fn(kind="identity", params=PerturbationParams(), row_seeds=None):
    """The attention function of perturbation ``kind``.

    identity: the attention map is the identity, so the output is V; Q K^T is never computed.
    random_mask: each off-diagonal logit is set to -inf with probability ``drop_rate`` before the
        softmax; the diagonal is kept, so ``drop_rate=1`` is the identity map.
    noise: Gaussian noise of std ``noise_std`` added to the softmaxed map.
    blur: each head's softmaxed T x T map, seen as an image, Gaussian-blurred (torchvision's
        ``gaussian_blur``: reflect padding, ``blur_kernel_size``, ``blur_sigma``).
    drop: entries of the softmaxed map set to zero with probability ``drop_rate`` (no rescaling).

    row_seeds: one integer per perturbed row (e.g. sample indices) for the random kinds; rows are
        numbered 0, 1, ... when omitted. A returned function is for one forward pass: its generators
        advance with every block it perturbs.
    """
    params.validate(kind)
    if kind == "identity":
        return identity_attention
    rng = _RowRandom(params.seed, row_seeds)

    if kind == "random_mask":

        def attend(q, k, v):
            logits = attention_logits(q, k)
            drop = rng.rand(logits.shape, logits.device) < params.drop_rate
            drop &= ~th.eye(logits.shape[-1], dtype=th.bool, device=logits.device)
            return attend_with_map(logits.masked_fill(drop, float("-inf")).softmax(dim=-1), v)

    elif kind == "noise":

        def attend(q, k, v):
            weights = attention_map(q, k)
            return attend_with_map(weights + params.noise_std * rng.randn(weights.shape, weights.device), v)

    elif kind == "blur":

        from torchvision.transforms.v2.functional import gaussian_blur  # slow import: only when used

        def attend(q, k, v):
            weights = attention_map(q, k)
            n, heads, tokens, _ = weights.shape
            blurred = gaussian_blur(
                weights.reshape(n * heads, 1, tokens, tokens),
                kernel_size=[params.blur_kernel_size] * 2,
                sigma=[params.blur_sigma] * 2,
            )
            return attend_with_map(blurred.reshape(weights.shape), v)

    else:  # drop

        def attend(q, k, v):
            weights = attention_map(q, k)
            keep = rng.rand(weights.shape, weights.device) >= params.drop_rate
            return attend_with_map(weights * keep, v)

    attend.__name__ = f"{kind}_attention"
    return attend


@contextlib.contextmanager
def attention_overrides(model, overrides):
    """Set ``{block name: AttentionOverride}`` on ``model``'s attention blocks inside the ``with``.

    Whatever the blocks had before is restored on exit, also when the body raises.
    """
    blocks = attention_blocks(model)
    unknown = [name for name in overrides if name not in blocks]
    if unknown:
        raise ValueError(f"not attention blocks of this model: {', '.join(unknown)}")
    previous = {name: blocks[name].override for name in overrides}
    try:
        for name, override in overrides.items():
            blocks[name].override = override
        yield model
    finally:
        for name, override in previous.items():
            blocks[name].override = override


@contextlib.contextmanager
def perturbed_attention(model, layers, kind="identity", row_seeds=None, **params):
    """Perturb the named attention blocks (names or glob patterns) for every batch row.

    >>> with perturbed_attention(model, ["input_blocks.14.1", "middle_block.*"]):
    ...     eps_perturbed = model(x, t)[:, :3]
    """
    from .layers import resolve_layers

    names = resolve_layers(model, layers)
    attention_fn = make_attention_fn(kind, PerturbationParams(**params), row_seeds=row_seeds)
    with attention_overrides(model, {name: AttentionOverride(attention_fn) for name in names}):
        yield model
