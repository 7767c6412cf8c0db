"""Feature extraction, statistics, caching and the evaluator CLI, on a randomly initialised Inception (CPU).

Each image costs about 0.5 s through the 299 x 299 network on two CPU cores, so the batches here are tiny.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from evaluations import evaluator as ev
from evaluations.features import (
    RANDOM_WEIGHTS_MARK,
    SPATIAL_DIM,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    InceptionFeatures,
    MissingInceptionWeights,
)
from evaluations.metrics import inception_score, precision_recall
from evaluations.reference import (
    FeatureUse,
    NpzImages,
    extract_features,
    fid_statistics,
    image_features,
    read_npz_statistics,
    shard_bounds,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_features(path, extractor, **options):
    """Inception's outputs and statistics of one npz: ``image_features`` of that one network."""
    return image_features(NpzImages(path), [FeatureUse.inception(extractor)], **options)[0]


def image_batch_statistics(path, features):
    return fid_statistics(read_npz_statistics(path), features, path)


def random_extractor(torch_home):
    """A random-weights network even where the real weights sit in torch hub's cache (an empty TORCH_HOME)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        return InceptionFeatures(allow_random_weights=True, device="cpu")


@pytest.fixture(scope="module")
def empty_torch_home(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="module")
def extractor(empty_torch_home):
    return random_extractor(empty_torch_home)


def images(seed, n, size=32):
    rng = np.random.default_rng(seed)
    # Smooth-ish images (random low-resolution pattern, upsampled) so features differ between images.
    low = rng.integers(0, 256, (n, 4, 4, 3))
    return np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2).astype(np.uint8)


N_IMAGES = 5  # precision/recall with k = 3 need more than 3


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    ref, sample = d / "ref.npz", d / "sample.npz"
    np.savez(ref, images(0, N_IMAGES))
    np.savez_compressed(sample, images(1, N_IMAGES), np.arange(N_IMAGES))  # arr_1: labels, ignored
    return ref, sample


@pytest.fixture(scope="module")
def small_feats(extractor, small_npz):
    """Features of both files, each in one batch straight through the extractor (no npz streaming)."""
    return tuple(extractor(np.load(path)["arr_0"]) for path in small_npz)


# ---------------------------------------------------------------------------------------------------------------
# features


def test_feature_layout_against_independent_forward(extractor, small_npz, small_feats):
    x = np.load(small_npz[0])["arr_0"][:2]
    out = {k: v[:2] for k, v in small_feats[0].items()}
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, SPATIAL_DIM) == (2, 17 * 17 * 7)

    # Independent computation on the same network: walk the layers by hand up to Mixed_6d's 1x1 branch.
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    m = extractor.model
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        t = interpolate_bilinear_2d_like_tensorflow1x(t, size=(299, 299), align_corners=False)
        t = (t - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            t = getattr(m, name)(t)
        b = m.Mixed_6d.branch1x1
        branch = torch.relu(b.bn(b.conv(t))).numpy()  # N x 192 x 17 x 17, after BN + ReLU
    assert branch.shape == (2, 192, 17, 17)
    expected = np.transpose(branch[:, :7], (0, 2, 3, 1)).reshape(2, -1)  # H, W, C order
    np.testing.assert_allclose(out["spatial"], expected, rtol=1e-5, atol=1e-6)
    # Element-wise spelling of the layout: index (h * 17 + w) * 7 + c holds channel c at (h, w).
    for n, c, h, w in ((0, 0, 0, 0), (1, 6, 16, 16), (0, 3, 5, 11), (1, 2, 9, 0)):
        assert out["spatial"][n, (h * 17 + w) * 7 + c] == pytest.approx(branch[n, c, h, w], rel=1e-5, abs=1e-6)
    assert np.abs(out["spatial"]).max() > 0 and np.std(out["spatial"], axis=0).max() > 0
    t = m.Mixed_7c(m.Mixed_7b(m.Mixed_7a(m.Mixed_6e(m.Mixed_6d(t)))))
    np.testing.assert_allclose(out["pool"], t.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    # IS logits carry no bias: pool_3 times the logits weight.
    np.testing.assert_allclose(out["logits"], out["pool"] @ m.fc.weight.numpy().T, rtol=1e-4, atol=1e-5)
    assert np.abs(m.fc.bias.numpy()).max() > 0


def test_random_weights_are_seeded_and_marked(extractor, empty_torch_home):
    other = random_extractor(empty_torch_home)
    assert other.random_weights and RANDOM_WEIGHTS_MARK in other.id
    for (k, a), b in zip(extractor.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    missing = str(tmp_path / "nowhere.pth")
    for kwargs in ({}, {"weights_path": missing}, {"weights_path": missing, "allow_random_weights": True}):
        with pytest.raises(MissingInceptionWeights) as info:
            InceptionFeatures(device="cpu", **kwargs)
        msg = str(info.value)
        assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg and "make download-inception" in msg
    assert "v0.2.0" in WEIGHTS_URL


def test_weights_file_is_loaded(extractor, small_npz, small_feats, tmp_path):
    path = tmp_path / WEIGHTS_FILENAME
    torch.save(extractor.model.state_dict(), path)
    loaded = InceptionFeatures(weights_path=str(path), device="cpu")
    assert not loaded.random_weights and loaded.weights_path == str(path)
    assert loaded.id.startswith("inception-v3-compat:sha256=") and RANDOM_WEIGHTS_MARK not in loaded.id
    x = np.load(small_npz[0])["arr_0"][:1]
    np.testing.assert_allclose(loaded(x)["pool"], small_feats[0]["pool"][:1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# npz reading, statistics, caching, sharding


def test_npz_streaming_reads_all_layouts(tmp_path):
    x = images(4, 7, size=8)
    plain, packed, fortran = tmp_path / "p.npz", tmp_path / "c.npz", tmp_path / "f.npz"
    np.savez(plain, x)
    np.savez_compressed(packed, x)
    np.savez(fortran, np.asfortranarray(x))
    for path in (plain, packed, fortran):
        reader = NpzImages(path)
        assert reader.num_images == 7 and reader.shape == (7, 8, 8, 3)
        np.testing.assert_array_equal(np.concatenate(list(reader.iter_batches(3))), x)
        np.testing.assert_array_equal(np.concatenate(list(reader.iter_batches(2, start=3, stop=6))), x[3:6])


def test_npz_with_an_npy_version_numpy_does_not_write_is_refused_by_name(tmp_path):
    buf = io.BytesIO()
    np.save(buf, images(4, 2, size=8))
    data = bytearray(buf.getvalue())
    data[6] = 9  # the .npy format's major version byte
    path = tmp_path / "v9.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", bytes(data))
    with pytest.raises(ValueError, match=r"unsupported \.npy format version \(9, 0\)"):
        NpzImages(path)


def test_every_evaluator_flag_reaches_evaluate_under_its_own_name():
    flags = set(vars(ev.build_parser().parse_args(["ref.npz", "sample.npz"])))
    assert flags - set(ev.EVALUATION_OPTIONS) == {"ref_batch", "sample_batch", "json", "no_cache", "no_progress"}


def test_the_evaluator_cache_and_the_hash_memo_live_under_xdg_cache_home(tmp_path, monkeypatch):
    from adm_common.files import user_cache_dir
    from evaluations.reference import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "pag_adm" / "eval")
    assert user_cache_dir("sha256") == str(tmp_path / "pag_adm" / "sha256")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "pag_adm", "eval")


def test_statistics_from_npz_and_from_images(extractor, small_npz, small_feats, tmp_path):
    ref, _ = small_npz
    feats = batch_features(ref, extractor, batch_size=3)  # two batches: 3 + 2
    direct = small_feats[0]  # one batch, independent of the npz streaming
    np.testing.assert_allclose(feats["pool"], direct["pool"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["mu"], direct["pool"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["sigma"], np.cov(direct["pool"], rowvar=False), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(feats["mu_s"], direct["spatial"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["sigma_s"], np.cov(direct["spatial"], rowvar=False), rtol=1e-4, atol=1e-7)

    stats, source = image_batch_statistics(ref, feats)
    assert source == "images"
    # A reference npz that carries statistics: those are used (as upstream), not the images'.
    with_stats = tmp_path / "with_stats.npz"
    stored = {"mu": feats["mu"] + 1.0, "sigma": feats["sigma"] * 2.0, "mu_s": feats["mu_s"] - 1.0,
              "sigma_s": feats["sigma_s"] * 3.0}
    np.savez(with_stats, np.load(ref)["arr_0"], **stored)
    stats2, source2 = image_batch_statistics(with_stats, feats)
    assert source2 == "npz"
    for key, value in stored.items():
        np.testing.assert_array_equal(stats2[key], value)
    # Saving the images' own statistics round-trips.
    np.savez(with_stats, np.load(ref)["arr_0"], **{k: stats[k] for k in stored})
    stats3, _ = image_batch_statistics(with_stats, feats)
    for key in stored:
        np.testing.assert_array_equal(stats3[key], stats[key])


def test_cache_second_call_does_not_extract(extractor, tmp_path):
    ref = tmp_path / "three.npz"
    np.savez(ref, images(7, 3))
    cache = tmp_path / "cache"
    calls = extractor.num_calls
    first = batch_features(ref, extractor, batch_size=8, cache_dir=cache)
    assert extractor.num_calls == calls + 1 and not first["from_cache"]
    second = batch_features(ref, extractor, batch_size=8, cache_dir=cache)
    assert extractor.num_calls == calls + 1 and second["from_cache"]
    for key in ("pool", "logits", "mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(first[key], second[key])
    assert second["sha256"] == first["sha256"] and len(second["sha256"]) == 64
    # A copy of the file elsewhere has the same content: still a hit (keyed by content, not path).
    copy = tmp_path / "copy.npz"
    copy.write_bytes(ref.read_bytes())
    assert batch_features(copy, extractor, batch_size=8, cache_dir=cache)["from_cache"]
    assert extractor.num_calls == calls + 1
    # Different content: extracted again.
    changed = tmp_path / "changed.npz"
    np.savez(changed, images(9, 2))
    assert not batch_features(changed, extractor, batch_size=8, cache_dir=cache)["from_cache"]
    assert extractor.num_calls == calls + 2
    entries = sorted(p.name for p in cache.glob("*.npz"))
    assert len(entries) == 2
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


class FakeDist:
    """Rank ``rank`` of ``world``; ``others`` are the other ranks' results that rank 0's gather returns."""

    def __init__(self, rank, world, others=None):
        self.rank, self.world_size, self.others, self.sent = rank, world, others or {}, None

    def gather(self, obj):
        self.sent = obj
        if self.rank:
            return None
        return [obj] + [self.others[r] for r in range(1, self.world_size)]

    def bcast(self, obj):
        return obj


def test_distributed_extraction_slices_and_gathers(extractor, small_npz, small_feats):
    path, whole = small_npz[0], small_feats[0]
    world = 3  # 5 images: slices of 2, 2, 1
    others = {}
    for rank in range(1, world):
        dist = FakeDist(rank, world)
        assert extract_features(path, extractor, batch_size=2, dist=dist) is None
        start, stop = shard_bounds(N_IMAGES, rank, world)
        assert dist.sent["pool"].shape[0] == stop - start
        np.testing.assert_allclose(dist.sent["pool"], whole["pool"][start:stop], rtol=1e-5, atol=1e-6)
        others[rank] = dist.sent
    gathered = extract_features(path, extractor, batch_size=2, dist=FakeDist(0, world, others))
    for key in ("pool", "logits", "spatial"):
        np.testing.assert_allclose(gathered[key], whole[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def bad_files(tmp_path):
    good = images(6, 5)
    cases = {}

    def save(name, **arrays):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        cases[name] = path

    save("no_arr_0", images=good)
    save("float_images", arr_0=good.astype(np.float32) / 255.0)
    save("out_of_range", arr_0=good.astype(np.int16) + 200)
    save("four_channels", arr_0=np.concatenate([good, good[..., :1]], axis=-1))
    save("channels_first", arr_0=np.transpose(good, (0, 3, 1, 2)))
    save("too_few", arr_0=good[:3])
    nan_sigma = np.eye(2048)
    nan_sigma[3, 3] = np.nan
    save("nan_stats", arr_0=good, mu=np.zeros(2048), sigma=nan_sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    save("wrong_dims", arr_0=good, mu=np.zeros(10), sigma=np.eye(10), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    save("partial_stats", arr_0=good, mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "not_a_zip.npz").write_bytes(b"hello")
    cases["not_a_zip"] = tmp_path / "not_a_zip.npz"
    return cases


BAD_MESSAGES = {
    "no_arr_0": "no 'arr_0'",
    "float_images": "uint8",
    "out_of_range": "out of range",
    "four_channels": "3 channels",
    "channels_first": "N x C x H x W",
    "too_few": "more than 3 images",
    "nan_stats": "NaN",
    "wrong_dims": "do not match",
    "partial_stats": "mu_s",
    "not_a_zip": "not an npz",
}


def test_bad_inputs_raise_clear_errors_and_write_nothing(extractor, small_npz, tmp_path):
    ref, sample = small_npz
    calls = extractor.num_calls
    out_dir = tmp_path / "out"
    for name, path in bad_files(tmp_path).items():
        json_path = out_dir / f"{name}.json"
        # Out-of-range values show only while streaming: that file goes first so nothing else is extracted.
        orders = ((path, sample),) if name == "out_of_range" else ((ref, path), (path, sample))
        for args in orders:
            with pytest.raises(ValueError, match=BAD_MESSAGES[name]):
                ev.evaluate(*args, extractor=extractor, cache_dir=None, progress=False, json_path=json_path)
        assert not json_path.exists()
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert extractor.num_calls == calls  # all rejected before running the network


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    path = tmp_path / "no_arr_0.npz"
    np.savez(path, images=images(0, 4))
    json_path = tmp_path / "r.json"
    code = ev.main([str(path), str(path), "--allow-random-weights", "--json", str(json_path), "--no-cache"])
    assert code == 2
    assert "no 'arr_0'" in capsys.readouterr().err
    assert not json_path.exists()


# ---------------------------------------------------------------------------------------------------------------
# end to end


def fid_low_rank(x1, x2):
    """FID of two small feature sets without any matrix square root: with S_i = A_i^T A_i (A_i the centred
    features over sqrt(N_i - 1)), the nonzero eigenvalues of S1 S2 are those of (A1 A2^T)(A1 A2^T)^T, so
    Tr sqrt(S1 S2) is the sum of the singular values of A1 A2^T."""
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.sum(a1 ** 2) + np.sum(a2 ** 2) - 2 * nuclear)


def test_cli_end_to_end_with_random_weights(small_npz, small_feats, empty_torch_home, tmp_path):
    ref, sample = small_npz
    json_path = tmp_path / "results" / "eval.json"
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluations", "evaluator.py"), str(ref), str(sample),
         "--allow-random-weights", "--json", str(json_path), "--cache-dir", str(cache), "--batch-size", "8",
         "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=dict(os.environ, TORCH_HOME=str(empty_torch_home)),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("WARNING: RANDOM-WEIGHTS")
    labels = ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert [ln.split(":")[0] for ln in lines[1:]] == labels
    assert all(ln.endswith(f"[{RANDOM_WEIGHTS_MARK}]") for ln in lines[1:])
    printed = {label: float(ln.split(":")[1].split()[0]) for label, ln in zip(labels, lines[1:])}

    result = json.loads(json_path.read_text())
    assert result["random_weights"] is True and result["marker"] == RANDOM_WEIGHTS_MARK
    assert [result[k] for k in ev.METRIC_KEYS] == [printed[label] for label in labels]
    for key, path, n in (("ref", ref, N_IMAGES), ("sample", sample, N_IMAGES)):
        assert result[key]["path"] == str(path)
        assert result[key]["bytes"] == os.path.getsize(path)
        assert result[key]["num_images"] == n and result[key]["image_shape"] == [32, 32, 3]
        assert result[key]["statistics_from"] == "images"
    assert [p.name for p in json_path.parent.iterdir()] == ["eval.json"]  # no temp file left
    assert len(list(cache.glob("*.npz"))) == 1  # the reference only

    # Independent recomputation from features extracted here (same seeded network, same single batch).
    r, s = small_feats
    with pytest.warns(UserWarning):
        assert result["inception_score"] == pytest.approx(inception_score(s["logits"]), rel=1e-5)
    assert (result["precision"], result["recall"]) == precision_recall(r["pool"], s["pool"])
    for key, feat in (("fid", "pool"), ("sfid", "spatial")):
        assert result[key] == pytest.approx(fid_low_rank(s[feat], r[feat]), rel=1e-5, abs=1e-6)
    assert result["fid"] > 0 and result["sfid"] > 0
