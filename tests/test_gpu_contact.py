"""What the first GPU run would hit, caught without a GPU (issue 19).

torch's ``meta`` device raises where a CUDA run would mix a host tensor in or read a device value back on the host,
and builds the real ADM-256 at full width in no memory; ``HostReads`` counts the value reads that synchronise on CUDA;
``LiveBytes`` counts the activation bytes a call keeps alive. Also: every cell of a sweep runs compiled, and random
perturbations draw on the device, afresh at every step.
"""

import math

import numpy as np
import pytest
import torch
import yaml
from torch._dynamo.testing import CompileCounter

import pag
from benchmarks.end_to_end import HostReads
from benchmarks.memory import memory_table, peak_bytes
from benchmarks.models import ARCHS, TIMESTEP, build, diffusion_flags, step_inputs
from benchmarks.timing import guided_variants, naive_two_pass
from guided_diffusion import logger
from guided_diffusion import script_util as su
from pag.guidance import guidance_step
from pag.perturbations import _RowRandom
from sampling import models as models_module
from sampling import sweep

LAYERS = ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1"]
FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16,8",
             num_head_channels=16, learn_sigma=True, use_scale_shift_norm=True)


def tiny(device="cpu", class_cond=False, respacing="ddim4"):
    torch.manual_seed(0)
    with torch.device(device):
        model, diffusion = su.create_model_and_diffusion(**dict(su.model_and_diffusion_defaults(), **FLAGS,
                                                                class_cond=class_cond, timestep_respacing=respacing))
    if device == "cpu":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval().requires_grad_(False), diffusion


# ------------------------------------------------------------------------------------------ placement on meta


def test_guidance_step_takes_a_scale_from_the_host():
    eps, away = torch.zeros(2, 3, 4, 4, device="meta"), torch.zeros(2, 3, 4, 4, device="meta")
    out = guidance_step(eps, (away, torch.full((2,), 3.0)))  # a host scale meets a device eps
    assert out.device.type == "meta" and out.shape == eps.shape
    real = guidance_step(torch.ones(2, 3), (torch.zeros(2, 3), torch.tensor([1.0, 2.0], dtype=torch.float64)))
    assert torch.equal(real, torch.tensor([[2.0] * 3, [3.0] * 3]))


@pytest.mark.parametrize("kind", pag.perturbation_names())
@pytest.mark.parametrize("batch_passes", [True, False])
def test_a_guided_sampling_step_runs_on_meta(kind, batch_passes):
    """Every tensor on ``meta``: a host tensor mixed in or a host read of a device value raises."""
    model, diffusion = tiny("meta", class_cond=True)
    guided = pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=LAYERS, perturbation=kind),
                       diffusion=diffusion, batch_passes=batch_passes)
    x = torch.zeros(2, 3, 32, 32, device="meta")
    t = torch.tensor([3, 3], device="meta")
    kwargs = {"y": torch.tensor([1, 2], device="meta"), "row_seeds": torch.tensor([5, 6], device="meta")}
    ddim = diffusion.ddim_sample(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
    ddpm = diffusion.p_sample(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
    for out in (ddim, ddpm):
        assert out["sample"].device.type == "meta" and out["sample"].shape == (2, 3, 32, 32)


def test_step_inputs_are_one_seeded_call_with_labels_only_for_a_class_conditional_model():
    cond, uncond = diffusion_flags(ARCHS[1], tiny=True), diffusion_flags(ARCHS[0], tiny=True)
    x, t, kwargs = step_inputs(cond, 3, "cpu")
    assert x.shape == (3, 3, 64, 64) and torch.equal(x, step_inputs(cond, 3, "cpu")[0])  # seeded: the same x
    assert t.tolist() == [TIMESTEP] * 3 and kwargs["y"].tolist() == [0, 0, 0]
    assert step_inputs(uncond, 2, "cpu")[2] == {}
    x, t, kwargs = step_inputs(cond, 2, "meta")
    assert x.device.type == t.device.type == kwargs["y"].device.type == "meta"


def test_the_real_adm256_engine_and_benchmark_steps_run_on_meta():
    """The paper's network at full width (no memory on meta) through every step function gpu-check times."""
    flags = dict(diffusion_flags(ARCHS[1], tiny=False), use_fp16=False)
    model, _, _ = build("diffusion", flags, "meta", seed=0)
    layers = pag.resolve_layers(model, pag.PAPER_LAYERS_256)
    x, t = torch.zeros(2, 3, 256, 256, device="meta"), torch.full((2,), 500, device="meta")
    kwargs = {"y": torch.zeros(2, dtype=torch.long, device="meta")}
    for name, fn in guided_variants(model, layers, x, t, kwargs, doubled=True).items():
        assert fn().shape[1:] == (6, 256, 256), name
    uncond, _, _ = build("diffusion", dict(diffusion_flags(ARCHS[0], tiny=False), use_fp16=False), "meta", seed=0)
    assert naive_two_pass(uncond, layers)(x, t).device.type == "meta"


# ------------------------------------------------------------------------------------------ host reads


def test_a_constant_scale_pag_step_reads_nothing_back():
    model, diffusion = tiny()  # unconditional: on the CPU the label range check reads the labels (on CUDA it does not)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([2, 2])
    kwargs = {"row_seeds": torch.tensor([5, 6])}
    for kind in ("identity", "random_mask"):
        guided = pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=LAYERS, perturbation=kind),
                           diffusion=diffusion)
        with torch.no_grad(), HostReads() as reads:
            diffusion.ddim_sample(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
            diffusion.p_sample(guided, x, t, clip_denoised=True, model_kwargs=kwargs)
        assert reads.count == 0, kind
    # An interval decides per row on the device and reads that decision back once per call: the counter sees it.
    interval = pag.guide(model, pag.GuidanceConfig(pag_scale=3.0, pag_layers=LAYERS, guidance_interval=[0, 600]))
    with torch.no_grad(), HostReads() as reads:
        interval(x, torch.tensor([700, 700]))
    assert reads.count == 1


def test_coefficient_tables_are_copied_to_a_device_once():
    _, diffusion = tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    from guided_diffusion.gaussian_diffusion import _extract_into_tensor

    for name in ("posterior_mean_coef1", "sqrt_recipm1_alphas_cumprod", "alphas_cumprod_prev"):
        assert torch.equal(diffusion._coef(name, t, x.shape), _extract_into_tensor(getattr(diffusion, name), t, x.shape))
    assert torch.equal(diffusion._coef("log_betas", t, x.shape), _extract_into_tensor(np.log(diffusion.betas), t, x.shape))
    tables = dict(diffusion._device_tables)
    diffusion._coef("posterior_mean_coef1", t, x.shape)
    assert diffusion._device_tables[("posterior_mean_coef1", t.device)] is tables[("posterior_mean_coef1", t.device)]
    diffusion._coef("posterior_mean_coef1", t.to("meta"), x.shape)
    assert ("posterior_mean_coef1", torch.device("meta")) in diffusion._device_tables


# ------------------------------------------------------------------------------------------ activation memory


def test_the_batched_engine_keeps_no_more_alive_than_an_unguided_call_at_twice_the_batch():
    """Real CPU tensors, the ADM-256 topology (every block, the paper's layers) at reduced width."""
    flags = dict(diffusion_flags(ARCHS[0], tiny=False), num_channels=64)  # 32x32 inputs below: the same blocks
    model, _, _ = build("diffusion", dict(flags, use_fp16=False), "cpu", seed=0)
    layers = pag.resolve_layers(model, pag.PAPER_LAYERS_256)
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 500)
    peaks = {name: peak_bytes(fn) for name, fn in guided_variants(model, layers, x, t, {}, doubled=True).items()}
    assert peaks["engine"] <= 1.05 * peaks["unguided_2b"], peaks
    assert peaks["unguided"] < peaks["engine_sequential"] < peaks["engine"], peaks
    # The engine's output equals the plain two-pass formula (memory was not bought with a wrong answer).
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers=layers)
    with torch.no_grad():
        assert torch.allclose(pag.guide(model, config)(x, t), naive_two_pass(model, layers)(x, t), atol=1e-5)


def test_meta_memory_table_of_the_real_widths():
    table = memory_table((8,))
    (row,) = table["rows"]
    assert row["engine"] <= 1.001 * row["unguided_2b"]
    assert 1.9 < row["unguided_2b"] / row["unguided"] < 2.05
    assert 3.0 < row["unguided"] < 3.8  # GiB at batch 8, float16 torso (3.4 measured)


# ------------------------------------------------------------------------------------------ compile per sweep cell


def test_every_cell_of_a_twelve_cell_sweep_runs_compiled(tmp_path, monkeypatch):
    model, _ = tiny(class_cond=True)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    graphs, current = {}, {"cell": None}

    def backend(gm, example_inputs):  # counts the graphs handed to it, per cell, and runs them as they are
        graphs[current["cell"]] = graphs.get(current["cell"], 0) + 1
        return gm.forward

    monkeypatch.setattr(models_module, "COMPILE_OPTIONS", {"backend": backend})
    made = []

    def mark_cell(fn):  # the sweep builds one model function per cell, in cell order
        index = len(made)
        made.append(index)

        def wrapped(*args, **kwargs):
            current["cell"] = index
            return fn(*args, **kwargs)
        return wrapped

    flags = {k: v for k, v in FLAGS.items()}
    doc = {"out_dir": str(tmp_path / "out"),
           "base": dict(flags, class_cond=True, model_path=str(ckpt), num_samples=2, shard_size=2, batch_size=2,
                        timestep_respacing="2", pag_layers=LAYERS, seed=1, compile=True, device="cpu"),
           "grid": {"pag_scale": [float(s) for s in range(1, 13)]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = sweep.load_sweep(str(path))
    try:
        sweep.run_sweep(cfg, sweep.expand(cfg), model_wrapper=mark_cell)
    finally:
        logger.reset()
    assert len(made) == 12
    # Two graphs per cell (the shared prefix and the batched rest), none of them skipped after the eighth.
    assert graphs == {i: 2 for i in range(12)}, graphs


# ------------------------------------------------------------------------------------------ random draws


def test_random_draws_depend_on_seed_row_and_step_only():
    shape = (3, 2, 16, 16)
    rows = torch.tensor([7, 8, 2**40 + 9])
    steps = torch.tensor([500, 500, 500])
    draw = _RowRandom(4, rows, steps).rand(shape, "cpu")
    assert torch.equal(draw, _RowRandom(4, rows, steps).rand(shape, "cpu"))
    # Row 2 alone (another batch) draws what it drew in the batch.
    assert torch.equal(_RowRandom(4, rows[2:], steps[2:]).rand((1, 2, 16, 16), "cpu"), draw[2:])
    # Another step, seed or row seed: another draw; so is the next draw of the same function (the next block).
    for other in (_RowRandom(4, rows, steps - 20), _RowRandom(5, rows, steps), _RowRandom(4, rows + 1, steps)):
        assert (other.rand(shape, "cpu") != draw).float().mean() > 0.99
    rng = _RowRandom(4, rows, steps)
    rng.rand(shape, "cpu")
    assert (rng.rand(shape, "cpu") != draw).float().mean() > 0.99
    # Rows are not copies of each other, and the same integers give the same draws on any device.
    assert (draw[0] != draw[1]).float().mean() > 0.99
    meta = _RowRandom(4, rows.to("meta"), steps.to("meta")).rand(shape, "meta")
    assert meta.device.type == "meta" and meta.shape == shape


def test_random_draws_have_the_right_distribution():
    u = _RowRandom(0, steps=3).rand((4, 250_000), "cpu")
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 2e-3 and abs(u.var() - 1 / 12) < 2e-3
    assert abs((u < 0.3).float().mean() - 0.3) < 3e-3
    assert abs(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]) < 0.01  # neighbours independent
    z = _RowRandom(1, steps=3).randn((4, 250_000), "cpu")
    assert abs(z.mean()) < 1e-2 and abs(z.std() - 1) < 1e-2 and torch.isfinite(z).all()
    assert abs((z.abs() < 1.959964).float().mean() - 0.95) < 3e-3


def test_random_perturbation_changes_from_step_to_step_in_a_guided_model():
    model, _ = tiny()
    x = torch.randn(2, 3, 32, 32)
    config = pag.GuidanceConfig(pag_scale=2.0, pag_layers=LAYERS, perturbation="random_mask", drop_rate=0.5)
    seen = []
    guided = pag.guide(model, config)
    guided.observer = lambda **values: seen.append(values["pag"][0])
    rows = torch.tensor([11, 12])
    with torch.no_grad():
        for t in (500, 499, 500):
            guided(x, torch.full((2,), t), row_seeds=rows)
    assert torch.equal(seen[0], seen[2])  # the same (seed, sample, step): the same mask
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # another step: another mask (the input is the same)
    assert math.isfinite(float(seen[1].abs().max()))


def test_runs_of_random_kinds_recorded_before_per_step_draws_are_not_resumed():
    """A random kind's shards drawn once per sample (before 2026-12) must not be merged with per-step ones: the run
    identity names the draws, so an old record differs; deterministic kinds keep their identity (and resume)."""
    from sampling.settings import build_settings, config_differences, sample_defaults

    def identity(**values):
        flags = dict(sample_defaults(), **FLAGS, model_path="m.pt", out_dir="out", pag_scale=3.0, pag_layers=LAYERS)
        return build_settings(dict(flags, **values)).identity("cpu")

    new = identity(perturbation="random_mask")
    old = {k: v for k, v in new.items() if k != "perturbation_draws"}
    assert config_differences(old, new) == ["perturbation_draws: <unset> there, 'per step, on the device' now"]
    assert "perturbation_draws" not in identity(perturbation="identity")
    assert "perturbation_draws" not in identity(perturbation="random_mask", pag_scale=0.0)  # PAG off: unused
