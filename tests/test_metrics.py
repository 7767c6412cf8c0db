"""FID, Inception Score and precision/recall against closed forms and independent computations."""

import warnings

import numpy as np
import pytest
import torch

from evaluations import metrics
from evaluations.metrics import (
    EvaluationWarning,
    frechet_distance,
    inception_score,
    precision_recall,
    squared_distances_float16,
)
from evaluations.reference import shard_bounds


def random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.5 * np.eye(d))


def random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_fid_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(6), random_spd(rng, 6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_shifted_means_is_squared_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(5), rng.standard_normal(5), random_spd(rng, 5)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fid_diagonal_covariances_closed_form():
    a = np.array([1.0, 4.0, 9.0, 0.25])
    b = np.array([4.0, 1.0, 9.0, 1.0])
    mu1 = np.array([0.0, 1.0, 2.0, 3.0])
    mu2 = np.array([1.0, 1.0, 0.0, 3.0])
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 = (1 + 0 + 4 + 0) + (1 + 1 + 0 + 0.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.25, abs=1e-10)


def test_fid_commuting_covariances_closed_form():
    rng = np.random.default_rng(2)
    d = 8
    q = random_rotation(rng, d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_fid_general_matches_symmetric_form():
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): an independent (eigh-based) computation.
    rng = np.random.default_rng(3)
    d = 10
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.linalg.eigvalsh(root @ s2 @ root)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_scalars():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_retries_with_offset_on_non_finite_root(monkeypatch):
    calls = []
    real_sqrtm = metrics.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(np.array(a))
        if len(calls) == 1:
            return np.full_like(a, np.nan)
        return real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky_sqrtm)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    with pytest.warns(EvaluationWarning, match="singular"):
        got = frechet_distance([0, 0], s1, [0, 0], s2)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)), rtol=0, atol=0)
    expected = 3 + 7 - 2 * (np.sqrt((1 + 1e-6) * (3 + 1e-6)) + np.sqrt((2 + 1e-6) * (4 + 1e-6)))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("imag, ok", [(1e-5, True), (1e-2, False)])
def test_fid_imaginary_component(monkeypatch, imag, ok):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: np.eye(2) * (1.0 + 1j * imag))
    args = ([0.0, 0.0], np.eye(2), [0.0, 0.0], np.eye(2))
    if ok:
        assert frechet_distance(*args) == pytest.approx(0.0, abs=1e-12)  # real part kept: 2 + 2 - 2 * 2
    else:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(*args)


def test_fid_bad_inputs():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    bad = eye.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(3), bad, np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0.0, np.inf, 0.0]), eye, np.zeros(3), eye)


# ---------------------------------------------------------------------------------------------------------------
# Inception Score


def one_hot_logits(classes, num_classes=1008, high=50.0):
    logits = np.zeros((len(classes), num_classes))
    logits[np.arange(len(classes)), classes] = high
    return logits


def test_is_uniform_logits_is_one():
    with pytest.warns(EvaluationWarning, match="fewer than one split"):
        assert inception_score(np.full((40, 1008), 3.0)) == pytest.approx(1.0, abs=1e-12)


def test_is_one_hot_distinct_classes_is_class_count():
    classes = np.repeat(np.arange(7), 3)  # 7 classes, 3 samples each
    with pytest.warns(EvaluationWarning):
        assert inception_score(one_hot_logits(classes)) == pytest.approx(7.0, rel=1e-9)


def test_is_consecutive_splits_averaged():
    # split 1: 5 distinct classes -> 5; split 2: all one class -> 1; mean 3.
    classes = np.array([0, 1, 2, 3, 4, 9, 9, 9, 9, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 10 is a multiple of 5: no warning
        assert inception_score(one_hot_logits(classes), split_size=5) == pytest.approx(3.0, rel=1e-9)


def test_is_partial_last_split_kept_like_upstream():
    classes = np.array([0, 1, 2, 3, 4, 5, 6])  # splits of 5: [5 classes] + [2 classes]
    with pytest.warns(EvaluationWarning, match="last split has only 2"):
        assert inception_score(one_hot_logits(classes), split_size=5) == pytest.approx(3.5, rel=1e-9)


def test_is_matches_upstream_formula():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((30, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, 30, 10):
        part = p[i:i + 10]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-10)


def test_is_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        inception_score(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="at least one"):
        inception_score(np.zeros((0, 10)))


# ---------------------------------------------------------------------------------------------------------------
# precision / recall


def brute_force_pr(ref, sample, k):
    def radii(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    r_ref, r_sample = radii(ref), radii(sample)
    d = ((sample[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    precision = np.mean([(d[i] <= r_ref).any() for i in range(len(sample))])
    recall = np.mean([(d[:, j] <= r_sample).any() for j in range(len(ref))])
    return precision, recall


def test_pr_hand_built_sets():
    # Reference: two unit squares far apart; every corner's 3rd neighbour is the opposite corner: radius 2.
    ref = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [10, 0], [11, 0], [10, 1], [11, 1]], dtype=np.float32)
    # Samples: (0.5, 0.5), (2, 0), (0, -1.25) lie within sqrt(2) of a corner of the first square; (3, 0) does not.
    sample = np.array([[0.5, 0.5], [2, 0], [3, 0], [0, -1.25]], dtype=np.float32)
    # Sample radii (4 points, k = 3: the farthest other sample): 6.5, 5.5625, 10.5625, 10.5625. The first
    # square's corners are within 0.5 of (0.5, 0.5); the second square is 49+ away from every sample.
    precision, recall = precision_recall(ref, sample, k=3)
    assert precision == 0.75
    assert recall == 0.5


def test_pr_radius_boundary_is_inclusive():
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])  # radius of 0: 3rd neighbour 3 -> 9
    sample = np.array([[-3.0], [-3.5], [1.5], [50.0]])  # -3 is exactly at distance^2 9 from 0; -3.5 is not
    precision, _ = precision_recall(ref, sample, k=3)
    assert precision == 0.5


def test_pr_duplicates_count_as_neighbours():
    # Four copies of one point: each has three neighbours at distance 0, so radius 0; only exact copies are inside.
    ref = np.zeros((4, 3))
    sample = np.array([[0.0, 0, 0], [0, 0, 1e-3], [5, 5, 5], [6, 6, 6]])
    precision, _ = precision_recall(ref, sample, k=3)
    assert precision == 0.25


@pytest.mark.parametrize("k", [1, 3])
def test_pr_matches_brute_force_with_small_blocks(k):
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((37, 6)).astype(np.float32)
    sample = (rng.standard_normal((53, 6)) * 1.3 + 0.4).astype(np.float32)
    expected = brute_force_pr(ref.astype(np.float64), sample.astype(np.float64), k)
    for block in (7, 10 ** 6):
        got = precision_recall(ref, sample, k=k, max_block_elems=block, pr_precision="float32")
        assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case


def test_pr_bad_inputs():
    a = np.zeros((5, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(a, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 4)), a)
    bad = np.ones((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(a, bad)
    with pytest.raises(ValueError, match="pr_precision"):
        precision_recall(a, a, pr_precision="bfloat16")


# precision / recall as OpenAI's evaluator computes them: float16 distance blocks, float32 fallback per block.
# The NumPy references below use NumPy's own float16 arithmetic (each op correctly rounded to float16).


def np_add16(a, b):
    """float16 + float16 as Eigen's half packets and scalars add: in float32, rounded to float16."""
    return (np.asarray(a, np.float16).astype(np.float32) + np.asarray(b, np.float16).astype(np.float32)).astype(
        np.float16)


def np_eigen_sum16(sq, first=0):
    """TensorFlow-CPU's ``reduce_sum`` of one float16 row ``sq``, written out as Eigen's tree reduction with 8-lane
    half packets (``InnerMostDimReducer``, ``LeafSize<half>`` = 200); ``first``: the row's flat offset."""
    n = len(sq)
    if n > 8 * 200:  # split at the first multiple of 8 at or past the middle; halves added in float16
        left = min(8 * -(-(first + -(-n // 2)) // 8) - first, n)
        acc = np_eigen_sum16(sq[:left], first)
        return np_add16(acc, np_eigen_sum16(sq[left:], first + left)) if left < n else acc
    acc = [np.zeros(8, np.float16) for _ in range(4)]
    start = 0
    if n >= 32:  # four packet accumulators over lanes 0-7, 8-15, 16-23, 24-31 of every 32 values
        start = n // 32 * 32
        for j in range(0, start, 32):
            acc = [np_add16(acc[k], sq[j + 8 * k:j + 8 * k + 8]) for k in range(4)]
        acc[0] = np_add16(np_add16(np_add16(acc[0], acc[1]), acc[2]), acc[3])
    for j in range(start, n // 8 * 8, 8):
        acc[0] = np_add16(acc[0], sq[j:j + 8])
    tail = np.float16(0)
    for v in sq[n // 8 * 8:]:
        tail = np_add16(tail, v)
    lanes = acc[0].astype(np.float32)  # predux: a float32 tree over the lanes, rounded once
    t = lanes[:4] + lanes[4:]
    return np_add16(tail, np.float16((t[0] + t[2]) + (t[1] + t[3])))


def np_norms_float16(a):
    """Squared norms of upstream's float16 graph on TensorFlow's CPU kernels: squares rounded to float16, summed
    in float16 in Eigen's order."""
    sq = np.square(np.asarray(a, np.float32).astype(np.float16))
    return np.array([np_eigen_sum16(row, i * sq.shape[1]) for i, row in enumerate(sq)], np.float16)


def np_distances_float16(a, b):
    """Upstream's float16 block in NumPy: max((|a|^2 - 2 a.b) + |b|^2, 0) on float16 casts; squares rounded to
    float16 and summed in float16 (``np_norms_float16``), dot products accumulated in float32 and rounded to
    float16, then float16 ops."""
    with np.errstate(over="ignore", invalid="ignore"):
        a16, b16 = np.asarray(a).astype(np.float16), np.asarray(b).astype(np.float16)
        na, nb = np_norms_float16(a), np_norms_float16(b)
        dots = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)
        d = (na[:, None] - np.float16(2) * dots) + nb[None, :]
        return np.maximum(d, np.float16(0)).astype(np.float32)  # max(-inf, 0) = 0; NaN stays NaN


def np_distances_float32(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = (a * a).sum(1)[:, None] - np.float32(2) * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, np.float32(0))


def np_exact_distances(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def np_blockwise(rows, cols):
    """Upstream's DistanceBlock over blocks of ``rows`` x ``cols`` points: float16, or float32 for a block with
    any non-finite float16 entry. Returns the distance function and a dict (row start, col start) -> dtype."""
    used = {}

    def dist(a, b):
        out = np.empty((len(a), len(b)), np.float32)
        for r in range(0, len(a), rows):
            for c in range(0, len(b), cols):
                d = np_distances_float16(a[r:r + rows], b[c:c + cols])
                used[(r, c)] = "float16"
                if not np.all(np.isfinite(d)):
                    d, used[(r, c)] = np_distances_float32(a[r:r + rows], b[c:c + cols]), "float32"
                out[r:r + rows, c:c + cols] = d
        return out

    return dist, used


def np_pr(ref, sample, dist, k=3):
    """Precision/recall from a distance function: radius = (k+1)-th smallest of a row, itself included; reference
    points are the rows of the cross distances, as upstream."""
    ref_radii = np.sort(dist(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(dist(sample, sample), axis=1)[:, k]
    d = dist(ref, sample)
    return float((d <= ref_radii[:, None]).any(0).mean()), float((d <= sample_radii[None, :]).any(1).mean())


def test_pr_float16_input_cast_flips_a_sample():
    # Reference 0, 1, 2, 3 (1-D): radii 9, 4, 4, 9 in both modes (small integers are exact in float16).
    # -3.0005 is 9.003 from 0 in float32: outside every radius. Cast to float16 (spacing 2^-9 near 3) it is -3.0,
    # exactly 9 from 0: inside the radius of 0 (<=).
    ref = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    sample = np.array([[-3.0005], [10.0], [20.0], [30.0]], np.float32)
    assert precision_recall(ref, sample) == (0.25, 1.0)
    assert precision_recall(ref, sample, pr_precision="float32") == (0.0, 1.0)
    assert np_pr(ref, sample, np_distances_float16) == (0.25, 1.0)
    assert np_pr(ref, sample, np_exact_distances) == (0.0, 1.0)


def test_pr_float16_formula_rounding_flips_precision_and_recall():
    # 1-D points 64..67 and 70: every value is exact in float16, only the formula's roundings differ.
    # float16 (spacing 4 in [4096, 8192), 8 in [8192, 16384)):
    #   radius of 67 = its distance to 64: |67|^2 = 4489 -> 4488; 67 * 64 = 4288; 4488 - 8576 = -4088; + 4096 = 8
    #   (exact: 9). Its other distances round to 0 (to 65, 66) and its own is 0, so the 4th smallest is 8.
    #   67 to 70: 67 * 70 = 4690 -> 4688 (tie, to even); 4488 - 9376 = -4888; + |70|^2 4900 = 12 > 8: outside.
    #   (70 is 16, 20, 36 from 66, 65, 64 there, beyond their radii 4, 4, 8.)
    # float32: radius of 67 = 9, and 70 is exactly 9 from 67: inside.
    near = np.array([[64.0], [65.0], [66.0], [67.0]], np.float32)
    far = np.array([[70.0], [100.0], [110.0], [120.0]], np.float32)  # 70's radius: 50^2, covering all of near
    assert squared_distances_float16(torch.tensor(near), torch.tensor(far[:1]))[:, 0].tolist() == [36, 20, 16, 12]
    assert metrics.manifold_memberships(near, near).ref_radii.tolist() == [8, 4, 4, 8]
    assert metrics.manifold_memberships(near, near, pr_precision="float32").ref_radii.tolist() == [9, 4, 4, 9]
    # 70 as a sample: precision flips.
    assert precision_recall(near, far) == (0.0, 1.0) == np_pr(near, far, np_distances_float16)
    assert precision_recall(near, far, pr_precision="float32") == (0.25, 1.0) == np_pr(near, far, np_exact_distances)
    # 70 as a reference point: recall flips. Reference rows come first in the formula (|70|^2 - 2 * 70 * 67 +
    # |67|^2 = 4900 - 9376 + 4488 = 12 again, while the radius of 67 among the samples is 8).
    assert precision_recall(far, near) == (1.0, 0.0) == np_pr(far, near, np_distances_float16)
    assert precision_recall(far, near, pr_precision="float32") == (1.0, 0.25) == np_pr(far, near, np_exact_distances)


def test_float16_norms_accumulate_in_float16_in_eigens_order():
    # tf.reduce_sum on float16 (CPU) adds in float16 with Eigen's 8-lane packets: four accumulators take lanes 0-7,
    # 8-15, 16-23, 24-31 of every 32 values and are combined as ((acc0 + acc1) + acc2) + acc3; then a float32 sum
    # of the 8 lanes, rounded once. float16 spacing is 1 in [1024, 2048), 4 in [4096, 8192).
    # 64 dims, one 32 (square 1024) and 63 of 0.5 (square 0.25); exactly 1039.75.
    row = np.full((2, 64), 0.5, np.float32)
    row[0, 0] = row[1, 16] = 32.0
    # Big value in acc0 lane 0: 1024 + 0.25 (value 32) -> 1024; acc1, acc2, acc3 lane 0 each hold 0.5, and
    # 1024 + 0.5 is a tie -> 1024 three times: lane 0 stays 1024. Lanes 1-7: 8 x 0.25 = 2 each, 14 in all: 1038.
    # Big value in acc2 lane 0: 1024 (its 0.25 lost); acc0 + acc1 = 1; + 1024 = 1025; + acc3's 0.5 = 1025.5 -> 1026
    # (tie, to even); + 14 = 1040. (Pairwise combining, (acc0 + acc1) + (acc2 + acc3), would give 1025 + 14.)
    # float32 accumulation would give 1039.75 -> 1040 for both rows.
    assert metrics.float16_norms(torch.tensor(row)).tolist() == [1038.0, 1040.0]
    assert np.square(row.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16).tolist() == [1040.0] * 2

    # 2048 dims (> 8 x 200): split into values 0-1023 and 1024-2047, each reduced alone, the two sums added in
    # float16. 64 at 0 (square 4096), 1 at 32, 64, 96, 128 (acc0 lane 0, each 4096 + 1 -> 4096) and at 1024, 1025,
    # 1026 (lanes 0-2 of the second half's acc0). Split: 4096 + 3 = 4099 -> 4100. Unsplit, value 1024 would also
    # meet 4096 in acc0 lane 0 and be lost: 4096 + 2 = 4098 -> 4096 (tie, to even). float32: 4103 -> 4104.
    row = np.zeros((1, 2048), np.float32)
    row[0, [0, 32, 64, 96, 128, 1024, 1025, 1026]] = [64, 1, 1, 1, 1, 1, 1, 1]
    assert metrics.float16_norms(torch.tensor(row)).tolist() == [4100.0]
    assert np_norms_float16(row).tolist() == [4100.0]
    assert np.square(row.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16).tolist() == [4104.0]


def test_float16_norms_match_the_numpy_reference_of_eigens_order():
    # Tails of 1-7 values, single packets, the 4-accumulator loop and the split of rows longer than 1600, whose
    # position depends on the row's flat offset modulo 8 (1601 dims: every offset occurs in 9 rows).
    rng = np.random.default_rng(3)
    differ = 0
    for d in (1, 5, 13, 67, 1601, 2048):
        x = (rng.standard_normal((9, d)) * np.exp(rng.uniform(-2, 1.5, (9, d)))).astype(np.float32)
        got = metrics.float16_norms(torch.tensor(x)).numpy()
        assert got.tolist() == np_norms_float16(x).astype(np.float32).tolist()
        differ += int((got != np.square(x.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16)).sum())
    assert differ >= 10  # float16 accumulation is observable on these rows


def test_pr_float16_doubled_dot_overflow_clamps_to_zero_without_fallback():
    # 181 and 182: squared norms 32761 -> 32768 and 33124 -> 33120 are finite in float16, but 2 * (181 * 182 =
    # 32942 -> 32944) = 65888 overflows to inf; 32768 - inf + 33120 = -inf, clamped to 0: a finite block (no
    # fallback) in which these two points are 0 apart (exactly: 1), as upstream's graph computes it.
    a, b = np.array([[181.0]], np.float32), np.array([[182.0]], np.float32)
    assert squared_distances_float16(torch.tensor(a), torch.tensor(b)).item() == 0.0
    assert np_distances_float16(a, b).item() == 0.0
    ref = np.array([[181.0], [190.0], [200.0], [210.0]], np.float32)
    sample = np.array([[182.0], [230.0], [240.0], [250.0]], np.float32)  # squares below 65504
    log = []
    got = precision_recall(ref, sample, block_log=log)
    assert [entry[3] for entry in log] == ["float16"] * 3
    assert got == np_pr(ref, sample, np_distances_float16) == (1.0, 1.0)
    assert precision_recall(ref, sample, pr_precision="float32") == np_pr(ref, sample, np_exact_distances) == (0.5, 1.0)


def offset_clusters(seed, n_ref=60, n_sample=45, d=16, offset=6.0):
    """Points with large norms and small distances, so float16 rounding changes many memberships."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, d)) * 0.6 + offset
    ref = centres[rng.integers(0, 3, n_ref)] + 0.35 * rng.standard_normal((n_ref, d))
    sample = centres[rng.integers(0, 3, n_sample)] + 0.4 * rng.standard_normal((n_sample, d)) + 0.05
    return ref.astype(np.float32), sample.astype(np.float32)


def test_pr_float16_matches_numpy_reference_on_random_sets():
    changed = 0
    for seed in range(4):
        ref, sample = offset_clusters(seed)
        got16 = precision_recall(ref, sample)
        got32 = precision_recall(ref, sample, pr_precision="float32")
        assert got16 == pytest.approx(np_pr(ref, sample, np_distances_float16), abs=1e-12)
        assert got32 == pytest.approx(np_pr(ref, sample, np_exact_distances), abs=1e-12)
        changed += got16 != got32
    assert changed >= 2  # the modes are observably different on these sets


def test_pr_float32_mode_equals_exact_float64():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((70, 12)).astype(np.float32)
    sample = (rng.standard_normal((50, 12)) * 1.2 + 0.3).astype(np.float32)
    expected = np_pr(ref, sample, np_exact_distances)
    assert expected == pytest.approx(brute_force_pr(ref.astype(np.float64), sample.astype(np.float64), 3))
    for rows, cols, elems in ((10000, 10000, 2 ** 25), (9, 4, 5), (1, 1, 1)):
        got = precision_recall(ref, sample, pr_precision="float32", row_batch_size=rows, col_batch_size=cols,
                               max_block_elems=elems)
        assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1


def test_pr_float16_overflow_falls_back_block_by_block():
    # Blocks of 4 x 4 points. Points 0-3 of each set are the rounding case above (float16 is finite there);
    # points 4-7 have squared norms near 90,000 > 65504, so every block touching them overflows in float16 and is
    # computed in float32 instead, while the 0-3 x 0-3 blocks stay float16.
    near = np.array([[64.0], [65.0], [66.0], [67.0]], np.float32)
    huge = np.array([[300.0], [301.0], [302.0], [303.0]], np.float32)
    ref = np.concatenate([near, huge])
    sample = np.concatenate([np.array([[70.0], [64.5], [66.5], [67.25]], np.float32), huge + 3.0])
    log = []
    got = precision_recall(ref, sample, row_batch_size=4, col_batch_size=4, block_log=log)
    expected_used = {(0, 0): "float16", (0, 4): "float32", (4, 0): "float32", (4, 4): "float32"}
    for phase in ("ref_radii", "sample_radii", "pr"):
        assert {(r, c): used for p, r, c, used in log if p == phase} == expected_used
    assert len(log) == 12

    dist, used = np_blockwise(4, 4)
    expected = np_pr(ref, sample, dist)
    assert used == expected_used
    assert got == expected
    # Neither all-float16 (the huge points' distances would be inf: never inside) nor all-float32.
    assert got != np_pr(ref, sample, np_distances_float16)
    assert got != precision_recall(ref, sample, pr_precision="float32")
    # Blocks are upstream's unit of fallback: one 8 x 8 block overflows as a whole, i.e. everything is float32.
    log = []
    one_block = precision_recall(ref, sample, row_batch_size=8, col_batch_size=8, block_log=log)
    assert one_block == precision_recall(ref, sample, pr_precision="float32")
    assert [entry[3] for entry in log] == ["float32"] * 3
    # Chunking a block for memory does not change the per-block decision.
    for elems in (1, 3, 9, 2 ** 25):
        assert precision_recall(ref, sample, row_batch_size=4, col_batch_size=4, max_block_elems=elems) == got


def test_pr_independent_of_block_sizes_without_overflow():
    ref, sample = offset_clusters(11, n_ref=50, n_sample=37)
    expected16 = precision_recall(ref, sample)
    expected32 = precision_recall(ref, sample, pr_precision="float32")
    assert expected16 != expected32
    for rows, cols, elems in ((7, 5, 1), (3, 11, 13), (16, 16, 40), (50, 1, 2 ** 25), (1, 37, 100)):
        log = []
        kwargs = dict(row_batch_size=rows, col_batch_size=cols, max_block_elems=elems)
        assert precision_recall(ref, sample, block_log=log, **kwargs) == expected16
        assert {entry[3] for entry in log} == {"float16"}
        assert precision_recall(ref, sample, pr_precision="float32", **kwargs) == expected32


# ---------------------------------------------------------------------------------------------------------------
# splitting work over processes


@pytest.mark.parametrize("n, world", [(10, 3), (3, 5), (0, 2), (50000, 8), (7, 1)])
def test_shard_bounds_cover_range_contiguously(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(n, world, world)


def test_feature_arrays_must_be_two_dimensional_and_options_may_be_positional():
    ref = np.random.default_rng(0).random((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"ref_features \(N x D\) must be 2-D, got shape \(64,\)"):
        metrics.precision_recall(np.zeros(64), ref)
    assert metrics.precision_recall(ref, ref, 3) == metrics.precision_recall(ref, ref, k=3) == (1.0, 1.0)
