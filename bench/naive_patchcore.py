"""A deliberately naive PatchCore, written the way a straightforward implementation does it.

It is the yardstick for bench/benchmark.py: the same backbone stages and weights (our
FeatureExtractor), the same features (3x3 average pooling, bilinear upsampling to the first
stage's grid, concatenation), the same seeded random projection and the same seeded start point
as anomaly_model.patchcore.PatchCore, so any difference in ROCAUC comes from the numerics, not
from the recipe. What makes it naive (as anomalib's KCenterGreedy and Patchcore do it):

* every batch's embedding is kept in a list and concatenated into one bank at the end;
* the whole bank is projected at once;
* greedy selection step by step: each step computes the distance of every projected point to the
  new center as `torch.linalg.norm(features - center, dim=1)` (a fresh N x 128 difference
  matrix), then `torch.minimum` and `torch.argmax`, as a straightforward loop does;
* scoring: `torch.cdist` of every test patch against the whole coreset (one full matrix per
  batch), then the minimum; the eq. 7 weight from `torch.cdist` and `topk` as anomalib does;
* maps upsampled with F.interpolate and blurred with scipy.ndimage.gaussian_filter per image.

The model state is the coreset (K, D) float32, as torch.save writes it.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from anomaly_model.backbone import FeatureExtractor
from anomaly_model.coreset import coreset_size, projection_matrix


def naive_greedy(projected: torch.Tensor, count: int, start: int) -> list[int]:
    """Greedy k-center as a straightforward loop writes it: every step a fresh (N, d) difference."""
    selected = [start]
    min_distances = torch.linalg.norm(projected - projected[start], dim=1)
    for _ in tqdm(range(count - 1), desc="naive coreset", unit="pt", file=sys.stderr, mininterval=5):
        index = int(torch.argmax(min_distances))
        selected.append(index)
        distances = torch.linalg.norm(projected - projected[index], dim=1)
        min_distances = torch.minimum(min_distances, distances)
    return selected


class NaivePatchCore:
    """PatchCore as commonly implemented: keep the whole bank, select with full distance vectors."""

    def __init__(self, backbone: str, weights: str, layers: tuple[int, ...] = (2, 3), coreset_ratio: float = 0.1,
                 neighbors: int = 0, projection_dim: int = 128, blur_sigma: float = 4.0, seed: int = 0,
                 feature_dim: int = 0) -> None:
        self.extractor = FeatureExtractor(backbone, weights, tuple(layers), seed)
        self.feature_dim = feature_dim  # 0: all channels; else each stage pooled to its equal share, as the official code
        self.coreset_ratio = coreset_ratio
        self.neighbors = neighbors
        self.projection_dim = projection_dim
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.coreset: torch.Tensor | None = None  # (K, D)
        self.grid: tuple[int, int] | None = None
        self.timings: dict[str, float] = {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B * P, D): pooled stages, deeper ones upsampled to the first, concatenated."""
        with torch.no_grad():
            features = [F.avg_pool2d(f.float(), 3, 1, 1) for f in self.extractor(images)]
        self.grid = tuple(features[0].shape[-2:])
        embedding = features[0]
        for feature in features[1:]:
            embedding = torch.cat([embedding, F.interpolate(feature, size=self.grid, mode="bilinear", align_corners=False)], dim=1)
        embedding = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        if self.feature_dim:
            parts, start = [], 0
            for k, feature in enumerate(features):
                share = self.feature_dim // len(features) + (k < self.feature_dim % len(features))
                channels = feature.shape[1]
                parts.append(F.adaptive_avg_pool1d(embedding[:, None, start : start + channels], share)[:, 0])
                start += channels
            embedding = torch.cat(parts, dim=1)
        return embedding

    def fit(self, batches: Iterable[torch.Tensor]) -> "NaivePatchCore":
        started = time.perf_counter()
        bank = torch.cat([self.embed(images) for images in batches])
        features_done = time.perf_counter()
        count = coreset_size(len(bank), self.coreset_ratio)
        if 0 < self.projection_dim < bank.shape[1]:
            projected = bank @ projection_matrix(bank.shape[1], self.projection_dim, self.seed)
        else:
            projected = bank
        start = int(torch.randint(len(bank), (1,), generator=torch.Generator().manual_seed(self.seed)))
        self.coreset = bank[naive_greedy(projected, count, start)].clone()
        self.timings = {"features": features_done - started, "coreset": time.perf_counter() - features_done}
        return self

    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(maps (B, H, W), image scores (B,)) as numpy arrays."""
        embedding = self.embed(images)
        with torch.no_grad():
            distances = torch.cdist(embedding, self.coreset)  # (B * P, K), the whole matrix
            patch, nearest = distances.min(dim=1)
        count, positions = len(images), self.grid[0] * self.grid[1]
        maps = F.interpolate(patch.view(count, 1, *self.grid), size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = np.stack([gaussian_filter(m, sigma=self.blur_sigma) for m in maps[:, 0].numpy()])
        scores = maps.reshape(count, -1).max(axis=1)
        if self.neighbors:
            worst = patch.view(count, positions).argmax(dim=1) + torch.arange(count) * positions
            queries, matches = embedding[worst], nearest[worst]
            support = torch.cdist(self.coreset[matches], self.coreset).topk(self.neighbors, largest=False).indices
            to_support = torch.cdist(queries[:, None, :], self.coreset[support])[:, 0, :]
            weights = 1 - torch.softmax(to_support, dim=1)[:, 0]
            scores = scores * weights.numpy()
        return maps, scores

    def state_bytes(self) -> int:
        return self.coreset.numel() * 4

    def save(self, path: str) -> None:
        torch.save({"coreset": self.coreset, "grid": self.grid}, path)

    def load(self, path: str) -> None:
        state = torch.load(path, weights_only=True)
        self.coreset, self.grid = state["coreset"], tuple(state["grid"])

