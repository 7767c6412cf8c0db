"""scripts/image_sample.py / the sampling package: per-sample seeds, shards, resume, npz format, errors.

Tiny random-weight class-conditional model (32x32, 4 respaced steps) with PAG on a random perturbation, so
the per-sample ``row_seeds`` matter too. Runs with one process in this process, and under ``mpiexec -n 2``.
"""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sampling
from adm_common.npz import NpzWriter, npz_header
from guided_diffusion import logger
from sampling import cli, images
from sampling import shards as shard_files
from guided_diffusion.script_util import create_model
from processes import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image_sample.py"
WORKER = ROOT / "tests" / "sample_worker.py"  # image_sample.py with test hooks injected
SEED = 7
N, SHARD = 10, 4

MODEL_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                   attention_resolutions="16,8", num_head_channels=16, class_cond=True, learn_sigma=True)
GUIDANCE_FLAGS = dict(pag_scale=2.0, pag_layers="input_blocks.5.1,middle_block.1", perturbation="random_mask")


def argv(out_dir, ckpt, batch_size=3, **overrides):
    flags = dict(MODEL_FLAGS, **GUIDANCE_FLAGS, model_path=str(ckpt), timestep_respacing="4", num_samples=N,
                 shard_size=SHARD, seed=SEED, batch_size=batch_size, out_dir=str(out_dir))
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        out += [f"--{key}", str(value)]
    return out


def run_script(args, nproc=1, kill_after_shards=None, **env):
    cmd = [sys.executable, str(SCRIPT), *args]
    if kill_after_shards:
        cmd = [sys.executable, str(WORKER), "--kill-after-shards", str(kill_after_shards), *args]
    if nproc > 1:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        assert mpiexec, "mpiexec not found: `make install` installs the openmpi package into .venv"
        cmd = [mpiexec, "--oversubscribe", "-n", str(nproc), *cmd]
    return subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True, timeout=240)


def replace(settings, group, **values):
    """``settings`` with some values of one group changed."""
    return dataclasses.replace(settings, **{group: dataclasses.replace(getattr(settings, group), **values)})


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    logger.reset()  # runs log into their out_dir: close it, later tests log elsewhere


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float results
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.manual_seed(0)
    model = create_model(**MODEL_FLAGS, use_scale_shift_norm=True)
    with torch.no_grad():  # ADM zero-initialises output and attention projections: make every layer count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ckpt, one_thread):
    """One uninterrupted single-process run (batch size 3): the npz every other run is compared with."""
    out_dir = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(argv(out_dir, ckpt)) == 0
    return out_dir


def final(out_dir):
    return Path(out_dir) / f"samples_{N}x32x32x3.npz"


# ------------------------------------------------------------------------------------------ format


def test_npz_format_and_outputs(reference):
    assert sorted(os.listdir(reference)) == ["config.yaml", "grid.png", "log.txt", final(reference).name]
    with zipfile.ZipFile(final(reference)) as zf:
        assert zf.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with np.load(final(reference)) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    assert ((labels >= 0) & (labels < 1000)).all()
    np.testing.assert_array_equal(labels, sampling.sample_labels(SEED, range(N), 1000))
    assert not (np.diff(labels) >= 0).all(), "labels must not be sorted"
    assert len(set(labels.tolist())) >= N - 1
    assert images.std() > 5  # not a constant image
    grid = np.asarray(Image.open(Path(reference) / "grid.png"))
    assert grid.shape == (3 * 32, 4 * 32, 3)  # 10 samples: 4 columns, 3 rows
    np.testing.assert_array_equal(grid[:32, 32:64], images[1])
    np.testing.assert_array_equal(grid[64:96, 32:64], images[9])
    assert (grid[64:96, 64:] == 0).all()

    record = yaml.safe_load((Path(reference) / "config.yaml").read_text())
    settings = record["settings"]
    assert settings["pag_scale"] == 2.0 and settings["perturbation"] == "random_mask"
    assert settings["pag_layers"] == ["input_blocks.5.1", "middle_block.1"]
    assert settings["seed"] == SEED and settings["num_channels"] == 32
    assert settings["noise_device"] == "cpu" and "batch_size" not in settings
    # num_samples changes no sample (a run can be extended) and the checkpoint is identified by its content
    assert "num_samples" not in settings and "model_path" not in settings
    assert settings["model_checkpoint"] == f"sha256:{sha256(record['runtime']['model_path'])}"
    assert len(record["run_id"]) == 64
    assert record["runtime"]["batch_size"] == 3 and record["runtime"]["world_size"] == 1
    assert record["runtime"]["num_samples"] == N
    prov = record["provenance"]
    assert prov["package"] == "pag-adm" and prov["version"] not in ("", None)
    assert prov["git_commit"] == "unknown" or len(prov["git_commit"].split("-")[0]) == 40
    assert prov["torch"] == str(torch.__version__)
    log = (Path(reference) / "log.txt").read_text()
    assert log.count("done by rank 0") == 3 and "shard 3/3 (samples 8-9)" in log


def test_uint8_conversion_is_upstreams():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = images.to_uint8_nhwc(x)
    assert out.shape == (1, 2, 3, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 127, 254, 255, 255]


def test_streaming_npz_writer(tmp_path):
    rng = np.random.default_rng(0)
    shards = []
    for k, n in enumerate((4, 4, 2)):
        path = tmp_path / shard_files.shard_filename(k)
        with NpzWriter(path) as w:
            with w.stream("arr_0", (n, 5, 6, 3), np.uint8) as s:
                images = rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8)
                s.write(images[:1])
                s.write(images[1:])
            w.write("arr_1", np.arange(n, dtype=np.int64) + 10 * k)
        shards.append((path, images))
    assert shard_files.merge_shards([p for p, _ in shards], tmp_path / "a.npz", with_labels=True) == (10, 5, 6, 3)
    shard_files.merge_shards([p for p, _ in shards], tmp_path / "b.npz", with_labels=True)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()  # no timestamps inside
    with np.load(tmp_path / "a.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], np.concatenate([i for _, i in shards]))
        assert npz["arr_1"].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21]
    assert npz_header(tmp_path / "a.npz", "arr_0") == ((10, 5, 6, 3), np.dtype(np.uint8))

    # A short stream is an error and leaves neither the file nor a temporary file behind.
    with pytest.raises(ValueError, match="2 rows written, the array has 3"):
        with NpzWriter(tmp_path / "short.npz") as w:
            with w.stream("arr_0", (3, 2), np.uint8) as s:
                s.write(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        with NpzWriter(tmp_path / "short.npz") as w:
            with w.stream("arr_0", (3, 2), np.uint8) as s:
                s.write(np.zeros((3, 2), np.float32))
    assert sorted(os.listdir(tmp_path)) == sorted(["a.npz", "b.npz"] + [p.name for p, _ in shards])


# ------------------------------------------------------------------------------------- randomness


def test_sample_depends_only_on_seed_and_index(ckpt, one_thread, tmp_path):
    settings = cli.resolve_cli(argv(tmp_path, ckpt))
    device = torch.device("cpu")
    sampler = sampling.Sampler(settings, sampling.load_models(settings, device), device)
    alone, alone_labels = sampler.sample([5])
    batch, batch_labels = sampler.sample([3, 5, 8])
    assert batch_labels[1] == alone_labels[0] == sampling.sample_labels(SEED, [5], 1000)[0]
    diff = np.abs(batch[1].astype(int) - alone[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(batch[0].astype(int) - alone[0].astype(int)).mean() > 10  # other samples differ

    models = sampling.load_models(settings, device)
    other_seed = sampling.Sampler(replace(settings, "sampling", seed=SEED + 1), models, device)
    assert np.abs(other_seed.sample([5])[0].astype(int) - alone.astype(int)).mean() > 10
    # The perturbation matters (so the per-sample perturbation seeds above were exercised)
    identity = sampling.Sampler(replace(settings, "guidance", perturbation="identity"), models, device)
    assert np.abs(identity.sample([5])[0].astype(int) - alone.astype(int)).mean() > 3


def test_one_process_vs_two_with_other_batch_size(reference, ckpt, tmp_path):
    out = run_script(argv(tmp_path / "mpi", ckpt, batch_size=2), nproc=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done by rank 1" in (tmp_path / "mpi" / "log.rank1.txt").read_text()
    with np.load(final(reference)) as a, np.load(final(tmp_path / "mpi")) as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_kill_after_first_shard_and_resume_is_identical(reference, ckpt, tmp_path):
    out_dir = tmp_path / "killed"
    killed = run_script(argv(out_dir, ckpt), kill_after_shards=1)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # SIGKILL: no clean-up ran
    assert sorted(n for n in os.listdir(out_dir / "shards") if not n.startswith(".")) == ["shard_000000.npz"]
    assert not final(out_dir).exists()
    # Resume with another process count (same batch size): the same bytes as the uninterrupted run.
    resumed = run_script(argv(out_dir, ckpt), nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "4 done, 2 shards to sample" in resumed.stdout
    assert sha256(final(out_dir)) == sha256(final(reference))
    assert not (out_dir / "shards").exists()


# ------------------------------------------------------------------------------ resume and refusal


def test_changed_config_is_refused_unless_overwrite(reference, ckpt, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    before = {p.name: sha256(p) for p in out_dir.iterdir()}

    assert cli.main(argv(out_dir, ckpt, pag_scale=3, perturbation="identity")) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different configuration" in err
    assert "pag_scale: 2.0 there, 3.0 now" in err and "perturbation: 'random_mask' there, 'identity' now" in err
    assert "seed" not in err and "--overwrite" in err
    assert {p.name: sha256(p) for p in out_dir.iterdir()} == before

    # Same settings, other batch size and device spelling: accepted, already complete, nothing resampled.
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a: pytest.fail("sampled a complete run"))
    assert cli.main(argv(out_dir, ckpt, batch_size=5, device="cpu")) == 0
    assert "the run is complete" in capsys.readouterr().out
    assert sha256(final(out_dir)) == before[final(out_dir).name]
    monkeypatch.undo()

    assert cli.main(argv(out_dir, ckpt, pag_scale=3, perturbation="identity", overwrite=True)) == 0
    assert sha256(final(out_dir)) != before[final(out_dir).name]
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["settings"]["pag_scale"] == 3.0
    assert "--overwrite: removed config.yaml, grid.png" in (out_dir / "log.txt").read_text()


def test_samples_without_a_record_are_not_touched(ckpt, tmp_path, capsys):
    out_dir = tmp_path / "run"
    (out_dir / "shards").mkdir(parents=True)
    (out_dir / "shards" / "shard_000000.npz").write_bytes(b"someone's work")
    assert cli.main(argv(out_dir, ckpt)) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert (out_dir / "shards" / "shard_000000.npz").read_bytes() == b"someone's work"


def test_nonfinite_values_stop_the_run_and_keep_finished_shards(ckpt, one_thread, tmp_path):
    out_dir = tmp_path / "nan"
    settings = cli.resolve_cli(argv(out_dir, ckpt, pag_scale=0, batch_size=2, shard_size=2))
    calls = []

    def poison_after_one_shard(fn):
        def wrapped(x, t, **kwargs):
            calls.append(1)
            out = fn(x, t, **kwargs)
            return out * float("nan") if len(calls) > 4 else out  # 4 steps per batch: shard 1 is clean
        return wrapped

    with pytest.raises(sampling.NonFiniteError, match=r"sample\(s\) 2, 3 at step 1 of 4 \(timestep 999\)"):
        sampling.run(settings, model_wrapper=poison_after_one_shard)
    assert sorted(n for n in os.listdir(out_dir / "shards") if not n.startswith(".")) == ["shard_000000.npz"]
    with np.load(out_dir / "shards" / "shard_000000.npz") as npz:
        first = npz["arr_0"].copy()
    assert first.shape == (2, 32, 32, 3)
    assert not final(out_dir).exists()

    sampling.run(settings)  # the fault is gone: resumes from shard 1
    with np.load(final(out_dir)) as npz:
        np.testing.assert_array_equal(npz["arr_0"][:2], first)
        assert npz["arr_0"].shape == (N, 32, 32, 3)


# ------------------------------------------------------------------------------------------ settings


def test_yaml_config_and_command_line_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pag_scale: 2\npag_layers: [middle_block.1, input_blocks.14.1]\ntimestep_respacing: 250\n"
                      "use_ddim: 'yes'\nattention_resolutions: [32, 16, 8]\nmodel: 256x256_diffusion\n"
                      "num_samples: 50000\nout_dir: from_yaml\n")
    s = cli.resolve_cli(["--config", str(config), "--pag_scale", "3", "--class_cond", "False",
                         "--out_dir", "x"]).flat()
    assert s["pag_scale"] == 3.0 and s["out_dir"] == "x" and s["num_samples"] == 50000
    assert s["pag_layers"] == ["middle_block.1", "input_blocks.14.1"]
    assert s["timestep_respacing"] == "250" and s["use_ddim"] is True
    assert s["attention_resolutions"] == "32,16,8"
    # --model's flags sit below the file and the command line
    assert s["num_channels"] == 256 and s["learn_sigma"] is True and s["class_cond"] is False
    assert s["model_path"] == os.path.join("downloads", "models", "256x256_diffusion.pt")
    s = cli.resolve_cli(["--model", "256x256_diffusion", "--out_dir", "x", "--use_ddim",
                         "--pag_layers", "input_blocks.14.1,middle_block.1"]).flat()
    assert s["use_ddim"] is True and s["class_cond"] is True
    assert s["pag_layers"] == ["input_blocks.14.1", "middle_block.1"]


BAD_INPUTS = {
    "missing official checkpoint": (
        lambda d, c: argv(d / "out", d / "256x256_diffusion.pt"),
        ["checkpoint not found", "256x256_diffusion.pt", "make download-models MODELS=256x256_diffusion"]),
    "missing checkpoint": (
        lambda d, c: argv(d / "out", d / "mine.pt"), ["checkpoint not found", "mine.pt", "make download-models"]),
    "flags not fitting": (
        lambda d, c: argv(d / "out", c, num_channels=64), ["does not fit", "num_channels"]),
    "class_cond not fitting": (
        lambda d, c: argv(d / "out", c, class_cond=False), ["does not fit", "class_cond=True"]),
    "unwritable out_dir": (
        lambda d, c: argv(d / "a_file" / "out", c), ["not a writable directory", "a_file"]),
    "unknown yaml key": (
        lambda d, c: ["--config", str(d / "bad.yaml")] + argv(d / "out", c),
        ["unknown setting(s)", "pag_scal (did you mean pag_scale?)"]),
    "bad yaml value": (
        lambda d, c: ["--config", str(d / "bad_value.yaml")] + argv(d / "out", c),
        ["use_ddim", "expected true or false"]),
    "zero samples": (lambda d, c: argv(d / "out", c, num_samples=0), ["num_samples must be positive, got 0"]),
    "negative samples": (lambda d, c: argv(d / "out", c, num_samples=-5), ["num_samples must be positive"]),
    "unknown model": (lambda d, c: ["--model", "256x256_difusion", "--out_dir", str(d / "out")],
                      ["unknown --model", "did you mean 256x256_diffusion"]),
    "unknown layer": (lambda d, c: argv(d / "out", c, pag_layers="input_blocks.99.1"),
                      ["guidance settings", "input_blocks.99.1", "middle_block.1"]),
    "bad perturbation": (lambda d, c: argv(d / "out", c, perturbation="scramble"), ["unknown perturbation"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_sampling(case, ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bad.yaml").write_text("pag_scal: 2\n")
    (tmp_path / "bad_value.yaml").write_text("use_ddim: maybe\n")
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a: pytest.fail("sampling started"))
    make_argv, expected = BAD_INPUTS[case]
    assert cli.main(make_argv(tmp_path, ckpt)) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    out_dir = tmp_path / "out"
    assert not (out_dir / "shards").exists() and not (out_dir / "config.yaml").exists()


def test_num_classes_limits_the_label_range():
    labels = sampling.sample_labels(SEED, range(200), num_classes=10)
    assert labels.min() >= 0 and labels.max() == 9 and len(set(labels.tolist())) == 10
    # The same (seed, i) stream: a label does not depend on which other samples are drawn with it.
    assert sampling.sample_labels(SEED, [17], num_classes=10)[0] == labels[17]
