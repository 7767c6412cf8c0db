"""Files that appear only complete: atomic writes (temporary name in the same directory, then rename),
and content hashes (remembered beside the file, so a large checkpoint is hashed once)."""

import contextlib
import hashlib
import json
import os
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


def tmp_path_for(path):
    """A unique temporary file next to ``path`` (same directory, so the rename is atomic), with the
    permissions ``open()`` would give a new file."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{_TMP_MARK}", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
    return tmp


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
    error the temporary file is removed and ``path`` is left as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


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
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(st):
    """What changes when a file is rewritten or replaced: a remembered hash is valid while all of it is equal."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def default_hash_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pag_adm", "sha256")


def cached_file_sha256(path, cache_dir=None):
    """Hex sha256 of a file, remembered in a sidecar ``<path>.sha256`` (JSON: size, mtime_ns, ctime_ns, inode,
    sha256) and computed again when any of those changed (a replaced file has another inode or ctime even when
    its size and mtime were kept). Where the file's directory is read-only the record goes to ``cache_dir``
    (default ``~/.cache/pag_adm/sha256/``), named by the file's real path."""
    path = os.fspath(path)
    stamp = _stamp(os.stat(path))
    sidecar = path + ".sha256"
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    fallback = os.path.join(cache_dir or default_hash_cache_dir(), f"{key}.json")
    for record_path in (sidecar, fallback):
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("sha256"), str) and all(
                record.get(k) == v for k, v in stamp.items()):
            return record["sha256"]
    digest = file_sha256(path)
    if _stamp(os.stat(path)) != stamp:  # changed while being read: do not remember this one
        return digest
    text = json.dumps(dict(stamp, sha256=digest, file=os.path.basename(path)), sort_keys=True) + "\n"
    for record_path in (sidecar, fallback):
        try:
            atomic_write_text(record_path, text)
            break
        except OSError:
            continue
    return digest


def read_json_mapping(path):
    """The JSON object in ``path``, or {} when the file is missing, unreadable, empty or not an object (small
    records other processes may be rewriting: lock holders, shard claims)."""
    import json

    try:
        with open(path) as f:
            data = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
