"""Execution fast paths give the plain path's numbers: compute dtypes, channels_last, torch.compile (once per kind
of call, not per step). The sampler's noise stream is unchanged, it reads nothing back from the device per sample,
and the settings sit in the right groups (dtype in the run identity only where it changes the numbers)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import pag
import sampling
from benchmarks.end_to_end import HostReads  # host reads of tensor values (each waits for a GPU)
from guided_diffusion import script_util as su
from sampling import process as process_module
from sampling import models as models_module
from sampling.models import load_models, set_compute_dtype
from sampling.settings import build_settings, config_differences, sample_defaults

LAYERS = ["input_blocks.3.1", "input_blocks.5.1", "middle_block.1"]
MODEL_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                   attention_resolutions="16,8", num_head_channels=16, learn_sigma=True)


def small_model(class_cond=False, scale=0.05):
    torch.manual_seed(0)
    model = su.create_model(**MODEL_FLAGS, class_cond=class_cond, use_scale_shift_norm=True)
    with torch.no_grad():  # ADM zero-initialises output and attention projections: make every layer count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval().requires_grad_(False)


def guided_out(model, x, t, **options):
    config = pag.GuidanceConfig(pag_scale=3.0, pag_layers=LAYERS)
    with torch.no_grad():
        return pag.guide(model, config, **options)(x, t)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([100, 900])


# ------------------------------------------------------------------------------------------ dtype, channels_last


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_compute_dtype_matches_float32(dtype, tolerance, inputs):
    model = small_model()
    x, t = inputs
    full = guided_out(model, x, t)
    low = set_compute_dtype(copy.deepcopy(model), dtype)
    assert low.dtype == dtype and low.input_blocks[1][0].in_layers[2].weight.dtype == dtype
    assert low.time_embed[0].weight.dtype == torch.float32 and low.out[2].weight.dtype == torch.float32
    got = guided_out(low, x, t)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err = rel_err(got, full)
    assert 0 < err < tolerance, err  # measured: bfloat16 1.5e-2, float16 2e-3
    back = set_compute_dtype(low, "float32")
    assert back.dtype == torch.float32 and back.input_blocks[1][0].in_layers[2].weight.dtype == torch.float32


def test_float16_is_upstreams_use_fp16_conversion(inputs):
    model = small_model()
    x, t = inputs[0][:1], inputs[1][:1]
    upstream = copy.deepcopy(model)
    upstream.convert_to_fp16()
    upstream.dtype = torch.float16  # what create_model(use_fp16=True) sets
    ours = set_compute_dtype(copy.deepcopy(model), "float16")
    with torch.no_grad():
        assert torch.equal(ours(x, t), upstream(x, t))
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        set_compute_dtype(model, torch.float64)


def test_channels_last_matches_plain(inputs):
    model = small_model()
    x, t = inputs
    plain = guided_out(model, x, t)
    converted = copy.deepcopy(model)
    got = guided_out(converted, x, t, channels_last=True)
    weight = converted.input_blocks[1][0].in_layers[2].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert rel_err(got, plain) < 1e-5
    sequential = guided_out(converted, x, t, channels_last=True, batch_passes=False)
    assert rel_err(sequential, plain) < 1e-5


# ------------------------------------------------------------------------------------------ the sampler


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast_ckpt") / "tiny.pt"
    torch.save(small_model(class_cond=True).state_dict(), path)
    return path


def settings_for(ckpt, out_dir, **values):
    flags = dict(sample_defaults(), **MODEL_FLAGS, class_cond=True, use_scale_shift_norm=True,
                 model_path=str(ckpt), out_dir=str(out_dir), timestep_respacing="6", pag_scale=2.0,
                 pag_layers=",".join(LAYERS), guidance_interval="0,600", seed=3)
    flags.update(values)
    return build_settings(flags)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_sampler_matches_and_compiles_once_per_kind_of_call(ckpt, tmp_path, monkeypatch, fresh_dynamo):
    """6 steps: 4 guided (the prefix, then the rest on [x; x]) and 2 outside the guidance interval (the rest from
    stage 0 on x): three graphs, none compiled again for a later step or batch. With channels_last on top."""
    device = torch.device("cpu")
    plain_settings = settings_for(ckpt, tmp_path)
    plain = sampling.Sampler(plain_settings, load_models(plain_settings, device), device)
    expected, _ = plain.sample([0, 1])

    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them as they are
    monkeypatch.setattr(models_module, "COMPILE_OPTIONS", {"backend": counter})
    fast_settings = settings_for(ckpt, tmp_path, compile=True, channels_last=True)
    fast = sampling.Sampler(fast_settings, load_models(fast_settings, device), device)
    calls = []
    fast.model_fn = (lambda fn: lambda x, t, **kw: calls.append(int(t[0])) or fn(x, t, **kw))(fast.model_fn)
    got, _ = fast.sample([0, 1])
    assert calls == [999, 799, 599, 400, 200, 0]  # unguided twice, then guided
    assert counter.frame_count == 3, counter.frame_count  # prefix; rest on [x; x]; rest from stage 0
    again, _ = fast.sample([2, 3])  # the same kinds of call: nothing compiled again
    assert counter.frame_count == 3
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(again.astype(int) - got.astype(int)).mean() > 10  # other samples


def test_noise_stream_is_the_per_sample_generators(ckpt, tmp_path):
    """Row j of every draw comes from sample indices[j]'s generator seeded (seed, index): the stream that existing
    runs were sampled with (one torch.randn per sample and draw, stacked)."""
    settings = settings_for(ckpt, tmp_path)
    device = torch.device("cpu")
    sampler = sampling.Sampler(settings, load_models(settings, device), device)
    indices = [3, 5, 8]
    randn_like = sampler.draws(indices).randn_like
    like = torch.empty(3, 3, 32, 32)
    first, second = randn_like(like), randn_like(like)
    generators = [torch.Generator().manual_seed(sampling.sample_seeds(settings.sampling.seed, i)[0]) for i in indices]
    old_first = torch.stack([torch.randn((3, 32, 32), generator=g) for g in generators])
    old_second = torch.stack([torch.randn((3, 32, 32), generator=g) for g in generators])
    assert torch.equal(first, old_first) and torch.equal(second, old_second)
    assert first.device == device and first.dtype == torch.float32
    assert torch.equal(sampler.draws([5]).randn_like(like[:1]), old_first[1:2])  # sample 5 alone: the same noise
    with pytest.raises(RuntimeError, match="noise requested for 2 rows, the batch has 3"):
        randn_like(like[:2])


def test_no_device_reads_per_sample_and_tensors_on_the_device(ckpt, tmp_path):
    """With a random perturbation (per-sample row seeds) the host reads per step do not grow with the batch (row
    seeds on the device cost one read per sample and step), and what the sampler hands the model is on its device."""
    settings = settings_for(ckpt, tmp_path, perturbation="random_mask", timestep_respacing="3",
                            guidance_interval="0,1000")
    device = torch.device("cpu")
    sampler = sampling.Sampler(settings, load_models(settings, device), device)
    seen = []

    def record(fn):
        def wrapped(x, t, **kwargs):
            seen.append((x.device, t.device, kwargs["y"].device, kwargs["row_seeds"]))
            return fn(x, t, **kwargs)
        return wrapped

    sampler.model_fn = record(sampler.model_fn)
    reads = {}
    for batch in (1, 3):
        with HostReads() as mode:
            sampler.sample(list(range(batch)))
        reads[batch] = mode.count
    assert reads[1] == reads[3] > 0, reads
    assert all(d == device for x, t, y, _ in seen for d in (x, t, y))
    # Row seeds: one int64 tensor on the device per batch (made once, not per step), the samples' row seeds.
    assert all(r.device == device and r.dtype == torch.int64 for *_, r in seen)
    assert len({id(r) for *_, r in seen}) == 2 and seen[-1][3].tolist() == [
        sampling.sample_seeds(settings.sampling.seed, i)[2] for i in range(3)]


def test_each_rank_samples_on_its_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(process_module.dist_util, "dev", lambda: torch.device("cuda", 3))
    base = settings_for("m.pt", "out")
    for name, expected in (("", "cuda:3"), ("cuda", "cuda:3"), ("cuda:1", "cuda:1"), ("cpu", "cpu")):
        s = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, device=name))
        assert str(process_module.resolve_device(s)) == expected


# ------------------------------------------------------------------------------------------ settings


def test_settings_groups_and_run_identity():
    base = settings_for("m.pt", "out")
    upstream_fp16 = settings_for("m.pt", "out", use_fp16=True)
    for s in (base, upstream_fp16):
        ident = s.identity("cpu")
        assert not {"dtype", "compile", "channels_last", "noise_scheme"} & set(ident)
    assert base.compute_dtype == "float32" and upstream_fp16.compute_dtype == "float16"
    # Pure execution choices are runtime settings: the identity (and so resumption) ignores them.
    fast = settings_for("m.pt", "out", compile=True, channels_last=True, batch_size=7)
    assert fast.identity("cpu") == base.identity("cpu") and fast.runtime.compile and fast.runtime.channels_last
    # Naming upstream's own choice changes nothing; another dtype is a different run.
    assert settings_for("m.pt", "out", use_fp16=True, dtype="float16").identity("cuda") == \
        upstream_fp16.identity("cuda")
    other = settings_for("m.pt", "out", use_fp16=True, dtype="bfloat16").identity("cuda")
    assert other["dtype"] == "bfloat16"
    assert config_differences(upstream_fp16.identity("cuda"), other) == ["dtype: <unset> there, 'bfloat16' now"]
    assert config_differences(other, upstream_fp16.identity("cuda")) == [
        "dtype: 'bfloat16' there, upstream's (use_fp16) now"]
    assert settings_for("m.pt", "out", dtype="float32").identity("cpu") == base.identity("cpu")
    with pytest.raises(sampling.SampleConfigError, match="dtype must be one of float16, bfloat16, float32"):
        settings_for("m.pt", "out", dtype="half")


def test_load_models_applies_the_compute_dtype(ckpt, tmp_path, inputs):
    device = torch.device("cpu")
    cache = {}
    default = load_models(settings_for(ckpt, tmp_path, use_fp16=True), device, cache).model
    named = load_models(settings_for(ckpt, tmp_path, use_fp16=True, dtype="float16"), device, cache).model
    assert named is default and default.dtype == torch.float16  # the same conversion: one cached model
    full = load_models(settings_for(ckpt, tmp_path, use_fp16=True, dtype="float32"), device, cache).model
    bf16 = load_models(settings_for(ckpt, tmp_path, dtype="bfloat16"), device, cache).model
    layout = load_models(settings_for(ckpt, tmp_path, use_fp16=True, channels_last=True), device, cache).model
    assert full.dtype == torch.float32 and full.input_blocks[1][0].in_layers[2].weight.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16 and bf16.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert len({id(m) for m in (default, full, bf16, layout)}) == 4  # channels_last models are not shared
    x, t = inputs
    y = torch.tensor([1, 2])
    with torch.no_grad():
        assert rel_err(default(x, t, y=y), full(x, t, y=y)) < 1e-2
