"""scripts/sweep.py / sampling.sweep: grid expansion, cell names, dry run, resumable runs, the
evaluation seam, and a sweep under mpiexec."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sampling
from guided_diffusion import logger
from sampling import cli, sweep, sweep_evaluation
from sampling.settings import SampleConfigError

from processes import clean_env
from conftest import TINY_MODEL_FLAGS

ROOT = Path(__file__).resolve().parents[1]
MODEL_FLAGS = TINY_MODEL_FLAGS  # the checkpoint of the `ckpt` fixture (conftest.py)


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    logger.reset()  # runs log into their out_dir: close it, later tests log elsewhere


def write_sweep(path, ckpt, out_dir, grid=None, **extra):
    doc = {
        "out_dir": str(out_dir),
        "base": dict(MODEL_FLAGS, model_path=str(ckpt), num_samples=4, shard_size=2, batch_size=2,
                     timestep_respacing="4", pag_layers=["middle_block.1"], seed=3),
        "grid": grid if grid is not None else {
            "pag_scale": [0, 2],
            "sampler": [{"name": "ddpm4", "timestep_respacing": "4"},
                        {"name": "ddim3", "timestep_respacing": "ddim3", "use_ddim": True}],
        },
    }
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grid_expands_into_named_cells(ckpt, tmp_path):
    cfg = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out"))
    cells = sweep.expand(cfg)
    assert [c.name for c in cells] == ["pag_scale-0__sampler-ddpm4", "pag_scale-0__sampler-ddim3",
                                       "pag_scale-2__sampler-ddpm4", "pag_scale-2__sampler-ddim3"]
    by_name = {c.name: c.settings.flat() for c in cells}
    s = by_name["pag_scale-2__sampler-ddim3"]
    assert s["pag_scale"] == 2.0 and s["use_ddim"] is True and s["timestep_respacing"] == "ddim3"
    assert s["out_dir"] == str(tmp_path / "out" / "pag_scale-2__sampler-ddim3")
    assert s["num_samples"] == 4 and s["pag_layers"] == ["middle_block.1"] and s["seed"] == 3
    s = by_name["pag_scale-0__sampler-ddpm4"]
    assert s["pag_scale"] == 0.0 and s["use_ddim"] is False and s["timestep_respacing"] == "4"

    # list-valued settings, overriding base, unnamed bundles, and a sweep without a grid
    cells = sweep.expand(sweep.load_sweep(write_sweep(
        tmp_path / "t.yaml", ckpt, tmp_path / "out",
        grid={"pag_layers": [["input_blocks.5.1", "middle_block.1"], "middle_block.1"],
              "schedule": [{"pag_schedule": "linear", "pag_scale_end": 1.0}, {"pag_schedule": "constant"}]})))
    assert [c.name for c in cells] == [
        "pag_layers-input_blocks.5.1+middle_block.1__schedule-0", "pag_layers-input_blocks.5.1+middle_block.1__schedule-1",
        "pag_layers-middle_block.1__schedule-0", "pag_layers-middle_block.1__schedule-1"]
    assert cells[0].settings.flat()["pag_layers"] == ["input_blocks.5.1", "middle_block.1"]
    assert cells[0].settings.flat()["pag_schedule"] == "linear" and cells[1].settings.flat()["pag_scale_end"] == 0.0
    cells = sweep.expand(sweep.load_sweep(write_sweep(tmp_path / "u.yaml", ckpt, tmp_path / "out", grid={})))
    assert [c.name for c in cells] == ["base"]

    long_name = sweep.cell_name({"pag_layers": ["input_blocks.%d.1" % i for i in range(40)]})
    assert len(long_name) <= sweep.MAX_NAME and "/" not in long_name


BAD_SWEEPS = {
    "unknown top-level key": ({"gird": {}}, "unknown key(s) in sweep config"),
    "unknown base key": ({"base": {"pag_scal": 1}}, "pag_scal (did you mean pag_scale?)"),
    "scalar grid value": ({"grid": {"pag_scale": 2}}, "grid.pag_scale must be a non-empty list"),
    "unknown axis": ({"grid": {"pag_scales": [1, 2]}}, "grid.pag_scales is not a setting"),
    "unknown bundle key": ({"grid": {"s": [{"use_ddmi": True}]}}, "use_ddmi (did you mean use_ddim?)"),
    "axis overlap": ({"grid": {"pag_scale": [1], "s": [{"pag_scale": 2}]}}, "pag_scale is set by both"),
    "out_dir in base": ({"base": {"out_dir": "x"}}, "out_dir cannot be set in base or grid"),
    "bad value": ({"grid": {"num_samples": [0]}}, "cell num_samples-0: num_samples must be positive"),
    "same names": ({"grid": {"s": [{"name": "a", "pag_scale": 1}, {"name": "a", "pag_scale": 2}]}},
                   "same directory name"),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_configs(case, ckpt, tmp_path):
    changes, message = BAD_SWEEPS[case]
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out")
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if key == "base":
            doc["base"].update(value)
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SampleConfigError, match=None) as info:
        sweep.expand(sweep.load_sweep(path))
    assert message in str(info.value)


def test_dry_run_lists_cells_and_commands_and_writes_nothing(ckpt, tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out")
    assert cli.sweep_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cell(s)" in out and "no ref_batch" in out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("python ")]
    assert len(commands) == 4
    ddim2 = [c for c in commands if "pag_scale-2__sampler-ddim3" in c]
    assert len(ddim2) == 1
    for flag in ("--pag_scale 2.0", "--use_ddim True", "--timestep_respacing ddim3", "--pag_layers middle_block.1",
                 f"--model_path {ckpt}", "--num_samples 4"):
        assert flag in ddim2[0]
    assert "[new]" in out
    assert not (tmp_path / "out").exists()
    # The listed command is a valid image_sample.py command giving the same settings.
    args = ddim2[0].split()[2:]
    assert cli.resolve_cli(args) == sweep.expand(sweep.load_sweep(path))[3].settings


@pytest.fixture(scope="module")
def finished_sweep(ckpt, tmp_path_factory):
    """A two-cell sweep run in this process, with fake evaluation and table functions."""
    base = tmp_path_factory.mktemp("sweep")
    (base / "ref.npz").write_bytes(b"reference")
    path = write_sweep(base / "s.yaml", ckpt, base / "out", grid={"pag_scale": [0, 2]},
                       ref_batch=str(base / "ref.npz"), evaluation={"batch_size": 7}, name="tiny")
    calls = {"evaluate": [], "table": []}

    def evaluate(ref_path, sample_path, json_path=None, batch_size=64, dist=None):
        calls["evaluate"].append((ref_path, sample_path, batch_size))
        assert json_path is None  # the sweep writes eval.json itself, once
        return {"fid": 1.0}

    def make_table(runs, out_dir, anchors=None, experiment=None):
        calls["table"].append(([(r["run"], r["values"]["pag_scale"], r["values"]["sampler"], r["result"])
                                for r in runs], out_dir, experiment))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = sweep.load_sweep(path)
        run_dirs = sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=make_table)
    finally:
        torch.set_num_threads(threads)
        logger.reset()
    return path, cfg, run_dirs, calls, evaluate, make_table


def test_sweep_runs_every_cell_and_calls_the_evaluation_seam(finished_sweep):
    path, cfg, run_dirs, calls, _, _ = finished_sweep
    out = Path(cfg.out_dir)
    assert run_dirs == [str(out / "pag_scale-0"), str(out / "pag_scale-2")]
    images = []
    for run_dir in run_dirs:
        with np.load(Path(run_dir) / "samples_4x32x32x3.npz") as npz:
            assert npz["arr_0"].shape == (4, 32, 32, 3) and npz["arr_1"].shape == (4,)
            images.append(npz["arr_0"].astype(int))
        record = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        assert record["settings"]["pag_scale"] == (2.0 if run_dir.endswith("2") else 0.0)
    assert np.abs(images[0] - images[1]).mean() > 1  # the cells differ
    assert calls["evaluate"] == [(cfg.ref_batch, str(Path(d) / "samples_4x32x32x3.npz"), 7) for d in run_dirs]
    # The table gets each cell's name, settings and result from the sweep (nothing re-read from disk).
    cells = [("pag_scale-0", 0.0, "DDPM-4", {"fid": 1.0}), ("pag_scale-2", 2.0, "DDPM-4", {"fid": 1.0})]
    assert calls["table"] == [(cells, str(out / "table"), "tiny")]


def test_sweep_rerun_resumes_without_sampling_or_reevaluating(finished_sweep, monkeypatch):
    path, cfg, run_dirs, calls, evaluate, make_table = finished_sweep
    before = {d: (Path(d) / "samples_4x32x32x3.npz").read_bytes() for d in run_dirs}
    n_eval = len(calls["evaluate"])
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a: pytest.fail("a finished cell was sampled again"))
    monkeypatch.setattr(sampling.models, "load_networks", lambda *a: pytest.fail("models loaded for finished cells"))
    assert sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=make_table) == run_dirs
    assert len(calls["evaluate"]) == n_eval  # eval.json is newer than the samples
    assert len(calls["table"]) == 2
    assert {d: (Path(d) / "samples_4x32x32x3.npz").read_bytes() for d in run_dirs} == before


def test_no_ref_batch_means_no_evaluation(tmp_path):
    cfg = sweep.Sweep(path="s.yaml", out_dir=str(tmp_path), base={}, axes=[])
    fail = lambda *a, **k: pytest.fail("evaluation called without ref_batch")  # noqa: E731
    assert sweep_evaluation.after_runs([], cfg, evaluate_fn=fail, table_fn=fail) is None


def test_evaluation_settings_checked_before_sampling(ckpt, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", ref_batch=str(tmp_path / "missing.npz"))
    cfg = sweep.load_sweep(path)
    with pytest.raises(SampleConfigError, match="missing.npz not found.*make download-refs"):
        sweep.run_sweep(cfg, sweep.expand(cfg))
    (tmp_path / "ref.npz").write_bytes(b"")
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", ref_batch=str(tmp_path / "ref.npz"),
                       evaluation={"batchsize": 8})
    cfg = sweep.load_sweep(path)
    with pytest.raises(SampleConfigError, match="unknown argument.*batchsize"):  # the real evaluate()'s arguments
        sweep.run_sweep(cfg, sweep.expand(cfg))
    assert not (tmp_path / "out").exists()


def test_sweep_under_mpiexec_matches_one_process(finished_sweep, ckpt, tmp_path):
    path, cfg, run_dirs, _, _, _ = finished_sweep
    doc = yaml.safe_load(Path(path).read_text())
    doc.pop("ref_batch"), doc.pop("evaluation")
    doc["out_dir"] = str(tmp_path / "mpi")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: `make install` installs the openmpi package into .venv"
    env = clean_env()
    out = subprocess.run([mpiexec, "--oversubscribe", "-n", "2", sys.executable, str(ROOT / "scripts" / "sweep.py"),
                          str(tmp_path / "s.yaml")], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    for run_dir in run_dirs:
        name = Path(run_dir).name
        assert "done by rank 1" in (tmp_path / "mpi" / name / "log.rank1.txt").read_text()
        with np.load(Path(run_dir) / "samples_4x32x32x3.npz") as a, \
                np.load(tmp_path / "mpi" / name / "samples_4x32x32x3.npz") as b:
            np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
            assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_set_overrides_base_settings_of_every_cell(tmp_path):
    from sampling.cli import parse_overrides
    from sampling.sweep import load_sweep

    config = tmp_path / "sweep.yaml"
    config.write_text("out_dir: x\nbase: {num_samples: 50000, batch_size: 32}\ngrid: {pag_scale: [0, 3]}\n")
    overrides = parse_overrides(["num_samples=1000", "batch_size=8"])
    assert overrides == {"num_samples": 1000, "batch_size": 8}
    sweep = load_sweep(str(config), overrides=overrides)
    assert sweep.base == {"num_samples": 1000, "batch_size": 8}
    with pytest.raises(SampleConfigError, match="KEY=VALUE"):
        parse_overrides(["num_samples"])
    with pytest.raises(SampleConfigError, match="num_sample"):
        load_sweep(str(config), overrides={"num_sample": 3})


def test_evaluation_error_is_raised_not_left_hanging(finished_sweep):
    _, cfg, run_dirs, _, _, make_table = finished_sweep
    cells = sweep.expand(cfg)
    for run_dir in run_dirs:
        (Path(run_dir) / "eval.json").unlink()

    def broken(ref_path, sample_path, json_path=None, batch_size=64, dist=None):
        raise ValueError("features of another size")

    with pytest.raises(RuntimeError, match="evaluation failed: ValueError: features of another size"):
        sweep_evaluation.after_runs(cells, cfg, evaluate_fn=broken, table_fn=make_table)
    assert not any((Path(run_dir) / "eval.json").exists() for run_dir in run_dirs)
