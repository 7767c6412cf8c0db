"""What rank 0 shows of a run's progress: all ranks' images (each rank counts its own in its marker under
``.progress/``, :class:`sampling.layout.RankMarkers`), as a tqdm bar on a terminal or a plain line a minute in a
log."""

import os
import sys
import time

PLAIN_PROGRESS_SECONDS = 60  # progress lines when stderr is not a terminal


class Progress:
    """Rank 0's view of all ranks' images (each rank reports its count in a small file): a tqdm bar on a
    terminal, else a plain line every ``PLAIN_PROGRESS_SECONDS`` (no carriage returns piling up in a log)."""

    def __init__(self, plan, rank):
        self.markers = plan.layout.progress_markers
        self.rank = rank
        self.mine = 0
        self.bar = None
        self.total = plan.settings.sampling.num_samples
        self.start = plan.done_images
        self.name = os.path.basename(os.path.normpath(plan.out_dir))
        self.plain = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self.t0 = self.last_line = time.time()
        self.done = self.start
        if rank == 0 and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, unit="img", desc=self.name, dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)

    def advance(self, n):
        self.mine += n
        self.markers.write(self.rank, str(self.mine))  # progress display only: a marker not written is no error
        self.refresh()

    def _count(self):
        total = sum(int(text) for text in self.markers.read_all().values() if text.strip().isdecimal())
        return min(self.total, self.start + total)  # a shard sampled twice (taken over) counts once

    def _line(self):
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None and eta < 86400 * 30 else "?"
        print(f"{self.name}: {self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), "
              f"{rate:.2f} img/s, ETA {eta_text}", file=sys.stderr, flush=True)

    def refresh(self):
        if self.rank != 0:
            return
        self.done = max(self.done, self._count())
        if self.bar is not None:
            if self.done > self.bar.n:
                self.bar.update(self.done - self.bar.n)
        elif time.time() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self._line()
            self.last_line = time.time()

    def close(self):
        if self.rank != 0:
            return
        self.done = max(self.done, self._count())
        if self.bar is not None:
            self.refresh()
            self.bar.close()
        else:
            self._line()
