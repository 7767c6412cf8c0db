"""Carrying out a plan: every rank samples its share of the unfinished shards, rank 0 merges them.

Ranks never wait for each other in a collective while sampling or merging (a rank with more work would make
the others time out): they wait by polling the file system, and a failing rank leaves a note in ``.failed/``
that makes the others stop with its message. Progress is counted in ``.progress/`` (one small file a rank) and
shown by rank 0.
"""

import os
import shutil
import sys
import time

import numpy as np

from adm_common.files import atomic_write_text
from adm_common.npz import NpzImages, NpzWriter
from guided_diffusion import dist_util, logger

from .images import save_grid
from .plan import FAILED_DIR, PROGRESS_DIR, write_run_record
from .shards import SHARD_DIR, merge_shards

POLL_SECONDS = 0.5
WAIT_NOTE_SECONDS = 600


class PeerFailedError(RuntimeError):
    """Another process of the run failed."""


class _Progress:
    """Rank 0's tqdm bar over all ranks' images; each rank reports its count in a small file."""

    def __init__(self, plan, rank):
        self.dir = os.path.join(plan.out_dir, PROGRESS_DIR)
        self.rank = rank
        self.mine = 0
        self.bar = None
        if rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=plan.settings.sampling.num_samples, initial=plan.done_images, unit="img",
                            desc=os.path.basename(os.path.normpath(plan.out_dir)), dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)
            self.start = plan.done_images

    def advance(self, n):
        self.mine += n
        try:
            atomic_write_text(os.path.join(self.dir, f"rank{self.rank}.txt"), str(self.mine))
        except OSError:
            pass  # progress display only
        self.refresh()

    def refresh(self):
        if self.bar is None:
            return
        total = 0
        try:
            for name in os.listdir(self.dir):
                if name.startswith("rank") and name.endswith(".txt"):
                    try:
                        with open(os.path.join(self.dir, name)) as f:
                            total += int(f.read().strip() or 0)
                    except (OSError, ValueError):
                        pass
        except OSError:
            return
        done = self.start + total
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.refresh()
            self.bar.close()


def _mark_failed(plan, rank, error):
    try:
        atomic_write_text(os.path.join(plan.out_dir, FAILED_DIR, f"rank{rank}.txt"), f"{type(error).__name__}: {error}")
    except OSError:
        pass


def _raise_if_peer_failed(plan):
    directory = os.path.join(plan.out_dir, FAILED_DIR)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        if name.startswith("rank") and name.endswith(".txt") and name != f"rank{dist_util.get_rank()}.txt":
            with open(os.path.join(directory, name)) as f:
                message = f.read()
            raise PeerFailedError(f"{name[:-4].replace('rank', 'rank ')} failed: {message}")


def wait_until(predicate, plan, progress, what):
    """Poll the file system (not a collective: no timeout however uneven the ranks are)."""
    last_note = time.time()
    while not predicate():
        _raise_if_peer_failed(plan)
        progress.refresh()
        if time.time() - last_note > WAIT_NOTE_SECONDS:
            logger.log(f"still waiting for {what()}")
            last_note = time.time()
        time.sleep(POLL_SECONDS)


def _finish(plan, with_labels):
    """Rank 0: merge the shards, draw the grid, remove the shards."""
    shards = [plan.shard_path(k) for k in range(plan.num_shards)]
    if not os.path.exists(plan.final_path):
        t0 = time.time()
        shape = merge_shards(shards, plan.final_path, with_labels)
        logger.log(f"merged {plan.num_shards} shards into {plan.final_path} {shape} in {time.time() - t0:.1f}s")
    grid = os.path.join(plan.out_dir, "grid.png")
    if not os.path.exists(grid):
        save_grid(NpzImages(plan.final_path).first(64), grid)
    if not plan.settings.runtime.keep_shards:
        for path in shards:
            if os.path.exists(path):
                os.remove(path)
        try:
            os.rmdir(os.path.join(plan.out_dir, SHARD_DIR))
        except OSError:
            pass


def _sample_shard(plan, sampler, k, progress):
    start, end = plan.shard_bounds(k)
    size, batch_size = plan.settings.model.image_size, plan.settings.runtime.batch_size
    labels = []
    with NpzWriter(plan.shard_path(k)) as writer:
        with writer.stream("arr_0", (end - start, size, size, 3), np.uint8) as out:
            for b in range(start, end, batch_size):
                images, batch_labels = sampler.sample(list(range(b, min(b + batch_size, end))))
                out.write(images)
                labels.append(batch_labels)
                progress.advance(len(images))
        if sampler.with_labels:
            writer.write("arr_1", np.concatenate(labels))
        writer.write("sample_range", np.array([start, end], dtype=np.int64))


def execute(plan, sampler, on_shard_written=None):
    """Sample this rank's share of the unfinished shards, then merge. Returns the npz path.

    ``sampler`` may be None for a complete plan. ``on_shard_written(count)`` is called after each shard this
    rank writes (tests use it to kill a process at a chosen point).
    """
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    s = plan.settings
    for note in plan.notes if rank == 0 else []:
        logger.log(note)
    if plan.complete:
        if rank == 0:
            logger.log(f"{plan.final_path} exists: the run is complete")
            _finish(plan, with_labels=None)
        dist_util.barrier()
        return plan.final_path
    if rank == 0:
        write_run_record(plan, sampler.device)

    mine = plan.remaining[rank::world]
    if rank == 0:
        logger.log(f"{s.sampling.num_samples} samples in {plan.num_shards} shards of {s.sampling.shard_size}: "
                   f"{plan.done_images} done, {len(plan.remaining)} shards to sample on {world} process(es); "
                   f"device {sampler.device}, batch size {s.runtime.batch_size}")
    for name in (SHARD_DIR, PROGRESS_DIR, FAILED_DIR):
        os.makedirs(os.path.join(plan.out_dir, name), exist_ok=True)
    progress = _Progress(plan, rank)
    try:
        for count, k in enumerate(mine, 1):
            start, end = plan.shard_bounds(k)
            t0 = time.time()
            _sample_shard(plan, sampler, k, progress)
            seconds = time.time() - t0
            logger.log(f"shard {k + 1}/{plan.num_shards} (samples {start}-{end - 1}) done by rank {rank} in "
                       f"{seconds:.1f}s ({(end - start) / max(seconds, 1e-9):.2f} img/s)")
            if on_shard_written is not None:
                on_shard_written(count)

        shards = [plan.shard_path(k) for k in range(plan.num_shards)]
        if rank == 0:
            wait_until(lambda: all(os.path.exists(p) for p in shards), plan, progress,
                       lambda: "shards " + ", ".join(os.path.basename(p) for p in shards if not os.path.exists(p)))
            progress.close()
            _finish(plan, sampler.with_labels)
        else:
            wait_until(lambda: os.path.exists(plan.final_path), plan, progress,
                       lambda: f"rank 0 to write {plan.final_path}")
    except BaseException as e:
        if not isinstance(e, PeerFailedError):
            _mark_failed(plan, rank, e)
        raise
    dist_util.barrier()
    if rank == 0:
        for name in (PROGRESS_DIR, FAILED_DIR):
            shutil.rmtree(os.path.join(plan.out_dir, name), ignore_errors=True)
        logger.log(f"done: {plan.final_path}")
    return plan.final_path
