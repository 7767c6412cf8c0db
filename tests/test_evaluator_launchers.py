"""The evaluator under torchrun / srun / mpiexec splits the feature extraction over the processes (one launcher
detection, adm_common.launch), instead of every process computing the whole thing."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from processes import LAUNCH_PREFIXES, LAUNCH_VARS, clean_env, free_port, run_together

WORKER = r"""
import json, sys
import numpy as np
from evaluations.reference import detect_distributed, extract_features

class MeanColour:  # a stand-in extractor: the mean colour of each image, and how many images it saw
    seen = 0
    def __call__(self, images):
        MeanColour.seen += len(images)
        pool = images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)
        return {"pool": pool, "logits": pool, "spatial": pool}

dist = detect_distributed()
feats = extract_features(sys.argv[1], MeanColour(), batch_size=4, dist=dist)
dist.close()  # destroys the group detect_distributed made
print(json.dumps({"kind": type(dist).__name__, "rank": dist.rank, "world": dist.world_size,
                  "seen": MeanColour.seen, "rows": None if feats is None else feats["pool"].tolist()}))
"""


def _launch(npz, env_for_rank):
    results = run_together([[sys.executable, "-c", WORKER, str(npz)]] * 2, [clean_env(**env_for_rank(r))
                                                                          for r in range(2)], 180)
    out = []
    for code, text in results:
        assert code == 0, text
        out.append(json.loads([line for line in text.splitlines() if line.startswith("{")][-1]))
    return out


def _check(results, images):
    assert [r["kind"] for r in results] == ["TorchDistributed", "TorchDistributed"]
    assert [r["seen"] for r in results] == [5, 4]  # each process extracted its own slice only
    expected = images.reshape(len(images), -1, 3).mean(axis=1)
    np.testing.assert_allclose(np.array(results[0]["rows"]), expected, rtol=1e-6)
    assert results[1]["rows"] is None


def test_torchrun_and_srun_split_the_extraction(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    npz = tmp_path / "batch.npz"
    np.savez(npz, arr_0=images)
    port = free_port()
    _check(_launch(npz, lambda r: dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))), images)
    port = free_port()
    _check(_launch(npz, lambda r: dict(SLURM_PROCID=str(r), SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                                       SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))), images)


def test_mpiexec_splits_the_extraction(tmp_path):
    # Under mpiexec the evaluator meets over a gloo group on a TCP store (adm_common.rendezvous, as the sampler).
    import shutil
    from pathlib import Path

    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: `make install` installs the openmpi package into .venv"
    images = np.random.default_rng(1).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    npz = tmp_path / "batch.npz"
    np.savez(npz, arr_0=images)
    done = subprocess.run([mpiexec, "--oversubscribe", "-n", "2", sys.executable, "-c", WORKER, str(npz)],
                          env=clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    results = sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    _check(results, images)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("env", [
    dict(RANK="9", WORLD_SIZE="12", LOCAL_RANK="3", MASTER_ADDR="node1", MASTER_PORT="29500"),
    dict(SLURM_PROCID="9", SLURM_LOCALID="3", SLURM_STEP_NUM_TASKS="12", SLURM_STEP_ID="0", SLURM_JOB_ID="5",
         MASTER_ADDR="node1"),
    dict(OMPI_COMM_WORLD_SIZE="12", OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_LOCAL_RANK="3"),
], ids=["torchrun", "srun", "mpiexec"])
def test_each_process_takes_the_gpu_of_its_local_rank(env, monkeypatch, tmp_path):
    """2 nodes x 6 processes on 8-GPU nodes: rank 9 is local rank 3 of the second node, so cuda:3 (its global rank
    gave cuda:1, which local rank 1 of that node uses)."""
    from evaluations import evaluator

    for name in list(os.environ):
        if name in LAUNCH_VARS or name.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    chosen = []

    def extractor(*args, device=None, **kwargs):
        chosen.append(device)
        raise _Stop

    monkeypatch.setattr(evaluator, "InceptionFeatures", extractor)
    images = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    for name in ("ref.npz", "sample.npz"):
        np.savez(tmp_path / name, arr_0=images)
    one_of_many = SimpleNamespace(rank=9, world_size=12)  # an evaluation split over 12 processes
    with pytest.raises(_Stop):
        evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), dist=one_of_many,
                           cache_dir=None, progress=False)
    assert chosen == ["cuda:3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: each its own GPU 0
    with pytest.raises(_Stop):
        evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), dist=one_of_many,
                           cache_dir=None, progress=False)
    assert chosen == ["cuda:3", "cuda:0"]


def test_evaluator_needs_no_guided_diffusion():
    code = ("import sys, evaluations.evaluator, evaluations.reference; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('guided_diffusion', 'sampling')))")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_unreachable_rendezvous_stops_the_evaluator_within_the_connect_timeout(tmp_path):
    """A wrong MASTER_ADDR/MASTER_PORT under torchrun: rank 1 stops in seconds with the address it tried (not
    after torch's 30-minute default), exit status 2."""
    import time

    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    port = free_port()  # nobody listens there
    env = clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                    PAG_DIST_CONNECT_TIMEOUT_SECONDS="2")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "evaluations/evaluator.py", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"),
                          "--allow-random-weights"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 60
    assert f"127.0.0.1:{port}" in out.stderr and "PAG_DIST_CONNECT_TIMEOUT_SECONDS" in out.stderr
    assert "[rank 1] error: rank 1" in out.stderr
