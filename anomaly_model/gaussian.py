"""One multivariate Gaussian per patch position: streaming fit and batched Mahalanobis distance.

Embeddings are position-major, (P, N, d): each position's N x d block is contiguous, which is
the layout the per-position matrix products read, so no batch is ever transposed.

The fit keeps only running sums, so memory does not grow with the number of images. The sums
are taken around a shift (the first batch's mean), which keeps float32 accumulation accurate:
the covariance is (sum of (x-K)(x-K)^T - n m m^T) / (n - 1) with m the mean of x - K, small,
so forming it needs no float64.

The fitted state is the mean and the lower Cholesky factor L of each covariance (Sigma = L L^T);
the squared distance is |L^-1 (x - mu)|^2, one batched triangular solve. Solving with L costs
the same per image as a product with a stored L^-1 (half the multiplications), and the fit
skips inverting 3136 triangles (~7 s of Wide-ResNet's fit at d = 550).

Under torchrun the sums split over processes: each rank accumulates its own images around one
shift (`share_shift`: the first batch's mean, from the first rank that has images, rank 0 when it
has any), and `finalize` adds the ranks' sums onto rank 0 (a reduce: count, sum, and the (P, d, d)
sum of outer products, 3.8 GB for Wide-ResNet), which factorizes and broadcasts the mean and
factors back: the traffic of one all-reduce, and every rank ends with rank 0's exact model. Sums
are associative, so the result is one process's up to float32 rounding of the order of addition.
"""

from __future__ import annotations

import torch

from anomaly_model import distributed
from anomaly_model.backbone import ModelError

# Covariance entries factorized at once: each chunk's factor and working copies stay ~8 MB,
# far below the backbone's activations, so finalizing never raises the fit's peak memory;
# chunks still hold several positions for d = 550 (fewer LAPACK calls).
_FACTOR_CHUNK_ELEMENTS = 2_000_000
# Positions scored at once: the (chunk, N, d) difference and its solved copy stay a few tens of
# MB for Wide-ResNet at batch 32, instead of two (P, N, d) copies (~450 MB).
_DISTANCE_CHUNK_POSITIONS = 256


class StreamingGaussian:
    """Accumulates per-position mean and covariance of (P, N, d) embedding batches."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (P, d)
        self.sum: torch.Tensor | None = None  # (P, d) float64, of x - shift
        self.sum_outer: torch.Tensor | None = None  # (P, d, d) float32, of (x - shift)(x - shift)^T

    def start(self, shift: torch.Tensor) -> None:
        """Empty sums around `shift` (P, d)."""
        positions, dim = shift.shape
        self.shift = shift.float()
        self.sum = torch.zeros(positions, dim, dtype=torch.float64, device=shift.device)
        self.sum_outer = torch.zeros(positions, dim, dim, dtype=torch.float32, device=shift.device)

    def share_shift(self, first: torch.Tensor | None, positions: int, dim: int, device: torch.device, source: int) -> None:
        """Start every rank's sums around one shift: the mean of rank `source`'s first (P, N, d)
        batch `first`, broadcast (ranks without images get it too: their zero sums still join the
        reduction). Alone, the mean of `first`, as `update` would take it."""
        shift = torch.empty(positions, dim, dtype=torch.float32, device=device)
        if distributed.rank() == source:
            shift.copy_(first.float().mean(dim=1))
        self.start(distributed.broadcast_(shift, source))

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of embeddings shaped (P, N, d). A contiguous float32 batch is used as
        scratch space (centered in place): the fit passes its own buffer, and a second copy
        of a Wide-ResNet batch would cost another 220 MB at the fit's memory peak."""
        features = features.float().contiguous()
        if self.shift is None:
            self.start(features.mean(dim=1))
        centered = features.sub_(self.shift[:, None, :])
        self.sum += centered.sum(dim=1)  # float32 within a batch of centered values, float64 across
        self.sum_outer.baddbmm_(centered.transpose(1, 2), centered)
        self.count += features.shape[1]

    def finalize(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, d), lower Cholesky factor (P, d, d)) of every rank's images, on every rank;
        the sums' memory is reused for the factor. Alone: the factorization of this process's sums."""
        if not distributed.active():
            return self._factorize(epsilon)
        count = torch.tensor([self.count], dtype=torch.int64, device=self.sum.device)
        self.count = int(distributed.all_reduce_sum_(count))
        distributed.reduce_sum_(self.sum)
        distributed.reduce_sum_(self.sum_outer)
        if distributed.is_main():
            mean, factor = self._factorize(epsilon)
        else:
            mean, factor = torch.empty_like(self.shift), self.sum_outer  # overwritten by rank 0's
            self.sum_outer = None
        return distributed.broadcast_(mean), distributed.broadcast_(factor)

    def _factorize(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise ModelError(f"a covariance needs at least 2 training images, got {self.count} that could be read: add good images")
        offset = self.sum / self.count  # (P, d) float64
        mean = (self.shift.double() + offset).float()
        offset = offset.float()
        factor = self.sum_outer
        self.sum_outer = None
        positions, dim = factor.shape[0], factor.shape[1]
        n = self.count
        step = max(1, _FACTOR_CHUNK_ELEMENTS // (dim * dim))
        for start in range(0, positions, step):  # chunks of positions, not one position at a time
            block = factor[start : start + step]  # a view: the covariance is formed in place
            shift = offset[start : start + step]
            block.baddbmm_(shift[:, :, None], shift[:, None, :], beta=1 / (n - 1), alpha=-n / (n - 1))
            block.diagonal(dim1=1, dim2=2).add_(epsilon)
            lower, failed = torch.linalg.cholesky_ex(block)
            if failed.any():  # float32 rounding on a nearly singular covariance: retry in float64
                lower, failed = torch.linalg.cholesky_ex(block.double())
                if failed.any():
                    position = start + int(failed.nonzero()[0, 0])
                    raise ModelError(
                        f"the covariance at patch position {position} is singular ({n} images for d = {dim}): "
                        "raise COVARIANCE_EPSILON or add training images"
                    )
            block.copy_(lower)
        return mean, factor


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
    """Distances (N, P) of embeddings (P, N, d) to each position's Gaussian.

    Chunks of positions bound the working memory; within a chunk the distances are one batched
    triangular solve L y = x - mu, the right-hand sides being the (N, d) differences seen as
    d x N (a transposed view): as fast per image here as a product with a stored L^-1.
    """
    features = features.float()
    positions, count, _ = features.shape
    squared = torch.empty(positions, count, dtype=torch.float32, device=features.device)
    for start in range(0, positions, _DISTANCE_CHUNK_POSITIONS):
        block = slice(start, start + _DISTANCE_CHUNK_POSITIONS)
        delta = features[block] - mean[block, None, :]  # (p, N, d)
        solved = torch.linalg.solve_triangular(cholesky[block], delta.transpose(1, 2), upper=False)  # (p, d, N)
        squared[block] = solved.square_().sum(dim=1)
    return squared.clamp_min_(0).sqrt_().T.contiguous()
