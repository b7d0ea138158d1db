"""One multivariate Gaussian per patch position: streaming fit and batched Mahalanobis distance.

Embeddings are position-major, (P, N, d): each position's N x d block is contiguous, which is
the layout the per-position matrix products read, so no batch is ever transposed.

The fit keeps only running sums, so memory does not grow with the number of images. The sums
are taken around a shift (the first batch's mean), which keeps float32 accumulation accurate:
the covariance is (sum of (x-K)(x-K)^T - n m m^T) / (n - 1) with m the mean of x - K, small,
so forming it needs no float64.

The fitted state is the mean and the lower Cholesky factor L of each covariance (Sigma = L L^T);
the squared distance is |L^-1 (x - mu)|^2, one batched triangular solve, or, where the model
has inverted its factors once for scoring (`WhiteningFactors`, d <= 256), batched products with
L^-1: for one or a few images the solve reads the factors several times slower than a product
does. The fit itself never inverts them (Wide-ResNet's 3136 triangles at d = 550: ~30 s).

Under torchrun the sums split over processes: each rank accumulates its own images around one
shift (`share_shift`: the first batch's mean, from the first rank that has images, rank 0 when it
has any), and `finalize` adds the ranks' sums onto rank 0 (a reduce: count, sum, and the (P, d, d)
sum of outer products, 3.8 GB for Wide-ResNet), which factorizes and broadcasts the mean and
factors back: the traffic of one all-reduce, and every rank ends with rank 0's exact model. Sums
are associative, so the result is one process's up to float32 rounding of the order of addition.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from anomaly_model import distributed
from anomaly_model.errors import ModelError
from anomaly_model.threads import cpu_threads

# Covariance entries factorized at once: each chunk's factor and working copies stay ~8 MB,
# far below the backbone's activations, so finalizing never raises the fit's peak memory;
# chunks still hold several positions for d = 550 (fewer LAPACK calls).
_FACTOR_CHUNK_ELEMENTS = 2_000_000
# CPU threads of the batched Cholesky factorization. MKL factorizes each small (d x d) matrix of a
# batch with OpenMP threads; on this 2-core machine shared with other jobs, two threads made a
# block of 86 MobileNetV2 covariances (d = 152) 25-40x slower than one (1.3-2.0 s against 0.05 s:
# the barriers wait for a descheduled thread), which made the factorization most of a PaDiM fit
# on tire (~35 s of it). One thread: ~2 s for the 3136 positions (bench/update_speed.py).
# The batched triangular solves of the distances behave alike (256 positions x 16 images: 0.02-0.04 s
# with one thread against 1.8-3.9 s with two on the busy machine).
FACTOR_THREADS = 1

# Row blocks of the whitening factors L^-1 (`WhiteningFactors`): more blocks store fewer of the
# triangle's zeros ((k + 1) / 2k of the full matrix) but make smaller products.
WHITENING_BLOCKS = 4
# Positions scored at once: the (chunk, N, d) difference and its solved copy stay a few tens of
# MB for Wide-ResNet at batch 32, instead of two (P, N, d) copies (~450 MB).
_DISTANCE_CHUNK_POSITIONS = 256
# With `WhiteningFactors` (d <= 256) the chunk is as many positions as keep the (chunk, N, d)
# difference within this many values (16 MB): one image's 3136 MobileNetV2 positions are then one
# chunk, 4 products instead of 13 x 4 (~1 ms of its ~10 ms of distances on the busy 2-core machine,
# the same values: each position's product does not depend on its neighbours).
_WHITENED_CHUNK_ELEMENTS = 2**22
# Smallest channel variance a per-channel deviation divides by ((1e-6)^2): a channel that never
# varied gives a huge but finite k, not inf or NaN. The fit's COVARIANCE_EPSILON (0.01) already
# keeps every fitted variance far above it; the floor guards other statistics and epsilon = 0.
VARIANCE_FLOOR = 1e-12


def small_matrix_threads(device: torch.device) -> AbstractContextManager:
    """FACTOR_THREADS CPU threads for batched small-matrix LAPACK calls (Cholesky, triangular solves);
    the caller's number is restored. Nothing changes on a GPU."""
    return cpu_threads(FACTOR_THREADS, device)


def lower_triangle_index(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices of a d x d matrix's lower triangle, row by row: the packed layout on disk."""
    rows, cols = torch.tril_indices(dim, dim, device=device)
    return rows * dim + cols


@dataclass
class GaussianSums:
    """The running sums of a finished fit, kept so that images can be added later exactly: a fit
    resumed from them (`StreamingGaussian.resumed`) ends with the statistics of one fit on the old
    and the new images together (up to float32 rounding), without the old images."""

    count: int
    shift: torch.Tensor  # (P, d) float32
    total: torch.Tensor  # (P, d) float64 sum of x - shift
    outer: torch.Tensor  # (P, d(d+1)/2) float32 packed lower triangles of the sum of (x - shift)(x - shift)^T, on the CPU


class StreamingGaussian:
    """Accumulates per-position mean and covariance of (P, N, d) embedding batches."""

    def __init__(self, keep_sums: bool = False) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None  # (P, d)
        self.sum: torch.Tensor | None = None  # (P, d) float64, of x - shift
        self.sum_outer: torch.Tensor | None = None  # (P, d, d) float32, of (x - shift)(x - shift)^T
        self.keep_sums = keep_sums  # finalize keeps the sums (`kept`) for a later update
        self.kept: GaussianSums | None = None

    @classmethod
    def resumed(cls, sums: GaussianSums, device: torch.device) -> "StreamingGaussian":
        """An accumulator holding a finished fit's sums, to add more images to (it keeps its sums too)."""
        accumulator = cls(keep_sums=True)
        positions, dim = sums.shift.shape
        lower = lower_triangle_index(dim)
        upper = (lower % dim) * dim + lower // dim  # the same entries, transposed
        outer = torch.empty(positions, dim * dim, dtype=torch.float32)  # every entry is in the triangle or its transpose
        outer.index_copy_(1, lower, sums.outer).index_copy_(1, upper, sums.outer)
        accumulator.count = int(sums.count)
        accumulator.shift = sums.shift.float().to(device)
        accumulator.sum = sums.total.double().to(device)
        accumulator.sum_outer = outer.view(positions, dim, dim).to(device)
        return accumulator

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
        if self.keep_sums:  # packed before the sums become the factors (half the (P, d, d) memory)
            positions, dim = self.sum.shape
            packed = self.sum_outer.view(positions, dim * dim).index_select(1, lower_triangle_index(dim, self.sum.device))
            self.kept = GaussianSums(self.count, self.shift.cpu(), self.sum.cpu().clone(), packed.cpu())
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
            block.copy_(cholesky_factor(block, start, n))
        return mean, factor


def cholesky_factor(covariances: torch.Tensor, first_position: int, count: int) -> torch.Tensor:
    """Lower Cholesky factors of (p, d, d) covariances (positions first_position..., fitted on `count`
    images); float64 is retried for a block float32 rounding finds not positive definite. On the CPU
    with FACTOR_THREADS threads (the caller's number is restored)."""
    with small_matrix_threads(covariances.device):
        lower, failed = torch.linalg.cholesky_ex(covariances)
        if failed.any():  # float32 rounding on a nearly singular covariance: retry in float64
            lower, failed = torch.linalg.cholesky_ex(covariances.double())
        if failed.any():
            position = first_position + int(failed.nonzero()[0, 0])
            raise ModelError(
                f"the covariance at patch position {position} is singular ({count} images for d = {covariances.shape[-1]}): "
                "raise COVARIANCE_EPSILON or add training images"
            )
    return lower.to(covariances.dtype)


def scatter_from_factor(cholesky: torch.Tensor, count: int, epsilon: float) -> torch.Tensor:
    """(p, d, d) scatter sum (x - mu)(x - mu)^T over the `count` fitted images, rebuilt from the
    stored factors: Sigma + epsilon I = L L^T, scatter = (count - 1) Sigma. A new tensor."""
    scatter = torch.bmm(cholesky, cholesky.transpose(1, 2))
    scatter.diagonal(dim1=1, dim2=2).sub_(epsilon)
    return scatter.mul_(count - 1)


def leave_out(
    mean: torch.Tensor, scatter: torch.Tensor, count: int, held_out: torch.Tensor, epsilon: float, first_position: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussians (mean (p, d), lower Cholesky factor (p, d, d)) the fit would have given without
    the images of `held_out` (p, m, d), from the full fit's mean, scatter and image count: exact,
    as leave-fold-out statistics of a streaming fit are. With A the remaining images and F the held-out
    ones, scatter = S_A + S_F + (n n_F / n_A) (mu - m_F)(mu - m_F)^T; `scatter` is left unchanged."""
    held_count = held_out.shape[1]
    rest = count - held_count
    if rest < 2:
        raise ModelError(f"leaving {held_count} of {count} images out leaves fewer than 2 to fit a covariance: add training images or set OUT_OF_FOLD_FOLDS = 0")
    held_mean = held_out.mean(dim=1)
    centered = held_out - held_mean[:, None, :]
    shift = mean - held_mean
    covariance = torch.baddbmm(scatter, centered.transpose(1, 2), centered, alpha=-1.0)
    covariance.baddbmm_(shift[:, :, None], shift[:, None, :], alpha=-count * held_count / rest)
    covariance.div_(rest - 1).diagonal(dim1=1, dim2=2).add_(epsilon)
    rest_mean = (mean * count - held_mean * held_count) / rest
    return rest_mean, cholesky_factor(covariance, first_position, rest)


@dataclass
class WhiteningFactors:
    """Each position's L^-1 (the inverse of its lower Cholesky factor), for scoring: the distance is
    then |L^-1 (x - mu)|, a batched matrix product, where a triangular solve per position and image
    would read the factors at a quarter of the memory speed (one image, MobileNetV2 at 224 px: the
    solve takes ~3x the backbone, the products about 1x; bench/serve_benchmark.py).

    L^-1 is lower triangular, so it is held as row blocks: block i holds rows bounds[i]..bounds[i+1]
    and only the columns up to bounds[i+1], so only the diagonal blocks' upper halves are stored
    zeros: (k + 1) / 2k of the full matrix for k blocks (62.5 % at 4), read once per image batch.
    Each block is stored transposed, (columns, rows): the product is then the deviations' rows times
    a contiguous matrix, which MKL streams at memory speed; with the block as the left factor and
    the deviations as a transposed view it ran at less than half of that for a few images
    (`bench/serve_benchmark.py --only-breakdown --threads 1`, MobileNetV2 at 224 px: the anomaly
    model's scoring of one image, backbone included, 49.8 -> 30.7 ms on this 2-core machine).
    """

    blocks: list[torch.Tensor]  # (P, bounds[i + 1], rows of block i) float32: row block i of L^-1, transposed
    bounds: list[int]  # row boundaries, 0 ... d

    def squared_norms(self, delta: torch.Tensor, first: int) -> torch.Tensor:
        """(p, N) |L^-1 delta|^2 of deviations `delta` (p, N, d) at positions first ... first + p - 1."""
        count = delta.shape[0]
        total = None
        for block, end in zip(self.blocks, self.bounds[1:]):
            part = torch.bmm(delta[:, :, :end], block[first : first + count]).square_().sum(dim=2)
            total = part if total is None else total.add_(part)
        return total


def whitening_factors(cholesky: torch.Tensor, blocks: int = WHITENING_BLOCKS, chunk_positions: int = 32) -> WhiteningFactors:
    """The `WhiteningFactors` of (P, d, d) lower Cholesky factors, inverted in float64 a few positions
    at a time (`inverse_factors`, one CPU thread) and rounded to float32, on the factors' device."""
    positions, dim = cholesky.shape[0], cholesky.shape[1]
    bounds = sorted({round(dim * i / blocks) for i in range(blocks + 1)})
    held = [torch.empty(positions, end, end - start, dtype=torch.float32, device=cholesky.device) for start, end in zip(bounds, bounds[1:])]
    with small_matrix_threads(torch.device("cpu")):
        for first in range(0, positions, chunk_positions):
            inverse = inverse_factors(cholesky[first : first + chunk_positions]).to(cholesky.device)
            for block, start, end in zip(held, bounds, bounds[1:]):
                block[first : first + chunk_positions] = inverse[:, start:end, :end].transpose(1, 2)
    return WhiteningFactors(held, bounds)


def whitening_bytes(positions: int, dim: int, blocks: int = WHITENING_BLOCKS) -> int:
    """Bytes `whitening_factors` holds for `positions` factors of size `dim`."""
    bounds = sorted({round(dim * i / blocks) for i in range(blocks + 1)})
    return 4 * positions * sum((end - start) * end for start, end in zip(bounds, bounds[1:]))


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor, whitening: WhiteningFactors | None = None) -> torch.Tensor:
    """Distances (N, P) of embeddings (P, N, d) to each position's Gaussian (with `whitening`, the
    inverses of `cholesky`, by matrix products instead of solves)."""
    return deviations(features, mean, cholesky, whitening=whitening)[0]


def deviations(
    features: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor, distance: bool = True, channel_max: bool = False,
    whitening: WhiteningFactors | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Mahalanobis distances (N, P), largest squared per-channel deviations (N, P)) of embeddings
    (P, N, d) from each position's Gaussian; each only when asked for (else None).

    Chunks of positions bound the working memory; within a chunk the distances are one batched
    triangular solve L y = x - mu, the right-hand sides being the (N, d) differences seen as
    d x N (a transposed view); given `whitening` (the inverses of `cholesky`), batched products
    instead (`WhiteningFactors`: 2-4x faster for a few images, the server's case).

    The channel deviation is k_c^2 = (x_c - mu_c)^2 / sigma_c^2, maximized over channels. The
    variances come from the factor itself (sigma_c^2 = sum_j L_cj^2, the covariance diagonal,
    COVARIANCE_EPSILON included), so any (mean, cholesky) pair given (the fitted one or
    leave-fold-out statistics) carries what it needs; a norm over each row reads the factor
    without a (p, d, d) temporary. Variances are floored at VARIANCE_FLOOR so that k stays finite.
    """
    features = features.float()
    positions, count, _ = features.shape
    squared = torch.empty(positions, count, dtype=torch.float32, device=features.device) if distance else None
    largest = torch.empty(positions, count, dtype=torch.float32, device=features.device) if channel_max else None
    step = _DISTANCE_CHUNK_POSITIONS
    if whitening is not None:
        step = max(step, _WHITENED_CHUNK_ELEMENTS // max(1, count * features.shape[2]))
    # the solves: one thread, set once (switching thread counts per chunk costs too); the whitened
    # products are a few large calls that stream the factors, which the caller's threads share
    threads = small_matrix_threads(features.device) if whitening is None else nullcontext()
    with threads:
        for start in range(0, positions, step):
            block = slice(start, start + step)
            delta = features[block] - mean[block, None, :]  # (p, N, d)
            if channel_max:
                variance = torch.linalg.vector_norm(cholesky[block], dim=2).square_().clamp_min_(VARIANCE_FLOOR)  # (p, d)
                largest[block] = delta.square().div_(variance[:, None, :]).amax(dim=2)
            if distance and whitening is not None:
                squared[block] = whitening.squared_norms(delta, start)
            elif distance:
                solved = torch.linalg.solve_triangular(cholesky[block], delta.transpose(1, 2), upper=False)  # (p, d, N)
                squared[block] = solved.square_().sum(dim=1)
    distances = squared.clamp_min_(0).sqrt_().T.contiguous() if distance else None
    return distances, largest.T.contiguous() if channel_max else None


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
