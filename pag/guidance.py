"""The guided model: PAG (and SAG) as a drop-in replacement for the network in any sampling loop.

The guidance formula lives in :func:`guidance_step`, once. ``guide(model, config)`` returns a callable
with the network's signature and output shape, so ``p_sample_loop``, ``ddim_sample_loop`` and
``p_mean_variance`` use it unchanged:

    eps_guided = eps + s * (eps - eps_perturbed)

PAG runs as one forward pass over ``[x; x]`` whose second half is perturbed; the U-Net part before the
first perturbed block runs once on ``x`` and is shared (``AttentionOverride.fork``). With learned sigma,
the variance channels come from the unperturbed pass, as in the authors' implementation.
"""

import math

import torch as th
import torch.nn.functional as F

from guided_diffusion.attention import AttentionOverride, attend_with_map, attention_map, sdpa_attention

from .config import GuidanceConfig
from .layers import resolve_layers
from .perturbations import attention_overrides, make_attention_fn

SAG_BLUR_KERNEL = 31  # Hong et al.'s ADM setting


def guidance_step(eps, *terms):
    """The guidance formula: ``eps + sum_i s_i * (eps - eps_i)`` over ``terms`` of ``(eps_i, s_i)``.

    PAG's term is (eps of the perturbed pass, s); SAG's is (eps on the degraded input, its scale).
    Scales are per batch row.
    """
    guided = eps
    for eps_away, scale in terms:
        scale = scale.to(eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
        guided = guided + scale * (eps - eps_away)
    return guided


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
    """

    def __init__(self, model, config, diffusion=None):
        if not isinstance(config, GuidanceConfig):
            config = GuidanceConfig.from_dict(config)
        self.model = model
        self.config = config
        self.num_timesteps = getattr(diffusion, "original_num_steps", None) or getattr(
            diffusion, "num_timesteps", 1000
        )
        config.validate(self.num_timesteps)
        self.layers = resolve_layers(model, config.pag_layers) if config.uses_pag else []
        self.sag_layer = None
        self._alphas_cumprod = None
        if config.sag_scale:
            if diffusion is None:
                raise ValueError(
                    "SAG needs the noise schedule: call guide(model, config, diffusion=diffusion)"
                )
            if getattr(diffusion, "rescale_timesteps", False):
                raise ValueError("guidance expects rescale_timesteps=False (as every official checkpoint)")
            (self.sag_layer,) = resolve_layers(model, [config.sag_layer])
            self._alphas_cumprod = _alphas_cumprod_by_original_timestep(diffusion)

    def __call__(self, x, t, row_seeds=None, **model_kwargs):
        pag_scale = self.config.pag_scale_at(t, self.num_timesteps) if self.layers else None
        sag_scale = self.config.sag_scale_at(t) if self.sag_layer else None
        use_pag = pag_scale is not None and bool((pag_scale != 0).any())
        use_sag = sag_scale is not None and bool((sag_scale != 0).any())
        if not (use_pag or use_sag):
            return self.model(x, t, **model_kwargs)

        recorder = _MapRecorder() if use_sag else None
        with attention_overrides(self.model, self._overrides(use_pag, recorder, row_seeds)):
            out = self.model(x, t, **model_kwargs)
        channels = x.shape[1]
        base = out[: x.shape[0]]
        eps, rest = base[:, :channels], base[:, channels:]
        terms = []
        if use_pag:
            terms.append((out[x.shape[0]:, :channels], pag_scale))
        if use_sag:
            x_degraded = self._sag_input(x, t, eps, recorder.map)
            terms.append((self.model(x_degraded, t, **model_kwargs)[:, :channels], sag_scale))
        guided = guidance_step(eps, *terms)
        return th.cat([guided, rest], dim=1)

    def _overrides(self, use_pag, recorder, row_seeds):
        overrides = {}
        if use_pag:
            perturb = make_attention_fn(
                self.config.perturbation, self.config.perturbation_params, row_seeds=row_seeds
            )
            for i, name in enumerate(self.layers):
                overrides[name] = AttentionOverride(perturb, rows="second_half", fork=i == 0)
        if recorder is not None:
            if self.sag_layer in overrides:
                # The unperturbed half records its map; the copy stays perturbed.
                overrides[self.sag_layer] = AttentionOverride(
                    overrides[self.sag_layer].attention_fn, rows="second_half",
                    fork=overrides[self.sag_layer].fork, base_fn=recorder,
                )
            elif use_pag and self._runs_after_fork(self.sag_layer):
                overrides[self.sag_layer] = AttentionOverride(
                    sdpa_attention, rows="second_half", base_fn=recorder
                )
            else:
                overrides[self.sag_layer] = AttentionOverride(recorder)
        return overrides

    def _runs_after_fork(self, name):
        order = [n for n, _ in self.model.named_modules()]
        return order.index(name) > order.index(self.layers[0])

    def _sag_input(self, x, t, eps, head_mean_map):
        """Blur the predicted x0 where the attention map is strong, then re-noise it with eps."""
        batch, _, height, width = x.shape
        side = math.isqrt(head_mean_map.shape[-1])
        # A key token attended more than average (the query-summed map exceeds 1) is masked.
        mask = (head_mean_map.sum(dim=1) > 1.0).reshape(batch, 1, side, side).to(x.dtype)
        mask = F.interpolate(mask, (height, width), mode="nearest")
        abar = self._alphas_cumprod.to(x.device)[t.long()].to(x.dtype).reshape(-1, 1, 1, 1)
        if th.isnan(abar).any():
            raise ValueError(f"timesteps {t.tolist()} are not steps of this diffusion's schedule")
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        from torchvision.transforms.v2.functional import gaussian_blur  # slow import: only for SAG

        blurred = gaussian_blur(x0, kernel_size=[SAG_BLUR_KERNEL] * 2, sigma=[self.config.sag_blur_sigma] * 2)
        degraded = blurred * mask + x0 * (1 - mask)
        return abar.sqrt() * degraded + (1 - abar).sqrt() * eps


def _alphas_cumprod_by_original_timestep(diffusion):
    """alpha-bar indexed by original timestep (NaN for steps a respaced schedule skips)."""
    timestep_map = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    table = th.full((max(timestep_map) + 1,), float("nan"), dtype=th.float64)
    table[th.tensor(timestep_map)] = th.from_numpy(diffusion.alphas_cumprod)
    return table.float()


def guide(model, config, diffusion=None):
    """Return ``model`` guided by ``config`` (a :class:`GuidanceConfig` or a mapping of its fields).

    ``diffusion`` is needed only by SAG (the noise schedule). With every scale 0 the result calls the
    model once per step and returns its output unchanged.
    """
    return GuidedModel(model, config, diffusion)
