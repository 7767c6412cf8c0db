"""guided_diffusion.dist_util: launcher detection, one process without MPI, and real 2-process groups
(mpiexec, torchrun-style variables, SLURM-style variables) running tests/dist_worker.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adm_common import launch
from guided_diffusion import blobs, dist_util
from guided_diffusion.checkpoint import read_state_dict
from http_fixture import FileServer
from processes import clean_env, free_port, run_together

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
@pytest.fixture
def checkpoint(tmp_path):
    state = {"w": torch.arange(3000, dtype=torch.float32).reshape(30, 100), "b": torch.ones(7)}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    return path, float(sum(v.double().sum() for v in state.values()))


def check_results(out_dir, expected_sum, launcher):
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["launcher"] == launcher
        assert res["local_rank"] == r
        assert res["all_reduce"] == 3.0
        assert res["all_reduce_avg"] == 0.5
        assert res["gathered"] == [{"rank": 0, "text": "r"}, {"rank": 1, "text": "rr"}]
        assert res["state_keys"] == ["b", "w"]
        assert res["state_sum"] == expected_sum
        assert "checkpoint not found" in res["missing_error"]
        assert res["synced"] == [0.0, 0.0]  # rank 0's values everywhere
    return results


# ------------------------------------------------------------------------------------ detection


def test_no_launcher_means_single_process():
    assert launch.detect_launch({}).launcher == "none"
    assert launch.detect_launch({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}).launcher == "none"


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    info = launch.detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        "torchrun", 3, 8, 1, "node7", 29400)


def test_torchrun_variables_incomplete_or_bad():
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT are not set"):
        launch.detect_launch({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        launch.detect_launch({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                 "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="PAG_DIST_LAUNCHER"):
        launch.detect_launch({"PAG_DIST_LAUNCHER": "pbs"})


SRUN_ENV = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-09,11]",
            "SLURM_JOB_NODELIST": "gpu[07-09,11]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5"}


def test_srun_step(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)  # no scontrol here
    info = launch.detect_launch(SRUN_ENV)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == (
        "slurm", 5, 8, 1, "gpu07")
    assert info.master_port == launch.detect_launch(dict(SRUN_ENV, SLURM_PROCID="0")).master_port
    assert 1024 < info.master_port < 65536
    assert launch.detect_launch(dict(SRUN_ENV, MASTER_ADDR="head", MASTER_PORT="1234")).master_addr == "head"


def test_srun_without_node_list_uses_launch_node():
    env = {k: v for k, v in SRUN_ENV.items() if "NODELIST" not in k}
    assert launch.detect_launch(env).master_addr == "10.0.0.5"


def test_sbatch_script_without_srun_is_one_process():
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=8 but is not a step of 8 tasks.
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert launch.detect_launch(env).launcher == "none"


def test_mpiexec_inside_allocation_is_mpi():
    # mpiexec started from a batch script: every process inherits SLURM_PROCID=0 of the batch step.
    env = dict(SRUN_ENV, SLURM_PROCID="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2")
    assert launch.detect_launch(env).launcher == "mpi"
    # srun --mpi=pmix: both agree, SLURM's variables are used (no MPI import needed).
    env = dict(SRUN_ENV, PMIX_RANK="5", PMIX_SIZE="8")
    assert launch.detect_launch(env).launcher == "slurm"
    assert launch.detect_launch({"PMI_SIZE": "2", "PMI_RANK": "1"}).launcher == "mpi"


def test_forced_launcher():
    assert launch.detect_launch(dict(SRUN_ENV, PAG_DIST_LAUNCHER="none")).launcher == "none"
    assert launch.detect_launch({"PAG_DIST_LAUNCHER": "mpi"}).launcher == "mpi"


def test_expand_slurm_nodelist_without_scontrol(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.expand_slurm_nodelist("gpu[07-09,11],login1,r-[1-2]-x") == [
        "gpu07", "gpu08", "gpu09", "gpu11", "login1", "r-1-x", "r-2-x"]
    assert launch.expand_slurm_nodelist("node5") == ["node5"]
    with pytest.raises(ValueError, match="empty"):
        launch.expand_slurm_nodelist(" ")


# ------------------------------------------------------------------------------- one process


SINGLE = r"""
import json, sys, torch
from guided_diffusion import dist_util as d
d.setup_dist(); d.setup_dist()
t = torch.tensor([2.0]); d.all_reduce(t)
p = [torch.ones(2)]; d.sync_params(p); d.barrier()
state = d.load_state_dict(sys.argv[1], map_location="cpu", weights_only=True)
print(json.dumps({"rank": d.get_rank(), "world": d.get_world_size(), "main": d.is_main_process(),
    "launcher": d.launcher(), "dev": str(d.dev()), "group": torch.distributed.is_initialized(),
    "mpi4py": "mpi4py" in sys.modules, "reduced": t.item(), "gathered": d.all_gather_object(5),
    "keys": sorted(state)}))
d.cleanup_dist()
"""


def test_single_process_needs_no_mpi_and_makes_a_local_group(checkpoint):
    """As upstream: torch.distributed works in one process (upstream's scripts call it directly), without MPI."""
    path, _ = checkpoint
    out = subprocess.run([sys.executable, "-c", SINGLE, str(path)], env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"rank": 0, "world": 1, "main": True, "launcher": "none", "dev": "cpu", "group": True,
                   "mpi4py": False, "reduced": 2.0, "gathered": [5], "keys": ["b", "w"]}


def test_load_state_dict_sources_and_errors(checkpoint, tmp_path):
    path, total = checkpoint
    assert sorted(dist_util.load_state_dict(str(path), weights_only=True)) == ["b", "w"]
    assert sorted(dist_util.load_state_dict(path.as_uri(), weights_only=True)) == ["b", "w"]
    with FileServer() as server:
        server.files["/c.pt"] = path.read_bytes()
        state = dist_util.load_state_dict(server.url("/c.pt"), map_location="cpu", weights_only=True)
        assert float(sum(v.double().sum() for v in state.values())) == total
        with pytest.raises(FileNotFoundError, match="HTTP 404"):
            dist_util.load_state_dict(server.url("/missing.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        dist_util.load_state_dict(str(tmp_path / "nope.pt"))
    with pytest.raises(IsADirectoryError):
        dist_util.load_state_dict(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        dist_util.load_state_dict("ftp://host/x.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"\(500 bytes\) is not a readable PyTorch checkpoint"):
        read_state_dict(str(truncated))  # the project's loader; dist_util.load_state_dict is upstream's raw one
    with pytest.raises(Exception):
        dist_util.load_state_dict(str(truncated))


def test_rendezvous_address_is_not_loopback(monkeypatch):
    # /etc/hosts often maps the host name to 127.0.1.1, which other nodes cannot reach.
    monkeypatch.setattr(dist_util.socket, "getaddrinfo",
                        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0))])
    assert not dist_util._routable_address().startswith("127.")


def test_blob_urls_go_to_blobfile():
    assert blobs._is_blob_url("gs://bucket/x.pt")
    assert blobs._is_blob_url("az://account/container/x.pt")
    assert blobs._is_blob_url("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/x.pt")
    assert not blobs._is_blob_url("https://example.org/x.pt")
    assert not blobs._is_blob_url("/data/x.pt")


# ------------------------------------------------------------------------- two real processes


def test_mpiexec_two_processes(checkpoint, tmp_path):
    path, total = checkpoint
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: `make install` installs the openmpi package into .venv"
    env = clean_env()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run([mpiexec, "--oversubscribe", "-n", "2", sys.executable, str(WORKER), str(path),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    results = check_results(tmp_path, total, "mpi")
    assert all(r["mpi4py_imported"] for r in results)


def _run_pair(envs, path, out_dir):
    results = run_together([[sys.executable, str(WORKER), str(path), str(out_dir)]] * len(envs), envs, 180)
    for code, text in results:
        assert code == 0, text


def test_torchrun_style_two_processes(checkpoint, tmp_path):
    path, total = checkpoint
    port = free_port()
    envs = [clean_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(2)]
    _run_pair(envs, path, tmp_path)
    results = check_results(tmp_path, total, "torchrun")
    assert not any(r["mpi4py_imported"] for r in results)


def test_slurm_style_two_processes(checkpoint, tmp_path):
    path, total = checkpoint
    port = free_port()
    envs = [clean_env(SLURM_PROCID=r, SLURM_LOCALID=r, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_STEP_ID=0,
                      SLURM_JOB_ID=1, SLURM_STEP_NODELIST="localhost", MASTER_PORT=port) for r in range(2)]
    _run_pair(envs, path, tmp_path)
    results = check_results(tmp_path, total, "slurm")
    assert not any(r["mpi4py_imported"] for r in results)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_cpu_allocator_keeps_freed_blocks_in_the_heap():
    import ctypes.util

    if "libc" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("no glibc")
    script = (
        "import torch, sys; from sampling.allocator import tune_cpu_allocator; "
        "tuned = tune_cpu_allocator() if sys.argv[1] == '1' else False; "
        "import resource; "
        "exec('for _ in range(10): block = torch.ones(64 * 2**20 // 4); del block'); "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
        "exec('for _ in range(10): block = torch.ones(64 * 2**20 // 4); del block'); "
        "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    faults = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, check=True,
                             cwd=ROOT).stdout.split()
        faults[flag] = (out[0], int(out[1]))
    assert faults["1"][0] == "True"
    # After a warm-up, ten fresh 64 MiB tensors: mmap'd and faulted in every time by default (16384
    # pages each), reused from the heap when tuned.
    assert faults["0"][1] > 10 * faults["1"][1]
