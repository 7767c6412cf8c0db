"""FID / sFID, Inception Score and precision/recall as OpenAI's ADM evaluator defines them.

* ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)) with scipy's ``sqrtm``; when that
  is not finite, 1e-6 * I is added to both covariances and it is retried; an imaginary part above 1e-3 on the
  diagonal of the root is an error, a smaller one is dropped.
* ``inception_score``: softmax of the (bias-free) logits, consecutive splits of ``split_size`` samples (the last
  one may be shorter, as upstream), exp of the mean KL(p(y|x) || p(y)) per split, averaged over splits.
* ``precision_recall``: Kynkaenniemi et al. (2019) with k = 3 as in ADM: the radius of a point is the squared
  distance to its k-th nearest neighbour in its own set (itself excluded); a point lies in the other set's
  manifold when it is within (<=) the radius of any point of that set. Precision = share of samples in the
  reference manifold, recall = share of reference points in the sample manifold. Distances are squared
  Euclidean, computed in float32 blocks (upstream computes them in float16 first and falls back to float32 on
  overflow; float32 throughout is slightly more accurate, see the README's evaluation section).
"""

import warnings

import numpy as np
import torch
from scipy import linalg


class EvaluationWarning(UserWarning):
    pass


def _finite_array(x, name, ndim):
    x = np.asarray(x, dtype=np.float64)
    if ndim == 1:
        x = np.atleast_1d(x)
    else:
        x = np.atleast_2d(x)
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
    """Inception Score from N x C logits (the ADM evaluator's: pool_3 times the logits weight, no bias).

    Splits are consecutive runs of ``split_size`` samples; like upstream, a shorter last split is kept and
    counted as one split. With fewer samples than ``split_size`` this is a single split of all samples (a
    warning says so): the score is then not comparable with 5000-sample splits.
    """
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
    log_p = logits - _logsumexp(logits)
    scores = []
    for i in range(0, n, split_size):
        part = log_p[i:i + split_size]
        p = np.exp(part)
        log_py = np.log(np.mean(p, axis=0, keepdims=True))
        kl = np.sum(p * (part - log_py), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _logsumexp(x):
    m = np.max(x, axis=1, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))


# --------------------------------------------------------------------------------------------------------------
# precision / recall


def _check_features(x, name):
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be N x D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _rows_per_block(n_cols, max_block_elems):
    return max(1, int(max_block_elems // max(1, n_cols)))


def squared_distances(a, b):
    """Pairwise squared Euclidean distances of the rows of ``a`` and ``b`` (torch tensors), clamped at 0."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(features, k=3, max_block_elems=2 ** 25, device="cpu"):
    """Squared distance of every row to its k-th nearest neighbour among the other rows (float32)."""
    x = torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32, device=device)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"the k = {k} nearest neighbours need more than {k} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=device)
    rows = _rows_per_block(n, max_block_elems)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        d = squared_distances(x[start:stop], x)
        idx = torch.arange(start, stop, device=device)
        d[idx - start, idx] = -1.0  # itself: below every real distance, so the (k+1)-th smallest is the k-th NN
        radii[start:stop] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def precision_recall(ref_features, sample_features, k=3, max_block_elems=2 ** 25, device="cpu"):
    """``(precision, recall)`` of samples against a reference set of features (both N x D).

    Memory: blocks of at most ``max_block_elems`` float32 distances (128 MiB by default) besides the features,
    so 10k reference x 50k sample x 2048-d features need about 0.5 GB.
    """
    ref = _check_features(ref_features, "ref_features")
    sample = _check_features(sample_features, "sample_features")
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]}, samples {sample.shape[1]}")
    ref_radii = manifold_radii(ref, k, max_block_elems, device)
    sample_radii = manifold_radii(sample, k, max_block_elems, device)
    r = torch.as_tensor(np.ascontiguousarray(ref), dtype=torch.float32, device=device)
    s = torch.as_tensor(np.ascontiguousarray(sample), dtype=torch.float32, device=device)
    sample_in_ref = torch.zeros(s.shape[0], dtype=torch.bool, device=device)
    ref_in_sample = torch.zeros(r.shape[0], dtype=torch.bool, device=device)
    rows = _rows_per_block(r.shape[0], max_block_elems)
    for start in range(0, s.shape[0], rows):
        stop = min(start + rows, s.shape[0])
        d = squared_distances(s[start:stop], r)  # samples x references
        sample_in_ref[start:stop] = (d <= ref_radii[None, :]).any(dim=1)
        ref_in_sample |= (d <= sample_radii[start:stop, None]).any(dim=0)
    return int(sample_in_ref.sum()) / s.shape[0], int(ref_in_sample.sum()) / r.shape[0]
