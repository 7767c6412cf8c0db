"""Tests of the diffusion process, respacing, likelihood helpers and timestep samplers.

Expected values come from closed forms computed independently here (float64), not from the code
under test.
"""

import math

import numpy as np
import pytest
import torch as th
import torch.nn as nn

from guided_diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _extract_into_tensor,
    get_named_beta_schedule,
)
from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from guided_diffusion.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from guided_diffusion.respace import SpacedDiffusion, _WrappedModel, space_timesteps


def make_diffusion(T=1000, schedule="linear", var=ModelVarType.LEARNED_RANGE, loss=LossType.MSE,
                   mean=ModelMeanType.EPSILON, rescale=False, spacing=None):
    kwargs = dict(
        betas=get_named_beta_schedule(schedule, T),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
        rescale_timesteps=rescale,
    )
    if spacing is None:
        return GaussianDiffusion(**kwargs)
    return SpacedDiffusion(space_timesteps(T, spacing), **kwargs)


class ToyEps(nn.Module):
    """eps = tanh(x) (a known function of x); with learned sigma, variance channels = a constant v."""

    def __init__(self, learned_sigma=True, v=0.0, eps_scale=1.0):
        super().__init__()
        self.learned_sigma = learned_sigma
        self.v = v
        self.eps_scale = eps_scale
        self.dummy = nn.Parameter(th.zeros(()))  # gives the loops a device to find
        self.seen_t = []

    def forward(self, x, t, **kwargs):
        self.seen_t.append(t.detach().clone())
        eps = self.eps_scale * th.tanh(x) + 0 * self.dummy
        if not self.learned_sigma:
            return eps
        return th.cat([eps, th.full_like(x, self.v)], dim=1)


# ----------------------------------------------------------------------------------------------
# Schedules


def test_linear_schedule_endpoints_and_scaling():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15)
    assert b[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)
    # Fewer steps: scaled by 1000/T, so T=250 spans 4e-4..0.08.
    b250 = get_named_beta_schedule("linear", 250)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_closed_form():
    T = 1000
    b = get_named_beta_schedule("cosine", T)
    abar = np.cumprod(1 - b)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    # All but the final step are unclipped, so alpha_bar follows the closed form exactly.
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
    assert b[-1] == 0.999  # the last beta would be 1 and is capped at max_beta
    assert (b <= 0.999).all() and (b > 0).all()


def test_unknown_schedule_rejected():
    with pytest.raises(NotImplementedError):
        get_named_beta_schedule("quadratic", 10)


def test_extract_into_tensor_is_float32_broadcast():
    arr = np.array([0.1, 0.2, 0.3], dtype=np.float64)
    out = _extract_into_tensor(arr, th.tensor([2, 0]), (2, 3, 4, 4))
    assert out.dtype == th.float32 and out.shape == (2, 3, 4, 4)
    assert out[0].unique().item() == np.float32(0.3)
    assert out[1].unique().item() == np.float32(0.1)


# ----------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_statistics_and_formula():
    diff = make_diffusion()
    t_idx = 300
    abar = diff.alphas_cumprod[t_idx]
    x0 = th.full((20000, 1, 2, 2), 0.5)
    t = th.full((x0.shape[0],), t_idx)
    gen = th.Generator().manual_seed(0)
    noise = th.randn(x0.shape, generator=gen)
    xt = diff.q_sample(x0, t, noise=noise)
    # Exact with given noise.
    expected = math.sqrt(abar) * 0.5 + math.sqrt(1 - abar) * noise
    assert th.allclose(xt, expected.float(), atol=1e-6)
    # Distribution: mean sqrt(abar) x0, std sqrt(1 - abar).
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.01)

    mean, var, logvar = diff.q_mean_variance(x0[:2], t[:2])
    assert th.allclose(mean, th.full_like(mean, math.sqrt(abar) * 0.5))
    assert th.allclose(var, th.full_like(var, 1 - abar))
    assert th.allclose(logvar, th.full_like(var, math.log(1 - abar)))


def test_posterior_matches_gaussian_product():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision = 1/(1-abar_prev) + alpha/beta."""
    diff = make_diffusion(T=100, schedule="cosine")
    gen = th.Generator().manual_seed(1)
    x0 = th.rand((3, 2, 4, 4), generator=gen) * 2 - 1
    xt = th.randn((3, 2, 4, 4), generator=gen)
    steps = [1, 37, 99]
    t = th.tensor(steps)
    mean, var, logvar = diff.q_posterior_mean_variance(x0, xt, t)
    for k, s in enumerate(steps):
        beta = diff.betas[s]
        abar_prev = np.prod(1 - diff.betas[:s])
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        post_var = 1 / precision
        post_mean = post_var * (
            math.sqrt(abar_prev) / (1 - abar_prev) * x0[k].double()
            + math.sqrt(1 - beta) / beta * xt[k].double()
        )
        assert th.allclose(var[k], th.full_like(var[k], post_var), rtol=1e-5)
        assert th.allclose(logvar[k], th.full_like(var[k], math.log(post_var)), atol=1e-5)
        assert th.allclose(mean[k].double(), post_mean, atol=1e-5)
    # At t=0 the posterior variance is 0; the clipped log-variance uses step 1's value instead.
    _, var0, logvar0 = diff.q_posterior_mean_variance(x0[:1], xt[:1], th.tensor([0]))
    assert var0.abs().max().item() == 0.0
    assert logvar0.flatten()[0].item() == pytest.approx(math.log(diff.posterior_variance[1]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# p_mean_variance


def test_p_mean_variance_learned_range_eps_model():
    diff = make_diffusion(T=1000)
    gen = th.Generator().manual_seed(2)
    x = th.randn((2, 3, 4, 4), generator=gen)
    t = th.tensor([10, 700])
    for v in (-1.0, 1.0, 0.3):
        model = ToyEps(v=v)
        out = diff.p_mean_variance(model, x, t, clip_denoised=False)
        assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
        for k, s in enumerate(t.tolist()):
            abar = diff.alphas_cumprod[s]
            eps = th.tanh(x[k]).double()
            x0 = (x[k].double() - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            assert th.allclose(out["pred_xstart"][k].double(), x0, rtol=1e-4, atol=1e-4)
            # v in [-1, 1] interpolates the log-variance between posterior variance and beta.
            frac = (v + 1) / 2
            lo = math.log(diff.posterior_variance[s])
            hi = math.log(diff.betas[s])
            logvar = frac * hi + (1 - frac) * lo
            assert out["log_variance"][k].flatten()[0].item() == pytest.approx(logvar, rel=1e-5)
            assert out["variance"][k].flatten()[0].item() == pytest.approx(math.exp(logvar), rel=1e-5)
            # Mean = posterior mean given the predicted x0.
            c1 = diff.betas[s] * math.sqrt(diff.alphas_cumprod_prev[s]) / (1 - abar)
            c2 = (1 - diff.alphas_cumprod_prev[s]) * math.sqrt(1 - diff.betas[s]) / (1 - abar)
            assert th.allclose(out["mean"][k].double(), c1 * x0 + c2 * x[k].double(), atol=1e-4)
    # The model saw the raw timesteps (no rescaling by default).
    assert th.equal(model.seen_t[-1], t)


def test_p_mean_variance_clip_and_denoised_fn():
    diff = make_diffusion(T=1000)
    x = th.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    t = th.tensor([999, 999])
    model = ToyEps(v=0.0, eps_scale=-1.0)  # pushes x0 far outside [-1, 1]
    raw = diff.p_mean_variance(model, x, t, clip_denoised=False)["pred_xstart"]
    assert raw.abs().max() > 1.5
    clipped = diff.p_mean_variance(model, x, t, clip_denoised=True)["pred_xstart"]
    assert th.equal(clipped, raw.clamp(-1, 1))
    # denoised_fn runs before the clip.
    halved = diff.p_mean_variance(model, x, t, clip_denoised=True, denoised_fn=lambda z: z * 0.5)
    assert th.allclose(halved["pred_xstart"], (raw * 0.5).clamp(-1, 1))


def test_p_mean_variance_fixed_variances_and_shape_check():
    x = th.randn(2, 3, 4, 4)
    t = th.tensor([0, 500])
    small = make_diffusion(var=ModelVarType.FIXED_SMALL)
    large = make_diffusion(var=ModelVarType.FIXED_LARGE)
    model = ToyEps(learned_sigma=False)
    vs = small.p_mean_variance(model, x, t)["variance"]
    vl = large.p_mean_variance(model, x, t)["variance"]
    assert vs[1].flatten()[0].item() == pytest.approx(small.posterior_variance[500], rel=1e-6)
    assert vl[1].flatten()[0].item() == pytest.approx(large.betas[500], rel=1e-6)
    # FIXED_LARGE uses the posterior variance of step 1 at t=0.
    assert vl[0].flatten()[0].item() == pytest.approx(large.posterior_variance[1], rel=1e-6)
    with pytest.raises(ValueError, match="learned-variance"):
        make_diffusion().p_mean_variance(model, x, t)  # 3 channels where 6 are needed


def test_rescale_timesteps_scales_to_1000():
    diff = make_diffusion(T=250, rescale=True)
    model = ToyEps()
    diff.p_mean_variance(model, th.randn(2, 3, 4, 4), th.tensor([0, 249]))
    assert model.seen_t[-1].dtype == th.float32
    assert model.seen_t[-1].tolist() == [0.0, 996.0]


# ----------------------------------------------------------------------------------------------
# Guidance


def test_condition_mean_constant_gradient():
    diff = make_diffusion(T=100, rescale=True)
    x = th.randn(2, 3, 4, 4)
    t = th.tensor([5, 60])
    out = diff.p_mean_variance(ToyEps(v=0.2), x, t)
    seen = []

    def cond_fn(x_, t_, y=None):
        seen.append((t_.clone(), y))
        return th.full_like(x_, 0.7)

    new_mean = diff.condition_mean(cond_fn, out, x, t, model_kwargs={"y": "label"})
    assert th.allclose(new_mean, out["mean"] + out["variance"] * 0.7, atol=1e-6)
    # cond_fn received the model's (scaled) timesteps and the model kwargs.
    assert seen[0][0].tolist() == [50.0, 600.0] and seen[0][1] == "label"


def test_condition_score_constant_gradient():
    diff = make_diffusion(T=100)
    x = th.randn(2, 3, 4, 4)
    t = th.tensor([5, 60])
    out = diff.p_mean_variance(ToyEps(v=0.2), x, t, clip_denoised=False)
    g = 0.3
    new = diff.condition_score(lambda x_, t_, **kw: th.full_like(x_, g), out, x, t, model_kwargs={})
    for k, s in enumerate(t.tolist()):
        abar = diff.alphas_cumprod[s]
        eps = th.tanh(x[k]).double() - math.sqrt(1 - abar) * g
        x0 = (x[k].double() - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        assert th.allclose(new["pred_xstart"][k].double(), x0, atol=1e-4)
    expected_mean, _, _ = diff.q_posterior_mean_variance(new["pred_xstart"], x, t)
    assert th.allclose(new["mean"], expected_mean)
    assert th.equal(new["variance"], out["variance"])  # variance untouched
    assert th.equal(out["pred_xstart"], diff.p_mean_variance(ToyEps(v=0.2), x, t, clip_denoised=False)["pred_xstart"])


def test_p_sample_with_cond_fn_shifts_mean():
    diff = make_diffusion(T=100)
    x = th.randn(2, 3, 4, 4)
    t = th.tensor([50, 50])
    zeros = lambda z: th.zeros_like(z)
    plain = diff.p_sample(ToyEps(), x, t, randn_like=zeros)["sample"]
    guided = diff.p_sample(ToyEps(), x, t, randn_like=zeros,
                           cond_fn=lambda x_, t_, **kw: th.ones_like(x_), model_kwargs={})["sample"]
    var = diff.p_mean_variance(ToyEps(), x, t)["variance"]
    assert th.allclose(guided - plain, var, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling


def test_p_sample_noise_and_last_step():
    diff = make_diffusion(T=100)
    x = th.randn(2, 3, 4, 4)
    model = ToyEps(v=0.0)
    calls = []

    def ones(z):
        calls.append(z.shape)
        return th.ones_like(z)

    out = diff.p_sample(model, x, th.tensor([50, 0]), randn_like=ones)
    pmv = diff.p_mean_variance(model, x, th.tensor([50, 0]))
    assert calls == [x.shape]  # drawn once, even though one element is at t=0
    assert th.allclose(out["sample"][0], pmv["mean"][0] + th.exp(0.5 * pmv["log_variance"][0]))
    assert th.equal(out["sample"][1], pmv["mean"][1])  # no noise at t=0


def test_ddim_step_rederives_eps_from_clipped_xstart():
    diff = make_diffusion(T=1000)
    x = th.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    t = th.tensor([900, 400])
    model = ToyEps(v=0.0, eps_scale=-1.0)  # x0 prediction leaves [-1, 1], so clipping matters
    out = diff.ddim_sample(model, x, t, clip_denoised=True, eta=0.0)
    for k, s in enumerate(t.tolist()):
        abar, abar_prev = diff.alphas_cumprod[s], diff.alphas_cumprod_prev[s]
        raw_x0 = (x[k].double() + math.sqrt(1 - abar) * th.tanh(x[k]).double()) / math.sqrt(abar)
        x0 = raw_x0.clamp(-1, 1)
        eps = (x[k].double() - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
        assert th.allclose(out["sample"][k].double(), expected, atol=1e-4)
        # Using the model's own eps instead would give a visibly different answer.
        wrong = math.sqrt(abar_prev) * x0 - math.sqrt(1 - abar_prev) * th.tanh(x[k]).double()
        assert (out["sample"][k].double() - wrong).abs().max() > 1e-2


def test_ddim_eta_noise_scale():
    diff = make_diffusion(T=100)
    x = th.randn(1, 3, 4, 4)
    t = th.tensor([40])
    model = ToyEps()
    det = diff.ddim_sample(model, x, t, eta=0.0, randn_like=th.ones_like)["sample"]
    det0 = diff.ddim_sample(model, x, t, eta=0.0, randn_like=th.zeros_like)["sample"]
    assert th.equal(det, det0)  # eta=0 ignores the noise
    noisy = diff.ddim_sample(model, x, t, eta=1.0, randn_like=th.ones_like)["sample"]
    mean1 = diff.ddim_sample(model, x, t, eta=1.0, randn_like=th.zeros_like)["sample"]
    abar, abar_prev = diff.alphas_cumprod[40], diff.alphas_cumprod_prev[40]
    sigma = math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
    assert th.allclose(noisy - mean1, th.full_like(x, sigma), atol=1e-6)


def test_ddim_reverse_inverts_eta0_step_for_linear_eps():
    # With eps independent of x (constant), a reverse step exactly undoes a forward DDIM step.
    diff = make_diffusion(T=50, var=ModelVarType.FIXED_SMALL)

    class ConstEps(nn.Module):
        def forward(self, x, t):
            return th.full_like(x, 0.1)

    x = th.randn(1, 3, 4, 4) * 0.3
    down = diff.ddim_sample(ConstEps(), x, th.tensor([20]), clip_denoised=False)["sample"]
    up = diff.ddim_reverse_sample(ConstEps(), down, th.tensor([19]), clip_denoised=False)["sample"]
    assert th.allclose(up, x, atol=1e-4)
    with pytest.raises(ValueError):
        diff.ddim_reverse_sample(ConstEps(), down, th.tensor([19]), eta=0.5)


def test_ddim_loop_deterministic_given_noise():
    diff = make_diffusion(T=1000, spacing="ddim10")
    xT = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(3))
    th.manual_seed(10)
    a = diff.ddim_sample_loop(ToyEps(), (2, 3, 4, 4), noise=xT.clone(), eta=0.0)
    th.manual_seed(11)
    b = diff.ddim_sample_loop(ToyEps(), (2, 3, 4, 4), noise=xT.clone(), eta=0.0)
    assert th.equal(a, b)
    assert a.shape == (2, 3, 4, 4) and th.isfinite(a).all()
    # progressive yields one dict per step, the last being the loop's result
    steps = list(diff.ddim_sample_loop_progressive(ToyEps(), (2, 3, 4, 4), noise=xT.clone()))
    assert len(steps) == 10 and th.equal(steps[-1]["sample"], a)
    # a different start gives a different result
    c = diff.ddim_sample_loop(ToyEps(), (2, 3, 4, 4), noise=xT + 0.5, eta=0.0)
    assert not th.allclose(a, c)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_randn_like_used_for_all_noise(loop):
    diff = make_diffusion(T=1000, spacing="8")
    shape = (2, 3, 4, 4)
    calls = []

    def seeded_randn_like(z):
        calls.append(tuple(z.shape))
        g = th.Generator().manual_seed(len(calls))
        return th.randn(z.shape, generator=g).to(z.device)

    kwargs = {"eta": 1.0} if loop == "ddim_sample_loop" else {}
    th.manual_seed(0)
    a = getattr(diff, loop)(ToyEps(), shape, randn_like=seeded_randn_like, **kwargs)
    # once for x_T plus once per step, always with the sample's shape
    assert calls == [shape] * 9
    calls.clear()
    th.manual_seed(1)  # the global RNG is not used at all
    b = getattr(diff, loop)(ToyEps(), shape, randn_like=seeded_randn_like, **kwargs)
    assert th.equal(a, b)
    # with noise= given, x_T comes from it and randn_like only supplies the step noise
    calls.clear()
    getattr(diff, loop)(ToyEps(), shape, noise=th.zeros(shape), randn_like=seeded_randn_like, **kwargs)
    assert len(calls) == 8


def test_p_sample_loop_default_rng_draws_from_torch_global_stream():
    """Without randn_like the loop draws x_T and every step's noise from torch's global RNG, in upstream's
    order (x_T first, then one draw per step): the same as passing those draws explicitly."""
    diff = make_diffusion(T=1000, spacing="5")
    shape = [1, 3, 4, 4]
    th.manual_seed(5)
    default = diff.p_sample_loop(ToyEps(), shape)
    th.manual_seed(5)
    x_T = th.randn(*shape)
    explicit = diff.p_sample_loop(ToyEps(), shape, noise=x_T, randn_like=lambda x: th.randn_like(x))
    assert th.equal(default, explicit) and th.isfinite(default).all()
    th.manual_seed(6)
    assert not th.allclose(diff.p_sample_loop(ToyEps(), shape), default)


# ----------------------------------------------------------------------------------------------
# Respacing


def test_space_timesteps_known_outputs():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:5] == [0, 4, 8, 12, 16] and s250[-3:] == [991, 995, 999]
    assert sorted(space_timesteps(1000, "10,10,5")) == [
        0, 37, 74, 111, 148, 185, 222, 259, 296, 333,
        334, 371, 408, 445, 482, 518, 555, 592, 629, 666,
        667, 750, 833, 916, 999,
    ]
    assert space_timesteps(1000, [10, 10, 5]) == space_timesteps(1000, "10,10,5")
    assert space_timesteps(1000, "1000") == set(range(1000))
    # The upstream docstring's example: 300 steps, sections of 10, 15, 20.
    s = sorted(space_timesteps(300, [10, 15, 20]))
    assert len(s) == 45 and s[:3] == [0, 11, 22] and s[9:12] == [99, 100, 107] and s[-1] == 299


def test_space_timesteps_errors():
    with pytest.raises(ValueError, match="exactly 7"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(20, "10,10,5")


def test_spaced_diffusion_keeps_alpha_bar():
    base = make_diffusion(T=1000, schedule="cosine")
    spaced = make_diffusion(T=1000, schedule="cosine", spacing="ddim25")
    assert spaced.num_timesteps == 25
    assert spaced.timestep_map == list(range(0, 1000, 40))
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::40], rtol=1e-12)
    assert spaced.original_num_steps == 1000


def test_spaced_diffusion_passes_original_timesteps():
    spaced = make_diffusion(T=1000, spacing="ddim25")
    model = ToyEps()
    cond_ts = []

    def cond_fn(x, t, **kw):
        cond_ts.append(t.clone())
        return th.zeros_like(x)

    spaced.ddim_sample_loop(model, (2, 3, 4, 4), cond_fn=cond_fn, model_kwargs={})
    seen = [t.tolist() for t in model.seen_t]
    assert seen == [[s, s] for s in range(960, -1, -40)]
    assert [t.tolist() for t in cond_ts] == seen  # the classifier gets the same timesteps

    model.seen_t.clear()
    spaced.training_losses(model, th.zeros(2, 3, 4, 4), th.tensor([1, 24]))
    assert model.seen_t[0].tolist() == [40, 960]


def test_spaced_diffusion_rescale_and_no_double_wrap():
    spaced = make_diffusion(T=4000, spacing="ddim4", rescale=True)  # kept steps 0, 1000, 2000, 3000
    model = ToyEps()
    spaced.p_mean_variance(model, th.randn(2, 3, 4, 4), th.tensor([1, 3]))
    assert model.seen_t[-1].tolist() == [250.0, 750.0]
    wrapped = spaced._wrap_model(model)
    assert isinstance(wrapped, _WrappedModel)
    assert spaced._wrap_model(wrapped) is wrapped
    spaced.p_mean_variance(wrapped, th.randn(2, 3, 4, 4), th.tensor([1, 3]))
    assert model.seen_t[-1].tolist() == [250.0, 750.0]  # mapped once, not twice


# ----------------------------------------------------------------------------------------------
# Training losses and the bound


class ToyLearnedSigma(nn.Module):
    """Separate parameters for the eps half and the variance half, so gradients can be traced."""

    def __init__(self):
        super().__init__()
        self.eps_conv = nn.Conv2d(3, 3, 1)
        self.var_conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, t, **kwargs):
        return th.cat([self.eps_conv(x), th.tanh(self.var_conv(x))], dim=1)


def test_training_losses_hybrid():
    th.manual_seed(0)
    diff = make_diffusion(T=1000)
    model = ToyLearnedSigma()
    x0 = th.rand(4, 3, 8, 8) * 2 - 1
    t = th.tensor([0, 10, 500, 999])
    noise = th.randn_like(x0)
    terms = diff.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    for v in terms.values():
        assert v.shape == (4,) and th.isfinite(v).all()
    assert th.allclose(terms["loss"], terms["mse"] + terms["vb"])
    # mse is the eps MSE against the given noise
    xt = diff.q_sample(x0, t, noise=noise)
    eps = model(xt, t)[:, :3]
    assert th.allclose(terms["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    # The VB term trains only the variance half; the MSE only the eps half.
    terms["vb"].sum().backward(retain_graph=True)
    assert model.eps_conv.weight.grad is None or model.eps_conv.weight.grad.abs().max() == 0
    assert model.var_conv.weight.grad.abs().max() > 0
    model.zero_grad(set_to_none=True)
    terms["mse"].sum().backward()
    assert model.var_conv.weight.grad is None or model.var_conv.weight.grad.abs().max() == 0
    assert model.eps_conv.weight.grad.abs().max() > 0


def test_training_losses_rescaled_and_kl():
    th.manual_seed(0)
    model = ToyLearnedSigma()
    x0 = th.rand(2, 3, 8, 8) * 2 - 1
    t = th.tensor([3, 40])
    noise = th.randn_like(x0)
    mse = make_diffusion(T=100, loss=LossType.MSE).training_losses(model, x0, t, noise=noise)
    rmse = make_diffusion(T=100, loss=LossType.RESCALED_MSE).training_losses(model, x0, t, noise=noise)
    assert th.allclose(rmse["vb"], mse["vb"] * 0.1)
    kl = make_diffusion(T=100, loss=LossType.KL).training_losses(model, x0, t, noise=noise)
    rkl = make_diffusion(T=100, loss=LossType.RESCALED_KL).training_losses(model, x0, t, noise=noise)
    assert set(kl) == {"loss"} and th.allclose(rkl["loss"], kl["loss"] * 100)
    # KL loss = the full VB term (mean not frozen, but same value)
    assert th.allclose(kl["loss"], mse["vb"], rtol=1e-5)
    assert LossType.KL.is_vb() and not LossType.MSE.is_vb()


def test_calc_bpd_loop_shapes_and_prior():
    diff = make_diffusion(T=6, schedule="cosine")
    x0 = th.rand(2, 3, 4, 4) * 2 - 1
    out = diff.calc_bpd_loop(ToyLearnedSigma(), x0)
    assert out["vb"].shape == (2, 6) and out["mse"].shape == (2, 6) and out["xstart_mse"].shape == (2, 6)
    assert th.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # Prior: KL(N(sqrt(abar) x0, 1-abar) || N(0, 1)) in bits, averaged over dims.
    abar = diff.alphas_cumprod[-1]
    kl = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0.double() ** 2)
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    assert th.allclose(out["prior_bpd"].double(), expected, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Likelihood helpers


def test_normal_kl_matches_torch_distributions():
    gen = th.Generator().manual_seed(4)
    m1, m2 = th.randn(10, generator=gen), th.randn(10, generator=gen)
    lv1, lv2 = th.randn(10, generator=gen), th.randn(10, generator=gen)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = th.distributions.kl_divergence(
        th.distributions.Normal(m1, th.exp(0.5 * lv1)), th.distributions.Normal(m2, th.exp(0.5 * lv2))
    )
    assert th.allclose(ours, ref, atol=1e-5)
    # scalars for the second distribution broadcast
    assert th.allclose(normal_kl(m1, lv1, 0.0, 0.0), normal_kl(m1, lv1, th.zeros(10), th.zeros(10)))


def test_approx_cdf_close_to_exact():
    x = th.linspace(-5, 5, 101, dtype=th.float64)
    exact = 0.5 * (1 + th.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 1e-3


def test_discretized_likelihood_sums_to_one():
    # Probabilities of all 256 pixel values under any Gaussian sum to 1 (edge bins are open-ended).
    values = (th.arange(256, dtype=th.float64) / 127.5 - 1).view(256, 1)
    for mean, log_scale in ((0.1, -2.0), (-0.95, -4.0), (0.5, 0.0)):
        means = th.full_like(values, mean)
        logp = discretized_gaussian_log_likelihood(values, means=means, log_scales=th.full_like(values, log_scale))
        assert logp.shape == values.shape
        assert th.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        discretized_gaussian_log_likelihood(values, means=values[:3], log_scales=values)


# ----------------------------------------------------------------------------------------------
# Timestep samplers


def test_uniform_sampler():
    diff = make_diffusion(T=50)
    sampler = create_named_schedule_sampler("uniform", diff)
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    ts, w = sampler.sample(1000, "cpu")
    assert ts.dtype == th.long and ts.shape == (1000,) and 0 <= ts.min() and ts.max() < 50
    assert th.equal(w, th.ones(1000))
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", diff)


def test_loss_second_moment_resampler():
    diff = make_diffusion(T=4, schedule="cosine")
    sampler = create_named_schedule_sampler("loss-second-moment", diff)
    assert isinstance(sampler, LossSecondMomentResampler)
    assert np.array_equal(sampler.weights(), np.ones(4))  # not warmed up yet
    # Fill the history (10 per step): losses 1, 2, 3, 4 for steps 0..3; step 3 gets extra old ones first.
    sampler.update_with_local_losses(th.tensor([3] * 5), th.tensor([100.0] * 5))
    for _ in range(10):
        sampler.update_with_local_losses(th.arange(4), th.tensor([1.0, 2.0, 3.0, 4.0]))
    w = sampler.weights()
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / 10 * (1 - 0.001) + 0.001 / 4  # old 100s shifted out
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    np.random.seed(0)
    ts, weights = sampler.sample(4000, "cpu")
    counts = np.bincount(ts.numpy(), minlength=4) / 4000
    np.testing.assert_allclose(counts, expected, atol=0.03)
    # importance weights undo the non-uniform sampling: 1 / (T p(t))
    np.testing.assert_allclose(weights.numpy(), 1 / (4 * expected[ts.numpy()]), rtol=1e-6)
