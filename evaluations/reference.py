"""Reading image batches (npz), computing their features and statistics, and caching them.

An image batch is an ``.npz`` whose ``arr_0`` is uint8 N x H x W x 3 (what ``scripts/image_sample.py`` and the
ADM reference batches hold). ``arr_0`` is streamed from the zip member in batches, so a 50k x 256 x 256 x 3
file (10 GB) is never in memory at once. Reference batches may also carry ``mu``, ``sigma`` (pool_3) and
``mu_s``, ``sigma_s`` (spatial) statistics; like the ADM evaluator, those are used for FID/sFID when present.

Features and statistics computed from ``arr_0`` are cached under ``cache_dir`` keyed by the npz file's sha256, the
extractor's id (which hashes the Inception weights) and its numerics (device type and precision, e.g.
``cuda/float32``), so a sweep extracts its reference batch once, and features computed on a GPU are never read
back on a CPU or the other way round. Every extractor runs in full float32 (``features.full_float32``: TF32 off).
"""

import io
import json
import os
import time
import zipfile

import numpy as np

from adm_common.files import atomic_write_bytes, atomic_write_text, file_sha256
from adm_common.launch import detect_launch
from adm_common.npz import NpzImages
from evaluations.features import POOL_DIM, SPATIAL_DIM, feature_numerics, full_float32

# 2: the key holds the extractor's numerics (device type and precision). Entries of format 1 (keyed by the
# extractor's id only, CPU and GPU features alike) are never read: their features are extracted again.
CACHE_FORMAT = 2
FEATURE_KEYS = ("pool", "logits", "spatial")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pag_adm", "eval")


def read_npz_statistics(path):
    """``{"mu", "sigma", "mu_s", "sigma_s"}`` from the npz when it holds them (as ADM reference batches do), else
    None. Only these four members are read."""
    with np.load(path, allow_pickle=False) as obj:
        keys = set(obj.files)
        if "mu" not in keys:
            return None
        missing = [k for k in STAT_KEYS if k not in keys]
        if missing:
            raise ValueError(f"{path} has 'mu' but not {missing}: reference statistics need all of {STAT_KEYS}")
        stats = {k: np.asarray(obj[k], dtype=np.float64) for k in STAT_KEYS}
    check_statistics(stats, where=str(path))
    return stats


def check_statistics(stats, where="statistics", dims=(POOL_DIM, SPATIAL_DIM)):
    """Shapes (by default Inception's: 2048 pool, 2023 spatial) and finiteness of ``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``. ``dims=None`` checks only that each ``sigma`` is square and fits its ``mu`` (other extractors)."""
    for (mu_key, sigma_key), dim in zip((("mu", "sigma"), ("mu_s", "sigma_s")), dims or (None, None)):
        mu, sigma = stats[mu_key], stats[sigma_key]
        dim = mu.shape[0] if dim is None and mu.ndim == 1 else dim
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ValueError(f"{where}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} do not match the "
                             f"evaluator's features: expected ({dim},) / ({dim}, {dim})")
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


class MPIDistributed:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def close(self):
        pass


def detect_distributed():
    """How this evaluation is split over processes: an initialised torch.distributed group; else the launcher
    of ``adm_common.launch`` (the one detection the sampler uses too): mpiexec through mpi4py, torchrun or srun
    through a gloo process group created here; else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    info = detect_launch()
    if info.launcher == "mpi":
        from mpi4py import MPI  # initialises MPI: only under an MPI launcher

        if MPI.COMM_WORLD.Get_size() > 1:
            return MPIDistributed(MPI.COMM_WORLD)
    elif info.launcher in ("torchrun", "slurm") and info.world_size > 1:
        host = f"[{info.master_addr}]" if ":" in info.master_addr else info.master_addr
        dist.init_process_group("gloo", init_method=f"tcp://{host}:{info.master_port}", rank=info.rank,
                                world_size=info.world_size)
        return TorchDistributed(owns_group=True)  # the caller closes it (evaluator.main does)
    return SingleProcess()


# --------------------------------------------------------------------------------------------------------------
# features and statistics


def batch_statistics(features):
    """Mean and covariance (``np.cov(rowvar=False)``, float64) of N x D features, as the ADM evaluator."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got shape {features.shape}")
    return np.mean(features, axis=0, dtype=np.float64), np.cov(features, rowvar=False)


def extract_features(images, extractor, batch_size=64, progress=False, dist=None, desc=None, keys=FEATURE_KEYS):
    """Run ``extractor`` over an ``NpzImages`` (or an npz path). With ``dist`` (or a detected torch.distributed /
    MPI world of several processes), each rank extracts a contiguous slice and rank 0 receives the whole result;
    other ranks get None. Returns ``{key: float32 array}`` in file order for each of ``keys`` the extractor returns
    (Inception: ``pool``, ``logits``, ``spatial``); ``keys=None`` for an extractor returning one array. Every
    extractor (Inception, DINOv2, a custom network) runs inside ``full_float32()``: float32 without TF32."""
    if not isinstance(images, NpzImages):
        images = NpzImages(images)
    dist = dist or detect_distributed()
    start, stop = shard_bounds(images.num_images, dist.rank, dist.world_size)
    names = keys if keys is not None else ("features",)
    parts = {k: [] for k in names}
    batches = images.iter_batches(batch_size, start, stop)
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        n_batches = -(-(stop - start) // batch_size)
        batches = tqdm(batches, total=n_batches, desc=desc or os.path.basename(images.path), unit="batch")
    for batch in batches:
        with full_float32():
            out = extractor(batch)
        for k in names:
            parts[k].append(out if keys is None else out[k])
    local = {k: (np.concatenate(v, axis=0) if v else None) for k, v in parts.items()}
    gathered = dist.gather(local)
    if gathered is None:
        return None
    result = {k: np.concatenate([g[k] for g in gathered if g[k] is not None], axis=0) for k in names}
    return result if keys is not None else result["features"]


class HashMemo:
    """sha256 of files, remembered by (real path, size, mtime, inode, ctime) in ``<cache_dir>/hashes.json``: a
    file replaced or rewritten keeps neither its inode nor its ctime, even when its size and mtime were kept, so
    its content is hashed again (cache entries are then named by the new content hash)."""

    def __init__(self, cache_dir):
        self.path = os.path.join(cache_dir, "hashes.json") if cache_dir else None

    def _load(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def sha256(self, file_path):
        st = os.stat(file_path)
        key = f"{os.path.realpath(file_path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
        memo = self._load() if self.path else {}
        if key in memo:
            return memo[key]
        digest = file_sha256(file_path)
        if self.path:
            memo = self._load()
            memo[key] = digest
            atomic_write_text(self.path, json.dumps(memo, indent=0, sort_keys=True))
        return digest


class FeatureCache:
    """npz files ``<cache_dir>/<file sha256>-<hash of extractor id and numerics>.npz`` holding pool, logits, mu,
    sigma, mu_s, sigma_s of one image batch. ``cache_dir=None`` disables caching."""

    def __init__(self, cache_dir):
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else None
        self.hashes = HashMemo(self.cache_dir)

    def entry_path(self, file_sha, extractor_id, numerics):
        """The entry of an image batch (``file_sha``) through an extractor (``extractor_id``, weights included)
        computed with ``numerics`` (``features.feature_numerics``: ``"cuda/float32"``, ``"cpu/float32"``, ...)."""
        import hashlib

        ext = hashlib.sha256(f"{extractor_id}|{numerics}|format{CACHE_FORMAT}".encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{file_sha}-{ext}.npz")

    def load(self, entry):
        try:
            with np.load(entry, allow_pickle=False) as obj:
                return {k: obj[k] for k in ("pool", "logits") + STAT_KEYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None

    def save(self, entry, data, meta):
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **data)
        atomic_write_bytes(entry, buf.getvalue())


def batch_features(path, extractor, batch_size=64, cache_dir=None, progress=False, dist=None, desc=None):
    """Features of an image batch, from the cache when there, else extracted (and cached).

    Returns ``{"pool", "logits", "mu", "sigma", "mu_s", "sigma_s", "num_images", "image_shape", "sha256",
    "from_cache"}`` on rank 0 (None on other ranks). The statistics here are always those of the images;
    ``image_batch_statistics`` prefers the ones stored in the npz.
    """
    images = NpzImages(path)
    dist = dist or detect_distributed()
    cache = FeatureCache(cache_dir)
    entry = None
    if cache.cache_dir:
        if dist.rank == 0:
            digest = cache.hashes.sha256(images.path)
            entry = cache.entry_path(digest, extractor.id, feature_numerics(extractor))
            hit = cache.load(entry) if os.path.exists(entry) else None
        else:
            digest, hit = None, None
        hit_flag = dist.bcast(hit is not None)
        if hit_flag:
            if dist.rank != 0:
                return None
            hit.update(num_images=images.num_images, image_shape=list(images.shape[1:]), sha256=digest,
                       from_cache=True)
            if hit["pool"].shape[0] != images.num_images:
                raise ValueError(f"cache entry {entry} does not match {images.path}: remove it")
            return hit
    else:
        digest = None
    feats = extract_features(images, extractor, batch_size=batch_size, progress=progress, dist=dist, desc=desc)
    if feats is None:
        return None
    mu, sigma = batch_statistics(feats["pool"]) if images.num_images > 1 else (None, None)
    mu_s, sigma_s = batch_statistics(feats["spatial"]) if images.num_images > 1 else (None, None)
    out = {"pool": feats["pool"], "logits": feats["logits"], "mu": mu, "sigma": sigma, "mu_s": mu_s,
           "sigma_s": sigma_s}
    if cache.cache_dir and mu is not None:
        meta = {"source": os.path.realpath(images.path), "sha256": digest, "extractor": extractor.id,
                "numerics": feature_numerics(extractor), "num_images": images.num_images,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache.save(entry, out, meta)
    out.update(num_images=images.num_images, image_shape=list(images.shape[1:]), sha256=digest, from_cache=False)
    return out


def image_batch_statistics(path, features):
    """FID/sFID statistics for a batch: the npz's ``mu``/``sigma``/``mu_s``/``sigma_s`` when it has them (as the
    ADM evaluator), else those of the extracted features. Returns ``(stats, source)``, source "npz" or "images"."""
    stats = read_npz_statistics(path)
    if stats is not None:
        return stats, "npz"
    if features.get("mu") is None:
        raise ValueError(f"{path}: FID needs at least 2 images (or mu/sigma/mu_s/sigma_s in the npz)")
    stats = {k: np.asarray(features[k], dtype=np.float64) for k in STAT_KEYS}
    check_statistics(stats, where=f"statistics of {path}", dims=None)  # any extractor's feature sizes
    return stats, "images"
