"""Files of a sampling run: atomic, deterministic npz writing, streaming merges and the preview grid.

An ``.npz`` is a zip of ``.npy`` members. :class:`NpzWriter` writes each member as a stored
(uncompressed) zip entry whose bytes are produced chunk by chunk, so an array of any size is written
without ever being in memory, and loads with ``numpy.load`` like ``numpy.savez``'s output. Entries get
a fixed timestamp, so the same arrays always give the same bytes. Files appear only complete: they are
written to a temporary name in the same directory and renamed.
"""

import math
import os
import re
import tempfile
import zipfile

import numpy as np
from numpy.lib import format as npy_format

# Zip entries' timestamp (the earliest zip can hold): same arrays -> same file bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_TMP_MARK = ".tmp-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def tmp_path_for(path):
    """A unique temporary name next to ``path`` (same directory, so the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{_TMP_MARK}", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would give
    return tmp


def is_tmp_file(name):
    """Whether ``name`` is a temporary file left by this module (e.g. by a killed process)."""
    return name.startswith(".") and _TMP_MARK in name


def _fsync_dir(directory):
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


def atomic_write_bytes(path, data):
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


class ArrayStream:
    """One ``.npy`` member being written: ``write`` chunks of rows until ``shape[0]`` rows are in."""

    def __init__(self, fileobj, name, shape, dtype):
        self._f = fileobj
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        npy_format.write_array_header_1_0(self._f, header)

    def write(self, chunk):
        chunk = np.asarray(chunk)
        if chunk.dtype != self.dtype:
            raise ValueError(f"{self.name}: chunk of dtype {chunk.dtype}, the array is {self.dtype}")
        if tuple(chunk.shape[1:]) != self.shape[1:]:
            raise ValueError(f"{self.name}: chunk of shape {chunk.shape}, rows of the array are {self.shape[1:]}")
        if self.rows + len(chunk) > self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows + len(chunk)} rows written, the array has {self.shape[0]}")
        self._f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        self.rows += len(chunk)

    def finish(self):
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows} rows written, the array has {self.shape[0]}")


class NpzWriter:
    """Write an ``.npz`` atomically, member by member, streaming large arrays.

        with NpzWriter(path) as w:
            with w.stream("arr_0", (n, 256, 256, 3), np.uint8) as s:
                for chunk in chunks:
                    s.write(chunk)
            w.write("arr_1", labels)

    The file appears at ``path`` only when the ``with`` block ends without an exception; otherwise the
    temporary file is removed and ``path`` is untouched.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._tmp = None
        self._zip = None
        self._names = set()

    def __enter__(self):
        self._tmp = tmp_path_for(self.path)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def _open_member(self, name):
        if name in self._names:
            raise ValueError(f"{self.path}: member {name} written twice")
        self._names.add(name)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        return self._zip.open(info, "w", force_zip64=True)

    def stream(self, name, shape, dtype):
        writer = self

        class _Member:
            def __enter__(self_inner):
                self_inner.f = writer._open_member(name)
                self_inner.stream = ArrayStream(self_inner.f, name, shape, dtype)
                return self_inner.stream

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    if exc_type is None:
                        self_inner.stream.finish()
                finally:
                    self_inner.f.close()
                return False

        return _Member()

    def write(self, name, array):
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError(f"{name}: scalars are not supported, write a 1-element array")
        with self.stream(name, array.shape, array.dtype) as s:
            s.write(array)

    def __exit__(self, exc_type, exc, tb):
        try:
            self._zip.close()
            if exc_type is None:
                with open(self._tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(self._tmp, self.path)
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        finally:
            if exc_type is not None or os.path.exists(self._tmp):
                _remove_quietly(self._tmp)
        return False


def npz_header(path, name):
    """(shape, dtype) of member ``name`` of an npz, read from its header only."""
    with zipfile.ZipFile(path) as zf:
        member = f"{name}.npy"
        if member not in zf.namelist():
            raise ValueError(f"{path} has no array {name} (it has {', '.join(sorted(zf.namelist()))})")
        with zf.open(member) as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype)


def npz_members(path):
    with zipfile.ZipFile(path) as zf:
        return sorted(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))


def samples_filename(num_samples, height, width):
    """Upstream's name for a sample batch: ``samples_{N}x{H}x{W}x3.npz``."""
    return f"samples_{num_samples}x{height}x{width}x3.npz"


def to_uint8_nhwc(x):
    """Images in [-1, 1] (N, C, H, W tensor) to upstream's uint8 NHWC array."""
    import torch as th

    return ((x + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def merge_shards(shard_paths, out_path, with_labels):
    """Concatenate the shards' ``arr_0`` (and ``arr_1``) into one npz at ``out_path``, one shard at a time.

    Holds at most one shard's images in memory. Returns the merged images' shape.
    """
    if not shard_paths:
        raise ValueError("no shards to merge")
    shapes = []
    for path in shard_paths:
        shape, dtype = npz_header(path, "arr_0")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 N x H x W x 3")
        if shapes and shape[1:] != shapes[0][1:]:
            raise ValueError(f"{path}: images of shape {shape[1:]}, other shards have {shapes[0][1:]}")
        shapes.append(shape)
    total = (sum(s[0] for s in shapes),) + shapes[0][1:]
    with NpzWriter(out_path) as w:
        with w.stream("arr_0", total, np.uint8) as s:
            for path in shard_paths:
                with np.load(path) as npz:
                    s.write(npz["arr_0"])
        if with_labels:
            with w.stream("arr_1", (total[0],), np.int64) as s:
                for path in shard_paths:
                    with np.load(path) as npz:
                        s.write(npz["arr_1"].astype(np.int64, copy=False))
    return total


def first_images(shard_paths, limit):
    """Up to ``limit`` images from the start of the shards (reads only as many shards as needed)."""
    parts, have = [], 0
    for path in shard_paths:
        if have >= limit:
            break
        with np.load(path) as npz:
            part = npz["arr_0"][: limit - have]
        parts.append(part)
        have += len(part)
    return np.concatenate(parts) if parts else np.zeros((0, 1, 1, 3), np.uint8)


def image_grid(images, columns=None, pad=0, pad_value=0):
    """(N, H, W, 3) uint8 -> one image of ``columns`` cells per row (default: about square).

    ``pad`` pixels of ``pad_value`` separate and surround the cells; empty cells are ``pad_value``.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_side_by_side(left, right, path, columns=8, gap=6, zoom=3):
    """Two grids of ``columns`` on a white background, ``left`` beside ``right`` (e.g. the same seeds
    without and with guidance), enlarged ``zoom`` times without smoothing; written atomically as PNG."""
    a = image_grid(left, columns, pad=2, pad_value=255)
    b = image_grid(right, columns, pad=2, pad_value=255)
    canvas = np.full((max(a.shape[0], b.shape[0]), a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap:] = b
    save_png(canvas, path, zoom)


def save_grid(images, path):
    """Save a grid of ``images`` as a PNG, atomically."""
    save_png(image_grid(images), path)


def save_png(image, path, zoom=1):
    """Write an (H, W, 3) uint8 array as a PNG, atomically, enlarged ``zoom`` times without smoothing."""
    import io

    from PIL import Image

    picture = Image.fromarray(image)
    if zoom != 1:
        picture = picture.resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")


def shard_filename(index):
    return f"shard_{index:06d}.npz"


def shard_index(filename):
    """The shard number of a shard file name, or None for other names."""
    m = _SHARD_RE.match(filename)
    return int(m.group(1)) if m else None
