"""Reading any image file as 8-bit RGB, and the resize / crop / normalize the backbone expects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data, with a one-line message meant for the user."""


def read_rgb(path: Path) -> np.ndarray:
    """The image as (H, W, 3) uint8, whatever its mode: gray, RGB, RGBA, palette or 16-bit.

    16-bit images are scaled by their type's range (not per image), so the brightness of
    one image stays comparable with another's.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
                gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if image.mode == "F":
                gray = np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255.0
                return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
            if image.mode in ("RGBA", "LA", "P", "PA"):
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def read_mask(path: Path) -> np.ndarray:
    """A ground-truth mask as (H, W) bool: any non-zero pixel is defect."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from None
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the file header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    return height, width


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
