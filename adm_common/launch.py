"""Which launcher started this process, and its place in the job, from environment variables alone (no mpi4py, no
torch): ``torchrun`` (or anything that sets ``RANK``/``WORLD_SIZE``...), SLURM ``srun`` steps (the rendezvous host is
the first node of the step), ``mpiexec``/``mpirun`` (rank and size then come from mpi4py), detected in this order;
``PAG_DIST_LAUNCHER`` skips the detection. The process-group set-up, the logger and the evaluator all read it here."""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

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


# ----------------------------------------------------------------------------- detection


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """``gpu[01-03,07],login1`` -> host names: ``scontrol show hostnames`` when it is on PATH, else a parser for the
    common forms (one bracketed range group per host, zero padding kept)."""
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
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):  # split on commas outside brackets
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
    world = _int_var(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS")
    rank = _int_var(env, "SLURM_PROCID")
    local = _int_var(env, "SLURM_LOCALID") if env.get("SLURM_LOCALID") else 0
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = (env.get("MASTER_ADDR") or (nodelist and expand_slurm_nodelist(nodelist)[0])
            or env.get("SLURM_LAUNCH_NODE_IPADDR"))
    if not addr:
        raise ValueError("SLURM launch detected but no rendezvous host: none of MASTER_ADDR, "
                         "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_LAUNCH_NODE_IPADDR is set")
    port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else _slurm_port(env)
    return LaunchInfo("slurm", rank, world, local, addr, port)


def _slurm_port(env: Mapping[str, str]) -> int:
    """Without MASTER_PORT: a port every task of the step derives alike, without talking to the others."""
    job = int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")) or 0)
    step = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")) or 0)
    return 15000 + (job * 7 + step) % 20000


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """The launcher, from environment variables alone (MPI's rank and size come from mpi4py in
    ``rendezvous.launch_info``). A SLURM step whose variables disagree with an MPI launcher's (``mpiexec`` inside an
    ``sbatch`` script inherits the batch step's SLURM_PROCID=0) is an MPI launch; the batch script itself (no
    ``SLURM_STEP_ID``) is no SLURM launch: ``python script.py`` there runs as one process."""
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

    first_set = (next((n for n in names if env.get(n, "") != ""), None) for names in (_MPI_SIZE_VARS, _MPI_RANK_VARS))
    mpi_size, mpi_rank = (_int_var(env, name) if name else None for name in first_set)
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


def _from_env(env: Optional[Mapping[str, str]], field: str, own: str, mpi_names, default):
    """``field`` of the torchrun or SLURM launch of ``env``, else the first of torchrun's variable ``own`` (alone, e.g.
    beside a group made elsewhere, or incomplete torchrun variables, for which the logger still wants a rank) and the
    MPI launchers' ``mpi_names`` set to a number, the MPI ones first under an MPI launch (whose rank and size mpi4py
    gives), else ``default``."""
    env = os.environ if env is None else env
    try:
        info = detect_launch(env)
    except ValueError:
        info = None
    if info is not None and info.launcher in ("torchrun", "slurm"):
        return getattr(info, field)
    names = mpi_names + (own,) if info is not None and info.launcher == "mpi" else (own,) + mpi_names
    return next((int(env[name]) for name in names if env.get(name, "").isdigit()), default)


def rank_from_env(env: Optional[Mapping[str, str]] = None) -> int:
    """This process's rank as the environment tells it: the launcher's, else any rank variable, else 0."""
    return _from_env(env, "rank", "RANK", _MPI_RANK_VARS, 0)


def world_size_from_env(env: Optional[Mapping[str, str]] = None) -> int:
    """The job's size as the environment tells it: the launcher's, else any size variable, else 1."""
    return _from_env(env, "world_size", "WORLD_SIZE", _MPI_SIZE_VARS, 0) or 1


def local_rank_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This process's rank on its node, as the launcher tells it (torchrun's ``LOCAL_RANK``, ``SLURM_LOCALID``, an
    MPI launcher's local-rank variable; a lone ``LOCAL_RANK`` too, e.g. beside a group made elsewhere), or None
    when the environment does not say."""
    return _from_env(env, "local_rank", "LOCAL_RANK", _MPI_LOCAL_RANK_VARS, None)
