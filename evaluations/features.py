"""Inception features in the layout of OpenAI's ADM evaluator, from torch-fidelity's ``inception-v3-compat`` port of
its 2015-12-05 TensorFlow graph (which resizes uint8 N x H x W x 3 images to 299 x 299 itself): ``pool`` (pool_3,
2048: FID, precision/recall), ``logits`` (bias-free, 1008: IS) and ``spatial`` (the first 7 channels of the 17 x 17
``mixed_6/conv``, torchvision's ``Mixed_6d.branch1x1`` after BatchNorm and ReLU, taken by a forward hook and
flattened H, W, C: 2023, sFID). Also what every feature network shares: weights files, full float32, cache keys.
"""

import contextlib
import io
import os
import pkgutil
import sys
from dataclasses import dataclass

import numpy as np
import torch

from adm_common.files import file_sha256
from adm_common.npz import check_image_batch

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

EXTRACTOR_NAME = "inception-v3-compat"
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
RANDOM_WEIGHTS_MARK = "RANDOM-WEIGHTS"
# Marks numbers computed with the CPU demo's own feature network (demo/features.py).
DEMO_FEATURES_MARK = "DEMO-FEATURES"

class MissingInceptionWeights(FileNotFoundError):
    """The Inception weights file is not on disk (nothing is ever downloaded here)."""


# The precision every feature network computes in (:func:`full_float32`); with the device type it keys the cache.
FEATURE_PRECISION = "float32"
# torch's per-backend float32 precision settings (torch >= 2.9): parents whose value the operators inherit, and
# the operators themselves.
_FP32_PARENTS = (("generic", "all"), ("cuda", "all"), ("mkldnn", "all"))
_FP32_OPERATORS = (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
                   ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _legacy_flag(read, default):
    """A legacy TF32 flag's value; torch >= 2.9 raises when it was set through the new API only (it then cannot
    tell), and the legacy flag is then at torch's default, untouched."""
    try:
        return read()
    except RuntimeError:
        return default


@contextlib.contextmanager
def full_float32():
    """Inside: float32 convolutions and matmuls in full float32, TF32 off on every backend, and float16 matmuls
    accumulated in float32 (cuBLAS may otherwise reduce split-K partial sums in float16; TensorFlow does not); on
    exit, also on exceptions, the settings are what they were. The project's one such context. cuDNN's TF32, on by
    default, would move Ampere/Hopper features ~1e-3 relative from float32: more than the regression tolerances.
    Both of torch's interfaces are set, consistently so that neither raises: the legacy flags and, where torch has
    it, every operator's per-backend ``fp32_precision`` (cuda and mkldnn matmul/conv/rnn: "ieee")."""
    new_api = hasattr(torch._C, "_get_fp32_precision_getter")
    matmul = _legacy_flag(torch.get_float32_matmul_precision, "highest")
    cudnn = _legacy_flag(lambda: torch.backends.cudnn.allow_tf32, True)
    saved = {node: torch._C._get_fp32_precision_getter(*node) for node in _FP32_PARENTS + _FP32_OPERATORS} \
        if new_api else {}
    cuda_matmul = torch.backends.cuda.matmul
    fp16_reduction = cuda_matmul.allow_fp16_reduced_precision_reduction
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        cuda_matmul.allow_fp16_reduced_precision_reduction = False
        for node in _FP32_OPERATORS if new_api else ():
            torch._C._set_fp32_precision_setter(*node, "ieee")
        yield
    finally:
        # The legacy flags first (setting them rewrites operators' values), then every value as it was, parents
        # before operators (a parent's value is copied down to its operators).
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
        cuda_matmul.allow_fp16_reduced_precision_reduction = fp16_reduction
        for node, value in saved.items():
            torch._C._set_fp32_precision_setter(*node, value)


def feature_numerics(extractor):
    """``"<device type>/<precision>"`` (``"cuda/float32"``): part of the feature cache's key, as float32 kernels of
    CPU and GPU round differently. ``precision``: the extractor's attribute (a custom network computing in another
    precision says so), else :data:`FEATURE_PRECISION`."""
    device = getattr(extractor, "device", None)
    device_type = torch.device(device).type if device is not None else "unknown-device"
    return f"{device_type}/{getattr(extractor, 'precision', None) or FEATURE_PRECISION}"


@dataclass(frozen=True)
class WeightsFile:
    """A network's weights file: given by a flag, else in torch hub's cache (``<torch hub dir>/checkpoints/``,
    ``TORCH_HOME`` moves it); never downloaded here. ``resolve`` raises ``error`` saying how to get it."""

    filename: str
    url: str
    what: str
    make_target: str
    flag: str
    marks: str  # what the random-weights mark covers
    error: type

    def default_path(self):
        return os.path.join(torch.hub.get_dir(), "checkpoints", self.filename)

    def resolve(self, weights_path=None):
        path = os.path.expanduser(weights_path) if weights_path else self.default_path()
        if not os.path.isfile(path):
            raise self.error(
                f"{self.what} weights not found at {path}.\nThe evaluator needs the file {self.filename},\n"
                f"from {self.url}\nGet it with `make {self.make_target}` (or download it yourself), then pass "
                f"{self.flag} PATH or put it at {self.default_path()}.\nFor tests and dry runs only, "
                f"--allow-random-weights uses a randomly initialised network ({self.marks} then marked "
                f"{RANDOM_WEIGHTS_MARK} and means nothing).")
        return path


WEIGHTS = WeightsFile(WEIGHTS_FILENAME, WEIGHTS_URL, f"torch-fidelity's {EXTRACTOR_NAME}", "download-inception",
                      "--inception-weights", "every number is", MissingInceptionWeights)


def _inception_class(random_init):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if not random_init:
        return FeatureExtractorInceptionV3

    class RandomInitInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's architecture, given an empty state dict to load (which leaves it as initialised), its
        convolutions re-initialised with He (fan-in, ReLU) scaling: PyTorch's default initialisation shrinks the
        activations to ~1e-8 at pool_3 (degenerate features, slow denormal arithmetic)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for module in self.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            torch.nn.init.normal_(self.fc.weight, std=POOL_DIM ** -0.5)
            torch.nn.init.normal_(self.fc.bias, std=0.1)

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if len(state_dict) == 0:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return RandomInitInceptionV3


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class FeatureNetwork:
    """What Inception and DINOv2 share: the device; the weights file ``resolve(weights_path)`` finds, else (no path
    given, ``allow_random_weights``) random weights marked ``RANDOM-WEIGHTS``; the cache keys' ``id`` (the weights'
    sha256, hashed lazily: only caches need it); counts of the batches and images run through the network."""

    def __init__(self, name, resolve, weights_path, allow_random_weights, device, seed, meaningless):
        self.device = torch.device(device or default_device())
        try:
            path = resolve(weights_path)
        except FileNotFoundError:
            if weights_path or not allow_random_weights:  # an explicit path that is missing is always an error
                raise
            path = None
        self.random_weights = path is None
        self.weights_path = None if self.random_weights else os.path.abspath(path)
        self.marker = RANDOM_WEIGHTS_MARK if self.random_weights else None
        self._name = name
        self._id = f"{name}:{RANDOM_WEIGHTS_MARK}:seed{seed}" if self.random_weights else None
        if self.random_weights:
            print(f"WARNING: {RANDOM_WEIGHTS_MARK}: randomly initialised {meaningless}.", file=sys.stderr)
        self.num_calls = 0
        self.num_images = 0

    @property
    def id(self):
        """Identifies the network and its weights: part of cache keys."""
        if self._id is None:
            self._id = f"{self._name}:sha256={file_sha256(self.weights_path)[:16]}"
        return self._id


class InceptionFeatures(FeatureNetwork):
    """Callable: uint8 N x H x W x 3 images -> dict of ``pool``, ``logits``, ``spatial`` float32 arrays. Weights:
    ``weights_path``, else torch hub's cache, else with ``allow_random_weights`` a random network seeded by ``seed``
    (identical across processes; tests and dry runs only)."""

    def __init__(self, weights_path=None, allow_random_weights=False, device=None, seed=0):
        super().__init__(EXTRACTOR_NAME, WEIGHTS.resolve, weights_path, allow_random_weights, device, seed,
                         "Inception network; all metrics are meaningless")
        features = ["2048", "logits_unbiased"]  # torch-fidelity's names of pool_3 and the bias-free logits
        if self.random_weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                empty = io.BytesIO()
                torch.save({}, empty)
                empty.seek(0)
                model = _inception_class(True)(EXTRACTOR_NAME, features, feature_extractor_weights_path=empty)
        else:
            model = _inception_class(False)(EXTRACTOR_NAME, features, feature_extractor_weights_path=self.weights_path)
        self.model = model.eval().to(self.device)
        self._spatial = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._spatial_hook)

    def _spatial_hook(self, module, inputs, output):
        # output: N x 192 x 17 x 17 after BatchNorm + ReLU. Keep 7 channels, lay out as H, W, C.
        n = output.shape[0]
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(n, -1).float().cpu()

    @torch.no_grad()
    def __call__(self, images):
        images = check_image_batch(images)
        x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self._spatial = None
        pool, logits = self.model(x)
        spatial = self._spatial
        self._spatial = None
        if spatial is None or spatial.shape[1] != SPATIAL_DIM:
            raise RuntimeError(f"sFID hook produced {None if spatial is None else tuple(spatial.shape)}, "
                               f"expected (N, {SPATIAL_DIM})")
        self.num_calls += 1
        self.num_images += images.shape[0]
        return {"pool": pool.float().cpu().numpy(), "logits": logits.float().cpu().numpy(), "spatial": spatial.numpy()}


def load_extractor(spec, path, device=None):
    """A custom feature network for the evaluator: ``spec`` is ``"module:Class"`` of an extractor class taking
    ``(path, device=...)`` with the interface of :class:`InceptionFeatures` (``__call__(uint8 NHWC) -> {pool,
    logits, spatial}``, ``id``, ``device``, ``weights_path``, ``random_weights``, ``marker``). Imported when asked
    for, so the evaluator depends on no particular network (the CPU demo's is ``demo.features:DemoFeatures``)."""
    if not str(spec).partition(":")[2] or str(spec).startswith(":"):
        raise ValueError(f"feature extractor {spec!r}: expected 'module:Class'")
    try:
        cls = pkgutil.resolve_name(str(spec))
    except (ValueError, ImportError, AttributeError) as e:
        raise ValueError(f"feature extractor {spec!r} (expected 'module:Class') cannot be imported: {e}") from None
    return cls(path, device=device)
