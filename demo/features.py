"""The embedded demo's feature network: a small CNN trained (``scripts/train_demo.py --what features``) to classify
the demo's shapes. Its 128-d pooled features and class logits stand in for Inception's in ``make demo``: the FID,
precision / recall and classifier score on them are *demo-feature* metrics, not comparable with published numbers.

    net = load_demo_feature_net("checkpoints/demo/features_demo.pt")
    features, logits = extract(net, images_uint8_nhwc)   # float64 [N, 128], float64 [N, 10]

The evaluator loads it as ``evaluate(..., feature_net=PATH, feature_extractor="demo.features:DemoFeatures")``.
"""

import os

import numpy as np
import torch as th
import torch.nn as nn
import torch.nn.functional as F

from adm_common.files import atomic_open
from evaluations.features import DEMO_FEATURES_MARK, FeatureNetwork
from guided_diffusion.checkpoint import read_checkpoint

DEFAULT_WIDTHS = (32, 64, 128, 128)


class DemoFeatureNet(nn.Module):
    """Four conv blocks (conv3x3-BN-ReLU; 2x2 max-pool between blocks), global average pooling to ``widths[-1]``
    features, and a linear classifier on them. Input: float NCHW images in [-1, 1]; returns (features, logits)."""

    def __init__(self, num_classes=10, widths=DEFAULT_WIDTHS, image_size=32):
        super().__init__()
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        self.image_size = int(image_size)
        layers, ch = [], 3
        for i, width in enumerate(self.widths):
            layers += [nn.Conv2d(ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            ch = width
            if i < len(self.widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(ch, self.num_classes)

    def config(self):
        return {"num_classes": self.num_classes, "widths": list(self.widths), "image_size": self.image_size}

    def forward(self, x):
        _, features, logits = self.forward_with_map(x)
        return features, logits

    def forward_with_map(self, x):
        """(last feature map, pooled features, logits)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"the demo feature net expects images of shape (N, 3, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        feature_map = self.body(x)
        features = feature_map.mean(dim=(2, 3))
        return feature_map, features, self.head(features)


def images_to_tensor(images):
    """uint8 [N, H, W, 3] (numpy or tensor) -> float32 NCHW tensor in [-1, 1]."""
    images = np.asarray(images)
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch warns about (and could write through) read-only arrays, e.g. from npz
    images = th.as_tensor(images)
    if images.dtype != th.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_demo_feature_net(net, path, **extra):
    """Save ``{"state_dict", "config", **extra}`` (plain tensors and numbers: loadable with weights_only)."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    with atomic_open(path) as f:
        th.save({"state_dict": state, "config": net.config(), **extra}, f)


def load_demo_feature_net(path, device="cpu"):
    """The trained feature net from ``path`` (written by ``save_demo_feature_net``), in eval mode."""
    # Mapped by this process alone: a sweep's rank 0 evaluates on its own while the process group is up.
    obj = read_checkpoint(path, mmap=True)
    if not isinstance(obj, dict) or "state_dict" not in obj or "config" not in obj:
        raise ValueError(f"{path} is not a demo feature-net checkpoint (expected keys state_dict, config)")
    net = DemoFeatureNet(**obj["config"])  # what DemoFeatureNet.config() saved
    net.load_state_dict({k: v.float() for k, v in obj["state_dict"].items()}, strict=True)
    return net.to(device).eval()


def extract(net, images, batch_size=256):
    """Features and logits of uint8 NHWC ``images``: (float64 [N, D], float64 [N, C]) numpy arrays."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = np.asarray(images)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    features, logits = [], []
    try:
        with th.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images_to_tensor(images[start:start + batch_size]).to(device)
                f, l = net(x)
                features.append(f.double().cpu().numpy())
                logits.append(l.double().cpu().numpy())
    finally:
        net.train(was_training)
    if not features:
        return np.zeros((0, net.widths[-1])), np.zeros((0, net.num_classes))
    return np.concatenate(features), np.concatenate(logits)


def accuracy(net, images, labels, batch_size=256):
    """Fraction of ``images`` whose arg-max logit is the label."""
    _, logits = extract(net, images, batch_size)
    return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))


def train_feature_net(images, labels, steps=600, batch_size=128, lr=2e-3, seed=0, num_classes=10,
                      log_every=100, log=print, rotations=True):
    """Train a :class:`DemoFeatureNet` on uint8 NHWC ``images`` with cross-entropy (Adam, one-cycle
    cosine learning rate, random 90-degree rotations and flips as augmentation; ``rotations`` False: flips
    about both axes only, which keep a vertical mirror axis vertical). Returns (net, last loss)."""
    th.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = DemoFeatureNet(num_classes=num_classes)
    opt = th.optim.Adam(net.parameters(), lr=lr)
    sched = th.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    data = images_to_tensor(images)
    targets = th.as_tensor(np.asarray(labels), dtype=th.long)
    net.train()
    running = []
    for step in range(steps):
        idx = th.from_numpy(rng.integers(0, data.shape[0], size=batch_size))
        x, y = data[idx], targets[idx]
        # Every class is closed under rotation by 90 degrees and reflection, so these keep labels.
        k = int(rng.integers(4))
        x = th.rot90(x, k, dims=(2, 3)) if rotations else (x.flip(2) if k % 2 else x)
        if rng.random() < 0.5:
            x = x.flip(3)
        _, logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"features step {step + 1}/{steps} loss {np.mean(running[-log_every:]):.4f}")
    return net.eval(), float(np.mean(running[-100:])) if running else float("nan")


def _existing(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo feature network {path} not found: make train-demo writes it")
    return path


class DemoFeatures(FeatureNetwork):
    """The evaluator's extractor interface (``evaluations.features.FeatureNetwork``, as Inception and DINOv2) on
    the demo's feature network: ``pool`` = its pooled features, ``logits`` = its class logits (so "IS" is a
    classifier score over the demo's classes), ``spatial`` = the first 7 channels of its last feature map in H, W,
    C order (the demo's stand-in for sFID's spatial features). Every result is marked DEMO-FEATURES.
    """

    spatial_channels = 7

    def __init__(self, path, device=None):
        super().__init__("demo-features", _existing, path, allow_random_weights=False, device=device or "cpu",
                         seed=0, meaningless="")
        self.marker = DEMO_FEATURES_MARK
        self.net = load_demo_feature_net(path, device=self.device)

    @th.no_grad()
    def __call__(self, images):
        x = images_to_tensor(images).to(self.device)
        self.net.eval()
        feature_map, pool, logits = self.net.forward_with_map(x)
        n = feature_map.shape[0]
        spatial = feature_map[:, : self.spatial_channels].permute(0, 2, 3, 1).reshape(n, -1)
        self.num_calls += 1
        self.num_images += n
        return {"pool": pool.float().cpu().numpy(), "logits": logits.float().cpu().numpy(),
                "spatial": spatial.float().cpu().numpy()}
