"""guided_diffusion.dist_util: launcher detection, one process without MPI, and real 2-process groups
(mpiexec, torchrun-style variables, SLURM-style variables) running tests/dist_worker.py."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adm_common import launch, rendezvous
from guided_diffusion import blobs, dist_util
from guided_diffusion.checkpoint import read_state_dict
from http_fixture import FileServer
from processes import LAUNCH_PREFIXES, LAUNCH_VARS, clean_env, free_port, run_together
from sampling import cli, process

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
    # with MASTER_PORT the job and step ids are not read (a step id need not be a number)
    assert launch.detect_launch(dict(SRUN_ENV, SLURM_STEP_ID="batch", MASTER_PORT="1234")).master_port == 1234


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


def test_place_from_incomplete_or_mixed_launcher_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "PMI_SIZE": "8", "MPI_LOCALRANKID": "3"}
    assert (launch.rank_from_env(env), launch.world_size_from_env(env), launch.local_rank_from_env(env)) == (1, 2, 1)
    assert launch.local_rank_from_env({"LOCAL_RANK": "3", "MPI_LOCALRANKID": "0"}) == 3  # no MPI launch
    mpiexec = {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1", "LOCAL_RANK": "0"}
    assert (launch.rank_from_env(mpiexec), launch.world_size_from_env(mpiexec)) == (1, 2)
    assert launch.local_rank_from_env(mpiexec) == 1


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
    assert not rendezvous._routable_address().startswith("127.")


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
        "import torch, sys; from sampling.process import tune_cpu_allocator; "
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


# --------------------------------------------- the run's device, shared GPUs, rendezvous timeouts (issue 19)


@pytest.fixture
def no_launcher(monkeypatch):
    """This process's environment without any launcher's variables; the module state reset afterwards."""
    for name in list(os.environ):
        if name in LAUNCH_VARS or name.startswith(LAUNCH_PREFIXES) or name.startswith("PAG_DIST_"):
            monkeypatch.delenv(name)
    yield monkeypatch
    dist_util.cleanup_dist()


def fake_gpus(monkeypatch, count, calls=None):
    """torch.cuda mocked: ``count`` GPUs, set_device recorded into ``calls`` (or refused when None)."""
    def set_device(index):
        if calls is None:
            raise AssertionError(f"torch.cuda.set_device({index}) on a CPU run")
        calls.append(index)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)


def test_backend_follows_the_run_device(no_launcher):
    fake_gpus(no_launcher, 1)
    assert dist_util._uses_cuda(None) and dist_util._uses_cuda("cuda:0")
    assert not dist_util._uses_cuda("cpu")
    assert dist_util._pick_backend(dist_util._uses_cuda(None)) == "nccl"
    assert dist_util._pick_backend(dist_util._uses_cuda("cpu")) == "gloo"
    no_launcher.setenv("PAG_DIST_BACKEND", "gloo")
    assert dist_util._pick_backend(True) == "gloo"  # still forces a backend
    no_launcher.setenv("PAG_DIST_BACKEND", "nccl")
    assert dist_util._pick_backend(False) == "nccl"
    with pytest.raises(dist_util.DistSetupError, match="NCCL moves GPU tensors only; unset PAG_DIST_BACKEND"):
        dist_util._check_backend("nccl", uses_cuda=False)
    no_launcher.setattr(torch.cuda, "is_available", lambda: False)
    assert not dist_util._uses_cuda("cuda")  # the run's own device check reports that (plan.resolve_device)
    with pytest.raises(dist_util.DistSetupError, match="backend nccl needs CUDA"):
        dist_util._check_backend("nccl", uses_cuda=False)


def test_cpu_run_on_a_gpu_machine_uses_gloo_and_never_a_gpu(no_launcher):
    fake_gpus(no_launcher, 1)  # set_device raises
    dist_util.setup_dist(device="cpu")
    assert dist_util.dev() == torch.device("cpu") and torch.distributed.get_backend() == "gloo"
    dist_util.cleanup_dist()
    calls = []
    fake_gpus(no_launcher, 4, calls)
    no_launcher.setenv("PAG_DIST_BACKEND", "gloo")  # NCCL cannot start on this CPU machine
    dist_util.setup_dist(device="cuda:2")
    assert dist_util.dev() == torch.device("cuda", 2) and calls == [2]
    dist_util.cleanup_dist()
    calls.clear()
    dist_util.setup_dist()  # upstream's call: the local rank's GPU
    assert dist_util.dev() == torch.device("cuda", 0) and calls == [0]


def test_shared_gpu_message_names_ranks_gpu_and_fix(no_launcher):
    fake_gpus(no_launcher, 8)
    assert [dist_util.cuda_index(r, wrap=True) for r in (0, 7, 8, 9)] == [0, 7, 0, 1]
    with pytest.raises(RuntimeError, match="local rank 9 but only 8 GPUs are visible"):
        dist_util.cuda_index(9)  # without a group to name the ranks (an adopted one, dev() before set-up)

    def record(host, index, uuid, visible=8):
        return {"host": host, "index": index, "visible": visible, "gpu": f"uuid:{uuid}"}

    # 16 ranks on one 8-GPU node: ranks 0 and 8 share GPU 0 (and 7 more pairs).
    records = [record("node1", r % 8, f"GPU-{r % 8}") for r in range(16)]
    assert dist_util._shared_gpu_error(records) == (
        "ranks 0 and 8 on host node1 would share GPU 0 (8 visible) (and 7 more shared GPUs): start one process per "
        "GPU (at most 8 per node: mpiexec -n, torchrun --nproc_per_node, srun --ntasks-per-node; or srun "
        "--gpus-per-task=1), or set device: cpu")
    # srun --gpus-per-task=1: every task sees one GPU, numbered 0, each a different one.
    assert dist_util._shared_gpu_error([record("node1", 0, f"GPU-{r}", 1) for r in range(8)]) is None
    # srun --ntasks-per-node=3 --gres=gpu:1: the same one.
    one = [record("node1", 0, "GPU-a", 1)] * 3 + [record("node2", 0, "GPU-b", 1)]
    assert dist_util._shared_gpu_error(one).startswith("ranks 0, 1 and 2 on host node1 would share GPU 0 (1 visible)")
    assert dist_util._shared_gpu_error([None, None]) is None  # CPU ranks share nothing
    # device: cuda:2 given to every rank of a node: the message names the setting, not the process count.
    assert dist_util._shared_gpu_error([record("node1", 2, "GPU-2")] * 2, pinned=2) == (
        "ranks 0 and 1 on host node1 would share GPU 2: every rank was given device cuda:2; with several processes "
        "per node use device: cuda (each takes its local rank's GPU)")
    # Without a UUID: the host and the visible-devices entry identify the GPU.
    no_launcher.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    no_launcher.setattr(torch.cuda, "get_device_properties", lambda i: object())
    assert dist_util._gpu_record(1) == {"host": socket.gethostname(), "index": 1, "visible": 8,
                                        "gpu": f"{socket.gethostname()}:5"}


MOCKED_GPUS = r"""
import json, os, sys, torch
# A machine with MOCK_GPUS GPUs (mocked); MOCK_UUID names them; set_device is recorded.
count = int(os.environ["MOCK_GPUS"])
calls = []
class Props:
    def __init__(self, i):
        self.uuid = f"{os.environ['MOCK_UUID']}-{i}"
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: count
torch.cuda.set_device = lambda i: calls.append(int(i))
torch.cuda.get_device_properties = lambda i: Props(i)
from guided_diffusion import dist_util as d
try:
    d.setup_dist(device=sys.argv[1] or None)
except d.DistSetupError as e:
    print(json.dumps({"error": str(e), "everywhere": e.everywhere, "set_device": calls}))
    sys.exit(3)
t = torch.tensor([float(d.get_rank() + 1)])
d.all_reduce(t)
store = torch.distributed.distributed_c10d._get_default_store()
print(json.dumps({"backend": torch.distributed.get_backend(), "dev": str(d.dev()), "set_device": calls,
                  "sum": t.item(), "store_timeout_s": store.timeout.total_seconds()}))
d.cleanup_dist()
"""


def _mocked_pair(device, gpus=1, uuids=("GPU-same", "GPU-same"), **extra):
    port = free_port()
    envs = [clean_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      MOCK_GPUS=gpus, MOCK_UUID=uuids[r], **extra) for r in range(2)]
    results = run_together([[sys.executable, "-c", MOCKED_GPUS, device]] * 2, envs, 180)
    return [(code, json.loads(text.strip().splitlines()[-1])) for code, text in results]


def test_two_cpu_ranks_on_a_one_gpu_machine(tmp_path):
    """`make demo` (mpiexec -n 2, device: cpu) on a one-GPU workstation: gloo, no GPU touched; the store waits
    as long as collectives once connected."""
    results = _mocked_pair("cpu", PAG_DIST_TIMEOUT_MINUTES=30, PAG_DIST_CONNECT_TIMEOUT_SECONDS=60)
    for code, res in results:
        assert code == 0, res
        assert res == {"backend": "gloo", "dev": "cpu", "set_device": [], "sum": 3.0, "store_timeout_s": 1800.0}


def test_two_gpu_ranks_on_one_gpu_stop_with_one_line():
    results = _mocked_pair("")  # the default device: the GPU (NCCL would fail with "Duplicate GPU detected")
    for code, res in results:
        assert code == 3 and res["everywhere"] is True and res["set_device"] == []
        assert res["error"] == (
            f"ranks 0 and 1 on host {socket.gethostname()} would share GPU 0 (1 visible): start one process per "
            "GPU (at most 1 per node: mpiexec -n, torchrun --nproc_per_node, srun --ntasks-per-node; or srun "
            "--gpus-per-task=1), or set device: cpu")


def test_one_gpu_per_task_each_its_own_starts():
    # srun --gpus-per-task=1: each task sees one GPU (index 0), a different one (gloo: no NCCL on this machine).
    results = _mocked_pair("", uuids=("GPU-a", "GPU-b"), PAG_DIST_BACKEND="gloo")
    for code, res in results:
        assert code == 0, res
        assert res["dev"] == "cuda:0" and res["set_device"] == [0] and res["sum"] == 3.0


def test_unreachable_rendezvous_fails_within_the_connect_timeout(no_launcher):
    port = free_port()  # nothing listens there
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            PAG_DIST_CONNECT_TIMEOUT_SECONDS="2").items():
        no_launcher.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(dist_util.DistSetupError) as caught:
        dist_util.setup_dist(device="cpu")
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 30  # torch retries once: about twice the timeout, never the collective's 12 hours
    message = str(caught.value)
    assert message.startswith(f"rank 1 (host {socket.gethostname()}) could not connect to the rendezvous at "
                              f"127.0.0.1:{port} within ")
    assert "(torchrun launch): check that MASTER_ADDR/MASTER_PORT" in message
    assert "PAG_DIST_CONNECT_TIMEOUT_SECONDS=2 sets the wait" in message and "\n" not in message
    assert not caught.value.everywhere and not torch.distributed.is_initialized()
    assert dist_util.launcher() == "none"  # nothing half set up


def test_rank_that_never_joins_is_named_within_the_connect_timeout(no_launcher):
    for name, value in dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                            SLURM_JOB_ID="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                            PAG_DIST_CONNECT_TIMEOUT_SECONDS="2").items():
        no_launcher.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(dist_util.DistSetupError, match=r"^rank 1 of 2 did not join the rendezvous at 127\.0\.0\.1:"
                       r"\d+ within 2 s \(slurm launch\): look for their errors, check that rank 0 runs on the first "
                       r"node of the step") as caught:
        dist_util.setup_dist(device="cpu")
    assert time.monotonic() - started < 30 and caught.value.everywhere


def test_timeout_variables_are_checked(no_launcher):
    assert dist_util.connect_timeout() == datetime.timedelta(seconds=300)
    assert dist_util.process_group_timeout() == datetime.timedelta(minutes=720)
    no_launcher.setenv("PAG_DIST_CONNECT_TIMEOUT_SECONDS", "90")
    assert dist_util.connect_timeout() == datetime.timedelta(seconds=90)
    for bad, problem in (("soon", "is not a number of seconds"), ("0", "must be a positive number of seconds"),
                         ("-5", "must be a positive"), ("inf", "must be a positive")):
        no_launcher.setenv("PAG_DIST_CONNECT_TIMEOUT_SECONDS", bad)
        with pytest.raises(ValueError, match=f"PAG_DIST_CONNECT_TIMEOUT_SECONDS='{bad}' {problem}"):
            dist_util.connect_timeout()
    no_launcher.setenv("PAG_DIST_TIMEOUT_MINUTES", "x")
    with pytest.raises(ValueError, match="PAG_DIST_TIMEOUT_MINUTES='x' is not a number of minutes"):
        dist_util.process_group_timeout()


# ------------------------------------------------------------- the sampling entry points start the group late


def test_group_device_of_runs():
    def settings(device):
        return cli.resolve_cli(["--model_path", "m.pt", "--out_dir", "o", "--device", device])

    assert process.group_device([settings("cpu")]) == "cpu"
    assert process.group_device([settings("cuda:1")]) == "cuda:1"
    assert process.group_device([settings("")]) is None
    assert process.group_device([settings("cpu"), settings("cpu")]) == "cpu"
    assert process.group_device([settings("cpu"), settings("")]) is None  # a sweep: cpu only if every cell is
    assert process.group_device([settings("cpu"), settings("cuda")]) is None


def test_entry_points_resolve_settings_before_the_group(no_launcher, tmp_path, capsys):
    started = []

    def fake_setup(backend=None, device=None):
        started.append(device)
        raise dist_util.DistSetupError("stopped here", everywhere=True)

    no_launcher.setattr(dist_util, "setup_dist", fake_setup)
    assert cli.main(["--model_path", "m.pt", "--out_dir", str(tmp_path), "--device", "cpu"]) == 2
    assert started == ["cpu"] and capsys.readouterr().err == "error: stopped here\n"
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"out_dir: {tmp_path / 'out'}\nbase: {{model_path: m.pt, device: cpu}}\n"
                     "grid: {pag_scale: [0, 2]}\n")
    assert cli.sweep_main([str(sweep)]) == 2 and started == ["cpu", "cpu"]
    sweep.write_text(f"out_dir: {tmp_path / 'out'}\nbase: {{model_path: m.pt}}\ngrid: {{device: [cpu, cuda]}}\n")
    assert cli.sweep_main([str(sweep)]) == 2 and started == ["cpu", "cpu", None]
    capsys.readouterr()

    # A settings error comes before any group: printed once per job, by the launcher's rank 0.
    def refuse(backend=None, device=None):
        raise AssertionError("no group for a bad setting")

    no_launcher.setattr(dist_util, "setup_dist", refuse)
    for rank, expected in ((1, ""), (0, "error: num_samples must be positive, got 0\n")):
        for name, value in dict(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=1).items():
            no_launcher.setenv(name, str(value))
        assert cli.main(["--model_path", "m.pt", "--out_dir", str(tmp_path), "--num_samples", "0"]) == 2
        assert capsys.readouterr().err == expected
    # A rank that cannot connect says so itself, with its rank.
    no_launcher.setattr(dist_util, "setup_dist", lambda backend=None, device=None: (_ for _ in ()).throw(
        dist_util.DistSetupError("could not connect", everywhere=False)))
    no_launcher.setenv("RANK", "1")
    assert cli.main(["--model_path", "m.pt", "--out_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "[rank 1] error: could not connect\n"


def test_store_keys_and_host_under_torchrun_agent(monkeypatch):
    """torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT and keeps it across restarts: no rank hosts a
    second one, and each restart's start-up uses its own keys (not the previous attempt's records)."""
    made = []

    class FakeStore:
        def __init__(self, addr, port, world, is_master, **kwargs):
            made.append(is_master)

    monkeypatch.setattr(dist_util.dist, "TCPStore", FakeStore)
    info = dist_util.LaunchInfo("torchrun", 0, 2, 0, "127.0.0.1", 29500)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    dist_util.connect_store(info, datetime.timedelta(seconds=1))
    assert dist_util._setup_prefix() == "pag_setup/0/"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    dist_util.connect_store(info, datetime.timedelta(seconds=1))
    assert made == [True, False] and dist_util._setup_prefix() == "pag_setup/2/"


def test_an_adopted_group_takes_the_launchers_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setattr(dist_util.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist_util.dist, "get_rank", lambda: 5)
    monkeypatch.setattr(dist_util.dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(dist_util.dist, "get_backend", lambda: "gloo")
    try:
        dist_util.setup_dist(device="cpu")
        assert dist_util._state.launcher == "external" and dist_util._state.local_rank == 1
    finally:
        dist_util._state = dist_util._State()
