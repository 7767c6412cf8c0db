"""The one process-group set-up (the sampler's ``guided_diffusion.dist_util`` and the evaluator's):
:func:`launch_info`, then :func:`start_group`. Rank 0's TCP store is reached within a short connect timeout
(``PAG_DIST_CONNECT_TIMEOUT_SECONDS``, default 300) while collectives keep a long one (``PAG_DIST_TIMEOUT_MINUTES``,
default 720): ``init_process_group``'s one timeout would be both, and a mistyped MASTER_ADDR would wait 12 hours."""

import datetime
import os
import socket
import time

from .launch import LaunchInfo, detect_launch, local_rank_from_env


class DistSetupError(RuntimeError):
    """The processes cannot form their group: a rendezvous that does not answer, ranks that do not join, two
    ranks on one GPU, a backend that does not fit the device. ``everywhere``: every rank raises it alike (an
    entry point prints it once, on rank 0)."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def _positive_number(name: str, default: float, unit: str) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of {unit}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} must be a positive number of {unit}")
    return value


def process_group_timeout() -> datetime.timedelta:
    """How long a collective may wait (``PAG_DIST_TIMEOUT_MINUTES``, default 720)."""
    return datetime.timedelta(minutes=_positive_number("PAG_DIST_TIMEOUT_MINUTES", 720.0, "minutes"))


def connect_timeout() -> datetime.timedelta:
    """How long a rank may take to reach the rendezvous and wait there (``PAG_DIST_CONNECT_TIMEOUT_SECONDS``)."""
    return datetime.timedelta(seconds=_positive_number("PAG_DIST_CONNECT_TIMEOUT_SECONDS", 300.0, "seconds"))


LAUNCH_CHECKS = {
    "torchrun": "MASTER_ADDR/MASTER_PORT (torchrun's --master_addr/--master_port or --rdzv_endpoint) name rank 0's "
                "host and a port open between the nodes",
    "slurm": "rank 0 runs on the first node of the step (SLURM_STEP_NODELIST, or MASTER_ADDR when set) and the port "
             "(MASTER_PORT, else derived from the job id) is open between the nodes",
    "mpi": "the address rank 0 chose (MASTER_ADDR overrides it) is reachable from every node and the port "
           "(MASTER_PORT overrides it) is open between them",
}


def launch_checks(launcher: str) -> str:
    """What to check when the ranks of a ``launcher`` launch cannot meet."""
    return LAUNCH_CHECKS.get(launcher, "MASTER_ADDR/MASTER_PORT name rank 0 and an open port")


def connect_store(info: LaunchInfo, connect: datetime.timedelta):
    """Rank 0's TCP store (created by rank 0; under torchrun, its agent's), reached within ``connect``, else a
    :class:`DistSetupError` naming the address, port and launcher. Its waits take up to ``connect`` too until the
    caller sets the collective timeout (``store.set_timeout(process_group_timeout())``): a TCP store's timeout is
    both, which is why the store is made here and not by ``init_process_group``."""
    import torch.distributed as dist  # only when a group is made: this module is imported without torch

    where = f"{info.master_addr}:{info.master_port}"
    started = time.monotonic()
    # Under torchrun the agent already serves a store at MASTER_ADDR:MASTER_PORT: every rank is its client.
    hosts_store = info.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") != "True"
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, hosts_store,
                              timeout=connect, wait_for_workers=False)
    except Exception as e:  # DistNetworkError (refused, unreachable, unknown host, port in use) and relatives
        detail = " ".join(str(e).split("\n")[0].split())
        if info.rank == 0 and ("EADDRINUSE" in detail or "already in use" in detail):
            raise DistSetupError(
                f"rank 0 could not listen on port {info.master_port} (host {socket.gethostname()}, {info.launcher} "
                f"launch): the port is in use; set MASTER_PORT to a free port ({detail})") from None
        who = (f"rank 0 (host {socket.gethostname()}) could not reach its own rendezvous" if info.rank == 0
               else f"rank {info.rank} (host {socket.gethostname()}) could not connect to the rendezvous")
        raise DistSetupError(
            f"{who} at {where} within {time.monotonic() - started:.0f} s ({info.launcher} launch): check that "
            f"{launch_checks(info.launcher)}; PAG_DIST_CONNECT_TIMEOUT_SECONDS={connect.total_seconds():g} sets the "
            f"wait ({detail})") from None
    return store


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
    local = local_rank_from_env()
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


def launch_info() -> LaunchInfo:
    """This process's launch (``detect_launch``); under an MPI launcher (the one case that imports mpi4py) its rank
    and size from mpi4py, and the address and free port that rank 0 chose (MASTER_ADDR/MASTER_PORT override them)."""
    info = detect_launch()
    if info.launcher == "mpi":
        info = _mpi_launch_info()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({info.launcher} launch)")
    return info


def start_group(info: LaunchInfo, backend: str, meet=None) -> None:
    """Make the process group of ``info``'s ranks on ``backend``: several meet at rank 0's TCP store
    (:func:`connect_store`), one uses an in-memory store (no network, no MPI). ``meet(store)`` (store None for one
    process) runs before the group is made, while the store still waits only the connect timeout."""
    import torch.distributed as dist

    store = connect_store(info, connect_timeout()) if info.world_size > 1 else dist.HashStore()
    if meet is not None:
        meet(store if info.world_size > 1 else None)
    store.set_timeout(process_group_timeout())  # connected: the store now waits as long as collectives
    dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=process_group_timeout())


def cuda_index(local_rank: int, wrap: bool = False) -> int:
    """The GPU of local rank ``local_rank`` (sampler and evaluator); one visible GPU is everyone's GPU 0 (their own
    or one shared: dist_util's GPU check tells). ``wrap``: more local ranks than GPUs wrap around, else an error."""
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return 0
    if local_rank >= count:
        if wrap:
            return local_rank % count
        raise RuntimeError(
            f"local rank {local_rank} but only {count} GPUs are visible on this node: launch at most "
            f"{count} processes per node (or set CUDA_VISIBLE_DEVICES per process)")
    return local_rank
