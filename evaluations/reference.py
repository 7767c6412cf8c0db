"""Image batches (npz, ``arr_0`` uint8 N x H x W x 3, streamed: a 10 GB file is never in memory at once) through
every network in one pass, each process a slice; their features and statistics (or the ``mu``/``sigma``/``mu_s``/
``sigma_s`` a reference npz stores, used for FID/sFID as the ADM evaluator does), cached by the file's sha256, the
extractor's id and its numerics (features computed on a GPU are never read back on a CPU, nor the other way round).
"""

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from adm_common.files import HashMemo, atomic_open, user_cache_dir
from adm_common.rendezvous import launch_info, start_group
from adm_common.npz import NpzImages
from evaluations.features import POOL_DIM, SPATIAL_DIM, feature_numerics, full_float32

# 2: the key holds the extractor's numerics (device type and precision). Entries of format 1 (keyed by the
# extractor's id only, CPU and GPU features alike) are never read: their features are extracted again.
CACHE_FORMAT = 2
FEATURE_KEYS = ("pool", "logits", "spatial")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def default_cache_dir():
    return user_cache_dir("eval")


def read_npz_statistics(path, dims=(POOL_DIM, SPATIAL_DIM), both=True):
    """The ``mu``/``sigma`` (FID) and ``mu_s``/``sigma_s`` (sFID) an npz holds (as ADM reference batches do), as
    float64, checked by :func:`check_statistics`; None when it holds none. Only these members are read."""
    with np.load(path, allow_pickle=False) as obj:
        stats = {k: obj[k] for k in STAT_KEYS if k in obj.files}
    if not stats:
        return None
    check_statistics(stats, str(path), dims, both)
    return {k: v.astype(np.float64) for k, v in stats.items()}


def check_statistics(stats, where="statistics", dims=(POOL_DIM, SPATIAL_DIM), both=True):
    """Each ``mu`` with its ``sigma`` (``both``: FID's and sFID's pair; else any present), a finite float vector
    (d,) and (d, d) matrix, d Inception's (2048 pool, 2023 spatial) or with ``dims=None`` any (other extractors)."""
    for (mu_key, sigma_key), dim in zip((("mu", "sigma"), ("mu_s", "sigma_s")), dims or (None, None)):
        missing = [k for k in (mu_key, sigma_key) if k not in stats]
        if len(missing) == 1:
            raise ValueError(f"{where} has {({mu_key, sigma_key} - set(missing)).pop()} but not its partner "
                             f"{missing[0]}")
        if missing and both:
            raise ValueError(f"{where} has {', '.join(stats)} but not {mu_key}, {sigma_key}: reference statistics "
                             f"need all of {', '.join(STAT_KEYS)}")
        if missing:
            continue
        mu, sigma = stats[mu_key], stats[sigma_key]
        dim = mu.shape[0] if dim is None and mu.ndim == 1 else dim
        if mu.shape != (dim,) or sigma.shape != (dim, dim) or mu.dtype.kind != "f" or sigma.dtype.kind != "f":
            d = dim or "d"
            raise ValueError(f"{where}: {mu_key} {mu.dtype} {list(mu.shape)} / {sigma_key} {sigma.dtype} "
                             f"{list(sigma.shape)} do not match the features: {mu_key} must be a float vector "
                             f"({d},) and {sigma_key} a float ({d}, {d}) matrix")
        for key in (mu_key, sigma_key):
            if not np.all(np.isfinite(stats[key])):
                raise ValueError(f"{where}: {key} contains NaN or infinite values")


# --------------------------------------------------------------------------------------------------------------
# distributed extraction


def shard_bounds(n, rank, world_size):
    """Contiguous slice ``[start, stop)`` of ``n`` items for ``rank`` of ``world_size``; the first ``n % world``
    ranks take one extra item. Concatenating the slices of ranks 0..world-1 gives ``range(n)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SingleProcess:
    rank = 0
    world_size = 1

    def gather(self, obj):
        return [obj]

    def bcast(self, obj):
        return obj

    def close(self):
        pass


class TorchDistributed:
    """An initialised torch.distributed group; ``close()`` destroys it when this object created it."""

    def __init__(self, owns_group=False):
        import torch.distributed as dist

        self._dist = dist
        self.owns_group = owns_group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def close(self):
        if self.owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def gather(self, obj):
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out if self.rank == 0 else None

    def bcast(self, obj):
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]


def detect_distributed():
    """How this evaluation is split over processes: an initialised torch.distributed group; else a gloo group of
    the launch (mpiexec, torchrun or srun: the sampler's one set-up, ``adm_common.rendezvous``), which the caller
    closes (evaluator.main does); else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    info = launch_info()
    if info.world_size > 1:
        start_group(info, "gloo")
        return TorchDistributed(owns_group=True)
    return SingleProcess()


# --------------------------------------------------------------------------------------------------------------
# features and statistics: one pass over an image batch for every network


def batch_statistics(features):
    """Mean and covariance (``np.cov(rowvar=False)``, float64) of N x D features, as the ADM evaluator."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got shape {features.shape}")
    return np.mean(features, axis=0, dtype=np.float64), np.cov(features, rowvar=False)


@dataclass(frozen=True)
class FeatureUse:
    """One feature network of a pass and what is kept of its outputs: ``keep`` whole, and the mean and covariance of
    each of ``statistics`` (``(output, suffix)`` -> ``mu<suffix>``, ``sigma<suffix>``). An extractor returning one
    array (DINOv2) has one output, ``features``; one returning a dict (Inception, a ``--feature-net``) names them."""

    extractor: object
    keep: tuple = ()
    statistics: tuple = (("features", ""),)

    @classmethod
    def inception(cls, extractor, keep_spatial=False):
        """Inception's outputs (a custom network's alike): pool and logits kept (spatial too with ``keep_spatial``:
        the bootstrap's sFID), statistics of pool (``mu``, ``sigma``: FID) and spatial (``mu_s``, ``sigma_s``: sFID)."""
        return cls(extractor, ("pool", "logits") + (("spatial",) if keep_spatial else ()),
                   (("pool", ""), ("spatial", "_s")))

    @property
    def stored(self):
        """The names a cache entry holds."""
        return self.keep + tuple(f"{m}{suffix}" for _, suffix in self.statistics for m in ("mu", "sigma"))


def extract_all(images, extractors, batch_size=64, progress=False, dist=None, desc=None):
    """Run every extractor over the images of an ``NpzImages`` in one pass over the file, each process (``dist``, or
    the detected process group) a contiguous slice. Rank 0 gets, per extractor, ``{output: float32 array}`` in
    file order; other ranks None. Every extractor runs inside ``full_float32()``: float32, no TF32."""
    dist = dist or detect_distributed()
    start, stop = shard_bounds(images.num_images, dist.rank, dist.world_size)
    parts = [{} for _ in extractors]
    batches = images.iter_batches(batch_size, start, stop)
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-(stop - start) // batch_size), unit="batch",
                       desc=desc or os.path.basename(images.path))
    for batch in batches:
        for extractor, part in zip(extractors, parts):
            with full_float32():
                out = extractor(batch)
            for key, value in (out if isinstance(out, dict) else {"features": out}).items():
                part.setdefault(key, []).append(value)
    out = []
    for part in parts:  # one gather per network: rank 0 receives every rank's slice of its outputs
        gathered = dist.gather({k: np.concatenate(v, axis=0) for k, v in part.items()})
        if gathered is not None:
            out.append({k: np.concatenate([g[k] for g in gathered if k in g], axis=0) for k in gathered[0]})
    return out if dist.rank == 0 else None


def extract_features(images, extractor, batch_size=64, progress=False, dist=None, desc=None, keys=FEATURE_KEYS):
    """One extractor's :func:`extract_all` over an ``NpzImages`` (or an npz path): ``{key: array}`` for each of
    ``keys``, or with ``keys=None`` the one array of an extractor returning one (rank 0; other ranks None)."""
    images = images if isinstance(images, NpzImages) else NpzImages(images)
    out = extract_all(images, [extractor], batch_size, progress, dist, desc)
    if out is None:
        return None
    return out[0]["features"] if keys is None else {k: out[0][k] for k in keys}


class FeatureCache:
    """npz files ``<cache_dir>/<file sha256>-<hash of extractor id and numerics>.npz`` holding what a
    :class:`FeatureUse` keeps of one image batch. ``cache_dir=None`` disables caching."""

    def __init__(self, cache_dir):
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self.hashes = HashMemo(self.cache_dir)

    def entry_path(self, file_sha, extractor_id, numerics):
        """The entry of an image batch (``file_sha``) through an extractor (``extractor_id``, weights included)
        computed with ``numerics`` (``features.feature_numerics``: ``"cuda/float32"``, ``"cpu/float32"``, ...)."""
        ext = hashlib.sha256(f"{extractor_id}|{numerics}|format{CACHE_FORMAT}".encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{file_sha}-{ext}.npz")

    def load(self, entry, names, images):
        """The arrays ``names`` of ``entry``, or None when it is missing or unreadable (then extracted again)."""
        try:
            with np.load(entry, allow_pickle=False) as obj:
                data = {k: obj[k] for k in names}
                count = int(obj["num_images"]) if "num_images" in obj.files else len(obj["pool"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        if count != images.num_images:
            raise ValueError(f"cache entry {entry} does not match {images.path}: remove it")
        return data

    def save(self, entry, data, meta):
        with atomic_open(entry) as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **data)


def image_features(images, uses, batch_size=64, cache_dir=None, progress=False, dist=None, desc=None):
    """Per :class:`FeatureUse`, what it keeps of an image batch (an ``NpzImages``), from the cache, else extracted
    (every network without an entry in one pass, then cached): its outputs, ``mu``, ``sigma`` (``mu_s``, ...; None
    below 2 images), ``num_images``, ``image_shape``, ``sha256`` (with a cache), ``from_cache``; on rank 0 only."""
    dist = dist or detect_distributed()
    cache = FeatureCache(cache_dir)
    digest, entries, found = None, [None] * len(uses), [None] * len(uses)
    if cache.cache_dir and dist.rank == 0:
        digest = cache.hashes.sha256(images.path)
        entries = [cache.entry_path(digest, u.extractor.id, feature_numerics(u.extractor)) for u in uses]
        found = [cache.load(e, u.stored, images) if os.path.exists(e) else None for e, u in zip(entries, uses)]
    missing = dist.bcast([f is None for f in found]) if cache.cache_dir else [True] * len(uses)
    todo = [i for i, m in enumerate(missing) if m]
    extracted = extract_all(images, [uses[i].extractor for i in todo], batch_size, progress, dist, desc) if todo \
        else []
    if dist.rank != 0:
        return None
    n = images.num_images
    for i, outputs in zip(todo, extracted):
        found[i] = {k: outputs[k] for k in uses[i].keep}
        for output, suffix in uses[i].statistics:
            found[i]["mu" + suffix], found[i]["sigma" + suffix] = \
                batch_statistics(outputs[output]) if n > 1 else (None, None)
        if cache.cache_dir and n > 1:
            meta = {"source": os.path.realpath(images.path), "sha256": digest, "extractor": uses[i].extractor.id,
                    "numerics": feature_numerics(uses[i].extractor), "num_images": n,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            cache.save(entries[i], dict(found[i], num_images=np.array(n)), meta)
    return [dict(f, num_images=n, image_shape=list(images.shape[1:]), sha256=digest, from_cache=i not in todo)
            for i, f in enumerate(found)]


def fid_statistics(stored, features, where):
    """``(stats, "npz")``: a batch's stored FID/sFID statistics (:func:`read_npz_statistics`) when it has them (as
    the ADM evaluator), else ``(stats, "images")``: those of its extracted features."""
    if stored is not None:
        return stored, "npz"
    if features.get("mu") is None:
        raise ValueError(f"{where}: FID needs at least 2 images (or mu/sigma/mu_s/sigma_s in the npz)")
    stats = {k: np.asarray(features[k], dtype=np.float64) for k in STAT_KEYS}
    check_statistics(stats, where=f"statistics of {where}", dims=None)  # any extractor's feature sizes
    return stats, "images"
