"""Shard files of a run (``shards/shard_{k:06d}.npz``) and their merge into upstream's sample batch.

A shard holds ``arr_0`` (uint8 images), ``arr_1`` (labels, when the run has them), ``sample_range`` ([start, end)
of its sample indices) and ``run_id`` (the run's identity hash). It counts as done only after :func:`shard_problem`
found it right; one that fails is moved to ``shards/rejected/`` (:func:`reject_shard`) and sampled again.
"""

import contextlib
import dataclasses
import datetime
import os
import time
import zipfile
from typing import Optional, Tuple

import numpy as np

from adm_common.files import atomic_write_text, real_directory
from adm_common.npz import NpzImages, NpzWriter, crc_failure, npz_header
from guided_diffusion import logger

from .images import image_grid, save_png
from .layout import GRID_NAME, REJECTED_DIR, shard_filename, shard_index
from .settings import SampleConfigError


class ShardError(ValueError):
    """A shard that cannot be used (damaged, foreign, of another layout); ``path`` names it."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    """Why a shard on disk is not the one a run expects: ``reason`` for people (logs, ``rejected/``), and the
    sample range the file holds when that range is what is wrong (a shard of another shard_size)."""

    reason: str
    stored_range: Optional[Tuple[int, int]] = None

    def __str__(self):
        return self.reason


def shard_problem(path, start, end, image_size, run_id, allow_without_run_id=False):
    """Why ``path`` is not shard [start, end) of run ``run_id`` (a :class:`ShardProblem`), else None; checks CRCs."""
    try:
        if (bad := crc_failure(path)) is not None:
            return ShardProblem(f"damaged: the CRC check of {bad} failed")
        shape, dtype = npz_header(path, "arr_0")
        with np.load(path, allow_pickle=False) as npz:
            stored = tuple(int(v) for v in npz["sample_range"]) if "sample_range" in npz.files else None
            stored_id = str(npz["run_id"][0]) if "run_id" in npz.files else None
    except Exception as e:  # a damaged zip shows up as several exception types
        return ShardProblem(f"unreadable ({type(e).__name__}: {e})")
    if stored_id is None and not allow_without_run_id:
        return ShardProblem("it has no run_id (it was not written by this run)")
    if stored_id is not None and stored_id != run_id:
        return ShardProblem(f"written by another run (run_id {stored_id[:12]}..., this run's is {run_id[:12]}...)")
    if stored is None:
        return ShardProblem("it has no sample_range")
    if stored != (start, end):
        return ShardProblem(f"it holds samples {stored[0]}-{stored[1] - 1}, this run's shard holds {start}-{end - 1} "
                            "(another num_samples or shard_size)", stored)
    if dtype != np.uint8 or shape != (end - start, image_size, image_size, 3):
        return ShardProblem(f"arr_0 is {dtype} {shape}, expected uint8 {(end - start, image_size, image_size, 3)}")
    return None


def reject_shard(path, reason):
    """Move a shard to ``shards/rejected/`` (never deleted) with a ``.reason.txt`` beside it; returns the new path."""
    directory = real_directory(os.path.dirname(os.path.abspath(path)), REJECTED_DIR, error=SampleConfigError)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = os.path.basename(path)
    target = os.path.join(directory, f"{name[:-4]}.{stamp}.npz")
    n = 1
    while os.path.exists(target):
        target = os.path.join(directory, f"{name[:-4]}.{stamp}-{n}.npz")
        n += 1
    os.replace(path, target)
    with contextlib.suppress(OSError):  # the shard is set aside even when its note cannot be written
        atomic_write_text(target[:-4] + ".reason.txt", f"{name}: {reason}\n")
    return target


def write_shard(plan, k, batches):
    """Write shard k of ``plan``'s run (atomically; a full disk is named in out_dir's terms): ``batches`` of (images,
    labels) streamed into ``arr_0`` and ``arr_1``, then its ``sample_range`` and ``run_id``."""
    (start, end), size, labels = plan.layout.shard_bounds(k), plan.layout.image_size, []
    with NpzWriter(plan.layout.shard_path(k), need=(end - start) * size ** 2 * 3, needer="a shard",
                   root=plan.out_dir) as writer:
        with writer.stream("arr_0", (end - start, size, size, 3), np.uint8) as out:
            for images, batch_labels in batches:
                out.write(images)
                labels.append(batch_labels)
        if plan.settings.with_labels:
            writer.write("arr_1", np.concatenate(labels))
        writer.write("sample_range", np.array([start, end], dtype=np.int64))
        writer.write("run_id", np.array([plan.run_id]))


def rows_from_batch(npz_path, bounds, with_labels):
    """(start, end, images, labels) of each of ``bounds`` from a merged sample batch, after checking its every CRC."""
    if (bad := crc_failure(npz_path)) is not None:
        raise ShardError(npz_path, f"damaged: the CRC check of {bad} failed")
    bounds = sorted((int(start), int(end)) for start, end in bounds)  # shard bounds: never overlapping
    if not bounds:
        return
    labels = None
    if with_labels:
        with np.load(npz_path, allow_pickle=False) as npz:
            labels = np.asarray(npz["arr_1"], dtype=np.int64)
    images = NpzImages(npz_path)
    if bounds[-1][1] > images.num_images:
        raise ValueError(f"{npz_path}: arr_0 holds {images.num_images} images, fewer than {bounds[-1][1]}")
    for (start, end), rows in zip(bounds, images.rows(bounds)):
        yield start, end, rows, (labels[start:end].copy() if labels is not None else None)


def merge_shards(shard_paths, out_path, with_labels):
    """Concatenate the verified shards' ``arr_0`` (and ``arr_1``) into one npz at ``out_path``, one shard in memory at
    a time, when the free space holds it (as much again as the shards); returns the merged images' shape."""
    def read(path, key=None):  # arr_0's shape, or a member whole (checking its CRC); a failure names the shard
        try:
            if key is None:
                return npz_header(path, "arr_0")[0]
            with np.load(path, allow_pickle=False) as npz:
                return npz[key]
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
            if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
                raise  # the disk, not the shard
            raise ShardError(path, f"cannot be read for the merge ({type(e).__name__}: {e})") from None

    shapes = [read(path) for path in shard_paths]
    total, need = (sum(s[0] for s in shapes),) + shapes[0][1:], sum(os.path.getsize(p) for p in shard_paths)
    with NpzWriter(out_path, need=need, needer="the merged file (as much as the shards)",
                   before="merge the shards into") as w:
        with w.stream("arr_0", total, np.uint8) as s:
            for path in shard_paths:
                s.write(read(path, "arr_0"))
        if with_labels:
            with w.stream("arr_1", (total[0],), np.int64) as s:
                for path in shard_paths:
                    s.write(read(path, "arr_1").astype(np.int64, copy=False))
    return total


def collect(plan, verified, with_labels):
    """Rank 0, each poll: verify the shards that appeared since the last look (``verified``: the indices checked);
    once all are, merge them (checking the free space first), draw the grid and remove the shards (unless kept). A
    bad shard, found now or by the merge, is moved aside and sampled again. True when the run is finished."""
    layout, rejects = plan.layout, []  # (path, reason, what the log says)
    for k in range(plan.num_shards):
        if k not in verified and os.path.exists(layout.shard_path(k)):
            problem = plan.shard_problem(k)
            if problem:
                rejects.append((layout.shard_path(k), problem, f"shard {shard_filename(k)} rejected ({problem})"))
            else:
                verified.add(k)
    shards = [layout.shard_path(k) for k in range(plan.num_shards)]
    if len(verified) == plan.num_shards and not os.path.exists(layout.final_path):
        t0 = time.time()
        try:
            shape = merge_shards(shards, layout.final_path, with_labels)
            logger.log(f"merged {plan.num_shards} shards into {layout.final_path} {shape} in {time.time() - t0:.1f}s")
        except ShardError as e:  # damaged after it was verified
            rejects.append((e.path, e.reason, str(e)))
    for path, reason, said in rejects:
        logger.log(f"{said}: moved to {reject_shard(path, reason)}, it is sampled again")
        verified.discard(shard_index(os.path.basename(path)))
    if len(verified) < plan.num_shards:
        return False
    grid = layout.path(GRID_NAME)
    if os.path.islink(grid) or not os.path.exists(grid):  # a link put there meanwhile is replaced, not followed
        first = NpzImages(layout.final_path).first(64)
        save_png(image_grid(first), grid)
    if not plan.settings.runtime.keep_shards:  # the claims go after the final barrier (a rank may still claim)
        for path in shards:
            if os.path.exists(path):
                os.remove(path)
    return True
