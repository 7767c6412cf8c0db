"""The run lock: one run at a time in an ``out_dir`` (docs/what-happens-when.md). Rank 0 holds an exclusive ``flock``
on ``out_dir/lock`` (naming the holder) from before it reads anything there until the run ends; without ``flock``
the lock is the file's existence (one left by a dead process of this host is taken over). A heartbeat refreshes the
file's mtime, so a live lock of another host is refused where ``flock`` is local to each node. A link is refused."""

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time

from adm_common.files import link_text, read_json_mapping

from .heartbeat import Heartbeat, take_over
from .layout import LOCK_NAME
from .settings import SampleConfigError

HEARTBEAT_SECONDS = 30.0
FOREIGN_FRESH_SECONDS = 120.0  # a lock file of another host touched this recently is taken to be alive
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock's errors where it is not supported

class RunLockedError(SampleConfigError):
    """Another run holds the lock of this out_dir."""


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user's) or unreadable: assume alive
    return True


def lock_age(out_dir):
    """Seconds since ``out_dir``'s lock file was last refreshed (its holder's heartbeat), None when it is missing."""
    try:
        return time.time() - os.stat(os.path.join(out_dir, LOCK_NAME)).st_mtime
    except FileNotFoundError:
        return None


def locked_error(out_dir, info, hint=""):
    """The error of a run refused because the run of ``info`` holds ``out_dir``'s lock (also in dry runs)."""
    holder = "another process (no details in the lock file)"
    if info:
        holder = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
                  + (f" ({info['command']})" if info.get("command") else ""))
    return RunLockedError(f"{out_dir} is in use by another run: {holder} holds "
                          f"{os.path.join(out_dir, LOCK_NAME)}. Wait for it to finish, or use another --out_dir{hint}")


class RunLock:
    """An exclusive lock on ``out_dir/lock``; ``acquire()`` raises :class:`RunLockedError` when it is held."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None
        self.mode = None  # "flock" or "exclusive"
        self.took_over = None  # the record of a dead holder whose lock was taken over
        self._heartbeat = None  # refreshes the file's mtime while the lock is held

    def acquire(self):
        import fcntl

        mode = "flock"  # "exclusive" where the file system has no flock: the lock is the file's existence
        for _ in range(10):
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
            try:  # created here (not opened): this process's own file, so it holds the exclusive lock already
                try:
                    fd, created = os.open(self.path, flags | os.O_EXCL, 0o644), True
                except FileExistsError:
                    if mode == "exclusive":
                        raise
                    try:  # not O_CREAT: a file made here must count as created (else it is never released)
                        fd, created = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW), False
                    except FileNotFoundError:  # released between the two opens: create it afresh
                        continue
            except OSError as e:
                if os.path.islink(self.path):
                    raise SampleConfigError(f"{link_text(self.path)}, not a run lock: a run never writes through a "
                                            f"link in its out_dir; remove it (rm {self.path}) and rerun") from None
                if not isinstance(e, FileExistsError):
                    raise
                try:  # the record and the inode judged, from one open file
                    with open(os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)) as f:
                        inode, age = os.fstat(f.fileno()).st_ino, time.time() - os.fstat(f.fileno()).st_mtime
                        info = read_json_mapping(f)
                except FileNotFoundError:
                    continue
                except OSError:
                    inode, age, info = None, 0.0, {}
                here = info.get("host") == socket.gethostname()
                if here and info.get("pid") and not _pid_alive(info["pid"]):
                    if take_over(self.path, inode, info, os.getpid()):
                        self.took_over = info
                    continue  # a live lock put there meanwhile by another process is refused next time round
                raise locked_error(self.out_dir, info, "" if here else f"; this file system has no flock, so a lock "
                                   f"left by a run that died on another host stays: if no run uses {self.out_dir} "
                                   f"(the file was last refreshed {age:.0f} s ago), delete {self.path}")
            if mode == "exclusive":
                return self._hold(fd, mode)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if created and e.errno in NO_FLOCK:
                    return self._hold(fd, "exclusive")
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise locked_error(self.out_dir, read_json_mapping(self.path)) from None
                if e.errno in NO_FLOCK:
                    mode = "exclusive"
                    continue
                raise
            try:  # the file may have been removed (and re-created) by the holder's release meanwhile
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = read_json_mapping(self.path)
            if previous and previous.get("host") != socket.gethostname():
                age = time.time() - os.fstat(fd).st_mtime
                if age < FOREIGN_FRESH_SECONDS:  # flock may be local to each node on this file system
                    os.close(fd)
                    raise locked_error(self.out_dir, previous,
                                       f"; if that run is not running any more, delete {self.path}")
            self.took_over = previous or None
            return self._hold(fd, "flock")
        raise RunLockedError(f"could not lock {self.path}: it keeps being replaced")

    def _hold(self, fd, mode):
        """The lock is taken on ``fd``: write this process's record into it and start the heartbeat."""
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                                 "command": " ".join(sys.argv)[:500]}).encode() + b"\n")
        os.fsync(fd)
        self.fd, self.mode = fd, mode
        self._heartbeat = Heartbeat(lambda: os.utime(fd), HEARTBEAT_SECONDS, "run-lock-heartbeat")
        return self

    def release(self):
        if self.fd is None:
            return
        self._heartbeat.stop()  # first: the heartbeat never touches the descriptor closed (and reused) below
        # Remove the file while holding it: a waiting opener notices the inode change and retries.
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)
        os.close(self.fd)
        self.fd = None


class RunLocks:
    """The run locks a caller holds, by ``out_dir``. Whoever runs (``sampling.run``, a sweep) owns one and
    releases what it holds when it ends (``with RunLocks() as locks:``); acquiring a held one again returns it."""

    def __init__(self):
        self._held = {}  # real path of out_dir -> RunLock

    def acquire(self, out_dir):
        key = os.path.realpath(out_dir)
        if key not in self._held:
            self._held[key] = RunLock(out_dir).acquire()
        return self._held[key]

    def release(self, out_dir):
        lock = self._held.pop(os.path.realpath(out_dir), None)
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for key in list(self._held):
            self._held.pop(key).release()
        return False


def probe(out_dir):
    """Without taking it: the record of the run holding ``out_dir``'s lock, or None when it is free (dry runs)."""
    import fcntl

    path = os.path.join(out_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return read_json_mapping(path) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)
    return None
