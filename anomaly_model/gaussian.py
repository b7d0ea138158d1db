"""One multivariate Gaussian per patch position: streaming fit and batched Mahalanobis distance.

The fit keeps only running sums, so memory does not grow with the number of images. The sums
are taken around a shift (the first batch's mean), which keeps float32 accumulation accurate:
the covariance is (sum of (x-K)(x-K)^T - n m m^T) / (n - 1) with m the mean of x - K, small.

The fitted state is the mean and the inverse Cholesky factor W = L^-1 of each covariance
(Sigma = L L^T), so the squared distance is |W (x - mu)|^2: one batched matrix product.
"""

from __future__ import annotations

import torch

# Covariance entries factorized at once: the float64 working copies of a chunk stay ~16 MB each,
# below the backbone's own activations, so finalizing never raises the fit's peak memory
# (8M entries raised ResNet18's peak by ~300 MB); chunks still hold several positions for d = 550.
_FACTOR_CHUNK_ELEMENTS = 2_000_000
# Positions scored at once: the (chunk, N, d) difference and its whitened copy stay a few
# tens of MB for Wide-ResNet at batch 32, instead of two (P, N, d) copies (~450 MB).
_DISTANCE_CHUNK_POSITIONS = 256


class StreamingGaussian:
    """Accumulates per-position mean and covariance of (N, P, d) feature batches."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (P, d)
        self.sum: torch.Tensor | None = None  # (P, d) float64, of x - shift
        self.sum_outer: torch.Tensor | None = None  # (P, d, d) float32, of (x - shift)(x - shift)^T

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of embeddings shaped (N, P, d)."""
        features = features.float()
        if self.shift is None:
            positions, dim = features.shape[1], features.shape[2]
            self.shift = features.mean(dim=0)
            self.sum = torch.zeros(positions, dim, dtype=torch.float64, device=features.device)
            self.sum_outer = torch.zeros(positions, dim, dim, dtype=torch.float32, device=features.device)
        # Contiguous (P, N, d): a permuted (strided) operand makes the batched product copy
        # per matrix and runs ~10x slower on the CPU.
        centered = (features.transpose(0, 1) - self.shift[:, None, :]).contiguous()
        self.sum += centered.sum(dim=1, dtype=torch.float64)
        self.sum_outer.baddbmm_(centered.transpose(1, 2), centered)
        self.count += features.shape[0]

    def finalize(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, d), inverse Cholesky factor (P, d, d)); the sums' memory is reused for the factor."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 training images, got {self.count}")
        offset = self.sum / self.count  # (P, d) float64
        mean = (self.shift.double() + offset).float()
        factor = self.sum_outer
        self.sum_outer = None
        positions, dim = factor.shape[0], factor.shape[1]
        identity = torch.eye(dim, dtype=torch.float64, device=factor.device)
        identity32 = torch.eye(dim, dtype=torch.float32, device=factor.device)
        step = max(1, _FACTOR_CHUNK_ELEMENTS // (dim * dim))
        for start in range(0, positions, step):  # chunks of positions, not one position at a time
            block = slice(start, start + step)
            outer = factor[block].double()
            centered_m = offset[block]
            covariance = (outer - self.count * centered_m[:, :, None] * centered_m[:, None, :]) / (self.count - 1)
            covariance += epsilon * identity
            # The covariance is formed in float64 (a difference of large sums), factorized in
            # float32: 35 % faster at d = 550, and distances moved by ~1e-6 relative with real
            # MobileNetV2 features (condition ~2400; epsilon bounds it). float64 where float32
            # finds a block not positive definite. The triangular inverse in float32 with a
            # contiguous right-hand side: ~10x faster than float64 with an expanded identity.
            lower, failed = torch.linalg.cholesky_ex(covariance.float())
            if failed.any():
                lower = torch.linalg.cholesky(covariance).float()
            rhs = identity32.expand(lower.shape[0], dim, dim).contiguous()
            factor[block] = torch.linalg.solve_triangular(lower, rhs, upper=False)
        return mean, factor


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, inv_cholesky: torch.Tensor) -> torch.Tensor:
    """Distances (N, P) of embeddings (N, P, d) to each position's Gaussian.

    Chunks of positions bound the working memory; within a chunk the distances are one
    batched product of contiguous (positions, N, d) differences with W^T.
    """
    features = features.float()
    count, positions, _ = features.shape
    squared = torch.empty(positions, count, dtype=torch.float32, device=features.device)
    for start in range(0, positions, _DISTANCE_CHUNK_POSITIONS):
        block = slice(start, start + _DISTANCE_CHUNK_POSITIONS)
        delta = (features[:, block].transpose(0, 1) - mean[block, None, :]).contiguous()  # (p, N, d)
        whitened = torch.bmm(delta, inv_cholesky[block].transpose(1, 2))  # (p, N, d)
        squared[block] = whitened.square_().sum(dim=2)
    return squared.clamp_min_(0).sqrt_().T.contiguous()

