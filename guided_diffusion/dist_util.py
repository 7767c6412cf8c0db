"""Process-group set-up and small collective helpers.

One process group serves every launcher:

* ``torchrun`` (or anything else that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT``),
* SLURM ``srun`` steps (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the rendezvous host is the first node of the step),
* ``mpiexec``/``mpirun`` (mpi4py's ``COMM_WORLD``; rank 0 picks host and a free port and
  broadcasts them).

The launcher is detected in that order.  A process started by none of them runs as world
size 1 in a one-process group on an in-memory store (as upstream, whose scripts call
``torch.distributed`` directly), and mpi4py is never imported (importing mpi4py
initialises MPI, which is slow and can fail on machines without a working MPI).
The detection itself lives in ``adm_common.launch`` (shared with the logger and the evaluator); set
``PAG_DIST_LAUNCHER`` to ``torchrun``, ``slurm``, ``mpi`` or ``none`` to skip it, and
``PAG_DIST_BACKEND`` to force ``nccl`` or ``gloo``.

Collectives time out after ``PAG_DIST_TIMEOUT_MINUTES`` (default 720: longer than any single wait of a
50k-sample cell; the sampler's ranks wait for each other by polling files, never in a collective).

Backend: NCCL when CUDA is available, gloo otherwise.  Each process uses the GPU of its
local rank (``dev()``).
"""

import datetime
import io
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from adm_common.launch import LaunchInfo, detect_launch, mpi_local_rank

from .blobs import read_bytes

# Bytes per broadcast call in load_state_dict (module-level so tests can shrink it).
BROADCAST_CHUNK_BYTES = 1 << 27

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


# ----------------------------------------------------------------------------- MPI


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
    local = mpi_local_rank(os.environ)
    if local is None:
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


def process_group_timeout() -> datetime.timedelta:
    """How long a collective may wait (``PAG_DIST_TIMEOUT_MINUTES``, default 720)."""
    raw = os.environ.get("PAG_DIST_TIMEOUT_MINUTES", "").strip()
    try:
        minutes = float(raw) if raw else 720.0
    except ValueError:
        raise ValueError(f"PAG_DIST_TIMEOUT_MINUTES={raw!r} is not a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"PAG_DIST_TIMEOUT_MINUTES={raw!r} must be positive")
    return datetime.timedelta(minutes=minutes)


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
    """Create the process group for this launch (idempotent).

    One process gets a one-process group too, as upstream's ``setup_dist`` makes (upstream's scripts call
    ``torch.distributed`` directly), built on an in-memory store: no network, no MPI.
    """
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
                rank=info.rank, world_size=info.world_size, timeout=process_group_timeout())
            _state.owns_group = True
            _state.backend = chosen
        elif dist.is_available():
            chosen = backend or _pick_backend()
            if chosen == "nccl" and not torch.cuda.is_available():
                raise RuntimeError("backend nccl needs CUDA, which is not available; use gloo")
            dist.init_process_group(backend=chosen, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=process_group_timeout())
            _state.owns_group = True
            _state.backend = chosen
    if torch.cuda.is_available():
        index = _cuda_index(_state.local_rank)
        torch.cuda.set_device(index)
        _state.device = torch.device("cuda", index)
    else:
        _state.device = torch.device("cpu")
    _state.initialized = True


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


def read_everywhere(path) -> bytes:
    """The bytes of ``path`` (see ``blobs.read_bytes``) on every rank: with a process group only rank 0
    reads the file and broadcasts it, and its read error is raised on every rank."""
    if _group_active() and get_world_size() > 1:
        data, error = None, None
        if get_rank() == 0:
            try:
                data = read_bytes(path)
            except Exception as e:  # re-raised on every rank by _broadcast_bytes
                error = e
        return _broadcast_bytes(data, error)
    return read_bytes(path)


def load_state_dict(path, **kwargs) -> Dict[str, Any]:
    """Upstream's ``dist_util.load_state_dict``: ``torch.load`` of a checkpoint at a local path or URL,
    read by rank 0 and broadcast. ``kwargs`` go to ``torch.load`` (``map_location``, ``weights_only``, ...)."""
    return torch.load(io.BytesIO(read_everywhere(path)), **kwargs)
