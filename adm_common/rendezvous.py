"""The rendezvous of several processes: rank 0's TCP store reached within a short connect timeout, while the
collectives that follow keep a long one (``init_process_group``'s one timeout would be both: a mistyped
MASTER_ADDR then waits 12 hours). Used by the sampler's process group (``guided_diffusion.dist_util``) and the
evaluator's (``evaluations.reference``). torch is imported only when a store is made.

``PAG_DIST_CONNECT_TIMEOUT_SECONDS`` (default 300): how long a rank may take to reach the rendezvous and wait there
for the others; ``PAG_DIST_TIMEOUT_MINUTES`` (default 720): how long a collective may wait.
"""

import datetime
import os
import socket
import time

from .launch import LaunchInfo


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
    """How long a rank may take to reach the rendezvous and wait there for the others to join
    (``PAG_DIST_CONNECT_TIMEOUT_SECONDS``, default 300)."""
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
