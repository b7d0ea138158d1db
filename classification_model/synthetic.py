"""Synthetic defects painted onto good images, so the classifier has defects to learn from when
the user has few or no labeled ones.

Each type teaches the classifier a different way real defects show up in the anomaly map:

- "cutpaste": a patch of the same image, flipped/rotated, pasted elsewhere with a soft edge.
  In-distribution colours and texture in the wrong place (misplaced structure, cuts, folds):
  the map rises only moderately, so it teaches the classifier the faint end of the defect range,
  where the decision matters; on tire it is the type that makes the classifier beat the max score
  (docs/classifier.md, "Ablation"); scratches and textures are mostly far above the threshold.
- "scratch": a thin curved line, darker or brighter than the surface. Long, narrow regions
  (scratches, cracks, cuts): small areas above the levels.
- "texture": a blob of smoothed-noise shape filled with a foreign noise texture and colour,
  alpha-blended (stains, contamination, holes, foreign material): compact regions of varying
  strength.

Sizes are fractions of the inspected area's shorter side (SIZE range), opacity is drawn from
STRENGTH, and everything is placed inside the part of the image the model looks at (`box`: the
whole image, or its centre crop; `Preprocessor.crop_box`), whatever its shape. Gray images get gray
defects. All randomness comes from a numpy Generator, so a seed reproduces the set exactly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFECT_TYPES = ("cutpaste", "scratch", "texture")


def _soft_blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(h, w) float alpha in [0, 1]: an irregular blob from thresholded smoothed noise inside an ellipse."""
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = ((yy - (height - 1) / 2) / (height / 2)) ** 2 + ((xx - (width - 1) / 2) / (width / 2)) ** 2
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=max(1.0, min(height, width) / 6))
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    shape = (1.0 - ellipse) + 0.35 * noise > 0.25
    if not shape.any():
        shape = ellipse < 0.5
    return np.clip(ndimage.gaussian_filter(shape.astype(np.float64), sigma=1.0), 0, 1)


def _foreign_color(rng: np.random.Generator, gray: bool, base: np.ndarray) -> np.ndarray:
    """A colour clearly different from the surface's mean `base` (3,)."""
    if gray:
        level = rng.uniform(0, 60) if base.mean() > 127 else rng.uniform(190, 255)
        if rng.random() < 0.3:  # sometimes same side, different level: subtler
            level = np.clip(base.mean() + rng.choice([-1, 1]) * rng.uniform(40, 90), 0, 255)
        return np.full(3, level)
    return rng.uniform(0, 255, size=3)


def _pick_corner(image: np.ndarray, rng: np.random.Generator, box: tuple, h: int, w: int) -> tuple[int, int]:
    """Top-left corner for an (h, w) defect inside `box`. Half of the time drawn in proportion to the
    local contrast (smoothed gradient magnitude), so defects land on the part rather than on plain
    background in object-centred images; otherwise uniform, so textured surfaces are covered evenly."""
    top, left, bottom, right = box
    if rng.random() < 0.5:
        return int(rng.integers(top, bottom - h)), int(rng.integers(left, right - w))
    gray = image[top:bottom, left:right].mean(axis=2)
    step = max(1, min(gray.shape) // 64)  # a coarse grid is enough to find where the part is
    small = gray[::step, ::step]
    contrast = ndimage.gaussian_filter(np.hypot(ndimage.sobel(small, 0), ndimage.sobel(small, 1)), 2.0)
    limit_y, limit_x = max(1, (bottom - top - h) // step), max(1, (right - left - w) // step)
    weights = contrast[:limit_y, :limit_x].ravel() + 1e-6
    cell = rng.choice(weights.size, p=weights / weights.sum())
    y, x = divmod(int(cell), limit_x)
    return top + min(y * step, bottom - top - h - 1), left + min(x * step, right - left - w - 1)


def _blend(image: np.ndarray, top: int, left: int, patch: np.ndarray, alpha: np.ndarray) -> None:
    h, w = alpha.shape
    region = image[top : top + h, left : left + w]
    region[:] = region * (1 - alpha[..., None]) + patch * alpha[..., None]


def cutpaste(image: np.ndarray, rng: np.random.Generator, size: float, strength: float, box: tuple) -> np.ndarray:
    top, left, bottom, right = box
    side = min(bottom - top, right - left)
    h = max(4, int(side * size * rng.uniform(0.6, 1.0)))
    w = max(4, int(side * size * rng.uniform(0.6, 1.4)))
    h, w = min(h, bottom - top - 1), min(w, right - left - 1)
    sy, sx = rng.integers(top, bottom - h), rng.integers(left, right - w)
    patch = image[sy : sy + h, sx : sx + w].copy()
    patch = np.rot90(patch, k=2) if rng.random() < 0.5 else patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
    patch = patch * rng.uniform(0.85, 1.15)  # slight brightness change, as a real misplaced piece would have
    ty, tx = _pick_corner(image, rng, box, h, w)
    alpha = np.clip(ndimage.gaussian_filter(np.pad(np.ones((h - 2, w - 2)), 1), 0.8), 0, 1) * strength
    _blend(image, ty, tx, patch, alpha)
    return image


def scratch(image: np.ndarray, rng: np.random.Generator, size: float, strength: float, box: tuple, gray: bool) -> np.ndarray:
    top, left, bottom, right = box
    side = min(bottom - top, right - left)
    length = max(8.0, side * size * rng.uniform(1.5, 3.0))
    thickness = max(1.0, side * rng.uniform(0.004, 0.012))
    length = min(length, side - 2.0)
    cy, cx = _pick_corner(image, rng, box, int(length), int(length))
    y0, x0 = cy + length / 2, cx + length / 2
    angle, bend = rng.uniform(0, np.pi), rng.uniform(-1.0, 1.0) / length
    t = np.linspace(-length / 2, length / 2, int(length * 2))
    ys = y0 + t * np.sin(angle) + bend * t**2 * np.cos(angle)
    xs = x0 + t * np.cos(angle) - bend * t**2 * np.sin(angle)
    mask = np.zeros(image.shape[:2])
    ys = np.clip(ys.round().astype(int), 0, image.shape[0] - 1)
    xs = np.clip(xs.round().astype(int), 0, image.shape[1] - 1)
    mask[ys, xs] = 1.0
    mask = ndimage.grey_dilation(mask, size=(int(round(thickness)),) * 2) if thickness >= 2 else mask
    alpha = np.clip(ndimage.gaussian_filter(mask, 0.7) * 1.5, 0, 1) * strength
    base = image[top:bottom, left:right].reshape(-1, 3).mean(axis=0)
    color = _foreign_color(rng, gray, base) if rng.random() < 0.5 else np.full(3, 20.0 if base.mean() > 127 else 235.0)
    image[:] = image * (1 - alpha[..., None]) + color * alpha[..., None]
    return image


def texture(image: np.ndarray, rng: np.random.Generator, size: float, strength: float, box: tuple, gray: bool) -> np.ndarray:
    top, left, bottom, right = box
    side = min(bottom - top, right - left)
    h = min(bottom - top - 1, max(6, int(side * size * rng.uniform(0.7, 1.3))))
    w = min(right - left - 1, max(6, int(side * size * rng.uniform(0.7, 1.3))))
    ty, tx = _pick_corner(image, rng, box, h, w)
    base = image[ty : ty + h, tx : tx + w].reshape(-1, 3).mean(axis=0)
    color = _foreign_color(rng, gray, base)
    grain = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=rng.uniform(0.5, 2.0))
    grain = grain / (grain.std() + 1e-9) * rng.uniform(5, 40)
    patch = color[None, None, :] + grain[..., None]
    _blend(image, ty, tx, patch, _soft_blob(rng, h, w) * strength)
    return image


def make_defect(
    rgb: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    size_range: tuple[float, float],
    strength_range: tuple[float, float],
    box: tuple[float, float, float, float],
) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 image `rgb` with one synthetic defect of type `kind`, inside
    `box` = (top, left, bottom, right), the part of the image the model sees, in its pixels."""
    if kind not in DEFECT_TYPES:
        raise ValueError(f"unknown synthetic defect type {kind!r}; known: {', '.join(DEFECT_TYPES)}")
    image = rgb.astype(np.float64)
    gray = bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))
    top, left, bottom, right = box
    box = (int(top), int(left), int(bottom), int(right))
    size = rng.uniform(*size_range)
    strength = rng.uniform(*strength_range)
    if kind == "cutpaste":
        cutpaste(image, rng, size, strength, box)
    elif kind == "scratch":
        scratch(image, rng, size, strength, box, gray)
    else:
        texture(image, rng, size, strength, box, gray)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)
