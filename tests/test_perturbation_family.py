"""The attention-perturbation family (seg, uniform, skip, temperature): each against its definition on a tiny,
hand-checkable attention problem, and how they enter settings, flags and run identities."""

import copy
import math

import pytest
import torch

import pag
from guided_diffusion.attention import AttentionOverride, skip_block
from guided_diffusion.unet import AttentionBlock
from pag.perturbations import seg_blur_grid, seg_kernel_size

from test_pag import SMALL_LAYERS, small_model, two_pass_pag


def grid_qkv(tokens=9, ch=2, heads=1, seed=3):
    torch.manual_seed(seed)
    return tuple(torch.randn(1, heads, tokens, ch) for _ in range(3))


def softmax_attention(q, k, v, temperature=1.0):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(logits / temperature, dim=-1) @ v


# --- seg ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, side, size", [(1.0, 16, 7), (10.0, 16, 17), (10.0, 3, 3), (0.3, 16, 3),
                                               (0.5, 16, 3), (1 / 6, 16, 1), (2.0, 8, 9), (2.0, 7, 7)])
def test_seg_kernel_size_follows_the_authors_rule(sigma, side, size):
    # ceil(6 sigma), made odd by adding one when even, capped at side (odd) or side + 1 (even).
    assert seg_kernel_size(sigma, side) == size


def test_seg_blurs_the_queries_over_the_grid_by_hand():
    q, k, v = grid_qkv()  # 9 tokens: a 3 x 3 grid, row-major
    sigma = 0.5  # ceil(3) = 3 taps at -1, 0, 1
    got = pag.make_attention_fn("seg", pag.PerturbationParams(seg_sigma=sigma))(q, k, v)
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    blurred_q = torch.zeros_like(q)
    for c in range(q.shape[-1]):
        image = q[0, 0, :, c].reshape(3, 3)
        # reflect padding by one: index -1 -> 1, index 3 -> 1
        reflect = [1, 0, 1, 2, 1]
        padded = image[reflect][:, reflect]
        for i in range(3):
            for j in range(3):
                blurred_q[0, 0, 3 * i + j, c] = (padded[i:i + 3, j:j + 3] * torch.outer(g, g)).sum()
    assert not torch.allclose(blurred_q, q, atol=1e-3)
    assert torch.allclose(got, softmax_attention(blurred_q, k, v), atol=1e-6)


def test_seg_blur_is_per_channel_and_per_head():
    q, k, v = grid_qkv(tokens=16, ch=3, heads=2)
    got = pag.make_attention_fn("seg", pag.PerturbationParams(seg_sigma=1.0))(q, k, v)
    for h in range(2):  # each head alone gives the same as within the batch of heads
        alone = pag.make_attention_fn("seg", pag.PerturbationParams(seg_sigma=1.0))(
            q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1])
        assert torch.allclose(got[:, h:h + 1], alone, atol=1e-6)


def test_seg_infinite_sigma_is_one_shared_map_from_the_mean_query():
    q, k, v = grid_qkv(tokens=16)
    got = pag.make_attention_fn("seg", pag.PerturbationParams(seg_sigma=1e5))(q, k, v)  # above 9999
    mean_q = q.mean(dim=-2, keepdim=True)
    expected = softmax_attention(mean_q, k, v).expand_as(v)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got, got[:, :, :1].expand_as(got), atol=1e-6)  # every token the same output
    inf = pag.make_attention_fn("seg", pag.PerturbationParams(seg_sigma=float("inf")))(q, k, v)
    assert torch.allclose(inf, expected, atol=1e-6)
    # A finite sigma, however large, is not the mean: the kernel is capped at the grid and reflect-padded,
    # but it shrinks the queries' spread over the grid.
    grid = q[0, 0].T.reshape(1, 2, 4, 4)
    for sigma in (1.0, 1000.0):
        blurred = seg_blur_grid(grid, sigma)
        assert blurred.flatten(2).std(dim=-1).max() < 0.8 * grid.flatten(2).std(dim=-1).min()
        assert torch.allclose(blurred.mean(dim=(-1, -2)), grid.mean(dim=(-1, -2)), atol=0.3)


def test_seg_refuses_a_non_square_grid_and_bad_sigma():
    q, k, v = grid_qkv(tokens=6)
    with pytest.raises(ValueError, match="square"):
        pag.make_attention_fn("seg")(q, k, v)
    with pytest.raises(ValueError, match="seg_sigma must be > 0"):
        pag.GuidanceConfig(perturbation="seg", seg_sigma=0.0)


# --- uniform, temperature ----------------------------------------------------------------------------

def test_uniform_outputs_the_mean_of_v_without_scores():
    q, k, v = grid_qkv()
    got = pag.make_attention_fn("uniform")(q * float("nan"), k * float("nan"), v)
    assert torch.allclose(got, (torch.full((9, 9), 1 / 9) @ v[0, 0])[None, None], atol=1e-6)
    assert torch.allclose(got[0, 0, 4], v[0, 0].mean(dim=0), atol=1e-6)


def test_temperature_divides_the_logits():
    q, k, v = grid_qkv()
    params = pag.PerturbationParams(attention_temperature=2.5)
    got = pag.make_attention_fn("temperature", params)(q, k, v)
    logits = (q @ k.transpose(-1, -2))[0, 0] / math.sqrt(2)
    weights = torch.exp(logits / 2.5)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    assert torch.allclose(got[0, 0], weights @ v[0, 0], atol=1e-6)
    one = pag.make_attention_fn("temperature", pag.PerturbationParams(attention_temperature=1.0))(q, k, v)
    assert torch.allclose(one, softmax_attention(q, k, v), atol=1e-6)
    hot = pag.make_attention_fn("temperature", pag.PerturbationParams(attention_temperature=1e6))(q, k, v)
    assert torch.allclose(hot, pag.make_attention_fn("uniform")(q, k, v), atol=1e-5)
    with pytest.raises(ValueError, match="attention_temperature"):
        pag.GuidanceConfig(perturbation="temperature", attention_temperature=0.0)


# --- skip ------------------------------------------------------------------------------------------

def random_block(seed=0):
    torch.manual_seed(seed)
    block = AttentionBlock(32, num_heads=2)
    with torch.no_grad():
        for p in block.parameters():  # proj_out starts at zero: make the residual branch non-trivial
            p.copy_(torch.randn_like(p) * 0.3)
    return block.eval()


def test_skip_makes_the_block_return_its_input_per_row():
    block = random_block()
    x = torch.randn(4, 32, 4, 4)
    with torch.no_grad():
        normal = block(x)
        assert (normal - x).abs().max() > 1e-2
        block.override = AttentionOverride(skip_block, rows="second_half")
        half = block(x)
        block.override = AttentionOverride(skip_block, rows=torch.tensor([True, False, True, False]))
        picked = block(x)
        block.override = AttentionOverride(skip_block)
        every = block(x)
    assert torch.equal(half[2:], x[2:]) and torch.allclose(half[:2], normal[:2], atol=1e-6)
    assert torch.equal(picked[[0, 2]], x[[0, 2]]) and torch.allclose(picked[[1, 3]], normal[[1, 3]], atol=1e-6)
    assert torch.equal(every, x)
    assert AttentionOverride(pag.make_attention_fn("identity")).block_skip_mask(4, "cpu") is None


def test_skip_equals_a_block_without_its_residual_branch():
    model, _ = small_model()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    # The definition, built by hand: zero the block's output projection (weight and bias), so x + proj(h) = x.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_submodule("middle_block.1").proj_out.weight.zero_()
        reference.get_submodule("middle_block.1").proj_out.bias.zero_()
        expected = reference(x, t)
        with pag.perturbed_attention(model, ["middle_block.1"], kind="skip"):
            got = model(x, t)
        assert (model(x, t) - expected).abs().max() > 1e-3  # restored, and skipping matters
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind, params", [("skip", {}), ("seg", {"seg_sigma": 2.0}), ("uniform", {}),
                                          ("temperature", {"attention_temperature": 3.0})])
def test_engine_with_the_family_equals_two_passes(kind, params):
    model, _ = small_model()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([400, 400])
    config = pag.GuidanceConfig(pag_scale=2.0, pag_layers=SMALL_LAYERS, perturbation=kind, **params)
    with torch.no_grad():
        got = pag.guide(model, config)(x, t)
        with pag.perturbed_attention(model, SMALL_LAYERS, kind, **params):
            perturbed = model(x, t)
        clean = model(x, t)
    expected = torch.cat([clean[:, :3] + 2.0 * (clean[:, :3] - perturbed[:, :3]), clean[:, 3:]], dim=1)
    assert torch.allclose(got, expected, atol=1e-5)
    if kind == "skip":
        assert torch.allclose(got, two_pass_pag(model, x, t, SMALL_LAYERS, 2.0, kind), atol=1e-5)


# --- settings, flags, identity -------------------------------------------------------------------------

def test_new_parameters_are_fields_flags_and_only_in_the_identity_of_runs_using_them():
    from sampling.cli import build_sample_parser
    from sampling.settings import build_settings, sample_defaults

    fields = pag.GuidanceConfig().to_dict()
    assert fields["seg_sigma"] == 10.0 and fields["attention_temperature"] == 2.0
    flags = build_sample_parser().format_help()
    assert "--seg_sigma" in flags and "--attention_temperature" in flags

    def identity(**values):
        return build_settings(dict(sample_defaults(), out_dir="-", model_path="-", **values)).identity("cpu")

    old_kind = identity(pag_scale=3.0, perturbation="blur")
    assert "seg_sigma" not in old_kind and "attention_temperature" not in old_kind
    assert "seg_sigma" not in identity(pag_scale=0.0)
    seg = identity(pag_scale=3.0, perturbation="seg", seg_sigma=4.0)
    assert seg["seg_sigma"] == 4.0 and "attention_temperature" not in seg and "blur_sigma" not in seg
    assert identity(pag_scale=3.0, perturbation="temperature")["attention_temperature"] == 2.0
    # An unused kind's parameter changes nothing in a run's identity.
    assert identity(pag_scale=3.0, perturbation="identity", seg_sigma=3.0) == identity(pag_scale=3.0)


def test_readme_table_is_the_registry():
    """The perturbation table of docs/api.md is generated from the registry (docs cannot drift from the code)."""
    from pathlib import Path

    from pag.perturbations import registry_markdown

    readme = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    assert registry_markdown() in readme


def test_parameters_are_given_by_flag_name_only():
    assert pag.PerturbationParams(blur_sigma=2.0).value("blur_sigma") == 2.0
    with pytest.raises(ValueError, match="unknown perturbation parameter 'sigma'; known: .*blur_sigma"):
        pag.PerturbationParams(sigma=2.0)
