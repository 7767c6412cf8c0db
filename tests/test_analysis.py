"""The analysis library (analysis/) and scripts/analyze.py on tiny random models: the sampler's samples, shapes,
files and CSV columns, guidance-term sizes recomputed by hand from one guided step, zero curves at s = 0."""

import csv
import math
import re

import numpy as np
import pytest
import torch

import analysis
import pag
from analysis import cli as analysis_cli
from analysis.report import COMPARE_COLUMNS, CURVE_COLUMNS, ENTROPY_COLUMNS
from analysis.trace import STATS, TraceOptions, _AttentionProbe, shown_step_numbers
from guided_diffusion.script_util import call_with, create_classifier, create_model, diffusion_from
from sampling.models import load_models
from sampling.sampler import Sampler, sample_labels, sample_seeds
from sampling.settings import resolve_settings

FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
             num_head_channels=16, class_cond=True, learn_sigma=True, diffusion_steps=1000)
LAYERS = "input_blocks.3.1,middle_block.1"
CPU = torch.device("cpu")


def random_weights(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # proj_out starts at zero: random everywhere, so attention matters
            p.copy_(torch.randn_like(p) * 0.15)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random class-conditional model saved as a checkpoint, and a settings builder for it."""
    root = tmp_path_factory.mktemp("tiny")
    path = root / "model.pt"

    def settings(**values):
        merged = dict(FLAGS, model_path=str(path), out_dir=str(root / "out"), num_samples=8, num_classes=10,
                      timestep_respacing="ddim6", use_ddim=True, batch_size=2, pag_layers=LAYERS, pag_scale=2.0)
        merged.update(values)
        return resolve_settings([("test", merged)])

    torch.save(random_weights(call_with(create_model, settings().flat()), 0).state_dict(), path)
    return {"root": root, "path": path, "settings": settings, "models": load_models(settings(), CPU)}


def rms(x):
    return x.flatten(1).pow(2).mean(dim=1).sqrt()


def test_attention_maps_are_taken_at_the_shown_steps_of_a_chunk_with_strip_samples_only(tiny, monkeypatch):
    asked, start = [], _AttentionProbe.start

    def recording_start(probe, rows, want_maps):
        asked.append(want_maps)
        start(probe, rows, want_maps)

    monkeypatch.setattr(_AttentionProbe, "start", recording_start)
    result = analysis.trace(tiny["settings"](), tiny["models"], CPU, [0, 1, 2],
                            options=TraceOptions(shown_steps=3, strip_rows=[0]))
    assert result.shown == [0, 2, 5]
    # Batches of 2: samples 0 and 1 (the strip sample 0 among them), then sample 2 (no strip sample).
    assert asked == [step in result.shown for step in range(6)] + [False] * 6


def test_trace_samples_as_the_sampler_and_shapes(tiny):
    settings = tiny["settings"]()
    indices = [0, 2, 5]
    result = analysis.trace(settings, tiny["models"], CPU, indices,
                            options=TraceOptions(shown_steps=4, queries=2, strip_rows=[0, 2]))
    images, labels = Sampler(settings, tiny["models"], CPU).sample(indices)
    assert np.array_equal(result.samples, images) and np.array_equal(result.labels, labels)
    steps = 6
    assert result.timesteps == sorted(result.timesteps, reverse=True) and len(result.timesteps) == steps
    assert result.shown == shown_step_numbers(steps, 4) == [0, 2, 3, 5]
    assert set(result.stats) == set(STATS) and all(v.shape == (steps, 3) for v in result.stats.values())
    for key in ("x_t", "x0_clean", "x0_perturbed", "x0_guided"):
        assert result.images[key].shape == (4, 2, 3, 16, 16)
    assert result.images["pag_term"].shape == (4, 2, 1, 16, 16)
    blocks = ["input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"]
    assert list(result.entropy) == blocks and result.tokens == {b: 64 for b in blocks}
    for block in blocks:
        assert result.entropy[block].shape == (steps, 3)
        assert (result.entropy[block] > 0).all() and (result.entropy[block] <= math.log(64) + 1e-6).all()
        assert result.maps[block].shape == (4, 2, 2, 64)
        assert torch.allclose(result.maps[block].sum(dim=-1), torch.ones(4, 2, 2), atol=1e-5)  # rows of a softmax
    assert result.query_tokens["middle_block.1"] == [4 * 8 + 4, 2 * 8 + 2]
    # x_T of the strip samples is the sampler's, from sample_seeds
    for row, index in zip(result.strip_rows, result.strip_indices):
        g = torch.Generator().manual_seed(sample_seeds(settings.sampling.seed, index)[0])
        assert torch.equal(result.images["x_t"][0, result.strip_rows.index(row)], torch.randn((3, 16, 16), generator=g))
    assert np.all(result.stats["pag_rms"] > 0) and np.all(result.stats["pag_scale"] == 2.0)
    assert np.all((result.stats["guidance_share"] > 0) & (result.stats["guidance_share"] < 1))


def recompute_pag_rms(model, x, t, labels, row_seeds, scale, kind="identity"):
    """One guided step by hand: the clean pass, the perturbed pass, s * (eps - eps_perturbed) per sample."""
    y = torch.from_numpy(labels)
    with torch.no_grad():
        eps = model(x, t, y=y)[:, :3]
        with pag.perturbed_attention(model, LAYERS, kind, row_seeds=row_seeds):
            eps_perturbed = model(x, t, y=y)[:, :3]
    return rms(scale * (eps - eps_perturbed)), rms(eps)


def test_csv_norms_equal_those_of_one_guided_step_by_hand(tiny, tmp_path):
    settings = tiny["settings"]()
    indices = [1, 3]
    out = analysis.analyze(settings, tiny["models"], CPU, str(tmp_path), indices,
                           options=TraceOptions(shown_steps=3))
    rows = list(csv.DictReader(open(tmp_path / "identity" / "curves.csv")))
    assert tuple(rows[0]) == CURVE_COLUMNS and len(rows) == 6
    result = out["traces"]["identity"]
    seeds = [sample_seeds(settings.sampling.seed, i) for i in indices]
    labels = sample_labels(settings.sampling.seed, indices, 10)
    row_seeds = tuple(r for _, _, r in seeds)
    model = tiny["models"].model
    checked = 0
    for j, step in enumerate(result.shown):
        x = result.images["x_t"][j]
        if step == 0:  # x_T from the sampler's seeds, independently of the trace
            x_T = torch.stack([torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(s[0]))
                               for s in seeds])
            assert torch.equal(x, x_T)
        t = torch.full((2,), result.timesteps[step])
        pag_rms, eps_rms = recompute_pag_rms(model, x, t, labels, row_seeds, 2.0)
        row = rows[step]
        assert int(row["timestep"]) == result.timesteps[step] and int(row["n"]) == 2
        assert float(row["pag_rms"]) == pytest.approx(float(pag_rms.mean()), rel=1e-4)
        assert float(row["eps_rms"]) == pytest.approx(float(eps_rms.mean()), rel=1e-4)
        assert float(row["pag_rms"]) > 1e-3
        checked += 1
    assert checked == 3
    assert row["sag_rms"] == row["cg_rms"] == "0" and row["cos_pag_cg"] == ""


def test_scale_zero_curves_are_zero_and_the_perturbed_x0_is_still_shown(tiny, tmp_path):
    settings = tiny["settings"](pag_scale=0.0)
    out = analysis.analyze(settings, tiny["models"], CPU, str(tmp_path), [0, 1], kinds=["identity", "seg"],
                           options=TraceOptions(shown_steps=2))
    for kind in ("identity", "seg"):
        rows = list(csv.DictReader(open(tmp_path / kind / "curves.csv")))
        for row in rows:
            for key in ("pag_scale", "pag_rms", "sag_rms", "cg_rms", "guidance_share"):
                assert float(row[key]) == 0.0, (kind, key, row)
        result = out["traces"][kind]
        assert float(result.images["pag_term"].abs().max()) == 0.0
        assert (result.images["x0_perturbed"] - result.images["x0_clean"]).abs().max() > 1e-3
    # s = 0 is the unguided sampler, and both kinds give the same trajectory
    assert np.array_equal(out["traces"]["identity"].samples, out["traces"]["seg"].samples)


def test_cli_writes_every_file_with_its_columns_and_links_them(tiny):
    root = tiny["root"]
    flags = [f"--{k}={v}" for k, v in FLAGS.items()]
    argv = flags + ["--model_path", str(tiny["path"]), "--num_classes", "10", "--pag_scale", "1.5",
                    "--pag_layers", LAYERS, "--timestep_respacing", "ddim4", "--use_ddim", "True", "--device",
                    "cpu", "--analysis_dir", str(root / "analysis"), "--name", "cli", "--indices", "0-1",
                    "--curve_samples", "3", "--kinds", "identity,seg", "--compare_kinds", "identity,uniform,skip",
                    "--blocks", "middle_block.*", "--shown_steps", "3", "--seg_sigma", "1.0"]
    assert analysis_cli.main(argv) == 0
    out = root / "analysis" / "cli"
    for kind in ("identity", "seg"):
        names = {p.name for p in (out / kind).iterdir()}
        assert names == {"strip_0.png", "strip_1.png", "attention_0.png", "attention_1.png", "curves.csv",
                         "curves.png", "entropy.csv", "entropy.png"}
        curves = list(csv.DictReader(open(out / kind / "curves.csv")))
        assert tuple(curves[0]) == CURVE_COLUMNS and len(curves) == 4 and curves[0]["n"] == "3"
        entropy = list(csv.DictReader(open(out / kind / "entropy.csv")))
        assert tuple(entropy[0]) == ENTROPY_COLUMNS and {r["block"] for r in entropy} == {"middle_block.1"}
        assert all(0 < float(r["normalized_entropy"]) <= 1 for r in entropy)
    assert {"compare_x0_0.png", "compare_x0_1.png", "compare_x0.csv", "compare_curves.csv",
            "compare_curves.png"} <= {p.name for p in out.iterdir()}
    change = list(csv.DictReader(open(out / "compare_x0.csv")))
    assert [r["kind"] for r in change] == ["identity"] * 3 + ["uniform"] * 3 + ["skip"] * 3
    assert all(float(r["x0_rms_change"]) > 0 for r in change)
    compare = list(csv.DictReader(open(out / "compare_curves.csv")))
    assert tuple(compare[0]) == COMPARE_COLUMNS and {r["kind"] for r in compare} == {"identity", "seg"}
    summary = (out / "summary.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", summary)
    assert len(links) == 2 * 8 + 5 and all((out / link).is_file() for link in links)
    assert "--seg_sigma 1.0" in summary
    # seg's curves differ from identity's: the kinds are really different runs
    seg = [float(r["pag_rms"]) for r in compare if r["kind"] == "seg"]
    identity = [float(r["pag_rms"]) for r in compare if r["kind"] == "identity"]
    assert seg != identity
    bad = argv[:-2] + ["--indices", "x"]
    assert analysis_cli.main(bad) == 2


def test_parse_indices():
    assert analysis_cli.parse_indices("0,2-4,2") == [0, 2, 3, 4]
    with pytest.raises(ValueError):
        analysis_cli.parse_indices("-1")


def test_sag_and_classifier_terms(tmp_path):
    """With SAG and classifier guidance on (a 64 x 64 tiny model and classifier): each term is recorded, the CG
    term is -sqrt(1 - abar) * scale * grad log p(y | x_t) and its cosine with the PAG term is computed."""
    flags = dict(FLAGS, image_size=64, channel_mult="1,1,2,2", attention_resolutions="8")
    settings = resolve_settings([("test", dict(
        flags, model_path=str(tmp_path / "m.pt"), classifier_path=str(tmp_path / "c.pt"), classifier_width=32,
        classifier_depth=1, classifier_attention_resolutions="8", classifier_scale=2.0, out_dir="-",
        num_classes=10, timestep_respacing="ddim3", use_ddim=True, pag_layers="middle_block.1", pag_scale=1.0,
        sag_scale=0.5, sag_layer="output_blocks.1.1"))])
    torch.save(random_weights(call_with(create_model, settings.flat()), 1).state_dict(), tmp_path / "m.pt")
    torch.save(random_weights(call_with(create_classifier, settings.flat()), 2).state_dict(), tmp_path / "c.pt")
    models = load_models(settings, CPU)
    result = analysis.trace(settings, models, CPU, [0, 1], options=TraceOptions(shown_steps=1, blocks=[]))
    assert result.cg_on and (result.stats["sag_rms"] > 0).all() and (result.stats["cg_rms"] > 0).all()
    cos = result.stats["cos_pag_cg"]
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1 + 1e-9).all()
    # step 0 by hand: x_T, the classifier's gradient at the first timestep
    x = result.images["x_t"][0]
    t = torch.full((2,), result.timesteps[0])
    y = torch.from_numpy(sample_labels(settings.sampling.seed, [0, 1], 10))
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        log_p = torch.log_softmax(models.classifier(x_in, t), dim=-1)[torch.arange(2), y].sum()
        grad = torch.autograd.grad(log_p, x_in)[0] * 2.0
    abar = float(diffusion_from(settings.flat()).alphas_cumprod[-1])
    expected = rms(-math.sqrt(1 - abar) * grad)
    assert result.stats["cg_rms"][0] == pytest.approx(expected.double().numpy(), rel=1e-4)


NEW_TERMS = ("icg_rms", "apg_rms", "rescale_rms", "icg_share", "apg_share", "rescale_share")


def test_icg_term_equals_one_guided_step_by_hand_and_corrections_are_zero(tiny):
    """icg_scale on: the traced ICG RMS is w * RMS(eps - eps(y')) recomputed by hand with the sampler's y'; with
    no APG and rescale 0 their correction columns are 0; the samples are the sampler's."""
    settings = tiny["settings"](icg_scale=1.5)
    indices = [1, 3]
    result = analysis.trace(settings, tiny["models"], CPU, indices, options=TraceOptions(shown_steps=3, blocks=[]))
    assert set(NEW_TERMS) <= set(CURVE_COLUMNS)
    images, _ = Sampler(settings, tiny["models"], CPU).sample(indices)
    assert np.array_equal(result.samples, images)
    labels = sample_labels(settings.sampling.seed, indices, 10)
    row_seeds = torch.tensor([sample_seeds(settings.sampling.seed, i)[2] for i in indices])
    model = tiny["models"].model
    for j, step in enumerate(result.shown):
        x = result.images["x_t"][j]
        t = torch.full((2,), result.timesteps[step])
        other = pag.guidance.independent_labels(row_seeds, t, 2, 10, "cpu")  # the sampler's num_classes, 10
        assert not torch.equal(other, torch.from_numpy(labels))
        with torch.no_grad():
            eps = model(x, t, y=torch.from_numpy(labels))[:, :3]
            eps_other = model(x, t, y=other)[:, :3]
        expected = rms(1.5 * (eps - eps_other))
        assert result.stats["icg_rms"][step] == pytest.approx(expected.double().numpy(), rel=1e-4)
        pag_rms, _ = recompute_pag_rms(model, x, t, labels, tuple(row_seeds.tolist()), 2.0)
        assert result.stats["pag_rms"][step] == pytest.approx(pag_rms.double().numpy(), rel=1e-4)
    assert (result.stats["icg_rms"] > 1e-3).all()
    assert ((result.stats["icg_share"] > 0) & (result.stats["icg_share"] < 1)).all()
    for key in ("apg_rms", "rescale_rms", "apg_share", "rescale_share"):
        assert (result.stats[key] == 0).all(), key
    row = result.curve_rows()[0]
    assert row["apg_rms"] == row["rescale_share"] == 0.0 and row["icg_rms"] > 0


def test_observer_reports_the_plain_sum_the_apg_and_the_rescale_stages(tiny):
    """APG eta 0 and rescale 0.7 on one guided call: guided is the plain sum, projected = guided + APG's correction
    with the applied term orthogonal to the clean x0 (in x0 space), applied = rescale of projected, the output."""
    settings = tiny["settings"](apg_eta=0.0, guidance_rescale=0.7)
    models = tiny["models"]
    guided = pag.guide(models.model, settings.guidance, diffusion=models.diffusion)
    seen = {}
    guided.observer = lambda **values: seen.update(values)
    torch.manual_seed(3)
    step = 3  # of the 6 DDIM steps: its original timestep and alpha-bar
    t = torch.full((2,), int(models.diffusion.timestep_map[step]))
    abar = float(models.diffusion.alphas_cumprod[step])
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    with torch.no_grad():
        out = guided(x, t, y=y, row_seeds=torch.tensor([5, 6]))
    eps = seen["eps"]
    assert set(seen) >= {"guided", "pag", "sag", "icg", "projected", "applied"} and seen["icg"] is None
    assert torch.equal(seen["guided"], pag.guidance.guidance_step(eps, seen["pag"]))
    assert torch.equal(seen["applied"], out[:, :3])
    assert torch.equal(seen["applied"], pag.guidance.rescale_guidance(seen["projected"], eps, 0.7))
    correction = seen["projected"] - seen["guided"]
    assert float(rms(correction).min()) > 1e-4
    clean_x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    applied_x0_move = -math.sqrt((1 - abar) / abar) * (seen["projected"] - eps)
    cosine = (applied_x0_move * clean_x0).flatten(1).sum(1) / (
        applied_x0_move.flatten(1).norm(dim=1) * clean_x0.flatten(1).norm(dim=1))
    assert cosine.abs().max() < 1e-4


def test_apg_and_rescale_corrections_are_traced(tiny):
    """APG eta 0 and rescale 0.7: both corrections are non-zero at every step, their shares in (0, 1), no ICG;
    the samples are the sampler's (the trace replays the same APG momentum and rescale)."""
    settings = tiny["settings"](apg_eta=0.0, guidance_rescale=0.7)
    result = analysis.trace(settings, tiny["models"], CPU, [0, 2], options=TraceOptions(shown_steps=2, blocks=[]))
    images, _ = Sampler(settings, tiny["models"], CPU).sample([0, 2])
    assert np.array_equal(result.samples, images)
    for key in ("apg_rms", "rescale_rms", "apg_share", "rescale_share"):
        assert (result.stats[key] > 1e-6).all(), key
    assert ((result.stats["apg_share"] < 1) & (result.stats["rescale_share"] < 1)).all()
    assert (result.stats["icg_rms"] == 0).all() and (result.stats["icg_share"] == 0).all()
