"""Files that appear only complete: atomic writes (temporary name in the same directory, then rename),
and content hashes (remembered, :class:`HashMemo`, so a large file is hashed once).

Nothing here writes through a symbolic link at the path it writes: an atomic write creates its temporary file
exclusively under a random name (``O_CREAT | O_EXCL | O_NOFOLLOW``) and renames it over the path, which replaces a
link there, never its target; :func:`open_append` (log files) opens with ``O_NOFOLLOW`` and replaces a link by a
new regular file; :func:`real_directory` refuses a directory that is a link (:class:`UnsafePathError`)."""

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile

_TMP_MARK = ".tmp-"


def current_umask():
    """The process's umask, read without changing it where /proc allows (os.umask is a write)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def create_tmp_for(path):
    """A new temporary file next to ``path`` (same directory, so the rename is atomic), open for writing and
    reading in binary mode: ``(file, tmp path)``. Created exclusively under a random name (mkstemp:
    ``O_CREAT | O_EXCL | O_NOFOLLOW``) and used through this descriptor only, so a link planted at a temporary
    name is never followed; it gets the permissions ``open()`` would give a new file."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{_TMP_MARK}", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
        return os.fdopen(fd, "w+b"), tmp
    except BaseException:
        os.close(fd)
        remove_quietly(tmp)
        raise


def is_tmp_file(name):
    """Whether ``name`` is a temporary file left by this module (e.g. by a killed process)."""
    return name.startswith(".") and _TMP_MARK in name


def fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_open(path):
    """A binary file to write (``with atomic_open(path) as f: torch.save(obj, f)``) that replaces ``path``
    only when the block ends without an error, so readers see the old file or the whole new one; on an
    error the temporary file is removed and ``path`` is left as it was. A symbolic link at ``path`` is
    replaced by the new file (never written through)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f, tmp = create_tmp_for(path)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a symbolic link at path is replaced itself; its target is left alone
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class UnsafePathError(ValueError):
    """A path that files are written into is a symbolic link (or not a directory); the message is one line
    naming it."""


def link_text(path):
    """``PATH is a symbolic link (to TARGET)``."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"{path} is a symbolic link (to {target})"


def real_directory(root, *names, error=UnsafePathError):
    """``root/names[0]/names[1]/...`` with every component below ``root`` a real directory, made when missing
    (``os.mkdir`` never follows a link); ``root`` itself may be a link (the user's choice of directory). A
    component that is a symbolic link or not a directory raises ``error`` with one line naming it."""
    path = root
    for name in names:
        path = os.path.join(path, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise error(f"{link_text(path)}: files are written only into real directories, never through a link; "
                        "remove the link and rerun")
        if not stat.S_ISDIR(mode):
            raise error(f"{path} is not a directory; remove it and rerun")
    return path


def symlinks_in(directory, accept=None):
    """The symbolic links directly in ``directory`` whose names ``accept(name)`` (default: all), sorted; [] when
    ``directory`` is missing or not a directory."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.path for e in entries if (accept is None or accept(e.name)) and e.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def open_append(path, tries=5):
    """``path`` opened to append text (log files), never through a symbolic link: opened with ``O_NOFOLLOW``, and
    a link at ``path`` is removed (not its target) and a new regular file created in its place. Anything else
    that is not a regular file there (a FIFO, a device) raises :class:`UnsafePathError`."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    for _ in range(tries):
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ENXIO:  # a FIFO without a reader
                raise UnsafePathError(f"{path} is not a regular file; remove it and rerun") from None
            if not os.path.islink(path):  # O_NOFOLLOW met no link (ELOOP): another error
                raise
            remove_quietly(path)  # the link itself, never its target
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"{path} is not a regular file; remove it and rerun")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a")
    raise UnsafePathError(f"{link_text(path)}: a symbolic link keeps being put there; it is never written "
                          "through; remove it and rerun")


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path, chunk_size=1 << 24):
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(st):
    """What changes when a file is rewritten or replaced: a remembered hash is valid while all of it is equal."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def user_cache_dir(name):
    """``$XDG_CACHE_HOME/pag_adm/<name>`` (default ``~/.cache/pag_adm/<name>``): the project's caches."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pag_adm", name)


HASHES_NAME = "hashes.json"


class HashMemo:
    """sha256 of files, remembered so that a large file (a checkpoint, a 10 GB image batch) is read once: a record
    (size, mtime_ns, ctime_ns, inode, sha256) per file, valid while all of that stamp is unchanged (a replaced or
    rewritten file has another inode or ctime even when its size and mtime were kept), so changed content is
    hashed again.

    :param directory: keep every file's record in ``<directory>/hashes.json``, keyed by the file's real path (a
        cache's memo: the evaluator's); None: each file's record beside it in ``<path>.sha256`` (checkpoints), or
        where that directory is read-only in ``~/.cache/pag_adm/sha256/hashes.json``."""

    def __init__(self, directory=None):
        self.directory = os.path.expanduser(os.fspath(directory)) if directory else None

    def _places(self, path):
        """``(memo file, key)`` pairs to read a record from and write it to, in order; key None: the file is the
        record itself (a sidecar)."""
        shared = os.path.join(self.directory or user_cache_dir("sha256"), HASHES_NAME)
        return ([] if self.directory else [(path + ".sha256", None)]) + [(shared, os.path.realpath(path))]

    def sha256(self, path):
        path = os.fspath(path)
        stamp = _stamp(os.stat(path))
        places = self._places(path)
        for memo_path, key in places:
            record = read_json_mapping(memo_path)
            record = record.get(key) if key else record
            if isinstance(record, dict) and isinstance(record.get("sha256"), str) and all(
                    record.get(k) == v for k, v in stamp.items()):
                return record["sha256"]
        digest = file_sha256(path)
        if _stamp(os.stat(path)) != stamp:  # changed while being read: do not remember this one
            return digest
        record = dict(stamp, sha256=digest, file=os.path.basename(path))
        for memo_path, key in places:
            memo = dict(read_json_mapping(memo_path), **{key: record}) if key else record
            try:
                atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True) + "\n")
                break
            except OSError:
                continue
        return digest


def cached_file_sha256(path):
    """Hex sha256 of a file, remembered beside it (:class:`HashMemo`'s sidecar ``<path>.sha256``)."""
    return HashMemo().sha256(path)


def read_json_mapping(path):
    """The JSON object in ``path``, or {} when the file is missing, unreadable, empty or not an object (small
    records other processes may be rewriting: lock holders, shard claims, hash memos)."""
    try:
        with open(path) as f:
            data = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
