"""Upstream guided-diffusion's logger (from OpenAI baselines): its public names, on a smaller implementation.

Only rank 0 writes, unless ``configure(all_ranks=True)`` (rank r > 0 then writes ``log.rank{r}.txt`` and prefixes
stdout with ``[rank r]``). Formats: ``stdout``, ``log`` (log.txt), ``csv``, ``json`` (one object per line),
``tensorboard`` (tb/). Defaults: ``$OPENAI_LOGDIR`` else a new temporary directory; ``$OPENAI_LOG_FORMAT`` else
``stdout,log,csv``. Unlike upstream (see docs/api.md): log.txt (timed lines) and progress.json are appended to, no
output is written through a symbolic link at its name, an empty table is not written, averaging over ranks gives
every rank the means and keeps non-numeric values, and logging before ``configure()`` goes to stdout only.
"""

import csv
import datetime
import io
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence

from adm_common.files import atomic_write_text, open_append
from adm_common.launch import rank_from_env

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


def get_rank_without_mpi_import() -> int:
    """This process's rank: the process group's, else its launcher's environment (``adm_common.launch``), never
    importing mpi4py (importing it starts MPI)."""
    from . import dist_util

    return dist_util.get_rank() if dist_util.get_world_size() > 1 else rank_from_env()


class KVWriter:
    """An output of the key/value tables (``Logger.dumpkvs`` calls ``writekvs`` with each table)."""

    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self) -> None:
        pass


class SeqWriter:
    """An output of log lines (``Logger.log`` calls ``writeseq`` with the line's parts as strings)."""

    def writeseq(self, seq):
        raise NotImplementedError


class HumanOutputFormat(KVWriter, SeqWriter):
    """Log lines and tables as text, to an open stream or a file name (appended to; a symbolic link at the name is
    replaced, see ``adm_common.files.open_append``). ``timestamps`` (default: for a file name) starts each log
    line with the local date and time; ``prefix`` starts every line (``[rank 1] ``)."""

    def __init__(self, filename_or_file, *, prefix: str = "", timestamps: Optional[bool] = None):
        if isinstance(filename_or_file, (str, os.PathLike)):
            self.file = open_append(filename_or_file)
            self.own_file = True
        elif hasattr(filename_or_file, "write"):
            self.file = filename_or_file
            self.own_file = False
        else:
            raise TypeError(f"expected a file or a file name, got {filename_or_file!r}")
        self.prefix = prefix
        self.timestamps = self.own_file if timestamps is None else timestamps

    def writeseq(self, seq) -> None:
        line = " ".join(seq)
        if self.timestamps:
            line = f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {line}"
        self._emit([line])

    def _emit(self, lines) -> None:
        self.file.write("".join(f"{self.prefix}{line}\n" for line in lines))
        self.file.flush()

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        rows = [(str(k)[:40], (f"{v:<8.3g}" if isinstance(v, float) else str(v))[:40]) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        self._emit([rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule])

    def close(self) -> None:
        if self.own_file:
            self.file.close()


class CSVOutputFormat(KVWriter):
    """progress.csv; new keys widen the table (the file is rewritten with the new header)."""

    def __init__(self, filename):
        self.path = os.fspath(filename)
        self.keys: List[str] = []
        self.rows: List[Dict[str, Any]] = []

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        self.rows.append(dict(kvs))
        new = [k for k in sorted(kvs) if k not in self.keys]
        self.keys.extend(new)
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.keys, restval="")
        if new:  # the first table's keys are all new
            writer.writeheader()
        writer.writerows(self.rows if new else [kvs])
        if new:  # never through a symbolic link: the new file replaces a link at the path
            atomic_write_text(self.path, buf.getvalue())
        else:
            with open_append(self.path) as f:
                f.write(buf.getvalue())


class JSONOutputFormat(KVWriter):
    """progress.json: one JSON object per table (appended); numbers of other types (numpy, tensors) as floats."""

    def __init__(self, filename):
        self.file = open_append(filename)

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        if kvs:
            self.file.write(json.dumps(kvs, default=float) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardOutputFormat(KVWriter):
    """The numeric values of each table as TensorBoard scalars in ``dir`` at step 1, 2, ..., through torch's
    ``SummaryWriter`` (needs the ``tensorboard`` package; upstream writes TensorFlow's event files)."""

    def __init__(self, dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"the tensorboard log format needs the tensorboard package "
                              f"(pip install tensorboard): {err}") from err
        os.makedirs(dir, exist_ok=True)
        self.dir = dir
        self.step = 1
        self.writer = SummaryWriter(log_dir=os.fspath(dir))

    def writekvs(self, kvs: Dict[str, Any]) -> None:
        walltime = time.time()
        for key, value in kvs.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue  # not a number: TensorBoard's scalars cannot show it
            self.writer.add_scalar(key, value, global_step=self.step, walltime=walltime)
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_FILE_FORMATS = {"log": (HumanOutputFormat, "log{}.txt"), "csv": (CSVOutputFormat, "progress{}.csv"),
                 "json": (JSONOutputFormat, "progress{}.json"), "tensorboard": (TensorBoardOutputFormat, "tb{}")}
_FORMATS = ("stdout", *_FILE_FORMATS)


def make_output_format(format: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """The output for one of the format names (``stdout``, ``log``, ``json``, ``csv``, ``tensorboard``),
    writing into ``ev_dir`` (created): log{suffix}.txt, progress{suffix}.json/.csv, tb{suffix}/."""
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format not in _FILE_FORMATS:
        raise ValueError(f"unknown log format {format!r}: expected one of {list(_FORMATS)}")
    writer, name = _FILE_FORMATS[format]
    return writer(os.path.join(ev_dir, name.format(log_suffix)))


class Logger:
    """Key/values of the current step and where tables and log lines go. ``comm``: when set, ``dumpkvs`` averages
    each value over the processes (``mpi_weighted_mean``); ``rank`` (this fork's): the process's rank."""

    DEFAULT: Optional["Logger"] = None  # stdout only: what logs before configure() and after reset()
    CURRENT: Optional["Logger"] = None  # the logger the module's functions use

    def __init__(self, dir: Optional[str], output_formats: Sequence[Any], comm: Any = None, *, rank: int = 0):
        self.name2val: Dict[str, Any] = defaultdict(float)  # the values of this step (means for logkv_mean)
        self.name2cnt: Dict[str, int] = defaultdict(int)  # how many logkv_mean calls made each mean
        self.level = INFO
        self.dir = dir
        self.output_formats = list(output_formats)
        self.comm = comm
        self.rank = rank

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val
        self.name2cnt.pop(key, None)  # a later logkv_mean starts a new mean

    def logkv_mean(self, key: str, val: Any) -> None:
        old, count = self.name2val.get(key, 0.0), self.name2cnt.get(key, 0)
        self.name2val[key] = (old * count + float(val)) / (count + 1) if count else float(val)
        self.name2cnt[key] = count + 1

    def dumpkvs(self, sync: bool = False) -> Dict[str, Any]:
        """Write and clear the current key/values; returns them. ``sync=True`` (always with a ``comm``) first
        averages them over all ranks (``mpi_weighted_mean``): a collective, every rank must call it."""
        kvs = dict(self.name2val)
        if sync or self.comm is not None:
            kvs = mpi_weighted_mean(self.comm, {k: (v, self.name2cnt.get(k, 1)) for k, v in kvs.items()})
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(dict(kvs))
        self.name2val.clear()
        self.name2cnt.clear()
        return kvs

    def log(self, *args, level: int = INFO) -> None:
        for fmt in self.output_formats if self.level <= level else ():
            if isinstance(fmt, SeqWriter):
                fmt.writeseq([str(a) for a in args])

    def set_level(self, level: int) -> None:
        self.level = level

    def set_comm(self, comm: Any) -> None:
        self.comm = comm

    def get_dir(self) -> Optional[str]:
        return self.dir

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()
        self.output_formats = []


def mpi_weighted_mean(comm: Any, local_name2valcount: Dict[str, Any]) -> Dict[str, Any]:
    """``{key: (value, count)}`` of every process -> ``{key: mean of the values weighted by the counts}``; a
    collective, over ``comm`` (an mpi4py communicator) else torch.distributed's group. Unlike upstream, every rank
    gets the means, and a value that is not a number keeps the first process's value (upstream drops it)."""
    from . import dist_util

    gather = comm.allgather if hasattr(comm, "allgather") else dist_util.all_gather_object
    everyone = gather(local_name2valcount)
    merged: Dict[str, Any] = {}
    for key in sorted({k for d in everyone for k in d}):
        entries = [d[key] for d in everyone if key in d]
        try:
            total = sum(count for _, count in entries)
            merged[key] = sum(float(value) * count for value, count in entries) / total
        except (TypeError, ValueError, ZeroDivisionError):
            merged[key] = entries[0][0]
    return merged


def _make_logger(dir, format_strs, comm, log_suffix: str = "", all_ranks: bool = False) -> Logger:
    if dir is None:
        dir = os.environ.get("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("pag-%Y-%m-%d-%H-%M-%S-%f"))
    dir = os.path.abspath(os.path.expanduser(os.fspath(dir)))
    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
    format_strs = [s for s in format_strs if s]
    unknown = [s for s in format_strs if s not in _FORMATS]
    if unknown:
        raise ValueError(f"unknown log format(s) {unknown}: expected some of {list(_FORMATS)}")
    rank = get_rank_without_mpi_import()
    if rank != 0:
        log_suffix = log_suffix or f".rank{rank}"
        if not all_ranks:
            format_strs = []
    outputs = [make_output_format(fmt, dir, log_suffix) for fmt in format_strs]
    for out in outputs:
        if rank and isinstance(out, HumanOutputFormat) and not out.own_file:
            out.prefix = f"[rank {rank}] "
    current = Logger(dir, outputs, comm, rank=rank)
    if outputs:
        current.log(f"Logging to {dir}")
    return current


def configure(dir: Optional[str] = None, format_strs: Optional[Sequence[str]] = None, comm: Any = None,
              log_suffix: str = "", *, all_ranks: bool = False) -> Logger:
    """Start logging into ``dir`` (created if needed) with the given formats; the logger current before is closed.
    ``comm``: as upstream, ``dumpkvs`` averages over its ranks (an mpi4py communicator, or any other non-None value
    for torch.distributed's group). ``all_ranks`` (this fork's): every rank writes, not only rank 0."""
    new = _make_logger(dir, format_strs, comm, log_suffix, all_ranks)
    reset()
    Logger.CURRENT = new
    return new


@contextmanager
def scoped_configure(dir: Optional[str] = None, format_strs: Optional[Sequence[str]] = None, comm: Any = None):
    """``configure`` for a ``with`` block (which gets the new logger); afterwards the new one is closed and
    the logger current before it (not closed) is current again."""
    previous = Logger.CURRENT
    Logger.CURRENT = _make_logger(dir, format_strs, comm)
    try:
        yield Logger.CURRENT
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous


def get_current() -> Logger:
    if Logger.CURRENT is None:
        if Logger.DEFAULT is None:  # before configure(): stdout only (upstream: a temporary directory)
            outputs = [HumanOutputFormat(sys.stdout)] if get_rank_without_mpi_import() == 0 else []
            Logger.DEFAULT = Logger(None, outputs)
        Logger.CURRENT = Logger.DEFAULT
    return Logger.CURRENT


def reset() -> None:
    """Close the current logger's outputs; until configure() is called again, logging goes to stdout."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    # The default logger is made again at the next use, on the sys.stdout of that time.
    Logger.CURRENT = Logger.DEFAULT = None


def get_dir() -> Optional[str]:
    """The directory logs go to; None before configure()."""
    return get_current().get_dir()


def log(*args, level: int = INFO) -> None:
    """Write the arguments, separated by spaces, to the text outputs (if ``level`` is not below the logger's)."""
    get_current().log(*args, level=level)


def debug(*args) -> None:
    log(*args, level=DEBUG)


def info(*args) -> None:
    log(*args, level=INFO)


def warn(*args) -> None:
    log(*args, level=WARN)


def error(*args) -> None:
    log(*args, level=ERROR)


def set_level(level: int) -> None:
    """Log lines below ``level`` are dropped."""
    get_current().set_level(level)


def set_comm(comm: Any) -> None:
    """Average the tables over ``comm``'s processes from now on (None: no averaging); see ``configure``."""
    get_current().set_comm(comm)


def logkv(key: str, val: Any) -> None:
    """Set a value of the current step's table (the last value of the step is written)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Like logkv, but the mean of the values given until the next dump is written."""
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs(sync: bool = False) -> Dict[str, Any]:
    """Write the current table to the outputs, clear it, and return it (see ``Logger.dumpkvs``)."""
    return get_current().dumpkvs(sync=sync)


def getkvs() -> Dict[str, Any]:
    return get_current().name2val


# upstream's older names
record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename: str):
    """Add the seconds the ``with`` block takes to the current table's ``wait_<scopename>``."""
    logkey = "wait_" + scopename
    start = time.perf_counter()
    try:
        yield
    finally:
        get_current().name2val[logkey] += time.perf_counter() - start


def profile(n: str):
    """A decorator that times each call of the function with ``profile_kv(n)`` (a context manager decorates)."""
    return profile_kv(n)
