"""Training images from a folder, as upstream's ``load_data``: an endless iterator of (images, kwargs).

Images (jpg, jpeg, png, gif; sub-folders included, local paths or blobfile URLs) are resized so the
short side is ``image_size`` (box-halving first, then bicubic) and cropped to a square, centred or at
random; values are scaled to [-1, 1], NCHW float32. With ``class_cond`` the label of ``dog_001.png`` is
the index of ``dog`` among the sorted distinct file-name prefixes (the part before the first underscore),
returned as ``kwargs["y"]``. Under several processes each rank reads its own shard (every world_size-th
file, from its rank).
"""

import math
import random

import blobfile as bf
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import dist_util

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def load_data(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, random_crop=False,
              random_flip=True):
    """Yield (images [N, 3, image_size, image_size] in [-1, 1], {"y": labels} or {}) forever.

    deterministic: files in sorted order every epoch instead of shuffled. random_crop / random_flip:
    augmentation (a random crop of 80-100% of the short side; a horizontal flip with probability 1/2).
    The last incomplete batch of each epoch is dropped.
    """
    if not data_dir:
        raise ValueError("unspecified data directory")
    all_files = _list_image_files_recursively(data_dir)
    if not all_files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir}")
    classes = None
    if class_cond:
        # The class is the first part of the file name, before an underscore.
        class_names = [bf.basename(path).split("_")[0] for path in all_files]
        index = {name: i for i, name in enumerate(sorted(set(class_names)))}
        classes = [index[name] for name in class_names]
    dataset = ImageDataset(image_size, all_files, classes=classes, shard=dist_util.get_rank(),
                           num_shards=dist_util.get_world_size(), random_crop=random_crop, random_flip=random_flip)
    if len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} images for this process under {data_dir}, fewer than one batch of "
                         f"{batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=not deterministic, num_workers=1, drop_last=True,
                        persistent_workers=True)
    while True:
        yield from loader


def _list_image_files_recursively(data_dir):
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full_path = bf.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(_list_image_files_recursively(full_path))
    return results


class ImageDataset(Dataset):
    """``image_paths[shard::num_shards]`` (and their class indices) as (CHW float32 array, kwargs) pairs."""

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False,
                 random_flip=True):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        path = self.local_images[idx]
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        pil_image = pil_image.convert("RGB")

        arr = (random_crop_arr if self.random_crop else center_crop_arr)(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1

        out_dict = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), out_dict


def _resize_short_side(pil_image, size):
    """Halve with a box filter while the short side is at least twice ``size``, then bicubic to ``size``."""
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image, image_size):
    """The central image_size x image_size square (HWC uint8) after resizing the short side to it."""
    arr = np.array(_resize_short_side(pil_image, image_size))
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y : y + image_size, x : x + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """A random image_size square after resizing the short side to image_size / U(min, max)_crop_frac."""
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = random.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    arr = np.array(_resize_short_side(pil_image, smaller_dim_size))
    y, x = random.randrange(arr.shape[0] - image_size + 1), random.randrange(arr.shape[1] - image_size + 1)
    return arr[y : y + image_size, x : x + image_size]
