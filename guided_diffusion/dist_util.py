"""Process-group set-up and small collective helpers.

One process group serves every launcher:

* ``torchrun`` (or anything else that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT``),
* SLURM ``srun`` steps (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the rendezvous host is the first node of the step),
* ``mpiexec``/``mpirun`` (mpi4py's ``COMM_WORLD``; rank 0 picks host and a free port and
  broadcasts them).

The launcher is detected in that order.  A process started by none of them runs as world
size 1: no process group is created and mpi4py is never imported (importing mpi4py
initialises MPI, which is slow and can fail on machines without a working MPI).
Set ``PAG_DIST_LAUNCHER`` to ``torchrun``, ``slurm``, ``mpi`` or ``none`` to skip the
detection, and ``PAG_DIST_BACKEND`` to force ``nccl`` or ``gloo``.

Backend: NCCL when CUDA is available, gloo otherwise.  Each process uses the GPU of its
local rank (``dev()``).
"""

import ctypes
import ctypes.util
import io
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

from .checkpoint import state_dict_from_bytes

# Bytes per broadcast call in load_state_dict (module-level so tests can shrink it).
BROADCAST_CHUNK_BYTES = 1 << 27

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Variables that an MPI launcher puts into every process it starts.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                        "PALS_LOCAL_RANKID")


@dataclass
class LaunchInfo:
    """What the environment says about this process's place in the job."""

    launcher: str  # "torchrun", "slurm", "mpi" or "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


@dataclass
class _State:
    initialized: bool = False
    owns_group: bool = False
    launcher: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: Optional[torch.device] = None


_state = _State()


# ----------------------------------------------------------------------------- detection


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _first_var(env: Mapping[str, str], names) -> Optional[str]:
    for name in names:
        if env.get(name, "") != "":
            return name
    return None


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM host list such as ``gpu[01-03,07],login1`` into host names.

    Uses ``scontrol show hostnames`` when it is on PATH; otherwise a parser for the common
    forms (comma-separated hosts, one bracketed range group per host, zero padding kept).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to parsing below
    hosts: List[str] = []
    parts: List[str] = []
    depth, cur = 0, ""
    for ch in nodelist:  # split on commas that are not inside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, _, rest = part.partition("[")
        body, _, suffix = rest.partition("]")
        if "[" in suffix:
            raise ValueError(f"cannot expand SLURM node list {nodelist!r} without scontrol")
        for item in body.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _slurm_port(env: Mapping[str, str]) -> int:
    """A port every task of the step derives alike, without talking to the others."""
    job = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")) or 0)
    step = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")) or 0)
    return 15000 + (job * 7 + step) % 20000


def _detect_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    missing = [v for v in _TORCHRUN_VARS if env.get(v, "") == ""]
    if missing:
        raise ValueError(
            "torchrun-style launch detected (RANK/WORLD_SIZE set) but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; set all of "
            f"{', '.join(_TORCHRUN_VARS)} or launch with torchrun")
    return LaunchInfo("torchrun", _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE"),
                      _int_var(env, "LOCAL_RANK"), env["MASTER_ADDR"], _int_var(env, "MASTER_PORT"))


def _detect_slurm(env: Mapping[str, str]) -> LaunchInfo:
    size_var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    world = _int_var(env, size_var)
    rank = _int_var(env, "SLURM_PROCID")
    local = _int_var(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0
    addr = env.get("MASTER_ADDR") or None
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            addr = expand_slurm_nodelist(nodelist)[0]
    if addr is None:
        addr = env.get("SLURM_LAUNCH_NODE_IPADDR") or None
    if addr is None:
        raise ValueError("SLURM launch detected but no rendezvous host: none of MASTER_ADDR, "
                         "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_LAUNCH_NODE_IPADDR is set")
    port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else _slurm_port(env)
    return LaunchInfo("slurm", rank, world, local, addr, port)


def _mpi_env_size_rank(env: Mapping[str, str]):
    size_name = _first_var(env, _MPI_SIZE_VARS)
    rank_name = _first_var(env, _MPI_RANK_VARS)
    size = _int_var(env, size_name) if size_name else None
    rank = _int_var(env, rank_name) if rank_name else None
    return size, rank


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Work out the launcher from environment variables alone (never imports mpi4py).

    For MPI the result only says ``launcher="mpi"``; the rank and size come from mpi4py
    in ``setup_dist``.  A SLURM step whose variables disagree with those of an MPI launcher
    (``mpiexec`` run inside an ``sbatch`` script inherits the batch step's SLURM_PROCID=0)
    is treated as an MPI launch.  The batch script itself (no ``SLURM_STEP_ID``) is not a
    SLURM launch: ``python script.py`` in an sbatch script runs as one process.
    """
    env = os.environ if env is None else env
    forced = env.get("PAG_DIST_LAUNCHER", "").strip().lower()
    if forced and forced not in ("torchrun", "slurm", "mpi", "none"):
        raise ValueError(f"PAG_DIST_LAUNCHER={forced!r}: expected torchrun, slurm, mpi or none")
    if forced == "none":
        return LaunchInfo("none")
    if forced == "torchrun" or (not forced and env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != ""):
        return _detect_torchrun(env)
    if forced == "mpi":
        return LaunchInfo("mpi")

    mpi_size, mpi_rank = _mpi_env_size_rank(env)
    in_srun_step = env.get("SLURM_PROCID", "") != "" and (
        env.get("SLURM_STEP_ID", "") != "" or env.get("SLURM_STEPID", "") != ""
        or env.get("SLURM_STEP_NUM_TASKS", "") != "")
    if forced == "slurm" or in_srun_step:
        info = _detect_slurm(env)
        consistent = (mpi_size is None or mpi_size == info.world_size) and (
            mpi_rank is None or mpi_rank == info.rank)
        if forced == "slurm" or consistent:
            return info if info.world_size > 1 or forced == "slurm" else LaunchInfo("none")
        return LaunchInfo("mpi")
    if mpi_size is not None and mpi_size > 1:
        return LaunchInfo("mpi")
    return LaunchInfo("none")


def _mpi_launch_info() -> LaunchInfo:
    try:
        from mpi4py import MPI  # initialises MPI: only imported under an MPI launcher
    except ImportError as e:
        raise RuntimeError(
            "this process was started by an MPI launcher (mpiexec/mpirun) but mpi4py cannot be "
            f"imported ({e}); install mpi4py in this environment") from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return LaunchInfo("none")
    local_name = _first_var(os.environ, _MPI_LOCAL_RANK_VARS)
    if local_name:
        local = _int_var(os.environ, local_name)
    else:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        if len(set(hosts)) == 1:
            addr = "127.0.0.1"  # one node: loopback works even where the host name does not resolve
        else:
            addr = os.environ.get("MASTER_ADDR") or _routable_address()
        port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else _free_port()
        addr, port = comm.bcast((addr, port), root=0)
    else:
        addr, port = comm.bcast(None, root=0)
    return LaunchInfo("mpi", rank, size, local, addr, port)


def _routable_address() -> str:
    """An address of this host that other nodes can reach (not 127.x, which /etc/hosts often maps
    the host name to); set MASTER_ADDR to choose the interface yourself."""
    for name in (socket.getfqdn(), socket.gethostname()):
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            addr = info[4][0]
            if not addr.startswith("127."):
                return addr
    try:  # the interface of the default route (a UDP "connect" sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
            if not addr.startswith("127.") and addr != "0.0.0.0":
                return addr
    except OSError:
        pass
    return socket.gethostname()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- set-up


def _pick_backend() -> str:
    forced = os.environ.get("PAG_DIST_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("nccl", "gloo"):
            raise ValueError(f"PAG_DIST_BACKEND={forced!r}: expected nccl or gloo")
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def _cuda_index(local_rank: int) -> int:
    count = torch.cuda.device_count()
    if count == 1:
        return 0  # the launcher gave each task its own GPU (e.g. srun --gpus-per-task=1)
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} but only {count} GPUs are visible on this node: launch at most "
            f"{count} processes per node (or set CUDA_VISIBLE_DEVICES per process)")
    return local_rank


def setup_dist(backend: Optional[str] = None) -> None:
    """Create the process group for this launch (idempotent; a no-op for one process)."""
    if _state.initialized:
        return
    if dist.is_available() and dist.is_initialized():
        # Someone else (e.g. a test harness or a training framework) made the group: adopt it.
        _state.owns_group = False
        _state.launcher = "external"
        _state.rank, _state.world_size = dist.get_rank(), dist.get_world_size()
        _state.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        _state.backend = dist.get_backend()
    else:
        info = detect_launch()
        if info.launcher == "mpi":
            info = _mpi_launch_info()
        if not 0 <= info.rank < info.world_size:
            raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({info.launcher} launch)")
        _state.launcher = info.launcher
        _state.rank, _state.world_size, _state.local_rank = info.rank, info.world_size, info.local_rank
        if info.world_size > 1:
            if not dist.is_available():
                raise RuntimeError("this PyTorch build has no torch.distributed support")
            chosen = backend or _pick_backend()
            if chosen == "nccl":
                if not torch.cuda.is_available():
                    raise RuntimeError("backend nccl needs CUDA, which is not available; use gloo")
                torch.cuda.set_device(_cuda_index(info.local_rank))
            dist.init_process_group(
                backend=chosen, init_method=f"tcp://{_url_host(info.master_addr)}:{info.master_port}",
                rank=info.rank, world_size=info.world_size)
            _state.owns_group = True
            _state.backend = chosen
    if torch.cuda.is_available():
        index = _cuda_index(_state.local_rank)
        torch.cuda.set_device(index)
        _state.device = torch.device("cuda", index)
    else:
        _state.device = torch.device("cpu")
    _state.initialized = True


def tune_cpu_allocator() -> bool:
    """Keep freed host memory in the heap instead of returning it to the OS (glibc only).

    glibc serves blocks of 32 MiB and more (one 256x256 activation of a batch of two) with mmap and
    unmaps them on free, so every U-Net step page-faults its activations in again: on CPU that costs
    about a quarter of the time, more for larger batches. Process-wide; called by the sampler
    (``sample_run.Sampler``) on CPU and by ``scripts/bench_guidance.py``. Returns whether it took effect.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def cleanup_dist() -> None:
    """Destroy the process group made by setup_dist (a later setup_dist starts afresh)."""
    global _state
    if _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _state = _State()


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _group_active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _group_active() else 1


def get_local_rank() -> int:
    return _state.local_rank if _group_active() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launcher() -> str:
    """The launcher setup_dist found: torchrun, slurm, mpi, external or none."""
    return _state.launcher


def dev() -> torch.device:
    """The device for this process: the GPU of its local rank, else the CPU."""
    if _state.device is not None:
        return _state.device
    if torch.cuda.is_available():
        return torch.device("cuda", _cuda_index(get_local_rank()))
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """Where tensors must live for collectives of the current backend."""
    if _group_active() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def barrier() -> None:
    if _group_active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max, min or avg) that is a no-op for one process."""
    if op not in ("sum", "max", "min", "avg"):
        raise ValueError(f"op={op!r}: expected one of sum, max, min, avg")
    if _group_active():
        reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=reduce_op)
        if op == "avg":
            tensor /= get_world_size()
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not _group_active():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _group_active():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def sync_params(params) -> None:
    """Copy rank 0's values of each tensor in ``params`` to every rank (in place)."""
    if not _group_active():
        return
    with torch.no_grad():
        for p in params:
            data = p.data if isinstance(p, torch.nn.Parameter) else p
            if data.device != _comm_device():
                staged = data.to(_comm_device())
                dist.broadcast(staged, 0)
                data.copy_(staged)
            else:
                dist.broadcast(data, 0)


# ----------------------------------------------------------------------------- checkpoints


def _is_blob_url(path: str) -> bool:
    parsed = urllib.parse.urlparse(path)
    return parsed.scheme in ("gs", "az") or (
        parsed.scheme == "https" and parsed.netloc.endswith(".blob.core.windows.net"))


def read_bytes(path: str) -> bytes:
    """All bytes of a local path, ``file://`` URL, blobfile URL (gs://, az://, Azure https://)
    or other http(s) URL."""
    path = os.fspath(path)
    parsed = urllib.parse.urlparse(path)
    if parsed.scheme == "file":
        path = urllib.request.url2pathname(parsed.path)
        parsed = urllib.parse.urlparse(path)
    if _is_blob_url(path):
        import blobfile as bf  # heavy import, only when needed

        if not bf.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        with bf.BlobFile(path, "rb") as f:
            return f.read()
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(path, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"checkpoint not found: {path} (HTTP 404)") from e
            raise OSError(f"cannot read {path}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise OSError(f"cannot read {path}: {e.reason}") from e
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {path!r}: use a local path, "
                         "file://, gs://, az://, or http(s)://")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        return f.read()


def _broadcast_bytes(data: Optional[bytes], error: Optional[BaseException]):
    """Rank 0's bytes (or its read error, re-raised everywhere) on every rank."""
    device = _comm_device()
    rank = get_rank()
    header = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        header[0] = -1 if error is not None else len(data)
    dist.broadcast(header, 0)
    length = int(header.item())
    if length < 0:
        kind, message = broadcast_object((type(error).__name__, str(error)) if rank == 0 else None)
        if rank == 0:
            raise error
        exc_type = {"FileNotFoundError": FileNotFoundError, "IsADirectoryError": IsADirectoryError,
                    "ValueError": ValueError}.get(kind, OSError)
        raise exc_type(f"rank 0 could not read the checkpoint: {message}")
    if rank == 0:
        with warnings.catch_warnings():  # rank 0 only reads from its (read-only) bytes
            warnings.simplefilter("ignore")
            view = torch.frombuffer(data, dtype=torch.uint8) if length else None
    else:
        buf = bytearray(length)
        view = torch.frombuffer(buf, dtype=torch.uint8) if length else None
    step = max(1, int(BROADCAST_CHUNK_BYTES))
    for start in range(0, length, step):
        piece = view[start:min(start + step, length)]
        if device.type == "cpu":
            dist.broadcast(piece, 0)  # a contiguous slice: received in place
        else:
            staged = piece.to(device)
            dist.broadcast(staged, 0)
            if rank != 0:
                piece.copy_(staged.cpu())
    return data if rank == 0 else buf


def load_state_dict(path, **kwargs) -> Dict[str, Any]:
    """``torch.load`` of a checkpoint at a local path or URL (see ``read_bytes``).

    With a process group, only rank 0 reads the file; the bytes reach the other ranks by
    broadcast.  ``kwargs`` go to ``torch.load`` (e.g. ``map_location="cpu"``).
    """
    if _group_active() and get_world_size() > 1:
        data, error = None, None
        if get_rank() == 0:
            try:
                data = read_bytes(path)
            except Exception as e:  # re-raised on every rank by _broadcast_bytes
                error = e
        data = _broadcast_bytes(data, error)
    else:
        data = read_bytes(path)
    # Always a CPU state dict of tensors (weights_only); kwargs kept for upstream's call signature.
    del kwargs
    return state_dict_from_bytes(data, os.fspath(path))
