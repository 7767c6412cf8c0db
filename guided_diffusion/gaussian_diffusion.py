"""The Gaussian diffusion process of ADM (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021).

Public names, arguments and numerics follow upstream guided-diffusion so that its scripts and
checkpoints work unchanged: schedules are built in float64 numpy and each per-timestep
coefficient is gathered and cast to float32 only when it meets a tensor (`_extract_into_tensor`).

Our one addition: every sampling method that draws Gaussian noise accepts `randn_like=`, a
callable `randn_like(x) -> tensor shaped like x` used instead of `th.randn_like`. With it a caller
can make each sample's noise depend only on (seed, sample index), independent of batch layout.
"""

import collections
import enum
import math

import numpy as np
import torch as th

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

_LOG2 = math.log(2.0)  # nats -> bits


# ----------------------------------------------------------------------------------------------
# Noise schedules


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64 numpy, length T) of a named schedule: "linear" or "cosine".

    "linear" is Ho et al.'s 1e-4..0.02 over 1000 steps, scaled by 1000/T so that other step counts
    describe the same continuous process. "cosine" is Nichol & Dhariwal's alpha_bar schedule.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas, 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), each
    capped at max_beta: the cosine schedule's last step would otherwise be (almost) 1 and make the process singular."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t_start = i / num_diffusion_timesteps
        t_end = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t_end) / alpha_bar(t_start), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps


class ModelVarType(enum.Enum):
    """Where the reverse-step variance comes from.

    LEARNED: the extra channels are the log-variance itself. LEARNED_RANGE: the extra channels, in
    [-1, 1], interpolate (in log space) between the posterior variance and beta_t.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean target (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # same, with the VB term rescaled as for RESCALED_KL
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the variational bound times T, an estimate of the full bound

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------------
# The diffusion process


class GaussianDiffusion:
    """Training and sampling utilities for a discrete-time Gaussian diffusion over ``betas`` (step 0 first, least
    noise). ``rescale_timesteps``: the model sees float timesteps scaled to 0..1000 whatever T is."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        # Everything below stays float64: the products and ratios near t=0 and t=T lose digits in float32.
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha_bar_{t-1}, with alpha_bar_{-1}=1
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)  # alpha_bar_{t+1}, for reverse DDIM

        # q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0, so its log takes step 1's value there.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self._device_tables = {}  # (name, device) -> float64 tensor: each table is copied to a device once

    # Tables used by the formulas below beyond the attributes above (upstream computes them at each call).
    _DERIVED_TABLES = {
        "one_minus_alphas_cumprod": lambda d: 1.0 - d.alphas_cumprod,
        "log_betas": lambda d: np.log(d.betas),
        # beta_t, except at t=0 where the posterior variance gives a better decoder likelihood.
        "fixed_large_variance": lambda d: np.append(d.posterior_variance[1], d.betas[1:]),
        "fixed_large_log_variance": lambda d: np.log(np.append(d.posterior_variance[1], d.betas[1:])),
        "recip_posterior_mean_coef1": lambda d: 1.0 / d.posterior_mean_coef1,
        "posterior_mean_coef2_over_coef1": lambda d: d.posterior_mean_coef2 / d.posterior_mean_coef1,
    }

    def _coef(self, name, t, broadcast_shape):
        """``_extract_into_tensor`` of table ``name`` (an attribute or a derived table) at timesteps ``t``, from
        a float64 copy kept on ``t``'s device: no host-to-device copy per sampling step, the same float32 values."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            derive = self._DERIVED_TABLES.get(name)
            array = derive(self) if derive else getattr(self, name)
            table = self._device_tables[key] = th.from_numpy(np.asarray(array, dtype=np.float64)).to(t.device)
        return _gather(table, t, broadcast_shape)

    # -- forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """(mean, variance, log_variance) of q(x_t | x_0), each shaped like x_start."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0); `noise` fixes the standard normal used."""
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """(mean, variance, clipped log_variance) of the posterior q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        mean = (
            self._coef("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._coef("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._coef("posterior_variance", t, x_t.shape)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ------------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model once (``model(x, scaled_t, **model_kwargs)``) and turn its output into p(x_{t-1} | x_t):
        {'mean', 'variance', 'log_variance', 'pred_xstart'}, each shaped like x. ``denoised_fn`` is applied to
        the x_0 prediction before clipping it to [-1, 1] (``clip_denoised``)."""
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **(model_kwargs or {}))

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = _split_learned_variance(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # var_values = -1 gives the posterior variance (the lower bound), +1 gives beta_t (upper).
                min_log = self._coef("posterior_log_variance_clipped", t, x.shape)
                max_log = self._coef("log_betas", t, x.shape)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._coef("fixed_large_variance", t, x.shape)
            model_log_variance = self._coef("fixed_large_log_variance", t, x.shape)
        elif self.model_var_type == ModelVarType.FIXED_SMALL:
            model_variance = self._coef("posterior_variance", t, x.shape)
            model_log_variance = self._coef("posterior_log_variance_clipped", t, x.shape)
        else:
            raise NotImplementedError(self.model_var_type)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        elif self.model_mean_type in (ModelMeanType.START_X, ModelMeanType.EPSILON):
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            # The mean is the posterior mean given the (processed) x_0 guess.
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            raise NotImplementedError(self.model_mean_type)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), written with the precomputed reciprocals.
        if x_t.shape != eps.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} differ")
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1.
        if x_t.shape != xprev.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and xprev {tuple(xprev.shape)} differ")
        return (
            self._coef("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._coef("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        # The inverse of _predict_xstart_from_eps.
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._coef("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _scale_timesteps(self, t):
        """The timesteps the model (and cond_fn) sees."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # -- classifier guidance --------------------------------------------------------------------

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y|x_t) (Sohl-Dickstein et al. 2015).

        cond_fn(x, scaled_t, **model_kwargs) returns that gradient.
        """
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_variance's output with the score shifted by cond_fn (Song et al. 2020).

        eps' = eps - sqrt(1 - abar) * grad log p(y|x_t); x_0 and the mean are then recomputed.
        """
        alpha_bar = self._coef("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))

        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # -- ancestral (DDPM) sampling --------------------------------------------------------------

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        randn_like=None,
    ):
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (``randn_like`` replaces th.randn_like): {'sample', 'pred_xstart'}."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        # Noise is drawn even where t == 0 (then masked), so the random stream does not depend on t.
        noise = (randn_like or th.randn_like)(x)
        nonzero_mask = _nonzero_mask(t, x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, randn_like=None):
        """Sample with all T ancestral steps and return the final batch. ``noise``: x_T (default: drawn);
        ``device``: default the model's parameters'; ``progress``: a tqdm bar; ``randn_like(x)``: the normal noise
        of every step and, when ``noise`` is None, of x_T (called on an empty tensor of ``shape``)."""
        return _final_sample(self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, randn_like))

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False, randn_like=None):
        """Like p_sample_loop, but yield p_sample's dict after every step."""
        yield from self._steps(self.p_sample, model, shape, noise, device, progress, randn_like,
                               clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                               model_kwargs=model_kwargs)

    # -- DDIM sampling --------------------------------------------------------------------------

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        randn_like=None,
    ):
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12). Returns {'sample', 'pred_xstart'}."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # eps is re-derived from the (clipped, possibly guided) x_0 rather than taken from the model,
        # which also covers x_0- and x_{t-1}-predicting models; reference trajectories depend on this.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = self._coef("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, x.shape)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = (randn_like or th.randn_like)(x)  # drawn even for eta=0, as upstream, to keep the stream
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One deterministic DDIM step backwards, x_t -> x_{t+1} (encoding an image into noise)."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM step is only defined for the deterministic path (eta=0)")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._coef("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, randn_like=None):
        """Sample with DDIM over all of this process's steps; arguments as p_sample_loop, plus eta."""
        return _final_sample(self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta, randn_like))

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     randn_like=None):
        """Like ddim_sample_loop, but yield ddim_sample's dict after every step."""
        yield from self._steps(self.ddim_sample, model, shape, noise, device, progress, randn_like,
                               clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                               model_kwargs=model_kwargs, eta=eta)

    def _steps(self, step, model, shape, noise, device, progress, randn_like, **step_kwargs):
        """Run ``step(model, img, t, ...) -> dict`` (p_sample or ddim_sample) from the initial noise over every
        timestep, yielding its dicts."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _resolve_device(model, device, noise)
        # Precedence for x_T: explicit noise, then the caller's noise source, then the global torch RNG.
        if noise is not None:
            img = noise
        elif randn_like is not None:
            img = randn_like(th.empty(*shape, device=device))
        else:
            img = th.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # imported here so tqdm is only needed when asked for

            indices = tqdm(indices)
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = step(model, img, t, randn_like=randn_like, **step_kwargs)
                yield out
                img = out["sample"]

    # -- likelihood and training ----------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound in bits per dimension, {'output': [N], 'pred_xstart'}:
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0; the decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LOG2

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2

        output = th.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Losses for one timestep per batch element (``t``: [N] step indices; ``noise``: the eps of x_t): {'loss'}
        ([N]); the MSE losses also give 'mse' and, with a learned variance, 'vb' (the hybrid loss = mse + vb)."""
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, self._scale_timesteps(t), **(model_kwargs or {}))

            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                model_output, var_values = _split_learned_variance(model_output, x_t)
                # The VB term trains only the variance: the mean half is detached so the MSE alone
                # drives the mean (Nichol & Dhariwal's hybrid objective).
                frozen_out = th.cat([model_output.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Upstream's scaling: T/1000, so the VB term does not swamp the MSE.
                    terms["vb"] *= self.num_timesteps / 1000.0

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.EPSILON:
                target = noise
            else:
                raise NotImplementedError(self.model_mean_type)
            if model_output.shape != target.shape:
                raise ValueError(f"model output {tuple(model_output.shape)} != target {tuple(target.shape)}")
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per batch element (not trainable; upstream's name)."""
        t = th.tensor([self.num_timesteps - 1] * x_start.shape[0], device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LOG2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The full variational bound (bits/dim): 'total_bpd' [N], 'prior_bpd' [N], and [N, T] diagnostics 'vb',
        'xstart_mse', 'mse' (eps MSE) whose column j belongs to step T-1-j (the loop runs from T-1 down)."""
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in range(self.num_timesteps - 1, -1, -1):
            t_batch = th.tensor([step] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": th.stack(xstart_mse, dim=1),
            "mse": th.stack(mse, dim=1),
        }


# ----------------------------------------------------------------------------------------------
# Helpers


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Upstream's gather (see the module docstring): ``arr`` (a 1-D float64 numpy array) at ``timesteps``, as
    float32 shaped [N, 1, ...], broadcast to broadcast_shape."""
    return _gather(th.from_numpy(arr).to(device=timesteps.device), timesteps, broadcast_shape)


def _gather(table, timesteps, broadcast_shape):
    """``table[timesteps]`` (a float64 tensor on the timesteps' device) as float32, broadcast."""
    res = table[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def _split_learned_variance(model_output, x):
    """(mean part, variance values) of a learned-variance model's output, which has twice ``x``'s channels."""
    expected = (x.shape[0], x.shape[1] * 2, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(f"a learned-variance model must output {expected} (mean and variance channels), "
                         f"got {tuple(model_output.shape)}")
    return th.split(model_output, x.shape[1], dim=1)


def _final_sample(steps):
    """The last step's sample of a progressive sampling loop (keeping no earlier step's)."""
    return collections.deque(steps, maxlen=1)[0]["sample"]


def _nonzero_mask(t, x):
    # 1 where t > 0, 0 at the last step (no noise is added when producing x_0); shaped to broadcast over x.
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def _resolve_device(model, device, noise):
    """The sampling device: explicit, else the model's parameters', else the given noise's, else CPU."""
    if device is not None:
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    if noise is not None:
        return noise.device
    return th.device("cpu")
