"""The two dataset layouts the suite accepts, turned into one description: `Category`.

MVTec AD:  <category>/train/good, [validation/good], test/<type>/, ground_truth/<type>/<stem>_mask.png
Simple:    <root>/train_dataset_folder/*.jpg (good; an optional defect/ subfolder holds labeled defects)
           <root>/test_dataset_folder/good/, test_dataset_folder/defect/ (any other subfolder: a defect type)
Masks, either layout: ground_truth/<type>/<stem>_mask.png, or <stem>_mask.png beside the test image.
A root holding several MVTec categories gives one Category each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dataset_manager.images import IMAGE_EXTENSIONS, DataError

GOOD = "good"
# Subfolders that hold sorted or corrected images (REVIEW_DIR's good/ and defect/, a sorted
# WATCH_DIR's good/, defect/ and unreadable/): serve.py makes them, an update refuses a folder holding them.
SORTED_FOLDERS = ("good", "defect", "unreadable")


@dataclass(frozen=True)
class LabeledImage:
    """A test image with what is known of it: good or which defect type, and its mask if any."""

    path: Path
    defect_type: str  # "good" for good images
    mask_path: Path | None = None

    @property
    def is_defect(self) -> bool:
        return self.defect_type != GOOD


@dataclass
class Category:
    """One part type: the images a model is trained, validated and tested on."""

    name: str
    root: Path
    train_images: list[Path]
    validation_images: list[Path] = field(default_factory=list)  # empty: split from train
    train_defect_images: list[Path] = field(default_factory=list)  # labeled defects for the classifier
    test_dir: Path | None = None
    test_images: list[LabeledImage] = field(default_factory=list)
    mask_files: list[Path] = field(default_factory=list)  # `*_mask.*` files found among the training images, not learned
    ignored_folders: list[Path] = field(default_factory=list)  # subfolders of the training folder the layout does not read


def _other_folders(folder: Path, read: Sequence[str]) -> list[Path]:
    """Subfolders of a training folder that the layout does not read (a misspelt defects/, a goods/)."""
    if not folder.is_dir():
        return []
    return sorted(child for child in folder.iterdir() if child.is_dir() and child.name not in read and not child.name.startswith("."))


def is_mask_file(path: Path) -> bool:
    """A defect mask (`<stem>_mask.png`, as ground_truth/ names them) put beside images: never an image to learn."""
    return Path(path).stem.lower().endswith("_mask")


def _training_images(folder: Path, skip: Sequence[Path], masks: list[Path], recursive: bool = True) -> list[Path]:
    """The images of a training folder (empty when it is missing), less the mask files, which go to `masks`."""
    if not folder.is_dir():
        return []
    found = find_images(folder, recursive=recursive, skip=skip)
    masks += [path for path in found if is_mask_file(path)]
    return [path for path in found if not is_mask_file(path)]


def find_images(folder: Path, recursive: bool = True, skip: Sequence[Path] = ()) -> list[Path]:
    """Image files under `folder`, sorted; other files are ignored. Folders in `skip` (the tool's
    own outputs: MODEL_DIR, RESULTS_DIR) and their temporary leftovers are not searched, so heat
    maps and result pictures written inside a dataset are never read back as its images."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"folder {folder} does not exist: check the path")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a folder of images")
    outputs = {os.path.realpath(path) for path in skip}
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not _is_output(Path(root) / name, outputs)) if recursive else []
        found += [Path(root) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")]
    # a link whose file is gone stays in the list: reading it fails, and it is skipped and named like any unreadable file
    return sorted(path for path in found if path.is_file() or (path.is_symlink() and not path.exists()))


def _is_output(path: Path, outputs: set[str]) -> bool:
    """`path` is one of the tool's output folders, or a temporary leftover beside one of them
    (`.<name>.partial-...`, `.<name>.previous-...`: files.AtomicFolder's names)."""
    real = os.path.realpath(path)
    if real in outputs:
        return True
    return path.name.startswith(".") and any(
        os.path.dirname(output) == os.path.dirname(real) and path.name.startswith(f".{os.path.basename(output)}.") for output in outputs
    )


def outputs_inside(dataset_dir: Path, outputs: dict[str, str]) -> list[str]:
    """The names of the output folders (setting name -> folder) that lie inside `dataset_dir`."""
    root = os.path.realpath(dataset_dir)
    return [name for name, path in outputs.items() if path and os.path.realpath(path).startswith(root + os.sep)]


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train" / GOOD).is_dir()


def _is_simple_layout(folder: Path) -> bool:
    return (folder / "train_dataset_folder").is_dir()


def _require_images(images: list[Path], folder: Path, unread: Sequence[Path] = ()) -> list[Path]:
    """`images`, or a DataError naming `folder` (and its subfolders that are not read, if any)."""
    if not images:
        if unread:
            names = ", ".join(path.name for path in unread[:3]) + (", ..." if len(unread) > 3 else "")
            raise DataError(f"no images in {folder} or its good/ folder: its subfolders ({names}) are not read; "
                            f"move the good images into {folder / GOOD}/ (subfolders of good/ are read)")
        raise DataError(f"no images in {folder}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return images


def _test_type(type_dir: Path) -> str:
    """The label a test folder gives its images: "good" in any case (Good, GOOD) is good, else its name."""
    return GOOD if type_dir.name.lower() == GOOD else type_dir.name


def _mvtec_test_images(category_dir: Path, skip: Sequence[Path]) -> list[LabeledImage]:
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        return []
    return _labeled_test_images(category_dir, test_dir, skip)


def _labeled_test_images(category_dir: Path, test_dir: Path, skip: Sequence[Path]) -> list[LabeledImage]:
    """The images of each test/<type>/ folder with their masks (`_mask_of`); mask files are not test images."""
    labeled = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not _is_output(p, _real(skip))):
        for path in find_images(type_dir, skip=skip):
            if not is_mask_file(path):
                kind = _test_type(type_dir)
                labeled.append(LabeledImage(path, kind, None if kind == GOOD else _mask_of(category_dir, path)))
    return labeled


def _mask_of(category_dir: Path, image: Path) -> Path | None:
    """A defect image's ground-truth mask: ground_truth/<type>/<stem>_mask.<ext> in the category
    folder (MVTec AD), or <stem>_mask.<ext> beside the image (either layout); .png first, then any
    image format; None when there is none."""
    for folder in (category_dir / "ground_truth" / image.parent.name, image.parent):
        for suffix in (".png", *IMAGE_EXTENSIONS):
            candidate = folder / f"{image.stem}_mask{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _real(paths: Sequence[Path]) -> set[str]:
    return {os.path.realpath(path) for path in paths}


def category_name(folder: Path) -> str:
    """The category's (and its model's) name: the folder's name as the path shows it ("." and ".."
    name the folder they stand for; a link keeps its own name, not its target's)."""
    return Path(os.path.abspath(folder)).name


def _mvtec_category(folder: Path, skip: Sequence[Path]) -> Category:
    masks: list[Path] = []
    return Category(
        name=category_name(folder),
        root=folder,
        train_images=_require_images(_training_images(folder / "train" / GOOD, skip, masks), folder / "train" / GOOD),
        validation_images=_training_images(folder / "validation" / GOOD, skip, masks),
        train_defect_images=_training_images(folder / "train" / "defect", skip, masks),
        test_dir=folder / "test" if (folder / "test").is_dir() else None,
        test_images=_mvtec_test_images(folder, skip),
        mask_files=masks,
        ignored_folders=[p for p in _other_folders(folder / "train", (GOOD, "defect")) if not _is_output(p, _real(skip))],
    )


def _simple_category(folder: Path, skip: Sequence[Path]) -> Category:
    train_dir = folder / "train_dataset_folder"
    defect_dir = train_dir / "defect"
    masks: list[Path] = []
    good = _training_images(train_dir, skip, masks, recursive=False) + _training_images(train_dir / GOOD, skip, masks)
    test_dir = folder / "test_dataset_folder"
    test_images = _labeled_test_images(folder, test_dir, skip) if test_dir.is_dir() else []
    unread = [p for p in _other_folders(train_dir, (GOOD, "defect")) if not _is_output(p, _real(skip))]
    return Category(
        name=category_name(folder),
        root=folder,
        train_images=_require_images(sorted(good), train_dir, unread),
        train_defect_images=_training_images(defect_dir, skip, masks),
        test_dir=test_dir if test_dir.is_dir() else None,
        test_images=test_images,
        mask_files=masks,
        ignored_folders=unread,
    )


def find_categories(dataset_dir: Path, skip: Sequence[Path] = ()) -> list[Category]:
    """Every category found at `dataset_dir`, in either layout; a clear error when none is.
    Folders in `skip` (the tool's outputs, when they lie inside the dataset) are not searched."""
    root = Path(dataset_dir)
    if not root.exists():
        raise DataError(f"DATASET_DIR {root} does not exist: set DATASET_DIR in config.py or on the command line")
    if not root.is_dir():
        raise DataError(f"DATASET_DIR {root} is not a folder")
    if _is_mvtec_category(root):
        return [_mvtec_category(root, skip)]
    if _is_simple_layout(root):
        return [_simple_category(root, skip)]
    children = sorted(p for p in root.iterdir() if p.is_dir() and (_is_mvtec_category(p) or _is_simple_layout(p)) and not _is_output(p, _real(skip)))
    if children:  # a root of several categories, each in either layout
        return [_mvtec_category(child, skip) if _is_mvtec_category(child) else _simple_category(child, skip) for child in children]
    raise DataError(
        f"DATASET_DIR {root} holds no dataset: expected train_dataset_folder/ (simple layout), "
        "train/good/ (MVTec AD category) or category folders holding either"
    )
