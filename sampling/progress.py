"""What the ranks of a run tell each other without a collective, and what rank 0 shows: each rank counts its images
in its marker under ``.progress/`` and a failing rank leaves its error under ``.failed/``
(:class:`sampling.layout.RankMarkers`); a rank 0 that died without a note is noticed by its run lock going stale
or missing (:class:`Rank0Watch`). Rank 0 shows all ranks' images as a tqdm bar on a terminal or a plain line a
minute in a log; a rank with nothing to do logs what it waits for."""

import os
import sys
import time

from guided_diffusion import logger

from . import lock as run_lock

POLL_SECONDS = 0.5
PLAIN_PROGRESS_SECONDS = 60  # progress lines when stderr is not a terminal
FIRST_NOTE_SECONDS = 30  # the first "waiting for" line (sooner with a claim_lease under 2 minutes)
WAIT_NOTE_SECONDS = 60  # then one a minute
RANK0_STALE_HEARTBEATS = 4  # rank 0 is taken to be gone when its run lock was not refreshed for this many beats


class PeerFailedError(RuntimeError):
    """Another process of the run failed."""


def raise_if_peer_failed(failures, rank):
    """Raise :class:`PeerFailedError` with the note of another rank that failed (``failures``: ``.failed/``)."""
    for peer, message in failures.read_all().items():
        if peer != rank:
            raise PeerFailedError(f"rank {peer} failed: {message}")


class Rank0Watch:
    """On the other ranks: whether rank 0 still runs, seen from its run lock's mtime (its heartbeat). Rank 0 is gone
    when the file was not refreshed, or has been missing, for ``RANK0_STALE_HEARTBEATS`` beats and still is one beat
    after this rank first saw it so (a job suspended and resumed as a whole is not a death). Checked only when rank 0
    is known to hold the lock (``expected``) or the file exists when watching starts."""

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


class Progress:
    """One rank's side of the markers (a plain progress line, not a bar, when stderr is no terminal: no carriage
    returns piling up in a log). ``with Progress(...)``: closed (the last line shown) when the block succeeds."""

    def __init__(self, plan, rank):
        self.markers, self.failures = plan.layout.progress_markers, plan.layout.failure_markers
        self.rank = rank
        self.mine = 0
        self.bar = None
        self.total = plan.settings.sampling.num_samples
        self.start = self.done = plan.done_images
        self.name = os.path.basename(os.path.normpath(plan.out_dir))
        self.plain = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self.t0 = self.last_line = time.time()
        self.watch = Rank0Watch(plan.out_dir, expected=True) if rank != 0 else None  # rank 0 holds the lock
        self.settings = plan.settings
        self.waiting_since = self.next_note = None
        if rank == 0 and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit="img", desc=self.name, dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:  # a failure's one line is not followed by a progress line
            self.close()

    def check(self):
        """Raise :class:`PeerFailedError` when another rank left a failure note, or rank 0 is gone."""
        raise_if_peer_failed(self.failures, self.rank)
        if self.watch is not None:
            try:
                self.watch.check()
            except PeerFailedError:
                raise_if_peer_failed(self.failures, self.rank)  # its own note, when it wrote one before releasing
                raise

    def advance(self, n):
        """``n`` more images of this rank (a finished batch); waiting, if it was, is over."""
        self.mine += n
        self.waiting_since = None
        self.markers.write(self.rank, str(self.mine))  # progress display only: a marker not written is no error
        self.refresh()
        self.check()

    def wait(self, what):
        """Nothing to do this poll: log ``what()`` this rank waits for (when due), show the progress, sleep."""
        now = time.time()
        if self.waiting_since is None:
            first = min(FIRST_NOTE_SECONDS, self.settings.runtime.claim_lease / 4)  # before a stalled claim expires
            self.waiting_since, self.next_note = now, now + first
        if now >= self.next_note:
            logger.log(f"waiting {now - self.waiting_since:.0f} s for {what()}")
            self.next_note = now + WAIT_NOTE_SECONDS
        self.refresh()
        time.sleep(POLL_SECONDS)
        self.check()

    def refresh(self, last=False):
        """Rank 0: show all ranks' images (``last``: the final line, or the bar closed)."""
        if self.rank != 0:
            return
        counted = sum(int(text) for text in self.markers.read_all().values() if text.strip().isdecimal())
        self.done = max(self.done, min(self.total, self.start + counted))  # a shard taken over counts once
        if self.bar is not None:
            self.bar.update(max(0, self.done - self.bar.n))
            if last:
                self.bar.close()
        elif last or time.time() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            rate = (self.done - self.start) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else None
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None and eta < 86400 * 30 else "?"
            print(f"{self.name}: {self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), "
                  f"{rate:.2f} img/s, ETA {eta_text}", file=sys.stderr, flush=True)
            self.last_line = time.time()

    def close(self):
        self.refresh(last=True)
