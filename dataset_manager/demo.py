"""A small synthetic dataset in MVTec AD layout, so the suite runs out of the box with no data.

Each image is a machined disk (grooved metal-like texture on a dark background) with a little
position and lighting jitter; defect images carry scratches, holes or stains, with their masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, zoom

SIZE = 320
COUNTS = {"train/good": 80, "validation/good": 16, "test/good": 16, "test/scratch": 10, "test/hole": 10, "test/stain": 10}


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2))
    return zoom(coarse, scale, order=1)[:size, :size]


def _good_part(rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) float image in [0, 1]."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cy, cx = SIZE / 2 + rng.uniform(-6, 6, size=2)
    radius = np.hypot(yy - cy, xx - cx)
    angle = np.arctan2(yy - cy, xx - cx)
    grooves = 0.5 + 0.5 * np.sin(radius * 0.9 + rng.uniform(0, 2 * np.pi))
    brushed = 0.5 + 0.5 * np.sin(angle * 60 + radius * 0.05)
    texture = 0.55 + 0.12 * grooves + 0.05 * brushed + 0.04 * _smooth_noise(rng, SIZE, 16)
    texture += 0.02 * rng.standard_normal((SIZE, SIZE))
    light = 1.0 + rng.uniform(-0.06, 0.06) + 0.08 * (xx - cx) / SIZE
    part = (radius < 130) & (radius > 28)
    background = 0.12 + 0.02 * _smooth_noise(rng, SIZE, 32)
    gray = np.where(part, texture * light, background)
    rim = np.abs(radius - 130) < 2.5
    gray = np.where(rim, 0.35, gray)
    tint = np.array([1.0, 0.97, 0.9]) * rng.uniform(0.97, 1.03)
    return np.clip(gray[:, :, None] * tint, 0, 1)


def _inside_part(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    radius, angle = rng.uniform(45 + margin, 120 - margin), rng.uniform(0, 2 * np.pi)
    return SIZE / 2 + radius * np.sin(angle), SIZE / 2 + radius * np.cos(angle)


def _scratch(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    mask = Image.new("L", (SIZE, SIZE), 0)
    y, x = _inside_part(rng, 20)
    length, angle = rng.uniform(35, 70), rng.uniform(0, np.pi)
    points = [(x + t * length * np.cos(angle) + rng.normal(0, 2), y + t * length * np.sin(angle) + rng.normal(0, 2)) for t in np.linspace(-0.5, 0.5, 5)]
    ImageDraw.Draw(mask).line(points, fill=255, width=int(rng.integers(3, 6)))
    region = np.asarray(mask) > 0
    image[region] = image[region] * 0.35 + rng.uniform(0.0, 0.9) * 0.65
    return region


def _hole(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    mask = Image.new("L", (SIZE, SIZE), 0)
    y, x = _inside_part(rng, 12)
    ry, rx = rng.uniform(6, 13, size=2)
    ImageDraw.Draw(mask).ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    region = np.asarray(mask) > 0
    depth = gaussian_filter(region.astype(float), 2)
    image *= (1 - 0.85 * depth)[:, :, None]
    return region


def _stain(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    y, x = _inside_part(rng, 18)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    blob = np.exp(-(((yy - y) / rng.uniform(10, 20)) ** 2 + ((xx - x) / rng.uniform(10, 20)) ** 2))
    blob *= 1 + 0.5 * _smooth_noise(rng, SIZE, 8)
    region = blob > 0.45
    color = np.array([rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.45), rng.uniform(0.05, 0.2)])
    alpha = np.clip(gaussian_filter(region.astype(float), 1.5), 0, 1)[:, :, None] * 0.8
    image[:] = image * (1 - alpha) + color * alpha
    return region


DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain}


def generate_demo_dataset(root: Path, seed: int = 0) -> Path:
    """Write the demo category to `root` (MVTec AD layout, with masks); returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    staging = root.parent / f".{root.name}.partial"
    for subset, count in COUNTS.items():
        folder = staging / subset
        folder.mkdir(parents=True, exist_ok=True)
        kind = subset.split("/")[1]
        for number in range(count):
            image = _good_part(rng)
            name = f"{number:03d}"
            if kind != "good":
                mask = DEFECTS[kind](rng, image)
                mask_dir = staging / "ground_truth" / kind
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{name}_mask.png")
            Image.fromarray((image * 255 + 0.5).astype(np.uint8)).save(folder / f"{name}.png")
    staging.rename(root)
    return root
