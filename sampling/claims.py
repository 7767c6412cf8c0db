"""Claims on shards: a file ``shards/.claims/shard_{k:06d}.claim`` created exclusively names which process samples
shard k; a heartbeat refreshes it while batches keep coming (a main thread hung in a GPU call stops it), and a claim
without one for ``claim_lease`` seconds is taken over (:func:`sampling.heartbeat.take_over`: exactly one taker)."""

import json
import os
import socket
import threading
import time
import uuid

from adm_common.files import read_json_mapping, real_directory, remove_quietly

from .heartbeat import Heartbeat, take_over
from .settings import SampleConfigError

CLOSE_WAIT_SECONDS = 5.0


class Claims:
    """This process's claims on shards (``shards/.claims/``) and the heartbeat thread that keeps them fresh."""

    def __init__(self, plan, rank):
        self.layout, self.dir = plan.layout, plan.layout.claims_dir
        self.rank = rank
        self.lease = float(plan.settings.runtime.claim_lease)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._current = None
        self.last_progress = time.time()  # the last claim or finished batch (see progressed)
        self._lock = threading.Lock()
        shard_dir, name = os.path.split(self.dir)
        out_dir, shards = os.path.split(shard_dir)
        os.makedirs(out_dir, exist_ok=True)  # out_dir itself may be a link (the user's choice), shards/ may not
        real_directory(out_dir, shards, name, error=SampleConfigError)
        # Four beats a lease (at most 30 s apart): a few missed beats do not let a live claim expire.
        self._heartbeat = Heartbeat(self._touch_current, max(0.1, min(30.0, self.lease / 4)), "shard-claim-heartbeat")

    def path(self, k):
        return os.path.join(self.dir, f"shard_{k:06d}.claim")

    def _create(self, path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except (FileExistsError, FileNotFoundError):  # claimed, or the run is over (rank 0 removed the claims)
            return False
        try:
            os.write(fd, json.dumps({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                                     "token": self.token, "claimed": time.time()}).encode())
        finally:
            os.close(fd)
        return True

    def try_claim(self, k):
        """(True, note or None) when this process now holds shard k's claim, else (False, None)."""
        path, note = self.path(k), None
        if not self._create(path):
            try:
                judged = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return False, None
            age = time.time() - judged.st_mtime
            if age <= self.lease:
                return False, None
            holder = read_json_mapping(path)
            if not take_over(path, judged.st_ino, holder, self.token) or not self._create(path):
                return False, None
            note = (f"shard {k + 1}: rank {holder.get('rank', '?')} (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}) sent no heartbeat for {age:.0f} s (claim_lease "
                    f"{self.lease:g} s): rank {self.rank} samples it instead")
        with self._lock:
            self._current = k
            self.last_progress = time.time()
        return True, note

    def claim_next(self, order):
        """Claim the first shard of ``order`` that is neither on disk nor claimed: (k, note), or (None, None)."""
        final, shard_path = self.layout.final_path, self.layout.shard_path
        if os.path.exists(final):  # merged (its shards may be gone already): nothing is left to sample
            return None, None
        for k in order:
            if os.path.exists(shard_path(k)):
                continue
            ok, note = self.try_claim(k)
            if ok and (os.path.exists(shard_path(k)) or os.path.exists(final)):  # finished just now
                self.release(k)
            elif ok:
                return k, note
        return None, None

    def progressed(self):
        """The sampling of the current shard made progress (a batch is done): the heartbeat goes on."""
        self.last_progress = time.time()

    def owned(self, k):
        return read_json_mapping(self.path(k)).get("token") == self.token

    def still_mine(self, k):
        """Whether this process still holds shard k's claim and the run is not merged yet."""
        return self.owned(k) and not os.path.exists(self.layout.final_path)

    def release(self, k):
        with self._lock:
            if self._current == k:
                self._current = None
        if self.owned(k):
            remove_quietly(self.path(k))

    def holder(self, k):
        """(rank, seconds since its last heartbeat) of shard k's claim, or None when it is unclaimed."""
        path = self.path(k)
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        return read_json_mapping(path).get("rank", "?"), age

    def waiting_for(self, missing, num_shards):
        """Whose shards (of ``missing``) rank 0 waits for, with their claims' last heartbeats."""
        ranks, parts = set(), []
        for k in missing[:8]:
            holder = self.holder(k)
            if holder is None:
                parts.append(f"{k + 1} (unclaimed)")
            else:
                ranks.add(holder[0])
                parts.append(f"{k + 1} (rank {holder[0]}, last heartbeat {holder[1]:.0f} s ago)")
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        who = f"rank(s) {', '.join(str(r) for r in sorted(ranks, key=str))}" if ranks else "unclaimed shards"
        return f"{who}: shard(s) {', '.join(parts)}{more} of {num_shards}"

    def _touch_current(self):
        """One heartbeat: refresh the claim of the shard being sampled, unless no batch came for a lease."""
        with self._lock:
            k, stalled = self._current, time.time() - self.last_progress > self.lease
        if k is not None and not stalled and self.owned(k):  # a hung main thread lets its claim expire
            os.utime(self.path(k), follow_symlinks=False)  # a link put there is not followed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        # Claims touch paths, not descriptors: a touch hung on a stalled file system must not hang the run's
        # clean-up (SIGTERM included), so the wait is bounded; a late touch only refreshes a claim's mtime.
        self._heartbeat.stop(timeout=CLOSE_WAIT_SECONDS)
