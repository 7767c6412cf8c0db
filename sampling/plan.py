"""Planning a run in its ``out_dir`` (no model code): rank 0, under the run lock, judges the out_dir
(:func:`out_dir_state`, which a dry run asks too), then keeps this run's verified shards, moves bad ones to
``shards/rejected/``, reuses the rows of a merged batch of this run as shards and lists what is left to sample.
Another configuration is refused with the differing settings named; ``--overwrite`` deletes only what runs write."""

import dataclasses
import errno
import hashlib
import json
import os
import tempfile

from adm_common.files import is_tmp_file, link_text, real_directory
from guided_diffusion import dist_util
from guided_diffusion.checkpoint import CheckpointError

from . import lock as run_lock
from .checkpoint_files import checkpoint_identity
from .layout import RunLayout
from .record import read_run_record
from .settings import SampleConfigError, config_differences, plain, settings_warnings
from .shards import ShardError, reject_shard, rows_from_batch, shard_problem, write_shard


@dataclasses.dataclass
class RunPlan:
    """What a run in ``out_dir`` still has to do (decided by rank 0, the same on every rank)."""

    settings: object  # RunSettings
    identity: dict
    layout: RunLayout
    remaining: list = dataclasses.field(default_factory=list)
    done_images: int = 0
    complete: bool = False
    notes: list = dataclasses.field(default_factory=list)  # what preparing did (logged by execute)
    run_id: str = ""  # sha256 of the identity (of the record, when resuming), stored in every shard
    legacy_shards: bool = False  # a record from before run ids: its shards have none

    @property
    def out_dir(self):
        return self.layout.out_dir

    @property
    def num_shards(self):
        return self.layout.num_shards

    def shard_problem(self, k, strict=False):
        """Why shard k on disk is not this run's (None when it is); reads the whole file (CRC). ``strict`` (planning,
        before anything is sampled): a shard of this run cut with another shard_size is an error (its samples would
        be lost or mixed); during the run (``shards.collect``) it is rejected and sampled again like any bad shard."""
        layout, (start, end) = self.layout, self.layout.shard_bounds(k)
        problem = shard_problem(layout.shard_path(k), start, end, layout.image_size, self.run_id,
                                allow_without_run_id=self.legacy_shards)
        stored = problem.stored_range if problem else None
        if strict and stored and (stored[0] != k * layout.shard_size or stored[1] - stored[0] > layout.shard_size):
            old_size = stored[0] // k if k and stored[0] >= k else stored[1] - stored[0]
            raise _cut_with(layout, old_size, f"{layout.shard_path(k)} holds samples {stored[0]}-{stored[1] - 1}: ")
        return problem


def run_identity(settings, device_type):
    """The identity of ``settings`` with the checkpoints' content (``sha256:...``; ``url:...`` for URLs)."""
    ident = settings.identity(device_type)
    m = settings.model
    ident["model_checkpoint"] = checkpoint_identity(m.model_path)
    if m.classifier_path:
        ident["classifier_checkpoint"] = checkpoint_identity(m.classifier_path)
    return ident


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


def refuse_links(layout):
    """Raise :class:`SampleConfigError` naming the first link at a path a run reads or writes (RunLayout.links)."""
    links = layout.links()
    if links:
        more = f" (and {len(links) - 1} more: {', '.join(links[1:3])}{', ...' if len(links) > 3 else ''})" \
            if len(links) > 1 else ""
        raise SampleConfigError(f"{link_text(links[0])}{more}: a run reads and writes only its own regular files and "
                                "real directories in its out_dir, never through a link; remove the link (or put the "
                                "run's own file there) and rerun")


def check_writable(directory, make=False):
    """Files can be made in ``directory`` (a probe file, created and removed); one not made yet: its nearest
    existing parent lets directories be made (and ``make`` makes it, then probes it)."""
    try:
        if not os.path.isdir(directory):
            if os.path.exists(directory):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            parent = os.path.dirname(os.path.abspath(directory))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
                raise PermissionError(f"{parent} does not let directories be made")
            if not make:
                return
            os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SampleConfigError(f"out_dir {directory} is not a writable directory: {e.strerror or e}") from None


def _recorded_shard_size(record):
    """The shard_size of the record's last session that sampled (None when it does not say)."""
    sessions = record.get("sessions") or []
    for source in (sessions[-1] if sessions else {}, record.get("runtime") or {}, record.get("settings") or {}):
        if isinstance(source, dict) and isinstance(source.get("shard_size"), int):
            return source["shard_size"]
    return None


def _cut_with(layout, old, prefix=""):
    return SampleConfigError(f"{prefix}the shards in {layout.shard_dir} were cut with shard_size {old}, not "
                             f"{layout.shard_size}. Resume with --shard_size {old} (shard_size changes no sample), "
                             "or move shards/ away to sample them again")


@dataclasses.dataclass
class OutDirState:
    """What an out_dir holds, as a run with ``identity`` may use it: its record (None: none), how that record's
    identity differs (only with --overwrite), and the sample files found there without a record."""

    identity: dict
    record: dict = None
    differences: list = dataclasses.field(default_factory=list)
    orphans: list = dataclasses.field(default_factory=list)

    def overwrite_notes(self):
        if self.differences:
            return [f"--overwrite replaces the run there ({'; '.join(self.differences)})"]
        return ["--overwrite removes the samples there (no config.yaml)"] if self.orphans else []


def out_dir_state(settings, device_type, lock_held):
    """The one judgement of an out_dir, for a run and a dry run alike: the :class:`OutDirState`, or a
    :class:`SampleConfigError` naming what the run would refuse. ``lock_held``: the caller holds the run lock (a dry
    run only asks who does). Reads, never writes (but :func:`check_writable`'s probe file)."""
    layout, out_dir = RunLayout.of(settings), settings.out_dir
    identity = run_identity(settings, device_type)
    if not lock_held and os.path.isdir(out_dir):
        holder = run_lock.probe(out_dir)
        if holder is not None:
            raise run_lock.locked_error(out_dir, holder)
    check_writable(out_dir)
    if not os.path.isdir(out_dir):
        return OutDirState(identity)
    refuse_links(layout)  # before anything there is read, written or deleted
    overwrite = settings.runtime.overwrite
    if not os.path.exists(layout.record_path):
        orphans = layout.sample_files()
        if orphans and not overwrite:
            raise SampleConfigError(
                f"{out_dir} holds samples ({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}) "
                "but no config.yaml, so it cannot be resumed safely; use another --out_dir, or "
                "--overwrite to delete them")
        return OutDirState(identity, orphans=orphans)
    record = read_run_record(out_dir)
    diffs = record_differences(record.get("settings") or {}, identity, settings)
    if diffs and not overwrite:
        raise SampleConfigError(
            f"{out_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
            + "\nUse another --out_dir, or --overwrite to delete that run's samples and start afresh.")
    previous, size = _recorded_shard_size(record), settings.sampling.shard_size
    if not diffs and previous and previous != size and layout.shard_files():
        raise _cut_with(layout, previous)
    return OutDirState(identity, record=record, differences=diffs)


def _reuse_merged_batches(plan, notes):
    """Rows of merged sample batches of this run (other ``num_samples``) become the missing shards they cover."""
    layout = plan.layout
    for count, path in reversed(layout.sample_batches()):
        covered = [k for k in plan.remaining if layout.shard_bounds(k)[1] <= count]
        if not covered:
            continue
        real_directory(layout.out_dir, os.path.basename(layout.shard_dir), error=SampleConfigError)
        try:
            for start, end, images, labels in rows_from_batch(path, [layout.shard_bounds(k) for k in covered],
                                                              plan.settings.with_labels):
                k = start // layout.shard_size
                write_shard(plan, k, [(images, labels)])
                plan.remaining.remove(k)
                plan.done_images += end - start
        except (ShardError, ValueError, KeyError, OSError) as e:
            notes.append(f"the rows of {path} could not be reused ({e}); the missing shards are sampled")
            continue
        notes.append(f"reused samples 0-{layout.shard_bounds(covered[-1])[1] - 1} of {os.path.basename(path)} "
                     f"(this run with {count} samples) as {len(covered)} shard(s)")


def _plan_rank0(settings, state, lock, notes):
    """Act on the out_dir's state (under its lock): --overwrite, the previous session's leftovers, the shards."""
    layout = RunLayout.of(settings)
    record = state.record
    if lock.took_over:
        notes.append(f"took over the lock of a run that ended without releasing it: {lock.took_over}")
        lock.took_over = None
    if state.differences:
        notes.append(f"--overwrite: removed {', '.join(layout.remove_run_files())} of a run with other "
                     f"settings ({'; '.join(state.differences)})")
        record = None
    elif state.orphans:
        notes.append(f"--overwrite: removed {', '.join(layout.remove_run_files())} (no config.yaml)")
    for directory in (layout.out_dir, layout.shard_dir):  # (out_dir may be a link, the user's choice)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if is_tmp_file(name):  # left by a killed process of this run (the lock is ours): an unfinished shard
                os.remove(os.path.join(directory, name))
    layout.remove_markers()

    plan = RunPlan(settings, state.identity, layout)
    identity_json = json.dumps(plain(state.identity), sort_keys=True, separators=(",", ":"))
    plan.run_id = (record or {}).get("run_id") or hashlib.sha256(identity_json.encode()).hexdigest()
    plan.legacy_shards = bool(record) and (not record.get("run_id") or bool(record.get("legacy_shards")))
    if os.path.exists(layout.final_path):
        plan.complete, plan.done_images = True, layout.num_samples
        return plan
    for k in range(layout.num_shards):  # the verified shards counted, bad ones moved aside and sampled again
        path = layout.shard_path(k)
        if not os.path.exists(path):
            plan.remaining.append(k)
        elif problem := plan.shard_problem(k, strict=True):
            notes.append(f"shard {os.path.basename(path)} rejected ({problem}): moved to "
                         f"{reject_shard(path, problem)}, it is sampled again")
            plan.remaining.append(k)
        else:
            plan.done_images += layout.shard_bounds(k)[1] - layout.shard_bounds(k)[0]
    if plan.remaining and record:
        _reuse_merged_batches(plan, notes)
    return plan


def _prepare_rank0(settings, device_type, check_only, locks):
    out_dir = settings.out_dir
    check_writable(out_dir, make=True)  # out_dir made and its lock taken before anything in it is read or written
    lock = locks.acquire(out_dir)
    try:
        state = out_dir_state(settings, device_type, lock_held=True)
        if check_only:
            return None, []
        notes = [f"warning: {w}" for w in settings_warnings(settings)]
        return _plan_rank0(settings, state, lock, notes), notes
    except BaseException:
        locks.release(out_dir)
        raise


def prepare(settings, device_type="cpu", check_only=False, locks=None):
    """Lock ``out_dir``, judge it (:func:`out_dir_state`) and plan the work (collective; nothing here builds or reads
    a model). Rank 0 decides and takes the run lock into ``locks`` (released by the caller; without: at the process's
    end); every rank gets the plan or raises the same :class:`SampleConfigError`. ``device_type``: where the noise is
    drawn (part of the identity). ``check_only``: stop after the judgement (the lock stays held); returns None."""
    locks = run_lock.RunLocks() if locks is None else locks
    result = error = None  # error: rank 0's unexpected exception, chained to the SampleConfigError
    if dist_util.get_rank() == 0:
        try:
            result = ("ok",) + _prepare_rank0(settings, device_type, check_only, locks)
        except (SampleConfigError, CheckpointError) as e:
            if dist_util.get_world_size() == 1:
                raise
            result = ("error", str(e) if isinstance(e, SampleConfigError) else f"{type(e).__name__}: {e}")
        except Exception as e:  # tell the other ranks instead of leaving them waiting; one process: exit status 2
            result, error = ("error", f"{type(e).__name__}: {e}"), e
    result = dist_util.broadcast_object(result)
    if result[0] == "error":
        raise SampleConfigError(result[1]) from error
    plan = result[1]
    if plan is None:
        return None
    plan.notes = list(result[2])
    plan.settings = settings  # this rank's own copy (identical)
    return plan
