"""The layout of a run's ``out_dir``: every path and file name a run reads or writes there, in one place.

    out_dir/
      lock                        the run lock (sampling.lock), held by rank 0 while the run goes on
      config.yaml                 the run record (sampling.record)
      log.txt, log.rank1.txt ...  the logs
      samples_{N}x{H}x{W}x3.npz   the merged samples (upstream's format); other N: earlier runs of the same identity
      grid.png, eval.json         the first 64 samples; the evaluation (sweeps)
      shards/shard_{k:06d}.npz    samples [k * shard_size, (k + 1) * shard_size), until merged
      shards/.claims/             which process samples which shard (sampling.claims)
      shards/rejected/            shards that failed their checks, with the reason beside them (never deleted)
      .progress/, .failed/        per-rank markers (RankMarkers): images done, a failure that stops the other ranks
"""

import contextlib
import dataclasses
import os
import re
import shutil

from adm_common.files import UnsafePathError, atomic_write_text, real_directory, symlinks_in
from adm_common.npz import samples_filename

LOCK_NAME = "lock"
RECORD_NAME = "config.yaml"
GRID_NAME = "grid.png"
SHARD_DIR = "shards"
CLAIMS_DIR = ".claims"  # inside shards/
REJECTED_DIR = "rejected"  # inside shards/
PROGRESS_DIR, FAILED_DIR = ".progress", ".failed"
RUN_FILES = (RECORD_NAME, GRID_NAME, "eval.json")  # what --overwrite removes, besides samples and shards
SAMPLES_RE = re.compile(r"^samples_(\d+)x(\d+)x(\d+)x3\.npz$")
LOG_RE = re.compile(r"^log(\.rank\d+)?\.txt$")  # log.txt, log.rank1.txt, ...
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")
_RANK_MARKER_RE = re.compile(r"^rank(\d+)\.txt$")


def shard_filename(index):
    return f"shard_{index:06d}.npz"


def shard_index(filename):
    """The shard number of a shard file name, or None for other names."""
    m = _SHARD_RE.match(filename)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class RankMarkers:
    """A directory of one small text file per rank, ``rank{r}.txt``, that the ranks of a run write and read to
    tell each other something without a collective (``.progress/``, ``.failed/``); never through a link."""

    directory: str

    def write(self, rank, text):
        """Replace ``rank``'s marker with ``text``; False when it could not be written (a note to the other ranks:
        a full disk or a link in the way does not stop the writer)."""
        try:
            real_directory(*os.path.split(self.directory))
            atomic_write_text(os.path.join(self.directory, f"rank{rank}.txt"), text)
        except (OSError, UnsafePathError):
            return False
        return True

    def read_all(self):
        """``{rank: text}`` by rank ({} when the directory is missing); a link or unreadable file is left out."""
        found = {}
        for name in _listdir(self.directory):
            if not (m := _RANK_MARKER_RE.match(name)):
                continue
            try:
                with open(os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_NOFOLLOW),
                          encoding="utf-8", errors="replace") as f:
                    found[int(m.group(1))] = f.read()
            except OSError:
                pass
        return dict(sorted(found.items()))

    def clear(self):
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The files of one run in ``out_dir`` (``num_samples`` images of ``image_size``, cut into shards)."""

    out_dir: str
    num_samples: int
    image_size: int
    shard_size: int

    @classmethod
    def of(cls, settings):
        s = settings.sampling
        return cls(settings.out_dir, s.num_samples, settings.model.image_size, s.shard_size)

    def path(self, *names):
        return os.path.join(self.out_dir, *names)

    @property
    def final_path(self):
        return self.path(samples_filename(self.num_samples, self.image_size, self.image_size))

    @property
    def record_path(self):
        return self.path(RECORD_NAME)

    @property
    def shard_dir(self):
        return self.path(SHARD_DIR)

    @property
    def claims_dir(self):
        return self.path(SHARD_DIR, CLAIMS_DIR)

    @property
    def progress_markers(self):  # each rank's count of its images this session (sampling.progress)
        return RankMarkers(self.path(PROGRESS_DIR))

    @property
    def failure_markers(self):  # a failing rank's error, which stops the other ranks (sampling.execute)
        return RankMarkers(self.path(FAILED_DIR))

    @property
    def num_shards(self):
        return -(-self.num_samples // self.shard_size)

    def shard_path(self, k):
        return self.path(SHARD_DIR, shard_filename(k))

    def shard_bounds(self, k):
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)

    def shard_files(self):
        """The names of the shard files in ``shards/`` (any run's, any number)."""
        return sorted(n for n in _listdir(self.shard_dir) if shard_index(n) is not None)

    def sample_batches(self):
        """[(N, path)] of the merged sample batches ``samples_{N}x{H}x{W}x3.npz`` of this image size."""
        found = []
        for name in _listdir(self.out_dir):
            m = SAMPLES_RE.match(name)
            if m and int(m.group(2)) == int(m.group(3)) == self.image_size:
                found.append((int(m.group(1)), self.path(name)))
        return sorted(found)

    def sample_files(self):
        """Sample batches (any size) and shard files: what --overwrite would remove of them."""
        names = [n for n in _listdir(self.out_dir) if SAMPLES_RE.match(n)]
        return sorted(names + [f"{SHARD_DIR}/{n}" for n in self.shard_files()])

    def links(self):
        """The symbolic links at paths a run reads or writes (sorted); ``out_dir`` itself may be a link."""
        names = (LOCK_NAME, SHARD_DIR, PROGRESS_DIR, FAILED_DIR) + RUN_FILES
        links = symlinks_in(self.out_dir, lambda n: n in names or bool(SAMPLES_RE.match(n) or LOG_RE.match(n)))
        if not os.path.islink(self.shard_dir):
            links += symlinks_in(self.shard_dir,
                                 lambda n: n in (CLAIMS_DIR, REJECTED_DIR) or shard_index(n) is not None)
        return links

    def remove_markers(self, claims=True):
        """A session's leftovers: rank markers, shard claims (unless not ``claims``) and an empty ``shards/``."""
        self.progress_markers.clear()
        self.failure_markers.clear()
        if claims:
            shutil.rmtree(self.claims_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # not empty, or not there
                os.rmdir(self.shard_dir)

    def remove_run_files(self):
        """Delete what runs write (--overwrite only): the record, grid, eval.json, sample batches, shard files and
        the markers; not the log, ``shards/rejected/`` or files of other names. Returns what was removed."""
        removed = []
        for name in RUN_FILES + tuple(n for n in sorted(_listdir(self.out_dir)) if SAMPLES_RE.match(n)):
            if os.path.isfile(self.path(name)):
                os.remove(self.path(name))
                removed.append(name)
        if not os.path.islink(self.shard_dir):  # nothing is removed through a link
            shards = self.shard_files()
            for name in shards:
                os.remove(os.path.join(self.shard_dir, name))
            if shards:
                removed.append(f"{len(shards)} shard(s)")
        self.remove_markers()
        return removed or ["nothing"]


def _listdir(directory):
    try:
        return os.listdir(directory)
    except OSError:  # not there (yet), or not a directory
        return []
