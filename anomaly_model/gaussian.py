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
"""

from __future__ import annotations

import torch

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

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of embeddings shaped (P, N, d). A contiguous float32 batch is used as
        scratch space (centered in place): the fit passes its own buffer, and a second copy
        of a Wide-ResNet batch would cost another 220 MB at the fit's memory peak."""
        features = features.float().contiguous()
        if self.shift is None:
            positions, dim = features.shape[0], features.shape[2]
            self.shift = features.mean(dim=1)
            self.sum = torch.zeros(positions, dim, dtype=torch.float64, device=features.device)
            self.sum_outer = torch.zeros(positions, dim, dim, dtype=torch.float32, device=features.device)
        centered = features.sub_(self.shift[:, None, :])
        self.sum += centered.sum(dim=1)  # float32 within a batch of centered values, float64 across
        self.sum_outer.baddbmm_(centered.transpose(1, 2), centered)
        self.count += features.shape[1]

    def finalize(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, d), lower Cholesky factor (P, d, d)); the sums' memory is reused for the factor."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 training images, got {self.count}")
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


def inverse_factors(cholesky: torch.Tensor, in_place: bool = False, chunk_positions: int = 32) -> torch.Tensor:
    """(p, d, d) float32 inverses L^-1 of lower Cholesky factors, for runtimes with no triangular solve
    (ONNX: see `padim.PadimPatchScores`). Inverted in float64 and then rounded, so the exported distance
    |L^-1 (x - mu)| is as accurate as the solve in float32; a few positions at a time keep the float64
    copies small (Wide-ResNet: 80 MB per 32 positions). in_place: written over `cholesky` itself
    (a CPU float32 tensor), so no second (p, d, d) tensor is ever allocated."""
    positions, dim = cholesky.shape[0], cholesky.shape[1]
    inverse = cholesky if in_place else torch.empty(positions, dim, dim, dtype=torch.float32)
    identity = torch.eye(dim, dtype=torch.float64)
    for start in range(0, positions, chunk_positions):
        block = cholesky[start : start + chunk_positions].to("cpu", torch.float64)
        inverse[start : start + chunk_positions] = torch.linalg.solve_triangular(block, identity, upper=False)
    return inverse
