"""The ADM U-Net (Dhariwal & Nichol, 2021), parameter-compatible with the official checkpoints.

Module names and parameter shapes follow upstream guided-diffusion exactly, so its state dicts load
strictly. Every attention block computes its attention in one place, its ``attention`` submodule
(``QKVAttentionLegacy`` or ``QKVAttention``, as upstream; no parameters), which is also where an
attention override acts (``AttentionBlock.override``, per batch row): that is how PAG perturbs them (see
``attention.py``), and a hook on the submodule sees what the block really computes. The U-Net can
also run in pieces (``begin`` / ``run`` / ``finish`` over :class:`UNetState`), so that PAG computes the
part before its first perturbed block once and shares it between the clean and the perturbed pass.
"""

import math
from abc import abstractmethod
from dataclasses import dataclass, replace

import torch as th
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attend_rows
from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


def _maybe_checkpoint(fn, args, enabled):
    if enabled and th.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (optionally by scale and shift)."""

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return _maybe_checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the normalisation and the convolution, as upstream does.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection. ``use_new_attention_order`` picks upstream's QKV channel
    order (the ``attention`` submodule, :class:`QKVAttention` or :class:`QKVAttentionLegacy`; same parameters).
    ``override`` (an :class:`AttentionOverride`, set by PAG; None otherwise) replaces the attention computation
    for some batch rows; it lives on the ``attention`` submodule."""

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels do not split into heads of {num_head_channels} channels"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            self.attention = QKVAttention(self.num_heads)
        else:
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    @property
    def override(self):
        """The :class:`AttentionOverride` of this block's attention (None: standard attention)."""
        return self.attention.override

    @override.setter
    def override(self, value):
        self.attention.override = value

    @property
    def head_channels(self):
        return self.channels // self.num_heads

    def split_qkv(self, qkv):
        """(N, 3 * C, T) -> q, k, v each (N, heads, T, head_channels), in this block's QKV order."""
        return self.attention.split_qkv(qkv)

    def forward(self, x):
        return _maybe_checkpoint(self._forward, (x,), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.attention(self.qkv(self.norm(x)))
        h = self.proj_out(h)
        out = x + h
        skip = None if self.override is None else self.override.block_skip_mask(b, x.device)
        if skip is not None:  # rows told to skip the block (perturbation "skip") keep their input
            out = th.where(skip[:, None, None], x, out)
        return out.reshape(b, c, *spatial)


def count_flops_attn(model, _x, y):
    """Operation count of one attention call, for ``thop``'s ``custom_ops={QKVAttention: QKVAttention.count_flops}``:
    two matmuls of N * T^2 * C multiply-adds each for the output ``y`` (N, C, T) (or a sequence that starts with it).
    """
    out = y if isinstance(y, th.Tensor) else y[0]
    b, c, *spatial = out.shape
    tokens = math.prod(spatial)
    model.total_ops += th.DoubleTensor([2 * b * tokens**2 * c])


class _QKVAttentionBase(nn.Module):
    """Attention over a packed (N, 3 * heads * ch, T) qkv tensor (the subclasses fix the channel order): the one
    place a block's attention is computed, with SDPA or, on the rows ``override`` selects, the override's function."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.override = None

    def _unpack(self, qkv, ch):
        raise NotImplementedError

    def split_qkv(self, qkv):
        """(N, 3 * H * ch, T) -> q, k, v, each (N, H, T, ch), contiguous."""
        width = qkv.shape[1]
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv has {width} channels, not a multiple of 3 x {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        # (3, N, H, ch, T) -> channels last and contiguous: what torch's fused attention kernels (CPU
        # flash included) take; strided views would send SDPA to its slower reference path.
        q, k, v = (part.transpose(-1, -2).contiguous() for part in self._unpack(qkv, ch))
        return q, k, v

    def forward(self, qkv):
        """(N, 3 * H * ch, T) -> (N, H * ch, T), head-major channels as upstream."""
        bs, _, length = qkv.shape
        h = attend_rows(*self.split_qkv(qkv), self.override)
        return h.transpose(-1, -2).reshape(bs, -1, length)

    count_flops = staticmethod(count_flops_attn)


class QKVAttentionLegacy(_QKVAttentionBase):
    """QKV attention with heads split before q/k/v: qkv channels are (heads, 3, ch)."""

    def _unpack(self, qkv, ch):
        bs, _, length = qkv.shape
        return qkv.reshape(bs, self.n_heads, 3, ch, length).permute(2, 0, 1, 3, 4)


class QKVAttention(_QKVAttentionBase):
    """QKV attention with q/k/v split before heads: qkv channels are (3, heads, ch)."""

    def _unpack(self, qkv, ch):
        bs, _, length = qkv.shape
        return qkv.reshape(bs, 3, self.n_heads, ch, length).transpose(0, 1)


class AttentionPool2d(nn.Module):
    """Attention pooling of the noisy-image classifier's output (CLIP-style)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            th.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.head_channels = num_heads_channels
        self.spacial_dim = spacial_dim
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        h = self.attention(self.qkv_proj(x))
        return self.c_proj(h)[:, :, 0]


class _Torso(nn.Module):
    """What the U-Net and the classifier share: upstream's public attributes (the constructor's arguments), the
    timestep (and label) embedding, the input and middle blocks, and the float16 conversion of the torso."""

    _torso = ("input_blocks", "middle_block")

    def _build_torso(self, args):
        """Set the attributes from ``args`` (the constructor's locals) and build ``time_embed`` (``label_emb``),
        ``input_blocks`` and ``middle_block``. Returns the channel counts of the skip connections, the last channel
        count and the final downsampling factor."""
        for name, value in args.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)
        if self.num_heads_upsample == -1:
            self.num_heads_upsample = self.num_heads
        self.dtype = th.float16 if self.use_fp16 else th.float32
        dims, time_embed_dim = self.dims, self.model_channels * 4
        self.time_embed = nn.Sequential(
            linear(self.model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if getattr(self, "num_classes", None) is not None:
            self.label_emb = nn.Embedding(self.num_classes, time_embed_dim)

        ch = int(self.channel_mult[0] * self.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, self.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [self._resblock(ch, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads, ds))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                if self.resblock_updown:
                    down = self._resblock(ch, ch, down=True)
                else:
                    down = Downsample(ch, self.conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, ch), self._attention(ch, self.num_heads, ds), self._resblock(ch, ch)
        )
        return skip_channels, ch, ds

    def _attention(self, ch, heads, downsample_factor):
        block = AttentionBlock(ch, use_checkpoint=self.use_checkpoint, num_heads=heads,
                               num_head_channels=self.num_head_channels,
                               use_new_attention_order=self.use_new_attention_order)
        block.downsample_factor = downsample_factor  # for listing blocks by resolution
        return block

    def _resblock(self, ch, out_ch, **kwargs):
        return ResBlock(ch, self.model_channels * 4, self.dropout, out_channels=out_ch, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm, **kwargs)

    def _embed(self, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        return emb if y is None else emb + self.label_emb(y)

    def convert_to_fp16(self):
        """Convert the torso (input and middle blocks, and the U-Net's output blocks) to float16, as upstream does."""
        for name in self._torso:
            getattr(self, name).apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Convert the torso back to float32."""
        for name in self._torso:
            getattr(self, name).apply(convert_module_to_f32)


class UNetModel(_Torso):
    """The ADM U-Net. ``attention_resolutions``: downsampling factors (not resolutions) with attention, e.g.
    (2, 4, 8) for 32, 16 and 8 pixels of a 64x64 model; ``num_classes``: class-conditional with that many."""

    _torso = ("input_blocks", "middle_block", "output_blocks")

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        skip_channels, ch, ds = self._build_torso(locals())
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                layers = [self._resblock(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample, ds))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(self._resblock(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def forward(self, x, timesteps, y=None):
        """Predict eps (and the variance interpolation with learned sigma) for ``x`` at ``timesteps``."""
        return self.finish(self.run(self.begin(x, timesteps, y=y)))

    # Running the U-Net in pieces. A "stage" is one top-level block: input_blocks.i, middle_block or
    # output_blocks.i, in execution order.

    @property
    def stage_names(self):
        """Top-level block names in execution order."""
        return (
            [f"input_blocks.{i}" for i in range(len(self.input_blocks))]
            + ["middle_block"]
            + [f"output_blocks.{i}" for i in range(len(self.output_blocks))]
        )

    def stage_of(self, module_name):
        """Index in :attr:`stage_names` of the stage that contains ``module_name``."""
        for index, stage in enumerate(self.stage_names):
            if module_name == stage or module_name.startswith(stage + "."):
                return index
        raise ValueError(f"{module_name!r} is not inside any block of this U-Net")

    def begin(self, x, timesteps, y=None):
        """Check the inputs and embed the timesteps (and labels): the state before the first stage. Any image size
        whose sides are multiples of 2 ** (len(channel_mult) - 1) works; ``timesteps``: one per image or one."""
        timesteps = _check_images(x, timesteps, self.in_channels, self.image_size, dims=self.dims,
                                  multiple=2 ** (len(self.channel_mult) - 1))
        _check_labels(self.num_classes, x.shape[0], y)
        return UNetState(h=x.type(self.dtype), emb=self._embed(timesteps, y), skips=(), next_stage=0, out_dtype=x.dtype)

    def run(self, state, until=None, consume=False):
        """Run the stages from ``state.next_stage`` up to (not including) ``until`` (default: all). ``state`` is not
        modified (it can be continued again) unless ``consume=True`` takes its tensors (:meth:`UNetState.take`), so
        that each skip is freed once its decoder block has used it, as in an uninterrupted forward pass."""
        stop = len(self.stage_names) if until is None else until
        if not state.next_stage <= stop <= len(self.stage_names):
            raise ValueError(f"cannot run from stage {state.next_stage} to stage {stop}")
        h, skips = state.take() if consume else (state.h, list(state.skips))
        num_inputs = len(self.input_blocks)
        for index in range(state.next_stage, stop):
            if index < num_inputs:
                h = self.input_blocks[index](h, state.emb)
                skips.append(h)
            elif index == num_inputs:
                h = self.middle_block(h, state.emb)
            else:
                h = self.output_blocks[index - num_inputs - 1](th.cat([h, skips.pop()], dim=1), state.emb)
        return replace(state, h=h, skips=tuple(skips), next_stage=stop)

    def finish(self, state):
        """The output layer, after every stage has run."""
        if state.next_stage != len(self.stage_names):
            raise ValueError(f"the U-Net stopped at stage {state.next_stage}; run it to the end first")
        return self.out(state.h.type(state.out_dtype))


@dataclass
class UNetState:
    """The U-Net's activations between two stages: what ``UNetModel.run`` continues from."""

    h: th.Tensor
    emb: th.Tensor
    skips: tuple
    next_stage: int
    out_dtype: th.dtype

    def take(self):
        """``(h, list of skips)``, leaving this state empty (``h`` None, no skips): whoever takes them holds
        the only references, so each tensor is freed as soon as it is used."""
        h, skips = self.h, list(self.skips)
        self.h, self.skips = None, ()
        return h, skips

    def rows(self, index, consume=False):
        """The state of the batch rows ``index`` (a long tensor; a row may be taken twice), e.g. ``[a; a; b]`` from
        ``[a; b]``. With ``consume=True`` this state is emptied tensor by tensor as the rows are taken."""
        return self._map(lambda tensor: tensor[index], consume)

    def repeat(self, times, consume=False):
        """The same state for ``[x; x; ...]`` (``times`` copies along the batch); ``consume`` as in :meth:`rows`."""
        return self._map(lambda tensor: tensor.repeat(times, *([1] * (tensor.dim() - 1))), consume)

    def _map(self, fn, consume):
        emb = fn(self.emb)
        if not consume:
            return replace(self, h=fn(self.h), emb=emb, skips=tuple(fn(s) for s in self.skips))
        h, skips = self.take()
        h = fn(h)
        mapped = []
        skips.reverse()
        while skips:  # each original is dropped as soon as its rows / copy exist
            mapped.append(fn(skips.pop()))
        return replace(self, h=h, emb=emb, skips=tuple(mapped))


def _check_images(x, timesteps, channels, image_size, what="model", dims=2, multiple=1):
    """Raise a ValueError naming the expected shapes when ``x`` or ``timesteps`` cannot work (``multiple``: of what
    every side must be a multiple, for a U-Net's skips to meet again). Returns one timestep per image."""
    expected = ", ".join(["N", str(channels)] + [str(image_size)] * dims)
    sides = x.shape[2:] if dims != 3 else x.shape[3:]  # 3D: only the inner two dimensions are resampled
    if x.dim() != dims + 2 or x.shape[1] != channels or any(n % multiple for n in sides):
        other = f" (or any sides that are multiples of {multiple})" if multiple > 1 else ""
        raise ValueError(f"the {what} expects images of shape ({expected}){other}, got {tuple(x.shape)}")
    if timesteps.dim() != 1 or timesteps.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"expected one timestep per image ({x.shape[0]}) or one for the batch, got timesteps of shape "
            f"{tuple(timesteps.shape)}"
        )
    return timesteps.expand(x.shape[0])


def _check_labels(num_classes, batch_size, y):
    if num_classes is None:
        if y is not None:
            raise ValueError(
                "this model is unconditional (class_cond=False) but was given labels y; "
                "drop y, or build the model with class_cond=True"
            )
        return
    if y is None:
        raise ValueError(
            f"this model is class-conditional ({num_classes} classes) and needs labels: "
            "pass y=<LongTensor of shape (N,)>"
        )
    if y.dim() != 1 or y.shape[0] != batch_size:
        raise ValueError(f"expected {batch_size} labels of shape ({batch_size},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if not y.numel():
        return
    if y.device.type != "cpu":  # checked on the device: reading the labels back would wait for the GPU each step
        th._assert_async(((y >= 0) & (y < num_classes)).all(), f"labels must lie in [0, {num_classes - 1}]")
    elif int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}], got values from {int(y.min())} to {int(y.max())}"
        )


class SuperResModel(UNetModel):
    """A U-Net conditioned on a low-resolution image, which is upsampled and stacked onto the input."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        return self.finish(self.run(self.begin(x, timesteps, low_res=low_res, **kwargs)))

    def begin(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("the super-resolution model needs low_res=<low-resolution images>")
        channels = self.in_channels // 2
        _check_images(x, timesteps, channels, self.image_size, dims=self.dims,
                      multiple=2 ** (len(self.channel_mult) - 1))
        if low_res.dim() != x.dim() or low_res.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"low_res must hold one {channels}-channel image per input image, shaped "
                f"({x.shape[0]}, {channels}, h, w); got {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().begin(th.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_Torso):
    """The half U-Net with attention pooling used as the noisy-image classifier."""

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        super().__init__()
        skip_channels, ch, ds = self._build_torso(locals())
        self._feature_size = sum(skip_channels) + ch  # what the spatial pools concatenate
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("attention pooling needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels)
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )
        else:
            raise ValueError(f"unknown classifier pool {pool!r}: use adaptive, attention, spatial or spatial_v2")

    def forward(self, x, timesteps):
        """Logits (N, out_channels). Any image size works, except with attention pooling, whose
        positional embedding fixes the feature map's size (that of ``image_size`` images)."""
        timesteps = _check_images(x, timesteps, self.in_channels, self.image_size, what="classifier",
                                  dims=self.dims)
        emb = self._embed(timesteps)
        pooled = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                pooled.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            pooled.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(th.cat(pooled, dim=-1))
        if self.pool == "attention":
            side = self.out[-1].spacial_dim
            if tuple(h.shape[2:]) != (side, side):
                raise ValueError(
                    f"the classifier expects images of shape (N, {self.in_channels}, {self.image_size}, "
                    f"{self.image_size}): its attention pooling is built for {side}x{side} features, and "
                    f"images of {tuple(x.shape)} give {tuple(h.shape[2:])}"
                )
        return self.out(h.type(x.dtype))


def attention_blocks(model):
    """{name: AttentionBlock} of every self-attention block of ``model``, in ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


def attention_block_info(model):
    """Rows of (name, resolution, channels, heads) for every attention block of a U-Net or classifier."""
    return [
        (name, model.image_size // block.downsample_factor, block.channels, block.num_heads)
        for name, block in attention_blocks(model).items()
    ]

