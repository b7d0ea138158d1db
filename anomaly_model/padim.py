"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position over pretrained CNN features.

A patch embedding is a random subset of d channels of layers 1-3, the deeper layers upsampled
(nearest) to layer 1's grid; the fit keeps per-position running sums only (`gaussian.py`), so
memory is flat in the number of training images; a patch's score is its Mahalanobis distance to
its position's Gaussian (PADIM_SCORE = "mahalanobis"), or, as the hybrid Gaussian-Chebyshev
variant scores it, that distance beside a per-channel Chebyshev term (`chebyshev.py`).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_model import distributed
from anomaly_model.backbone import DEFAULT_FEATURE_DIM
from anomaly_model.errors import ModelError
from anomaly_model.base import AnomalyModel, ModelSettings, background_positions
from anomaly_model.chebyshev import SCORES, chebyshev_term, pixel_threshold, pixel_threshold_rule
from anomaly_model.files import CHUNK_ROWS, read_npy, read_npy_chunks, reading
from anomaly_model.gaussian import (
    GaussianSums, StreamingGaussian, WhiteningFactors, deviations, inverse_factors, leave_out, lower_triangle_index, mahalanobis,
    scatter_from_factor, whitening_bytes, whitening_factors,
)
from anomaly_model.memory import available_memory
from anomaly_model.schema import Optional, check
from settings import integer, sequence

# Held-out embeddings (P, m, d) kept at once by `out_of_fold_scores`: the folds whose embeddings fit
# in this many bytes share one pass over the images (and one rebuild of the scatter); a fold larger
# than this is still held whole. Small, because a pass is cheap (it reads only its folds' images)
# and the memory is not: 512 MB held 263 MB for ResNet18 on tire and put train.py's peak at 1.5 GB
# (64 MB: one fold per pass).
OUT_OF_FOLD_BYTES = 64 * 2**20
# Covariance entries rebuilt and refactorized at once (per chunk of positions): a few (chunk, d, d)
# working copies of ~8 MB, never a second (P, d, d) copy of the statistics.
_LEAVE_OUT_CHUNK_ELEMENTS = 2_000_000
BATCH_OF_MAPS = 32  # out-of-fold maps yielded at once (32 maps of 224 x 224: 6 MB)

# Most values in one constant of an exported PaDiM graph: Wide-ResNet's 3.8 GB of inverse factors
# become 15 constants of <= 256 MB, so writing, checking and loading the ONNX file never copies
# them whole; ResNet18 and MobileNetV2 at 224 px need one or two.
EXPORT_CHUNK_ELEMENTS = 2**26

# Largest d whose factors are inverted for scoring (`Padim.whitening`): inverting costs ~P d^3 / 3
# once and saves ~P d^2 per image, so it pays after a number of images that grows with d. MobileNetV2
# (d = 152): ~1 s at load, and one image's distances ~2x faster; Wide-ResNet (d = 550) would take
# ~30 s on one core, more than it saves a test run: it keeps the triangular solves.
WHITENING_MAX_DIM = 256
# The inverses are built only when they take at most this share of the free memory.
WHITENING_MEMORY_SHARE = 0.25


def _nearest_source(source: int, target: int, device: torch.device) -> torch.Tensor:
    """Source index of each of `target` cells under F.interpolate(mode="nearest"), taken from
    interpolate itself so the channels-last embedding matches the published one exactly."""
    positions = torch.arange(source, dtype=torch.float32, device=device).view(1, 1, -1)
    return F.interpolate(positions, size=target, mode="nearest").view(-1).long()


def write_embedding(features: list[torch.Tensor], layer_channels: list[torch.Tensor], out: torch.Tensor) -> None:
    """Layer features (b, C_k, h_k, w_k) -> out, an (h, w, b, d) view. The random channel subset
    (`Padim.layer_channels`) is taken from each layer before the upsampling and concatenation, so
    the full embedding is never built; channels-last maps give each patch's channels contiguously.
    The one embedding of PaDiM: fitting, scoring and the exported graph (`PadimPatchScores`) use it."""
    height, width = out.shape[0], out.shape[1]
    column = 0
    for feature, chosen in zip(features, layer_channels):
        chosen = chosen.to(feature.device)
        if chosen.numel():
            part = feature.permute(0, 2, 3, 1).index_select(3, chosen)  # (b, h_k, w_k, c)
            if part.shape[1:3] != (height, width):  # nearest upsampling, as F.interpolate does it
                part = part.index_select(1, _nearest_source(part.shape[1], height, part.device))
                part = part.index_select(2, _nearest_source(part.shape[2], width, part.device))
            out[..., column : column + chosen.numel()].copy_(part.permute(1, 2, 0, 3))
            column += chosen.numel()


@dataclass(frozen=True)
class PadimSettings(ModelSettings):
    """PaDiM's own settings (OWN_SETTINGS) beside every model's."""

    feature_dim: int = 0  # d, the random channel subset; 0 = the backbone's default
    epsilon: float = 0.01  # added to the covariance diagonal
    score_kind: str = "mahalanobis"  # PADIM_SCORE
    chebyshev_weight: float = 0.5  # the Mahalanobis share of the hybrid score


class Padim(AnomalyModel):
    """Patch distribution model: one Gaussian per patch position.

    Files: `mean.npy` (P, d) float32 means; `cholesky.npy` (P, d(d+1)/2) float32 packed lower
    Cholesky factors L of the covariances (Sigma = L L^T), about half the naive mean + inverse.

    Tiled with TILE_STATISTICS="location", every tile location has its own Gaussians: the inputs
    come location by location (tiles.TileLayout.chunks), so the (P, k*B, d) embedding of k
    locations of B images is, as a free view, the (P*k, B, d) embedding of B images with P*k
    positions (position-major, location-minor): the same fit and distance code serves both.
    """

    kind = "padim"
    HAS_PEAK_DIRECTIONS = True
    MIN_IMAGES_OUTSIDE_FOLD = 2
    DEFAULT_LAYERS = (1, 2, 3)
    OWN_SETTINGS = {
        "FEATURE_DIM": "feature_dim",
        "COVARIANCE_EPSILON": "epsilon",
        "PADIM_SCORE": "score_kind",
        "CHEBYSHEV_WEIGHT": "chebyshev_weight",
    }
    TILE_STATISTICS_KINDS = ("shared", "location")
    # The fit's running sums (`gaussian.GaussianSums`), saved as sums_*.npy: what `update` resumes
    # from, so images added later give exactly the statistics of one fit on all. None: a model saved
    # before models kept them (it cannot be updated).
    sums_: GaussianSums | None = None
    _sums_count: int | None = None  # model.json's state.sums_count, read before the arrays
    # (model folder, model.json's files) of a loaded model's sums, read on first use (`kept_sums`):
    # inspecting never needs them (test.py and serve.py read and hold 145 MB less for MobileNetV2 at 224 px)
    _sums_source: tuple[Path, dict] | None = None
    # (a weak reference to the factors they invert, `whitening`'s result): rebuilt when cholesky_ is replaced
    _whitening: tuple[weakref.ref, WhiteningFactors | None] | None = None
    _inspecting = False  # set by `prepare_scoring`: only a model loaded to inspect builds the inverted factors
    SETTINGS = PadimSettings

    def __init__(self, settings: PadimSettings | None = None, device: str = "auto") -> None:
        settings = settings if settings is not None else PadimSettings()
        epsilon, score_kind, chebyshev_weight = settings.epsilon, settings.score_kind, settings.chebyshev_weight
        feature_dim, backbone = settings.feature_dim, settings.backbone
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ModelError(f"COVARIANCE_EPSILON={epsilon} must be >= 0 (the paper uses 0.01)")
        if score_kind not in SCORES:
            raise ModelError(f"PADIM_SCORE={score_kind!r} is not supported: choose one of {', '.join(SCORES)}")
        self.score_kind = score_kind
        self.chebyshev_weight = float(chebyshev_weight)
        if not 0 <= self.chebyshev_weight <= 1:
            raise ModelError(
                f"CHEBYSHEV_WEIGHT={chebyshev_weight} must be between 0 and 1 "
                "(the Mahalanobis share of the hybrid score: 0.5 as published, 1 = Mahalanobis alone)"
            )
        super().__init__(settings, device)
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
        grid, layer_channels = None, self.layer_channels()
        for start, features in self.backbone_slices(images):
            grid = tuple(features[0].shape[-2:])
            shape = (grid[0] * grid[1], len(images), self.feature_dim)
            if out is None or tuple(out.shape) != shape:
                out = torch.empty(shape, dtype=torch.float32, device=self.device)
            columns = out[:, start : start + len(features[0])]
            write_embedding(features, layer_channels, columns.view(*grid, *columns.shape[1:]))  # a view: writes land in out
            del features
        return out, grid

    def fit(self, batches: Iterable[torch.Tensor]) -> "Padim":
        """Fit on batches of normalized good images; memory stays flat in the number of images.

        Under torchrun every rank calls this with the batches of its own shard (maybe none) and
        every rank ends with the same model, that of all ranks' images (`gaussian.py`)."""
        accumulator = StreamingGaussian(keep_sums=True)
        batches = iter(batches)
        first = next(batches, None)
        embedding, grid = self.embed(first) if first is not None else (None, None)
        source, grid = distributed.first_given(grid)  # ranks without images learn the grid too
        if grid is None:
            raise ModelError("no training images could be read: nothing to fit")
        by_location = None if embedding is None else self._by_location(embedding)
        positions = grid[0] * grid[1] * self.statistics_locations
        accumulator.share_shift(by_location, positions, self.feature_dim, self.device, source)
        if by_location is not None:
            accumulator.update(by_location)  # centers the buffer in place; the next batch overwrites it
        for images in batches:  # the rest of this rank's batches (none when the first was None)
            if embedding.shape[1] != len(images):
                embedding = None  # a smaller last batch: free the buffer before its own is made
            embedding, _ = self.embed(images, out=embedding)
            accumulator.update(self._by_location(embedding))
        del embedding
        self.mean_, self.cholesky_ = accumulator.finalize(self.epsilon)
        self.sums_ = accumulator.kept
        self.grid_size_ = grid
        self.n_train_images_ = accumulator.count
        return self

    def start_update(self) -> StreamingGaussian:
        """An exact update (`AnomalyModel.update_images`): the fit's saved sums resumed; `patch_scores`
        adds to them the embeddings it has just scored under the Gaussians as they were, so each new
        image passes the backbone once. The time depends on the new images (and the factorization),
        not on the old ones. One process."""
        if self.kept_sums() is None:
            raise ModelError("this PaDiM model was saved before models kept their running sums: retrain it once with python train.py; later updates are exact and take seconds")
        return StreamingGaussian.resumed(self.sums_, self.device)

    @property
    def has_sums(self) -> bool:
        """Whether the model keeps its fit's running sums (an update is exact), read yet or not."""
        return self.sums_ is not None or self._sums_source is not None

    def kept_sums(self) -> GaussianSums | None:
        """The fit's running sums; a loaded model reads them from its folder on first use (checked
        against the checksums it was loaded with: a model replaced since then is refused as damaged)."""
        if self.sums_ is None and self._sums_source is not None:
            folder, files = self._sums_source
            positions, dim = self.mean_.shape
            packed = dim * (dim + 1) // 2
            with reading(folder):
                outer = torch.empty(positions, packed, dtype=torch.float32)
                start = 0
                for block in read_npy_chunks(folder, "sums_outer.npy", files, (positions, packed)):
                    outer[start : start + block.shape[0]] = torch.from_numpy(block)
                    start += block.shape[0]
                shift = read_npy(folder, "sums_shift.npy", files, (positions, dim))
                total = read_npy(folder, "sums_total.npy", files, (positions, dim), dtype="<f8")
            self.sums_ = GaussianSums(int(self._sums_count), torch.from_numpy(shift.copy()), torch.from_numpy(total.copy()), outer)
            self._sums_source = None
        return self.sums_

    def finish_update(self, update: StreamingGaussian) -> dict:
        """The Gaussians factorized again from the sums with the new embeddings added: the statistics
        of one fit on the old and the new images (up to float32 rounding). Reports the embeddings each
        Gaussian gained (images; tiles with TILE_STATISTICS="shared") and the seconds of the factorization."""
        started, added = time.perf_counter(), update.count - self.sums_.count
        self.mean_, self.cholesky_ = update.finalize(self.epsilon)
        self.sums_, self._sums_source = update.kept, None
        return {"added_inputs": added, "seconds": time.perf_counter() - started}

    def layer_channels(self) -> list[torch.Tensor]:
        """Per backbone layer, the indices of its channels in the random subset: plain Python on the
        saved indices, so an exported graph holds the subset as constants (no data-dependent shapes)."""
        indices, start, chosen = self.channel_indices_.tolist(), 0, []
        for channels in self.extractor.channels:
            chosen.append(torch.tensor([i - start for i in indices if start <= i < start + channels], dtype=torch.long))
            start += channels
        return chosen

    def _by_location(self, embedding: torch.Tensor) -> torch.Tensor:
        """(P, N, d) -> (P * k, N / k, d) with k statistics per position (tile locations), a view."""
        locations = self.statistics_locations
        if locations == 1:
            return embedding
        positions, count, dim = embedding.shape
        return embedding.view(positions * locations, count // locations, dim)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) score of each patch of each image (PADIM_SCORE: its Mahalanobis distance by default)."""
        embedding, grid = self.embed(images)
        self.check_grid(grid)
        by_location = self._by_location(embedding)
        scores = self.embedding_scores(by_location, self.mean_, self.cholesky_)
        if self._learning is not None:  # an update in progress learns what was just scored (`start_update`)
            self._learning.update(by_location)  # centers the embedding in place: after its scores
        locations = self.statistics_locations
        if locations > 1:  # (B, P * k) back to the inputs' order, location by location
            scores = scores.view(-1, grid[0] * grid[1], locations).permute(2, 0, 1)
        return scores.reshape(-1, *grid)

    def patch_scores_and_peaks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) patch scores and (B, d) peak directions of untiled images, from one backbone pass:
        the deviation of each image's highest-scoring patch from its position's Gaussian, whitened
        (L^-1 (x - mu), whose length is the Mahalanobis distance) and scaled to length 1. The length
        says how anomalous the patch is (the map already does); the direction says in which way,
        which is what a labeled defect can teach (`classification_model.similarity`)."""
        embedding, grid = self.embed(images)
        self.check_grid(grid)
        scores = self.embedding_scores(embedding, self.mean_, self.cholesky_)  # (B, P)
        return scores.reshape(-1, *grid), self._directions_at(embedding, scores.argmax(dim=1))

    def background_peaks(self, images: torch.Tensor, level: float) -> torch.Tensor:
        self.check_peak_directions(images)
        embedding, grid = self.embed(images)
        self.check_grid(grid)
        scores = self.embedding_scores(embedding, self.mean_, self.cholesky_)  # (B, P)
        positions = background_positions(scores.reshape(-1, *grid), level)
        directions = self._directions_at(embedding, positions.clamp_min(0))
        return directions.masked_fill((positions < 0)[:, None], float("nan")).cpu()

    def _directions_at(self, embedding: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, d) unit whitened deviations of each image's patch at `positions` (B,) from that position's Gaussian."""
        with torch.no_grad():
            deviation = embedding[positions, torch.arange(len(positions), device=positions.device)] - self.mean_[positions]  # (B, d)
            whitened = torch.linalg.solve_triangular(self.cholesky_[positions], deviation[:, :, None], upper=False)[:, :, 0]
        return whitened / whitened.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def statistics_bytes(self, positions: int) -> int:
        """The fit's (P, d, d) float32 sums, which become the Cholesky factors, and the (P, d) rest."""
        return positions * self.feature_dim * (6 * self.feature_dim + 30)  # + the packed sums kept for updates

    def patch_score_module(self, release: bool = False) -> "PadimPatchScores":
        if self.score_kind != "mahalanobis" and not (self.score_kind == "hybrid" and self.chebyshev_weight == 1):
            raise ModelError(f"PADIM_SCORE={self.score_kind!r} models cannot be exported to ONNX yet (only the Mahalanobis distance): use RUNTIME=torch")
        return PadimPatchScores(self, release)

    def embedding_scores(self, embedding: torch.Tensor, mean: torch.Tensor, cholesky: torch.Tensor) -> torch.Tensor:
        """(N, P) scores of (P, N, d) embeddings under the Gaussians (mean, cholesky): the one place
        a patch score is computed from statistics, whichever statistics they are.

        "mahalanobis": the distance M; "chebyshev": the term C = max_c (1 - 1/k_c^2) in [0, 1);
        "hybrid": w M + (1 - w) C with w = CHEBYSHEV_WEIGHT (the published (M + C) / 2 at 0.5).
        The per-channel sigma is taken from `cholesky` itself, so leave-fold-out statistics work
        as the fitted ones do. Weight 1 is the Mahalanobis computation itself (same maps, bit for bit).
        (The exported graph, `PadimPatchScores`, computes the same value without a solve; export.py
        checks that the two agree.)"""
        with torch.no_grad():
            kind, weight = self.score_kind, self.chebyshev_weight
            whitening = self.whitening(build=self._inspecting and self._learning is None) if cholesky is self.cholesky_ and kind != "chebyshev" else None
            if kind == "mahalanobis" or (kind == "hybrid" and weight == 1):
                return mahalanobis(embedding, mean, cholesky, whitening)
            distance, largest = deviations(embedding, mean, cholesky, distance=kind == "hybrid", channel_max=True, whitening=whitening)
            term = chebyshev_term(largest)
            if kind == "chebyshev":
                return term
            return distance.mul_(weight).add_(term, alpha=1 - weight)

    def prepare_scoring(self) -> None:
        """A model loaded to inspect images: its scoring uses the inverted factors (`whitening`),
        built now rather than on the first image. A model in train.py scores with triangular solves:
        there the inverses would cost their (P, d, d) memory at the run's peak (125 MB for ResNet18 at
        224 px) for no measurable gain over its few hundred images (docs/performance.md, "Lean training run")."""
        self._inspecting = True
        self.whitening()

    def whitening(self, build: bool = True) -> WhiteningFactors | None:
        """The inverses of the fitted factors (`gaussian.WhiteningFactors`), with which the fitted
        Gaussians' distances are matrix products: built on the first scoring after the factors were
        set (after `prepare_scoring`: a model loaded to inspect) and kept while they are; None (triangular solves) above
        WHITENING_MAX_DIM or when they would take more than WHITENING_MEMORY_SHARE of the free memory.
        Leave-fold-out statistics are solved against: they are used once each. `build=False`: only
        inverses already built; an update (`start_update`) scores its few new images once under
        factors it then replaces, where inverting them costs more than it saves (MobileNetV2 at
        224 px, 2-core CPU: ~3 s to invert against ~0.4 s of solves for 30 images)."""
        cached = self._whitening
        if cached is not None and cached[0]() is self.cholesky_:
            return cached[1]
        if not build:
            return None
        factors = self.cholesky_
        positions, dim = factors.shape[0], factors.shape[1]
        fits = whitening_bytes(positions, dim) <= WHITENING_MEMORY_SHARE * available_memory(factors.device)
        whitening = whitening_factors(factors) if dim <= WHITENING_MAX_DIM and fits else None
        self._whitening = (weakref.ref(factors), whitening)
        return whitening

    def bounded_pixel_threshold(self, rate: float) -> tuple[float, str]:
        """(the map level a good pixel exceeds with probability at most `rate` by Chebyshev's
        inequality, its formula): distribution-free; what it covers: `chebyshev.py`."""
        level = pixel_threshold(self.score_kind, self.chebyshev_weight, self.feature_dim, rate)
        return level, pixel_threshold_rule(self.score_kind, self.chebyshev_weight)

    def out_of_fold_scores(
        self, batches: Callable[..., Iterable[tuple[torch.Tensor, list[int]]]], folds: np.ndarray, peaks: bool = False
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """After `fit` on the same images: honest anomaly maps of the training images themselves.
        `batches()` returns a fresh iterable over exactly the training images the model was fitted on,
        in the fit's order, as (images (B, 3, H, W), their indices in the training list); `folds[i]` is
        the fold of training image i. Yields (indices, maps (b, H, W) on the CPU, image scores (b,) on
        the CPU, with `peaks` their peak directions (b, d) on the CPU, else None), each image scored by a
        model that did not see its fold. The fitted model is unchanged.

        PaDiM's leave-fold-out Gaussians are exact: per chunk of positions the scatter is rebuilt from
        the stored factor, the fold's own scatter and the moved mean are taken out, and the result is
        factorized (`gaussian.leave_out`). The fold's embeddings come from a second backbone pass over
        its images only; folds whose embeddings fit in OUT_OF_FOLD_BYTES share a pass and a rebuild.
        The peak directions are those a model fitted without the fold would give (`_leave_out_peaks`)."""
        self.check_grid(self.grid_size_)
        folds = np.asarray(folds)
        positions = self.grid_size_[0] * self.grid_size_[1]
        per_pass = max(1, OUT_OF_FOLD_BYTES // (positions * self.feature_dim * 4))
        groups: list[list] = [[]]
        held = 0
        for fold, size in zip(*np.unique(folds, return_counts=True)):
            if groups[-1] and held + size > per_pass:
                groups.append([])
                held = 0
            groups[-1].append(fold)
            held += int(size)
        for group in groups:
            embeddings, indices, image_size = self._held_out_embeddings(batches, folds, group)
            scores = self._leave_out_scores(embeddings)
            for fold in embeddings:
                directions = self._leave_out_peaks(embeddings[fold], scores[fold]).cpu() if peaks else None
                for start in range(0, len(indices[fold]), BATCH_OF_MAPS):
                    patch = scores[fold][start : start + BATCH_OF_MAPS].view(-1, *self.grid_size_)
                    maps = self.map_maker(patch, image_size)
                    chosen = None if directions is None else directions[start : start + BATCH_OF_MAPS]
                    yield indices[fold][start : start + BATCH_OF_MAPS], maps.cpu(), self.image_scores(maps).cpu(), chosen

    def _held_out_embeddings(self, batches, folds: np.ndarray, group: list) -> tuple[dict, dict, tuple[int, int]]:
        """One pass over the training images: {fold: (P, m, d) embeddings}, {fold: their indices}, image size.
        Each fold's embeddings are written into one buffer sized by its share of `folds` (no joining copy)."""
        positions = self.grid_size_[0] * self.grid_size_[1]
        buffers = {fold: torch.empty(positions, int((folds == fold).sum()), self.feature_dim, device=self.device) for fold in group}
        indices: dict = {fold: [] for fold in group}
        image_size = None
        for images, batch_indices in batches(np.flatnonzero(np.isin(folds, group)).tolist()):  # the group's images only
            batch_folds = folds[np.asarray(batch_indices, dtype=int)]
            rows = np.flatnonzero(np.isin(batch_folds, group))
            if rows.size == 0:
                continue
            embedding, grid = self.embed(images[torch.from_numpy(rows)])
            self.check_grid(grid)
            image_size = tuple(images.shape[-2:])
            for fold in group:
                chosen = np.flatnonzero(batch_folds[rows] == fold)
                if chosen.size:
                    filled = len(indices[fold])
                    columns = torch.from_numpy(chosen).to(embedding.device)
                    buffers[fold][:, filled : filled + chosen.size].copy_(embedding.index_select(1, columns))
                    indices[fold] += [int(batch_indices[rows[i]]) for i in chosen]
            del embedding
        embeddings = {fold: buffers[fold][:, : len(indices[fold])] for fold in group if indices[fold]}
        return embeddings, indices, image_size

    def _leave_out_peaks(self, held: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(m, d) unit peak directions of a fold's images (embeddings `held` (P, m, d), patch scores
        (m, P)) under the Gaussians fitted without the fold, as `patch_scores_and_peaks` computes
        them for a fitted model: only each image's peak position is left out and factorized again
        (its Gaussian needs the whole fold's embeddings there), in chunks of BATCH_OF_MAPS images."""
        count, directions = self.n_train_images_, []
        with torch.no_grad():
            for start in range(0, held.shape[1], BATCH_OF_MAPS):
                images = torch.arange(start, min(start + BATCH_OF_MAPS, held.shape[1]), device=held.device)
                peak = scores[images].argmax(dim=1)  # (b,) each image's highest-scoring position
                scatter = scatter_from_factor(self.cholesky_[peak], count, self.epsilon)
                mean, lower = leave_out(self.mean_[peak], scatter, count, held[peak], self.epsilon)
                deviation = held[peak, images] - mean  # (b, d)
                whitened = torch.linalg.solve_triangular(lower, deviation[:, :, None], upper=False)[:, :, 0]
                directions.append(whitened / whitened.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return torch.cat(directions)

    def _leave_out_scores(self, embeddings: dict) -> dict:
        """{fold: (m, P) patch scores of its images under the Gaussians fitted without that fold}."""
        positions, dim = self.mean_.shape
        scores = {fold: torch.empty(held.shape[1], positions, device=self.device) for fold, held in embeddings.items()}
        step = max(1, _LEAVE_OUT_CHUNK_ELEMENTS // (dim * dim))
        count = self.n_train_images_
        with torch.no_grad():
            for start in range(0, positions, step):
                block = slice(start, start + step)
                scatter = scatter_from_factor(self.cholesky_[block], count, self.epsilon)
                for fold, held in embeddings.items():
                    mean, lower = leave_out(self.mean_[block], scatter, count, held[block], self.epsilon, start)
                    scores[fold][:, block] = self.embedding_scores(held[block], mean, lower)
        return scores

    # --- saving and loading -------------------------------------------------------------------

    def settings(self) -> dict:
        return {
            **super().settings(),
            "feature_dim": self.feature_dim,
            "epsilon": self.epsilon,
            "score_kind": self.score_kind,
            "chebyshev_weight": self.chebyshev_weight,
        }

    def fitted_state(self) -> dict:
        state = {**super().fitted_state(), "channel_indices": self.channel_indices_.tolist()}
        if self.sums_ is not None:
            state["sums_count"] = int(self.sums_.count)  # sums_*.npy hold the fit's running sums (`update`)
        return state

    def load_fitted_state(self, state: dict) -> None:
        super().load_fitted_state(state)
        total = sum(self.extractor.channels)
        check(state, {"channel_indices": sequence(integer(0, total - 1), length=self.feature_dim, order="increasing")}, "state")
        self.channel_indices_ = torch.tensor(state["channel_indices"], dtype=torch.long)
        check(state, {"sums_count": Optional(integer(minimum=2))}, "state")
        self._sums_count = state.get("sums_count")

    def save_arrays(self, out) -> None:
        """mean.npy, and cholesky.npy packed by one index_select per block of positions while the
        previous block is hashed and written (no full packed copy in memory); the sums as kept."""
        self.kept_sums()  # a loaded model saved again keeps its sums
        mean = self.mean_.cpu()
        positions, dim = mean.shape
        factors = self.cholesky_.view(positions, dim * dim)
        lower = lower_triangle_index(dim, factors.device)
        out.write_npy("mean.npy", mean.numpy())
        packed = (
            factors[start : start + CHUNK_ROWS].index_select(1, lower).cpu().numpy()
            for start in range(0, positions, CHUNK_ROWS)
        )
        out.write_npy_chunks("cholesky.npy", (positions, lower.numel()), packed)
        if self.sums_ is not None:
            out.write_npy("sums_shift.npy", self.sums_.shift.numpy())
            out.write_npy("sums_total.npy", self.sums_.total.numpy(), dtype="<f8")
            outer = self.sums_.outer
            out.write_npy_chunks("sums_outer.npy", tuple(outer.shape), (outer[i : i + CHUNK_ROWS].numpy() for i in range(0, positions, CHUNK_ROWS)))

    def load_arrays(self, folder, files: dict) -> None:
        positions, dim = self.grid_size_[0] * self.grid_size_[1] * self.statistics_locations, self.feature_dim
        mean = read_npy(folder, "mean.npy", files, (positions, dim))
        lower = lower_triangle_index(dim, self.device)
        factors = None  # allocated once the file's header and size agree with the shape (model.json may claim any)
        start = 0
        for block in read_npy_chunks(folder, "cholesky.npy", files, (positions, dim * (dim + 1) // 2)):
            if factors is None:
                factors = torch.zeros(positions, dim * dim, dtype=torch.float32, device=self.device)
            factors[start : start + block.shape[0]].index_copy_(1, lower, torch.from_numpy(block).to(self.device))
            start += block.shape[0]
        self.mean_ = torch.from_numpy(np.ascontiguousarray(mean)).to(self.device)
        self.cholesky_ = factors.view(positions, dim, dim)
        self.sums_ = None
        self._sums_source = (Path(folder), files) if self._sums_count else None  # read when an update or a save needs them


class PadimPatchScores(nn.Module):
    """Layer features -> (N, h, w) patch scores of a fitted Padim, in operations ONNX has (the model's
    part of `AnomalyModel.export_module`). ONNX has no triangular solve, so each Cholesky factor is
    held inverted (L^-1, from `gaussian.inverse_factors`) and the distance |L^-1 (x - mu)| is a
    batched product: the value `embedding_scores` computes with a solve. The module holds its own
    statistics, or with `release` takes over the model's factors, inverted in place (the model can
    no longer score: its `cholesky_` is gone), so export never holds L and L^-1 at once.
    Positions are split into constants of <= EXPORT_CHUNK_ELEMENTS values."""

    def __init__(self, model: Padim, release: bool = False) -> None:
        super().__init__()
        self.grid = tuple(model.grid_size_)
        self.layer_channels = model.layer_channels()
        positions, self.dim = model.mean_.shape
        factors = model.cholesky_.cpu()
        if release:
            model.cholesky_ = None
        step = max(1, EXPORT_CHUNK_ELEMENTS // (self.dim * self.dim))
        self.chunks = 0
        for start in range(0, positions, step):
            self.register_buffer(f"mean_{self.chunks}", model.mean_[start : start + step].cpu().clone())
            self.register_buffer(f"inverse_{self.chunks}", inverse_factors(factors[start : start + step], in_place=release))
            self.chunks += 1

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        count, (height, width) = features[0].shape[0], self.grid
        embedding = features[0].new_empty(height, width, count, self.dim)
        write_embedding(features, self.layer_channels, embedding)
        embedding = embedding.view(height * width, count, self.dim)
        squared, start = [], 0
        for index in range(self.chunks):
            mean, inverse = getattr(self, f"mean_{index}"), getattr(self, f"inverse_{index}")
            delta = embedding[start : start + mean.shape[0]] - mean[:, None, :]  # (p, N, d)
            squared.append((inverse @ delta.transpose(1, 2)).square().sum(dim=1))  # (p, N)
            start += mean.shape[0]
        return torch.cat(squared).clamp_min(0).sqrt().T.reshape(count, height, width)
