"""Guidance terms beyond PAG (issue 21): independent condition guidance, adaptive projected guidance, guidance
rescale, and class-balanced labels. First-principles checks on the tiny model of tests/test_pag.py."""

import numpy as np
import pytest
import torch

import pag
import sampling
from guided_diffusion.script_util import NUM_CLASSES
from pag.guidance import AdaptiveProjection, independent_labels
from conftest import TINY_MODEL_FLAGS
from sampling.lock import RunLocks
from sampling.record import read_run_record, write_run_record
from sampling.settings import SampleConfigError, build_settings, resolve_settings, sample_defaults
from test_pag import SMALL_LAYERS, small_model, two_pass_pag

T = torch.tensor([555, 555])  # a step of the respaced "10" schedule (APG and rescale read alpha-bar there)
ROW_SEEDS = torch.tensor([11, 2**40 + 5])


def x0_of(diffusion, x, t, eps):
    """The predicted x0 of ``eps``, from the schedule's alpha-bar (written independently of pag.guidance)."""
    abar = torch.tensor(diffusion.alphas_cumprod[diffusion.timestep_map.index(int(t[0]))], dtype=torch.float32)
    return (x - (1 - abar).sqrt() * eps) / abar.sqrt()


def run(model, x, t=T, diffusion=None, batch_passes=True, **config):
    guided = pag.guide(model, pag.GuidanceConfig(pag_layers=SMALL_LAYERS, **config), diffusion,
                       batch_passes=batch_passes)
    with torch.no_grad():
        return guided(x, t, **({"y": torch.tensor([7, 123])} if model.num_classes else {}),
                      row_seeds=ROW_SEEDS)[:, :3]


# --- ICG ------------------------------------------------------------------------------------------------------

def test_icg_label_draw_is_a_function_of_row_seed_and_step():
    steps = torch.tensor([900, 900, 900])
    seeds = torch.tensor([1, 2, 3])
    labels = independent_labels(seeds, steps, 3, NUM_CLASSES, "cpu")
    assert labels.dtype == torch.long and labels.shape == (3,)
    assert torch.equal(labels, independent_labels(seeds, steps, 3, NUM_CLASSES, "cpu"))  # reproducible
    # Row 2 drawn alone (another batch composition) gets the same class.
    assert independent_labels(seeds[1:2], steps[1:2], 1, NUM_CLASSES, "cpu").item() == labels[1].item()
    many = independent_labels(torch.arange(4000), torch.full((4000,), 500), 4000, NUM_CLASSES, "cpu")
    assert 0 <= many.min() and many.max() < NUM_CLASSES
    assert len(set(many.tolist())) > 900  # spread over the classes, not a handful
    other_step = independent_labels(torch.arange(4000), torch.full((4000,), 499), 4000, NUM_CLASSES, "cpu")
    assert (other_step != many).float().mean() > 0.99  # another step, another draw
    assert independent_labels(torch.arange(50), torch.zeros(50), 50, 3, "cpu").max() == 2  # the given range


def test_icg_at_zero_is_the_conditional_model_and_refused_without_labels():
    model, _ = small_model(class_cond=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x, T, y=torch.tensor([7, 123]))[:, :3]
    assert torch.equal(run(model, x, icg_scale=0.0), plain)
    unconditional, _ = small_model(class_cond=False)
    with pytest.raises(ValueError, match="icg_scale needs a class-conditional model"):
        pag.guide(unconditional, pag.GuidanceConfig(icg_scale=1.0))
    flags = dict(sample_defaults(), out_dir="-", model_path="-", icg_scale=1.0)
    with pytest.raises(SampleConfigError, match="icg_scale 1.0 needs a class-conditional model"):
        build_settings(flags)
    assert build_settings(dict(flags, class_cond=True)).guidance.icg_scale == 1.0


@pytest.mark.parametrize("batch_passes", [True, False])
def test_icg_with_pag_equals_the_separate_passes(batch_passes):
    model, _ = small_model(class_cond=True)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([7, 123])
    got = run(model, x, batch_passes=batch_passes, pag_scale=2.0, icg_scale=1.5)
    y_other = independent_labels(ROW_SEEDS, T, 2, NUM_CLASSES, "cpu")
    assert not torch.equal(y_other, y)
    with torch.no_grad():
        eps = model(x, T, y=y)[:, :3]
        eps_pag = two_pass_pag(model, x, T, SMALL_LAYERS, 2.0, y=y)[:, :3]  # eps + 2 (eps - eps_perturbed)
        eps_other = model(x, T, y=y_other)[:, :3]
    expected = eps_pag + 1.5 * (eps - eps_other)
    assert (got - expected).abs().max() < 1e-5
    assert (got - eps_pag).abs().max() > 1e-2  # the ICG term counts
    # A row does not depend on the batch it is in (y' follows its row seed).
    guided = pag.guide(model, pag.GuidanceConfig(pag_layers=SMALL_LAYERS, pag_scale=2.0, icg_scale=1.5))
    with torch.no_grad():
        alone = guided(x[1:], T[1:], y=y[1:], row_seeds=ROW_SEEDS[1:])[:, :3]
    assert (alone - got[1:]).abs().max() < 1e-5


# --- APG ------------------------------------------------------------------------------------------------------

def test_apg_defaults_are_plain_guidance_exactly():
    model, _ = small_model()
    x = torch.randn(2, 3, 32, 32)
    # No schedule given: the APG code path is skipped entirely at eta 1, no clamp, no momentum.
    assert pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS)).apg is None
    assert torch.equal(run(model, x, pag_scale=3.0, apg_eta=1.0, apg_momentum=0.0, apg_norm_threshold=0.0),
                       run(model, x, pag_scale=3.0))
    # The projection itself with those settings hands the term back (up to rounding).
    term, eps, xt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    abar = torch.tensor([0.3, 0.8]).reshape(2, 1, 1, 1)
    assert torch.allclose(AdaptiveProjection()(term, eps, xt, abar), term, atol=1e-5)
    with pytest.raises(ValueError, match="APG needs the noise schedule"):
        pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS, apg_eta=0.0))


def test_apg_eta_zero_applies_only_the_part_orthogonal_to_the_clean_x0():
    model, diffusion = small_model(respacing="10")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps = model(x, T)[:, :3]
    clean_x0 = x0_of(diffusion, x, T, eps)
    applied = x0_of(diffusion, x, T, run(model, x, diffusion=diffusion, pag_scale=3.0, apg_eta=0.0)) - clean_x0
    plain = x0_of(diffusion, x, T, run(model, x, diffusion=diffusion, pag_scale=3.0)) - clean_x0
    cosine = torch.nn.functional.cosine_similarity(applied.flatten(1), clean_x0.flatten(1), dim=1)
    assert cosine.abs().max() < 1e-4
    assert torch.nn.functional.cosine_similarity(plain.flatten(1), clean_x0.flatten(1), dim=1).abs().min() > 1e-3
    # What remains is plain guidance's term less its projection onto the clean x0.
    along = (plain * clean_x0).flatten(1).sum(1) / (clean_x0 * clean_x0).flatten(1).sum(1)
    assert torch.allclose(applied, plain - along.reshape(2, 1, 1, 1) * clean_x0, atol=1e-4)


def test_apg_clamp_caps_the_term_norm():
    model, diffusion = small_model(respacing="10")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        clean_x0 = x0_of(diffusion, x, T, model(x, T)[:, :3])
    plain_norm = (x0_of(diffusion, x, T, run(model, x, diffusion=diffusion, pag_scale=3.0)) - clean_x0).flatten(1) \
        .norm(dim=1)
    threshold = float(plain_norm.min()) / 2
    capped = x0_of(diffusion, x, T, run(model, x, diffusion=diffusion, pag_scale=3.0,
                                        apg_norm_threshold=threshold)) - clean_x0
    assert torch.allclose(capped.flatten(1).norm(dim=1), torch.full((2,), threshold), rtol=1e-3)
    loose = x0_of(diffusion, x, T, run(model, x, diffusion=diffusion, pag_scale=3.0,
                                       apg_norm_threshold=float(plain_norm.max()) * 2)) - clean_x0
    assert torch.allclose(loose.flatten(1).norm(dim=1), plain_norm, rtol=1e-4)  # under the cap: unchanged


def test_apg_momentum_accumulates_over_steps_and_resets_per_batch():
    model, diffusion = small_model(respacing="10")
    x = torch.randn(2, 3, 32, 32)
    guided = pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=SMALL_LAYERS, apg_momentum=0.5),
                       diffusion)
    with torch.no_grad():
        clean_x0 = x0_of(diffusion, x, T, model(x, T)[:, :3])
        first, second = (x0_of(diffusion, x, T, guided(x, T)[:, :3]) - clean_x0 for _ in range(2))
        guided.start_batch()
        after_reset = x0_of(diffusion, x, T, guided(x, T)[:, :3]) - clean_x0
    assert torch.allclose(second, 1.5 * first, atol=1e-4)  # running = diff + 0.5 * running
    assert torch.allclose(after_reset, first, atol=1e-5)
    with pytest.raises(RuntimeError, match="start_batch"):
        with torch.no_grad():
            guided(x[:1], T[:1])  # another batch without start_batch: refused, not silently mixed
    # A new trajectory of the same shape (a noisier step than the last call) starts afresh without start_batch.
    guided.start_batch()
    later = T - 111  # the next step of the "10" schedule: less noise, the same trajectory goes on
    with torch.no_grad():
        guided(x, T)
        guided(x, later)
        restarted = x0_of(diffusion, x, T, guided(x, T)[:, :3]) - clean_x0
    assert torch.allclose(restarted, first, atol=1e-5)


def test_the_sampler_starts_each_batch_with_fresh_momentum(ckpt):
    flags = dict(sample_defaults(), out_dir="-", model_path=str(ckpt), image_size=32, num_channels=32,
                 num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16,8", num_head_channels=16,
                 class_cond=True, learn_sigma=True, use_scale_shift_norm=True, timestep_respacing="3",
                 pag_scale=2.0, pag_layers="input_blocks.5.1,middle_block.1", apg_momentum=0.5, num_samples=4)
    settings = build_settings(flags)
    sampler = sampling.Sampler(settings, sampling.load_models(settings, torch.device("cpu")), torch.device("cpu"))
    first, _ = sampler.sample([0, 1])
    again, _ = sampler.sample([0, 1])
    assert np.array_equal(first, again)


# --- guidance rescale -----------------------------------------------------------------------------------------

def test_rescale_matches_the_clean_std_at_phi_one_and_is_off_at_zero():
    model, _ = small_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps = model(x, T)[:, :3]
    plain = run(model, x, pag_scale=3.0)
    assert torch.equal(run(model, x, pag_scale=3.0, guidance_rescale=0.0), plain)
    full = run(model, x, pag_scale=3.0, guidance_rescale=1.0)
    assert torch.allclose(full.flatten(1).std(dim=1), eps.flatten(1).std(dim=1), rtol=1e-5)
    assert not torch.allclose(plain.flatten(1).std(dim=1), eps.flatten(1).std(dim=1), rtol=1e-2)
    half = run(model, x, pag_scale=3.0, guidance_rescale=0.5)
    assert torch.allclose(half, (full + plain) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_rescale must lie in"):
        pag.GuidanceConfig(guidance_rescale=1.5)


# --- class-balanced labels ------------------------------------------------------------------------------------

def test_balanced_labels_count_each_class_equally_whoever_draws_them():
    seed, n, classes = 3, 60, 12
    labels = sampling.sample_labels(seed, range(n), classes, balanced_over=n)
    assert np.bincount(labels, minlength=classes).tolist() == [n // classes] * classes
    assert labels.tolist() != sorted(labels.tolist()) and labels.tolist() != [i % classes for i in range(n)]
    in_batches = np.concatenate([sampling.sample_labels(seed, range(i, min(i + 7, n)), classes, balanced_over=n)
                                 for i in range(0, n, 7)])
    assert np.array_equal(in_batches, labels)
    for world in (2, 3):  # each process draws its own indices (strided, as the shards are handed out)
        for rank in range(world):
            indices = list(range(rank, n, world))
            assert np.array_equal(sampling.sample_labels(seed, indices, classes, balanced_over=n), labels[indices])
    other_seed = sampling.sample_labels(seed + 1, range(n), classes, balanced_over=n)
    assert not np.array_equal(other_seed, labels)
    uneven = sampling.sample_labels(seed, range(25), classes, balanced_over=25)  # 25 = 2 * 12 + 1
    assert sorted(np.bincount(uneven, minlength=classes).tolist()) == [2] * 11 + [3]
    with pytest.raises(ValueError, match="samples 0..59"):
        sampling.sample_labels(seed, [60], classes, balanced_over=n)


def test_labels_setting_reaches_the_draws_and_the_identity():
    base = dict(sample_defaults(), out_dir="-", model_path="-", class_cond=True, num_samples=20, num_classes=5)
    random_labels = build_settings(base)
    balanced = build_settings(dict(base, labels="balanced"))
    draws = sampling.sample_draws(balanced, [4, 9], "cpu", with_labels=True)
    assert draws.labels.tolist() == sampling.sample_labels(0, [4, 9], 5, balanced_over=20).tolist()
    assert draws.model_kwargs["y"].tolist() == draws.labels.tolist()
    assert sampling.sample_draws(random_labels, [4, 9], "cpu", True).labels.tolist() == \
        sampling.sample_labels(0, [4, 9], 5).tolist()
    # Random labels and the new guidance settings at their defaults leave the identity as it was (runs resume).
    ident = random_labels.identity("cpu")
    for key in ("labels", "num_samples", "icg_scale", "apg_momentum", "apg_norm_threshold", "apg_eta",
                "guidance_rescale"):
        assert key not in ident
    assert {k: v for k, v in balanced.identity("cpu").items() if k not in ident} == \
        {"labels": "balanced", "num_samples": 20}  # balanced labels depend on num_samples: no extending
    with pytest.raises(SampleConfigError, match="labels must be one of random, balanced"):
        build_settings(dict(base, labels="sorted"))


@pytest.mark.parametrize("labels", ["random", "balanced"])
def test_the_run_record_names_the_labels_and_a_balanced_run_is_not_extended(ckpt, tmp_path, labels):
    def settings(num_samples):
        return resolve_settings([("test", dict(TINY_MODEL_FLAGS, model_path=str(ckpt), out_dir=str(tmp_path / "run"),
                                                num_samples=num_samples, shard_size=2, timestep_respacing="2",
                                                labels=labels, device="cpu"))])

    with RunLocks() as locks:
        write_run_record(sampling.prepare(settings(4), locks=locks), torch.device("cpu"))
    record = read_run_record(tmp_path / "run")
    assert record["labels"] == labels  # what a table shows
    assert record["settings"].get("labels") == ("balanced" if labels == "balanced" else None)
    if labels == "random":
        with RunLocks() as locks:
            assert sampling.prepare(settings(6), locks=locks) is not None  # extended as before
    else:
        with pytest.raises(SampleConfigError, match="num_samples: 4 there, 6 now"):
            with RunLocks() as locks:
                sampling.prepare(settings(6), locks=locks)


def test_a_run_with_a_new_setting_is_not_resumed_with_it_turned_off():
    """The new settings are left out of the identity at their defaults (old runs resume), so turning one off must
    still count as a difference against a run recorded with it on (review finding)."""
    from sampling.settings import build_settings, config_differences, sample_defaults

    def identity(**values):
        flags = dict(sample_defaults(), image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                     attention_resolutions="16,8", num_head_channels=16, learn_sigma=True, class_cond=True,
                     num_classes=10, model_path="m.pt", out_dir="out", pag_scale=3.0,
                     pag_layers="input_blocks.3.1", num_samples=20)
        return build_settings(dict(flags, **values)).identity("cpu")

    plain_run = identity()
    for values in ({"icg_scale": 2.0}, {"labels": "balanced"}, {"guidance_rescale": 0.7}, {"apg_eta": 0.0},
                   {"apg_momentum": -0.5}, {"apg_norm_threshold": 5.0}):
        other = identity(**values)
        key = next(iter(values))
        assert any(line.startswith(f"{key}:") for line in config_differences(other, plain_run)), values
        assert any(line.startswith(f"{key}:") for line in config_differences(plain_run, other)), values
    assert config_differences(plain_run, identity()) == []
    # Unconditional: labels do not apply, so balanced adds nothing (not even num_samples).
    uncond = dict(class_cond=False, icg_scale=0.0)
    assert config_differences(identity(**uncond), identity(**uncond, labels="balanced", num_samples=40)) == []


def test_icg_labels_are_a_stream_of_their_own():
    """y' never repeats a perturbation's draw, whatever perturbation_seed (review finding: seed 454 did)."""
    from pag.guidance import ICG_LABEL_STREAM, independent_labels
    from pag.perturbations import _RowRandom

    rows, steps = torch.arange(64) * 7 + 3, torch.full((64,), 500)
    labels = independent_labels(rows, steps, 64, 1000, "cpu")
    for seed in (0, ICG_LABEL_STREAM, 1):
        bits = _RowRandom(seed, rows, steps)._bits((64,), "cpu")
        assert not torch.equal((bits * 1000) >> 24, labels), seed


def test_icg_and_pag_run_in_one_batched_call():
    """Clean, PAG-perturbed and ICG rows in one call of 3B rows through the rest of the U-Net, the prefix once on
    [x; x] with labels [y; y'] (issue 21 item 4); the sequential mode runs them one after another."""
    model, _ = small_model(class_cond=True)
    x = torch.randn(2, 3, 32, 32)
    sizes = []
    handle = model.out.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[0]))
    first = model.input_blocks[0].register_forward_hook(lambda module, inputs, output: sizes.append(-output.shape[0]))
    try:
        run(model, x, pag_scale=2.0, icg_scale=1.5)
        assert sizes == [-4, 6]  # prefix on 2B rows, the rest on 3B rows: one call
        sizes.clear()
        run(model, x, batch_passes=False, pag_scale=2.0, icg_scale=1.5)
        assert sorted(sizes) == [-2, -2, 2, 2, 2]  # clean and perturbed share a prefix; ICG its own pass
    finally:
        handle.remove()
        first.remove()
