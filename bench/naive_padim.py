"""A deliberately naive PaDiM, written the way the published algorithm describes it.

It is the yardstick for bench/benchmark.py: same backbone stages and weights (our
FeatureExtractor), same channel subset and preprocessing as anomaly_model.padim.Padim, so any
difference in ROCAUC comes from the numerics, not from the recipe. What makes it naive:

* every training embedding is kept in memory until the end of the fit;
* the FULL embedding (all channels of layers 1-3, upsampled and concatenated) is built first,
  and only then is the random channel subset taken;
* the covariance is np.cov per patch position (float64), then np.linalg.inv per position;
* scoring loops over patch positions in Python; maps are upsampled bilinearly and blurred
  with scipy.ndimage.gaussian_filter(sigma=4) image by image on the CPU.

The model state is the float32 mean (P, d) and the float32 inverse covariances (P, d, d).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from anomaly_model.backbone import DEFAULT_FEATURE_DIM, FeatureExtractor


def full_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """(B, sum C_k, h, w): every layer upsampled (nearest) to layer 1's grid and concatenated."""
    size = features[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features], dim=1)


class NaivePadim:
    """PaDiM as published: keep everything, per-position numpy statistics and distances."""

    def __init__(self, backbone: str, weights: str, layers: tuple[int, ...] = (1, 2, 3), feature_dim: int = 0,
                 epsilon: float = 0.01, blur_sigma: float = 4.0, seed: int = 0) -> None:
        self.extractor = FeatureExtractor(backbone, weights, tuple(layers), seed)
        total = sum(self.extractor.channels)
        self.feature_dim = int(feature_dim) or min(DEFAULT_FEATURE_DIM[backbone], total)
        # The same seeded subset as Padim, so both models look at the same channels.
        generator = torch.Generator().manual_seed(seed)
        self.channel_indices = torch.randperm(total, generator=generator)[: self.feature_dim].sort().values
        self.epsilon = float(epsilon)
        self.blur_sigma = float(blur_sigma)
        self.mean: np.ndarray | None = None  # (P, d) float32
        self.inv_covariance: np.ndarray | None = None  # (P, d, d) float32
        self.grid: tuple[int, int] | None = None

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """(B, d, P) float32: full embedding first, channel subset afterwards."""
        with torch.no_grad():
            embedding = full_embedding(self.extractor(images))
        self.grid = tuple(embedding.shape[-2:])
        return embedding.index_select(1, self.channel_indices).flatten(2).numpy()

    def fit(self, batches: Iterable[torch.Tensor]) -> "NaivePadim":
        """Keeps every layer output of every image, then builds the embedding of all of them."""
        kept: list[list[torch.Tensor]] = []
        for images in batches:
            with torch.no_grad():
                kept.append(self.extractor(images))
        layers = [torch.cat([batch[k] for batch in kept]) for k in range(len(kept[0]))]
        del kept
        embedding = full_embedding(layers)  # (N, C, h, w), all channels
        del layers
        self.grid = tuple(embedding.shape[-2:])
        vectors = embedding.index_select(1, self.channel_indices).flatten(2).numpy()  # (N, d, P)
        del embedding
        n, dim, positions = vectors.shape
        self.mean = vectors.mean(axis=0).T.astype(np.float32).copy()  # (P, d)
        identity = np.identity(dim)
        covariance = np.zeros((positions, dim, dim), dtype=np.float64)
        for i in tqdm(range(positions), desc="naive covariance", unit="pos", mininterval=5):
            covariance[i] = np.cov(vectors[:, :, i], rowvar=False) + self.epsilon * identity
        del vectors
        self.inv_covariance = np.empty((positions, dim, dim), dtype=np.float32)
        for i in tqdm(range(positions), desc="naive inverse", unit="pos", mininterval=5):
            self.inv_covariance[i] = np.linalg.inv(covariance[i])
        return self

    def patch_distances(self, images: torch.Tensor) -> np.ndarray:
        """(B, h, w) Mahalanobis distances, one patch position at a time."""
        vectors = self.embed(images).astype(np.float64)  # (B, d, P)
        batch, _, positions = vectors.shape
        distances = np.empty((batch, positions))
        for i in range(positions):
            delta = vectors[:, :, i] - self.mean[i]
            distances[:, i] = np.sqrt(np.einsum("nd,de,ne->n", delta, self.inv_covariance[i].astype(np.float64), delta))
        return distances.reshape(batch, *self.grid)

    def anomaly_maps(self, images: torch.Tensor) -> np.ndarray:
        """(B, H, W) float64 maps: bilinear upsampling, then scipy's Gaussian blur image by image."""
        distances = torch.from_numpy(self.patch_distances(images))
        upsampled = F.interpolate(distances[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return np.stack([gaussian_filter(m, sigma=self.blur_sigma) for m in upsampled[:, 0].numpy()])

    def state_bytes(self) -> int:
        """Bytes of the float32 mean and inverse covariances: what a naive model file holds."""
        return int(self.mean.nbytes + self.inv_covariance.nbytes)

    def save(self, path_prefix: str) -> int:
        """np.save the state (mean.npy, inv_covariance.npy); returns bytes written."""
        np.save(f"{path_prefix}_mean.npy", self.mean)
        np.save(f"{path_prefix}_inv_covariance.npy", self.inv_covariance)
        return self.state_bytes()

    def load(self, path_prefix: str, grid: tuple[int, int]) -> "NaivePadim":
        self.mean = np.load(f"{path_prefix}_mean.npy")
        self.inv_covariance = np.load(f"{path_prefix}_inv_covariance.npy")
        self.grid = tuple(grid)
        return self
