"""Bootstrap intervals of one sample set's metrics (``evaluate(bootstrap=K)``, ``--bootstrap K``; cost and tests:
docs/evaluation.md). The samples' features are resampled with replacement K times (seeded), each metric computed
again against the fixed reference. Per metric: the std of the K values (ddof=1), their mean's offset from the full
set's value v (``bias``), and the 2.5 and 97.5 percentiles shifted by ``-bias``: a resample repeats about a third of
its rows, which moves its covariance, so FID and sFID over resamples sit off v (d = 16, N = 1500: FID 0.247, the
resamples' 0.266-0.330). Precision is the mean of the full set's memberships at the resampled indices (a sample's
membership does not depend on the others); recall uses the resample's distinct points (a copy at distance 0 would
shrink a radius).
"""
import warnings

import numpy as np

from .metrics import EvaluationWarning, frechet_distance, inception_score, manifold_memberships
from .reference import batch_statistics

BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def check_bootstrap(k):
    """``k`` resamples: 0 (none) or at least 2 (a standard deviation needs two values)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
        raise ValueError(f"bootstrap must be 0 (none) or a number of resamples >= 2, got {k!r}")
    return k


def bootstrap(metric_fns, num_samples, k, seed=BOOTSTRAP_SEED, values_of_all=None):
    """``{key: {"std", "low", "high"}, "k": k, "seed": seed, "level": 0.95}`` of ``metric_fns`` (``{key: fn(idx)
    -> float}``, ``idx`` the indices of one resample of ``num_samples`` samples, drawn with replacement);
    ``values_of_all``: each metric's value on the whole set (computed here when not given), where the interval is
    centred."""
    check_bootstrap(k)
    if values_of_all is None:
        values_of_all = {key: fn(np.arange(num_samples)) for key, fn in metric_fns.items()}
    rng = np.random.default_rng(seed)
    values = {key: [] for key in metric_fns}
    with warnings.catch_warnings():  # the full set's computation has already said what each resample would repeat
        warnings.simplefilter("ignore", EvaluationWarning)
        for _ in range(k):
            idx = rng.integers(0, num_samples, num_samples)
            for key, fn in metric_fns.items():
                values[key].append(fn(idx))
    tail = 100 * (1 - BOOTSTRAP_LEVEL) / 2
    out = {}
    for key, v in values.items():
        bias = float(np.mean(v) - values_of_all[key])
        out[key] = {"std": float(np.std(v, ddof=1)), "bias": bias, "low": float(np.percentile(v, tail) - bias),
                    "high": float(np.percentile(v, 100 - tail) - bias)}
    return dict(out, k=k, seed=seed, level=BOOTSTRAP_LEVEL)


def frechet_fn(features, mu_ref, sigma_ref):
    """The Fréchet distance of a resample of ``features`` (N x d) to the fixed N(mu_ref, sigma_ref)."""
    features = np.asarray(features)
    return lambda idx: frechet_distance(*batch_statistics(features[idx]), mu_ref, sigma_ref)


def inception_score_fn(logits, split_size):
    logits = np.asarray(logits)
    return lambda idx: inception_score(logits[idx], split_size=split_size)


def precision_recall_fns(ref_pool, sample_pool, memberships, **pr_options):
    """``{"precision": fn, "recall": fn}`` from the full set's :class:`~evaluations.metrics.Memberships` (see the
    module's note); ``pr_options``: those of ``manifold_memberships`` (k, device, pr_precision)."""
    sample_pool = np.asarray(sample_pool)

    def recall(idx):
        distinct = sample_pool[np.unique(idx)]
        return float(manifold_memberships(ref_pool, distinct, ref_radii=memberships.ref_radii,
                                          **pr_options).ref_in_sample.mean())

    return {"precision": lambda idx: float(memberships.sample_in_ref[idx].mean()), "recall": recall}
