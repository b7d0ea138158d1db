"""From patch scores to anomaly maps: the one post-processing every anomaly model shares.

A model scores each patch of its feature grid (h, w); the map a user sees is those scores
upsampled bilinearly to the image (H, W) and smoothed with a Gaussian of sigma BLUR_SIGMA, as
the PaDiM and PatchCore reference code do it (scipy.ndimage.gaussian_filter, truncate 4,
mode reflect). Both steps are linear and separable, so each axis is one small (H, h) matrix,
blur @ upsample, and a whole map is two matrix products: no (H, W) intermediate, no convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blur_matrix(size: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(size, size) matrix B with B @ v = scipy.ndimage.gaussian_filter1d(v, sigma) (truncate 4,
    mode reflect): the kernel folded onto the signal's mirrored edges. A dense product with B is
    ~30x faster on the CPU than a one-channel conv2d with a 33-tap kernel."""
    radius = min(int(4.0 * sigma + 0.5), size - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = torch.arange(size)[:, None].expand(size, offsets.numel())
    columns = rows + offsets.long()[None, :]
    columns = torch.where(columns < 0, -columns - 1, columns)  # half-sample symmetric, as scipy's "reflect"
    columns = torch.where(columns >= size, 2 * size - columns - 1, columns)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), columns.reshape(-1)), kernel.repeat(size), accumulate=True)
    return matrix.float().to(device)


def upsample_matrix(source: int, target: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(target, source) matrix U with U @ v = F.interpolate(v, target, bilinear, align_corners=False)."""
    identity = torch.eye(source, dtype=torch.float64)[None, None]
    columns = F.interpolate(identity, size=(target, source), mode="bilinear", align_corners=False)[0, 0]
    return columns.float().to(device)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps, as scipy.ndimage.gaussian_filter (truncate 4, mode reflect)
    computes it, so maps match the published implementations; runs on the maps' device."""
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    return blur_matrix(height, sigma, maps.device) @ maps.float() @ blur_matrix(width, sigma, maps.device).T


class MapMaker:
    """Turns (B, h, w) patch scores into (B, H, W) anomaly maps; keeps the last operators it built."""

    def __init__(self, blur_sigma: float) -> None:
        self.blur_sigma = float(blur_sigma)
        self._key: tuple | None = None
        self._operators: tuple[torch.Tensor, torch.Tensor] | None = None

    def operators(self, grid: tuple[int, int], size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, h) and (W, w) matrices, each blur @ upsample along its axis."""
        key = (tuple(grid), tuple(size), str(device))
        if key != self._key:
            operators = []
            for source, target in zip(grid, size):
                operator = upsample_matrix(source, target, device)
                if self.blur_sigma > 0:
                    operator = blur_matrix(target, self.blur_sigma, device) @ operator
                operators.append(operator)
            self._key, self._operators = key, (operators[0], operators[1])
        return self._operators

    def __call__(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) patch scores -> (B, H, W) maps at image size (H, W)."""
        return apply_operators(patch_scores, *self.operators(tuple(patch_scores.shape[-2:]), size, patch_scores.device))


def apply_operators(patch_scores: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) maps with `MapMaker.operators`: two matrix products, which is
    also how an exported model (`base.ScoringModule`) holds the post-processing, as two constants."""
    return rows @ patch_scores.float() @ columns.T
