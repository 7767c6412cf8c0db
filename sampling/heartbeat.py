"""A heartbeat: a daemon thread that calls a touch function every ``interval`` seconds until it is stopped (the run
lock's file, the shard claims), and the take-over of a holder's file whose beats stopped. An ``OSError`` from the
touch costs one beat only: a holder whose beats stop for long is taken for dead, which is what a heartbeat is for."""

import contextlib
import os
import threading

from adm_common.files import read_json_mapping, remove_quietly


def take_over(path, inode, record, suffix):
    """Move away the file at ``path`` that was judged dead (its ``inode`` and JSON ``record``), atomically: of
    several processes that judged it so, one moves it. True when this process moved that very file (removed now);
    False when it is gone, or another process took it over first (inodes are reused at once, so the record is
    compared too): what was moved, that process's live file, is put back unless a third one is there by now."""
    stale = f"{path}.stale-{suffix}"
    try:
        os.rename(path, stale)
    except FileNotFoundError:
        return False
    ours = os.stat(stale, follow_symlinks=False).st_ino == inode and read_json_mapping(stale) == record
    if not ours:
        with contextlib.suppress(OSError):  # a third file is there by now
            os.link(stale, path)
    remove_quietly(stale)
    return ours


class Heartbeat:
    """Calls ``touch()`` every ``interval`` seconds on a daemon thread named ``name``, from now until :meth:`stop`."""

    def __init__(self, touch, interval, name):
        self.touch = touch
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stopped.wait(self.interval):
            with contextlib.suppress(OSError):  # a missed beat; the next one tries again
                self.touch()

    def stop(self, timeout=None):
        """End the thread; a touch under way is waited for (at most ``timeout`` seconds, None: as long as it
        takes), so none happens after this returns unless it timed out (the caller may close or remove what it
        touches)."""
        self._stopped.set()
        self._thread.join(timeout)
