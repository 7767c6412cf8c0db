"""Files that appear only complete: atomic writes (temporary name in the same directory, then rename),
and content hashes."""

import hashlib
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


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


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
