"""Tiles: cutting a large working image into overlapping backbone-sized pieces, and putting their
patch scores back onto the whole image's patch grid.

Why stitch patch scores rather than maps: a tile's patch grid is a window of the image's patch
grid (tiles start on grid cells), so the per-tile scores are simply placed there and averaged
where tiles overlap; the shared map post-processing (maps.MapMaker) then upsamples and blurs
once, at the working size. One tile covering the image gives exactly the untiled map, and every
model of the family gets tiling without knowing about it.

Tile starts are spread evenly from the image's first to its last pixel (so the last tile ends
on the border, nothing is left out) and put on the grid: each axis gets
n = ceil((L - overlap) / (tile - overlap)) tiles, so neighbours overlap by about `overlap` px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from anomaly_model.errors import ModelError


def check_tile_settings(tile: int, overlap: int, stride: int) -> None:
    """TILE_SIZE must be a multiple of the backbone's deepest stride (every layer's grid then fits
    the tile exactly); TILE_OVERLAP must leave each tile something new."""
    if tile < 0:
        raise ModelError(f"TILE_SIZE={tile} must be 0 (no tiles) or a tile side in pixels, like 224")
    if tile == 0:
        return
    if tile % stride:
        lower, upper = max(stride, tile // stride * stride), (tile // stride + 1) * stride
        raise ModelError(f"TILE_SIZE={tile} must be a multiple of {stride} (the backbone's stride at its deepest layer): use {lower} or {upper}")
    if not 0 <= overlap < tile:
        raise ModelError(f"TILE_OVERLAP={overlap} must be >= 0 and smaller than TILE_SIZE={tile}: neighbouring tiles share TILE_OVERLAP pixels")


def _starts(length: int, tile: int, overlap: int, cell: int) -> tuple[int, ...]:
    """Tile starts along one axis, on multiples of `cell`, the first at 0 and the last at length - tile."""
    if length == tile:
        return (0,)
    count = math.ceil((length - overlap) / (tile - overlap))
    spread = np.linspace(0, length - tile, count)
    return tuple(int(v) for v in np.unique(np.round(spread / cell).astype(int) * cell))


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of a working image lie: starts in pixels (row-major over the image) and
    windows on the image's patch grid (`cell` pixels per grid cell, the first layer's stride)."""

    image_size: tuple[int, int]
    tile: int
    cell: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]
    _coverage: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, image_size: tuple[int, int], tile: int, overlap: int, cell: int) -> "TileLayout":
        height, width = (int(v) for v in image_size)
        if tile > height or tile > width:
            raise ModelError(
                f"TILE_SIZE={tile} is larger than the inspected image ({height} x {width}, IMAGE_SIZE): "
                "lower TILE_SIZE or raise IMAGE_SIZE"
            )
        if height % cell or width % cell:
            nearest = (max(cell, round(height / cell) * cell), max(cell, round(width / cell) * cell))
            raise ModelError(
                f"with tiles the inspected size ({height}, {width}) must be a multiple of {cell} px (one patch): "
                f"use IMAGE_SIZE={nearest}"
            )
        return cls((height, width), tile, cell, _starts(height, tile, overlap, cell), _starts(width, tile, overlap, cell))

    @property
    def count(self) -> int:
        return len(self.tops) * len(self.lefts)

    @property
    def grid(self) -> tuple[int, int]:
        """The whole image's patch grid (h, w)."""
        return self.image_size[0] // self.cell, self.image_size[1] // self.cell

    @property
    def tile_grid(self) -> int:
        return self.tile // self.cell

    def starts(self) -> torch.Tensor:
        """(count, 2) (top, left) pixel starts, row-major: location k is row k // len(lefts)."""
        tops = torch.tensor(self.tops).repeat_interleave(len(self.lefts))
        lefts = torch.tensor(self.lefts).repeat(len(self.tops))
        return torch.stack([tops, lefts], dim=1)

    def chunks(self, images: torch.Tensor, max_tiles: int, whole_images: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(tiles (c, 3, t, t), image index (c,), location (c,)) for bounded chunks of the tiles of
        (B, 3, H, W) `images`. `whole_images`: each chunk holds every tile of its images, location
        by location (all its images' location 0, then location 1, ...), as PaDiM's statistics per
        tile location need; otherwise chunks of up to `max_tiles` tiles, image by image."""
        starts = self.starts()
        count, batch = self.count, len(images)
        if whole_images:
            per_chunk = max(1, max_tiles // count)
            for first in range(0, batch, per_chunk):
                image_index = torch.arange(first, min(batch, first + per_chunk))
                location = torch.arange(count).repeat_interleave(len(image_index))
                yield self._cut(images, image_index.repeat(count), location, starts), image_index.repeat(count), location
            return
        image_index = torch.arange(batch).repeat_interleave(count)
        location = torch.arange(count).repeat(batch)
        for first in range(0, batch * count, max_tiles):
            part = slice(first, first + max_tiles)
            yield self._cut(images, image_index[part], location[part], starts), image_index[part], location[part]

    def _cut(self, images: torch.Tensor, image_index: torch.Tensor, location: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Copies of the chosen tiles (one small copy per chunk; the image itself is never copied)."""
        t = self.tile
        return torch.stack([images[i, :, y : y + t, x : x + t] for i, (y, x) in zip(image_index.tolist(), starts[location].tolist())])

    def add(self, sums: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor, location: torch.Tensor) -> None:
        """Add (c, g, g) per-tile patch scores into (B, h, w) `sums` at their windows of the grid."""
        window = torch.arange(self.tile_grid, device=sums.device)
        cells = (self.starts()[location] // self.cell).to(sums.device)
        rows = (cells[:, 0, None] + window)[:, :, None]
        columns = (cells[:, 1, None] + window)[:, None, :]
        sums.index_put_((image_index.to(sums.device)[:, None, None], rows, columns), scores.float(), accumulate=True)

    def coverage(self, device: torch.device) -> torch.Tensor:
        """(h, w) number of tiles over each grid cell (at least 1: the tiles cover the image)."""
        key = str(device)
        if key not in self._coverage:
            counts = torch.zeros(1, *self.grid, device=device)
            ones = torch.ones(self.count, self.tile_grid, self.tile_grid, device=device)
            self.add(counts, ones, torch.zeros(self.count, dtype=torch.long), torch.arange(self.count))
            self._coverage[key] = counts[0]
        return self._coverage[key]
