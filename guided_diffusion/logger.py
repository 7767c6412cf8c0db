"""A small logger with the parts of upstream guided-diffusion's logger API that scripts use.

    logger.configure(dir="results/run1")      # stdout + results/run1/log.txt (+ progress.csv)
    logger.log("sampling", n, "images")       # a line of text
    logger.logkv("loss", 0.1)                 # a key/value for the current step
    logger.logkv_mean("loss_q0", 0.3)         # averaged over the calls until the next dump
    logger.dumpkvs()                          # writes the table, returns the dict, clears it

Only rank 0 writes, unless ``configure(all_ranks=True)``; then every rank writes (rank r > 0
to ``log.rank{r}.txt``, with a ``[rank r]`` prefix on stdout).  Formats: ``stdout``, ``log``
(``log.txt``), ``csv`` (``progress.csv``) and ``json`` (``progress.json``, one object per
line).  The default directory is ``$OPENAI_LOGDIR``, else a new directory under the system's
temporary directory; the default formats are ``$OPENAI_LOG_FORMAT`` (comma-separated), else
``stdout,log,csv``.
"""

import csv
import datetime
import json
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

from adm_common.launch import rank_from_env

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50
_FORMATS = ("stdout", "log", "csv", "json")


def _rank_from_env() -> int:
    """This process's rank, before or without a process group (for configure)."""
    from . import dist_util

    if dist_util.get_world_size() > 1:
        return dist_util.get_rank()
    return rank_from_env()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:<8.3g}"
    return str(value)


class _TextOutput:
    """Writes log lines and key/value tables to a stream (stdout or log.txt). With ``timestamps`` (log.txt),
    each log line starts with the local date and time (``2026-12-01 13:36:51``)."""

    def __init__(self, stream, prefix: str = "", owns: bool = False, timestamps: bool = False):
        self.stream, self.prefix, self.owns, self.timestamps = stream, prefix, owns, timestamps

    def write_line(self, line: str) -> None:
        if self.timestamps:
            line = f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {line}"
        self._emit(line)

    def _emit(self, line: str) -> None:
        self.stream.write(self.prefix + line + "\n")
        self.stream.flush()

    def write_kvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        rows = [(str(k)[:40], _fmt(v)[:40]) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        if self.owns:
            self.stream.close()


class _CSVOutput:
    """progress.csv; new keys widen the table (the file is rewritten with the new header)."""

    def __init__(self, path: str):
        self.path = path
        self.keys: List[str] = []
        self.rows: List[Dict[str, Any]] = []

    def write_line(self, line: str) -> None:
        pass

    def write_kvs(self, kvs: Dict[str, Any]) -> None:
        if not kvs:
            return
        self.rows.append(dict(kvs))
        new = [k for k in sorted(kvs) if k not in self.keys]
        if new or len(self.rows) == 1:
            self.keys.extend(new)
            self._write(self.rows, mode="w", header=True)
        else:
            self._write([kvs], mode="a", header=False)

    def _write(self, rows, mode: str, header: bool) -> None:
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.keys, restval="")
            if header:
                writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        pass


class _JSONOutput:
    def __init__(self, path: str):
        self.stream = open(path, "a")

    def write_line(self, line: str) -> None:
        pass

    def write_kvs(self, kvs: Dict[str, Any]) -> None:
        if kvs:
            self.stream.write(json.dumps(kvs, default=float) + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.stream.close()


class Logger:
    comm: Any = None  # set by configure(comm=...): dumpkvs then averages over its ranks

    def __init__(self, dir: Optional[str], outputs: Sequence[Any], rank: int = 0):
        self.dir = dir
        self.outputs = list(outputs)
        self.rank = rank
        self.level = INFO
        self.kvs: Dict[str, Any] = {}
        self._sums: Dict[str, float] = defaultdict(float)
        self._counts: Dict[str, int] = defaultdict(int)

    def log(self, *args, level: int = INFO) -> None:
        if level < self.level:
            return
        line = " ".join(str(a) for a in args)
        for out in self.outputs:
            out.write_line(line)

    def logkv(self, key: str, value: Any) -> None:
        self.kvs[key] = value
        self._sums.pop(key, None)
        self._counts.pop(key, None)

    def logkv_mean(self, key: str, value: Any) -> None:
        self._sums[key] += float(value)
        self._counts[key] += 1
        self.kvs[key] = self._sums[key] / self._counts[key]

    def dumpkvs(self, sync: bool = False) -> Dict[str, Any]:
        """Write and clear the current key/values.

        ``sync=True`` averages each numeric value over all ranks first (weighted by how many
        logkv_mean calls made it); it is a collective, so every rank must call it. A logger
        configured with a ``comm`` always does.
        """
        kvs = dict(self.kvs)
        if sync or self.comm is not None:
            kvs = self._synced(kvs)
        for out in self.outputs:
            out.write_kvs(kvs)
        self.kvs.clear()
        self._sums.clear()
        self._counts.clear()
        return kvs

    def _synced(self, kvs: Dict[str, Any]) -> Dict[str, Any]:
        from . import dist_util

        mine = {k: (v, self._counts.get(k, 1)) for k, v in kvs.items()}
        if hasattr(self.comm, "allgather"):  # an mpi4py communicator, as upstream passes
            everyone = self.comm.allgather(mine)
        else:
            everyone = dist_util.all_gather_object(mine)
        merged: Dict[str, Any] = {}
        for key in sorted({k for d in everyone for k in d}):
            entries = [d[key] for d in everyone if key in d]
            try:
                total = sum(n for _, n in entries)
                merged[key] = sum(float(v) * n for v, n in entries) / total
            except (TypeError, ValueError):
                merged[key] = entries[0][0]  # not a number: keep rank 0's (or the first) value
        return merged

    def close(self) -> None:
        for out in self.outputs:
            out.close()
        self.outputs = []


_current: Optional[Logger] = None


def configure(dir: Optional[str] = None, format_strs: Optional[Sequence[str]] = None, comm: Any = None,
              log_suffix: str = "", *, all_ranks: bool = False) -> Logger:
    """Start logging into ``dir`` (created if needed) with the given formats (upstream's signature).

    comm: as upstream, a communicator over whose ranks ``dumpkvs`` averages the numeric values: an
        mpi4py communicator (its ``allgather``), or any other non-None value for torch.distributed's
        process group. ``all_ranks`` (keyword only, this fork's): every rank writes, not only rank 0.
    """
    global _current
    if dir is None:
        dir = os.environ.get("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("pag-%Y-%m-%d-%H-%M-%S-%f"))
    dir = os.path.abspath(os.path.expanduser(os.fspath(dir)))
    if format_strs is None:
        format_strs = [s for s in os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",") if s]
    unknown = [s for s in format_strs if s not in _FORMATS]
    if unknown:
        raise ValueError(f"unknown log format(s) {unknown}: expected some of {list(_FORMATS)}")
    rank = _rank_from_env()
    if rank != 0:
        log_suffix = log_suffix or f".rank{rank}"
        if not all_ranks:
            format_strs = []
    if format_strs:
        os.makedirs(dir, exist_ok=True)
    outputs = []
    for fmt in format_strs:
        if fmt == "stdout":
            outputs.append(_TextOutput(sys.stdout, prefix=f"[rank {rank}] " if rank else ""))
        elif fmt == "log":
            outputs.append(_TextOutput(open(os.path.join(dir, f"log{log_suffix}.txt"), "a"), owns=True,
                                       timestamps=True))
        elif fmt == "csv":
            outputs.append(_CSVOutput(os.path.join(dir, f"progress{log_suffix}.csv")))
        elif fmt == "json":
            outputs.append(_JSONOutput(os.path.join(dir, f"progress{log_suffix}.json")))
    if _current is not None:
        _current.close()
    _current = Logger(dir, outputs, rank)
    _current.comm = comm
    if outputs:
        _current.log(f"Logging to {dir}")
    return _current


def get_current() -> Logger:
    global _current
    if _current is None:
        # Like upstream: logging before configure() goes to stdout only.
        _current = Logger(None, [_TextOutput(sys.stdout)] if _rank_from_env() == 0 else [])
    return _current


def reset() -> None:
    """Close the outputs; the next call logs to stdout until configure() is called again."""
    global _current
    if _current is not None:
        _current.close()
    _current = None


def get_dir() -> Optional[str]:
    return get_current().dir


def log(*args, level: int = INFO) -> None:
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
    get_current().level = level


def logkv(key: str, val: Any) -> None:
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    get_current().logkv_mean(key, val)


def logkvs(d: Dict[str, Any]) -> None:
    for k, v in d.items():
        logkv(k, v)


def dumpkvs(sync: bool = False) -> Dict[str, Any]:
    return get_current().dumpkvs(sync=sync)


def getkvs() -> Dict[str, Any]:
    return get_current().kvs


# upstream's older names
record_tabular = logkv
dump_tabular = dumpkvs
