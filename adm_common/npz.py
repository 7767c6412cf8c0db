"""npz files of images (upstream's format: uint8 N x H x W x 3 images in ``arr_0``, int64 labels in ``arr_1``).

:class:`NpzImages` streams ``arr_0`` from the zip member, so a 50k x 256 x 256 x 3 file (10 GB) is never in memory
at once; :class:`NpzWriter` writes members as stored zip entries chunk by chunk with a fixed timestamp, so the same
arrays always give the same bytes, and the file appears only complete.
"""

import contextlib
import os
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from .files import atomic_open

# Zip entries' timestamp (the earliest zip can hold): same arrays -> same file bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

SAVE_HINT = "samples are saved as ((x + 1) * 127.5).clamp(0, 255).to(uint8)"


def read_npy_header(f):
    """(shape, fortran_order, dtype) from an open ``.npy`` stream positioned at its start; the stream is
    left at the first data byte. Raises ValueError for a header version numpy cannot read here."""
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), bool(fortran), np.dtype(dtype)


def crc_failure(path):
    """The first member of zip ``path`` whose CRC check fails (every member is read), else None."""
    with zipfile.ZipFile(path) as zf:
        return zf.testzip()


def _member_header(path, name):
    """(zip member, shape, fortran_order, dtype) of array ``name`` of an npz, read from its header only."""
    with zipfile.ZipFile(path) as zf:
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        if name not in members:
            raise ValueError(f"{path} has no '{name}' array (it has {', '.join(sorted(members)) or 'nothing'}); "
                             f"image batches keep their uint8 N x H x W x 3 images in 'arr_0'")
        with zf.open(members[name]) as f:  # the header versions numpy writes are the ones np.load reads
            return (members[name],) + read_npy_header(f)


def npz_header(path, name):
    """(shape, dtype) of member ``name`` of an npz, read from its header only."""
    _, shape, _, dtype = _member_header(path, name)
    return shape, dtype


def check_image_header(shape, dtype, where="images", empty_ok=False):
    """Raise a ValueError unless (shape, dtype) describe integer images N x H x W x 3 (N >= 1 unless ``empty_ok``)."""
    if len(shape) != 4:
        raise ValueError(f"{where} must be N x H x W x 3 images, got shape {tuple(shape)}")
    if shape[-1] != 3:
        hint = " (this looks like N x C x H x W; expected channels last)" if shape[1] == 3 else ""
        raise ValueError(f"{where} must have 3 channels in the last axis (N x H x W x 3), got shape "
                         f"{tuple(shape)}{hint}")
    if shape[0] == 0 and not empty_ok:
        raise ValueError(f"{where} holds no images")
    if np.dtype(dtype).hasobject or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{where} must be uint8 images in 0..255, got dtype {np.dtype(dtype)} ({SAVE_HINT})")


def check_image_batch(images, where="images"):
    """Validate a batch of images: N x H x W x 3, integers in 0..255. Returns it as uint8."""
    images = np.asarray(images)
    check_image_header(images.shape, images.dtype, where, empty_ok=True)
    if images.dtype == np.uint8:
        return images
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(f"{where} out of range: values {images.min()}..{images.max()}, expected 0..255")
    return images.astype(np.uint8)


class NpzImages:
    """Lazy view of an image array (``arr_0``) in an npz: shape and dtype from the header, data streamed."""

    def __init__(self, path, key="arr_0"):
        self.path, self.key = str(path), key
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no such npz file: {self.path}")
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path} is not an npz (zip) file")
        self.member, self.shape, self.fortran_order, self.dtype = _member_header(self.path, key)
        check_image_header(self.shape, self.dtype, f"{self.path}: {key}")

    @property
    def num_images(self):
        return int(self.shape[0])

    def iter_batches(self, batch_size, start=0, stop=None):
        """Yield uint8 arrays of at most ``batch_size`` images, for images ``start:stop``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        stop = self.num_images if stop is None else min(stop, self.num_images)
        yield from self.rows([(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)])

    def rows(self, bounds):
        """Yield uint8 images ``start:end`` for each ``(start, end)`` of ``bounds`` (increasing, not overlapping),
        in one pass over the member (a zip member cannot seek back without reading it again)."""
        if self.fortran_order:  # rows are not contiguous in the file: load it whole
            with np.load(self.path, allow_pickle=False) as obj:
                arr = np.ascontiguousarray(obj[self.key])
            for start, end in bounds:
                yield check_image_batch(arr[start:end])
            return
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            read_npy_header(f)
            first = f.tell()
            for start, end in bounds:
                f.seek(first + start * row_bytes)  # forward: what is skipped is read once and dropped
                data = f.read((end - start) * row_bytes)
                if len(data) != (end - start) * row_bytes:
                    raise ValueError(f"{self.path}: '{self.key}' is truncated (wanted {(end - start) * row_bytes} "
                                     f"bytes at image {start}, got {len(data)})")
                yield check_image_batch(np.frombuffer(data, self.dtype).reshape((end - start,) + self.shape[1:]))

    def first(self, n):
        """The first ``n`` images (fewer if the batch is smaller), reading nothing beyond them."""
        return next(self.iter_batches(max(1, min(n, self.num_images))))


class ArrayStream:
    """One ``.npy`` member being written: ``write`` chunks of rows until ``shape[0]`` rows are in."""

    def __init__(self, fileobj, name, shape, dtype):
        self._f, self.name, self.rows = fileobj, name, 0
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
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


class NpzWriter:
    """Write an ``.npz`` atomically (:func:`adm_common.files.atomic_open`, given ``space``), member by member: ``with
    NpzWriter(path) as w:`` then ``w.write(name, array)``, or ``with w.stream(name, shape, dtype) as s:
    s.write(rows)`` for large arrays. The file appears at ``path`` only when the block ends without an exception."""

    def __init__(self, path, **space):
        self.path, self._names, self._space = os.fspath(path), set(), space

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(atomic_open(self.path, **self._space))
            self._zip = stack.enter_context(zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True))
            self._close = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._close.__exit__(*exc)

    @contextlib.contextmanager
    def stream(self, name, shape, dtype):
        """An :class:`ArrayStream` of member ``name``; it must hold all ``shape[0]`` rows when the block ends."""
        if name in self._names:
            raise ValueError(f"{self.path}: member {name} written twice")
        self._names.add(name)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)  # stored (not compressed), as ZipInfo's default
        info.external_attr = 0o644 << 16
        with self._zip.open(info, "w", force_zip64=True) as f:
            stream = ArrayStream(f, name, shape, dtype)
            yield stream
            if stream.rows != stream.shape[0]:
                raise ValueError(f"{name}: {stream.rows} rows written, the array has {stream.shape[0]}")

    def write(self, name, array):
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError(f"{name}: scalars are not supported, write a 1-element array")
        with self.stream(name, array.shape, array.dtype) as s:
            s.write(array)


def samples_filename(num_samples, height, width):
    """Upstream's name for a sample batch: ``samples_{N}x{H}x{W}x3.npz``."""
    return f"samples_{num_samples}x{height}x{width}x3.npz"
