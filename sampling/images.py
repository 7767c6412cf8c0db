"""Images of a run: upstream's uint8 conversion, grids, side-by-side comparisons and PNG files (atomic)."""

import math

import numpy as np

from adm_common.files import atomic_open


def to_uint8_nhwc(x):
    """Images in [-1, 1] (N, C, H, W tensor) to upstream's uint8 NHWC array."""
    import torch as th

    return ((x + 1) * 127.5).clamp(0, 255).to(th.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_grid(images, columns=None, pad=0, pad_value=0):
    """(N, H, W, 3) uint8 -> one image of ``columns`` cells per row (default: about square), ``pad`` pixels of
    ``pad_value`` between and around them."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_png(image, path, zoom=1):
    """Write an (H, W, 3) uint8 array as a PNG, atomically, enlarged ``zoom`` times without smoothing."""
    from PIL import Image

    picture = Image.fromarray(image)
    if zoom != 1:
        picture = picture.resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
    with atomic_open(path) as f:
        picture.save(f, format="PNG")


def save_side_by_side(left, right, path, columns=8, gap=6, zoom=3):
    """Two grids of ``columns``, ``left`` beside ``right`` on white, enlarged ``zoom`` times, as a PNG (atomically)."""
    a = image_grid(left, columns, pad=2, pad_value=255)
    b = image_grid(right, columns, pad=2, pad_value=255)
    canvas = np.full((max(a.shape[0], b.shape[0]), a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap:] = b
    save_png(canvas, path, zoom)
