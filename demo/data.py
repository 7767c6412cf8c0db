"""The embedded demo's data sets: 32x32 RGB images of shapes, generated on the fly.

``shapes`` (the class-conditional demo model): one shape per image, labelled with its class.
``mirror`` (the unconditional demo model): the same drawing confined to the left half under a fine coloured
texture, and the right half its mirror image, so every pixel must agree with the one in column 31 - x: a
long-range dependency that convolutions at 32x32 cannot see and attention can (a 16x16 token in column j has its
partner in column 15 - j). The texture is why attention must look there: on a smooth gradient any nearby token would do.
Its label is the shape's class; ``make_broken_mirror`` gives the feature net's "broken" class (two images' halves).

Each image is one filled shape (the class) of random colour, size, position and rotation on a smooth
two-colour gradient with faint low-frequency texture. Shapes are drawn with Pillow at 4x (128x128) as a
mask, then box-filtered down to 32x32, so edges are anti-aliased. The shape's outline is what tells the
classes apart: colour, size, position and rotation are nuisance variables drawn independently of it.

``make_dataset(n, seed)`` is deterministic, and sample ``i`` depends only on ``(seed, i)`` (each sample
has its own generator: ``[seed, i]``, mirror ``[seed, i, 1]``), so a data set of 10 images is the prefix of one of 20.
"""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent", "bars", "arrow")
NUM_CLASSES = len(CLASS_NAMES)


def _regular_polygon(sides, phase=0.0):
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points=5, inner=0.45):
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(a=0.34):
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], dtype=np.float64)


def _heart(n=48):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
    return pts / np.abs(pts).max()


def _arrow():
    return np.array([(-1, -0.26), (0.1, -0.26), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.26), (-1, 0.26)],
                    dtype=np.float64)


def _bars(gap=0.62, half_width=0.2):
    """Three parallel bars, as three polygons."""
    return [np.array([(-1, c - half_width), (1, c - half_width), (1, c + half_width), (-1, c + half_width)])
            for c in (-gap, 0.0, gap)]


# Unit outlines (radius ~1, centred), rotated/scaled/translated per sample. None: drawn specially.
_OUTLINES = {
    "circle": [_regular_polygon(64)],
    "square": [_regular_polygon(4, math.pi / 4) * math.sqrt(2) * 0.78],
    "triangle": [_regular_polygon(3, -math.pi / 2) * 1.05 + np.array([0.0, 0.12])],
    "star": [_star()],
    "cross": [_cross()],
    "ring": None,
    "heart": [_heart()],
    "crescent": None,
    "bars": _bars(),
    "arrow": [_arrow()],
}


def _transform(points, center, radius, angle):
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return ((points @ rot.T) * radius + center).ravel().tolist()


def _shape_mask(name, center, radius, angle):
    """A float32 [32, 32] coverage mask in [0, 1] of shape ``name`` (coordinates at 4x resolution)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if name == "ring":
        disc = _regular_polygon(64)
        draw.polygon(_transform(disc, center, radius, 0.0), fill=255)
        draw.polygon(_transform(disc, center, radius * 0.55, 0.0), fill=0)
    elif name == "crescent":
        disc = _regular_polygon(64)
        offset = np.array([math.cos(angle), math.sin(angle)]) * radius * 0.5
        draw.polygon(_transform(disc, center, radius, 0.0), fill=255)
        draw.polygon(_transform(disc, center + offset, radius * 0.85, 0.0), fill=0)
    else:
        for outline in _OUTLINES[name]:
            draw.polygon(_transform(outline, center, radius, angle), fill=255)
    mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


_GRID = np.stack(np.meshgrid(np.linspace(-1, 1, IMAGE_SIZE), np.linspace(-1, 1, IMAGE_SIZE)), axis=-1)
_GRID = _GRID.astype(np.float32)  # [y, x, (x, y)]


def _smooth_noise(rng, cells=4):
    """Smooth noise in [-1, 1]: a random cells x cells grid upsampled bilinearly to 32x32 (4: faint, 12: fine)."""
    grid = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def make_sample(seed, index):
    """Sample ``index`` of the shapes data set with ``seed``: (uint8 [32, 32, 3] image, int label)."""
    return _draw(np.random.default_rng([int(seed), int(index)]), IMAGE_SIZE * SUPERSAMPLE)


def make_mirror_sample(seed, index):
    """Sample ``index`` of the mirror data set: a smaller shape in the left half under a fine colour texture, the
    right half its mirror image (background and texture too). (uint8 [32, 32, 3] image, int label of the shape)."""
    # A stream of its own: mirror sample i is not shapes sample i cut in half.
    rng = np.random.default_rng([int(seed), int(index), MIRROR_STREAM])
    image, label = _draw(rng, IMAGE_SIZE * SUPERSAMPLE // 2, texture=MIRROR_TEXTURE)
    half = IMAGE_SIZE // 2
    image[:, half:] = image[:, :half][:, ::-1]
    return image, label


def make_broken_mirror(seed, index):
    """A mirror image whose halves disagree: the left half of mirror sample ``index`` beside the mirrored
    left half of another sample of the same data set (the feature net's "broken" class)."""
    left, _ = make_mirror_sample(seed, index)
    right, _ = make_mirror_sample(seed, BROKEN_PARTNER_OFFSET + index)
    half = IMAGE_SIZE // 2
    left[:, half:] = right[:, half:]
    return left, BROKEN_LABEL


MIRROR_STREAM = 1
MIRROR_TEXTURE = 0.3  # amplitude of the mirror set's texture: colour noise on a 12 x 12 grid (left half: 6 cells wide)
BROKEN_PARTNER_OFFSET = 1 << 40  # partners outside any index a data set of this project uses
BROKEN_LABEL = NUM_CLASSES  # the mirror feature net's extra class


def _draw(rng, width, texture=0.0):
    """One shape on a gradient background, the shape inside the first ``width`` columns (at 4x); ``texture``: the
    amplitude of a fine colour texture over the whole image."""
    label = int(rng.integers(NUM_CLASSES))
    name = CLASS_NAMES[label]

    # Contrast: a dark background with a light shape, or the other way round.
    dark_background = rng.random() < 0.5
    bg_value = rng.uniform(0.1, 0.4, size=2) if dark_background else rng.uniform(0.65, 0.95, size=2)
    fg_value = rng.uniform(0.75, 1.0) if dark_background else rng.uniform(0.1, 0.35)
    bg_hues = rng.random(2)
    bg_a = _hsv_to_rgb(bg_hues[0], rng.uniform(0.0, 0.5), bg_value[0])
    bg_b = _hsv_to_rgb(bg_hues[1], rng.uniform(0.0, 0.5), bg_value[1])
    fg = _hsv_to_rgb(rng.random(), rng.uniform(0.4, 1.0), fg_value)

    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-8
    ramp = (_GRID @ direction.astype(np.float32)) * 0.5 + 0.5  # [32, 32] in [0, 1]
    background = bg_a * (1 - ramp[..., None]) + bg_b * ramp[..., None]
    background += 0.06 * _smooth_noise(rng)[..., None]

    size = IMAGE_SIZE * SUPERSAMPLE
    radius = rng.uniform(0.26, 0.4) * width / 2 * 1.6 if width == size else rng.uniform(0.55, 0.8) * width / 2
    margin = radius * 1.05
    center = np.array([rng.uniform(margin, width - margin), rng.uniform(margin, size - margin)])
    angle = rng.uniform(0, 2 * math.pi)
    alpha = _shape_mask(name, center, radius, angle)[..., None]

    image = background * (1 - alpha) + fg * alpha
    if texture:
        image = image + texture * np.stack([_smooth_noise(rng, cells=12) for _ in range(3)], axis=-1)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), label


@dataclass(frozen=True)
class DemoDataSet:
    """One demo data set and what is trained on it: the sample function, the diffusion model's name and whether
    it is class-conditional, the feature net's file and classes (the mirror set adds its "broken" class), and
    whether 90-degree rotations keep a label (they would turn the mirror's vertical axis horizontal)."""

    make: Callable
    model: str
    class_cond: bool
    features: str
    feature_classes: int
    rotations: bool


DATASETS = {
    "shapes": DemoDataSet(make_sample, "adm_demo", True, "features_demo.pt", NUM_CLASSES, True),
    "mirror": DemoDataSet(make_mirror_sample, "adm_mirror", False, "features_mirror.pt", NUM_CLASSES + 1, False),
}


def make_dataset(n, seed=0, start=0, kind="shapes"):
    """``n`` samples (indices ``start .. start + n - 1``) of data set ``kind`` (a key of ``DATASETS``):
    (uint8 [n, 32, 32, 3] images, int64 [n] labels)."""
    if kind not in DATASETS:
        raise ValueError(f"unknown demo data set {kind!r}: choose one of {', '.join(DATASETS)}")
    make = DATASETS[kind].make
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for k in range(n):
        images[k], labels[k] = make(seed, start + k)
    return images, labels
