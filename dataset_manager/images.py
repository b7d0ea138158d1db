"""Reading any image file as 8-bit RGB, and the geometry of what the model sees: resize, optional
centre crop, normalize; and back from the model's view to the original image."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# every file ending a dataset, test.py, the watched folder and an update read (the first frame of a
# GIF or a multi-page TIFF); serve.py's review page stores its corrections under one of these
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pnm")


class DataError(ValueError):
    """Bad input data, with a one-line message meant for the user."""


def printable_path(path: Path | str) -> str:
    """A file name as text that any UTF-8 file, page or answer can hold: a name whose bytes are not
    UTF-8 (a Latin-1 name from a Windows share) shows them as \\xe9 instead of failing the write."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


# Images of 89 to 179 megapixels decode (the tiles and the resizing handle them); PIL's warning
# about them would print its own source line into test.py's and serve.py's output.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

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


def full_scale_for(high: float, is_float: bool) -> float:
    """The full scale non-negative values up to `high` are read against: 1.0 for float values all in
    [0, 1], else the smallest of 255, 1023, 4095, 16383 and 65535 (8 to 16 bits) that holds `high`,
    else `high` itself."""
    if is_float and high <= 1.0:
        return 1.0
    return float(next((scale for scale in _FULL_SCALES if high <= scale), high))


def gray_to_uint8(values: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """A single-channel image of any number type as uint8, scaled from its real range.

    Non-negative values are read against `full_scale`, the model's (`Preprocessor.gray_full_scale`:
    one scale for all of a camera's images, so a dark frame stays dark and a bright one saturates),
    or, without one, against the image's own (`full_scale_for` its maximum): an 8-bit picture
    stored as float or 16-bit keeps its brightness, and 12-bit camera data fills the 8-bit range.
    Images with negative values are stretched from their minimum to their maximum. NaN or
    infinite values cannot be mapped: ValueError.
    """
    is_float = np.asarray(values).dtype.kind == "f"
    if is_float and not np.isfinite(values).all():
        raise ValueError("it holds NaN or infinite values, which have no brightness")
    if np.asarray(values).size == 0:
        raise ValueError("it has no pixels")
    scaled = np.array(values, dtype=np.float64)  # one copy of our own, scaled in place: a 12000 x 12000 frame needs no more
    low, high = float(scaled.min()), float(scaled.max())
    if low < 0:
        if high > low:
            scaled -= low
            scaled /= high - low
        else:
            scaled[...] = 0
    else:
        scaled /= full_scale or full_scale_for(high, is_float)
    scaled *= 255.0
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _is_high_depth(image: Image.Image) -> bool:
    """Single-channel 16-bit, 32-bit integer or float: the modes `gray_to_uint8` scales."""
    return image.mode in ("I", "F") or image.mode.startswith("I;")


def training_full_scale(paths: Sequence[Path]) -> float | None:
    """The full scale of the training images that are 16-bit, 32-bit or float gray (the one scale a
    model reads all such images against, `Preprocessor.gray_full_scale`), None when none is: 8-bit
    and colour images need none. Reads only the headers of the others."""
    highest, is_float = None, False
    for path in paths:
        try:
            with Image.open(path) as image:
                if not _is_high_depth(image):
                    continue
                image.load()
                values = np.asarray(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # the training run names unreadable files itself
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if finite.size == 0 or float(finite.min()) < 0:
            continue  # stretched per image (negative values): no scale to share
        highest = max(float(finite.max()), highest or 0.0)
        is_float = is_float or values.dtype.kind == "f"
    return None if highest is None else full_scale_for(highest, is_float)


def read_rgb(path: Path | BinaryIO, name: str | None = None, full_scale: float | None = None) -> np.ndarray:
    """The image as (H, W, 3) uint8, as a viewer shows it: turned by its EXIF orientation, and
    whatever its mode: gray, RGB, RGBA / LA / palette (composited on white), CMYK, YCbCr, LAB,
    16-bit, 32-bit integer or float (`gray_to_uint8`, against `full_scale`: the model's). What cannot be read or mapped is a
    DataError naming the file (or `name`, for an open file such as a received body) and why:
    the loaders skip it and say so.
    """
    shown = name or f"image {path}"
    try:
        if isinstance(path, (str, Path)) and os.path.getsize(path) == 0:
            raise DataError(f"cannot read {shown}: it is empty (0 bytes): copy it again from its source")
        with Image.open(path) as image:
            image.load()
            return pil_to_rgb(image, full_scale)
    except Image.DecompressionBombError:
        raise DataError(f"cannot read {shown}: it has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, more than is safe "
                        "to decode (a damaged or hostile file?): downscale it, or cut it into parts") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read {shown}: {error}") from None


def preview(rgb: np.ndarray, preview_size: int) -> np.ndarray:
    """A copy at most `preview_size` on its longer side (the image itself when it is smaller): what the
    pictures are drawn on, whether the image came from a file (the loader) or from memory (the API)."""
    if max(rgb.shape[:2]) <= preview_size:
        return rgb
    pil = Image.fromarray(rgb)
    pil.thumbnail((preview_size, preview_size), Image.BILINEAR)
    return np.asarray(pil)


def pil_to_rgb(image: Image.Image, full_scale: float | None = None) -> np.ndarray:
    """A loaded PIL image as `read_rgb` gives files: (H, W, 3) uint8, upright, any mode mapped."""
    image = _upright(image)
    if _is_high_depth(image):
        gray = gray_to_uint8(np.asarray(image), full_scale)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "P", "PA", "RGBa"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


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



# "auto" image size: about the pixel count of the published 224 x 224 input, at the training
# images' median aspect ratio, so a 2.5:1 part is not squashed into a square.
AUTO_PIXELS = 224 * 224
# The smallest side the backbones work on (IMAGE_SIZE's documented minimum): a computed size
# below it ("auto" on a 4000 x 16 strip) is clamped up to it, with a note.
MIN_SIDE = 32
# The published PaDiM recipe, and what the old RESIZE / CROP settings default to.
PUBLISHED_RESIZE, PUBLISHED_CROP = 256, 224
# Most pixels of working images in one batch (~96 MB as float32 RGB): no cap at 224 x 224
# (159 images), one image per batch from about 2800 x 2800.
BATCH_PIXELS = 8_000_000


def _pair(value, name: str) -> tuple[int, int]:
    """(height, width) from an int (a square) or a pair of ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, np.integer)) and v > 0 for v in value)):
        raise DataError(f"{name}={value!r}: expected (height, width) in pixels, like (224, 224)")
    return int(value[0]), int(value[1])


def _round_to(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def readable_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(height, width) of each image whose header can be read (the loader names the others later)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except DataError:
            continue
    return sizes


def resolve_image_size(setting, paths: Sequence[Path], stride: int) -> tuple[int, int]:
    """The (height, width) the model inspects, from the IMAGE_SIZE setting:

    (h, w) or an int: that size; "auto": the training images' median aspect ratio (height / width)
    at about AUTO_PIXELS pixels; a float f: f times the training images' median height and width
    (1.0: their own resolution, for tiling). Computed sizes are rounded to `stride`, the backbone's
    deepest stride, so every layer's grid divides the image exactly. Only file headers are read.
    """
    if isinstance(setting, str) and setting != "auto":
        raise DataError(f'IMAGE_SIZE={setting!r}: use (height, width), "auto", or a fraction of the images\' size like 1.0')
    if setting == "auto" or isinstance(setting, float):
        if isinstance(setting, float) and not 0 < setting <= 16:
            raise DataError(f"IMAGE_SIZE={setting}: a fraction of the training images' size must be in (0, 16]")
        sizes = readable_sizes(paths)
        if not sizes:
            raise DataError(f"IMAGE_SIZE={setting!r} needs readable training images to measure: none could be read")
        heights, widths = np.array(sizes, dtype=np.float64).T
        if setting == "auto":
            ratio = float(np.median(heights / widths))
            size = _round_to(math.sqrt(AUTO_PIXELS * ratio), stride), _round_to(math.sqrt(AUTO_PIXELS / ratio), stride)
        else:
            size = _round_to(float(np.median(heights)) * setting, stride), _round_to(float(np.median(widths)) * setting, stride)
        return _at_least_minimum(size, setting, stride)
    return _pair(setting, "IMAGE_SIZE")


def _at_least_minimum(size: tuple[int, int], setting, stride: int) -> tuple[int, int]:
    """`size` with each side clamped up to MIN_SIDE (rounded to `stride`), saying so on stderr:
    a very elongated part would otherwise be inspected below the backbones' minimum."""
    floor = math.ceil(MIN_SIDE / stride) * stride
    clamped = (max(size[0], floor), max(size[1], floor))
    if clamped != size:
        print(
            f"note: IMAGE_SIZE={setting!r} gives {size[0]} x {size[1]} px on these images, below the minimum of {MIN_SIDE} px: "
            f"clamped to {clamped[0]} x {clamped[1]} (the images' aspect ratio is not kept; set IMAGE_SIZE=(height, width) to choose)",
            file=sys.stderr,
        )
    return clamped


class Preprocessor:
    """Resize to `resize` (height, width), centre-crop to `size`, normalize: what the model sees.

    `resize == size` inspects the whole image (no crop). Ints mean squares, so the published
    recipe is Preprocessor(256, 224, ...). Also knows where the model's view lies in the original
    image, so maps, masks and pictures can be put back there.
    """

    def __init__(self, resize, size, mean: tuple, std: tuple) -> None:
        self.resize = _pair(resize, "resize")
        self.size = _pair(size, "IMAGE_SIZE")
        if any(s > r for s, r in zip(self.size, self.resize)):
            raise DataError(f"the inspected size {self.size} is larger than the resized image {self.resize}: CENTER_CROP must be <= 1")
        self.normalization = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._mean_array, self._std_array = self.mean.numpy(), self.std.numpy()  # the same values, for `image_tensor`
        self.offset = ((self.resize[0] - self.size[0]) // 2, (self.resize[1] - self.size[1]) // 2)
        # the full scale 16-bit / 32-bit / float gray images are read against (`training_full_scale`);
        # None: each such image against its own (models trained on 8-bit or colour images, older models)
        self.gray_full_scale: float | None = None

    @classmethod
    def with_center_crop(cls, size: tuple[int, int], center_crop: float, mean: tuple, std: tuple) -> "Preprocessor":
        """Inspect `size` as the central `center_crop` share of a larger resized image (1.0: no crop);
        (224, 224) with 0.875 is the published resize 256, crop 224."""
        if not 0 < center_crop <= 1:
            raise DataError(f"CENTER_CROP={center_crop}: the kept share of the resized image must be in (0, 1]; 1.0 = no crop")
        size = _pair(size, "IMAGE_SIZE")
        resize = tuple(max(s, int(round(s / center_crop))) for s in size)
        return cls(resize, size, mean, std)

    @classmethod
    def from_description(cls, prep: dict) -> "Preprocessor":
        """The preprocessing model.json records (older models saved square "resize" and "crop" ints)."""
        size = prep["image_size"] if "image_size" in prep else prep["crop"]
        preprocessor = cls(prep["resize"], size, tuple(prep["mean"]), tuple(prep["std"]))
        preprocessor.gray_full_scale = prep.get("gray_full_scale")
        return preprocessor

    def description(self, setting, center_crop: float) -> dict:
        """What model.json records: the resolved sizes, and the settings they came from."""
        return {
            "image_size": list(self.size),
            "resize": list(self.resize),
            "image_size_setting": list(setting) if isinstance(setting, (tuple, list)) else setting,
            "center_crop": float(center_crop),
            "mean": list(self.normalization[0]),
            "std": list(self.normalization[1]),
            **({"gray_full_scale": self.gray_full_scale} if self.gray_full_scale is not None else {}),
        }

    @property
    def crops(self) -> bool:
        return self.size != self.resize

    def _crop(self, array):
        (top, left), (height, width) = self.offset, self.size
        return array[..., top : top + height, left : left + width] if self.crops else array

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """(3, H, W) float32 from an (h, w, 3) uint8 array; in place where it can, since a large
        working image (tiling) is the biggest thing in memory."""
        pil = Image.fromarray(rgb)
        if pil.size != (self.resize[1], self.resize[0]):
            pil = pil.resize((self.resize[1], self.resize[0]), Image.BILINEAR)
        array = np.asarray(pil)
        if self.crops:
            array = array[self.offset[0] : self.offset[0] + self.size[0], self.offset[1] : self.offset[1] + self.size[1]]
        # normalized in numpy, not torch: a server's request threads then start no torch thread pool
        # of their own beside its scoring thread's (the values are the same float32 operations)
        values = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
        np.divide(values, np.float32(255.0), out=values)
        np.subtract(values, self._mean_array, out=values)
        np.divide(values, self._std_array, out=values)
        return torch.from_numpy(values)

    def mask_tensor(self, mask: np.ndarray) -> torch.Tensor:
        """(H, W) bool, resized with nearest neighbour and cropped like the image."""
        pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.resize[1], self.resize[0]), Image.NEAREST)
        return torch.from_numpy(np.ascontiguousarray(self._crop(np.asarray(pil) > 127)))

    def model_view(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8: the part of the image the anomaly map covers, pixel for pixel."""
        resized = np.asarray(Image.fromarray(rgb).resize((self.resize[1], self.resize[0]), Image.BILINEAR))
        return np.ascontiguousarray(self._crop(resized.transpose(2, 0, 1)).transpose(1, 2, 0))

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) of the model's view in original-image pixels."""
        scale_y, scale_x = height / self.resize[0], width / self.resize[1]
        top, left = self.offset[0] * scale_y, self.offset[1] * scale_x
        return top, left, top + self.size[0] * scale_y, left + self.size[1] * scale_x

    def map_to_original(self, anomaly_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """An (H, W) map placed at original size (height, width); outside the crop it is 0."""
        top, left, bottom, right = self.crop_box(height, width)
        t, l = int(round(top)), int(round(left))
        b, r = max(int(round(bottom)), t + 1), max(int(round(right)), l + 1)
        if (b - t, r - l) == tuple(anomaly_map.shape):  # tiled at the image's own size: nothing to resize
            inner = anomaly_map.float()
        else:
            inner = F.interpolate(anomaly_map[None, None].float(), size=(b - t, r - l), mode="bilinear", align_corners=False)[0, 0]
        if (t, l, b, r) == (0, 0, height, width):
            return inner
        full = torch.zeros((height, width), dtype=torch.float32, device=anomaly_map.device)
        full[t:b, l:r] = inner
        return full

    def batch_size(self, requested: int) -> int:
        """Images per batch: `requested`, fewer for large working images so a batch stays about
        BATCH_PIXELS pixels (a 6000 x 6000 working image is 432 MB as float32)."""
        return max(1, min(int(requested), BATCH_PIXELS // (self.size[0] * self.size[1])))

