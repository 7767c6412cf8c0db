"""Carrying out a plan: each rank claims (:mod:`sampling.claims`) and samples unfinished shards, its own share
(``remaining[rank::world]``) first, then any other not on disk and unclaimed or stale; rank 0 verifies and merges
them (:func:`sampling.shards.collect`). Ranks never wait in a collective while sampling or merging (a rank with more
work would make the others time out): they poll the file system (:mod:`sampling.progress`)."""

import os
import signal
import time

from guided_diffusion import dist_util, logger

from . import shards
from .claims import Claims
from .progress import PeerFailedError, Progress
from .record import write_run_record


class RunStopped(BaseException):
    """SIGTERM or SIGINT arrived (raised by the handler the entry point installs)."""

    def __init__(self, signum):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


class _Superseded(Exception):
    """This rank's claim on the shard it sampled was taken over meanwhile: its copy is not kept."""


def _sampled(sampler, start, end, k, progress, claims):
    """Shard k's (images, labels) batches; each finished batch keeps the claim's heartbeat going. The claim is asked
    again before the file is put in place: a copy whose claim another rank took over meanwhile is dropped."""
    batch_size = sampler.settings.runtime.batch_size
    for b in range(start, end, batch_size):
        images, labels = sampler.sample(list(range(b, min(b + batch_size, end))))
        yield images, labels
        progress.advance(len(images))
        claims.progressed()
    if not claims.still_mine(k):
        raise _Superseded()


def execute(plan, sampler, on_shard_written=None, on_shard_claimed=None):
    """Claim and sample unfinished shards until none is left, then (rank 0) merge; returns the npz path (``sampler``
    None for a complete plan). ``on_shard_claimed`` / ``on_shard_written(count)``: test seams (stop or kill there)."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    s, layout = plan.settings, plan.layout
    for note in plan.notes if rank == 0 else []:
        logger.log(note)
    if rank == 0 and plan.complete:
        logger.log(f"{layout.final_path} exists: the run is complete")
    verified = {k for k in range(plan.num_shards) if k not in plan.remaining}  # checked by prepare
    own = plan.remaining[rank::world]
    # Own share first, then every other shard: one verified by prepare may fail the merge and be sampled again.
    order = own + sorted(set(range(plan.num_shards)) - set(own))
    count = claimed = 0
    try:  # from here on a failure leaves a note in .failed/ that stops the other ranks
        if rank == 0 and not plan.complete:
            write_run_record(plan, sampler.device)
            logger.log(f"{s.sampling.num_samples} samples in {plan.num_shards} shards of {s.sampling.shard_size}: "
                       f"{plan.done_images} done, {len(plan.remaining)} shards to sample on {world} process(es); "
                       f"device {sampler.device}, batch size {s.runtime.batch_size}")
        with Progress(plan, rank) as progress, Claims(plan, rank) as claims:  # a complete plan: nothing to claim
            progress.check()
            while True:
                if rank != 0 and os.path.exists(layout.final_path):
                    break
                if rank == 0 and shards.collect(plan, verified, s.with_labels):
                    break
                k, note = claims.claim_next(order)
                if k is None:
                    missing = [k for k in range(plan.num_shards) if k not in verified]
                    progress.wait(lambda: claims.waiting_for(missing, plan.num_shards) if rank == 0
                                  else f"rank 0 to merge the shards into {layout.final_path}")
                    continue
                if note:
                    logger.log(note)
                claimed += 1
                if on_shard_claimed is not None:
                    on_shard_claimed(claimed)
                (start, end), t0 = layout.shard_bounds(k), time.time()
                try:
                    if not claims.still_mine(k):  # taken over before sampling began
                        raise _Superseded()
                    shards.write_shard(plan, k, _sampled(sampler, start, end, k, progress, claims))
                except _Superseded:
                    logger.log(f"shard {k + 1}/{plan.num_shards} was taken over by another rank while rank {rank} "
                               "sampled it; this copy is discarded")
                    continue
                finally:
                    claims.release(k)
                seconds = time.time() - t0
                logger.log(f"shard {k + 1}/{plan.num_shards} (samples {start}-{end - 1}) done by rank {rank} in "
                           f"{seconds:.1f}s ({(end - start) / max(seconds, 1e-9):.2f} img/s)")
                count += 1
                if rank == 0:
                    verified.add(k)
                if on_shard_written is not None:
                    on_shard_written(count)
    except BaseException as e:
        if not isinstance(e, PeerFailedError):
            layout.failure_markers.write(rank, f"{type(e).__name__}: {e}")
        raise
    dist_util.barrier()
    if rank == 0:
        # The claims again: a rank taken over may have touched them after the merge.
        layout.remove_markers(claims=not s.runtime.keep_shards)
        logger.log(f"done: {layout.final_path}")
    return layout.final_path
