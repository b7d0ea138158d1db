"""Per-image pictures for test.py: a heat-map overlay with the defect contour, and a binary mask.

Drawn with numpy and PIL, not a matplotlib figure per image: a few milliseconds each.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from dataset_manager import Preprocessor

_JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour erosion by array slicing: cheaper than scipy's on a whole picture."""
    eroded = mask.copy()
    eroded[1:] &= mask[:-1]
    eroded[:-1] &= mask[1:]
    eroded[:, 1:] &= mask[:, :-1]
    eroded[:, :-1] &= mask[:, 1:]
    return eroded


def color_range(description: dict) -> tuple[float, float]:
    """Fixed heat-map scale for every image of a model: the image threshold sits mid-scale."""
    low = float(description["validation"]["pixel_quantiles"]["0.5"])
    threshold = float(description["thresholds"]["image"])
    return low, max(2 * threshold - low, low + 1e-6)


def overlay(preview: np.ndarray, map_at_preview: torch.Tensor, pixel_threshold: float, scale: tuple[float, float]) -> np.ndarray:
    """(h, w, 3) uint8: the image under a jet heat map, the predicted defect outlined in white."""
    values = map_at_preview.numpy().astype(np.float32, copy=False)
    low, high = scale
    level = np.clip((values - np.float32(low)) * np.float32(1.0 / (high - low)), 0, 1)
    heat = _JET[(level * 255).astype(np.uint8)]
    alpha = (np.float32(0.6) * level)[:, :, None]
    base = preview.astype(np.float32)
    blended = base + alpha * (heat - base)  # float32 throughout: float64 doubled the cost
    defect = values >= pixel_threshold
    blended[defect & ~_erode(_erode(defect))] = 255  # a 2-pixel outline
    return blended.astype(np.uint8)


def picture_arrays(
    anomaly_map: torch.Tensor,
    size: tuple[int, int],
    preview: np.ndarray,
    preprocessor: Preprocessor,
    pixel_threshold: float,
    scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """(overlay (h, w, 3) uint8 at the preview's size, mask (H, W) bool at the original `size`).

    The map is put back at the original size once; a preview of that same size (images up to
    PREVIEW_SIZE) reuses it instead of interpolating a second time."""
    height, width = size
    full = preprocessor.map_to_original(anomaly_map, height, width)
    same = preview.shape[:2] == (height, width)
    small = full if same else preprocessor.map_to_original(anomaly_map, preview.shape[0], preview.shape[1])
    return overlay(preview, small, pixel_threshold, scale), (full >= pixel_threshold).numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """An image array as PNG, fast compression (pictures are made per image, on demand)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


MAX_STEM_BYTES = 200  # file names are at most 255 bytes on common file systems: room for "_overlay.jpg" and more


def short_stem(stem: str, limit: int = MAX_STEM_BYTES) -> str:
    """`stem`, or when longer than `limit` bytes its start and a hash of the whole (names stay distinct)."""
    data = stem.encode("utf-8", "surrogateescape")
    if len(data) <= limit:
        return stem
    return f"{data[: limit - 9].decode('utf-8', 'ignore')}-{hashlib.sha1(data).hexdigest()[:8]}"


def write_pictures(folder: Path, stem: str, arrays: tuple[np.ndarray, np.ndarray]) -> tuple[Path, Path]:
    """`<stem>_overlay.jpg` at preview size and `<stem>_mask.png` at the original size, from
    `picture_arrays`' (overlay, mask); a stem too long for a file name is shortened (`short_stem`)."""
    overlay_array, mask = arrays
    stem = short_stem(stem)
    overlay_path = folder / f"{stem}_overlay.jpg"
    Image.fromarray(overlay_array).save(overlay_path, quality=90)
    mask_path = folder / f"{stem}_mask.png"
    Image.fromarray(mask).save(mask_path, optimize=False, compress_level=1)
    return overlay_path, mask_path
