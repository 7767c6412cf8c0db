"""FID / sFID, Inception Score and precision/recall as OpenAI's ADM evaluator defines them, with its numerics
(scipy's ``sqrtm`` with its 1e-6 retry, IS splits whose last may be shorter, precision/recall with k = 3 in
upstream's float16 distance blocks, or ``pr_precision="float32"`` throughout). The method and what was measured
against upstream's TensorFlow graph: docs/evaluation.md, "Relation to the upstream (TensorFlow) evaluator".
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from .features import full_float32


@dataclass(frozen=True)
class Metric:
    """A metric's names (result key, ``--metrics`` option, printed label, table header and cell format), the network
    it needs, and the other spellings of published anchors (letters only, lower case)."""

    key: str
    option: str
    label: str
    header: str
    fmt: str
    network: str
    aliases: tuple = ()


# The one table of metric names, in the column order of published tables.
METRIC_TABLE = (
    Metric("fid", "fid", "FID", "FID", "{:.2f}", "inception"),
    Metric("sfid", "sfid", "sFID", "sFID", "{:.2f}", "inception"),
    Metric("inception_score", "is", "Inception Score", "IS", "{:.2f}", "inception"),
    Metric("precision", "pr", "Precision", "Precision", "{:.3f}", "inception", ("prec",)),
    Metric("recall", "pr", "Recall", "Recall", "{:.3f}", "inception", ("rec",)),
    Metric("fd_dinov2", "fd_dinov2", "FD_DINOv2", "FD_DINOv2", "{:.2f}", "dinov2"),
)
METRICS_BY_KEY = {m.key: m for m in METRIC_TABLE}
# Upstream's five printed lines, in its order (FD_DINOv2's line follows them).
METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
METRICS = tuple(dict.fromkeys(m.option for m in METRIC_TABLE))  # --metrics names: fid, sfid, is, pr, fd_dinov2
DEFAULT_METRICS = tuple(o for o in METRICS if o != "fd_dinov2")  # upstream's five lines


def parse_metrics(metrics=None):
    """``metrics`` (None, a comma-separated string or a list of names among ``METRICS``) -> a tuple in
    ``METRICS`` order; None -> ``DEFAULT_METRICS``."""
    if metrics is None:
        return DEFAULT_METRICS
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}: choose among {','.join(METRICS)}")
    if not names:
        raise ValueError(f"no metric selected: choose among {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


class EvaluationWarning(UserWarning):
    pass


def _finite_array(x, name, ndim, dtype=np.float64, promote=True):
    """``x`` as a finite ``ndim``-D array; ``promote``: a scalar mu/sigma (1-D Gaussian) becomes 1-D/2-D."""
    if torch.is_tensor(x):
        x = x.detach().cpu()
    x = np.asarray(x, dtype=dtype)
    x = (np.atleast_1d if ndim == 1 else np.atleast_2d)(x) if promote else x
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1 = _finite_array(mu1, "mu1", 1)
    mu2 = _finite_array(mu2, "mu2", 1)
    sigma1 = _finite_array(sigma1, "sigma1", 2)
    sigma2 = _finite_array(sigma2, "sigma2", 2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not match the means' dimension {d}")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the diagonal of both covariances",
                      EvaluationWarning)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError("Fréchet distance: matrix square root is not finite even after regularisation")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag)
        if imag.size and imag.max() > 1e-3:
            raise ValueError(f"Fréchet distance: matrix square root has an imaginary component "
                             f"{np.max(np.abs(covmean.imag))} on its diagonal (> 1e-3)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """Inception Score from N x C logits (the ADM evaluator's: pool_3 times the logits weight, no bias) over
    consecutive splits of ``split_size``: as upstream, a shorter last split counts as one, and fewer samples than
    ``split_size`` make a single split (with a warning: not comparable with 5000-sample splits)."""
    logits = _finite_array(logits, "logits", 2)
    n = logits.shape[0]
    if n == 0:
        raise ValueError("inception_score needs at least one sample")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    if n < split_size:
        warnings.warn(f"Inception Score: {n} samples is fewer than one split of {split_size}; "
                      f"using a single split of {n} samples (not comparable with published scores)",
                      EvaluationWarning)
    elif n % split_size:
        warnings.warn(f"Inception Score: {n} samples is not a multiple of {split_size}; as in the ADM "
                      f"evaluator, the last split has only {n % split_size} samples", EvaluationWarning)
    m = np.max(logits, axis=1, keepdims=True)
    log_p = logits - (m + np.log(np.sum(np.exp(logits - m), axis=1, keepdims=True)))  # log softmax
    scores = []
    for i in range(0, n, split_size):
        part = log_p[i:i + split_size]
        p = np.exp(part)
        log_py = np.log(np.mean(p, axis=0, keepdims=True))
        kl = np.sum(p * (part - log_py), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------------------------
# precision / recall

PR_PRECISIONS = ("float16", "float32")
# OpenAI's ManifoldEstimator: pairwise distances in blocks of 10,000 x 10,000; the float16 attempt and its float32
# fallback are decided per block.
UPSTREAM_BATCH = 10000


def check_pr_precision(pr_precision):
    if pr_precision not in PR_PRECISIONS:
        raise ValueError(f"pr_precision must be one of {', '.join(PR_PRECISIONS)}, got {pr_precision!r}")
    return pr_precision


def _spans(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def squared_distances(a, b):
    """Pairwise squared Euclidean distances of the rows of ``a`` and ``b`` (float32 tensors):
    ``max(|a|^2 - 2 a.b + |b|^2, 0)`` in float32, as upstream's float32 fallback."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _round16(t):
    """float32 -> nearest float16 (ties to even; beyond 65504 -> inf) -> float32."""
    return t.to(torch.float16).to(torch.float32)


# Eigen's Packet8h: TensorFlow's CPU kernels are built for AVX, where Eigen's half packets have 8 lanes and a packet
# add converts both operands to float32, adds, and rounds the sum to float16.
_EIGEN_HALF_PACKET = 8
_EIGEN_HALF_LEAF = 200  # Eigen's LeafSize<half>: rows longer than 8 * 200 values are reduced in halves


def _eigen_leaf_sums16(sq):
    """Eigen's ``InnerMostDimReducer<..., Vectorizable=true, UseTreeReduction=false>`` for ``SumReducer<half>``
    on the rows of ``sq`` (float32 holding float16 values): four packet accumulators (lanes 0-7, 8-15, 16-23, 24-31
    of every 32 values) while 32 values remain, combined as ((acc0 + acc1) + acc2) + acc3; then one packet at a
    time into acc0; the last ``m % 8`` values summed one by one into a scalar from 0; the result is
    scalar + predux(acc0), predux being a float32 tree over the 8 lanes ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
    rounded once. Every other add is a float16 add."""
    n, m = sq.shape
    p = _EIGEN_HALF_PACKET
    acc = sq.new_zeros(n, p)
    start = 0
    if m >= 4 * p:
        start = m // (4 * p) * (4 * p)
        blocks = sq[:, :start].reshape(n, start // (4 * p), 4, p)
        accs = sq.new_zeros(n, 4, p)
        for j in range(blocks.shape[1]):
            accs = _round16(accs + blocks[:, j])
        acc = _round16(_round16(accs[:, 0] + accs[:, 1]) + accs[:, 2])
        acc = _round16(acc + accs[:, 3])
    vec = m // p * p
    for j in range(start, vec, p):
        acc = _round16(acc + sq[:, j:j + p])
    scalar = sq.new_zeros(n)
    for j in range(vec, m):
        scalar = _round16(scalar + sq[:, j])
    t = acc[:, :4] + acc[:, 4:]
    red = (t[:, 0] + t[:, 2]) + (t[:, 1] + t[:, 3])
    return _round16(scalar + _round16(red))


def _eigen_tree_sums16(sq, first, lo, m):
    """Eigen's tree reduction (``InnerMostDimReducer<..., true, true>``) of columns ``lo:lo+m`` of ``sq``, whose
    first value has flat index ``first`` modulo 8 in the reduced tensor: longer than 8 * 200 values, the span is
    split at the first multiple of 8 at or past its middle, each side reduced alike and the two added in float16."""
    p = _EIGEN_HALF_PACKET
    if m > p * _EIGEN_HALF_LEAF:
        left = min(p * -(-(first + -(-m // 2)) // p) - first, m)
        acc = _eigen_tree_sums16(sq, first, lo, left)
        if left < m:
            acc = _round16(acc + _eigen_tree_sums16(sq, 0, lo + left, m - left))
        return acc
    return _eigen_leaf_sums16(sq[:, lo:lo + m])


def float16_norms(x):
    """Squared norms as upstream's float16 graph computes them on TensorFlow's CPU kernels: ``x`` (float32, n x d)
    cast to float16, each square rounded to float16, the squares summed in float16 in the order of Eigen's tree
    reduction for ``SumReducer<half>`` (``_eigen_tree_sums16``). Bit-identical to TensorFlow 2.21 (CPU) on every
    row we tried, 1 to 12,801 dims, and on CUDA alike (same adds, same order); TensorFlow on a GPU sums in CUB's
    order, unmeasured. Returns float32 holding float16 values (inf where a partial sum overflows). A row over 1600
    values splits at a point set by its flat offset modulo 8, from its index in ``x`` (upstream's batches: 10,000)."""
    n, d = x.shape
    x16 = _round16(x)
    out = x.new_empty(n)
    p = _EIGEN_HALF_PACKET
    for r0 in range(0, n, 8192):
        r1 = min(r0 + 8192, n)
        sq = _round16(x16[r0:r1] * x16[r0:r1])
        if d % p == 0 or d <= p * _EIGEN_HALF_LEAF:
            out[r0:r1] = _eigen_tree_sums16(sq, 0, 0, d)  # the offset cannot move a split
            continue
        first = (torch.arange(r0, r1, device=x.device) * d) % p
        for r in range(p):
            rows = (first == r).nonzero()[:, 0]
            if len(rows):
                out[r0 + rows] = _eigen_tree_sums16(sq[rows], r, 0, d)
    return out


def squared_distances_float16(a, b, norms_a=None, norms_b=None):
    """Upstream's float16 distance block: ``max((|a|^2 - 2 a.b) + |b|^2, 0)`` from float16 casts, the norms as
    ``float16_norms``, the dot products accumulated in float32, every result rounded to float16 (overflow gives inf
    or, through ``-inf`` and the clamp, 0). A float16 matmul on CUDA; elsewhere float32 rounded to float16 after
    every op (exact: float32 holds two float16 values' sum or product closely enough). Returns float32 tensors."""
    norms_a = float16_norms(a) if norms_a is None else norms_a
    norms_b = float16_norms(b) if norms_b is None else norms_b
    if a.is_cuda:
        a16, b16 = a.to(torch.float16), b.to(torch.float16)
        na, nb = norms_a.to(torch.float16), norms_b.to(torch.float16)
        d = na[:, None] - 2.0 * (a16 @ b16.T) + nb[None, :]
        return d.clamp_min_(0.0).to(torch.float32)
    dots = _round16(_round16(a) @ _round16(b).T)
    d = _round16(norms_a[:, None] - _round16(2.0 * dots))
    d = _round16(d + norms_b[None, :])
    return d.clamp_min_(0.0)


class _Features:
    """A feature set on the device, with its float16 norms when the float16 path needs them."""

    def __init__(self, x, device, pr_precision):
        self.x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)
        self.norms16 = float16_norms(self.x) if pr_precision == "float16" else None

    def __len__(self):
        return self.x.shape[0]


def _block(rows, r0, r1, cols, c0, c1, pr_precision, max_block_elems, reduce, log=None, phase=None):
    """``reduce(d, lo, hi)`` of each row chunk (``lo:hi`` from ``r0``) of the distance block rows ``r0:r1`` x columns
    ``c0:c1``, in order. float16: when any entry of the whole block is not finite, it is all computed again in
    float32, as upstream's ``tf.cond(reduce_all(is_finite(D16)), D16, D32)``."""
    u, v = rows.x[r0:r1], cols.x[c0:c1]
    chunks = _spans(r1 - r0, max(1, int(max_block_elems // max(1, c1 - c0))))  # rows of at most that many entries
    used = pr_precision
    if pr_precision == "float16":
        nu, nv = rows.norms16[r0:r1], cols.norms16[c0:c1]
        out = []
        for lo, hi in chunks:
            d = squared_distances_float16(u[lo:hi], v, nu[lo:hi], nv)
            if not bool(torch.isfinite(d).all()):
                used = "float32"
                break
            out.append(reduce(d, lo, hi))
    if used == "float32":
        out = [reduce(squared_distances(u[lo:hi], v), lo, hi) for lo, hi in chunks]
    if log is not None:
        log.append((phase, r0, c0, used))
    return out


def _manifold_radii(feats, k, max_block_elems, pr_precision, row_batch_size, col_batch_size, log, phase):
    """Each row's radius: its (k+1)-th smallest squared distance in its own set, itself the smallest (its k-th
    nearest neighbour's), as upstream's ``manifold_radii`` (``nhood_sizes=(3,)``, no ``clamp_to_percentile``)."""
    n = len(feats)
    if n <= k:
        raise ValueError(f"the k = {k} nearest neighbours need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=feats.x.device)
    for r0, r1 in _spans(n, row_batch_size):
        best = None  # per row, the k + 1 smallest distances seen so far, ascending
        for c0, c1 in _spans(n, col_batch_size):
            parts = _block(feats, r0, r1, feats, c0, c1, pr_precision, max_block_elems,
                           lambda d, lo, hi: torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values,
                           log, phase)
            cand = torch.cat(parts, dim=0)
            if best is not None:
                cand = torch.cat([best, cand], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r1] = best[:, k]
    return radii


def precision_recall(ref_features, sample_features, *args, **kwargs):
    """``(precision, recall)`` of samples against a reference set of features (both N x D), as OpenAI's evaluator
    computes them; the other arguments (``k``, ...): :func:`manifold_memberships`'."""
    m = manifold_memberships(ref_features, sample_features, *args, **kwargs)
    return int(m.sample_in_ref.sum()) / len(m.sample_in_ref), int(m.ref_in_sample.sum()) / len(m.ref_in_sample)


@dataclass
class Memberships:
    """Per point, whether it lies in the other set's manifold (precision is the mean of ``sample_in_ref``,
    recall that of ``ref_in_sample``), and the reference radii (reusable: they depend on the reference alone)."""

    sample_in_ref: np.ndarray
    ref_in_sample: np.ndarray
    ref_radii: torch.Tensor


def manifold_memberships(ref_features, sample_features, k=3, max_block_elems=2 ** 25, device="cpu",
                         pr_precision="float16", row_batch_size=UPSTREAM_BATCH,
                         col_batch_size=UPSTREAM_BATCH, block_log=None, ref_radii=None):
    """The :class:`Memberships` of OpenAI's ``ManifoldEstimator`` with ``DistanceBlock``: blocks of
    ``row_batch_size`` x ``col_batch_size``, the reference rows the distance formula's ``u`` and the samples its
    ``v``, as upstream (float16 rounding makes the order matter).

    :param max_block_elems: memory only: a block is computed in row chunks of at most this many distances (the
        float16/float32 decision stays per block), so the results do not depend on it.
    :param block_log: a list to which ``(phase, row_start, col_start, precision_used)`` is appended per block, phase
        ``"ref_radii"``, ``"sample_radii"`` or ``"pr"`` (rows: reference, columns: samples).
    :param ref_radii: an earlier call's, with the same reference features (the bootstrap's resamples)."""
    check_pr_precision(pr_precision)
    ref = _finite_array(ref_features, "ref_features (N x D)", 2, np.float32, promote=False)
    sample = _finite_array(sample_features, "sample_features (N x D)", 2, np.float32, promote=False)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]}, samples {sample.shape[1]}")
    if row_batch_size < 1 or col_batch_size < 1:
        raise ValueError("row_batch_size and col_batch_size must be positive")
    with full_float32():  # as TensorFlow's float32/float16 matmuls: no TF32, float16 products summed in float32
        r = _Features(ref, device, pr_precision)
        s = _Features(sample, device, pr_precision)
        args = (k, max_block_elems, pr_precision, row_batch_size, col_batch_size, block_log)
        ref_radii = _manifold_radii(r, *args, phase="ref_radii") if ref_radii is None else ref_radii
        sample_radii = _manifold_radii(s, *args, phase="sample_radii")
        ref_in_sample = torch.zeros(len(r), dtype=torch.bool, device=r.x.device)
        sample_in_ref = torch.zeros(len(s), dtype=torch.bool, device=s.x.device)
        for r0, r1 in _spans(len(r), row_batch_size):
            for c0, c1 in _spans(len(s), col_batch_size):
                rr, sr = ref_radii[r0:r1], sample_radii[c0:c1]

                def reduce(d, lo, hi):
                    return (d <= sr[None, :]).any(dim=1), (d <= rr[lo:hi, None]).any(dim=0)

                parts = _block(r, r0, r1, s, c0, c1, pr_precision, max_block_elems, reduce, block_log, "pr")
                ref_in_sample[r0:r1] |= torch.cat([p[0] for p in parts])
                sample_in_ref[c0:c1] |= torch.stack([p[1] for p in parts]).any(dim=0)
    return Memberships(sample_in_ref.cpu().numpy(), ref_in_sample.cpu().numpy(), ref_radii)
