"""DINOv2 ViT-L/14 features and FD_DINOv2, as EDM2's ``calculate_metrics.py`` computes them (preprocessing and
checkpoint: docs/evaluation.md): timm's ``vit_large_patch14_dinov2`` at 224 x 224 with Meta's
``dinov2_vitl14_pretrain.pth``, read from disk, never downloaded here. That checkpoint's position embedding is for
37 x 37 patches; DINOv2 interpolates it to the input's 16 x 16 at every forward, which is done here once, when
loading, so the features are the hub model's at 224 x 224.
"""

import numpy as np
import torch

from adm_common.npz import check_image_batch
from evaluations.features import FeatureNetwork, WeightsFile

MODEL_NAME = "vit_large_patch14_dinov2"
EXTRACTOR_NAME = "dinov2-vitl14"
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + WEIGHTS_FILENAME
# DINOv2's position-embedding interpolation (``interpolate_offset``): scale factor (grid + 0.1) / stored grid.
POS_EMBED_OFFSET = 0.1


class MissingDINOv2Weights(FileNotFoundError):
    """The DINOv2 weights file is not on disk (nothing is downloaded implicitly)."""


WEIGHTS = WeightsFile(WEIGHTS_FILENAME, WEIGHTS_URL, "Meta's DINOv2 ViT-L/14", "download-dinov2", "--dinov2-weights",
                      "FD_DINOv2 is", MissingDINOv2Weights)


def build_model(model_name=MODEL_NAME):
    """timm's DINOv2 ViT for 224 x 224 input, no classifier head, no pretrained download."""
    import timm

    return timm.create_model(model_name, pretrained=False, img_size=IMAGE_SIZE, num_classes=0)


def interpolate_pos_embed(pos_embed, grid):
    """DINOv2's ``interpolate_pos_encoding`` for a ``grid`` x ``grid`` patch input: the class token's embedding is
    kept, the square patch grid resized bicubically (float32, scale factor (grid + 0.1) / stored grid, no
    antialiasing, align_corners False)."""
    n = pos_embed.shape[1] - 1
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if side == grid:
        return pos_embed
    dtype, dim = pos_embed.dtype, pos_embed.shape[-1]
    pos = pos_embed.float()
    patches = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = float(grid + POS_EMBED_OFFSET) / side
    patches = torch.nn.functional.interpolate(patches, scale_factor=(scale, scale), mode="bicubic",
                                              antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patches], dim=1).to(dtype)


def load_checkpoint(path):
    """A state dict from ``.pth`` (Meta's checkpoint; also ``{"model": ...}``/``{"state_dict": ...}`` wrappers) or
    ``.safetensors`` (timm's hub copy)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict) and "pos_embed" not in state:
            state = state[key]
    return state


def load_dinov2_weights(model, state_dict):
    """Load DINOv2 weights (Meta's names, which timm shares) into a timm model built for 224 x 224: drops
    ``mask_token`` (training only), interpolates the position embedding as DINOv2 does at 224 x 224. Strict
    otherwise: a missing or unexpected parameter is an error."""
    state = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.patch_embed.grid_size[0])
    model.load_state_dict(state, strict=True)
    return model


class DINOv2Features(FeatureNetwork):
    """Callable: uint8 N x H x W x 3 images -> float32 N x 1024 DINOv2 features (EDM2's preprocessing). Weights as
    :class:`~evaluations.features.InceptionFeatures`' (also timm's safetensors); a random network has its layer
    scales set to 1, as DINOv2's hub constructor does, so images' features differ. ``model_name``: timm's
    architecture; smaller variants (``vit_small_patch14_dinov2``) are for tests only, and their id says so."""

    def __init__(self, weights_path=None, allow_random_weights=False, device=None, seed=0, model_name=MODEL_NAME):
        super().__init__(f"{EXTRACTOR_NAME}:{model_name}", WEIGHTS.resolve, weights_path, allow_random_weights,
                         device, seed, "DINOv2 network; FD_DINOv2 is meaningless")
        self.model_name = model_name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(model_name)
            if self.random_weights:
                for name, param in model.named_parameters():
                    if name.endswith(".gamma"):
                        torch.nn.init.ones_(param)
        if not self.random_weights:
            load_dinov2_weights(model, load_checkpoint(self.weights_path))
        self.model = model.eval().requires_grad_(False).to(self.device)

    def preprocess(self, images):
        """uint8 N x H x W x 3 -> the network's float32 N x 3 x 224 x 224 input (EDM2's ``resize_mode="torch"``)."""
        images = check_image_batch(images)
        x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).to(self.device, torch.float32)
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True)
        mean, std = (torch.tensor(v, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
                     for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x / 255 - mean) / std

    @torch.no_grad()
    def __call__(self, images):
        x = self.preprocess(images)
        out = self.model(x).float().cpu().numpy()
        self.num_calls += 1
        self.num_images += x.shape[0]
        return out
