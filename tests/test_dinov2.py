"""FD_DINOv2: the DINOv2 extractor (EDM2's preprocessing, Meta's checkpoint layout), its statistics cache, the
evaluator's --metrics selection and the table's FD_DINOv2 column. No network, no real weights.

FD_DINOv2 proper uses ViT-L/14 (about 1.7 s per image on two CPU cores); these tests use timm's ViT-S/14 DINOv2
variant (``model_name="vit_small_patch14_dinov2"``, same code path, 384-d features) to stay fast.
"""

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from evaluations import dinov2
from evaluations import evaluator as ev
from evaluations.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    DINOv2Features,
    MissingDINOv2Weights,
)
from evaluations.features import RANDOM_WEIGHTS_MARK
from evaluations.table import make_table

SMALL = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def empty_torch_home(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(scope="module")
def small(empty_torch_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(empty_torch_home))
        return DINOv2Features(allow_random_weights=True, device="cpu", model_name=SMALL)


def images(seed, n, size=32):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3))
    return np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2).astype(np.uint8)


def fd_low_rank(x1, x2):
    """Fréchet distance of two small feature sets in closed form: with S_i = A_i^T A_i (A_i the centred features
    over sqrt(N_i - 1)), Tr sqrt(S1 S2) is the nuclear norm of A1 A2^T."""
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.sum(a1 ** 2) + np.sum(a2 ** 2) - 2 * nuclear)


# ---------------------------------------------------------------------------------------------------------------
# extractor


def test_preprocessing_is_edm2s(small):
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    # At 224 x 224 the antialiased bicubic resize is the identity: only the normalisation remains.
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    expected = (np.transpose(x, (0, 3, 1, 2)) / 255.0 - mean) / std
    np.testing.assert_allclose(small.preprocess(x).numpy(), expected, rtol=0, atol=1e-5)
    # A constant image stays constant through the resize (any size, up or down).
    for size in (32, 300):
        flat = np.full((1, size, size, 3), (10, 128, 250), np.uint8)
        out = small.preprocess(flat).numpy()
        assert out.shape == (1, 3, 224, 224)
        want = (np.array([10, 128, 250]).reshape(1, 3, 1, 1) / 255.0 - mean) / std
        np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), rtol=0, atol=1e-4)
    # Not a plain bilinear resize: EDM2's is bicubic with antialiasing.
    x = images(3, 1, size=64)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    bicubic = F.interpolate(t, size=(224, 224), mode="bicubic", antialias=True)
    bilinear = F.interpolate(t, size=(224, 224), mode="bilinear", antialias=True)
    got = small.preprocess(x).numpy()
    np.testing.assert_allclose(got, ((bicubic.numpy() / 255.0) - mean) / std, rtol=0, atol=1e-5)
    assert np.abs(got - ((bilinear.numpy() / 255.0) - mean) / std).max() > 1e-2


def test_random_weights_are_seeded_marked_and_informative(small, empty_torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(empty_torch_home))
    other = DINOv2Features(allow_random_weights=True, device="cpu", model_name=SMALL)
    assert other.random_weights and other.marker == RANDOM_WEIGHTS_MARK and RANDOM_WEIGHTS_MARK in other.id
    assert SMALL in other.id
    x = images(0, 4)
    feats = small(x)
    assert feats.shape == (4, 384) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, other(x))
    assert np.std(feats, axis=0).mean() > 1e-2  # images' features differ (layer scales at 1, not 1e-5)


def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert dinov2.WEIGHTS.default_path() == str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME)
    missing = str(tmp_path / "nowhere.pth")
    for kwargs in ({}, {"weights_path": missing}, {"weights_path": missing, "allow_random_weights": True}):
        with pytest.raises(MissingDINOv2Weights) as info:
            DINOv2Features(device="cpu", model_name=SMALL, **kwargs)
        msg = str(info.value)
        assert WEIGHTS_FILENAME in msg and WEIGHTS_URL in msg and "make download-dinov2" in msg
    assert WEIGHTS_URL == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"


def meta_checkpoint(path, seed=0):
    """A checkpoint in the layout of Meta's dinov2_vits14_pretrain.pth: position embedding for 518 x 518 (37 x 37
    patches), a mask token, layer scales; random values."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(SMALL, pretrained=False, img_size=518, num_classes=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in state:
        if key.endswith(".gamma"):
            state[key] = 0.5 + torch.rand_like(state[key])
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    state["cls_token"] = torch.randn_like(state["cls_token"])
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(state, path)
    return state


def reference_forward(state, x, num_heads=6, patch=14):
    """DINOv2's forward (``DinoVisionTransformer.forward`` with the hub's defaults) written out from the
    checkpoint, in float64: position embedding interpolated at forward time (bicubic, scale (16 + 0.1) / 37,
    no antialiasing), pre-norm blocks with layer scale, final LayerNorm, class token."""
    w = {k: v.double() for k, v in state.items()}
    t = F.conv2d(x.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    grid = t.shape[-1]
    t = t.flatten(2).transpose(1, 2)
    n, dim = t.shape[0], t.shape[-1]
    t = torch.cat([w["cls_token"].expand(n, -1, -1), t], dim=1)
    side = 37
    patches = w["pos_embed"][:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
    t = t + torch.cat([w["pos_embed"][:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"])
        qkv = qkv.reshape(n, -1, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // num_heads) ** -0.5, qkv[1], qkv[2]
        h = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(n, -1, dim)
        t = t + F.linear(h, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"]) * w[b + "ls1.gamma"]
        h = F.layer_norm(t, (dim,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"])), w[b + "mlp.fc2.weight"],
                     w[b + "mlp.fc2.bias"])
        t = t + h * w[b + "ls2.gamma"]
    return F.layer_norm(t, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)[:, 0]


def test_meta_checkpoint_gives_the_hub_models_features(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    state = meta_checkpoint(path)
    ex = DINOv2Features(weights_path=str(path), device="cpu", model_name=SMALL)
    assert not ex.random_weights and ex.marker is None and ex.weights_path == str(path)
    assert ex.id.startswith(f"dinov2-vitl14:{SMALL}:sha256=") and RANDOM_WEIGHTS_MARK not in ex.id
    x = images(5, 2, size=48)
    got = ex(x)
    expected = reference_forward(state, ex.preprocess(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The hub's position-embedding interpolation is not timm's default resampling (size-based, antialiased).
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), num_prefix_tokens=1)
    assert (timm_way - ex.model.pos_embed.detach()).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# evaluator


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    ref, sample = d / "ref.npz", d / "sample.npz"
    np.savez(ref, images(10, 6))
    np.savez(sample, images(11, 5))
    return ref, sample


def test_fd_dinov2_end_to_end_equals_closed_form(small, npz_pair, tmp_path):
    ref, sample = npz_pair
    cache = tmp_path / "cache"
    json_path = tmp_path / "eval.json"
    calls = small.num_calls
    result = ev.evaluate(ref, sample, metrics="fd_dinov2", dinov2_extractor=small, cache_dir=str(cache),
                         batch_size=4, progress=False, json_path=str(json_path))
    assert small.num_calls == calls + 4  # 6 + 5 images in batches of 4; Inception never ran
    expected = fd_low_rank(small(np.load(sample)["arr_0"]), small(np.load(ref)["arr_0"]))
    assert result["fd_dinov2"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    for key in ev.METRIC_KEYS:
        assert key not in result
    assert result["metrics"] == ["fd_dinov2"] and "pr_precision" not in result
    assert result["random_weights"] is True and result["marker"] == RANDOM_WEIGHTS_MARK
    assert result["dinov2"]["random_weights"] is True and result["dinov2"]["model"] == SMALL
    assert result["extractor"] is None and result["ref"]["sha256"] and not result["ref"]["dinov2_statistics_from_cache"]
    assert json.loads(json_path.read_text())["fd_dinov2"] == result["fd_dinov2"]
    assert ev.format_lines(result) == [f"FD_DINOv2: {result['fd_dinov2']!r}  [{RANDOM_WEIGHTS_MARK}]"]

    # The reference's statistics come from the cache the second time; the samples' are not cached.
    calls = small.num_calls
    again = ev.evaluate(ref, sample, metrics=["fd_dinov2"], dinov2_extractor=small, cache_dir=str(cache),
                        batch_size=8, progress=False)
    assert small.num_calls == calls + 1
    assert again["ref"]["dinov2_statistics_from_cache"] and not again["sample"]["dinov2_statistics_from_cache"]
    assert again["fd_dinov2"] == pytest.approx(result["fd_dinov2"], rel=1e-6)
    assert len(list(cache.glob("*.npz"))) == 1


def test_cli_metrics_selection(npz_pair, empty_torch_home, tmp_path, monkeypatch, capsys):
    ref, sample = npz_pair
    monkeypatch.setenv("TORCH_HOME", str(empty_torch_home))
    # The CLI builds ViT-L/14; the small variant keeps this test fast (same code path).
    monkeypatch.setattr(dinov2, "DINOv2Features", functools.partial(DINOv2Features, model_name=SMALL))
    json_path = tmp_path / "r.json"
    code = ev.main([str(ref), str(sample), "--metrics", "fd_dinov2", "--allow-random-weights", "--no-cache",
                    "--device", "cpu", "--no-progress", "--json", str(json_path)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"WARNING: {RANDOM_WEIGHTS_MARK}") and "DINOv2" in lines[0]
    assert lines[1].startswith("FD_DINOv2: ") and lines[1].endswith(f"[{RANDOM_WEIGHTS_MARK}]") and len(lines) == 2
    result = json.loads(json_path.read_text())
    assert float(lines[1].split()[1]) == result["fd_dinov2"]

    # Without random weights allowed, the missing checkpoint is an error naming how to get it.
    code = ev.main([str(ref), str(sample), "--metrics", "fd_dinov2", "--no-cache", "--device", "cpu"])
    assert code == 2 and "make download-dinov2" in capsys.readouterr().err
    code = ev.main([str(ref), str(sample), "--metrics", "fid,bogus", "--no-cache"])
    assert code == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse choices
        ev.build_parser().parse_args([str(ref), str(sample), "--pr-precision", "float64"])


def test_parse_metrics():
    assert ev.parse_metrics(None) == ("fid", "sfid", "is", "pr") == ev.DEFAULT_METRICS
    assert ev.parse_metrics("pr, FID") == ("fid", "pr")
    assert ev.parse_metrics(["fd_dinov2", "is"]) == ("is", "fd_dinov2")
    assert ev.build_parser().parse_args(["a", "b"]).metrics == "fid,sfid,is,pr"
    assert ev.build_parser().parse_args(["a", "b"]).pr_precision == "float16"
    for bad in ("", "fid,kid"):
        with pytest.raises(ValueError):
            ev.parse_metrics(bad)


def test_format_lines_five_upstream_lines_unchanged_without_fd_dinov2():
    result = {"inception_score": 200.0, "fid": 3.5, "sfid": 6.25, "precision": 0.8265, "recall": 0.5309,
              "marks": {k: None for k in ev.METRIC_KEYS}, "random_weights": False}
    assert ev.format_lines(result) == ["Inception Score: 200.0", "FID: 3.5", "sFID: 6.25", "Precision: 0.8265",
                                       "Recall: 0.5309"]
    # FD_DINOv2 after the five, with its own network's mark.
    result.update(fd_dinov2=120.5, random_weights=True, marker=RANDOM_WEIGHTS_MARK)
    result["marks"]["fd_dinov2"] = RANDOM_WEIGHTS_MARK
    lines = ev.format_lines(result)
    assert lines[:5] == ["Inception Score: 200.0", "FID: 3.5", "sFID: 6.25", "Precision: 0.8265", "Recall: 0.5309"]
    assert lines[5] == f"FD_DINOv2: 120.5  [{RANDOM_WEIGHTS_MARK}]"


# ---------------------------------------------------------------------------------------------------------------
# table


def test_table_fd_dinov2_column_and_pr_float32_mark(tmp_path):
    root = tmp_path / "exp"
    base = {"format": ev.RESULT_FORMAT, "inception_score": 50.0, "fid": 10.0, "sfid": 5.0, "precision": 0.7,
            "recall": 0.6, "sample": {"num_images": 100}}
    for name, scale, extra in (("a", 1.0, {"fd_dinov2": 250.125, "pr_precision": "float16"}),
                               ("b", 2.0, {"fd_dinov2": 200.5, "pr_precision": "float32"}),
                               ("c", 3.0, {"metrics": ["fd_dinov2"], "fd_dinov2": 150.0})):
        run = root / name
        run.mkdir(parents=True)
        result = dict(base, **extra)
        if name == "c":
            result = {k: v for k, v in result.items() if k not in ev.METRIC_KEYS}
        (run / "eval.json").write_text(json.dumps(result))
        (run / "config.yaml").write_text(yaml.safe_dump({"pag_scale": scale}))
    out = tmp_path / "out"
    tables = make_table([root], out, anchors=[{"label": "paper", "FD_DINOv2": 99.0, "FID": 2.0}])
    md = (out / "exp.md").read_text().splitlines()
    assert md[2] == "| run | pag_scale | FID | sFID | IS | Precision | Recall | FD_DINOv2 | N | source |"
    assert md[4] == "| a | 1 | 10.00 | 5.00 | 50.00 | 0.700 | 0.600 | 250.12 | 100 | ours |"
    assert md[5] == "| b | 2 | 10.00 | 5.00 | 50.00 | 0.700 | 0.600 | 200.50 | 100 | ours [PR-FLOAT32] |"
    assert md[6] == "| c | 3 | - | - | - | - | - | 150.00 | 100 | ours |"
    assert md[7] == "| paper | - | 2.00 | - | - | - | - | 99.00 | - | published |"
    assert any(ln.startswith("*PR-FLOAT32: precision and recall of rows so marked") for ln in md)
    assert "FD\\_DINOv2" in (out / "exp.tex").read_text()
    assert (out / "exp_fid_is.png").stat().st_size > 5000 and (out / "exp_pr.png").exists()
    assert [r["fd_dinov2"] for r in tables["exp"]["rows"]] == [250.125, 200.5, 150.0, 99.0]
