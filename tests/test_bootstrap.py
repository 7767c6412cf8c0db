"""The evaluator's bootstrap interval (``evaluate(bootstrap=K)``, ``--bootstrap K``): its spread against analytic
values on Gaussian sets, its reproducibility, and its place in the result JSON and the printed lines."""

import json

import numpy as np
import pytest
import torch

from evaluations import evaluator as ev
from evaluations.bootstrap import bootstrap, check_bootstrap, frechet_fn, precision_recall_fns
from evaluations.features import RANDOM_WEIGHTS_MARK
from evaluations.metrics import manifold_memberships


def test_fid_bootstrap_std_matches_the_delta_method():
    """Samples x_1..x_n ~ N(m, I) in d = 4 dimensions, the reference fixed at N(0, I). FID = |xbar|^2 + tr(S) + d
    - 2 tr(S^1/2); at S = I the covariance part has zero gradient (sum of (sqrt(lambda) - 1)^2), so by the delta
    method the std of FID over resamples is that of |xbar*|^2: 2 sqrt(xbar' S xbar / n) (xbar* - xbar has
    covariance S / n under resampling), about 2 |m| / sqrt(n) = 0.0447 for |m| = 1, n = 2000. With K = 300
    resamples the estimate of a std is within about 4 % (1 / sqrt(2K)); the test allows 20 %."""
    rng = np.random.default_rng(1)
    n, d = 2000, 4
    x = rng.standard_normal((n, d)) + 0.5  # m = (0.5, 0.5, 0.5, 0.5), |m| = 1
    xbar, s = x.mean(0), np.cov(x, rowvar=False)
    analytic = 2 * np.sqrt(xbar @ s @ xbar / n)
    assert analytic == pytest.approx(2 / np.sqrt(n), rel=0.1)  # the population value, as the docstring says
    out = bootstrap({"fid": frechet_fn(x, np.zeros(d), np.eye(d))}, n, k=300, seed=0)
    assert out["fid"]["std"] == pytest.approx(analytic, rel=0.2)
    assert out["fid"]["low"] < out["fid"]["high"]
    assert out["k"] == 300 and out["seed"] == 0 and out["level"] == 0.95
    # The interval holds the full set's FID: resamples repeat rows, which moves their FIDs off it; the interval is
    # shifted by that offset (the plain percentiles missed the full value in a d = 16 case: the next assertion).
    full = frechet_fn(x, np.zeros(d), np.eye(d))(np.arange(n))
    assert out["fid"]["low"] < full < out["fid"]["high"]
    y = rng.standard_normal((1500, 16)) * 1.0 + 0.1
    wide = bootstrap({"fid": frechet_fn(y, np.zeros(16), np.eye(16))}, 1500, k=100, seed=0)
    full16 = frechet_fn(y, np.zeros(16), np.eye(16))(np.arange(1500))
    assert wide["fid"]["low"] < full16 < wide["fid"]["high"]


def test_precision_bootstrap_std_is_the_binomial_std():
    """Precision is the share of samples inside the reference manifold, each sample's membership fixed by the
    reference alone; its bootstrap std is that of a resampled proportion, sqrt(p (1 - p) / n)."""
    rng = np.random.default_rng(2)
    ref, sample = rng.standard_normal((300, 3)), rng.standard_normal((400, 3)) * 1.5
    members = manifold_memberships(ref, sample, pr_precision="float32")
    p = members.sample_in_ref.mean()
    assert 0.2 < p < 0.95
    fns = precision_recall_fns(ref, sample, members, pr_precision="float32")
    out = bootstrap(fns, len(sample), k=300, seed=0)
    assert out["precision"]["std"] == pytest.approx(np.sqrt(p * (1 - p) / len(sample)), rel=0.2)
    assert 0 < out["recall"]["std"] < 0.1 and out["recall"]["low"] <= out["recall"]["high"]


def test_bootstrap_is_seeded_and_checks_k():
    x = np.random.default_rng(3).standard_normal((50, 2))
    fns = {"fid": frechet_fn(x, np.zeros(2), np.eye(2))}
    assert bootstrap(fns, 50, 5, seed=7) == bootstrap(fns, 50, 5, seed=7)
    assert bootstrap(fns, 50, 5, seed=7)["fid"] != bootstrap(fns, 50, 5, seed=8)["fid"]
    for bad in (1, -2, 2.5, True):
        with pytest.raises(ValueError, match="bootstrap must be 0"):
            check_bootstrap(bad)
    with pytest.raises(ValueError, match="bootstrap must be 0"):
        ev.EvaluationSettings(bootstrap=1)
    with pytest.raises(ValueError, match="not for fd_dinov2 alone"):
        ev.EvaluationSettings(bootstrap=10, metrics="fd_dinov2")
    assert ev.build_parser().parse_args(["r.npz", "s.npz", "--bootstrap", "50"]).bootstrap == 50


class TinyFeatures:
    """A stand-in feature network (fixed random projections of the pixels, small dimensions) so that the bootstrap
    through evaluate() costs milliseconds: pool 6-d, spatial 5-d, 10 logits."""

    id = "tiny-test-features"
    marker = RANDOM_WEIGHTS_MARK
    random_weights = True
    weights_path = None
    device = torch.device("cpu")

    def __init__(self, pixels):
        rng = np.random.default_rng(0)
        self.proj = {k: rng.standard_normal((pixels, dim)) / pixels for k, dim in
                     (("pool", 6), ("spatial", 5), ("logits", 10))}

    def __call__(self, batch):
        flat = np.asarray(batch, dtype=np.float64).reshape(len(batch), -1) / 255.0
        return {k: (flat @ p).astype(np.float32) for k, p in self.proj.items()}


def _npz(path, seed, n=60, size=4):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


def test_evaluate_writes_the_bootstrap_interval(tmp_path):
    ref, sample = _npz(tmp_path / "ref.npz", 0), _npz(tmp_path / "sample.npz", 1)
    kwargs = dict(extractor=TinyFeatures(4 * 4 * 3), cache_dir=None, progress=False, split_size=60,
                  pr_precision="float32")
    result = ev.evaluate(ref, sample, json_path=str(tmp_path / "eval.json"), bootstrap=20, bootstrap_seed=4,
                         **kwargs)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        interval = on_disk["bootstrap"][key]
        assert interval["std"] > 0 and interval["low"] <= interval["high"], key
    assert (on_disk["bootstrap"]["k"], on_disk["bootstrap"]["seed"]) == (20, 4)
    assert "bootstrap" not in on_disk["marks"]
    plain = ev.evaluate(ref, sample, **kwargs)
    assert "bootstrap" not in plain
    assert {k: plain[k] for k in ev.METRIC_KEYS} == {k: result[k] for k in ev.METRIC_KEYS}  # the point values
    lines = ev.format_bootstrap_lines(result)
    assert len(lines) == 5 and lines[1].startswith("bootstrap (20 resamples, seed 4") and "FID: \u00b1 " in lines[1]
    assert ev.format_bootstrap_lines(plain) == []
