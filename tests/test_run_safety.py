"""Runs that cannot be corrupted (issue 12): the run lock, content identity, --overwrite that validates first and
removes only run files, evaluation by content, verified shards, claimed shards with leases, a full disk,
SIGTERM, bad values, extending a run, dry runs, and the smaller items (help, logs, progress lines, Makefile).

Tiny random-weight class-conditional model (32x32, 4 steps), 10 samples in shards of 4 (batch size 3), as in
tests/test_sampling.py. Nothing finished may be lost in any case.
"""

import collections
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sampling
from adm_common import npz as npz_module
from adm_common.npz import NpzWriter
from guided_diffusion import logger
from guided_diffusion.script_util import create_model
from sampling import cli, lock, sweep
from sampling import shards as shard_files
from sampling.settings import SampleConfigError
from sampling.sweep_evaluation import evaluation_markers
from processes import clean_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image_sample.py"
WORKER = ROOT / "tests" / "sample_worker.py"
SEED, N, SHARD = 7, 10, 4
MODEL_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                   attention_resolutions="16,8", num_head_channels=16, class_cond=True, learn_sigma=True)
GUIDANCE_FLAGS = dict(pag_scale=2.0, pag_layers="input_blocks.5.1,middle_block.1", perturbation="random_mask")


def argv(out_dir, ckpt, **overrides):
    flags = dict(MODEL_FLAGS, **GUIDANCE_FLAGS, model_path=str(ckpt), timestep_respacing="4", num_samples=N,
                 shard_size=SHARD, seed=SEED, batch_size=3, out_dir=str(out_dir))
    flags.update(overrides)
    return [item for key, value in flags.items() if value is not None for item in (f"--{key}", str(value))]


def mpiexec():
    path = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    assert path, "mpiexec not found: `make install` installs the openmpi package into .venv"
    return path


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def final(out_dir, n=N):
    return Path(out_dir) / f"samples_{n}x32x32x3.npz"


def shard_names(out_dir):
    directory = Path(out_dir) / "shards"
    return sorted(n for n in os.listdir(directory) if n.startswith("shard_")) if directory.is_dir() else []


def snapshot(directory):
    """{relative path: sha256} of every file under ``directory``."""
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(Path(directory).rglob("*")) if p.is_file()}


class Kill(Exception):
    """Stands for a killed process: raised from a test seam after some shards."""


def kill_after(n):
    def hook(count):
        if count >= n:
            raise Kill()
    return hook


def wait_for(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # hash memos and feature caches
    yield
    logger.reset()


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float results
    yield
    torch.set_num_threads(before)


def make_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = create_model(**MODEL_FLAGS, use_scale_shift_norm=True)
    with torch.no_grad():  # ADM zero-initialises some projections: make every layer count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ckpt, one_thread):
    """One uninterrupted single-process run: what every interrupted or damaged run must end with."""
    out_dir = tmp_path_factory.mktemp("runs") / "reference"
    assert cli.main(argv(out_dir, ckpt)) == 0
    logger.reset()
    return out_dir


# ------------------------------------------------------------------------------------- 1. the run lock


def test_second_run_on_a_running_out_dir_is_refused(reference, ckpt, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "run"
    pid_file = tmp_path / "pid"
    first = subprocess.Popen([sys.executable, str(WORKER), "--stop-on-claim", "2", "--pid-file", str(pid_file),
                              *argv(out_dir, ckpt)], env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(pid_file.exists, 120, "the first run to stop holding its lock", first)
        time.sleep(0.2)
        before = snapshot(out_dir)
        assert "shards/shard_000000.npz" in before
        # Other settings (a typo, another seed) and the same settings (a requeue while the job still runs):
        # both refused with exit status 2, naming the running one; nothing is read into, mixed or deleted.
        for extra in ({"seed": SEED + 1}, {}):
            assert cli.main(argv(out_dir, ckpt, **extra)) == 2
            err = capsys.readouterr().err
            assert "is in use by another run" in err and f"pid {first.pid}" in err, err
            assert socket.gethostname() in err and str(out_dir / "lock") in err
            assert snapshot(out_dir) == before
    finally:
        first.kill()  # SIGKILL, also when stopped: the lock dies with the process, its file stays
        first.communicate()
    assert (out_dir / "lock").exists()
    assert cli.main(argv(out_dir, ckpt)) == 0  # the dead run's lock is taken over and the run resumed
    log = (out_dir / "log.txt").read_text()
    assert "took over the lock of a run that ended without releasing it" in log and f"'pid': {first.pid}" in log
    assert sha256(final(out_dir)) == sha256(final(reference))
    assert not (out_dir / "lock").exists()  # released at the end


def test_lock_file_records_and_fallback_without_flock(tmp_path, monkeypatch):
    import fcntl

    held = lock.RunLock(str(tmp_path)).acquire()
    info = json.loads((tmp_path / "lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    with pytest.raises(lock.RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        lock.RunLock(str(tmp_path)).acquire()  # another open file description: refused like another process
    held.release()
    assert not (tmp_path / "lock").exists()

    # A lock file of another host refreshed a moment ago is refused even where flock is node-local.
    (tmp_path / "lock").write_text(json.dumps({"host": "node-b", "pid": 1, "started": "x"}))
    with pytest.raises(lock.RunLockedError, match=r"node-b.*delete .*lock"):
        lock.RunLock(str(tmp_path)).acquire()

    # Without flock (some network file systems): a dead process's lock on this host is taken over ...
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    taken = lock.RunLock(str(tmp_path)).acquire()
    assert taken.mode == "exclusive" and taken.took_over["pid"] == int(dead.stdout)
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    taken.release()
    # ... a live one is not, and one of another host says how to clear it.
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "x"}))
    with pytest.raises(lock.RunLockedError, match=f"pid {os.getppid()}"):
        lock.RunLock(str(tmp_path)).acquire()
    (tmp_path / "lock").write_text(json.dumps({"host": "node-b", "pid": 1, "started": "x"}))
    with pytest.raises(lock.RunLockedError, match=r"another host stays: .*delete .*lock"):
        lock.RunLock(str(tmp_path)).acquire()


def test_without_flock_an_empty_out_dir_is_locked(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    held = lock.RunLock(str(tmp_path)).acquire()
    assert held.mode == "exclusive" and json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    with pytest.raises(lock.RunLockedError, match=f"pid {os.getpid()}") as refused:
        lock.RunLock(str(tmp_path)).acquire()
    assert "another host" not in str(refused.value)  # a live lock of this host: nothing to delete
    held.release()
    assert not (tmp_path / "lock").exists()
    lock.RunLock(str(tmp_path)).acquire().release()


def test_without_flock_a_lock_released_between_two_opens_is_taken_not_left_empty(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    path = tmp_path / "lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "x"}))  # a live holder
    real_open, calls = os.open, []

    def racy_open(p, flags, *mode):  # the holder releases between this process's O_EXCL open and the next one
        if str(p) == str(path) and not flags & os.O_EXCL and not calls:
            calls.append(p)
            os.remove(path)
        return real_open(p, flags, *mode)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(lock.os, "open", racy_open)
    held = lock.RunLock(str(tmp_path)).acquire()
    assert calls and json.loads(path.read_text())["pid"] == os.getpid()
    held.release()
    assert not path.exists()  # no empty lock file left to refuse every later run


def test_an_unexpected_error_while_planning_keeps_its_cause(monkeypatch):
    from sampling import plan

    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(plan, "_prepare_rank0", fail)
    with pytest.raises(SampleConfigError, match="OSError: .*Input/output error") as refused:
        plan.prepare(None)
    assert isinstance(refused.value.__cause__, OSError)  # the traceback still shows where it failed


# ---------------------------------------------------------------------------- 2. identity by content


def test_replaced_checkpoint_is_refused_and_the_same_content_elsewhere_resumes(reference, ckpt, tmp_path, capsys,
                                                                                 one_thread):
    mine = tmp_path / "model.pt"
    shutil.copy(ckpt, mine)
    out_dir = tmp_path / "run"
    with pytest.raises(Kill):
        cli.main(argv(out_dir, mine), on_shard_written=kill_after(1))
    assert shard_names(out_dir) == ["shard_000000.npz"]
    record = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert record["settings"]["model_checkpoint"] == f"sha256:{sha256(ckpt)}"
    assert record["runtime"]["model_path"] == str(mine) and "model_path" not in record["settings"]
    sidecar = json.loads((tmp_path / "model.pt.sha256").read_text())
    assert sidecar["sha256"] == sha256(ckpt) and sidecar["size"] == mine.stat().st_size

    # Other weights under the same path, with the old size and mtime kept (cp -p): refused, nothing touched.
    stat = mine.stat()
    make_checkpoint(tmp_path / "other.pt", 5)
    shutil.copy(tmp_path / "other.pt", mine)
    os.utime(mine, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = snapshot(out_dir)
    assert cli.main(argv(out_dir, mine)) == 2
    err = capsys.readouterr().err
    assert "model_checkpoint" in err and "the checkpoint's content differs" in err, err
    assert snapshot(out_dir) == before

    # The original content under another path resumes the run, to the same samples.
    assert cli.main(argv(out_dir, ckpt)) == 0
    assert sha256(final(out_dir)) == sha256(final(reference))


def test_record_from_before_content_identity_resumes_by_path(reference, ckpt, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "run"
    with pytest.raises(Kill):
        cli.main(argv(out_dir, ckpt), on_shard_written=kill_after(1))
    # Make it an old run: settings name the checkpoint by path (and hold num_samples), no run ids anywhere.
    record = yaml.safe_load((out_dir / "config.yaml").read_text())
    settings = record["settings"]
    del settings["model_checkpoint"], record["run_id"]
    settings.update(model_path=str(ckpt), num_samples=N, shard_size=SHARD, classifier_path="")
    (out_dir / "config.yaml").write_text(yaml.safe_dump(record))
    shard = out_dir / "shards" / "shard_000000.npz"
    with np.load(shard) as npz:
        members = {k: npz[k] for k in ("arr_0", "arr_1", "sample_range")}
    with NpzWriter(shard) as w:
        for key, value in members.items():
            w.write(key, value)

    copy = tmp_path / "elsewhere.pt"
    shutil.copy(ckpt, copy)
    assert cli.main(argv(out_dir, copy)) == 2  # the old record knows only the path: another path is refused
    assert f"model_path: '{ckpt}' there, '{copy}' now" in capsys.readouterr().err

    assert cli.main(argv(out_dir, ckpt)) == 0
    assert "4 done, 2 shards to sample" in capsys.readouterr().out  # the old shard was accepted
    assert sha256(final(out_dir)) == sha256(final(reference))
    record = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert record["settings"]["model_checkpoint"] == f"sha256:{sha256(ckpt)}" and record["legacy_shards"] is True
    assert "model_path" not in record["settings"] and len(record["run_id"]) == 64


# ------------------------------------------------------------------------------------- 3. --overwrite


def test_overwrite_checks_everything_first_and_removes_only_run_files(reference, ckpt, tmp_path, capsys,
                                                                      one_thread):
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    (out_dir / "samples_old_backup.npz").write_bytes(b"the user's")
    (out_dir / "notes.txt").write_text("mine")
    before = snapshot(out_dir)

    for bad in ({"pag_layers": "input_blocks.99.1"}, {"sag_scale": 1.0, "sag_layer": "middle_block.0"},
                {"num_channels": 64}, {"model_path": tmp_path / "missing.pt"}):
        assert cli.main(argv(out_dir, ckpt, seed=SEED + 1, overwrite=True, **bad)) == 2
        capsys.readouterr()
        assert snapshot(out_dir) == before, bad

    assert cli.main(argv(out_dir, ckpt, seed=SEED + 1, overwrite=True)) == 0
    after = snapshot(out_dir)
    assert after["samples_old_backup.npz"] == before["samples_old_backup.npz"] and after["notes.txt"] == before["notes.txt"]
    assert after[final(out_dir).name] != before[final(out_dir).name]
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["settings"]["seed"] == SEED + 1


def write_sweep(path, ckpt, out_dir, grid, **extra):
    doc = {"out_dir": str(out_dir),
           "base": dict(MODEL_FLAGS, model_path=str(ckpt), num_samples=4, shard_size=2, batch_size=2,
                        timestep_respacing="4", pag_layers=["middle_block.1"], seed=3),
           "grid": grid}
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc))
    return path


class FakeEvaluator:
    def __init__(self):
        self.calls = []

    def __call__(self, ref_path, sample_path, json_path=None, batch_size=64, dist=None):
        self.calls.append((ref_path, sample_path, batch_size))
        result = {"fid": float(len(self.calls)), "ref": {"sha256": sha256(ref_path)}}
        assert json_path is None  # the sweep writes eval.json itself, once
        return result


def no_table(runs, out_dir, anchors=None, experiment=None):
    return None


def test_sweep_overwrite_with_an_invalid_cell_deletes_nothing(ckpt, tmp_path, one_thread):
    (tmp_path / "ref.npz").write_bytes(b"reference")
    cells = [{"name": "a", "pag_scale": 0}, {"name": "b", "pag_scale": 2}]
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"cell": cells}, ref_batch=str(tmp_path / "ref.npz"))
    cfg = sweep.load_sweep(path)
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=FakeEvaluator(), table_fn=no_table)
    before = snapshot(tmp_path / "out")
    assert "cell-b/eval.json" in before and "cell-b/samples_4x32x32x3.npz" in before

    # Another seed (so --overwrite would replace both finished cells) and a third cell with a bad layer.
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out",
                       {"cell": cells + [{"name": "bad", "pag_scale": 3, "pag_layers": "input_blocks.99.1"}]},
                       ref_batch=str(tmp_path / "ref.npz"))
    doc = yaml.safe_load(path.read_text())
    doc["base"]["seed"] = 4
    path.write_text(yaml.safe_dump(doc))
    cfg = sweep.load_sweep(path)
    with pytest.raises(SampleConfigError, match=r"cell cell-bad: guidance settings: .*input_blocks.99.1"):
        sweep.run_sweep(cfg, sweep.expand(cfg, overwrite=True), evaluate_fn=FakeEvaluator(), table_fn=no_table)
    after = snapshot(tmp_path / "out")
    assert {k: v for k, v in after.items() if k.startswith("cell-")} == \
        {k: v for k, v in before.items() if k.startswith("cell-")}
    for name in ("cell-a", "cell-b"):  # the refused sweep released every lock it took
        lock.RunLock(str(tmp_path / "out" / name)).acquire().release()


# ----------------------------------------------------------------------------- 4. evaluation by content


def test_changed_reference_or_settings_are_evaluated_again(ckpt, tmp_path, one_thread):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"reference A")
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"pag_scale": [0]}, ref_batch=str(ref))
    cfg = sweep.load_sweep(path)
    evaluate = FakeEvaluator()
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=no_table)
    eval_json = tmp_path / "out" / "pag_scale-0" / "eval.json"
    recorded = json.loads(eval_json.read_text())
    assert recorded["sweep_inputs"]["ref_sha256"] == sha256(ref) and recorded["fid"] == 1.0
    assert recorded["sweep_inputs"]["sample_sha256"] == sha256(tmp_path / "out" / "pag_scale-0" / "samples_4x32x32x3.npz")
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=no_table)
    assert len(evaluate.calls) == 1  # nothing changed

    # Another reference with the same size and mtime, written in place: scores are recomputed.
    stat = ref.stat()
    ref.write_bytes(b"reference B")
    os.utime(ref, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=no_table)
    assert len(evaluate.calls) == 2
    assert json.loads(eval_json.read_text())["sweep_inputs"]["ref_sha256"] == sha256(ref)

    # Other evaluation settings: recomputed too.
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"pag_scale": [0]}, ref_batch=str(ref),
                       evaluation={"batch_size": 5})
    cfg = sweep.load_sweep(path)
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=evaluate, table_fn=no_table)
    assert len(evaluate.calls) == 3 and evaluate.calls[-1][2] == 5


def test_hash_memo_sees_a_replaced_file_with_the_same_size_and_mtime(tmp_path):
    from evaluations.reference import FeatureCache, HashMemo

    memo = HashMemo(str(tmp_path / "cache"))
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"A" * 100)
    first = memo.sha256(ref)
    stat = ref.stat()
    replacement = tmp_path / "new.npz"
    replacement.write_bytes(b"B" * 100)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, ref)  # same size, same mtime, other content
    assert (ref.stat().st_size, ref.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = memo.sha256(ref)
    assert first == hashlib.sha256(b"A" * 100).hexdigest() and second == hashlib.sha256(b"B" * 100).hexdigest()
    cache = FeatureCache(str(tmp_path / "cache"))
    assert cache.entry_path(first, "x", "cpu/float32") != cache.entry_path(second, "x", "cpu/float32")  # by content


# ------------------------------------------------------------------------------- 5. verified shards


def test_foreign_and_damaged_shards_are_set_aside_and_sampled_again(reference, ckpt, tmp_path, one_thread):
    out_dir, other = tmp_path / "run", tmp_path / "other"
    with pytest.raises(Kill):
        cli.main(argv(out_dir, ckpt), on_shard_written=kill_after(2))
    with pytest.raises(Kill):
        cli.main(argv(other, ckpt, seed=SEED + 1), on_shard_written=kill_after(2))
    logger.reset()
    # shard 1 comes from another run (same sample range); shard 0 has flipped bytes inside arr_0.
    shutil.copy(other / "shards" / "shard_000001.npz", out_dir / "shards" / "shard_000001.npz")
    data = bytearray((out_dir / "shards" / "shard_000000.npz").read_bytes())
    data[2000] ^= 0xFF
    (out_dir / "shards" / "shard_000000.npz").write_bytes(bytes(data))

    assert cli.main(argv(out_dir, ckpt)) == 0
    log = (out_dir / "log.txt").read_text()
    assert "shard shard_000000.npz rejected (damaged: the CRC check of arr_0.npy failed)" in log
    assert "shard shard_000001.npz rejected (written by another run" in log
    assert "0 done, 3 shards to sample" in log
    assert sha256(final(out_dir)) == sha256(final(reference))
    rejected = sorted(os.listdir(out_dir / "shards" / "rejected"))
    assert len(rejected) == 4 and sum(n.endswith(".reason.txt") for n in rejected) == 2
    assert any("written by another run" in (out_dir / "shards" / "rejected" / n).read_text()
               for n in rejected if n.endswith(".txt"))


def test_merge_names_a_damaged_shard(tmp_path):
    paths = []
    for k in range(2):
        path = tmp_path / shard_files.shard_filename(k)
        with NpzWriter(path) as w:
            w.write("arr_0", np.full((2, 4, 4, 3), k, np.uint8))
        paths.append(path)
    data = bytearray(paths[1].read_bytes())
    data[200] ^= 0xFF
    paths[1].write_bytes(bytes(data))
    with pytest.raises(shard_files.ShardError, match="shard_000001.npz: cannot be read for the merge"):
        shard_files.merge_shards(paths, tmp_path / "merged.npz", with_labels=False)
    assert not (tmp_path / "merged.npz").exists()


# ------------------------------------------------------------------------------- 6. a stalled rank


def test_stalled_rank_is_taken_over_after_its_lease(reference, ckpt, tmp_path):
    out_dir, pid_file = tmp_path / "run", tmp_path / "rank1.pid"
    cmd = [mpiexec(), "--oversubscribe", "-n", "2", sys.executable, str(WORKER), "--stop-on-claim", "2",
           "--stop-rank", "1", "--pid-file", str(pid_file), *argv(out_dir, ckpt, shard_size=2, claim_lease=10)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Rank 1 stops holding the claim of its second shard; rank 0 samples it after the lease and merges.
        wait_for(lambda: final(out_dir).exists(), 180, "rank 0 to finish the run alone", proc)
        log = (out_dir / "log.txt").read_text()
        assert "waiting" in log and "rank(s) 1: shard(s) 4 (rank 1, last heartbeat" in log, log
        assert "shard 4: rank 1 (pid" in log and "rank 0 samples it instead" in log, log
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "shard 4/5 was taken over by another rank while rank 1 sampled it" in (out_dir / "log.rank1.txt").read_text()
    with np.load(final(reference)) as a, np.load(final(out_dir)) as b:
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # batch size 3 vs 2: float rounding only
    assert sorted(os.listdir(out_dir)) == ["config.yaml", "grid.png", "log.rank1.txt", "log.txt", final(out_dir).name]


# ------------------------------------------------------------------------------------ 7. a full disk


def test_full_disk_is_one_line_and_keeps_the_shards(reference, ckpt, tmp_path, capsys, monkeypatch, one_thread):
    out_dir = tmp_path / "run"
    real_write = npz_module.ArrayStream.write
    writes = []

    def write_until_full(self, chunk):
        if self.name == "arr_0":
            writes.append(1)
            if len(writes) > 2:  # shard 0's images come in batches of 3 and 1; the second shard's first fails
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, chunk)

    monkeypatch.setattr(npz_module.ArrayStream, "write", write_until_full)
    assert cli.main(argv(out_dir, ckpt)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no space left on the device of {out_dir} while writing {out_dir / 'shards' / 'shard_000001.npz'}" in err
    assert "a shard needs about" in err
    assert shard_names(out_dir) == ["shard_000000.npz"]
    assert not [n for n in os.listdir(out_dir / "shards") if ".tmp-" in n]
    monkeypatch.undo()

    # Before the merge: the free space must hold the merged file (as much again as the shards).
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert cli.main(argv(out_dir, ckpt)) == 1
    err = capsys.readouterr().err
    assert f"not enough space to merge the shards into {final(out_dir)}" in err and "more and rerun" in err
    assert shard_names(out_dir) == ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]
    assert not final(out_dir).exists()
    monkeypatch.undo()
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a: pytest.fail("finished shards sampled again"))
    assert cli.main(argv(out_dir, ckpt)) == 0
    assert sha256(final(out_dir)) == sha256(final(reference))


# ------------------------------------------------------------------------------------------ 8. SIGTERM


def test_sigterm_discards_the_shard_being_written_and_the_rerun_resumes(reference, ckpt, tmp_path, one_thread):
    out_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv(out_dir, ckpt)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard_dir = out_dir / "shards"
    wait_for(lambda: shard_dir.is_dir() and "shard_000000.npz" in os.listdir(shard_dir)
             and any(".tmp-" in n for n in os.listdir(shard_dir)), 120, "the second shard to be written", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert "\r" not in err  # no tqdm bar when stderr is not a terminal
    last = (out_dir / "log.txt").read_text().strip().splitlines()[-1]
    assert last.endswith("stopped by SIGTERM; rerun the same command to resume") and last[:4].isdigit()
    assert "error: stopped by SIGTERM; rerun the same command to resume" in err and "Traceback" not in err
    assert shard_names(out_dir) == ["shard_000000.npz"]
    assert not [n for n in os.listdir(shard_dir) if ".tmp-" in n]
    assert not (out_dir / "lock").exists()
    assert cli.main(argv(out_dir, ckpt)) == 0
    assert sha256(final(out_dir)) == sha256(final(reference))


# ------------------------------------------------------------------------------------ 9. bad values


BAD_VALUES = {
    "list as a scale": ("pag_scale: [1, 2]\n", {}, "pag_scale in --config"),
    "number as a layer": ("pag_layers: [middle_block.1, 3]\n", {"pag_layers": None}, "layer names must be strings"),
    "nan scale": ("", {"pag_scale": "nan"}, "pag_scale in the command line: expected a finite number"),
    "drop rate of another kind": ("", {"drop_rate": 7, "perturbation": "identity"}, "drop_rate must lie in [0, 1]"),
    "classifier scale without a classifier": ("", {"classifier_scale": 5}, "classifier_scale 5.0 is set but there is no"),
    "zero lease": ("", {"claim_lease": 0}, "claim_lease must be a positive number"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_before_anything_is_written(case, ckpt, tmp_path, capsys):
    text, flags, message = BAD_VALUES[case]
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out_dir = tmp_path / "out"
    assert cli.main(["--config", str(config)] + argv(out_dir, ckpt, **flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out_dir.exists()
    # The corrected command is not refused as "a different configuration": nothing was recorded.
    assert cli.main(argv(out_dir, ckpt, num_samples=2, shard_size=2)) == 0


def test_settings_that_do_not_apply_are_warned_about_and_do_not_block_a_resume(ckpt, tmp_path, capsys,
                                                                                monkeypatch, one_thread):
    out_dir = tmp_path / "run"
    flags = dict(pag_scale=0, num_samples=4, shard_size=2)
    assert cli.main(argv(out_dir, ckpt, drop_rate=0.25, **flags)) == 0
    log = (out_dir / "log.txt").read_text()
    assert "warning: pag_layers = ['input_blocks.5.1', 'middle_block.1'] is ignored: pag_scale is 0" in log
    assert "warning: drop_rate = 0.25 is ignored: pag_scale is 0" in log
    settings = yaml.safe_load((out_dir / "config.yaml").read_text())["settings"]
    for key in ("pag_layers", "perturbation", "drop_rate", "sag_layer", "classifier_scale", "classifier_depth",
                "num_samples", "shard_size"):
        assert key not in settings
    monkeypatch.setattr(sampling.Sampler, "sample", lambda *a: pytest.fail("sampled again"))
    assert cli.main(argv(out_dir, ckpt, pag_layers="middle_block.1", perturbation="blur", **flags)) == 0
    assert "the run is complete" in capsys.readouterr().out


# --------------------------------------------------------------------- 10. extending, other shard sizes


def test_extending_a_finished_run_reuses_its_rows(reference, ckpt, tmp_path, one_thread, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(reference, out_dir)
    assert cli.main(argv(out_dir, ckpt, num_samples=14)) == 0
    log = (out_dir / "log.txt").read_text()
    assert f"reused samples 0-7 of {final(out_dir).name} (this run with 10 samples) as 2 shard(s)" in log
    assert "8 done, 2 shards to sample" in log
    with np.load(final(reference)) as ten, np.load(final(out_dir, 14)) as fourteen:
        np.testing.assert_array_equal(fourteen["arr_0"][:8], ten["arr_0"][:8])
        np.testing.assert_array_equal(fourteen["arr_1"][:10], ten["arr_1"])
        assert np.abs(fourteen["arr_0"][8:10].astype(int) - ten["arr_0"][8:10].astype(int)).max() <= 1
        assert fourteen["arr_0"].shape == (14, 32, 32, 3)
    assert sha256(final(out_dir)) == sha256(final(reference))  # the 10-sample batch is kept
    record = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert record["runtime"]["num_samples"] == N and record["sessions"][-1]["num_samples"] == 14


def test_other_shard_size_with_shards_present_is_refused_clearly(ckpt, tmp_path, capsys, one_thread):
    out_dir = tmp_path / "run"
    with pytest.raises(Kill):
        cli.main(argv(out_dir, ckpt), on_shard_written=kill_after(2))
    before = snapshot(out_dir / "shards")
    assert cli.main(argv(out_dir, ckpt, shard_size=2)) == 2
    err = capsys.readouterr().err
    assert "cut with shard_size 4, not 2. Resume with --shard_size 4" in err, err
    assert snapshot(out_dir / "shards") == before


def test_a_misplaced_shard_found_during_the_run_is_rejected_not_fatal(ckpt, tmp_path, one_thread):
    # Only planning refuses a shard of another sample range (before anything is sampled); rank 0's collect, in the
    # middle of a run, moves it aside and samples it again, as any bad shard.
    out_dir = tmp_path / "run"

    def copy_first_over_last(count):
        if count == 1:
            shutil.copy(out_dir / "shards" / "shard_000000.npz", out_dir / "shards" / "shard_000002.npz")

    assert cli.main(argv(out_dir, ckpt), on_shard_written=copy_first_over_last) == 0
    with np.load(final(out_dir)) as batch:
        assert batch["arr_0"].shape == (N, 32, 32, 3)
    assert [p.name for p in (out_dir / "shards" / "rejected").glob("shard_000002*.npz")], "the copy was not set aside"


# ------------------------------------------------------------------------------------- 11. dry runs


def test_dry_run_runs_every_check(ckpt, tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out",
                       {"cell": [{"name": "ok", "pag_scale": 2},
                                 {"name": "badlayer", "pag_scale": 2, "pag_layers": "input_blocks.99.1"},
                                 {"name": "nockpt", "model_path": str(tmp_path / "missing.pt")}]},
                       ref_batch=str(tmp_path / "missing_ref.npz"))
    assert cli.sweep_main([str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "cell-ok  [new]" in captured.out
    assert "cell-badlayer  [invalid: guidance settings: this model has no module 'input_blocks.99.1'" in captured.out
    assert "cell-nockpt  [invalid: checkpoint not found" in captured.out
    assert "ref_batch" in captured.err and "missing_ref.npz not found" in captured.err
    assert "3 problem(s)" in captured.err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- smaller


def test_help_lists_allowed_values_and_each_default_once():
    text = " ".join(cli.build_sample_parser().format_help().split())
    assert "a finite number; 0 = no PAG" in text
    assert "one of identity, random_mask, noise, blur, drop" in text
    assert "one of constant, linear, adaptive" in text
    assert "a finite number; 0 = no SAG" in text
    device = text[text.rindex("--device DEVICE"):text.rindex("--overwrite")]
    assert device.count("(default:") == 1, device


def test_list_attention_blocks_script(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("list_attention_blocks", ROOT / "scripts" / "list_attention_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--flag", "image_size=32", "--flag", "num_channels=32", "--flag", "channel_mult=1,2,2",
                        "--flag", "attention_resolutions=16,8", "--flag", "num_res_blocks=1"]) in (0, None)
    out = capsys.readouterr().out
    assert "middle_block.1" in out and "input_blocks.3.1" in out and "16x16" in out


def test_log_file_lines_have_timestamps(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    logger.log("hello")
    logger.logkv("k", 1)
    logger.dumpkvs()
    logger.reset()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    hello = [line for line in lines if line.endswith("hello")][0]
    time.strptime(hello[:19], "%Y-%m-%d %H:%M:%S")
    assert any(line.startswith("| k") for line in lines)  # tables stay unstamped


def test_make_targets_do_not_reinstall_because_setup_py_is_newer(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").write_text("")
    os.utime(venv / ".installed", (946684800, 946684800))  # older than setup.py
    out = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install" not in out.stdout and "scripts/demo.py prepare" in out.stdout
    (venv / ".installed").unlink()
    out = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    assert "pip install" in out.stdout  # a missing environment is still installed


# ----------------------------------------------------------------------------------------- 12. the evaluator

DEMO_FEATURES = ROOT / "checkpoints" / "demo" / "features_demo.pt"


def image_batch(path, seed, n, size=32):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3))
    np.savez(path, np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2).astype(np.uint8))
    return path


def test_evaluator_script_with_the_demo_feature_net(tmp_path):
    ref, samples = image_batch(tmp_path / "ref.npz", 0, 120), image_batch(tmp_path / "s.npz", 1, 120)
    out = subprocess.run([sys.executable, str(ROOT / "evaluations" / "evaluator.py"), str(ref), str(samples),
                          "--feature-net", str(DEMO_FEATURES), "--no-cache", "--device", "cpu", "--no-progress",
                          "--json", str(tmp_path / "eval.json")], cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ImportError" not in out.stderr and out.stdout.splitlines()[1].startswith("FID: ")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["marker"] == "DEMO-FEATURES" and result["fid"] > 0


def test_evaluator_warns_about_other_resolutions_and_refuses_tiny_batches(tmp_path):
    from evaluations.evaluator import MIN_SAMPLES, evaluate

    class ColourFeatures:  # any resolution: per-channel means and spreads
        id, device, weights_path, random_weights, marker = "colour", torch.device("cpu"), None, False, None

        def __call__(self, images):
            x = images.astype(np.float32) / 255
            pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
            return {"pool": pool, "logits": pool, "spatial": pool}

    ref64 = image_batch(tmp_path / "ref64.npz", 0, 120, size=64)
    samples = image_batch(tmp_path / "s.npz", 1, 120)
    with pytest.warns(UserWarning, match="reference images are 64x64, the samples 32x32"):
        result = evaluate(str(ref64), str(samples), extractor=ColourFeatures(), cache_dir=None, progress=False,
                          metrics="fid")
    assert "the samples 32x32" in result["input_warnings"][0] and np.isfinite(result["fid"])

    common = dict(feature_net=str(DEMO_FEATURES), cache_dir=None, progress=False, device="cpu", metrics="fid")

    five = image_batch(tmp_path / "five.npz", 2, 5)
    ref = image_batch(tmp_path / "ref.npz", 0, 120)
    with pytest.raises(ValueError, match=f"five.npz holds 5 images, fewer than the minimum of {MIN_SAMPLES}"):
        evaluate(str(ref), str(five), **common)
    assert np.isfinite(evaluate(str(ref), str(five), min_samples=5, **common)["fid"])  # forced


# ------------------------------------------------------------------------ 13. the review's run-safety items


def test_a_shard_that_fails_the_merge_is_sampled_again(reference, ckpt, tmp_path, monkeypatch, one_thread):
    from sampling import shards as shards_module

    out_dir = tmp_path / "run"
    with pytest.raises(Kill):
        cli.main(argv(out_dir, ckpt), on_shard_written=kill_after(2))
    logger.reset()
    assert shard_names(out_dir) == ["shard_000000.npz", "shard_000001.npz"]

    def damage(count):  # shard 0 was verified when the run started; now it fails the merge
        if count == 1:
            path = out_dir / "shards" / "shard_000000.npz"
            data = bytearray(path.read_bytes())
            data[200] ^= 0xFF
            path.write_bytes(bytes(data))

    real_verify, polls = shards_module.collect, []

    def verify(plan, verified, with_labels):  # called once per poll while rank 0 waits for a shard
        polls.append(1)
        if len(polls) > 20:
            pytest.fail("rank 0 waits for a shard no rank samples")
        return real_verify(plan, verified, with_labels)

    monkeypatch.setattr(shards_module, "collect", verify)
    assert cli.main(argv(out_dir, ckpt), on_shard_claimed=damage) == 0
    log = (out_dir / "log.txt").read_text()
    assert "shard_000000.npz: cannot be read for the merge" in log and "it is sampled again" in log, log
    assert sha256(final(out_dir)) == sha256(final(reference))


def claims_plan(tmp_path, lease=600.0):
    """What ``Claims`` (and its ``claim_next``) read of a plan."""
    import types

    out_dir = tmp_path / "run"
    layout = types.SimpleNamespace(
        claims_dir=str(out_dir / "shards" / ".claims"), final_path=str(out_dir / "samples_8x32x32x3.npz"),
        shard_path=lambda k: str(out_dir / "shards" / shard_files.shard_filename(k)))
    return types.SimpleNamespace(layout=layout, **vars(layout),
        settings=types.SimpleNamespace(runtime=types.SimpleNamespace(claim_lease=lease)))


def test_a_slower_rank_claiming_after_the_merge_is_no_error(tmp_path):
    from sampling.claims import Claims

    plan = claims_plan(tmp_path)
    claims = Claims(plan, 1)
    try:
        shutil.rmtree(plan.claims_dir)  # rank 0 merged and removed the claims meanwhile
        assert claims.try_claim(0) == (False, None)
        os.makedirs(plan.claims_dir)
        Path(plan.final_path).write_bytes(b"merged")  # the shards are gone, the merged file is there
        assert claims.claim_next([0, 1]) == (None, None)
        assert os.listdir(plan.claims_dir) == []
    finally:
        claims.close()


def test_a_hung_rank_stops_refreshing_its_claim(tmp_path):
    from sampling.claims import Claims

    plan = claims_plan(tmp_path, lease=1.0)
    hung, other = Claims(plan, 1), Claims(plan, 0)
    try:
        assert hung.try_claim(0) == (True, None)
        deadline = time.time() + 2.0  # two leases of batches coming: the claim stays
        while time.time() < deadline:
            hung.progressed()
            assert other.try_claim(0) == (False, None)
            time.sleep(0.05)
        # Now the main thread hangs (no batch) while the heartbeat thread runs on: the claim expires.
        deadline = time.time() + 8.0
        while True:
            ok, note = other.try_claim(0)
            if ok:
                break
            assert time.time() < deadline, "the claim of a rank without progress is refreshed forever"
            time.sleep(0.05)
        assert "rank 1 (pid" in note and "rank 0 samples it instead" in note
        assert not hung.owned(0) and other.owned(0)
    finally:
        hung.close()
        other.close()


def test_rank0_watch_notices_a_dead_rank0(tmp_path, monkeypatch):
    from sampling.progress import PeerFailedError, Rank0Watch

    assert not Rank0Watch(str(tmp_path)).active  # no lock file: never a false alarm
    Rank0Watch(str(tmp_path)).check()
    held = lock.RunLock(str(tmp_path)).acquire()
    try:
        watch = Rank0Watch(str(tmp_path))
        watch.check()  # refreshed a moment ago
        old = time.time() - 5 * lock.HEARTBEAT_SECONDS
        os.utime(tmp_path / "lock", (old, old))  # rank 0 was killed: no heartbeat any more
        watch.check()  # seen stale once: one more beat for it to show life (a whole job suspended and resumed)
        watch.bad_since -= lock.HEARTBEAT_SECONDS
        with pytest.raises(PeerFailedError, match="rank 0 stopped without finishing.*not refreshed for"):
            watch.check()
    finally:
        held.release()
    watch = Rank0Watch(str(tmp_path), expected=True)  # the plan says rank 0 holds it: missing for long = gone
    watch.check()
    watch.bad_since -= lock.HEARTBEAT_SECONDS
    watch.check()  # missing for a moment only
    watch.seen -= 5 * lock.HEARTBEAT_SECONDS
    with pytest.raises(PeerFailedError, match="has been gone for"):
        watch.check()


def test_a_refused_sweep_leaves_the_running_sweeps_evaluation_markers(ckpt, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"pag_scale": [0, 2]})
    cfg = sweep.load_sweep(path)
    cells = sweep.expand(cfg)
    os.makedirs(cells[1].out_dir)
    running = lock.RunLock(cells[1].out_dir).acquire()  # the running sweep holds its cells' locks
    markers = evaluation_markers(cfg)
    try:
        for marker in markers:  # the running sweep's other ranks wait for these
            Path(marker).write_text("")
        with pytest.raises(lock.RunLockedError, match="is in use by another run"):
            sweep.run_sweep(cfg, cells, evaluate_fn=FakeEvaluator(), table_fn=no_table)
        assert all(os.path.exists(marker) for marker in markers)
    finally:
        running.release()


def test_stale_evaluation_markers_go_once_the_sweep_holds_its_cells(ckpt, tmp_path, one_thread):
    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"pag_scale": [0]})
    cfg = sweep.load_sweep(path)
    os.makedirs(cfg.out_dir)
    markers = evaluation_markers(cfg)
    for marker in markers:
        Path(marker).write_text("")
    sweep.run_sweep(cfg, sweep.expand(cfg), evaluate_fn=FakeEvaluator(), table_fn=no_table)
    assert not any(os.path.exists(marker) for marker in markers)


def test_lock_takeover_without_flock_has_one_winner(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    first, second = lock.RunLock(str(tmp_path)), lock.RunLock(str(tmp_path))
    real_rename, raced = os.rename, []

    def rename(src, dst):
        # The first process judged the lock dead; just before it moves the file away, the second one (which
        # judged it dead too) takes it over and puts its live lock in place.
        if not raced and str(src) == str(path) and ".stale-" in str(dst):
            raced.append(1)
            second.acquire()
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    try:
        with pytest.raises(lock.RunLockedError, match=f"is in use by another run: pid {os.getpid()}"):
            first.acquire()
        assert raced and second.fd is not None and first.fd is None
        assert os.fstat(second.fd).st_ino == os.stat(path).st_ino  # the live lock is still in place
        assert [n for n in os.listdir(tmp_path) if n != "lock"] == []
    finally:
        second.release()
        first.release()


def test_a_bad_set_value_and_an_unreadable_record_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    from sampling import plan as plan_module

    path = write_sweep(tmp_path / "s.yaml", ckpt, tmp_path / "out", {"pag_scale": [0]})
    assert cli.sweep_main([str(path), "--dry-run", "--set", "num_samples=[1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set num_samples=[1: the value is not valid YAML") and err.count("\n") == 1, err

    # One process: an error reading out_dir (here config.yaml) is one line with exit status 2, as with several.
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "config.yaml").write_text("settings: {}\n")

    def unreadable(directory):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(directory, "config.yaml"))

    monkeypatch.setattr(plan_module, "read_run_record", unreadable)
    assert cli.main(argv(out_dir, ckpt)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: PermissionError: [Errno 13] Permission denied") and err.count("\n") == 1, err

    def interrupted(directory):
        raise KeyboardInterrupt()

    monkeypatch.setattr(plan_module, "read_run_record", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not an error of the input: never turned into one
        cli.main(argv(out_dir, ckpt))


def test_rows_of_a_merged_batch_are_read_in_one_pass(tmp_path, monkeypatch):
    import zipfile

    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40, dtype=np.int64) * 3
    path = tmp_path / "samples_40x8x8x3.npz"
    with NpzWriter(path) as w:
        w.write("arr_0", images)
        w.write("arr_1", labels)
    bounds = [(k * 4, (k + 1) * 4) for k in range(10) if k != 3]  # shard 3 exists already: a gap

    real_read, read = zipfile.ZipExtFile.read, collections.Counter()

    def counting_read(self, n=-1):
        data = real_read(self, n)
        read[self.name] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    rows = list(shard_files.rows_from_batch(str(path), bounds, with_labels=True))
    assert [(start, end) for start, end, _, _ in rows] == bounds
    for start, end, got, got_labels in rows:
        np.testing.assert_array_equal(got, images[start:end])
        np.testing.assert_array_equal(got_labels, labels[start:end])
    # The CRC check reads the member once, the rows once more: not again up to each shard.
    assert read["arr_0.npy"] <= 2 * images.nbytes + 1024, read


def test_a_stale_claim_taken_over_twice_at_once_goes_to_one_rank(tmp_path, monkeypatch):
    """Rank B judges shard 0's claim stale; before B moves it, rank A takes it over (a fresh claim, a new file):
    B's move then catches A's claim, puts it back and leaves the shard to A (sampling it twice wasted a shard)."""
    import sampling.claims as claims_module
    from sampling.claims import Claims

    plan = claims_plan(tmp_path, lease=1.0)
    a, b = Claims(plan, 0), Claims(plan, 1)
    try:
        path = a.path(0)
        Path(path).write_text('{"rank": 2, "token": "dead"}')
        os.utime(path, (time.time() - 60, time.time() - 60))  # a claim of a dead rank
        real_rename = os.rename

        def a_takes_over_first(src, dst):
            if src == path and dst.endswith(b.token):
                monkeypatch.setattr(claims_module.os, "rename", real_rename)
                assert a.try_claim(0)[0]  # A moves the dead claim away and writes its own
            return real_rename(src, dst)

        monkeypatch.setattr(claims_module.os, "rename", a_takes_over_first)
        assert b.try_claim(0) == (False, None)
        assert a.owned(0) and not b.owned(0)
        assert sorted(os.listdir(plan.claims_dir)) == ["shard_000000.claim"]  # no stale file left behind
    finally:
        a.close()
        b.close()
