"""One sampling run as one line of stages (issue 20): the defects the duplicated concepts caused, each with its
regression test, and the networks built once per run."""

import dataclasses
import functools
import os

import numpy as np
import pytest
import torch
import yaml

import pag
import sampling
from adm_common.npz import NpzWriter
from guided_diffusion import logger, script_util
from conftest import TINY_MODEL_FLAGS
from sampling import models as models_module
from sampling import sweep
from sampling.lock import RunLocks
from sampling.record import read_run_record, write_run_record
from sampling.settings import RunSettings, resolve_settings, sample_defaults, sampler_label
from sampling.shards import shard_problem

MODEL_FLAGS = TINY_MODEL_FLAGS  # the checkpoint of the `ckpt` fixture (conftest.py)


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    logger.reset()


def settings_for(ckpt, out_dir, **values):
    flags = dict(MODEL_FLAGS, model_path=str(ckpt), out_dir=str(out_dir), num_samples=4, shard_size=2,
                 batch_size=2, timestep_respacing="2", pag_scale=2.0, pag_layers="middle_block.1", seed=3,
                 device="cpu")
    flags.update(values)
    return resolve_settings([("test", flags)])


# ------------------------------------------------------------------------- defect 1: the sampler label, stored


@pytest.mark.parametrize("values, label", [
    (dict(use_ddim=True, timestep_respacing=""), "DDIM-1000"),  # the table derived DDIM-? from disk
    (dict(diffusion_steps=4000, timestep_respacing=""), "DDPM-4000"),  # the table derived DDPM-1000
    (dict(timestep_respacing="ddim25"), "DDIM-25"),
    (dict(timestep_respacing="250"), "DDPM-250"),
])
def test_the_run_record_stores_the_sampler_label_and_the_grouped_values(ckpt, tmp_path, values, label):
    settings = settings_for(ckpt, tmp_path / "run", **values)
    with RunLocks() as locks:
        plan = sampling.prepare(settings, locks=locks)
        write_run_record(plan, torch.device("cpu"))
    record = read_run_record(settings.out_dir)
    assert record["sampler_label"] == sampler_label(settings) == label
    # Every other value a table groups by is in the record as the run had it (a table derives none).
    assert record["settings"]["pag_scale"] == 2.0 and record["settings"]["pag_layers"] == ["middle_block.1"]
    assert record["settings"]["perturbation"] == "identity"


# ------------------------------------------------------- defect 2: one judgement of an out_dir, dry run or not


def _shard(path, start, end, run_id="someone"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with NpzWriter(path) as w:
        w.write("arr_0", np.zeros((end - start, 32, 32, 3), np.uint8))
        w.write("arr_1", np.zeros(end - start, np.int64))
        w.write("sample_range", np.array([start, end], np.int64))
        w.write("run_id", np.array([run_id]))


def test_dry_run_refuses_shards_of_the_recorded_shard_size_as_the_run_does(ckpt, tmp_path):
    settings = settings_for(ckpt, tmp_path / "run", shard_size=4)
    with RunLocks() as locks:
        plan = sampling.prepare(settings, locks=locks)
        write_run_record(plan, torch.device("cpu"))  # the record says shard_size 4
    _shard(tmp_path / "run" / "shards" / "shard_000000.npz", 0, 4, plan.run_id)
    resumed = dataclasses.replace(settings, sampling=dataclasses.replace(settings.sampling, shard_size=2))
    cell = sweep.Cell("run", {}, {}, resumed)
    problems, _ = sweep.check_cell(cell)
    with pytest.raises(sampling.SampleConfigError) as real:
        sampling.prepare(resumed)
    assert problems == [str(real.value)] and "cut with shard_size 4, not 2" in problems[0]


def test_dry_run_and_run_refuse_an_out_dir_that_is_a_file_alike(ckpt, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    settings = settings_for(ckpt, tmp_path / "run")
    problems, _ = sweep.check_cell(sweep.Cell("run", {}, {}, settings))
    with pytest.raises(sampling.SampleConfigError) as real:
        sampling.prepare(settings)
    assert problems == [str(real.value)] == [f"out_dir {tmp_path / 'run'} is not a writable directory: Not a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_dry_run_probes_that_out_dir_is_writable_as_the_run_does(ckpt, tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    (parent / "run").mkdir()
    os.chmod(parent / "run", 0o500)
    os.chmod(parent, 0o500)
    try:
        for out_dir in (parent / "run", parent / "new"):  # one that exists, one the run would make
            cell = sweep.Cell("run", {}, {}, settings_for(ckpt, out_dir))
            problems, _ = sweep.check_cell(cell)
            assert len(problems) == 1 and f"out_dir {out_dir} is not a writable directory" in problems[0], problems
        with pytest.raises(sampling.SampleConfigError, match="is not a writable directory"):
            sampling.prepare(settings_for(ckpt, parent / "run"))
    finally:
        os.chmod(parent, 0o700)
        os.chmod(parent / "run", 0o700)


# ------------------------------------------------------------------ defect 3: a shard's problem is structured


def test_a_shard_problem_carries_the_range_it_holds(tmp_path):
    path = tmp_path / "shard_000001.npz"
    _shard(path, 4, 8, run_id="abc")
    problem = shard_problem(path, 2, 4, 32, "abc")
    assert problem.stored_range == (4, 8) and str(problem).startswith("it holds samples 4-7")
    other = shard_problem(path, 4, 8, 32, "another run")
    assert other.stored_range is None and "written by another run" in str(other)
    assert shard_problem(path, 4, 8, 32, "abc") is None


def test_a_shard_of_another_shard_size_is_refused_whatever_its_message_says(ckpt, tmp_path, monkeypatch):
    """The plan reads the stored range, never the wording of the message."""
    settings = settings_for(ckpt, tmp_path / "run")
    with RunLocks() as locks:
        plan = sampling.prepare(settings, locks=locks)
        write_run_record(plan, torch.device("cpu"))
    _shard(tmp_path / "run" / "shards" / "shard_000001.npz", 2, 6, plan.run_id)  # shard_size 4's second half
    real = shard_problem

    def reworded(*args, **kwargs):
        problem = real(*args, **kwargs)
        return problem and dataclasses.replace(problem, reason="worded otherwise")

    monkeypatch.setattr("sampling.plan.shard_problem", reworded)
    with pytest.raises(sampling.SampleConfigError, match="holds samples 2-5: .* not 2"):
        sampling.prepare(settings)


# ------------------------------------------------------------------ defect 5: one classifier_scale default


def test_classifier_scale_has_one_default():
    assert pag.GuidanceConfig().classifier_scale == RunSettings().guidance.classifier_scale == \
        sample_defaults()["classifier_scale"] == pag.guidance_defaults()["classifier_scale"] == 1.0


# ------------------------------------------------------------------------------------------ dead fields, stages


def test_the_run_plan_has_no_dead_fields():
    names = {f.name for f in dataclasses.fields(sampling.RunPlan)}
    assert not {"device", "lock_held"} & names


def test_a_run_builds_its_networks_once(ckpt, tmp_path, monkeypatch):
    built = {"model": 0, "guided": 0, "diffusion": 0}

    def counting(name, fn):
        @functools.wraps(fn)  # the builders read the signature
        def wrapper(*args, **kwargs):
            built[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(models_module, "create_model", counting("model", models_module.create_model))
    monkeypatch.setattr(script_util, "create_gaussian_diffusion",  # sampling.models builds through script_util
                        counting("diffusion", script_util.create_gaussian_diffusion))
    monkeypatch.setattr(pag, "guide", counting("guided", pag.guide))
    settings = settings_for(ckpt, tmp_path / "run")
    path = sampling.run(settings)
    assert os.path.exists(path) and built == {"model": 1, "guided": 1, "diffusion": 1}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["sampler_label"] == "DDPM-2"
