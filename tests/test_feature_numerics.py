"""The evaluator's feature numerics: every extractor runs in full float32 with TF32 off (``full_float32``, restored
afterwards, also after an exception), and the feature cache is keyed by device type and precision, so features
computed on one device type are never read back on another."""

import hashlib

import numpy as np
import pytest
import torch

from evaluations.dinov2 import DINOv2Features
from evaluations.features import FEATURE_PRECISION, InceptionFeatures, feature_numerics, full_float32
from evaluations.reference import FeatureCache, FeatureUse, NpzImages, extract_features, image_features


def batch_features(path, extractor, **options):
    """Inception's outputs and statistics of one npz: ``image_features`` of that one network."""
    return image_features(NpzImages(path), [FeatureUse.inception(extractor)], **options)[0]


def dinov2_statistics(path, extractor, **options):
    """The statistics of one network returning one array (DINOv2): ``image_features`` of that one network."""
    return image_features(NpzImages(path), [FeatureUse(extractor)], **options)[0]


NEW_API = hasattr(torch._C, "_get_fp32_precision_getter")  # torch >= 2.9: per-backend fp32_precision
NODES = (("generic", "all"), ("cuda", "all"), ("mkldnn", "all"), ("cuda", "matmul"), ("cuda", "conv"),
         ("cuda", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
OPERATORS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
# What the flags read inside full_float32(), whatever they were outside.
FULL_FLOAT32 = dict({"cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False, "float32_matmul_precision": "highest",
                     "cuda.matmul.allow_fp16_reduced_precision_reduction": False},
                    **({name: "ieee" for name in OPERATORS} if NEW_API else {}))


def _read(fn):
    try:
        return fn()
    except RuntimeError:  # a legacy flag read after the new API set an inconsistent state
        return "unreadable"


def _operator_precision(name):
    module = torch.backends
    for part in name.split("."):
        module = getattr(module, part)
    return module.fp32_precision


def tf32_state():
    """Every TF32 setting through torch's public interfaces (legacy flags and, where present, the new per-operator
    ``fp32_precision``)."""
    state = {"cudnn.allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
             "cuda.matmul.allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
             "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
             "cuda.matmul.allow_fp16_reduced_precision_reduction":
                 torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction}
    if NEW_API:
        state.update({name: _operator_precision(name) for name in OPERATORS})
    return state


@pytest.fixture(autouse=True)
def restore_tf32_settings():
    """The tests change the process's TF32 settings: put torch's values back afterwards, whatever happens."""
    nodes = {node: torch._C._get_fp32_precision_getter(*node) for node in NODES} if NEW_API else {}
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    fp16_reduction = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = fp16_reduction
    for node, value in nodes.items():
        torch._C._set_fp32_precision_setter(*node, value)


def tf32_on():
    """The fast settings a user may have chosen: TF32 for cuDNN (torch's default) and for matmuls."""
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


class TinyFeatureNet(torch.nn.Module):
    """A custom feature network whose forward records the TF32 settings it ran under."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 6)
        self.seen = []
        self.fail_on_call = None

    def forward(self, x):
        self.seen.append(tf32_state())
        if self.fail_on_call == len(self.seen):
            raise RuntimeError("feature net failed")
        h = self.conv(x).mean(dim=(2, 3))
        return h, self.fc(h)


class TinyExtractor:
    """The custom-extractor interface (``evaluations.features.load_extractor``) around ``TinyFeatureNet``."""

    random_weights = False
    marker = None
    weights_path = None

    def __init__(self, device="cpu", name="tiny"):
        self.device = torch.device(device)  # only the key sees it: the net computes on the CPU
        self.id = f"test-{name}"
        self.net = TinyFeatureNet()
        self.num_calls = 0

    @torch.no_grad()
    def __call__(self, images):
        self.num_calls += 1
        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255
        pool, logits = self.net(x)
        return {"pool": pool.numpy(), "logits": logits.numpy(), "spatial": x.mean(dim=1).flatten(1)[:, :5].numpy()}


def images(seed, n, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def batch(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, images(0, 5))
    return path


# ------------------------------------------------------------------------------------------ TF32 off, restored


def test_extraction_runs_without_tf32_and_restores_the_settings(batch):
    tf32_on()
    before = tf32_state()
    assert before["cudnn.allow_tf32"] is True and before["float32_matmul_precision"] == "high"
    extractor = TinyExtractor()
    feats = extract_features(batch, extractor, batch_size=2)
    assert feats["pool"].shape == (5, 4) and extractor.num_calls == 3
    assert extractor.net.seen == [FULL_FLOAT32] * 3  # every batch
    assert tf32_state() == before


def test_settings_are_restored_after_an_exception(batch):
    tf32_on()
    before = tf32_state()
    extractor = TinyExtractor()
    extractor.net.fail_on_call = 2
    with pytest.raises(RuntimeError, match="feature net failed"):
        extract_features(batch, extractor, batch_size=2)
    assert extractor.net.seen == [FULL_FLOAT32] * 2
    assert tf32_state() == before
    with pytest.raises(ValueError):
        with full_float32():
            raise ValueError("inside")
    assert tf32_state() == before


def test_the_default_settings_are_restored_exactly():
    before = tf32_state()
    with full_float32():
        assert tf32_state() == FULL_FLOAT32
        with full_float32():  # nested: the inner exit leaves the outer's settings
            pass
        assert tf32_state() == FULL_FLOAT32
    assert tf32_state() == before


@pytest.mark.skipif(not NEW_API, reason="torch without the per-backend fp32_precision interface")
def test_settings_made_through_the_new_interface_are_restored():
    """A user on torch's new interface only (TF32 for everything): inside, every operator is "ieee" and the legacy
    flags read consistently; afterwards every per-backend value is back (the legacy getters refuse to read such a
    state, before as after)."""
    torch.backends.fp32_precision = "tf32"
    nodes = {node: torch._C._get_fp32_precision_getter(*node) for node in NODES}
    before = tf32_state()
    with full_float32():
        assert tf32_state() == FULL_FLOAT32 and torch.backends.fp32_precision == "tf32"
    assert {node: torch._C._get_fp32_precision_getter(*node) for node in NODES} == nodes
    assert tf32_state() == before


@pytest.mark.parametrize("kind", ["inception", "dinov2"])
def test_inception_and_dinov2_run_without_tf32(kind, batch, tmp_path, monkeypatch):
    """The networks the evaluator ships go through the same context: a forward pre-hook on each records the
    settings its forward ran under (random weights, CPU; one batch of 2 images)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no real weights: random ones
    if kind == "inception":
        extractor = InceptionFeatures(allow_random_weights=True, device="cpu")
        keys = ("pool", "logits", "spatial")
    else:
        extractor = DINOv2Features(allow_random_weights=True, device="cpu", model_name="vit_small_patch14_dinov2")
        keys = None
    seen = []
    extractor.model.register_forward_pre_hook(lambda module, args: seen.append(tf32_state()))
    small = tmp_path / "two.npz"
    np.savez(small, images(1, 2, size=16))
    tf32_on()
    before = tf32_state()
    extract_features(small, extractor, batch_size=2, keys=keys)
    assert seen == [FULL_FLOAT32]
    assert tf32_state() == before


# ------------------------------------------------------------------------------------------ the cache key


def test_numerics_name_the_device_type_and_precision():
    assert feature_numerics(TinyExtractor("cpu")) == f"cpu/{FEATURE_PRECISION}" == "cpu/float32"
    assert feature_numerics(TinyExtractor("cuda")) == "cuda/float32"
    assert feature_numerics(TinyExtractor("cuda:1")) == "cuda/float32"  # the type, not the index
    half = TinyExtractor("cuda")
    half.precision = "bfloat16"  # a custom network that computes in another precision says so
    assert feature_numerics(half) == "cuda/bfloat16"
    cache = FeatureCache("/tmp/unused")
    assert cache.entry_path("0" * 64, "net", "cpu/float32") != cache.entry_path("0" * 64, "net", "cuda/float32")
    assert cache.entry_path("0" * 64, "net", "cpu/float32") == cache.entry_path("0" * 64, "net", "cpu/float32")


def test_an_entry_made_on_one_device_type_is_not_read_on_the_other(batch, tmp_path):
    cache = tmp_path / "cache"
    on_cpu, on_gpu = TinyExtractor("cpu"), TinyExtractor("cuda")  # same id: same network and weights
    first = batch_features(batch, on_cpu, batch_size=8, cache_dir=cache)
    assert not first["from_cache"] and on_cpu.num_calls == 1
    other = batch_features(batch, on_gpu, batch_size=8, cache_dir=cache)
    assert not other["from_cache"] and on_gpu.num_calls == 1  # extracted, not read from the CPU's entry
    assert len(list(cache.glob("*.npz"))) == 2
    # Each device type reads its own entry back.
    assert batch_features(batch, on_cpu, batch_size=8, cache_dir=cache)["from_cache"]
    assert batch_features(batch, on_gpu, batch_size=8, cache_dir=cache)["from_cache"]
    assert on_cpu.num_calls == 1 and on_gpu.num_calls == 1
    # The entry records its numerics.
    import json

    metas = sorted(json.loads(str(np.load(p)["meta"]))["numerics"] for p in cache.glob("*.npz"))
    assert metas == ["cpu/float32", "cuda/float32"]


def test_dinov2_statistics_are_keyed_by_device_type_too(batch, tmp_path):
    class Vectors(TinyExtractor):
        def __call__(self, images):
            return super().__call__(images)["pool"]

    cache = tmp_path / "cache"
    on_cpu, on_gpu = Vectors("cpu"), Vectors("cuda")
    assert not dinov2_statistics(batch, on_cpu, batch_size=8, cache_dir=cache)["from_cache"]
    assert not dinov2_statistics(batch, on_gpu, batch_size=8, cache_dir=cache)["from_cache"]
    assert dinov2_statistics(batch, on_gpu, batch_size=8, cache_dir=cache)["from_cache"]
    assert on_cpu.num_calls == 1 and on_gpu.num_calls == 1


def test_entries_of_the_old_format_are_not_read(batch, tmp_path):
    """Entries written before the key held the numerics (format 1: extractor id only, CPU and GPU features alike)
    are never read: the features are extracted again and written under the new key; the old file stays."""
    cache_dir = tmp_path / "cache"
    extractor = TinyExtractor("cpu")
    cache = FeatureCache(str(cache_dir))
    digest = cache.hashes.sha256(str(batch))
    old = cache_dir / f"{digest}-{hashlib.sha256(f'{extractor.id}|format1'.encode()).hexdigest()[:16]}.npz"
    poisoned = {k: np.full((5, 4), 7.0, np.float32) for k in ("pool", "logits")}
    poisoned.update(mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(5), sigma_s=np.eye(5))
    cache.save(str(old), poisoned, {"extractor": extractor.id})
    out = batch_features(batch, extractor, batch_size=8, cache_dir=cache_dir)
    assert not out["from_cache"] and extractor.num_calls == 1 and not np.all(out["pool"] == 7.0)
    assert old.exists() and len(list(cache_dir.glob("*.npz"))) == 2


@pytest.mark.parametrize("spec", ["demo.features", "demo.features:", ":DemoFeatures"])
def test_a_feature_extractor_spec_without_a_class_is_a_clear_error(spec):
    from evaluations.features import load_extractor

    with pytest.raises(ValueError, match="expected 'module:Class'"):
        load_extractor(spec, "unused.pt")
