"""Process-group set-up and small collective helpers (upstream's ``dist_util`` API).

One process group for every launcher ``adm_common.launch`` detects, made by ``adm_common.rendezvous`` (shared with
the evaluator); a process started by no launcher gets a one-process group on an in-memory store, and mpi4py is
never imported (importing it initialises MPI, slow and fallible). Backend: NCCL when the run computes on a GPU,
gloo otherwise (``PAG_DIST_BACKEND`` forces one), so a CPU run never touches a GPU. Each process uses the GPU of
its local rank (``dev()``); two ranks that would share one GPU stop at start-up with one line naming them.
"""

import datetime
import io
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from adm_common.launch import LaunchInfo, local_rank_from_env
from adm_common.rendezvous import (  # noqa: F401 (re-exported: upstream-style callers use dist_util)
    DistSetupError,
    connect_store,
    connect_timeout,
    cuda_index,
    launch_checks,
    launch_info,
    process_group_timeout,
    start_group,
)

from .blobs import read_bytes

# Bytes per broadcast call in load_state_dict (module-level so tests can shrink it).
BROADCAST_CHUNK_BYTES = 1 << 27

@dataclass
class _State:
    initialized: bool = False
    owns_group: bool = False
    launcher: str = "none"
    local_rank: int = 0
    device: Optional[torch.device] = None


_state = _State()


# ----------------------------------------------------------------------------- set-up


def _uses_cuda(device=None) -> bool:
    """Whether a run on ``device`` (None or "": the default, the GPU when there is one) computes on a GPU. A
    requested "cuda" without CUDA counts as no: the run's own device check reports it (plan.resolve_device)."""
    return torch.cuda.is_available() and (device in (None, "") or torch.device(device).type == "cuda")


def _pick_backend(uses_cuda: bool) -> str:
    forced = os.environ.get("PAG_DIST_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("nccl", "gloo"):
            raise ValueError(f"PAG_DIST_BACKEND={forced!r}: expected nccl or gloo")
        return forced
    return "nccl" if uses_cuda else "gloo"


def _check_backend(chosen: str, uses_cuda: bool) -> None:
    if chosen == "nccl" and not torch.cuda.is_available():
        raise DistSetupError("backend nccl needs CUDA, which is not available; use gloo", everywhere=True)
    if chosen == "nccl" and not uses_cuda:
        raise DistSetupError("backend nccl (PAG_DIST_BACKEND) but this run's device is the CPU: NCCL moves GPU "
                             "tensors only; unset PAG_DIST_BACKEND or set it to gloo", everywhere=True)


# Which GPU a rank would use, told apart across the processes of a machine. Why not the launcher's local size:
# `srun --gpus-per-task=1` (or --gres with ConstrainDevices) gives each of 8 tasks of a node its own GPU, and each
# sees exactly one, numbered 0; `srun --ntasks-per-node=8 --gres=gpu:1` and `mpiexec -n 2` on a one-GPU
# workstation give every task the same GPU 0. Counts and indices look alike in both; the GPU's UUID does not.
# So every rank posts (host, UUID, index) to rank 0's TCP store and all compare them before the process group
# exists: NCCL itself only notices at its first collective ("Duplicate GPU detected"), and gathering over an
# NCCL group would trip it. The store is the one every launcher's ranks reach (torchrun, srun, mpiexec alike).
def _gpu_record(index: int) -> Dict[str, Any]:
    host = socket.gethostname()
    count = torch.cuda.device_count()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # no UUID from this build or driver: the host and the visible-devices entry
        uuid = ""
    if uuid:
        gpu = f"uuid:{uuid}"
    else:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        gpu = f"{host}:{visible[index] if index < len(visible) else index}"
    return {"host": host, "index": index, "visible": count, "gpu": gpu}


def _ranks_text(ranks: List[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if len(ranks) <= 8:
        return f"ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}"
    return f"ranks {', '.join(map(str, ranks[:8]))}, ... ({len(ranks)} ranks)"


def _shared_gpu_error(records: List[Optional[Dict[str, Any]]], pinned: Optional[int] = None) -> Optional[str]:
    """One line naming ranks that would share a GPU (``records``: ``_gpu_record`` per rank, None for a rank
    without a GPU), or None. ``pinned``: the GPU index every rank was told to use (``device: cuda:N``)."""
    by_gpu: Dict[str, List[int]] = {}
    for rank, record in enumerate(records):
        if record:
            by_gpu.setdefault(record["gpu"], []).append(rank)
    shared = [ranks for ranks in by_gpu.values() if len(ranks) > 1]
    if not shared:
        return None
    ranks = shared[0]
    first = records[ranks[0]]
    more = f" (and {len(shared) - 1} more shared GPU{'s' if len(shared) > 2 else ''})" if len(shared) > 1 else ""
    visible = first["visible"]
    if pinned is not None:
        return (f"{_ranks_text(ranks)} on host {first['host']} would share GPU {pinned}: every rank was given device "
                f"cuda:{pinned}; with several processes per node use device: cuda (each takes its local rank's GPU)")
    return (f"{_ranks_text(ranks)} on host {first['host']} would share GPU {first['index']} ({visible} visible)"
            f"{more}: start one process per GPU (at most {visible} per node: mpiexec -n, torchrun "
            f"--nproc_per_node, srun --ntasks-per-node; or srun --gpus-per-task=1), or set device: cpu")


def _exchange(store, info: LaunchInfo, record: Any, connect: datetime.timedelta) -> List[Any]:
    """Every rank's ``record`` (JSON-able), in rank order, through the store; the ranks wait at most ``connect``
    for each other."""
    keys = [f"{_setup_prefix()}{r}" for r in range(info.world_size)]
    where = f"{info.master_addr}:{info.master_port}"
    try:
        store.set(keys[info.rank], json.dumps(record))
        store.wait(keys, connect)
        values = store.multi_get(keys) if hasattr(store, "multi_get") else [store.get(k) for k in keys]
    except Exception:
        try:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
        except Exception:
            missing = None
        if not missing:
            raise DistSetupError(f"rank {info.rank} lost the rendezvous at {where} while the ranks joined "
                                 f"({info.launcher} launch): rank 0 ended or the network failed") from None
        raise DistSetupError(
            f"{_ranks_text(missing)} of {info.world_size} did not join the rendezvous at {where} within "
            f"{connect.total_seconds():g} s ({info.launcher} launch): look for their errors, check that "
            f"{launch_checks(info.launcher)}; PAG_DIST_CONNECT_TIMEOUT_SECONDS sets the wait",
            everywhere=True) from None
    return [json.loads(v) for v in values]


def _setup_prefix() -> str:
    """Keys of this start-up in the store; torchrun's agent keeps its store across restarts, so each attempt
    (``TORCHELASTIC_RESTART_COUNT``) has its own keys."""
    return f"pag_setup/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _all_have_read(store, info: LaunchInfo, connect: datetime.timedelta) -> None:
    """Rank 0 keeps the store (its server) up until every rank has read the records (before they all stop)."""
    key = f"{_setup_prefix()}read"
    store.add(key, 1)
    if info.rank != 0:
        return
    deadline = time.monotonic() + connect.total_seconds()
    while store.add(key, 0) < info.world_size and time.monotonic() < deadline:
        time.sleep(0.05)


def setup_dist(backend: Optional[str] = None, device=None) -> None:
    """Create the process group for this launch (idempotent). ``device``: what the run computes on (``"cpu"``,
    ``"cuda"``, ``"cuda:N"``; None: the local rank's GPU when there is one, else the CPU; a CPU run never calls
    ``torch.cuda.set_device``). Several processes compare their GPUs at rank 0's store before making the group."""
    global _state
    if _state.initialized:
        return
    uses_cuda = _uses_cuda(device)
    requested = torch.device(device) if device not in (None, "") else None
    fixed_index = requested.index if uses_cuda and requested is not None and requested.type == "cuda" else None
    index = None
    if dist.is_available() and dist.is_initialized():
        # Someone else (e.g. a test harness or a training framework) made the group: adopt it.
        _state.launcher, _state.local_rank = "external", local_rank_from_env() or 0
        if uses_cuda:
            index = fixed_index if fixed_index is not None else cuda_index(_state.local_rank)
            torch.cuda.set_device(index)
    else:
        info = launch_info()
        chosen = backend or _pick_backend(uses_cuda)
        if uses_cuda:
            index = fixed_index if fixed_index is not None else cuda_index(info.local_rank, wrap=info.world_size > 1)
        if info.world_size > 1 and not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed support")
        _check_backend(chosen, uses_cuda)

        def meet(store):  # several ranks compare their GPUs before the group exists; then this rank takes its own
            if store is not None:
                connect = connect_timeout()
                records = _exchange(store, info, _gpu_record(index) if index is not None else None, connect)
                _all_have_read(store, info, connect)
                shared = _shared_gpu_error(records, pinned=fixed_index)
                if shared:
                    raise DistSetupError(shared, everywhere=True)
            if index is not None:
                torch.cuda.set_device(index)

        try:
            _state.launcher, _state.local_rank = info.launcher, info.local_rank
            if dist.is_available():
                start_group(info, chosen, meet)
                _state.owns_group = True
            else:
                meet(None)
        except BaseException:
            _state = _State()
            raise
    if index is not None:
        _state.device = torch.device("cuda", index)
    elif requested is not None and requested.type not in ("cpu", "cuda"):
        _state.device = requested
    else:
        _state.device = torch.device("cpu")
    _state.initialized = True


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
    """The device for this process: the GPU of its local rank, else the CPU (and after a CPU run's set-up)."""
    if _state.device is not None:
        return _state.device
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_index(get_local_rank()))
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """Where tensors must live for collectives of the current backend."""
    if _group_active() and dist.get_backend() == "nccl":
        return dev()
    return torch.device("cpu")


def barrier() -> None:
    if _group_active():
        dist.barrier(device_ids=[dev().index] if dist.get_backend() == "nccl" else None)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max, min or avg) that is a no-op for one process."""
    if op not in ("sum", "max", "min", "avg"):
        raise ValueError(f"op={op!r}: expected one of sum, max, min, avg")
    if _group_active():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, "SUM" if op == "avg" else op.upper()))
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
            _broadcast_in_place(p.data if isinstance(p, torch.nn.Parameter) else p)


def _broadcast_in_place(tensor: torch.Tensor) -> None:
    """Rank 0's values into ``tensor`` on every rank, staged on the backend's device when it lives elsewhere."""
    staged = tensor.to(_comm_device())
    dist.broadcast(staged, 0)
    if staged is not tensor and get_rank() != 0:
        tensor.copy_(staged)


# ----------------------------------------------------------------------------- checkpoints


def read_everywhere(path) -> bytes:
    """The bytes of ``path`` (see ``blobs.read_bytes``) on every rank: with a process group only rank 0
    reads the file and broadcasts it, and its read error is raised on every rank."""
    if not (_group_active() and get_world_size() > 1):
        return read_bytes(path)
    rank, data, header = get_rank(), None, None  # header: rank 0's length, or the type and text of its read error
    if rank == 0:
        try:
            data = read_bytes(path)
            header = len(data)
        except Exception as e:
            error, header = e, (type(e).__name__, str(e))
    length = broadcast_object(header)
    if not isinstance(length, int):
        if rank == 0:
            raise error
        kind, message = length
        exc_type = {"FileNotFoundError": FileNotFoundError, "IsADirectoryError": IsADirectoryError,
                    "ValueError": ValueError}.get(kind, OSError)
        raise exc_type(f"rank 0 could not read the checkpoint: {message}")
    with warnings.catch_warnings():  # rank 0 only reads from its (read-only) bytes
        warnings.simplefilter("ignore")
        buf = data if rank == 0 else bytearray(length)
        view = torch.frombuffer(buf, dtype=torch.uint8) if length else None
    step = max(1, int(BROADCAST_CHUNK_BYTES))
    for start in range(0, length, step):
        _broadcast_in_place(view[start:min(start + step, length)])  # a contiguous slice of ``buf``
    return buf


def load_state_dict(path, **kwargs) -> Dict[str, Any]:
    """Upstream's ``dist_util.load_state_dict``: ``torch.load`` of a checkpoint at a local path or URL,
    read by rank 0 and broadcast. ``kwargs`` go to ``torch.load`` (``map_location``, ``weights_only``, ...)."""
    return torch.load(io.BytesIO(read_everywhere(path)), **kwargs)
