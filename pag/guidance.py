"""The guided model: PAG (and SAG) as a drop-in replacement for the network in any sampling loop.

The guidance formula lives in :func:`guidance_step`, once. ``guide(model, config)`` returns a callable
with the network's signature and output shape, so ``p_sample_loop``, ``ddim_sample_loop`` and
``p_mean_variance`` use it unchanged:

    eps_guided = eps + s * (eps - eps_perturbed)

The U-Net part before the first perturbed block runs once and is shared by the clean and the
perturbed prediction (see :class:`GuidedModel`). With learned sigma, the variance channels come from
the unperturbed pass, as in the authors' implementation.

Independent condition guidance (ICG) is one more term, ``(eps(x, y'), w)``; adaptive projected guidance (APG)
and guidance rescale act on the sum of the terms (:func:`guidance_step`'s ``project`` and ``rescale``).
"""

import dataclasses
import math
import types

import torch as th
import torch.nn.functional as F

from guided_diffusion.attention import AttentionOverride, attend_with_map, attention_map, sdpa_attention

from .config import GuidanceConfig
from .layers import resolve_layers
from .perturbations import attention_overrides, check_heads_fit, make_attention_fn

from .perturbations import _RowRandom

SAG_BLUR_KERNEL = 31  # Hong et al.'s ADM setting
# The stream of ICG's label draws: a stream of its own, so y' never repeats a perturbation's draw, whatever the
# perturbation_seed.
ICG_LABEL_STREAM = 0x1C6


def guidance_step(eps, *terms, project=None, rescale=0.0):
    """The guidance formula: ``eps + sum_i s_i * (eps - eps_i)`` over ``terms`` of ``(eps_i, s_i)``.

    PAG's term is (eps of the perturbed pass, s); SAG's is (eps on the degraded input, its scale); ICG's is
    (eps with an independent random label, w). Scales are per batch row, on any device (a host tensor is copied to
    ``eps``'s device).

    ``project`` (APG, :class:`AdaptiveProjection`) maps the summed term to the one applied; ``rescale`` is guidance
    rescale's phi (:func:`rescale_guidance`). With neither, the sum is plain (and bit for bit as without them).
    """
    def scaled(eps_away, scale):
        scale = scale.to(device=eps.device, dtype=eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
        return scale * (eps - eps_away)

    guided = eps
    if project is None or not terms:
        for eps_away, scale in terms:
            guided = guided + scaled(eps_away, scale)
    else:
        guided = eps + project(sum(scaled(eps_away, scale) for eps_away, scale in terms))
    if rescale:
        guided = rescale_guidance(guided, eps, rescale)
    return guided


def _per_sample(values, like):
    """One value per batch row, shaped to broadcast over ``like``'s other dimensions."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def rescale_guidance(guided, eps, phi):
    """Guidance rescale (Lin et al. 2023, arXiv 2305.08891): ``phi * guided * std(eps) / std(guided) + (1 - phi) *
    guided``, each std per sample, so phi = 1 gives the guided prediction the clean one's spread."""
    ratio = eps.flatten(1).std(dim=1) / guided.flatten(1).std(dim=1)
    return phi * (guided * _per_sample(ratio, guided)) + (1 - phi) * guided


class AdaptiveProjection:
    """Adaptive projected guidance (Sadat et al., ICLR 2025, arXiv 2410.02416) on the summed guidance term.

    In predicted-x0 space (``x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)``) the term is ``diff`` = guided x0 -
    clean x0. Momentum: ``running = diff + beta * running`` (the buffer is per sample, kept across the steps of one
    batch; :meth:`reset` starts a new batch), then ``diff = running``. Clamp: ``diff *= min(1, threshold /
    ||diff||)`` per sample. Projection onto the clean x0 ``c``: ``parallel = <diff, c> / <c, c> * c``, the update
    is ``(diff - parallel) + eta * parallel``, and the guided x0 = clean x0 + update, returned as an eps term.

    The guidance scales are already inside the term, so the clamp caps the scaled term (the authors' code clamps
    the difference before multiplying it by their scale - 1).
    """

    def __init__(self, momentum=0.0, norm_threshold=0.0, eta=1.0):
        self.momentum, self.norm_threshold, self.eta = momentum, norm_threshold, eta
        self.running = None
        self._last_abar = None

    def reset(self):
        self.running = None
        self._last_abar = None

    def __call__(self, term, eps, x, abar):
        """The eps term to apply for the summed eps ``term`` at clean ``eps``, input ``x``, alpha-bar ``abar``."""
        ratio = ((1 - abar) / abar).sqrt()  # x0 moves by -ratio times the change of eps
        diff = -ratio * term
        if self.momentum:
            # A trajectory's noise level only falls (alpha-bar rises): a call at a noisier step than the last one
            # starts a new trajectory, whose momentum starts afresh even without start_batch() (direct pag.guide
            # users); one read of the device per step, as APG's schedule check already makes.
            if self.running is not None and self.running.shape == diff.shape and bool(
                    (abar.flatten() < self._last_abar.flatten()).any()):
                self.running = None
            self._last_abar = abar
            if self.running is not None and self.running.shape != diff.shape:
                raise RuntimeError(f"APG's momentum buffer holds {tuple(self.running.shape)}, this call has "
                                   f"{tuple(diff.shape)}: call start_batch() on the guided model for a new batch")
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        if self.norm_threshold:
            diff = diff * _per_sample((self.norm_threshold / diff.flatten(1).norm(dim=1)).clamp(max=1), diff)
        clean_x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        along = (diff * clean_x0).flatten(1).sum(dim=1) / (clean_x0 * clean_x0).flatten(1).sum(dim=1)
        parallel = _per_sample(along, diff) * clean_x0
        update = (diff - parallel) + self.eta * parallel
        return -update / ratio


def independent_labels(row_seeds, steps, rows, num_classes, device):
    """ICG's y': a class in [0, num_classes) per row, a hash of (row seed, step) on the device (no host draws), so a
    sample's y' does not depend on the batch. Rows 0, 1, ... stand in for ``row_seeds`` when None."""
    bits = _RowRandom(0, row_seeds, steps, stream=ICG_LABEL_STREAM)._bits((rows,), device)  # uniform 24-bit integers
    return (bits * num_classes) >> 24


class _MapRecorder:
    """An attention function that attends normally and keeps the head-averaged map (for SAG)."""

    def __init__(self):
        self.map = None

    def __call__(self, q, k, v):
        weights = attention_map(q, k)
        self.map = weights.mean(dim=1)
        return attend_with_map(weights, v)


class GuidedModel:
    """``model`` with PAG / SAG applied; call it like the model: ``guided(x, t, **model_kwargs)``.

    ``t`` are the original (1000-step) timesteps, which is what ``SpacedDiffusion`` passes. An extra
    keyword ``row_seeds`` (one integer per row, e.g. sample indices) seeds random perturbations per row.

    A PAG step runs the U-Net up to the top-level block holding the first perturbed layer once, on
    ``x``, and continues from there for the clean and the perturbed prediction. ``batch_passes=True``
    (default) continues once on ``[x; x]`` with the second half perturbed; False continues twice on
    ``x``, which halves the activation memory after the prefix at some speed cost. Both give the same
    numbers up to float rounding.

    The wrapper never changes ``model`` (its dtype and memory layout are the builder's: ``sampling.models``, or
    :func:`guide`'s ``channels_last`` for a caller with a plain model). Execution option (the same numbers up to
    float rounding; off by default, which runs the code above):

    * ``compile=True`` (or a dict of ``torch.compile`` keywords, e.g. ``{"backend": "aot_eager"}``) compiles
      the two pieces every step runs: the shared prefix (``run(state, until=first perturbed stage)``) and
      the rest to the output (``finish(run(state))``: the batched or sequential continuation, unguided
      steps and SAG's second pass). ``begin`` (input checks, timestep embedding) stays eager. Each piece
      compiles once per kind of call (prefix; rest on ``[x; x]`` from the prefix; rest on ``x`` from stage
      0), not per step: dynamo guards the attention overrides by value, not by object identity. Each
      ``GuidedModel`` compiles its own copies of the two functions, so the graphs of one sweep cell never count
      against another cell's recompile limit (dynamo keeps at most 8 graphs per function).

    ICG (``icg_scale``) runs its own pass on ``x`` with the labels y' (:func:`independent_labels` of ``row_seeds``
    and ``t``): the label enters the timestep embedding, so it shares no prefix with the clean and PAG rows, and a
    separate call costs what a third batched block of rows would. ``num_classes`` (default: the model's) is the
    range y' is drawn from. APG's momentum is kept per batch: call :meth:`start_batch` before a batch's first step.

    Host reads: with a scale that is the same at every timestep (constant schedule, an interval covering every
    step) whether to guide is decided on the host, so a PAG step reads nothing back from the device; schedules
    and intervals read the per-row scale once per step, and SAG and APG check alpha-bar once per step.
    """

    def __init__(self, model, config, diffusion=None, batch_passes=True, compile=False, num_classes=None):
        if not isinstance(config, GuidanceConfig):
            config = GuidanceConfig.from_dict(config)
        self.model = model
        self.config = config
        self.batch_passes = batch_passes
        # Optional, off by default: called once per call as observer(x=, t=, eps=, guided=, pag=, sag=, icg=,
        # projected=, applied=) with the clean eps; guided, the plain sum eps + the terms; pag = (eps_perturbed,
        # per-row scale), sag = (eps on SAG's degraded input, per-row scale) and icg = (eps with the labels y',
        # per-row scale), each None when off at this call; projected, guided after APG (guided itself when APG is
        # off); applied, projected after guidance rescale: the eps returned (before classifier guidance). The
        # corrections projected - guided and applied - projected are then APG's and rescale's (analysis/trace.py).
        self.observer = None
        self.compiled = compile is not None and compile is not False  # True, or a dict ({} too)
        self.num_timesteps = getattr(diffusion, "original_num_steps", None) or getattr(
            diffusion, "num_timesteps", 1000
        )
        if self.num_timesteps != 1000:  # the config checked itself against 1000 steps when built
            config.validate(self.num_timesteps)
        self.layers = resolve_layers(model, config.pag_layers) if config.uses_pag else []
        check_heads_fit(model, self.layers, config.pag_heads)
        self._pag_constant = config.constant_pag_scale(self.num_timesteps)
        self._sag_constant = config.constant_sag_scale(self.num_timesteps)
        self._icg_constant = config.constant_icg_scale(self.num_timesteps)
        model_classes = getattr(model, "num_classes", None)
        self.num_classes = (num_classes or model_classes) if model_classes is not None else None
        if config.icg_scale and self.num_classes is None:
            raise ValueError("icg_scale needs a class-conditional model (class_cond=True): an unconditional model "
                             "has no label to replace")
        self.apg = AdaptiveProjection(config.apg_momentum, config.apg_norm_threshold, config.apg_eta) \
            if config.uses_apg else None
        self.shared_stages = min((model.stage_of(name) for name in self.layers), default=0)
        self.sag_layer = None
        self._alphas_cumprod = None
        needs_schedule = [name for name, on in (("SAG", config.sag_scale), ("APG", config.uses_apg)) if on]
        if needs_schedule:
            if diffusion is None:
                raise ValueError(
                    f"{' and '.join(needs_schedule)} needs the noise schedule: call guide(model, config, "
                    "diffusion=diffusion)"
                )
            if getattr(diffusion, "rescale_timesteps", False):
                raise ValueError("guidance expects rescale_timesteps=False (as every official checkpoint)")
            self._alphas_cumprod = _alphas_cumprod_by_original_timestep(diffusion)
        if config.sag_scale:
            (self.sag_layer,) = resolve_layers(model, [config.sag_layer])
        # With PAG on, SAG's map is recorded in the shared prefix or, after it, in the clean continuation.
        self.sag_in_prefix = bool(self.sag_layer) and model.stage_of(self.sag_layer) < self.shared_stages
        self._run_prefix, self._run_rest = self._prefix_plain, self._rest_plain
        if self.compiled:
            options = {} if compile is True else dict(compile)
            self._run_prefix = th.compile(_own_copy(self._prefix_plain), **options)
            self._run_rest = th.compile(_own_copy(self._rest_plain), **options)

    def _prefix_plain(self, state):
        return self.model.run(state, until=self.shared_stages, consume=True)

    def _rest_plain(self, state):
        """The rest of the U-Net from ``state``, which it consumes (each skip is freed once used)."""
        return self.model.finish(self.model.run(state, consume=True))

    def _forward(self, x, t, **model_kwargs):
        """The model's output (no guidance), through the compiled pieces when compiling."""
        if not self.compiled:
            return self.model(x, t, **model_kwargs)
        return self._run_rest(self.model.begin(x, t, **model_kwargs))

    def start_batch(self):
        """Forget the previous batch's APG momentum (the sampler calls this before each batch)."""
        if self.apg is not None:
            self.apg.reset()

    def __call__(self, x, t, row_seeds=None, **model_kwargs):
        pag_scale, use_pag = _scale_and_use(self._pag_constant, t, self.layers,
                                            lambda: self.config.pag_scale_at(t, self.num_timesteps))
        sag_scale, use_sag = _scale_and_use(self._sag_constant, t, self.sag_layer,
                                            lambda: self.config.sag_scale_at(t))
        icg_scale, use_icg = _scale_and_use(self._icg_constant, t, self.config.icg_scale != 0,
                                            lambda: self.config.icg_scale_at(t))
        if not (use_pag or use_sag or use_icg):
            out = self._forward(x, t, **model_kwargs)
            if self.observer is not None:
                eps = out[:, : x.shape[1]]
                self.observer(x=x, t=t, eps=eps, guided=eps, pag=None, sag=None, icg=None, projected=eps,
                              applied=eps)
            return out

        recorder = _MapRecorder() if use_sag else None
        other_labels = independent_labels(row_seeds, t, x.shape[0], self.num_classes, x.device) if use_icg else None
        out_icg = None
        if use_pag and use_icg and self.batch_passes and recorder is None:
            out, eps_perturbed, out_icg = self._clean_perturbed_and_icg(x, t, model_kwargs, row_seeds, other_labels)
        elif use_pag:
            out, eps_perturbed = self._clean_and_perturbed(x, t, model_kwargs, row_seeds, recorder)
        elif use_sag:
            with attention_overrides(self.model, {self.sag_layer: AttentionOverride(recorder)}):
                out = self._forward(x, t, **model_kwargs)
        else:
            out = self._forward(x, t, **model_kwargs)
        channels = x.shape[1]
        eps, rest = out[:, :channels], out[:, channels:]
        pag_term = (eps_perturbed[:, :channels], pag_scale) if use_pag else None
        sag_term = None
        if use_sag:
            x_degraded = self._sag_input(x, t, eps, recorder.map)
            sag_term = (self._forward(x_degraded, t, **model_kwargs)[:, :channels], sag_scale)
        icg_term = None
        if use_icg:
            if out_icg is None:
                out_icg = self._forward(x, t, **dict(model_kwargs, y=other_labels))
            icg_term = (out_icg[:, :channels], icg_scale)
        apg_applied = []  # the term APG returned, kept for the observer (APG's momentum allows one call per step)
        abar = self._abar(x, t) if self.apg is not None else None

        def apg_and_keep(term):
            apg_applied.append(self.apg(term, eps, x, abar))
            return apg_applied[-1]

        project = apg_and_keep if self.apg is not None else None
        terms = [term for term in (pag_term, sag_term, icg_term) if term is not None]
        guided = guidance_step(eps, *terms, project=project, rescale=self.config.guidance_rescale)
        if self.observer is not None:
            plain = guidance_step(eps, *terms) if project or self.config.guidance_rescale else guided
            projected = eps + apg_applied[-1] if apg_applied else plain  # guidance_step's own sum, recomputed
            self.observer(x=x, t=t, eps=eps, guided=plain, pag=pag_term, sag=sag_term, icg=icg_term,
                          projected=projected if self.config.guidance_rescale else guided, applied=guided)
        return th.cat([guided, rest], dim=1)

    def _clean_and_perturbed(self, x, t, model_kwargs, row_seeds, recorder):
        """The model's output and its output with the PAG layers perturbed, sharing the prefix."""
        model = self.model
        config = self.config
        perturb = make_attention_fn(config.perturbation, config.perturbation_params, row_seeds=row_seeds, steps=t)
        recording = {self.sag_layer: AttentionOverride(recorder)} if recorder is not None else {}
        record_in_prefix, record_later = (recording, {}) if self.sag_in_prefix else ({}, recording)
        with attention_overrides(model, record_in_prefix):
            prefix = self._run_prefix(model.begin(x, t, **model_kwargs))

        if self.batch_passes:
            overrides = {name: AttentionOverride(perturb, rows="second_half", heads=config.pag_heads)
                         for name in self.layers}
            if record_later:
                other = overrides.get(self.sag_layer, AttentionOverride(sdpa_attention))
                overrides[self.sag_layer] = dataclasses.replace(other, rows="second_half", base_fn=recorder)
            # The B-row prefix is emptied while its copy is made and the copy is consumed as it runs, so the
            # peak is that of an unguided call on 2B rows (each skip freed once its decoder block used it).
            prefix = prefix.repeat(2, consume=True)
            with attention_overrides(model, overrides):
                both = self._run_rest(prefix)
            return both[: x.shape[0]], both[x.shape[0]:]

        with attention_overrides(model, record_later):
            clean = self._run_rest(dataclasses.replace(prefix))  # a shallow copy: the prefix is needed again
        with attention_overrides(model, {name: AttentionOverride(perturb, heads=config.pag_heads)
                                         for name in self.layers}):
            perturbed = self._run_rest(prefix)
        return clean, perturbed

    def _clean_perturbed_and_icg(self, x, t, model_kwargs, row_seeds, other_labels):
        """PAG and ICG in one batched call of 3B rows ``[clean; PAG-perturbed; ICG]``. The label enters the timestep
        embedding, so the ICG rows share nothing with the clean ones: the prefix runs once on ``[x; x]`` with labels
        ``[y; y']``, then its clean rows are taken twice (the perturbed rows share the clean prefix, as in the
        two-row pass) and the rest runs once, perturbing the middle third."""
        model, config, batch = self.model, self.config, x.shape[0]
        perturb = make_attention_fn(config.perturbation, config.perturbation_params, row_seeds=row_seeds, steps=t)
        kwargs = dict(model_kwargs, y=th.cat([model_kwargs["y"], other_labels]))
        t = t.expand(batch)  # one timestep for the whole batch, or one per row
        prefix = self._run_prefix(model.begin(th.cat([x, x]), th.cat([t, t]), **kwargs))
        clean = th.arange(batch, device=x.device)
        prefix = prefix.rows(th.cat([clean, clean, clean + batch]), consume=True)
        overrides = {name: AttentionOverride(perturb, rows=slice(batch, 2 * batch), heads=config.pag_heads)
                     for name in self.layers}
        with attention_overrides(model, overrides):
            out = self._run_rest(prefix)
        return out[:batch], out[batch:2 * batch], out[2 * batch:]

    def _abar(self, x, t):
        """alpha-bar at original timesteps ``t``, one per row of ``x``, in ``x``'s dtype and on its device (SAG,
        APG); checking it reads the device once."""
        abar = self._alphas_cumprod.to(x.device)[t.long()].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        if th.isnan(abar).any():
            raise ValueError(f"timesteps {t.tolist()} are not steps of this diffusion's schedule")
        return abar

    def _sag_input(self, x, t, eps, head_mean_map):
        """Blur the predicted x0 where the attention map is strong, then re-noise it with eps."""
        batch, _, height, width = x.shape
        side = math.isqrt(head_mean_map.shape[-1])
        # A key token attended more than average (the query-summed map exceeds 1) is masked.
        mask = (head_mean_map.sum(dim=1) > 1.0).reshape(batch, 1, side, side).to(x.dtype)
        mask = F.interpolate(mask, (height, width), mode="nearest")
        abar = self._abar(x, t)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        from torchvision.transforms.v2.functional import gaussian_blur  # slow import: only for SAG

        blurred = gaussian_blur(x0, kernel_size=[SAG_BLUR_KERNEL] * 2, sigma=[self.config.sag_blur_sigma] * 2)
        degraded = blurred * mask + x0 * (1 - mask)
        return abar.sqrt() * degraded + (1 - abar).sqrt() * eps


def _scale_and_use(constant, t, enabled, scale_at):
    """``(per-row scale, whether any row is guided)`` at timesteps ``t``. A scale that is the same at every
    timestep (``constant``, a float) is decided on the host; otherwise ``scale_at()`` is read back once."""
    if not enabled:
        return None, False
    if constant is not None:
        return th.full(t.shape, float(constant), device=t.device), constant != 0
    scale = scale_at()
    return scale, bool((scale != 0).any())


def _own_copy(method):
    """``method`` bound to a function with a code object of its own. ``torch.compile`` keeps its graphs per code
    object (at most ``recompile_limit``, 8): without a copy every ``GuidedModel`` of a process, e.g. the cells of
    a sweep, would share one budget, and after the eighth the rest would silently run eager."""
    func = method.__func__
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__qualname__, copy.__doc__ = func.__qualname__, func.__doc__
    return types.MethodType(copy, method.__self__)


def _alphas_cumprod_by_original_timestep(diffusion):
    """alpha-bar indexed by original timestep (NaN for steps a respaced schedule skips)."""
    timestep_map = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    table = th.full((max(timestep_map) + 1,), float("nan"), dtype=th.float64)
    table[th.tensor(timestep_map)] = th.from_numpy(diffusion.alphas_cumprod)
    return table.float()


def guide(model, config, diffusion=None, batch_passes=True, compile=False, channels_last=False, num_classes=None):
    """Return ``model`` guided by ``config`` (a :class:`GuidanceConfig` or a mapping of its fields).

    ``diffusion`` is needed only by SAG and APG (the noise schedule); ``num_classes``: ICG's label range (default:
    the model's). With every scale 0 the result calls the model once per step and returns its output unchanged.
    ``batch_passes``, ``compile``: see :class:`GuidedModel`. ``channels_last=True`` first puts ``model``'s 4D
    weights in channels-last memory format (in place: the parameters change layout, not value), so convolutions
    run NHWC (what GPU tensor cores prefer); a caller that builds its model applies it there instead
    (``sampling.models``).
    """
    if channels_last:
        model.to(memory_format=th.channels_last)
    return GuidedModel(model, config, diffusion, batch_passes, compile=compile, num_classes=num_classes)
