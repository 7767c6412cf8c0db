"""A run never writes through a symbolic link planted in its out_dir (issue 23).

Links to "victim" files (and directories) outside out_dir with known bytes are planted at every path a run, a
resume, an --overwrite run, a sweep and an evaluation write; afterwards every victim is unchanged byte for byte,
and the operation either succeeded with its own regular files in place of the links or refused with exit status
2 and one line naming the link. A symlinked out_dir itself keeps working.

Tiny random-weight class-conditional model (32x32, 4 steps), 4 samples in shards of 2, as in tests/test_sweep.py.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from adm_common import files
from adm_common.npz import NpzWriter
from guided_diffusion import logger
from conftest import TINY_MODEL_FLAGS
from sampling import cli, lock, sweep
from sampling.settings import SampleConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO_FEATURES = ROOT / "checkpoints" / "demo" / "features_demo.pt"
N, SHARD = 4, 2
FINAL = f"samples_{N}x32x32x3.npz"
MODEL_FLAGS = TINY_MODEL_FLAGS  # the checkpoint of the `ckpt` fixture (conftest.py)
VICTIM_BYTES = b"victim: must never change\n"
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")  # FID of a handful of images


def argv(out_dir, ckpt, **overrides):
    flags = dict(MODEL_FLAGS, model_path=str(ckpt), pag_scale=2.0, pag_layers="middle_block.1",
                 timestep_respacing="4", num_samples=N, shard_size=SHARD, seed=3, batch_size=2, out_dir=str(out_dir))
    flags.update(overrides)
    return [item for key, value in flags.items() if value is not None for item in (f"--{key}", str(value))]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(directory):
    """{relative path: sha256 or '-> target'} of everything under ``directory`` (links not followed)."""
    out = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = sha256(path)
    return out


class Victims:
    """Files and directories outside every out_dir, with known bytes; ``check()`` asserts none changed."""

    INNER = ("rank0.txt", "shard_000000.claim", "shard_000000.npz", "shard_000001.npz")

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.expected = {}  # victim path -> its bytes (a directory: {name: bytes})

    def _new(self, name):
        path = self.root / f"{len(self.expected)}_{name.lstrip('.')}"
        self.expected[path] = None
        return path

    def plant(self, path, directory=False):
        """A symbolic link at ``path`` to a new victim file (or directory of files); returns the victim."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        target = self._new(path.name)
        if directory:
            target.mkdir()
            self.expected[target] = {}
            for inner in self.INNER:
                (target / inner).write_bytes(VICTIM_BYTES + inner.encode())
                self.expected[target][inner] = VICTIM_BYTES + inner.encode()
        else:
            self.expected[target] = VICTIM_BYTES + str(target).encode()
            target.write_bytes(self.expected[target])
        os.symlink(target, path)
        return target

    def check(self):
        assert self.expected
        for path, expected in self.expected.items():
            if isinstance(expected, dict):
                assert {n: (path / n).read_bytes() for n in os.listdir(path)} == expected, path
            else:
                assert path.read_bytes() == expected, path


def assert_regular(path):
    mode = os.lstat(path).st_mode
    assert stat.S_ISREG(mode), f"{path} is not a regular file"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    logger.reset()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ckpt):
    """A finished run whose out_dir is a symbolic link to a directory elsewhere (the user's choice: it works);
    the shards are kept, so copies of it serve as runs to resume."""
    root = tmp_path_factory.mktemp("finished")
    (root / "real").mkdir()
    os.symlink(root / "real", root / "out")
    assert cli.main(argv(root / "out", ckpt, keep_shards=True)) == 0
    logger.reset()
    for name in ("config.yaml", "log.txt", "grid.png", FINAL, "shards/shard_000000.npz", "shards/shard_000001.npz"):
        assert_regular(root / "real" / name)
    return root / "out"


# ---------------------------------------------------------------------------------------- the writers


def test_writers_replace_a_link_and_never_write_through_it(tmp_path):
    victims = Victims(tmp_path / "victims")
    out = tmp_path / "out"
    out.mkdir()

    victims.plant(out / "a.txt")
    files.atomic_write_text(out / "a.txt", "mine")
    assert (out / "a.txt").read_text() == "mine" and not (out / "a.txt").is_symlink()

    victims.plant(out / "b.npz")
    with NpzWriter(out / "b.npz") as writer:
        writer.write("arr_0", np.zeros((1, 2, 2, 3), np.uint8))
    assert_regular(out / "b.npz")
    assert np.load(out / "b.npz")["arr_0"].shape == (1, 2, 2, 3)

    victims.plant(out / "c.log")
    with files.open_append(out / "c.log") as f:
        f.write("line\n")
    assert (out / "c.log").read_text() == "line\n" and not (out / "c.log").is_symlink()

    # The logger's files: log.txt (appended to), progress.csv (rewritten, then appended to), progress.json.
    for name in ("log.txt", "progress.csv", "progress.json"):
        victims.plant(out / "logs" / name)
    logger.configure(dir=str(out / "logs"), format_strs=["log", "csv", "json"])
    logger.log("hello")
    logger.logkv("step", 1)
    logger.dumpkvs()
    logger.logkv("step", 2)
    logger.dumpkvs()
    logger.reset()
    for name in ("log.txt", "progress.csv", "progress.json"):
        assert_regular(out / "logs" / name)
    assert "hello" in (out / "logs" / "log.txt").read_text()
    assert (out / "logs" / "progress.csv").read_text().split() == ["step", "1", "2"]

    # A link where a directory is written into is refused, with one line naming it.
    target = victims.plant(out / "sub", directory=True)
    with pytest.raises(files.UnsafePathError) as info:
        files.real_directory(str(out), "sub")
    assert str(info.value).startswith(f"{out / 'sub'} is a symbolic link (to {target})") and "\n" not in str(info.value)
    assert files.real_directory(str(out), "new", "inner") == str(out / "new" / "inner")
    assert files.symlinks_in(out) == [str(out / "sub")]
    victims.check()


def test_run_lock_is_never_written_through_a_link(tmp_path, monkeypatch):
    victims = Victims(tmp_path / "victims")
    out = tmp_path / "out"
    target = victims.plant(out / "lock")
    for no_flock in (False, True):
        if no_flock:  # a file system without flock: the lock is the file's existence
            import fcntl

            def refuse(fd, op):
                raise OSError(errno.ENOLCK, "no locks")

            monkeypatch.setattr(fcntl, "flock", refuse)
        with pytest.raises(SampleConfigError) as info:
            lock.RunLock(str(out)).acquire()
        message = str(info.value)
        assert message.startswith(f"{out / 'lock'} is a symbolic link (to {target}), not a run lock")
        assert f"rm {out / 'lock'}" in message and "\n" not in message
        assert lock.probe(str(out)) is None
    victims.check()
    assert os.path.islink(out / "lock")  # refused, not removed: the user decides


# ------------------------------------------------------------------- runs, resumes, --overwrite runs

FILE_LINKS = ["lock", "config.yaml", "log.txt", "grid.png", "eval.json", FINAL, "shards/shard_000000.npz",
              "shards/shard_000001.npz"]
DIR_LINKS = ["shards", "shards/.claims", "shards/rejected", ".progress", ".failed"]


@pytest.mark.parametrize("mode", ["new", "resume", "overwrite"])
def test_links_in_an_out_dir_are_refused_before_anything_is_read_written_or_deleted(mode, finished, ckpt, tmp_path,
                                                                                      capsys):
    victims = Victims(tmp_path / "victims")
    flags = {"overwrite": "True", "seed": 4} if mode == "overwrite" else {}
    for i, name in enumerate(FILE_LINKS + DIR_LINKS):
        out = tmp_path / f"out{i}"
        if mode != "new":  # a run to resume (its merged file removed), or one of other settings to overwrite
            shutil.copytree(os.path.realpath(finished), out)
            if mode == "resume":
                (out / FINAL).unlink()
        target = victims.plant(out / name, directory=name in DIR_LINKS)
        before = snapshot(out)
        assert cli.main(argv(out, ckpt, **flags)) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out / name} is a symbolic link (to {target})" in err, err
        assert "remove" in err
        assert snapshot(out) == before, name  # nothing read through, written or deleted
    victims.check()


def test_links_planted_while_a_run_runs_are_replaced_not_followed(finished, ckpt, tmp_path):
    victims = Victims(tmp_path / "victims")
    out = tmp_path / "out"

    def plant(count):  # after the first shard: the next shard, the progress note, the grid, the log
        if count == 1:
            for name in ("shards/shard_000001.npz", ".progress/rank0.txt", "grid.png", "log.txt"):
                victims.plant(out / name)

    assert cli.main(argv(out, ckpt), on_shard_written=plant) == 0
    logger.reset()
    victims.check()
    assert sha256(out / FINAL) == sha256(Path(finished) / FINAL)
    for name in ("config.yaml", "grid.png", FINAL):
        assert_regular(out / name)


# ------------------------------------------------------------------------------ sweeps, evaluations


def image_batch(path, seed, n):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3))
    np.savez(path, np.repeat(np.repeat(low, 8, axis=1), 8, axis=2).astype(np.uint8))
    return path


EVALUATION = {"feature_net": str(DEMO_FEATURES), "min_samples": 0, "metrics": "fid,pr", "progress": False,
              "device": "cpu"}


def cache_files(tmp_path, ref, samples, **options):
    """The names an evaluation with ``options`` writes into its cache directory (found by running it in a scratch
    one, so the test does not depend on how cache entries are keyed)."""
    from evaluations.evaluator import evaluate

    scratch = tmp_path / "scratch_cache"
    evaluate(str(ref), str(samples), cache_dir=str(scratch), **dict(EVALUATION, **options))
    names = sorted(os.listdir(scratch))
    shutil.rmtree(scratch)
    assert "hashes.json" in names and any(n.endswith(".npz") for n in names), names
    return names


def write_sweep(path, ckpt, out_dir, cache_dir, ref):
    doc = {"out_dir": str(out_dir), "name": "exp",
           "base": dict(MODEL_FLAGS, model_path=str(ckpt), num_samples=N, shard_size=SHARD, batch_size=2,
                        timestep_respacing="4", pag_layers=["middle_block.1"], seed=3),
           "grid": {"pag_scale": [0, 2]}, "ref_batch": str(ref),
           "evaluation": dict(EVALUATION, cache_dir=str(cache_dir))}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sweep_and_its_evaluation_never_write_through_links(ckpt, tmp_path, capsys):
    victims = Victims(tmp_path / "victims")
    ref = image_batch(tmp_path / "ref.npz", 0, 8)
    cache = tmp_path / "evalcache"
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "out")  # a symlinked sweep out_dir keeps working
    out = tmp_path / "out"
    config = write_sweep(tmp_path / "s.yaml", ckpt, out, cache, ref)

    # A cell's directory itself a link (to a finished run elsewhere): refused, also with --overwrite, which would
    # otherwise delete that run's samples through the link.
    victim_run = tmp_path / "victim_run"
    victim_run.mkdir()
    for name in ("config.yaml", FINAL, "log.txt"):
        (victim_run / name).write_bytes(b"another user's " + name.encode())
    before = snapshot(victim_run)
    os.symlink(victim_run, out / "pag_scale-2")
    assert cli.sweep_main([str(config), "--dry-run"]) == 2
    assert f"{out / 'pag_scale-2'} is a symbolic link (to {victim_run})" in capsys.readouterr().out
    for flags in ([], ["--overwrite"]):
        assert cli.sweep_main([str(config), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out / 'pag_scale-2'} is a symbolic link (to {victim_run})" in err, err
        assert snapshot(victim_run) == before
    os.unlink(out / "pag_scale-2")

    # A link in a cell, or at the table's directory: refused before sampling (the dry run says so too).
    for name in ("pag_scale-2/config.yaml", "pag_scale-0/shards", "table"):
        target = victims.plant(out / name, directory=name.endswith(("shards", "table")))
        assert cli.sweep_main([str(config), "--dry-run"]) == 2
        assert f"{out / name} is a symbolic link (to {target})" in capsys.readouterr().out
        assert cli.sweep_main([str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out / name} is a symbolic link (to {target})" in err, err
        os.unlink(out / name)
        assert not (out / "pag_scale-0" / FINAL).exists()

    # Links at every file the sweep and its evaluation write outside the runs: replaced, never followed; and a
    # link put at the second cell's log.txt while the first cell runs (after the checks): replaced when it starts.
    cached = [cache / name for name in cache_files(tmp_path, ref, image_batch(tmp_path / "s.npz", 1, N))]
    planted = ["log.txt", ".evaluation-done", ".evaluation-failed", "table/exp.md", "table/exp.csv", "table/exp.tex",
               "table/exp_fid_is.png", "table/exp_pr.png"]
    for name in planted:
        victims.plant(out / name)
    for path in cached:
        victims.plant(path)

    def plant_meanwhile(fn):
        if not os.path.islink(out / "pag_scale-2" / "log.txt"):
            victims.plant(out / "pag_scale-2" / "log.txt")
        return fn

    cfg = sweep.load_sweep(config)
    sweep.run_sweep(cfg, sweep.expand(cfg), model_wrapper=plant_meanwhile)
    logger.reset()
    victims.check()
    assert "sweep cell 2/2: pag_scale-2" in (out / "pag_scale-2" / "log.txt").read_text()
    for name in planted[:1] + planted[3:]:
        assert_regular(out / name)
    for name in planted[1:3]:
        assert not os.path.lexists(out / name)  # the markers' links went (the links only)
    for path in cached:
        assert_regular(path)
    for cell in ("pag_scale-0", "pag_scale-2"):
        result = json.loads((out / cell / "eval.json").read_text())
        assert np.isfinite(result["fid"]) and result["marker"] == "DEMO-FEATURES"
        for name in ("config.yaml", "log.txt", "grid.png", "eval.json", FINAL):
            assert_regular(out / cell / name)

    # A rerun (the sweep's resume) with a link at a finished cell's eval.json: refused, nothing evaluated again.
    before = snapshot(out)
    target = victims.plant(out / "pag_scale-0" / "eval.json")
    capsys.readouterr()
    assert cli.sweep_main([str(config), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'pag_scale-0' / 'eval.json'} is a symbolic link (to {target})" in err
    victims.check()
    assert snapshot(out) == dict(before, **{"pag_scale-0/eval.json": f"-> {target}"})


def test_evaluation_never_writes_through_links(tmp_path):
    from evaluations import evaluator

    victims = Victims(tmp_path / "victims")
    ref, samples = image_batch(tmp_path / "ref.npz", 0, 8), image_batch(tmp_path / "s.npz", 1, 8)
    cache = tmp_path / "cache_eval"
    out = tmp_path / "run"
    names = cache_files(tmp_path, ref, samples, cache_samples=True)
    assert len([n for n in names if n.endswith(".npz")]) == 2  # the reference's and the samples' features
    links = [out / "eval.json"] + [cache / name for name in names]
    for path in links:
        victims.plant(path)
    code = evaluator.main([str(ref), str(samples), "--json", str(out / "eval.json"), "--feature-net",
                           str(DEMO_FEATURES), "--cache-dir", str(cache), "--cache-samples", "--min-samples", "0",
                           "--metrics", "fid,pr", "--no-progress", "--device", "cpu"])
    assert code == 0
    victims.check()
    for path in links:
        assert_regular(path)
    assert np.isfinite(json.loads((out / "eval.json").read_text())["fid"])
