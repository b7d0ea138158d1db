"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position over pretrained CNN features.

A patch embedding is a random subset of d channels of layers 1-3, the deeper layers upsampled
(nearest) to layer 1's grid; the fit keeps per-position running sums only (`gaussian.py`), so
memory is flat in the number of training images; a patch's score is its Mahalanobis distance to
its position's Gaussian.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from anomaly_model import distributed
from anomaly_model.backbone import DEFAULT_FEATURE_DIM, ModelError
from anomaly_model.base import AnomalyModel
from anomaly_model.files import CHUNK_ROWS, read_npy, read_npy_chunks
from anomaly_model.gaussian import StreamingGaussian, mahalanobis
from anomaly_model.schema import check
from settings import integer, sequence


def _nearest_source(source: int, target: int, device: torch.device) -> torch.Tensor:
    """Source index of each of `target` cells under F.interpolate(mode="nearest"), taken from
    interpolate itself so the channels-last embedding matches the published one exactly."""
    positions = torch.arange(source, dtype=torch.float32, device=device).view(1, 1, -1)
    return F.interpolate(positions, size=target, mode="nearest").view(-1).long()


def _lower_triangle_index(dim: int, device: torch.device) -> torch.Tensor:
    """Flat indices of a d x d matrix's lower triangle, row by row: the packed layout on disk."""
    rows, cols = torch.tril_indices(dim, dim, device=device)
    return rows * dim + cols


class Padim(AnomalyModel):
    """Patch distribution model: one Gaussian per patch position.

    Files: `mean.npy` (P, d) float32 means; `cholesky.npy` (P, d(d+1)/2) float32 packed lower
    Cholesky factors L of the covariances (Sigma = L L^T), about half the naive mean + inverse.
    """

    kind = "padim"
    OWN_SETTINGS = {"FEATURE_DIM": "feature_dim", "COVARIANCE_EPSILON": "epsilon"}

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "imagenet",
        layers: tuple[int, ...] = (1, 2, 3),
        feature_dim: int = 0,
        epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        seed: int = 0,
        device: str = "auto",
        precision: str = "float32",
    ) -> None:
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ModelError(f"COVARIANCE_EPSILON={epsilon} must be >= 0 (the paper uses 0.01)")
        super().__init__(backbone, weights, layers, blur_sigma, seed, device, precision)
        total = sum(self.extractor.channels)
        self.feature_dim = int(feature_dim) or min(DEFAULT_FEATURE_DIM[backbone], total)
        if not 0 < self.feature_dim <= total:
            raise ModelError(f"FEATURE_DIM={feature_dim} must be between 1 and {total} for {backbone} layers {self.layers}")
        generator = torch.Generator().manual_seed(self.seed)
        self.channel_indices_ = torch.randperm(total, generator=generator)[: self.feature_dim].sort().values
        self.mean_: torch.Tensor | None = None  # (P, d)
        self.cholesky_: torch.Tensor | None = None  # (P, d, d) lower Cholesky factors of the covariances

    def embed(self, images: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images -> position-major (P, B, d) patch embeddings and the patch grid (h, w).

        Each backbone slice's embedding is written straight into its columns of `out` (reused
        when its shape fits, as the fit does for every batch): no embedding is copied."""
        grid = None
        for start, features in self.backbone_slices(images):
            grid = tuple(features[0].shape[-2:])
            shape = (grid[0] * grid[1], len(images), self.feature_dim)
            if out is None or tuple(out.shape) != shape:
                out = torch.empty(shape, dtype=torch.float32, device=self.device)
            columns = out[:, start : start + len(features[0])]
            self._write_embedding(features, columns.view(*grid, *columns.shape[1:]))  # a view: writes land in out
            del features
        return out, grid

    def fit(self, batches: Iterable[torch.Tensor]) -> "Padim":
        """Fit on batches of normalized good images; memory stays flat in the number of images.

        Under torchrun every rank calls this with the batches of its own shard (maybe none) and
        every rank ends with the same model, that of all ranks' images (`gaussian.py`)."""
        accumulator = StreamingGaussian()
        batches = iter(batches)
        first = next(batches, None)
        embedding, grid = self.embed(first) if first is not None else (None, None)
        source, grid = distributed.first_given(grid)  # ranks without images learn the grid too
        if grid is None:
            raise ModelError("no training images could be read: nothing to fit")
        accumulator.share_shift(embedding, grid[0] * grid[1], self.feature_dim, self.device, source)
        if embedding is not None:
            accumulator.update(embedding)  # centers the buffer in place; the next batch overwrites it
        for images in batches:  # the rest of this rank's batches (none when the first was None)
            if embedding.shape[1] != len(images):
                embedding = None  # a smaller last batch: free the buffer before its own is made
            embedding, _ = self.embed(images, out=embedding)
            accumulator.update(embedding)
        del embedding
        self.mean_, self.cholesky_ = accumulator.finalize(self.epsilon)
        self.grid_size_ = grid
        self.n_train_images_ = accumulator.count
        return self

    def _write_embedding(self, features: list[torch.Tensor], out: torch.Tensor) -> None:
        """Layer features (b, C_k, h_k, w_k) -> out, an (h, w, b, d) view. The random channel subset
        is taken from each layer before the upsampling and concatenation, so the full embedding
        is never built; channels-last maps give each patch's channels contiguously."""
        height, width = out.shape[0], out.shape[1]
        indices = self.channel_indices_.to(features[0].device)
        start, column = 0, 0
        for feature in features:
            channels = feature.shape[1]
            chosen = indices[(indices >= start) & (indices < start + channels)] - start
            start += channels
            if chosen.numel():
                part = feature.permute(0, 2, 3, 1).index_select(3, chosen)  # (b, h_k, w_k, c)
                if part.shape[1:3] != (height, width):  # nearest upsampling, as F.interpolate does it
                    part = part.index_select(1, _nearest_source(part.shape[1], height, part.device))
                    part = part.index_select(2, _nearest_source(part.shape[2], width, part.device))
                out[..., column : column + chosen.numel()].copy_(part.permute(1, 2, 0, 3))
                column += chosen.numel()

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) score of each patch of each image: its Mahalanobis distance."""
        embedding, grid = self.embed(images)
        self.check_grid(grid)
        return self.embedding_scores(embedding, self.mean_, self.cholesky_).view(-1, *grid)

    def embedding_scores(self, embedding: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
        """(N, P) scores of (P, N, d) embeddings under the Gaussians (mean, cholesky): the one place
        a patch score is computed from statistics, whichever statistics they are."""
        with torch.no_grad():
            return mahalanobis(embedding, mean, cholesky)

    # --- saving and loading -------------------------------------------------------------------

    def settings(self) -> dict:
        return {**super().settings(), "feature_dim": self.feature_dim, "epsilon": self.epsilon}

    def fitted_state(self) -> dict:
        return {**super().fitted_state(), "channel_indices": self.channel_indices_.tolist()}

    def load_fitted_state(self, state: dict) -> None:
        super().load_fitted_state(state)
        total = sum(self.extractor.channels)
        check(state, {"channel_indices": sequence(integer(0, total - 1), length=self.feature_dim, order="increasing")}, "state")
        self.channel_indices_ = torch.tensor(state["channel_indices"], dtype=torch.long)

    def save_arrays(self, out) -> None:
        """mean.npy, and cholesky.npy packed by one index_select per block of positions while the
        previous block is hashed and written (no full packed copy in memory)."""
        mean = self.mean_.cpu()
        positions, dim = mean.shape
        factors = self.cholesky_.view(positions, dim * dim)
        lower = _lower_triangle_index(dim, factors.device)
        out.write_npy("mean.npy", mean.numpy())
        packed = (
            factors[start : start + CHUNK_ROWS].index_select(1, lower).cpu().numpy()
            for start in range(0, positions, CHUNK_ROWS)
        )
        out.write_npy_chunks("cholesky.npy", (positions, lower.numel()), packed)

    def load_arrays(self, folder, files: dict) -> None:
        positions, dim = self.grid_size_[0] * self.grid_size_[1], self.feature_dim
        mean = read_npy(folder, "mean.npy", files, (positions, dim))
        lower = _lower_triangle_index(dim, self.device)
        factors = torch.zeros(positions, dim * dim, dtype=torch.float32, device=self.device)
        start = 0
        for block in read_npy_chunks(folder, "cholesky.npy", files, (positions, dim * (dim + 1) // 2)):
            factors[start : start + block.shape[0]].index_copy_(1, lower, torch.from_numpy(block).to(self.device))
            start += block.shape[0]
        self.mean_ = torch.from_numpy(np.ascontiguousarray(mean)).to(self.device)
        self.cholesky_ = factors.view(positions, dim, dim)
