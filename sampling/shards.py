"""Shard files of a run (``shards/shard_{k:06d}.npz``) and their merge into upstream's sample batch."""

import re

import numpy as np

from adm_common.npz import NpzWriter, check_image_header, npz_header

SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")


def shard_filename(index):
    return f"shard_{index:06d}.npz"


def shard_index(filename):
    """The shard number of a shard file name, or None for other names."""
    m = _SHARD_RE.match(filename)
    return int(m.group(1)) if m else None


def merge_shards(shard_paths, out_path, with_labels):
    """Concatenate the shards' ``arr_0`` (and ``arr_1``) into one npz at ``out_path``, one shard at a time.

    Holds at most one shard's images in memory. Returns the merged images' shape.
    """
    if not shard_paths:
        raise ValueError("no shards to merge")
    shapes = []
    for path in shard_paths:
        shape, dtype = npz_header(path, "arr_0")
        check_image_header(shape, dtype, f"{path}: arr_0")
        if dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 is {dtype}, expected uint8")
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
