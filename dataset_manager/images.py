"""Reading any image file as 8-bit RGB, and the resize / crop / normalize the backbone expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data, with a one-line message meant for the user."""


# Orientation tag values (EXIF 0x0112) that turn the picture by 90 degrees: width and height swap.
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)
# Full scales a single-channel 16/32-bit or float image is read against, smallest first: 8, 10,
# 12, 14 and 16 bits. The first that holds the image's maximum is its scale (see `gray_to_uint8`).
_FULL_SCALES = (255, 1023, 4095, 16383, 65535)


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says, as every viewer shows it."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):  # a damaged EXIF block: pixels as stored
        return image
    return ImageOps.exif_transpose(image) if orientation in range(2, 9) else image


def gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """A single-channel image of any number type as uint8, scaled from its real range.

    Non-negative values are read against the smallest full scale that holds their maximum:
    1.0 for float images whose values all lie in [0, 1], else 255, 1023, 4095, 16383 or 65535
    (8 to 16 bits), else their own maximum; so an 8-bit picture stored as float or 16-bit
    keeps its brightness, and 12-bit camera data fills the 8-bit range. Images with negative
    values are stretched from their minimum to their maximum. NaN or infinite values cannot be
    mapped: ValueError.
    """
    is_float = np.asarray(values).dtype.kind == "f"
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("it holds NaN or infinite values, which have no brightness")
    if values.size == 0:
        raise ValueError("it has no pixels")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        if is_float and high <= 1.0:
            full = 1.0
        else:
            full = next((scale for scale in _FULL_SCALES if high <= scale), high)
        scaled = values / full
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    """The image as (H, W, 3) uint8, as a viewer shows it: turned by its EXIF orientation, and
    whatever its mode: gray, RGB, RGBA / LA / palette (composited on white), CMYK, YCbCr, LAB,
    16-bit, 32-bit integer or float (`gray_to_uint8`). What cannot be read or mapped is a
    DataError naming the file and why: the loaders skip it and say so.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = _upright(image)
            if image.mode in ("I", "F") or image.mode.startswith("I;"):
                gray = gray_to_uint8(np.asarray(image))
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode in ("RGBA", "LA", "P", "PA", "RGBa"):
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def read_mask(path: Path) -> np.ndarray:
    """A ground-truth mask as (H, W) bool, turned by its EXIF orientation like images: a pixel is
    defect where its value is non-zero (with an alpha channel: where it is also not transparent)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = _upright(image)
            array = np.asarray(image)
            bands = image.getbands()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from None
    if array.ndim == 2:
        return (array != 0) & ~np.isnan(array) if array.dtype.kind == "f" else array != 0
    alpha = [index for index, band in enumerate(bands) if band in ("A", "a")]
    colour = [index for index in range(array.shape[2]) if index not in alpha]
    mask = array[:, :, colour].max(axis=2) > 0
    return mask & (array[:, :, alpha[0]] > 0) if alpha else mask


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), read from the file header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    return (width, height) if orientation in _SWAPS_SIDES else (height, width)


class Preprocessor:
    """Resize to RESIZE x RESIZE, centre-crop to CROP x CROP, normalize: what the model sees.

    Also knows where that crop lies in the original image, so maps can be put back there.
    """

    def __init__(self, resize: int, crop: int, mean: tuple, std: tuple) -> None:
        if crop > resize:
            raise DataError(f"CROP={crop} is larger than RESIZE={resize}: set CROP <= RESIZE")
        self.resize = int(resize)
        self.crop = int(crop)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.offset = (self.resize - self.crop) // 2

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """(3, CROP, CROP) float32 from an (H, W, 3) uint8 array."""
        pil = Image.fromarray(rgb).resize((self.resize, self.resize), Image.BILINEAR)
        array = np.asarray(pil, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        tensor = tensor[:, self.offset : self.offset + self.crop, self.offset : self.offset + self.crop]
        return (tensor - self.mean) / self.std

    def mask_tensor(self, mask: np.ndarray) -> torch.Tensor:
        """(CROP, CROP) bool, resized with nearest neighbour like the image."""
        pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.resize, self.resize), Image.NEAREST)
        array = np.asarray(pil) > 127
        array = array[self.offset : self.offset + self.crop, self.offset : self.offset + self.crop]
        return torch.from_numpy(array.copy())

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the model's view in original-image pixels."""
        scale_y, scale_x = height / self.resize, width / self.resize
        top, left = self.offset * scale_y, self.offset * scale_x
        return top, left, top + self.crop * scale_y, left + self.crop * scale_x

    def map_to_original(self, anomaly_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A (CROP, CROP) map placed at original size (H, W); outside the crop it is 0."""
        top, left, bottom, right = self.crop_box(height, width)
        t, l = int(round(top)), int(round(left))
        b, r = max(int(round(bottom)), t + 1), max(int(round(right)), l + 1)
        inner = F.interpolate(anomaly_map[None, None].float(), size=(b - t, r - l), mode="bilinear", align_corners=False)
        full = torch.zeros((height, width), dtype=torch.float32, device=anomaly_map.device)
        full[t:b, l:r] = inner[0, 0]
        return full
