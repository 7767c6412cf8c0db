"""Issue 21, items 1-3: SoftPAG's ``soft`` map, per-head perturbation (``pag_heads``) and TPG's ``shuffle``, each
against its definition on a random attention block and the tiny model."""

import pytest
import torch

import pag
from guided_diffusion.attention import AttentionOverride
from guided_diffusion.unet import AttentionBlock

from test_pag import SMALL_LAYERS, small_model


def random_block(channels=32, heads=4, seed=0):
    torch.manual_seed(seed)
    block = AttentionBlock(channels, num_heads=heads)
    with torch.no_grad():
        for p in block.parameters():  # proj_out starts at zero: make the residual branch non-trivial
            p.copy_(torch.randn_like(p) * 0.3)
    return block.eval()


def attention_output(block, x, override=None):
    """The block's attention output before its projection, (N, heads, tokens, head_channels), and its output."""
    seen = []
    handle = block.attention.register_forward_hook(lambda module, args, out: seen.append(out))
    block.override = override
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        block.override = None
        handle.remove()
    h = seen[0]  # (N, heads * ch, T), head-major channels
    n, _, tokens = h.shape
    return h.reshape(n, block.num_heads, block.head_channels, tokens).transpose(-1, -2), out


def qkv_of(block, x):
    with torch.no_grad():
        return block.split_qkv(block.qkv(block.norm(x.reshape(x.shape[0], x.shape[1], -1))))


def soft(alpha):
    return pag.make_attention_fn("soft", soft_alpha=alpha)


# --- soft -----------------------------------------------------------------------------------------------------

def test_soft_interpolates_between_the_models_attention_and_the_identity():
    block, x = random_block(), torch.randn(2, 32, 4, 4)
    normal, normal_out = attention_output(block, x)
    q, k, v = qkv_of(block, x)
    assert (normal - v).abs().max() > 1e-2  # the identity map makes a difference here
    zero, zero_out = attention_output(block, x, AttentionOverride(soft(0.0)))
    one, _ = attention_output(block, x, AttentionOverride(soft(1.0)))
    half, _ = attention_output(block, x, AttentionOverride(soft(0.5)))
    identity, _ = attention_output(block, x, AttentionOverride(pag.make_attention_fn("identity")))
    assert torch.equal(zero, normal) and torch.equal(zero_out, normal_out)
    assert torch.equal(one, identity) and torch.allclose(one, v, atol=1e-6)
    assert torch.allclose(half, (normal + identity) / 2, atol=1e-6)
    # The map definition, built by hand: (1 - a) softmax(q k^T / sqrt(d)) + a I.
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    by_map = (0.25 * weights + 0.75 * torch.eye(q.shape[2])) @ v
    assert torch.allclose(soft(0.75)(q, k, v), by_map, atol=1e-5)


def test_soft_at_one_never_reads_the_scores():
    q, k, v = torch.full((1, 2, 4, 8), float("nan")), torch.full((1, 2, 4, 8), float("inf")), torch.randn(1, 2, 4, 8)
    assert torch.equal(soft(1.0)(q, k, v), v)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_soft_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ValueError, match="soft_alpha must lie in \\[0, 1\\]"):
        pag.GuidanceConfig(perturbation="soft", soft_alpha=alpha)


# --- pag_heads ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, params", [("identity", {}), ("soft", {"soft_alpha": 0.5}), ("uniform", {}),
                                          ("random_mask", {"drop_rate": 0.5}), ("shuffle", {})])
def test_all_heads_is_the_whole_block_and_one_head_leaves_the_others_alone(kind, params):
    block, x = random_block(), torch.randn(2, 32, 4, 4)
    normal, _ = attention_output(block, x)

    def fn():  # a fresh function per pass: random kinds' draws advance with each call
        return pag.make_attention_fn(kind, **params)

    whole, whole_out = attention_output(block, x, AttentionOverride(fn()))
    every, every_out = attention_output(block, x, AttentionOverride(fn(), heads=(0, 1, 2, 3)))
    assert torch.equal(every, whole) and torch.equal(every_out, whole_out)
    one, _ = attention_output(block, x, AttentionOverride(fn(), heads=(2,)))
    others = [0, 1, 3]
    assert torch.allclose(one[:, others], normal[:, others], atol=1e-6)
    assert (one[:, 2] - normal[:, 2]).abs().max() > 1e-2  # head 2 is perturbed
    if not pag.REGISTRY[kind].random:  # a head perturbed alone is that head of the whole-block perturbation
        assert torch.allclose(one[:, 2], whole[:, 2], atol=1e-6)
    # Per row, too: the override's rows and heads combine.
    rows = torch.tensor([False, True])
    picked, _ = attention_output(block, x, AttentionOverride(fn(), rows=rows, heads=(2,)))
    assert torch.allclose(picked[0], normal[0], atol=1e-6)
    assert torch.allclose(picked[1, others], normal[1, others], atol=1e-6)


def test_pag_heads_are_checked_against_every_perturbed_block():
    model, _ = small_model()  # every attention block has 4 heads
    pag.guide(model, pag.GuidanceConfig(pag_scale=1.0, pag_layers=SMALL_LAYERS, pag_heads=[3, 0]))
    with pytest.raises(ValueError, match=r"pag_heads \[1, 4\]: attention block input_blocks.3.1 has 4 heads"):
        pag.guide(model, pag.GuidanceConfig(pag_scale=1.0, pag_layers=SMALL_LAYERS, pag_heads=[1, 4]))
    with pytest.raises(ValueError, match=r"attention block middle_block.1 has 4 heads"):
        with pag.perturbed_attention(model, ["middle_block.1"], heads=[5]):
            pass
    with pytest.raises(ValueError, match="skip.*cannot be limited to heads"):
        pag.GuidanceConfig(pag_scale=1.0, perturbation="skip", pag_heads=[0])
    with pytest.raises(ValueError, match="must be distinct"):
        pag.GuidanceConfig(pag_heads=[1, 1])
    with pytest.raises(ValueError, match="integers >= 0"):
        pag.GuidanceConfig(pag_heads=[-1])
    assert pag.GuidanceConfig(pag_heads="0, 2").pag_heads == [0, 2]
    assert pag.GuidanceConfig(pag_heads="").pag_heads == []


def test_pag_heads_is_a_flag_and_in_the_identity_only_with_pag():
    from sampling.settings import build_settings, sample_defaults, to_command

    def settings(**values):
        return build_settings(dict(sample_defaults(), out_dir="-", model_path="-", **values))

    heads = settings(pag_scale=3.0, pag_heads="0,1")
    assert heads.guidance.pag_heads == [0, 1] and heads.identity("cpu")["pag_heads"] == [0, 1]
    assert "--pag_heads 0,1" in to_command(heads)
    assert "pag_heads" not in settings(pag_scale=0.0, pag_heads="0,1").identity("cpu")
    assert settings(pag_scale=3.0, pag_heads=[2]).guidance.pag_heads == [2]  # YAML lists


def test_a_sweep_over_single_heads_is_one_grid_line(ckpt, tmp_path):
    from sampling import sweep

    from test_sweep import write_sweep

    cfg = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out",
                                       grid={"pag_heads": [[0], [1], [2], [3]]}))
    cells = sweep.expand(cfg)
    assert len(cells) == 4
    assert [c.settings.flat()["pag_heads"] for c in cells] == [[0], [1], [2], [3]]
    assert len({c.name for c in cells}) == 4 and all("pag_heads" in c.name for c in cells)


# --- shuffle --------------------------------------------------------------------------------------------------

def shuffle(row_seeds=None, steps=None, seed=0):
    return pag.make_attention_fn("shuffle", perturbation_seed=seed, row_seeds=row_seeds, steps=steps)


def test_shuffle_permutes_the_tokens_of_the_attention_output():
    block, x = random_block(), torch.randn(2, 32, 4, 4)
    normal, normal_out = attention_output(block, x)
    got, got_out = attention_output(block, x, AttentionOverride(shuffle()))
    n, heads, tokens, ch = got.shape
    # One permutation per row, the same for every head: compare whole token vectors (all heads' channels).
    vectors = got.permute(0, 2, 1, 3).reshape(n, tokens, heads * ch)
    expected = normal.permute(0, 2, 1, 3).reshape(n, tokens, heads * ch)
    for row in range(n):
        assert not torch.allclose(vectors[row], expected[row], atol=1e-4)  # the order changed
        a = sorted(map(tuple, vectors[row].tolist()))
        b = sorted(map(tuple, expected[row].tolist()))
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)  # the multiset did not
    assert torch.allclose(got.norm(dim=(-1, -2)), normal.norm(dim=(-1, -2)), atol=1e-5)  # norm-preserving
    # The residual keeps the unshuffled input: out - x is the projection of the permuted attention.
    with torch.no_grad():
        branch = block.proj_out(got.transpose(-1, -2).reshape(n, heads * ch, tokens))
    assert torch.allclose(got_out.reshape(n, 32, tokens), x.reshape(n, 32, tokens) + branch, atol=1e-5)
    assert not torch.allclose(got_out, normal_out, atol=1e-3)


def test_shuffle_is_a_function_of_seed_row_and_step():
    block, x = random_block(), torch.randn(3, 32, 4, 4)
    q, k, v = qkv_of(block, x)
    rows, t = torch.tensor([7, 11, 13]), torch.tensor([500, 500, 500])
    first = shuffle(rows, t)(q, k, v)
    assert torch.equal(shuffle(rows, t)(q, k, v), first)  # same inputs, same output
    assert not torch.equal(shuffle(rows, torch.tensor([499] * 3))(q, k, v), first)  # another step
    assert not torch.equal(shuffle(rows, t, seed=1)(q, k, v), first)  # another seed
    alone = shuffle(rows[1:2], t[1:2])(q[1:2], k[1:2], v[1:2])
    assert torch.equal(alone, first[1:2])  # a row alone is the row in a batch
    fn = shuffle(rows, t)
    fn(q, k, v)
    assert not torch.equal(fn(q, k, v), first)  # the next block of a pass draws another permutation


# --- the engine -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, params, heads", [("soft", {"soft_alpha": 0.3}, []), ("shuffle", {}, []),
                                                 ("identity", {}, [1]), ("shuffle", {}, [0]),
                                                 ("soft", {"soft_alpha": 0.7}, [0, 1])])
@pytest.mark.parametrize("batch_passes", [True, False])
def test_engine_with_the_new_kinds_equals_two_passes(kind, params, heads, batch_passes):
    model, _ = small_model()
    x, t, rows = torch.randn(2, 3, 32, 32), torch.tensor([400, 300]), torch.tensor([5, 9])
    config = pag.GuidanceConfig(pag_scale=2.0, pag_layers=SMALL_LAYERS, perturbation=kind, pag_heads=heads,
                                **params)
    with torch.no_grad():
        got = pag.guide(model, config, batch_passes=batch_passes)(x, t, row_seeds=rows)
        with pag.perturbed_attention(model, SMALL_LAYERS, kind, row_seeds=rows, steps=t, heads=heads, **params):
            perturbed = model(x, t)
        clean = model(x, t)
    expected = torch.cat([clean[:, :3] + 2.0 * (clean[:, :3] - perturbed[:, :3]), clean[:, 3:]], dim=1)
    assert (perturbed - clean).abs().max() > 1e-4  # well above the tolerance once scaled by 2
    assert torch.allclose(got, expected, atol=1e-5)


def test_per_head_identity_on_every_head_is_pag():
    model, _ = small_model()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([400, 400])
    with torch.no_grad():
        plain = pag.guide(model, pag.GuidanceConfig(pag_scale=2.0, pag_layers=["middle_block.1"]))(x, t)
        heads = pag.guide(model, pag.GuidanceConfig(pag_scale=2.0, pag_layers=["middle_block.1"],
                                                    pag_heads=[0, 1, 2, 3]))(x, t)
        one = pag.guide(model, pag.GuidanceConfig(pag_scale=2.0, pag_layers=["middle_block.1"], pag_heads=[0]))(x, t)
    assert torch.equal(heads, plain)
    assert (one - plain).abs().max() > 1e-4
