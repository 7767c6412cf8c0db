"""Planning a run in its ``out_dir``: where it stands (resume), whether it may continue there, and its record.

Output layout (``--out_dir``): samples ``[k * shard_size, (k + 1) * shard_size)`` form shard k, written to
``shards/shard_{k:06d}.npz`` atomically once complete; when all exist they are merged into
``samples_{N}x{H}x{W}x3.npz`` (upstream's format). ``config.yaml`` records the run's identity (the settings that
decide the samples, flat, by flag name, with the checkpoints' content hashes), its ``run_id`` (a hash of the
identity, stored in every shard), the first session's ``runtime``, later ``sessions`` and provenance.

Preparing (rank 0, under the run lock of ``out_dir``, :mod:`sampling.lock`): every setting is checked first
(:func:`sampling.models.check_run`: the model on the meta device, the guidance layers, the checkpoints), then a
symbolic link at a path the run reads or writes in ``out_dir`` is refused (:func:`run_links`), then the
record is compared. The same identity resumes: finished shards are verified (CRC, sample range, run id) and kept,
bad ones are moved to ``shards/rejected/`` and sampled again, and the rows of a finished merged batch of this run
(``samples_{M}x...``, e.g. after extending ``num_samples``) are reused as shards. A different configuration is
refused with the differing settings named; ``--overwrite`` then deletes only the files runs write (the record,
grid, eval.json, sample batches, shard files, progress notes) and starts afresh.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import torch as th

from adm_common.files import is_tmp_file, link_text, real_directory, symlinks_in
from adm_common.npz import samples_filename
from guided_diffusion import dist_util
from guided_diffusion.checkpoint import CheckpointError

from . import lock as run_lock
from .models import check_run, checkpoint_identity
from .record import RECORD_NAME, read_run_record
from .settings import SampleConfigError, config_differences, plain, settings_warnings
from .shards import (
    REJECTED_DIR,
    SHARD_DIR,
    ShardError,
    reject_shard,
    rows_from_batch,
    shard_filename,
    shard_index,
    shard_problem,
    stored_range,
    write_shard,
)

PROGRESS_DIR, FAILED_DIR = ".progress", ".failed"
CLAIMS_DIR = ".claims"  # inside shards/
RUN_FILES = ("config.yaml", "grid.png", "eval.json")  # what --overwrite removes, besides samples and shards
SAMPLES_RE = re.compile(r"^samples_(\d+)x(\d+)x(\d+)x3\.npz$")
LOG_RE = re.compile(r"^log(\.rank\d+)?\.txt$")  # log.txt, log.rank1.txt, ...


@dataclasses.dataclass
class RunPlan:
    """What a run in ``out_dir`` still has to do (decided by rank 0, the same on every rank)."""

    settings: object  # RunSettings
    identity: dict
    device: str
    num_shards: int
    remaining: list
    done_images: int
    complete: bool
    notes: list = dataclasses.field(default_factory=list)  # what preparing did (logged by execute)
    run_id: str = ""  # sha256 of the identity (of the record, when resuming), stored in every shard
    legacy_shards: bool = False  # a record from before run ids: its shards have none
    lock_held: bool = False  # rank 0 holds out_dir's run lock (the other ranks watch its heartbeat)

    @property
    def out_dir(self):
        return self.settings.out_dir

    @property
    def final_path(self):
        size = self.settings.model.image_size
        return os.path.join(self.out_dir, samples_filename(self.settings.sampling.num_samples, size, size))

    @property
    def record_path(self):
        return os.path.join(self.out_dir, RECORD_NAME)

    @property
    def claims_dir(self):
        return os.path.join(self.out_dir, SHARD_DIR, CLAIMS_DIR)

    def shard_path(self, k):
        return os.path.join(self.out_dir, SHARD_DIR, shard_filename(k))

    def shard_bounds(self, k):
        size, total = self.settings.sampling.shard_size, self.settings.sampling.num_samples
        return k * size, min((k + 1) * size, total)

    def shard_problem(self, k):
        """Why shard k on disk is not this run's (None when it is); reads the whole file (CRC)."""
        start, end = self.shard_bounds(k)
        return shard_problem(self.shard_path(k), start, end, self.settings.model.image_size, self.run_id,
                             allow_without_run_id=self.legacy_shards)


def resolve_device(settings):
    name = settings.runtime.device
    if not name:
        return dist_util.dev()
    device = th.device(name)
    if device.type == "cuda":
        if not th.cuda.is_available():
            raise SampleConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            local = dist_util.dev()
            return local if local.type == "cuda" else th.device("cuda", 0)
    return device


def run_identity(settings, device_type):
    """The identity of ``settings`` with the checkpoints' content (``sha256:...``; ``url:...`` for URLs)."""
    ident = settings.identity(device_type)
    m = settings.model
    ident["model_checkpoint"] = checkpoint_identity(m.model_path)
    if m.classifier_path:
        ident["classifier_checkpoint"] = checkpoint_identity(m.classifier_path)
    return ident


def run_id_of(identity):
    return hashlib.sha256(json.dumps(plain(identity), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_differences(recorded, ident, settings):
    """Lines naming how a recorded identity differs from ``ident``. A record from before content identity names
    its checkpoints by path: the same path counts as the same checkpoint (its hash is recorded from now on)."""
    recorded, lines = dict(recorded), []
    for prefix, path in (("model", settings.model.model_path), ("classifier", settings.model.classifier_path)):
        key, old_path = f"{prefix}_checkpoint", recorded.pop(f"{prefix}_path", None)
        if key not in recorded and old_path:
            if old_path != path:
                lines.append(f"{prefix}_path: {old_path!r} there, {path!r} now")
            if key in ident:
                recorded[key] = ident[key]
    for line in config_differences(recorded, ident):
        if line.startswith(("model_checkpoint:", "classifier_checkpoint:")):
            line += " (the checkpoint's content differs)"
        lines.append(line)
    return lines


def _remove_run_files(out_dir):
    """Delete what runs write in ``out_dir`` (used by --overwrite only): the record, grid, eval.json, sample
    batches named ``samples_NxHxWx3.npz``, shard files and progress notes. Nothing else (not the log, not
    ``shards/rejected/``, not files of other names)."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    for name in sorted(os.listdir(out_dir)):
        if SAMPLES_RE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(shard_dir) and not os.path.islink(shard_dir):  # nothing is removed through a link
        shards = [n for n in sorted(os.listdir(shard_dir)) if shard_index(n) is not None]
        for name in shards:
            os.remove(os.path.join(shard_dir, name))
        if shards:
            removed.append(f"{len(shards)} shard(s)")
        shutil.rmtree(os.path.join(shard_dir, CLAIMS_DIR), ignore_errors=True)
        try:
            os.rmdir(shard_dir)
        except OSError:
            pass
    for name in (PROGRESS_DIR, FAILED_DIR):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return removed or ["nothing"]


def run_links(out_dir):
    """The symbolic links at paths a run reads or writes in ``out_dir`` (sorted): the lock, record, logs, grid,
    eval.json, sample batches, ``shards/`` and its shard files, ``.claims/`` and ``rejected/``, ``.progress/``,
    ``.failed/``. ``out_dir`` itself may be a link (the user's choice)."""
    names = (run_lock.LOCK_NAME, SHARD_DIR, PROGRESS_DIR, FAILED_DIR) + RUN_FILES
    links = symlinks_in(out_dir, lambda n: n in names or bool(SAMPLES_RE.match(n) or LOG_RE.match(n)))
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if not os.path.islink(shard_dir):
        links += symlinks_in(shard_dir, lambda n: n in (CLAIMS_DIR, REJECTED_DIR) or shard_index(n) is not None)
    return links


def refuse_links(out_dir):
    """Raise :class:`SampleConfigError` (one line naming the first) when ``out_dir`` holds :func:`run_links`."""
    links = run_links(out_dir)
    if links:
        more = f" (and {len(links) - 1} more: {', '.join(links[1:3])}{', ...' if len(links) > 3 else ''})" \
            if len(links) > 1 else ""
        raise SampleConfigError(f"{link_text(links[0])}{more}: a run reads and writes only its own regular files and "
                                "real directories in its out_dir, never through a link; remove the link (or put the "
                                "run's own file there) and rerun")


def existing_run_files(out_dir):
    """Sample batches and shard files in ``out_dir`` (what --overwrite would remove of them)."""
    names = [n for n in os.listdir(out_dir) if SAMPLES_RE.match(n)]
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(shard_dir):
        names += [f"{SHARD_DIR}/{n}" for n in os.listdir(shard_dir) if shard_index(n) is not None]
    return sorted(names)


def _lock_out_dir(out_dir, locks):
    """Create ``out_dir``, take its run lock (held in ``locks``), then check that files can be written there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = locks.acquire(out_dir)
    except OSError as e:
        raise SampleConfigError(f"out_dir {out_dir} is not a writable directory: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        locks.release(out_dir)
        raise SampleConfigError(f"out_dir {out_dir} is not a writable directory: {e.strerror or e}") from None
    return lock


def _recorded_shard_size(record):
    """The shard_size of the record's last session that sampled (None when it does not say)."""
    sessions = record.get("sessions") or []
    for source in (sessions[-1] if sessions else {}, record.get("runtime") or {}, record.get("settings") or {}):
        if isinstance(source, dict) and isinstance(source.get("shard_size"), int):
            return source["shard_size"]
    return None


def _compare_with_record(settings, ident, overwrite):
    """(record or None, differences, run files without a record); raises unless the run may go on."""
    out_dir = settings.out_dir
    if os.path.exists(os.path.join(out_dir, RECORD_NAME)):
        record = read_run_record(out_dir)
        diffs = record_differences(record.get("settings") or {}, ident, settings)
        if diffs and not overwrite:
            raise SampleConfigError(
                f"{out_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                + "\nUse another --out_dir, or --overwrite to delete that run's samples and start afresh.")
        shard_dir = os.path.join(out_dir, SHARD_DIR)
        previous, size = _recorded_shard_size(record), settings.sampling.shard_size
        if not diffs and previous and previous != size and os.path.isdir(shard_dir) and any(
                shard_index(n) is not None for n in os.listdir(shard_dir)):
            raise SampleConfigError(
                f"the shards in {shard_dir} were cut with shard_size {previous}, not {size}. Resume with "
                f"--shard_size {previous} (shard_size changes no sample), or move shards/ away to sample them again")
        return record, diffs, []
    existing = existing_run_files(out_dir)
    if existing and not overwrite:
        raise SampleConfigError(
            f"{out_dir} holds samples ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}) "
            "but no config.yaml, so it cannot be resumed safely; use another --out_dir, or "
            "--overwrite to delete them")
    return None, [], existing


def _scan_shards(plan, notes):
    """Count the verified shards; move bad ones aside. A shard of this run cut with another shard_size is an
    error (its samples would be lost or mixed)."""
    size = plan.settings.sampling.shard_size
    for k in range(plan.num_shards):
        path = plan.shard_path(k)
        if not os.path.exists(path):
            plan.remaining.append(k)
            continue
        problem = plan.shard_problem(k)
        if problem and problem.startswith("it holds samples"):
            stored = stored_range(path)
            if stored and (stored[0] != k * size or stored[1] - stored[0] > size):
                old = stored[0] // k if k else stored[1] - stored[0]
                raise SampleConfigError(
                    f"{path} holds samples {stored[0]}-{stored[1] - 1}: the shards in {os.path.dirname(path)} were "
                    f"cut with shard_size {old}, not {size}. Resume with --shard_size {old} (shard_size changes no "
                    "sample), or move shards/ away to sample them again")
        if problem:
            target = reject_shard(path, problem)
            notes.append(f"shard {os.path.basename(path)} rejected ({problem}): moved to {target}, it is sampled "
                         "again")
            plan.remaining.append(k)
            continue
        start, end = plan.shard_bounds(k)
        plan.done_images += end - start


def _reuse_merged_batches(plan, notes):
    """Rows of merged sample batches of this run (other ``num_samples``) become the missing shards they cover."""
    size = plan.settings.model.image_size
    batches = []
    for name in os.listdir(plan.out_dir):
        m = SAMPLES_RE.match(name)
        if m and int(m.group(2)) == size and int(m.group(3)) == size:
            batches.append((int(m.group(1)), os.path.join(plan.out_dir, name)))
    for count, path in sorted(batches, reverse=True):
        covered = [k for k in plan.remaining if plan.shard_bounds(k)[1] <= count]
        if not covered:
            continue
        real_directory(plan.out_dir, SHARD_DIR, error=SampleConfigError)
        try:
            for start, end, images, labels in rows_from_batch(path, [plan.shard_bounds(k) for k in covered],
                                                              plan.settings.with_labels):
                k = start // plan.settings.sampling.shard_size
                write_shard(plan.shard_path(k), images, labels, start, end, plan.run_id)
                plan.remaining.remove(k)
                plan.done_images += end - start
        except (ShardError, ValueError, KeyError, OSError) as e:
            notes.append(f"the rows of {path} could not be reused ({e}); the missing shards are sampled")
            continue
        notes.append(f"reused samples 0-{plan.shard_bounds(covered[-1])[1] - 1} of {os.path.basename(path)} "
                     f"(this run with {count} samples) as {len(covered)} shard(s)")


def _prepare_rank0(settings, device_type, check_only, locks):
    notes = [f"warning: {w}" for w in settings_warnings(settings)]
    check_run(settings)  # every setting, before anything in out_dir is read, written or deleted
    out_dir = settings.out_dir
    lock = _lock_out_dir(out_dir, locks)  # before anything in out_dir is read or written
    try:
        refuse_links(out_dir)  # before anything there is read, written or deleted
        ident = run_identity(settings, device_type)
        record, diffs, orphans = _compare_with_record(settings, ident, settings.runtime.overwrite)
        if check_only:
            return None, notes
        return _plan_rank0(settings, device_type, ident, record, diffs, orphans, lock, notes)
    except BaseException:
        locks.release(out_dir)
        raise


def _plan_rank0(settings, device_type, ident, record, diffs, orphans, lock, notes):
    out_dir = settings.out_dir
    if lock.took_over:
        notes.append(f"took over the lock of a run that ended without releasing it: {lock.took_over}")
        lock.took_over = None
    if diffs:
        notes.append(f"--overwrite: removed {', '.join(_remove_run_files(out_dir))} of a run with other "
                     f"settings ({'; '.join(diffs)})")
        record = None
    elif orphans:
        notes.append(f"--overwrite: removed {', '.join(_remove_run_files(out_dir))} (no config.yaml)")

    shard_dir = os.path.join(out_dir, SHARD_DIR)
    for directory in (out_dir, shard_dir):  # (out_dir may be a link, the user's choice; shards/ is not one)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if is_tmp_file(name):  # left by a killed process of this run (the lock is ours): an unfinished shard
                os.remove(os.path.join(directory, name))
    for path in (os.path.join(out_dir, PROGRESS_DIR), os.path.join(out_dir, FAILED_DIR),
                 os.path.join(shard_dir, CLAIMS_DIR)):  # the previous session's
        shutil.rmtree(path, ignore_errors=True)

    s = settings.sampling
    num_shards = math.ceil(s.num_samples / s.shard_size)
    plan = RunPlan(settings, ident, device_type, num_shards, [], 0, False, lock_held=lock is not None)
    plan.run_id = (record or {}).get("run_id") or run_id_of(ident)
    plan.legacy_shards = bool(record) and (not record.get("run_id") or bool(record.get("legacy_shards")))
    if os.path.exists(plan.final_path):
        plan.complete, plan.done_images = True, s.num_samples
        return plan, notes
    _scan_shards(plan, notes)
    if plan.remaining and record:
        _reuse_merged_batches(plan, notes)
    return plan, notes


def prepare(settings, device=None, check_only=False, locks=None):
    """Check every setting, the checkpoints and ``out_dir``, lock ``out_dir`` and plan the work (collective).

    Rank 0 decides and takes the run lock into ``locks`` (a :class:`sampling.lock.RunLocks` the caller releases;
    without one the lock is held until the process ends); every rank gets the plan, or raises the same
    :class:`SampleConfigError`. ``check_only``: stop after the checks and the comparison with the run record (the
    lock stays held); returns None.
    """
    dist_util.setup_dist()
    device = device or resolve_device(settings)
    locks = run_lock.RunLocks() if locks is None else locks
    result = None
    if dist_util.get_world_size() == 1:  # errors as with several processes: one line, exit status 2
        try:
            result = ("ok",) + _prepare_rank0(settings, device.type, check_only, locks)
        except (SampleConfigError, CheckpointError):
            raise
        except Exception as e:
            raise SampleConfigError(f"{type(e).__name__}: {e}") from e
    elif dist_util.get_rank() == 0:
        try:
            result = ("ok",) + _prepare_rank0(settings, device.type, check_only, locks)
        except SampleConfigError as e:
            result = ("error", str(e))
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            result = ("error", f"{type(e).__name__}: {e}")
    result = dist_util.broadcast_object(result)
    if result[0] == "error":
        raise SampleConfigError(result[1])
    plan = result[1]
    if plan is None:
        return None
    plan.notes = list(result[2])
    plan.settings = settings  # this rank's own copy (identical)
    return plan
