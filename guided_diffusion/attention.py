"""Self-attention of the ADM U-Net, with a hook to replace the attention computation.

Every attention function here takes q, k, v shaped (N, heads, tokens, head_channels) and returns the
attention output in the same shape. The attention submodule of each block (``QKVAttentionLegacy`` /
``QKVAttention`` in ``unet.py``, upstream's two QKV orders) owns the memory layout and applies the
override to its batch rows (:func:`attend_rows`); an :class:`AttentionOverride` only says *how* to attend.
This is what PAG, its ablations and SAG build on (see ``pag/perturbations.py``).
"""

from dataclasses import dataclass
from typing import Callable, Tuple, Union

import torch as th
import torch.nn.functional as F

# (q, k, v) -> output, all (N, heads, tokens, head_channels).
AttentionFn = Callable[[th.Tensor, th.Tensor, th.Tensor], th.Tensor]


def sdpa_attention(q, k, v):
    """Standard softmax attention (scale 1/sqrt(head_channels)) through torch's fused kernels."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_logits(q, k):
    """Pre-softmax scores (N, heads, T, T) in float32.

    The scale is split over q and k, as upstream does, so fp16 inputs cannot overflow before the product.
    """
    scale = q.shape[-1] ** -0.25
    return th.matmul(q.float() * scale, (k.float() * scale).transpose(-1, -2))


def attention_map(q, k):
    """The softmaxed attention map (N, heads, T, T) in float32; rows sum to one."""
    return attention_logits(q, k).softmax(dim=-1)


def attend_with_map(weights, v):
    """Attention output for an explicit (N, heads, T, T) map."""
    return th.matmul(weights.to(v.dtype), v)


def identity_attention(q, k, v):
    """Identity attention map: each token attends only to itself, so the output is V (no Q K^T)."""
    return v


def skip_block(q, k, v):
    """Marker: the rows an override gives this function make their attention *block* return its input
    unchanged (the whole residual branch, normalisation, attention and projection, is dropped; the block
    honours it, see :meth:`AttentionOverride.block_skip_mask`). As an attention function it returns V, which
    the block then discards."""
    return v


@dataclass(frozen=True)
class AttentionOverride:
    """Replace one attention block's attention computation for some batch rows.

    attention_fn: how to attend on the selected rows (for example :func:`identity_attention`).
    rows: which batch rows use ``attention_fn``: ``"all"``, ``"second_half"`` (of the batch, as in
        PAG's batched ``[x; x]`` pass), a ``slice`` of rows (the middle third of PAG + ICG's batched
        ``[clean; perturbed; ICG]`` pass), or a bool tensor with one entry per batch row.
    base_fn: how the other rows attend (default: standard attention). SAG records the unperturbed
        rows' attention map through it.
    heads: the head indices that ``attention_fn`` applies to on the selected rows (empty: every head); the
        other heads of those rows attend with standard attention (SoftPAG's head selection, Ahn et al. 2025).
        :func:`skip_block` drops the whole block, so it takes no heads.
    """

    attention_fn: AttentionFn
    rows: Union[str, slice, th.Tensor] = "all"
    base_fn: AttentionFn = sdpa_attention
    heads: Tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.rows, str) and self.rows not in ("all", "second_half"):
            raise ValueError(f"rows must be 'all', 'second_half', a slice or a bool tensor, got {self.rows!r}")
        if isinstance(self.rows, slice) and self.rows.step not in (None, 1):  # attend_rows slices lo:hi
            raise ValueError(f"a slice of rows must be contiguous (step 1), got {self.rows}: use a bool tensor")
        object.__setattr__(self, "heads", tuple(self.heads))
        check_heads(self.heads, whole_block=self.attention_fn is skip_block)

    def perturbed(self, q, k, v):
        """``attention_fn`` on the rows given, restricted to ``heads`` (standard attention on the others)."""
        if not self.heads:
            return self.attention_fn(q, k, v)
        if max(self.heads) >= q.shape[1]:
            raise ValueError(f"attention heads {list(self.heads)} asked for, but the block has {q.shape[1]}")
        chosen = list(self.heads)
        others = [h for h in range(q.shape[1]) if h not in self.heads]
        out = th.empty_like(v)
        out[:, chosen] = self.attention_fn(q[:, chosen], k[:, chosen], v[:, chosen]).to(out.dtype)
        if others:
            out[:, others] = sdpa_attention(q[:, others], k[:, others], v[:, others]).to(out.dtype)
        return out

    def row_mask(self, batch_size, device):
        """The bool mask over batch rows that use ``attention_fn``."""
        if isinstance(self.rows, th.Tensor):
            if self.rows.shape != (batch_size,):
                raise ValueError(f"attention override row mask has shape {tuple(self.rows.shape)}, but the batch "
                                 f"has {batch_size} rows")
            return self.rows.to(device=device, dtype=th.bool)
        if isinstance(self.rows, slice):
            mask = th.zeros(batch_size, dtype=th.bool, device=device)
            mask[self.rows] = True
            return mask
        mask = th.ones(batch_size, dtype=th.bool, device=device)
        if self.rows == "second_half":
            mask[: _half_of(batch_size)] = False
        return mask

    def block_skip_mask(self, batch_size, device):
        """The rows whose attention block returns its input unchanged (``attention_fn`` is
        :func:`skip_block`), or None when no row skips."""
        return self.row_mask(batch_size, device) if self.attention_fn is skip_block else None


def check_heads(heads, whole_block=False):
    """Raise a ValueError unless ``heads`` are distinct head indices >= 0 that a perturbation acting inside the
    attention (not on the ``whole_block``, as skip) can be restricted to."""
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads):
        raise ValueError(f"attention heads must be integers >= 0, got {list(heads)}")
    if len(set(heads)) != len(heads):
        raise ValueError(f"attention heads must be distinct, got {list(heads)}")
    if heads and whole_block:
        raise ValueError(f"a perturbation of the whole attention block (skip) cannot be limited to heads "
                         f"{list(heads)}: leave the heads empty")


def _half_of(batch_size):
    if batch_size % 2:
        raise ValueError(f"rows='second_half' needs an even batch, got {batch_size} rows")
    return batch_size // 2


def attend_rows(q, k, v, override):
    """Attention over a batch where ``override`` selects the rows attended with its own function."""
    if override is None:
        return sdpa_attention(q, k, v)
    if isinstance(override.rows, str) and override.rows == "all":
        return override.perturbed(q, k, v)
    if isinstance(override.rows, (str, slice)):  # second_half or a slice: slices, no gather / scatter
        if isinstance(override.rows, slice):
            lo, hi, _ = override.rows.indices(q.shape[0])
        else:
            lo, hi = _half_of(q.shape[0]), q.shape[0]
        base = override.base_fn(q[:lo], k[:lo], v[:lo])
        parts = [base, override.perturbed(q[lo:hi], k[lo:hi], v[lo:hi]).to(base.dtype)]
        if hi < q.shape[0]:
            parts.append(override.base_fn(q[hi:], k[hi:], v[hi:]).to(base.dtype))
        return th.cat(parts)
    mask = override.row_mask(q.shape[0], q.device)
    if bool(mask.all()):
        return override.perturbed(q, k, v)
    keep = ~mask
    if bool(keep.all()):
        return override.base_fn(q, k, v)
    out = th.empty_like(v)
    out[keep] = override.base_fn(q[keep], k[keep], v[keep]).to(out.dtype)
    out[mask] = override.perturbed(q[mask], k[mask], v[mask]).to(out.dtype)
    return out
