"""Files that appear only complete: atomic writes (temporary name in the same directory, then rename),
content hashes (remembered, :class:`HashMemo`, so a large file is hashed once), and the one disk-full message.

Nothing here writes through a symbolic link at the path it writes: an atomic write creates its temporary file
exclusively under a random name (``O_CREAT | O_EXCL | O_NOFOLLOW``) and renames it over the path, which replaces a
link there, never its target; :func:`open_append` (log files) opens with ``O_NOFOLLOW`` and replaces a link by a
new regular file; :func:`real_directory` refuses a directory that is a link (:class:`UnsafePathError`)."""

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat

_TMP_MARK = ".tmp-"
SPACE_MARGIN_BYTES = 64 << 20  # kept free beyond what a file checked before writing needs


def is_tmp_file(name):
    """Whether ``name`` is a temporary file left by this module (e.g. by a killed process)."""
    return name.startswith(".") and _TMP_MARK in name


def remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


@contextlib.contextmanager
def atomic_open(path, need=None, needer="it", root=None, before=None):
    """The one atomic writer: a binary file to write that replaces ``path`` only when the block ends without an error.
    The temporary file is made next to ``path`` exclusively under a random name and used through its descriptor only,
    so a link is never followed (one at ``path`` is replaced). A full disk becomes :func:`disk_full`'s message, checked
    ahead of writing with ``before`` (e.g. "merge the shards into")."""
    directory, name = os.path.split(os.path.abspath(path))
    root = root or directory
    if before is not None and (full := disk_full(root, path, need, needer, before)) is not None:
        raise full
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}{_TMP_MARK}{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:  # the umask applies, as with open()
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(root, path, need, needer) from None
        raise
    with contextlib.suppress(OSError):  # the rename made durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` so that readers see the old file or the whole new one."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


atomic_write_text = atomic_write_bytes  # the name text writers across the project import


class DiskFullError(OSError):
    """Not enough free space for a file being written (an OSError: who carries on without the file still does)."""


def _size(n):
    return f"{n / 2**20:,.0f} MB" if n < 10 * 2**30 else f"{n / 2**30:,.1f} GB"


def disk_full(directory, path, need=None, needer="it", before=None):
    """The one message for a full disk, as a :class:`DiskFullError` to raise: where, the file, how much ``needer``
    needs and how much is free, and what to do. With ``before`` (what is about to be done to ``path``, e.g. "merge
    the shards into"), a check ahead of writing: None when ``need`` and a margin are free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if before is not None:
        if free is None or free >= need + SPACE_MARGIN_BYTES:
            return None
        return DiskFullError(f"not enough space to {before} {path}: {needer} needs {_size(need)}, {_size(free)} "
                             f"are free; free {_size(need + SPACE_MARGIN_BYTES - free)} more and rerun the same "
                             "command (finished shards are kept)")
    sizes = ([f"{needer} needs about {_size(need)}"] if need is not None else []) + (
        [f"{_size(free)} are free"] if free is not None else [])
    return DiskFullError(f"no space left on the device of {directory} while writing {path}"
                         + (f": {', '.join(sizes)}" if sizes else "")
                         + "; free some space and rerun the same command (finished shards are kept)")


class UnsafePathError(ValueError):
    """A path written into is a symbolic link (or not a directory); the message is one line naming it."""


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
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise error(f"{link_text(path)}: files are written only into real directories, never through a link; "
                        "remove the link and rerun")
        if not stat.S_ISDIR(mode):
            raise error(f"{path} is not a directory; remove it and rerun")
    return path


def symlinks_in(directory, accept=None):
    """The symbolic links directly in ``directory`` whose names ``accept(name)``, sorted ([] without the directory)."""
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


class HashMemo:
    """sha256 of files, remembered (valid while the file's :func:`_stamp` is unchanged) so that a large file is read
    once: in ``<directory>/hashes.json`` keyed by real path (the evaluator's cache), or without ``directory`` beside
    each file in ``<path>.sha256`` (checkpoints; ``~/.cache/pag_adm/sha256/hashes.json`` where that is read-only)."""

    def __init__(self, directory=None):
        self.directory = os.path.expanduser(os.fspath(directory)) if directory else None

    def sha256(self, path):
        path = os.fspath(path)
        stamp = _stamp(os.stat(path))
        shared = os.path.join(self.directory or user_cache_dir("sha256"), "hashes.json")
        # (memo file, key) to read a record from and write it to, in order; key None: a sidecar, the record itself
        places = ([] if self.directory else [(path + ".sha256", None)]) + [(shared, os.path.realpath(path))]
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
                atomic_write_bytes(memo_path, json.dumps(memo, indent=0, sort_keys=True) + "\n")
                break
            except OSError:
                continue
        return digest


def read_json_mapping(path):
    """The JSON object in ``path`` (or an open text file), or {} when the file is missing, unreadable, empty or not
    an object (small records other processes may be rewriting: lock holders, shard claims, hash memos)."""
    try:
        with contextlib.nullcontext(path) if hasattr(path, "read") else open(path) as f:
            data = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
