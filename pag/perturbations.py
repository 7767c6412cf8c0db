"""Perturbations of self-attention, as one registry: the paper's identity map and the ablation's alternatives.

Each kind is one :class:`Perturbation` entry: its attention function ``(q, k, v) -> output`` (see
``guided_diffusion/attention.py`` for the shapes), which an attention block applies to the batch rows it is
told to perturb, and the parameters it reads. Parameters are declared once in :data:`PARAMS` with their
default, flag help and check; ``GuidanceConfig``'s fields, the sampling flags and the table in docs/api.md are all
generated from this registry, so a new kind is one :func:`register`-ed builder (plus its parameters) and its
test.

Random kinds draw on the device from a counter-based hash of ``(perturbation_seed, row seed, timestep)``: every
denoising step draws afresh (as the authors' code, which draws at every forward pass), results repeat exactly,
and, as the sampler passes each sample's row seed (a function of the seed and the sample index), they do not
depend on batching.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch as th
import torch.nn.functional as F

from guided_diffusion.attention import (
    AttentionOverride,
    attend_with_map,
    check_heads,
    attention_logits,
    attention_map,
    identity_attention,
    sdpa_attention,
    skip_block,
)
from guided_diffusion.unet import attention_blocks


@dataclass(frozen=True)
class Param:
    """One perturbation parameter: a ``GuidanceConfig`` field and a sampling flag of the same name."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], bool] = lambda value: True
    requirement: str = ""  # what ``check`` demands, completing "<name> must ...", for the error message

    def validate(self, value):
        if isinstance(value, bool) or not isinstance(value, type(self.default)) and not (
                isinstance(self.default, float) and isinstance(value, int)):
            raise ValueError(f"{self.name} must be {type(self.default).__name__}, got {value!r}")
        if not self.check(value):
            raise ValueError(f"{self.name} must {self.requirement}, got {value!r}")


def _finite(v):
    return math.isfinite(v)


PARAMS: Dict[str, Param] = {p.name: p for p in (
    Param("drop_rate", 0.5, "probability that an attention entry is dropped (random_mask, drop)",
          lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]"),
    Param("noise_std", 1.0, "std of the Gaussian noise added to the attention map (noise)",
          lambda v: _finite(v) and v >= 0, "be >= 0"),
    Param("blur_kernel_size", 9, "Gaussian kernel size over the T x T attention map (blur)",
          lambda v: v >= 1 and v % 2 == 1, "be a positive odd integer"),
    Param("blur_sigma", 1.0, "Gaussian sigma over the T x T attention map (blur)",
          lambda v: _finite(v) and v > 0, "be > 0"),
    Param("perturbation_seed", 0, "seed of the random perturbations (random_mask, noise, drop, shuffle)",
          lambda v: v >= 0, "be >= 0"),
    Param("seg_sigma", 10.0, "Gaussian sigma (in tokens) of SEG's query blur over the spatial grid (seg); above "
          "9999 the blur is infinite (every query becomes the queries' spatial mean)",
          lambda v: v > 0, "be > 0"),
    Param("attention_temperature", 2.0, "temperature dividing the attention logits before the softmax "
          "(temperature; 1 = unperturbed, larger = flatter)",
          lambda v: _finite(v) and v > 0, "be a finite number > 0"),
    Param("soft_alpha", 0.5, "SoftPAG's weight of the identity map in (1 - alpha) * softmax + alpha * I (soft; "
          "1 = identity, 0 = unperturbed)",
          lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]"),
)}


@dataclass(frozen=True)
class Perturbation:
    """A registry entry: ``build(values, rng) -> attention function``; ``values`` holds its parameters.
    ``whole_block``: it acts on the whole block, not inside the attention, so it cannot be limited to heads."""

    name: str
    params: Tuple[str, ...]
    build: Callable
    random: bool = False
    whole_block: bool = False

    @property
    def definition(self):
        return (self.build.__doc__ or "").strip()


REGISTRY: Dict[str, Perturbation] = {}


def register(name, params=(), random=False, whole_block=False):
    """Decorator adding a builder to :data:`REGISTRY` under ``name``."""
    unknown = [p for p in params if p not in PARAMS]
    if unknown:
        raise ValueError(f"perturbation {name}: undeclared parameters {unknown}; add them to PARAMS")

    def add(build):
        REGISTRY[name] = Perturbation(name, tuple(params), build, random, whole_block)
        return build

    return add


class PerturbationParams(dict):
    """Parameter values by flag name (``drop_rate``, ``blur_sigma``, ...). Missing parameters take their
    defaults."""

    def __init__(self, **values):
        unknown = [key for key in values if key not in PARAMS]
        if unknown:
            raise ValueError(f"unknown perturbation parameter {unknown[0]!r}; known: {', '.join(sorted(PARAMS))}")
        super().__init__(values)

    def value(self, name):
        return self.get(name, PARAMS[name].default)


def perturbation_names():
    return tuple(REGISTRY)


def validate_perturbation(kind, params, heads=()):
    """Raise a ValueError naming the problem: an unknown kind, a bad value of one of its parameters or head
    indices it cannot be limited to (``heads``: empty = every head)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(REGISTRY)}")
    for name in REGISTRY[kind].params:
        PARAMS[name].validate(params.value(name))
    check_heads(tuple(heads), whole_block=REGISTRY[kind].whole_block)


def check_heads_fit(model, layers, heads):
    """Raise a ValueError naming the first of ``model``'s attention blocks ``layers`` that has no head of
    index ``max(heads)`` (the heads apply to every perturbed block)."""
    if not heads:
        return
    blocks = attention_blocks(model)
    for name in layers:
        if max(heads) >= blocks[name].num_heads:
            raise ValueError(f"pag_heads {list(heads)}: attention block {name} has {blocks[name].num_heads} "
                             f"heads (indices 0..{blocks[name].num_heads - 1})")


_MASK32 = 0xFFFFFFFF


def _mul32(x, constant):
    """``x * constant mod 2**32`` for int64 tensors holding 32-bit values, in 16-bit halves so that no
    intermediate leaves int64's range (signed overflow is undefined in the C++ and Triton kernels)."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x):
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32" constants), elementwise on int64
    tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class _RowRandom:
    """Counter-based random numbers on the device: element j of row i's draw number n is a hash of (seed,
    row_seeds[i], steps[i], n, j). Nothing is drawn on the host, no generator state is kept, and the same
    integers give the same draws on every device (integer arithmetic is exact), with or without compile.

    ``row_seeds`` (ints or an int tensor, one per perturbed row; rows 0, 1, ... when None) and ``steps`` (the
    rows' timesteps, a tensor or an int; 0 when None) make every denoising step draw afresh while a sample's
    draws depend only on the seed, its row seed and the step. The draw number advances with each call, so the
    blocks of one forward pass get different draws.
    """

    def __init__(self, seed, row_seeds=None, steps=None, stream=0):
        self.seed = int(seed)
        self.row_seeds = row_seeds
        self.steps = steps
        self.stream = int(stream)  # another stream (e.g. ICG's labels) never repeats the perturbations' draws
        self.draws = 0

    def _row_keys(self, rows, device):
        seeds = th.arange(rows, device=device) if self.row_seeds is None else \
            th.as_tensor(self.row_seeds, device=device).long().reshape(-1)
        if seeds.shape[0] != rows:
            raise ValueError(f"{seeds.shape[0]} row seeds for {rows} perturbed rows")
        steps = th.as_tensor(0 if self.steps is None else self.steps, device=device).long().reshape(-1)
        key = _hash32(th.full((rows,), (self.seed * 0x9E3779B9 + self.draws) & _MASK32, device=device,
                              dtype=th.long))
        if self.stream:
            key = _hash32(_hash32(key ^ (self.stream & _MASK32)) ^ 0x5BD1E995)
        self.draws += 1
        key = _hash32(key ^ (seeds & _MASK32))
        key = _hash32(key ^ (steps.expand(rows) & _MASK32))
        return _hash32(key ^ (seeds >> 32 & _MASK32))

    def _bits(self, shape, device):
        """Independent 24-bit integers of ``shape`` (rows first), one hash per element."""
        keys = self._row_keys(shape[0], device).reshape(-1, *([1] * (len(shape) - 1)))
        offset, mixer = keys, _hash32(keys ^ 0x632BE5AB)  # two keys per row: rows are not shifted copies
        index = th.arange(math.prod(shape[1:]), device=device, dtype=th.long).reshape(1, *shape[1:])
        return _hash32(_hash32((index + offset) & _MASK32) ^ mixer) >> 8

    def rand(self, shape, device):
        """Uniform draws in [0, 1) (multiples of 2**-24) of ``shape`` (rows, ...)."""
        return self._bits(shape, device).float() * 2.0**-24

    def randn(self, shape, device):
        """Standard normal draws (Box-Muller over two uniform draws)."""
        u1 = (self._bits(shape, device).float() + 1.0) * 2.0**-24  # (0, 1]: the log is finite
        u2 = self.rand(shape, device)
        return th.sqrt(-2.0 * th.log(u1)) * th.cos(2.0 * math.pi * u2)


# ------------------------------------------------------------------------------------------ the kinds


@register("identity")
def _identity(values, rng):
    """The paper's perturbation: the attention map is the identity (each token attends only to itself), so the
    block's attention output is V; Q K^T is never computed."""
    return identity_attention


@register("random_mask", params=("drop_rate", "perturbation_seed"), random=True)
def _random_mask(values, rng):
    """Each off-diagonal logit of Q K^T / sqrt(d) is set to -inf with probability ``drop_rate`` before the
    softmax; the diagonal is kept, so ``drop_rate = 1`` is the identity map."""
    rate = values.value("drop_rate")

    def attend(q, k, v):
        logits = attention_logits(q, k)
        drop = rng.rand(logits.shape, logits.device) < rate
        drop &= ~th.eye(logits.shape[-1], dtype=th.bool, device=logits.device)
        return attend_with_map(logits.masked_fill(drop, float("-inf")).softmax(dim=-1), v)

    return attend


@register("noise", params=("noise_std", "perturbation_seed"), random=True)
def _noise(values, rng):
    """Gaussian noise of std ``noise_std`` added to the softmaxed attention map."""
    std = values.value("noise_std")

    def attend(q, k, v):
        weights = attention_map(q, k)
        return attend_with_map(weights + std * rng.randn(weights.shape, weights.device), v)

    return attend


@register("blur", params=("blur_kernel_size", "blur_sigma"))
def _blur(values, rng):
    """Each head's softmaxed T x T attention map, seen as an image, Gaussian-blurred (torchvision's
    ``gaussian_blur``: reflect padding, ``blur_kernel_size``, ``blur_sigma``)."""
    from torchvision.transforms.v2.functional import gaussian_blur  # slow import: only when used

    size, sigma = values.value("blur_kernel_size"), values.value("blur_sigma")

    def attend(q, k, v):
        weights = attention_map(q, k)
        n, heads, tokens, _ = weights.shape
        blurred = gaussian_blur(weights.reshape(n * heads, 1, tokens, tokens), kernel_size=[size] * 2,
                                sigma=[float(sigma)] * 2)
        return attend_with_map(blurred.reshape(weights.shape), v)

    return attend


@register("drop", params=("drop_rate", "perturbation_seed"), random=True)
def _drop(values, rng):
    """Entries of the softmaxed attention map set to zero with probability ``drop_rate`` (no rescaling)."""
    rate = values.value("drop_rate")

    def attend(q, k, v):
        weights = attention_map(q, k)
        keep = rng.rand(weights.shape, weights.device) >= rate
        return attend_with_map(weights * keep, v)

    return attend


SEG_INFINITE_SIGMA = 9999.0  # the SEG authors' threshold (inf_blur_threshold): a larger sigma is an infinite blur


def seg_kernel_size(sigma, side):
    """SEG's Gaussian kernel size for ``sigma`` on a grid of ``side`` tokens: ceil(6 sigma) made odd (plus one
    when even), capped at ``side`` (odd side) or ``side + 1`` (even side), as the authors' implementation."""
    size = math.ceil(6 * sigma)
    size = size + 1 - size % 2
    return min(size, side + 1 - side % 2)


def seg_blur_grid(grid, sigma):
    """Gaussian blur of (N, C, H, W) over its spatial grid with SEG's kernel: taps at the integer offsets
    -r..r (r = size // 2) weighted exp(-x^2 / (2 sigma^2)) and normalised, the 2-D kernel their outer
    product, reflect padding of r on each side, every channel separately. Computed in float32."""
    size = seg_kernel_size(sigma, grid.shape[-1])
    if size == 1:
        return grid
    offsets = th.arange(size, dtype=th.float32, device=grid.device) - size // 2
    taps = th.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    channels = grid.shape[1]
    kernel = th.outer(taps, taps).expand(channels, 1, size, size)
    padded = F.pad(grid.float(), [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=channels).to(grid.dtype)


@register("seg", params=("seg_sigma",))
def _seg(values, rng):
    """Smoothed Energy Guidance (Hong 2024, arXiv:2408.00760): the queries, seen as a (heads x channels) image
    on the square token grid, are Gaussian-blurred over space with ``seg_sigma`` (the authors' query blur:
    kernel size ceil(6 sigma) made odd and capped at the grid side, taps at integer offsets, reflect padding),
    then standard softmax attention; blurring Q blurs the logit map along its query axes. ``seg_sigma`` above
    9999 (the authors' threshold) is the infinite blur: every query is replaced by the queries' spatial mean,
    so all tokens share one attention map, softmax(mean(q) k^T / sqrt(d)). Needs a square token grid."""
    sigma = values.value("seg_sigma")

    def attend(q, k, v):
        n, heads, tokens, ch = q.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"seg blurs the queries over a square token grid; {tokens} tokens are not one")
        if sigma > SEG_INFINITE_SIGMA:
            blurred = q.mean(dim=-2, keepdim=True).expand_as(q)
        else:
            grid = q.transpose(-1, -2).reshape(n, heads * ch, side, side)
            blurred = seg_blur_grid(grid, sigma).reshape(n, heads, ch, tokens).transpose(-1, -2)
        return sdpa_attention(blurred.contiguous(), k, v)

    return attend


@register("uniform")
def _uniform(values, rng):
    """Uniform attention: every token attends equally to all tokens, so each output token is the mean of V
    over the tokens; Q K^T is never computed (SEG's infinite blur of the attention *map* itself)."""

    def attend(q, k, v):
        return v.mean(dim=-2, keepdim=True).expand_as(v)

    return attend


@register("skip", whole_block=True)
def _skip(values, rng):
    """The attention block is skipped: it returns its input unchanged (no normalisation, attention or output
    projection is added); the block honours this per batch row (``AttentionOverride.block_skip_mask``). It acts on
    the whole block, so it cannot be limited to heads (``pag_heads``)."""
    return skip_block


@register("temperature", params=("attention_temperature",))
def _temperature(values, rng):
    """Softmax attention with the logits Q K^T / sqrt(d) divided by ``attention_temperature`` before the
    softmax: 1 is the model's own attention, larger values flatten the map towards uniform, smaller ones
    sharpen it towards each query's best key."""
    temperature = values.value("attention_temperature")

    def attend(q, k, v):
        return attend_with_map((attention_logits(q, k) / temperature).softmax(dim=-1), v)

    return attend


@register("soft", params=("soft_alpha",))
def _soft(values, rng):
    """SoftPAG (Ahn et al. 2025, arXiv:2506.10978): the attention map is (1 - ``soft_alpha``) *
    softmax(Q K^T / sqrt(d)) + ``soft_alpha`` * I, computed as (1 - alpha) * (softmax attention output) + alpha * V;
    alpha = 1 is PAG's identity (Q K^T is then never computed) and alpha = 0 the model's own attention."""
    alpha = values.value("soft_alpha")
    if alpha == 1:
        return identity_attention
    if alpha == 0:
        return sdpa_attention

    def attend(q, k, v):
        return ((1 - alpha) * sdpa_attention(q, k, v) + alpha * v).to(v.dtype)

    return attend


@register("shuffle", params=("perturbation_seed",), random=True)
def _shuffle(values, rng):
    """Token Perturbation Guidance (Rajabi et al. 2025, arXiv:2506.10036): the tokens entering the attention are
    permuted by a random permutation of the token positions (one per row, the same for every head; norm-
    preserving), i.e. q, k and v are permuted together after the block's normalisation and qkv projection.
    Attention commutes with a permutation of all its tokens, so the attention output is the unperturbed output
    with its tokens permuted (computed so), and the block returns x + proj_out(permuted attention): the
    residual keeps the unshuffled x. In an SD transformer block the shuffled hidden state also runs through the
    block's inner residual, cross-attention and feed-forward (all token-wise), so there the permuted branch
    carries those too, and the spatial transformer's outer residual stays unshuffled as here; ADM's block has
    only the attention branch. (Permuting keys and values alone would change nothing.) The permutation is the
    argsort of one uniform draw per token."""

    def attend(q, k, v):
        n, heads, tokens, ch = v.shape
        order = rng.rand((n, tokens), v.device).argsort(dim=-1, stable=True)
        out = sdpa_attention(q, k, v)
        return out.gather(-2, order.reshape(n, 1, tokens, 1).expand(n, heads, tokens, ch))

    return attend


# ------------------------------------------------------------------------------------------ using them


def make_attention_fn(kind="identity", params=None, row_seeds=None, steps=None, **values):
    """The attention function of perturbation ``kind`` (see :data:`REGISTRY` for each definition).

    params: a :class:`PerturbationParams` (or give the values as keywords, by flag name).
    row_seeds: one integer per perturbed row (e.g. sample indices; ints or an int tensor, best on the
        device) for the random kinds; rows are numbered 0, 1, ... when omitted.
    steps: the perturbed rows' timesteps (a tensor, e.g. the ``t`` the model is called with, or an int) for
        the random kinds, so each denoising step draws afresh; 0 when omitted. A returned function is for one
        forward pass: its draws advance with every block it perturbs.
    """
    params = PerturbationParams(**dict(params or {}), **values)
    validate_perturbation(kind, params)
    entry = REGISTRY[kind]
    rng = _RowRandom(params.value("perturbation_seed"), row_seeds, steps) if entry.random else None
    attend = entry.build(params, rng)
    if attend.__module__ == __name__:  # a builder's own function (not a shared one such as identity_attention)
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
def perturbed_attention(model, layers, kind="identity", row_seeds=None, steps=None, heads=(), **params):
    """Perturb the named attention blocks (names or glob patterns) for every batch row (on ``heads`` only, when
    given).

    >>> with perturbed_attention(model, ["input_blocks.14.1", "middle_block.*"], kind="blur", blur_sigma=2.0):
    ...     eps_perturbed = model(x, t)[:, :3]

    Parameters are given by flag name (``blur_sigma``, ``perturbation_seed``, ...).
    """
    from .layers import resolve_layers

    names = resolve_layers(model, layers)
    attention_fn = make_attention_fn(kind, PerturbationParams(**params), row_seeds=row_seeds, steps=steps)
    validate_perturbation(kind, PerturbationParams(**params), heads)
    check_heads_fit(model, names, heads)
    with attention_overrides(model, {name: AttentionOverride(attention_fn, heads=heads) for name in names}):
        yield model


RANDOM_DRAWS = ("Random: drawn on the device afresh at every denoising step, from (``perturbation_seed``, sample "
                "index, timestep) only (a counter-based hash; until 2026-12 one host generator per sample repeated "
                "the same draw at every step).")


def registry_markdown():
    """The table of perturbations in docs/api.md and their parameters, generated from the registry."""
    lines = ["| perturbation | definition | parameters |", "|---|---|---|"]
    for entry in REGISTRY.values():
        params = ", ".join(f"`{p}` ({PARAMS[p].default!r})" for p in entry.params) or "-"
        definition = " ".join(entry.definition.split()) + (f" {RANDOM_DRAWS}" if entry.random else "")
        lines.append(f"| `{entry.name}` | {definition} | {params} |")
    return "\n".join(lines)
