"""Carrying out a plan: the ranks claim and sample the unfinished shards, rank 0 verifies and merges them.

Shards are claimed, not assigned: a claim is a file ``shards/.claims/shard_{k:06d}.claim`` created exclusively
(``O_EXCL``) whose mtime a thread of the claiming process refreshes (its heartbeat) while batches keep coming
(one batch must take less than ``claim_lease``). Each rank first takes its own share (``remaining[rank::world]``),
then any other shard not on disk and unclaimed (also one verified earlier that failed the merge), and a shard
whose claim had no heartbeat for ``claim_lease`` seconds (a stalled, hung or stopped rank) is claimed again by
another rank. Claiming changes only who samples a shard, never what it holds: sample i depends only on (seed, i).
A rank whose claim was taken over discards its copy.

Ranks never wait for each other in a collective while sampling or merging (a rank with more work would make
the others time out): they wait by polling the file system, and a failing rank leaves a note in ``.failed/`` (its
marker, :class:`sampling.layout.RankMarkers`) that makes the others stop with its message. A rank 0 that died
without a note is noticed by its run lock file going stale or missing (:class:`Rank0Watch`). Rank 0 verifies
every shard when it first counts it (CRC, sample range, run id; a bad one is moved to ``shards/rejected/`` and
sampled again), logs which ranks it waits for (within a minute), checks that the disk has room for the merged
file, then merges. Progress is counted in ``.progress/`` (one marker a rank) and shown by rank 0: a tqdm bar on a
terminal, a plain line a minute otherwise (a log file).
"""

import errno
import os
import shutil
import signal
import time

import numpy as np

from adm_common.files import real_directory
from adm_common.npz import NpzImages, NpzWriter
from guided_diffusion import dist_util, logger

from . import lock as run_lock
from .claims import Claims
from .images import save_grid
from .layout import FAILED_DIR, PROGRESS_DIR, SHARD_DIR, shard_filename, shard_index
from .record import write_run_record
from .progress import Progress
from .settings import SampleConfigError
from .shards import ShardError, merge_shards, reject_shard

POLL_SECONDS = 0.5
FIRST_NOTE_SECONDS = 30  # the first "waiting for" line (sooner with a claim_lease under 2 minutes)
WAIT_NOTE_SECONDS = 60  # then one a minute
MERGE_MARGIN_BYTES = 64 << 20
RANK0_STALE_HEARTBEATS = 4  # rank 0 is taken to be gone when its run lock was not refreshed for this many beats


class PeerFailedError(RuntimeError):
    """Another process of the run failed."""


class DiskFullError(RuntimeError):
    """Not enough free space for a shard or the merged file; finished shards are kept."""


def disk_full(directory, path, need=None, free=None, needer="it"):
    """The one message for a full disk: where, the file being written, how much ``needer`` needs and how much is
    free, and what to do."""
    sizes = ([f"{needer} needs about {_megabytes(need)}"] if need is not None else []) + (
        [f"{_megabytes(free)} are free"] if free is not None else [])
    return DiskFullError(f"no space left on the device of {directory} while writing {path}"
                         + (f": {', '.join(sizes)}" if sizes else "")
                         + "; free some space and rerun the same command (finished shards are kept)")


class RunStopped(BaseException):
    """The process got a termination signal (raised by the handler the entry point installs)."""

    def __init__(self, signum):
        self.signum = int(signum)
        try:
            self.signal_name = signal.Signals(self.signum).name
        except ValueError:
            self.signal_name = f"signal {self.signum}"
        super().__init__(f"stopped by {self.signal_name}")


class _Superseded(Exception):
    """This rank's claim on the shard it sampled was taken over meanwhile: its copy is not kept."""


def _megabytes(n):
    return f"{n / 2**20:,.0f} MB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GB"


def _free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _raise_if_peer_failed(failures, rank):
    """Raise :class:`PeerFailedError` with the note of another rank that failed (``failures``: ``.failed/``)."""
    for peer, message in failures.read_all().items():
        if peer != rank:
            raise PeerFailedError(f"rank {peer} failed: {message}")


class Rank0Watch:
    """On the other ranks: whether rank 0 still runs, seen from its run lock file (``out_dir/lock``), whose mtime
    its heartbeat refreshes every ``lock.HEARTBEAT_SECONDS``. Rank 0 is gone when the file was not refreshed for
    ``RANK0_STALE_HEARTBEATS`` beats (it died), or has been missing that long (it ended and released the lock),
    and still is one beat after this rank first saw it so (a job suspended and resumed as a whole is not a death).
    Checked only when rank 0 is known to hold the lock (``expected``) or the file exists when watching starts, so a
    run without a lock file is never taken for a failed one."""

    def __init__(self, out_dir, expected=False):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, run_lock.LOCK_NAME)
        self.active = bool(expected) or run_lock.lock_age(out_dir) is not None
        self.seen = time.time()  # when the file was last seen fresh
        self.bad_since = None  # when this rank first saw it stale or missing (since it was last fresh)

    def check(self):
        """Raise :class:`PeerFailedError` when rank 0 is gone."""
        if not self.active:
            return
        limit = RANK0_STALE_HEARTBEATS * run_lock.HEARTBEAT_SECONDS
        age, now = run_lock.lock_age(self.out_dir), time.time()
        if age is not None and age <= limit:
            self.seen, self.bad_since = now, None
            return
        if self.bad_since is None:
            self.bad_since = now
        if now - self.bad_since < run_lock.HEARTBEAT_SECONDS:  # give rank 0's heartbeat one beat to show life
            return
        if age is None and now - self.seen <= limit:  # missing for a moment (a network file system's cache)
            return
        what = (f"its run lock {self.path} was not refreshed for {age:.0f} s" if age is not None
                else f"its run lock {self.path} has been gone for {now - self.seen:.0f} s")
        raise PeerFailedError(f"rank 0 stopped without finishing the run ({what}: it died, was killed, or failed "
                              "before it could say why; see its log); rerun the same command to resume")


class _WaitNotes:
    """A "waiting for ..." log line once waiting has lasted ``first`` seconds, then one a minute."""

    def __init__(self, first):
        self.first = first
        self.reset()

    def reset(self):
        self.since, self.next = None, None

    def maybe(self, what):
        now = time.time()
        if self.since is None:
            self.since, self.next = now, now + self.first
        if now >= self.next:
            logger.log(f"waiting {now - self.since:.0f} s for {what()}")
            self.next = now + WAIT_NOTE_SECONDS


def _finish(plan, with_labels):
    """Rank 0: check the free space, merge the shards, draw the grid, remove the shards."""
    shards = [plan.layout.shard_path(k) for k in range(plan.num_shards)]
    if not os.path.exists(plan.layout.final_path):
        need = sum(os.path.getsize(p) for p in shards)
        free = _free_bytes(plan.out_dir)
        if free is not None and free < need + MERGE_MARGIN_BYTES:
            raise DiskFullError(
                f"not enough space to merge the shards into {plan.layout.final_path}: the merged file needs "
                f"{_megabytes(need)} (as much as the shards), {_megabytes(free)} are free; free "
                f"{_megabytes(need + MERGE_MARGIN_BYTES - free)} more and rerun the same command (the shards are kept)")
        t0 = time.time()
        try:
            shape = merge_shards(shards, plan.layout.final_path, with_labels)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(plan.out_dir, plan.layout.final_path, need, needer="the merged file") from None
            raise
        logger.log(f"merged {plan.num_shards} shards into {plan.layout.final_path} {shape} in {time.time() - t0:.1f}s")
    grid = plan.layout.grid_path
    if os.path.islink(grid) or not os.path.exists(grid):  # a link put there meanwhile is replaced, not followed
        save_grid(NpzImages(plan.layout.final_path).first(64), grid)
    if not plan.settings.runtime.keep_shards:  # the claims go after the final barrier (a rank may still claim)
        for path in shards:
            if os.path.exists(path):
                os.remove(path)
        plan.layout.remove_empty_shard_dir()


def _sample_claimed(plan, sampler, k, progress, claims, rank):
    """Sample the claimed shard k into its file (atomically); False when another rank took it over meanwhile (this
    copy is dropped). Each finished batch keeps the claim's heartbeat going."""
    start, end = plan.layout.shard_bounds(k)
    size, batch_size = plan.settings.model.image_size, plan.settings.runtime.batch_size
    labels, t0 = [], time.time()

    def still_mine():  # asked before sampling and before the file is put in place
        return claims.owned(k) and not os.path.exists(plan.layout.final_path)

    try:
        if not still_mine():
            raise _Superseded()
        with NpzWriter(plan.layout.shard_path(k)) as writer:
            with writer.stream("arr_0", (end - start, size, size, 3), np.uint8) as out:
                for b in range(start, end, batch_size):
                    images, batch_labels = sampler.sample(list(range(b, min(b + batch_size, end))))
                    out.write(images)
                    labels.append(batch_labels)
                    progress.advance(len(images))
                    claims.progressed()
            if sampler.with_labels:
                writer.write("arr_1", np.concatenate(labels))
            writer.write("sample_range", np.array([start, end], dtype=np.int64))
            writer.write("run_id", np.array([plan.run_id]))
            if not still_mine():
                raise _Superseded()
    except _Superseded:
        logger.log(f"shard {k + 1}/{plan.num_shards} was taken over by another rank while rank {rank} sampled it; "
                   "this copy is discarded")
        return False
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(plan.out_dir, plan.layout.shard_path(k), (end - start) * size ** 2 * 3,
                            _free_bytes(plan.out_dir), needer="a shard") from None
        raise
    finally:
        claims.release(k)
    seconds = time.time() - t0
    logger.log(f"shard {k + 1}/{plan.num_shards} (samples {start}-{end - 1}) done by rank {rank} in "
               f"{seconds:.1f}s ({(end - start) / max(seconds, 1e-9):.2f} img/s)")
    return True


def _claim_next(plan, claims, order):
    """Claim the first shard of ``order`` that is neither on disk nor claimed: (k, note), or (None, None)."""
    if os.path.exists(plan.layout.final_path):  # merged (its shards may be gone already): nothing is left to sample
        return None, None
    for k in order:
        if os.path.exists(plan.layout.shard_path(k)):
            continue
        ok, note = claims.try_claim(k)
        if not ok:
            continue
        if os.path.exists(plan.layout.shard_path(k)) or os.path.exists(plan.layout.final_path):  # finished just now
            claims.release(k)
            continue
        return k, note
    return None, None


def _verify_new(plan, verified):
    """Rank 0: verify shards that appeared since the last look; bad ones are moved aside (and sampled again)."""
    for k in range(plan.num_shards):
        if k in verified or not os.path.exists(plan.layout.shard_path(k)):
            continue
        problem = plan.shard_problem(k)
        if problem:
            target = reject_shard(plan.layout.shard_path(k), problem)
            logger.log(f"shard {shard_filename(k)} rejected ({problem}): moved to {target}, it is sampled again")
        else:
            verified.add(k)


def _waiting_for(plan, rank, verified, claims):
    """What this rank waits for: rank 0 for shards (and whose), the others for rank 0's merge."""
    if rank != 0:
        return f"rank 0 to merge the shards into {plan.layout.final_path}"
    missing = [k for k in range(plan.num_shards) if k not in verified]
    ranks, parts = set(), []
    for k in missing[:8]:
        holder = claims.holder(k)
        if holder is None:
            parts.append(f"{k + 1} (unclaimed)")
        else:
            ranks.add(holder[0])
            parts.append(f"{k + 1} (rank {holder[0]}, last heartbeat {holder[1]:.0f} s ago)")
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    who = f"rank(s) {', '.join(str(r) for r in sorted(ranks, key=str))}" if ranks else "unclaimed shards"
    return f"{who}: shard(s) {', '.join(parts)}{more} of {plan.num_shards}"


def execute(plan, sampler, on_shard_written=None, on_shard_claimed=None):
    """Claim and sample unfinished shards until none is left, then (rank 0) merge. Returns the npz path.

    ``sampler`` may be None for a complete plan. ``on_shard_claimed(count)`` / ``on_shard_written(count)`` are
    called when this rank claims / has written its count-th shard (tests stop or kill a process there).
    """
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    s = plan.settings
    for note in plan.notes if rank == 0 else []:
        logger.log(note)
    if plan.complete:
        if rank == 0:
            logger.log(f"{plan.layout.final_path} exists: the run is complete")
            _finish(plan, with_labels=None)
        dist_util.barrier()
        return plan.layout.final_path
    own = plan.remaining[rank::world]
    # Own share first, then every other shard: one verified by prepare may fail the merge and be sampled again.
    order = own + sorted(set(range(plan.num_shards)) - set(own))
    verified = {k for k in range(plan.num_shards) if k not in plan.remaining}  # checked by prepare
    notes = _WaitNotes(min(FIRST_NOTE_SECONDS, s.runtime.claim_lease / 4))  # before a stalled claim expires
    watch = Rank0Watch(plan.out_dir, expected=True) if rank != 0 else None  # a plan exists: rank 0 holds the lock
    count = claimed = 0
    claims, failures = None, plan.layout.failure_markers
    try:  # from here on a failure leaves a note in .failed/ that stops the other ranks
        if rank == 0:
            write_run_record(plan, sampler.device)
            logger.log(f"{s.sampling.num_samples} samples in {plan.num_shards} shards of {s.sampling.shard_size}: "
                       f"{plan.done_images} done, {len(plan.remaining)} shards to sample on {world} process(es); "
                       f"device {sampler.device}, batch size {s.runtime.batch_size}")
        for name in (SHARD_DIR, PROGRESS_DIR, FAILED_DIR):  # a link there is refused (never written through)
            real_directory(plan.out_dir, name, error=SampleConfigError)
        progress = Progress(plan, rank)
        claims = Claims(plan, rank)
        while True:
            _raise_if_peer_failed(failures, rank)
            if rank != 0 and os.path.exists(plan.layout.final_path):
                break
            if watch is not None:
                try:
                    watch.check()
                except PeerFailedError:
                    _raise_if_peer_failed(failures, rank)  # its own note, when it wrote one before releasing the lock
                    raise
            if rank == 0 and len(verified) == plan.num_shards:
                try:
                    _finish(plan, sampler.with_labels)
                    break
                except ShardError as e:  # damaged after it was verified: set aside, sample again
                    target = reject_shard(e.path, e.reason)
                    logger.log(f"{e}: moved to {target}, it is sampled again")
                    verified.discard(shard_index(os.path.basename(e.path)))
                    continue
            k, note = _claim_next(plan, claims, order)
            if k is not None:
                if note:
                    logger.log(note)
                claimed += 1
                if on_shard_claimed is not None:
                    on_shard_claimed(claimed)
                if _sample_claimed(plan, sampler, k, progress, claims, rank):
                    count += 1
                    if rank == 0:
                        verified.add(k)
                    if on_shard_written is not None:
                        on_shard_written(count)
                notes.reset()
                continue
            if rank == 0:
                _verify_new(plan, verified)
            if rank != 0 or len(verified) < plan.num_shards:
                notes.maybe(lambda: _waiting_for(plan, rank, verified, claims))
            progress.refresh()
            time.sleep(POLL_SECONDS)
    except BaseException as e:
        if not isinstance(e, PeerFailedError):
            failures.write(rank, f"{type(e).__name__}: {e}")
        raise
    finally:
        if claims is not None:
            claims.close()
    progress.close()
    dist_util.barrier()
    if rank == 0:
        # The claims again: a rank taken over may have touched them after the merge.
        plan.layout.remove_markers(claims=not s.runtime.keep_shards)
        if not s.runtime.keep_shards:
            plan.layout.remove_empty_shard_dir()
        logger.log(f"done: {plan.layout.final_path}")
    return plan.layout.final_path
