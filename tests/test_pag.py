"""The PAG engine: formula, perturbations, layers, batching, schedules, SAG, CG, conformance."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

import pag
from guided_diffusion import script_util as su
from guided_diffusion.attention import AttentionOverride, attention_map
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.unet import attention_blocks
from pag.guidance import guidance_step
from pag.perturbations import _RowRandom

SMALL_LAYERS = ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1"]


def small_model(class_cond=False, learn_sigma=True, respacing="", seed=0):
    args = su.model_and_diffusion_defaults()
    args.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                attention_resolutions="16,8", num_head_channels=16, learn_sigma=learn_sigma,
                class_cond=class_cond, timestep_respacing=respacing)
    torch.manual_seed(seed)
    model, diffusion = su.create_model_and_diffusion(**args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15)
    return model.eval(), diffusion


def count_forwards(model, module=None):
    """Record the batch size of every call of ``module`` (default: ``model`` itself), through a hook."""
    calls = []
    (module or model).register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def two_pass_pag(model, x, t, layers, scale, kind="identity", **kwargs):
    """The authors' strategy, written independently: a clean pass, a perturbed pass, the formula."""
    with torch.no_grad():
        out = model(x, t, **kwargs)
        with pag.perturbed_attention(model, layers, kind):
            perturbed = model(x, t, **kwargs)
    eps, rest = out[:, :3], out[:, 3:]
    guided = perturbed[:, :3] + (1 + scale) * (eps - perturbed[:, :3])  # their guide_scale = 1 + s
    return torch.cat([guided, rest], dim=1)


def test_guidance_step_formula():
    eps, away = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    got = guidance_step(eps, (away, torch.tensor([3.0])))
    assert torch.equal(got, torch.tensor([[2.5, -1.0]]))  # 1 + 3 * 0.5, 2 + 3 * (-1)
    per_row = guidance_step(torch.ones(2, 1), (torch.zeros(2, 1), torch.tensor([0.0, 2.0])))
    assert per_row.flatten().tolist() == [1.0, 3.0]
    # Two terms add up; each is measured from the unguided eps.
    both = guidance_step(eps, (away, torch.tensor([1.0])), (torch.zeros(1, 2), torch.tensor([0.5])))
    assert torch.equal(both, torch.tensor([[2.0, 2.0]]))  # 1 + 0.5 + 0.5, 2 - 1 + 1
    assert torch.equal(guidance_step(eps), eps)


def test_scale_zero_is_exactly_the_model_with_one_pass():
    model, _ = small_model()
    calls = count_forwards(model)
    guided = pag.guide(model, pag.GuidanceConfig(pag_scale=0.0, pag_layers=SMALL_LAYERS))
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([5, 500, 999])
    with torch.no_grad():
        got = guided(x, t)
        expected = model(x, t)
    assert torch.equal(got, expected)
    assert calls == [3, 3]  # the guided call and the test's own call


@pytest.mark.parametrize("batch_passes", [True, False])
@pytest.mark.parametrize("class_cond", [False, True])
def test_shared_prefix_equals_two_passes(class_cond, batch_passes):
    model, _ = small_model(class_cond=class_cond)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
    kwargs = {"y": torch.tensor([7, 123])} if class_cond else {}
    first_block, first_perturbed, output = (
        count_forwards(model, model.input_blocks[0]),
        count_forwards(model, model.input_blocks[3]),
        count_forwards(model, model.out),
    )
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS)
    guided = pag.guide(model, config, batch_passes=batch_passes)
    with torch.no_grad():
        got = guided(x, t, **kwargs)
    assert first_block == [2]  # the prefix runs once, on x
    # From the first perturbed layer's block on: once on [x; x], or twice on x.
    assert first_perturbed == output == ([4] if batch_passes else [2, 2])
    expected = two_pass_pag(model, x, t, SMALL_LAYERS, 3.0, **kwargs)
    assert got.shape == (2, 6, 32, 32)
    assert (got - expected).abs().max().item() < 1e-5
    with torch.no_grad():
        clean = model(x, t, **kwargs)
    assert torch.allclose(got[:, 3:], clean[:, 3:], atol=1e-5)  # variance from the unperturbed pass
    assert (got[:, :3] - clean[:, :3]).abs().max() > 1e-2


def test_fixed_sigma_model_output_shape():
    model, _ = small_model(learn_sigma=False)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([400])
    with torch.no_grad():
        got = pag.guide(model, {"pag_scale": 1.5, "pag_layers": SMALL_LAYERS})(x, t)
    assert got.shape == (1, 3, 32, 32)
    expected = two_pass_pag(model, x, t, SMALL_LAYERS, 1.5)
    assert (got - expected).abs().max().item() < 1e-5


def test_perturbed_attention_restores_on_exit_and_on_error():
    model, _ = small_model()
    blocks = attention_blocks(model)
    sentinel = AttentionOverride(lambda q, k, v: v)
    blocks["middle_block.1"].override = sentinel
    with pag.perturbed_attention(model, ["input_blocks.*", "middle_block.1"]):
        assert all(blocks[n].override is not None for n in ["input_blocks.3.1", "input_blocks.5.1"])
        assert blocks["middle_block.1"].override is not sentinel
    assert blocks["input_blocks.3.1"].override is None
    assert blocks["middle_block.1"].override is sentinel
    with pytest.raises(RuntimeError, match="boom"):
        with pag.perturbed_attention(model, ["input_blocks.3.1"]):
            raise RuntimeError("boom")
    assert blocks["input_blocks.3.1"].override is None


# --- perturbation definitions on a tiny hand-checkable attention map -----------------------------

def tiny_qkv():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, 3, 2) for _ in range(3))
    return q, k, v


def softmax_map(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def test_identity_outputs_v_without_scores():
    q, k, v = tiny_qkv()
    fn = pag.make_attention_fn("identity")
    assert torch.equal(fn(q * float("nan"), k, v), v)  # Q K^T is never computed


def test_random_mask_definition():
    q, k, v = tiny_qkv()
    normal = softmax_map(q, k) @ v
    assert torch.allclose(pag.make_attention_fn("random_mask", pag.PerturbationParams(drop_rate=0.0))(q, k, v), normal, atol=1e-6)
    assert torch.allclose(pag.make_attention_fn("random_mask", pag.PerturbationParams(drop_rate=1.0))(q, k, v), v, atol=1e-6)
    params = pag.PerturbationParams(drop_rate=0.5, perturbation_seed=11)
    got = pag.make_attention_fn("random_mask", params)(q, k, v)
    # Recompute the mask the way it is defined: row 0's first draw (step 0), uniform draws < drop_rate,
    # diagonal kept.
    drop = (_RowRandom(11).rand((1, 1, 3, 3), "cpu") < 0.5) & ~torch.eye(3, dtype=torch.bool)
    logits = q @ k.transpose(-1, -2) / math.sqrt(2)
    expected = torch.softmax(logits.masked_fill(drop, float("-inf")), dim=-1) @ v
    assert drop.any() and torch.allclose(got, expected, atol=1e-6)


def test_noise_definition():
    q, k, v = tiny_qkv()
    params = pag.PerturbationParams(noise_std=0.3, perturbation_seed=2)
    got = pag.make_attention_fn("noise", params)(q, k, v)
    expected = (softmax_map(q, k) + 0.3 * _RowRandom(2).randn((1, 1, 3, 3), "cpu")) @ v
    assert torch.allclose(got, expected, atol=1e-6)
    zero = pag.make_attention_fn("noise", pag.PerturbationParams(noise_std=0.0))(q, k, v)
    assert torch.allclose(zero, softmax_map(q, k) @ v, atol=1e-6)


def test_blur_definition_matches_hand_convolution():
    q, k, v = tiny_qkv()
    params = pag.PerturbationParams(blur_kernel_size=3, blur_sigma=0.8)
    got = pag.make_attention_fn("blur", params)(q, k, v)
    weights = softmax_map(q, k)[0, 0]
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * 0.8**2))
    g = g / g.sum()
    padded = F.pad(weights[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
    blurred = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            blurred[i, j] = (padded[i:i + 3, j:j + 3] * torch.outer(g, g)).sum()
    assert torch.allclose(got[0, 0], blurred @ v[0, 0], atol=1e-6)


def test_drop_definition():
    q, k, v = tiny_qkv()
    assert torch.allclose(pag.make_attention_fn("drop", pag.PerturbationParams(drop_rate=0.0))(q, k, v), softmax_map(q, k) @ v, atol=1e-6)
    assert torch.count_nonzero(pag.make_attention_fn("drop", pag.PerturbationParams(drop_rate=1.0))(q, k, v)) == 0
    got = pag.make_attention_fn("drop", pag.PerturbationParams(drop_rate=0.4, perturbation_seed=5))(q, k, v)
    keep = _RowRandom(5).rand((1, 1, 3, 3), "cpu") >= 0.4
    assert torch.allclose(got, (softmax_map(q, k) * keep) @ v, atol=1e-6)


def test_random_perturbations_depend_on_row_seed_not_batch():
    model, _ = small_model()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([300, 300, 300])
    guided = pag.guide(model, pag.GuidanceConfig(pag_scale=2.0, pag_layers=SMALL_LAYERS,
                                                 perturbation="drop", drop_rate=0.3, perturbation_seed=9))
    with torch.no_grad():
        full = guided(x, t, row_seeds=torch.tensor([10, 11, 12]))
        alone = guided(x[2:], t[2:], row_seeds=torch.tensor([12]))
        again = guided(x, t, row_seeds=torch.tensor([10, 11, 12]))
        other = guided(x, t, row_seeds=torch.tensor([20, 21, 22]))
    assert torch.allclose(full[2:], alone, atol=1e-5)
    assert torch.equal(full, again)
    assert (full - other).abs().max() > 1e-4


# --- layers ---------------------------------------------------------------------------------------

def test_layer_names_and_globs_resolve_in_execution_order():
    model, _ = small_model()
    assert pag.resolve_layers(model, "middle_block.1, input_blocks.3.1") == ["input_blocks.3.1", "middle_block.1"]
    assert pag.resolve_layers(model, ["output_blocks.*"]) == [
        "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1"]


@pytest.mark.parametrize("layers, reason", [
    (["input_blocks.14.1"], "no module 'input_blocks.14.1'"),
    (["input_blocks.3.0"], "is a ResBlock, not an attention block"),
    (["decoder.*"], "matches no attention block"),
])
def test_bad_layer_names_list_the_valid_blocks(layers, reason):
    model, _ = small_model()
    with pytest.raises(ValueError, match=reason) as err:
        pag.guide(model, pag.GuidanceConfig(pag_scale=1.0, pag_layers=layers))
    assert re.search(r"input_blocks\.3\.1 +16x16 +64 +4\n", str(err.value))
    assert re.search(r"middle_block\.1 +8x8 +64 +4\n", str(err.value))


# --- configuration and schedules ------------------------------------------------------------------

def test_config_round_trips_through_yaml():
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers="input_blocks.14.1,middle_block.1",
                                perturbation="blur", blur_sigma=2.0, guidance_interval=[100, 900],
                                pag_schedule="adaptive", pag_adaptive_scale=0.002, sag_scale=0.5)
    again = pag.GuidanceConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config
    assert again.pag_layers == ["input_blocks.14.1", "middle_block.1"]
    with pytest.raises(ValueError, match="unknown guidance settings: pag_sclae"):
        pag.GuidanceConfig.from_dict({"pag_sclae": 3})


def test_guidance_defaults_are_flag_strings():
    defaults = pag.guidance_defaults()
    assert defaults["pag_layers"] == "input_blocks.14.1,input_blocks.16.1,input_blocks.17.1,middle_block.1"
    assert defaults["pag_scale"] == 0.0 and defaults["guidance_interval"] == "0,1000"


def test_schedules():
    t = torch.tensor([999, 500, 0])
    const = pag.GuidanceConfig(pag_scale=3.0)
    assert const.pag_scale_at(t).tolist() == [3.0, 3.0, 3.0]
    linear = pag.GuidanceConfig(pag_scale=4.0, pag_schedule="linear", pag_scale_end=1.0)
    assert torch.allclose(linear.pag_scale_at(t), torch.tensor([4.0, 1.0 + 3.0 * 500 / 999, 1.0]))
    adaptive = pag.GuidanceConfig(pag_scale=3.0, pag_schedule="adaptive", pag_adaptive_scale=0.005)
    assert torch.allclose(adaptive.pag_scale_at(t), torch.tensor([3.0 - 0.005, 0.5, 0.0]))
    interval = pag.GuidanceConfig(pag_scale=3.0, guidance_interval=[200, 600])
    assert interval.pag_scale_at(t).tolist() == [0.0, 3.0, 0.0]


def test_outside_interval_is_exactly_unguided():
    model, _ = small_model()
    calls = count_forwards(model, model.out)
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS, guidance_interval=[0, 500])
    guided = pag.guide(model, config, batch_passes=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = guided(x, torch.tensor([800]))
        assert calls == [1]
        assert torch.equal(out, model(x, torch.tensor([800])))
        guided(x, torch.tensor([400]))
    assert calls == [1, 1, 1, 1]  # inside the interval: a clean and a perturbed continuation


@pytest.mark.parametrize("settings, message", [
    ({"perturbation": "random_mask", "drop_rate": -0.1}, "drop_rate must lie in"),
    ({"perturbation": "drop", "drop_rate": 1.5}, "drop_rate must lie in"),
    ({"perturbation": "blur", "blur_sigma": -1.0}, "blur_sigma must be > 0"),
    ({"perturbation": "blur", "blur_kernel_size": 4}, "odd"),
    ({"perturbation": "noise", "noise_std": -1.0}, "noise_std must be >= 0"),
    ({"perturbation": "scramble"}, "unknown perturbation"),
    ({"guidance_interval": [-1, 500]}, "guidance_interval"),
    ({"guidance_interval": [0, 1001]}, "guidance_interval"),
    ({"pag_schedule": "cosine"}, "pag_schedule"),
    ({"classifier_scale": -1.0}, "classifier_scale"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        pag.GuidanceConfig(**settings)


def test_interval_checked_against_the_diffusion_length():
    model, _ = small_model()
    args = su.diffusion_defaults()
    diffusion = su.create_gaussian_diffusion(steps=500, noise_schedule="linear")
    del args
    with pytest.raises(ValueError, match="<= 500"):
        pag.guide(model, pag.GuidanceConfig(pag_scale=1.0, pag_layers=SMALL_LAYERS, guidance_interval=[0, 800]), diffusion)


# --- SAG and classifier guidance ------------------------------------------------------------------

def independent_sag(model, diffusion, x, t, layer, sigma):
    """SAG computed step by step in the test (the map captured by a plain recording override)."""
    captured = {}

    def record(q, k, v):
        weights = attention_map(q, k)
        captured["map"] = weights.mean(dim=1)
        return weights.to(v.dtype) @ v

    with torch.no_grad():
        attention_blocks(model)[layer].override = AttentionOverride(record)
        out = model(x, t)
        attention_blocks(model)[layer].override = None
        eps = out[:, :3]
        side = int(math.sqrt(captured["map"].shape[-1]))
        mask = (captured["map"].sum(1) > 1).float().reshape(-1, 1, side, side)
        mask = F.interpolate(mask, x.shape[2:], mode="nearest")
        index = diffusion.timestep_map.index(int(t[0]))
        abar = torch.tensor(diffusion.alphas_cumprod[index], dtype=torch.float32)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        from torchvision.transforms.v2.functional import gaussian_blur
        blurred = gaussian_blur(x0, [31, 31], [sigma, sigma])
        x_deg = abar.sqrt() * (blurred * mask + x0 * (1 - mask)) + (1 - abar).sqrt() * eps
        eps_deg = model(x_deg, t)[:, :3]
    return out, eps, eps_deg, mask


def test_sag_matches_independent_computation_and_needs_diffusion():
    model, diffusion = small_model(respacing="10")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([555, 555])
    config = pag.GuidanceConfig(sag_scale=0.8, sag_layer="output_blocks.1.1", sag_blur_sigma=3.0)
    with pytest.raises(ValueError, match="diffusion"):
        pag.guide(model, config)
    with torch.no_grad():
        got = pag.guide(model, config, diffusion)(x, t)
    out, eps, eps_deg, mask = independent_sag(model, diffusion, x, t, "output_blocks.1.1", 3.0)
    assert 0 < mask.mean() < 1
    assert torch.allclose(got[:, :3], eps + 0.8 * (eps - eps_deg), atol=1e-5)
    assert torch.equal(got[:, 3:], out[:, 3:])
    with pytest.raises(ValueError, match="not steps of this diffusion"):
        with torch.no_grad():
            pag.guide(model, config, diffusion)(x, torch.tensor([556, 556]))


@pytest.mark.parametrize("batch_passes", [True, False])
@pytest.mark.parametrize("sag_layer", ["output_blocks.1.1", "input_blocks.5.1", "input_blocks.3.1"])
def test_pag_and_sag_combine_in_one_step(sag_layer, batch_passes):
    # SAG's block after the shared prefix, on a perturbed block, and inside the shared prefix.
    model, diffusion = small_model(respacing="10")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([555, 555])
    layers = ["input_blocks.5.1", "middle_block.1"]
    config = pag.GuidanceConfig(pag_scale=2.0, pag_layers=layers, sag_scale=0.5,
                                sag_layer=sag_layer, sag_blur_sigma=3.0)
    with torch.no_grad():
        got = pag.guide(model, config, diffusion, batch_passes=batch_passes)(x, t)
        pag_only = two_pass_pag(model, x, t, layers, 2.0)
    _, eps, eps_deg, _ = independent_sag(model, diffusion, x, t, sag_layer, 3.0)
    expected = pag_only[:, :3] + 0.5 * (eps - eps_deg)
    assert torch.allclose(got[:, :3], expected, atol=1e-5)


def test_classifier_cond_fn_is_scaled_log_prob_gradient():
    torch.manual_seed(0)
    weight = torch.randn(1000, 12)

    def linear_classifier(x, t):
        return x.flatten(1) @ weight.T

    x, t, y = torch.randn(2, 3, 2, 2), torch.tensor([1, 2]), torch.tensor([4, 900])
    grad = pag.classifier_cond_fn(linear_classifier, 2.5)(x, t, y=y)
    probs = torch.softmax(x.flatten(1) @ weight.T, dim=-1)
    expected = 2.5 * (weight[y] - probs @ weight).reshape(x.shape)
    assert torch.allclose(grad, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs class labels"):
        pag.classifier_cond_fn(linear_classifier, 1.0)(x, t)


def test_pag_with_classifier_guidance_in_ddim_and_ddpm():
    """CG acts on the PAG-guided prediction: DDIM shifts the score (eps - sqrt(1 - abar) * grad), DDPM shifts
    the mean (mean + variance * grad), each with the gradient at the original timestep, towards the label."""
    model, diffusion = small_model(class_cond=True, respacing="ddim4")
    classifier_args = su.classifier_defaults()
    classifier_args.update(image_size=32, classifier_width=64, classifier_depth=1,
                           classifier_attention_resolutions="8")
    su._CHANNEL_MULT.setdefault(32, (1, 2, 2))
    try:
        torch.manual_seed(3)
        classifier = su.create_classifier(**classifier_args).eval()
    finally:
        su._CHANNEL_MULT.pop(32)
    guided = pag.guide(model, pag.GuidanceConfig(pag_scale=2.0, pag_layers=SMALL_LAYERS))
    scale = 3.0
    cond_fn = pag.classifier_cond_fn(classifier, scale)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 2])
    kwargs = {"y": y}
    t = torch.full((2,), 2, dtype=torch.long)  # a respaced index; the networks see the original timestep
    t_orig = torch.tensor(diffusion.timestep_map)[t]
    grad = cond_fn(x, t_orig, y=y)
    assert grad.abs().max() > 1e-6
    noise = torch.randn_like(x)
    with torch.no_grad():
        out = diffusion.p_mean_variance(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
        ddim = diffusion.ddim_sample(guided, x, t, cond_fn=cond_fn, model_kwargs=kwargs)["sample"]
        ddpm = diffusion.p_sample(guided, x, t, cond_fn=cond_fn, model_kwargs=kwargs,
                                  randn_like=lambda z: noise)["sample"]

    # DDIM: condition_score on the guided eps, then the eta = 0 update from the recomputed x0.
    abar = diffusion.alphas_cumprod[2]
    abar_prev = diffusion.alphas_cumprod_prev[2]
    eps = (x - abar ** 0.5 * out["pred_xstart"]) / (1 - abar) ** 0.5
    eps_cg = eps - (1 - abar) ** 0.5 * grad
    x0_cg = (x - (1 - abar) ** 0.5 * eps_cg) / abar ** 0.5
    eps_from_x0 = (x - abar ** 0.5 * x0_cg) / (1 - abar) ** 0.5
    expected_ddim = x0_cg * abar_prev ** 0.5 + (1 - abar_prev) ** 0.5 * eps_from_x0
    torch.testing.assert_close(ddim, expected_ddim.float(), atol=2e-5, rtol=1e-4)
    # DDPM: condition_mean, mean + variance * grad, then the posterior sample with the step's noise.
    expected_ddpm = out["mean"] + out["variance"] * grad + torch.exp(0.5 * out["log_variance"]) * noise
    torch.testing.assert_close(ddpm, expected_ddpm.float(), atol=2e-5, rtol=1e-4)

    # Direction: guidance raises the classifier's log-probability of the labels at the next step.
    def log_prob(z):
        with torch.no_grad():
            return torch.log_softmax(classifier(z, t_orig), dim=-1)[torch.arange(2), y]

    with torch.no_grad():
        plain_ddim = diffusion.ddim_sample(guided, x, t, model_kwargs=kwargs)["sample"]
        plain_ddpm = diffusion.p_sample(guided, x, t, model_kwargs=kwargs, randn_like=lambda z: noise)["sample"]
    assert (log_prob(ddim) > log_prob(plain_ddim)).all()
    assert (log_prob(ddpm) > log_prob(plain_ddpm)).all()


# --- conformance with the authors' implementation -------------------------------------------------

@pytest.mark.parametrize("scale, key", [(0.0, "ddim25_base"), (3.0, "ddim25_pag_s3")])
def test_conformance_ddim25(pag_reference, scale, key):
    args = su.model_and_diffusion_defaults()
    args.update(pag_reference["flags"], timestep_respacing="ddim25")
    model, diffusion = su.create_model_and_diffusion(**args)
    load_checkpoint(model, pag_reference["state_dict"])
    guided = pag.guide(model.eval(), pag.GuidanceConfig(pag_scale=scale, pag_layers=pag_reference["layers"]))
    with torch.no_grad():
        out = diffusion.ddim_sample_loop(guided, (2, 3, 32, 32), noise=pag_reference["xT"], clip_denoised=True, eta=0.0)
    assert (out - pag_reference[key]).abs().max().item() < 1e-4  # measured 3e-5


def test_fp16_torso_guided_pass_is_finite_and_close():
    model, _ = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # keep this random net's activations inside fp16's range
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 900])
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS)
    with torch.no_grad():
        full = pag.guide(model, config)(x, t)
        model.dtype = torch.float16
        model.convert_to_fp16()
        half = pag.guide(model, config)(x, t)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert ((half - full).abs().max() / full.abs().max()).item() < 2e-2
