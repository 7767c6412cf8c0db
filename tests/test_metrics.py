"""FID, Inception Score and precision/recall against closed forms and independent computations."""

import warnings

import numpy as np
import pytest

from evaluations import metrics
from evaluations.metrics import EvaluationWarning, frechet_distance, inception_score, precision_recall
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
        got = precision_recall(ref, sample, k=k, max_block_elems=block)
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
