"""Batches of preprocessed images, read in worker processes; unreadable files are skipped, not fatal."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataset_manager.images import DataError, Preprocessor, preview, read_rgb

SKIPPED_SHOWN = 3  # unreadable files named in an error line; the warnings list all of them


def skipped_summary(skipped: list[tuple[Path, str]]) -> str:
    """'3 skipped: a.png (why); ...' for a one-line error: the first few files and their reasons."""
    shown = []
    for path, reason in skipped[:SKIPPED_SHOWN]:
        reason = reason.split(f"{path}: ", 1)[-1].replace(str(path), Path(path).name)
        shown.append(f"{Path(path).name} ({reason})")
    more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{len(skipped)} skipped: " + "; ".join(shown) + more


def warn_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One WARNING line per unreadable file a run went on without, with why (every script says them alike)."""
    for path, reason in skipped:
        print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)


@dataclass
class Batch:
    """Preprocessed images with their index in the path list and their original size."""

    images: torch.Tensor  # (B, 3, H, W) at the model's working size
    indices: list[int]
    sizes: list[tuple[int, int]]  # original (height, width)
    previews: list[np.ndarray | None]  # (h, w, 3) uint8 copies at most `preview_size` wide, or None


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocessor: Preprocessor, preview_size: int) -> None:
        self.paths = paths
        self.preprocessor = preprocessor
        self.preview_size = preview_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            rgb = read_rgb(self.paths[index], full_scale=self.preprocessor.gray_full_scale)
        except DataError as error:  # the reason only: the warning names the file once, before it
            path = str(self.paths[index])
            return index, None, str(error).split(f"{path}: ", 1)[-1].replace(path, Path(path).name)
        shown = preview(rgb, self.preview_size) if self.preview_size else None
        return index, self.preprocessor.image_tensor(rgb), (rgb.shape[0], rgb.shape[1], shown)


def _collate(items):
    good = [item for item in items if item[1] is not None]
    failed = [(item[0], item[2]) for item in items if item[1] is None]
    # one image (large working images come one per batch): a view, not a copy of the biggest array
    images = (good[0][1][None] if len(good) == 1 else torch.stack([item[1] for item in good])) if good else None
    return images, [item[0] for item in good], [item[2] for item in good], failed


class ImageBatches:
    """Iterate over `paths` in batches; `skipped` lists (path, reason) of files that could not be read.

    Memory stays flat however many paths there are: only a few batches are decoded at a time,
    and large working images come fewer per batch (`Preprocessor.batch_size`).
    """

    def __init__(
        self,
        paths: list[Path],
        preprocessor: Preprocessor,
        batch_size: int,
        num_workers: int = 0,
        preview_size: int = 0,
    ) -> None:
        self.paths = list(paths)
        self.skipped: list[tuple[Path, str]] = []
        batch_size = preprocessor.batch_size(batch_size)
        self._loader = DataLoader(
            _ImageFiles(self.paths, preprocessor, preview_size),
            batch_size=batch_size,
            shuffle=False,
            num_workers=max(0, int(num_workers)) if len(self.paths) > batch_size else 0,
            collate_fn=_collate,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = []
        for images, indices, extras, failed in self._loader:
            self.skipped += [(self.paths[index], reason) for index, reason in failed]
            if images is None:
                continue
            yield Batch(images, indices, [(h, w) for h, w, _ in extras], [p for _, _, p in extras])
