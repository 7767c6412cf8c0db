"""Per-step quantities of guided sampling (docs/analysis.md): :func:`trace` samples the given indices through
``sampling.Sampler`` (the final images are the sampler's) and records at every step:

* the guidance terms, read through ``GuidedModel.observer`` (the formula stays in ``pag.guidance``): PAG's, SAG's,
  ICG's, classifier guidance's in eps units (``-sqrt(1 - abar_t) * cond_fn``, what DDIM adds to eps), and APG's and
  guidance rescale's corrections of the summed term; their RMS per sample (L2 norm / sqrt(C * H * W)), the cosine
  of the PAG and CG terms, and ``guidance_share`` = |mean_guided - mean_unguided| / (that + |mean_unguided - x_t|),
  the means being the sampler's own step on the recorded outputs with zero noise (``*_share``: one term's move);
* the attention entropy of chosen blocks (nats; 0 identity, log T uniform), by forward hooks on the clean pass;

and, at a few shown steps, for the strip samples: x_t, the clean, perturbed and guided x0, the PAG term, and the
head-averaged attention map of a few query tokens.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch as th

import pag
from guided_diffusion.attention import attention_map
from guided_diffusion.unet import attention_blocks
from pag.guidance import guidance_step
from sampling.images import to_uint8_nhwc
from sampling.sampler import Sampler, sample_draws

STATS = ("pag_scale", "eps_rms", "pag_rms", "sag_rms", "cg_rms", "cos_pag_cg", "guidance_share",
         "icg_rms", "apg_rms", "rescale_rms", "icg_share", "apg_share", "rescale_share")
IMAGES = ("x_t", "x0_clean", "x0_perturbed", "x0_guided", "pag_term")
# Query tokens whose attention maps are shown: relative (row, column) positions on each block's grid.
QUERY_POSITIONS = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75), (0.25, 0.75))


@dataclass
class TraceOptions:
    """What :func:`trace` records beyond the per-step statistics (those are recorded at every step)."""

    shown_steps: int = 8  # steps (evenly spaced, first and last included) with images and attention maps
    blocks: Optional[List[str]] = None  # attention blocks for entropy and maps (names or globs); None: all, []: none
    queries: int = 3  # query tokens per map (QUERY_POSITIONS, in order)
    strip_rows: Optional[List[int]] = None  # positions in ``indices`` with images; None: all


@dataclass
class Trace:
    """What :func:`trace` recorded. Steps are numbered 0 .. S-1 in sampling order (step 0 starts from x_T).

    stats: name -> (S, N) float64 (per step, per sample; ``cos_pag_cg`` NaN where a term is zero or CG is off).
    images: name -> (len(shown), len(strip_rows), C, H, W) float32 on the CPU; ``pag_term`` is (.., 1, H, W):
        the per-pixel L2 norm over channels of s * (eps - eps_perturbed).
    entropy: block -> (S, N) attention entropy in nats; tokens: block -> number of tokens T.
    maps: block -> (len(shown), len(strip_rows), queries, T): head-averaged attention of the query tokens
        ``query_tokens[block]`` of the clean pass.
    """

    kind: str
    config: pag.GuidanceConfig
    indices: List[int]
    labels: Optional[np.ndarray]
    timesteps: List[int]
    shown: List[int]
    strip_rows: List[int]
    stats: Dict[str, np.ndarray] = field(default_factory=dict)
    images: Dict[str, th.Tensor] = field(default_factory=dict)
    entropy: Dict[str, np.ndarray] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    grids: Dict[str, tuple] = field(default_factory=dict)
    query_tokens: Dict[str, List[int]] = field(default_factory=dict)
    maps: Dict[str, th.Tensor] = field(default_factory=dict)
    samples: Optional[np.ndarray] = None  # uint8 NHWC, the sampler's final images

    @property
    def strip_indices(self):
        return [self.indices[r] for r in self.strip_rows]

    @property
    def cg_on(self):
        return bool(np.any(self.stats["cg_rms"] > 0))

    def curve_rows(self):
        """One dict per step: step, timestep, each statistic averaged over the samples (cos_pag_cg over those
        where it is defined; None when CG is off) and n, the number of samples."""
        rows = []
        for s, t in enumerate(self.timesteps):
            row = {"step": s, "timestep": int(t), **{name: float(self.stats[name][s].mean()) for name in STATS}}
            cosine = self.stats["cos_pag_cg"][s]
            finite = cosine[np.isfinite(cosine)]
            row.update(cos_pag_cg=float(finite.mean()) if self.cg_on and finite.size else None, n=len(self.indices))
            rows.append(row)
        return rows

    def entropy_rows(self):
        """One dict per (step, block): the mean entropy, its maximum log T and their ratio."""
        rows = []
        for s, t in enumerate(self.timesteps):
            for block, values in self.entropy.items():
                mean = float(values[s].mean())
                top = math.log(self.tokens[block])
                rows.append({"step": s, "timestep": int(t), "block": block, "tokens": self.tokens[block],
                             "entropy": mean, "max_entropy": top, "normalized_entropy": mean / top if top else 0.0})
        return rows


def shown_step_numbers(num_steps, count):
    """``count`` step numbers of 0 .. num_steps-1, evenly spaced, first and last included (all if fewer)."""
    if count >= num_steps:
        return list(range(num_steps))
    if count <= 1:
        return [0]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def query_tokens(grid, count):
    """Token indices (row-major on ``grid`` = (h, w)) of the first ``count`` QUERY_POSITIONS."""
    h, w = grid
    return [min(int(r * h), h - 1) * w + min(int(c * w), w - 1) for r, c in QUERY_POSITIONS[:count]]


def _rms(x):
    return (x.float().flatten(1).pow(2).mean(dim=1)).sqrt()


def _share(part, total):
    """``part / total`` per sample; 0 where ``total`` is 0 (a step that moves nothing)."""
    return th.where(total > 0, part.to(total.device) / total.clamp(min=1e-30), total)


def _cosine(a, b):
    a, b = a.float().flatten(1), b.float().flatten(1)
    denom = a.norm(dim=1) * b.norm(dim=1)
    cos = (a * b).sum(dim=1) / denom
    return th.where(denom > 0, cos, th.full_like(cos, float("nan")))


def _replay(output):
    """A model function that returns a recorded output (the diffusion's step functions then run on it)."""
    return lambda *_args, **_kwargs: output


def _pred_x0(diffusion, output, x, index, clip):
    """The predicted x0 of a recorded model ``output`` at diffusion step ``index``."""
    t = th.full((x.shape[0],), index, device=x.device, dtype=th.long)
    return diffusion.p_mean_variance(_replay(output), x, t, clip_denoised=clip)["pred_xstart"]


class _AttentionProbe:
    """Forward hooks on the ``attention`` submodules of chosen blocks, recording the clean pass.

    While ``active``, the first call of each block (per guided call) is the clean pass on its first ``rows``
    batch rows: the shared prefix runs on x, the batched continuation on [x; x] with the perturbed rows second,
    the sequential continuation and SAG run the clean pass first.
    """

    def __init__(self, model, blocks, image_shape, queries):
        self.blocks = blocks
        self.active = False  # start() sets what the hooks use
        self.tokens, self.grids, self.query_tokens = {}, {}, {}
        self.image_shape = image_shape
        self.queries = queries
        modules = attention_blocks(model)
        self.handles = [modules[name].attention.register_forward_hook(self._hook(name)) for name in blocks]

    def start(self, rows, want_maps):
        self.active, self.rows, self.want_maps, self.seen = True, rows, want_maps, set()
        self.entropy, self.maps = {}, {}

    def stop(self):
        self.active = False

    def close(self):
        for handle in self.handles:
            handle.remove()

    def _hook(self, name):
        def hook(module, inputs, _output):
            if not self.active or name in self.seen:
                return
            self.seen.add(name)
            qkv = inputs[0][: self.rows]
            q, k, _ = module.split_qkv(qkv)
            weights = attention_map(q, k)  # (N, heads, T, T), float32
            tokens = weights.shape[-1]
            if name not in self.tokens:
                self.tokens[name] = tokens
                factor = math.sqrt(self.image_shape[0] * self.image_shape[1] / tokens)
                self.grids[name] = round(self.image_shape[0] / factor), round(self.image_shape[1] / factor)
                self.query_tokens[name] = query_tokens(self.grids[name], self.queries)
            self.entropy[name] = th.special.entr(weights).sum(dim=-1).mean(dim=(1, 2)).cpu().double().numpy()
            if self.want_maps:
                self.maps[name] = weights.mean(dim=1)[:, self.query_tokens[name]].cpu()

        return hook


def trace(settings, models, device, indices, config=None, options=None):
    """A :class:`Trace` of ``indices`` sampled with ``config`` (default ``settings.guidance``) as the sampler does
    (``settings``: a ``sampling.RunSettings``; ``models``: its ``sampling.load_models`` result)."""
    config = settings.guidance if config is None else config
    options = options or TraceOptions()
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("trace needs at least one sample index")
    strip_rows = list(range(len(indices))) if options.strip_rows is None else list(options.strip_rows)
    diffusion = models.diffusion
    steps = diffusion.num_timesteps
    timestep_map = list(getattr(diffusion, "timestep_map", range(steps)))
    shown = shown_step_numbers(steps, options.shown_steps)
    model = models.model
    if options.blocks is None:
        blocks = list(attention_blocks(model))
    else:
        blocks = pag.resolve_layers(model, options.blocks) if options.blocks else []
    size = settings.model.image_size
    probe = _AttentionProbe(model, blocks, (size, size), options.queries)
    result = Trace(kind=config.perturbation, config=config, indices=indices, labels=None,
                   timesteps=[timestep_map[steps - 1 - s] for s in range(steps)], shown=shown, strip_rows=strip_rows)
    batch = max(1, settings.runtime.batch_size)
    chunks = []
    try:
        with th.no_grad():  # classifier guidance enables gradients for its own
            for start in range(0, len(indices), batch):
                rows = list(range(start, min(start + batch, len(indices))))
                chunks.append(_trace_chunk(settings, models, device, diffusion, config, [indices[r] for r in rows],
                                           [r - start for r in rows if r in strip_rows], shown, probe))
    finally:
        probe.close()
    result.stats = {k: np.concatenate([c["stats"][k] for c in chunks], axis=1) for k in STATS}
    result.entropy = {k: np.concatenate([c["entropy"][k] for c in chunks], axis=1) for k in probe.blocks}
    with_images = [c for c in chunks if c["images"]]
    if with_images:
        result.images = {k: th.cat([c["images"][k] for c in with_images], dim=1) for k in IMAGES}
        result.maps = {k: th.cat([c["maps"][k] for c in with_images], dim=1) for k in probe.blocks}
    result.tokens, result.grids, result.query_tokens = probe.tokens, probe.grids, probe.query_tokens
    labels = [c["labels"] for c in chunks]
    result.labels = None if labels[0] is None else np.concatenate(labels)
    result.samples = np.concatenate([c["samples"] for c in chunks])
    return result


def _trace_chunk(settings, models, device, diffusion, config, indices, strip, shown, probe):
    """One batch of samples through the whole loop; returns per-step arrays for these samples."""
    model = models.model
    batch = len(indices)
    seen = {}
    shown_set = set(shown)
    next_step = {"step": 0}  # the step that model_fn's next call belongs to: maps are kept at shown steps only

    def recording(guided_fn):
        def model_fn(x, t, **kwargs):
            seen.clear()
            probe.start(x.shape[0], bool(strip) and next_step["step"] in shown_set)
            try:
                seen["output"] = guided_fn(x, t, **kwargs)
            finally:
                probe.stop()
            return seen["output"]

        return model_fn

    # The sampler's own guided model, labels, classifier guidance and draws; a fresh guided model (guided=None), as
    # the observer is set on it, and uncompiled, so the hooks record the clean pass.
    run = dataclasses.replace(settings, guidance=config, runtime=dataclasses.replace(settings.runtime, compile=False))
    sampler = Sampler(run, dataclasses.replace(models, guided=None), device, model_wrapper=recording)
    sampler.guided.observer = lambda **values: seen.update(values)
    draws = sampler.draws(indices)
    row_seeds = draws.model_kwargs["row_seeds"]
    net_kwargs = {"y": draws.model_kwargs["y"]} if settings.model.class_cond else {}

    cond_fn = sampler.cond_fn

    def recording_cond_fn(x, t, **kwargs):
        seen["gradient"] = cond_fn(x, t, **kwargs)
        return seen["gradient"]

    sampler.cond_fn = recording_cond_fn if cond_fn else None

    clip = settings.sampling.clip_denoised

    def step_mean(output, x, index, gradient):
        """The step's deterministic part: the diffusion's own step on ``output`` with zero noise."""
        t = th.full((x.shape[0],), index, device=x.device, dtype=th.long)
        cond = _replay(gradient) if gradient is not None else None
        step = diffusion.ddim_sample if settings.sampling.use_ddim else diffusion.p_sample
        return step(_replay(output), x, t, clip_denoised=clip, cond_fn=cond, randn_like=th.zeros_like)["sample"]

    def mean_move(before, after, rest, x, index):
        """RMS per sample of the move of the step's mean from eps ``before`` to eps ``after`` (with the variance
        channels ``rest``); 0 without running the step when they are the same tensor (the term is off)."""
        if before is after:
            return th.zeros(x.shape[0], device=x.device)
        outputs = [th.cat([e.to(rest.dtype), rest], dim=1) for e in (before, after)]
        return _rms(step_mean(outputs[1], x, index, None) - step_mean(outputs[0], x, index, None))

    channels = 3
    stats, images, entropy, maps = ({name: [] for name in names} for names in (STATS, IMAGES, probe.blocks,
                                                                                probe.blocks))
    for step, out in enumerate(sampler.steps(indices, draws)):
        index = diffusion.num_timesteps - 1 - step
        x, t, eps = seen["x"], seen["t"], seen["eps"].float()
        output = seen["output"]
        rest = output[:, channels:]
        zero = th.zeros_like(eps)
        pag_term, sag_term, icg_term = (guidance_step(eps, seen[key]) - eps if seen[key] is not None else zero
                                        for key in ("pag", "sag", "icg"))
        gradient = seen.get("gradient")
        abar = th.as_tensor(diffusion.alphas_cumprod[index], dtype=th.float32, device=eps.device)
        cg_term = zero if gradient is None else -(1 - abar).sqrt() * gradient.float()
        clean_output = th.cat([seen["eps"], rest], dim=1)
        plain, projected, applied = (seen[k].float() for k in ("guided", "projected", "applied"))
        apg_correction, rescale_correction = projected - plain, applied - projected
        mean_guided = step_mean(output, x, index, gradient)
        mean_unguided = step_mean(clean_output, x, index, None)

        with_icg = guidance_step(seen["eps"], seen["icg"]) if seen["icg"] is not None else seen["eps"]
        moves = {"icg_share": mean_move(seen["eps"], with_icg, rest, x, index),
                 "apg_share": mean_move(seen["guided"], seen["projected"], rest, x, index),
                 "rescale_share": mean_move(seen["projected"], seen["applied"], rest, x, index)}
        scale = seen["pag"][1].float() if seen["pag"] is not None else th.zeros(batch)
        guidance, unguided = _rms(mean_guided - mean_unguided), _rms(mean_unguided - x)
        total = guidance + unguided
        values = {"pag_scale": scale.reshape(-1).expand(batch), "cos_pag_cg": _cosine(pag_term, cg_term),
                  "guidance_share": _share(guidance, total), **{k: _share(move, total) for k, move in moves.items()}}
        sizes = {"eps": eps, "pag": pag_term, "sag": sag_term, "cg": cg_term, "icg": icg_term, "apg": apg_correction,
                 "rescale": rescale_correction}
        values.update({f"{name}_rms": _rms(term) for name, term in sizes.items()})
        for name, value in values.items():
            stats[name].append(value.cpu())
        for name in probe.blocks:
            entropy[name].append(probe.entropy[name])
        if step in shown_set and strip:
            if seen["pag"] is not None:
                eps_perturbed = seen["pag"][0]
            elif config.pag_layers:  # PAG off at this step (s = 0, outside the interval): perturb for display
                with pag.perturbed_attention(model, config.pag_layers, config.perturbation, row_seeds=row_seeds,
                                             steps=t, heads=config.pag_heads, **dict(config.perturbation_params)):
                    eps_perturbed = model(x, t, **net_kwargs)[:, :channels]
            else:
                eps_perturbed = seen["eps"]
            perturbed_output = th.cat([eps_perturbed.to(rest.dtype), rest], dim=1)
            picked = {
                "x_t": x, "x0_clean": _pred_x0(diffusion, clean_output, x, index, clip),
                "x0_perturbed": _pred_x0(diffusion, perturbed_output, x, index, clip), "x0_guided": out["pred_xstart"],
                "pag_term": pag_term.norm(dim=1, keepdim=True),
            }
            for name, value in picked.items():
                images[name].append(value[strip].float().cpu())
            for name in probe.blocks:
                maps[name].append(probe.maps[name][strip])
        next_step["step"] = step + 1
    return {"stats": {k: th.stack(v).double().numpy() for k, v in stats.items()},
            "images": {k: th.stack(v) for k, v in images.items() if v},
            "entropy": {k: np.stack(v) for k, v in entropy.items()},
            "maps": {k: th.stack(v) for k, v in maps.items() if v},
            "labels": draws.labels, "samples": to_uint8_nhwc(out["sample"])}  # the last step's


@th.no_grad()
def perturbed_x0(settings, models, device, reference, kinds):
    """The perturbed pass's predicted x0 of each of ``kinds`` (with the reference config's perturbation parameters)
    on the reference trace's x_t at its shown steps, for its strip samples: {kind: (len(shown), len(strip), C, H,
    W)}, with "clean" for the unperturbed prediction."""
    if "x_t" not in reference.images:
        raise ValueError("the reference trace has no images (no strip samples)")
    config = reference.config
    values = dict(config.perturbation_params)
    model = models.model
    diffusion = models.diffusion
    draws = sample_draws(settings, reference.strip_indices, device, with_labels=settings.model.class_cond)
    row_seeds = draws.model_kwargs["row_seeds"]
    net_kwargs = {"y": draws.model_kwargs["y"]} if settings.model.class_cond else {}
    out = {name: [] for name in ("clean", *kinds)}
    clip = settings.sampling.clip_denoised
    for j, step in enumerate(reference.shown):
        x = reference.images["x_t"][j].to(device)
        index = diffusion.num_timesteps - 1 - step
        t = th.full((x.shape[0],), reference.timesteps[step], device=device, dtype=th.long)
        out["clean"].append(_pred_x0(diffusion, model(x, t, **net_kwargs), x, index, clip).float().cpu())
        for kind in kinds:
            with pag.perturbed_attention(model, config.pag_layers, kind, row_seeds=row_seeds, steps=t, **values):
                perturbed = model(x, t, **net_kwargs)
            out[kind].append(_pred_x0(diffusion, perturbed, x, index, clip).float().cpu())
    return {k: th.stack(v) for k, v in out.items()}
