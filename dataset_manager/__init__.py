"""Finding, reading and batching images: the only package that touches the user's image files."""

from dataset_manager.images import IMAGE_EXTENSIONS, DataError, Preprocessor, printable_path, read_mask, read_rgb
from dataset_manager.layouts import Category, LabeledImage, find_categories, find_images, is_mask_file, outputs_inside
from dataset_manager.loader import ImageBatches

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "Preprocessor",
    "printable_path",
    "read_mask",
    "read_rgb",
    "Category",
    "LabeledImage",
    "find_categories",
    "find_images",
    "is_mask_file",
    "outputs_inside",
    "ImageBatches",
]
