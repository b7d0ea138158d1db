"""PatchCore (Roth et al., CVPR 2022): distance of each patch to its nearest good patch feature.

A patch feature is, per backbone stage in LAYERS (default 2 and 3), the stage's map averaged over
each 3x3 neighbourhood (stride 1, zero padding counted, as anomalib's AvgPool2d), the deeper
stages upsampled bilinearly to the first one's grid, channels concatenated (optionally reduced,
PATCHCORE_FEATURE_DIM). Every training patch goes into a memory bank; a greedy k-center coreset
of CORESET_RATIO of it (`coreset.py`) is what the model keeps. A patch's score is the Euclidean
distance to its nearest coreset feature; maps are the shared upsampling + blur (`maps.py`); the
image score is the map's maximum, optionally reweighted by the paper's eq. 7
(PATCHCORE_NEIGHBORS).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_model import distributed
from anomaly_model.errors import ModelError
from anomaly_model.bank import BYTES_IN_RAM, KINDS, PatchBank, disk_folder, size_text
from anomaly_model.base import TILE_CHUNK, AnomalyModel, ModelSettings, background_positions
from anomaly_model.coreset import (
    continue_coreset,
    GroupedNeighbors,
    coreset_size,
    greedy_coreset,
    group_order,
    nearest_neighbors,
    projection_matrix,
)
from anomaly_model.files import read_npy
from anomaly_model.memory import available_memory
from anomaly_model.schema import check
from settings import integer, sequence

# Share of the free RAM the fit may plan to use: the rest is for the backbone's activations,
# image decoding and whatever else runs on the machine.
MEMORY_HEADROOM = 0.9


def channel_pooling(channels: int, size: int) -> torch.Tensor:
    """(channels, size) matrix averaging consecutive channels into `size` values, as
    F.adaptive_avg_pool1d does over a feature vector (the official code's dimension reduction)."""
    identity = torch.eye(channels).unsqueeze(1)  # (channels, 1, channels): one unit vector per row
    return F.adaptive_avg_pool1d(identity, size).squeeze(1)


def patch_features(features: list[torch.Tensor], pooling: list[torch.Tensor] | None) -> torch.Tensor:
    """(b * h * w, D) patch features of the layer maps of b images, image-major, on the first
    layer's (h, w) grid: each layer averaged over 3x3 neighbourhoods, the deeper ones upsampled,
    channels concatenated (each layer's averaged down by `pooling` when given). The one embedding
    of PatchCore: fitting, scoring and the exported graph (`PatchCoreScores`) use it."""
    grid = features[0].shape[-2:]
    parts = []
    for index, feature in enumerate(features):
        pooled = F.avg_pool2d(feature.float(), 3, stride=1, padding=1)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        part = pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])  # channels last
        parts.append(part if pooling is None else part @ pooling[index])
    return torch.cat(parts, dim=1)


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """(Q,) |q - m| for each query and its nearest coreset row, from the difference itself: the
    search's |q|^2 - 2 q.m + |m|^2 finds the row fast but loses digits when the distance is small
    against |q| (float32 cancellation, which also differs between torch and onnxruntime's
    summation orders); recomputed, the patch scores of both runtimes agree to float rounding."""
    return torch.linalg.vector_norm(queries - memory[nearest], dim=1)


def eq7_weights(queries: torch.Tensor, matches: torch.Tensor, memory: torch.Tensor, norms: torch.Tensor, neighbors: int) -> torch.Tensor:
    """(B,) eq. 7 weights w = 1 - exp|q - m*| / sum over N_b(m*) of exp|q - m|, for each image's
    most anomalous patch q (minus the coreset's mean) and its nearest coreset row m* (`matches`),
    with N_b(m*) the `neighbors` coreset rows nearest to m* (m* itself included, as anomalib
    does): a match in a sparse region of the coreset (a rare good pattern) keeps w near 1, one in a
    dense region is damped to about 1 - 1/b. `norms`: the rows' squared norms (+inf excludes a row).
    Used by the model and by the exported graph alike."""
    anchors = memory[matches]  # (B, D)
    anchor_distances = torch.addmm(norms, anchors, memory.T, alpha=-2.0)  # (B, K) + |a|^2 omitted: same order
    own = torch.arange(memory.shape[0], device=matches.device)[None, :] == matches[:, None]
    anchor_distances = anchor_distances.masked_fill(own, -math.inf)  # m* first, whatever the rounding
    support = anchor_distances.topk(neighbors, dim=1, largest=False).indices  # (B, b)
    distances = (queries[:, None, :] - memory[support]).norm(dim=2)  # (B, b), m* in column 0
    return 1.0 - torch.softmax(distances, dim=1)[:, 0]


@dataclass(frozen=True)
class PatchCoreSettings(ModelSettings):
    """PatchCore's own settings (OWN_SETTINGS) beside every model's."""

    layers: tuple[int, ...] = ()  # () = (2, 3), the paper's
    coreset_ratio: float = 0.1  # share of the training patches kept
    neighbors: int = 0  # b of eq. 7; 0 = the plain max of the map
    feature_dim: int = 0  # features per patch; 0 = all channels of the layers
    projection_dim: int = 128  # the random projection the coreset is chosen on; 0 = none


class PatchCore(AnomalyModel):
    """Memory bank of good patch features, kept as a greedy coreset; score = nearest-neighbour distance.

    Files: `coreset.npy` (K, D) float32 coreset features minus their mean, `coreset_mean.npy`
    (D,) that mean (subtracting it keeps the distance expansion precise), `coreset_sources.npy`
    (K,) int32: the fit-order number of the training image each coreset feature came from
    (what out-of-fold scoring excludes).
    """

    kind = "patchcore"
    HAS_PEAK_DIRECTIONS = True
    DEFAULT_LAYERS = (2, 3)
    OWN_SETTINGS = {
        "CORESET_RATIO": "coreset_ratio",
        "PATCHCORE_NEIGHBORS": "neighbors",
        "PATCHCORE_FEATURE_DIM": "feature_dim",
        "PATCHCORE_PROJECTION_DIM": "projection_dim",
    }
    SETTINGS = PatchCoreSettings

    def __init__(self, settings: PatchCoreSettings | None = None, device: str = "auto") -> None:
        settings = settings if settings is not None else PatchCoreSettings()
        coreset_ratio, neighbors, projection_dim = settings.coreset_ratio, settings.neighbors, settings.projection_dim
        feature_dim, backbone = settings.feature_dim, settings.backbone
        self.coreset_ratio = float(coreset_ratio)
        if not 0 < self.coreset_ratio <= 1:
            raise ModelError(f"CORESET_RATIO={coreset_ratio} must be in (0, 1]: the share of training patches kept (paper: 0.1 or 0.01)")
        self.neighbors = int(neighbors)
        if self.neighbors < 0 or self.neighbors == 1:
            raise ModelError(f"PATCHCORE_NEIGHBORS={neighbors} must be 0 (image score = max of the map) or at least 2 (eq. 7 reweighting)")
        self.projection_dim = int(projection_dim)
        if self.projection_dim < 0:
            raise ModelError(f"PATCHCORE_PROJECTION_DIM={projection_dim} must be >= 0 (0: select the coreset on the features themselves)")
        super().__init__(settings, device)
        channels = self.extractor.channels
        self.feature_dim = int(feature_dim) or sum(channels)
        if not len(channels) <= self.feature_dim <= sum(channels):
            raise ModelError(
                f"PATCHCORE_FEATURE_DIM={feature_dim} must be 0 (all {sum(channels)} channels of {backbone} layers "
                f"{self.layers}) or between {len(channels)} and {sum(channels)}"
            )
        self._pooling = None  # per layer: None (all channels) or a (C_k, D_k) averaging matrix
        if self.feature_dim < sum(channels):
            shares = [self.feature_dim // len(channels) + (k < self.feature_dim % len(channels)) for k in range(len(channels))]
            self._pooling = [channel_pooling(c, s).to(self.device) for c, s in zip(channels, shares)]
        self._planned_images = 0
        self._fit_numbers: Sequence[int] | None = None  # plan_fit's: the training-list numbers of the images this rank fits
        self._fit_indices: list[int] | None = None  # after a fit told them: the training-list number of each fit position
        self.memory_: torch.Tensor | None = None  # (K, D) coreset features minus memory_mean_
        self.memory_mean_: torch.Tensor | None = None  # (D,)
        self.memory_norms_: torch.Tensor | None = None  # (K,) squared norms of memory_ rows (derived)
        self.memory_sources_: torch.Tensor | None = None  # (K,) fit-order image number of each coreset point
        self._last_exclusion: tuple[torch.Tensor, Callable] | None = None  # `_search_without`'s last (mask, search)
        self.group_offsets_: list[int] = []  # memory_ rows of each group of GroupedNeighbors (coreset.py)
        self._neighbors: GroupedNeighbors | None = None
        self.bank_size_ = 0  # training patches the coreset was chosen from
        self.bank_precision_ = "float32"  # where the bank was kept while fitting (bank.KINDS): "float16" or "disk" when float32 did not fit
        self.fit_seconds_: dict[str, float] = {}

    # --- features -----------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images -> (B * P, D) patch features, image-major (image i's P patches in
        rows i*P ... i*P + P-1, row-major over the grid), and the patch grid (h, w)."""
        out, grid = None, None
        for start, features in self.backbone_slices(images):
            grid = tuple(features[0].shape[-2:])
            positions = grid[0] * grid[1]
            if out is None:
                out = torch.empty(len(images) * positions, self.feature_dim, device=self.device)
            out[start * positions : (start + len(features[0])) * positions] = patch_features(features, self._pooling)
            del features
        return out, grid

    # --- fit ----------------------------------------------------------------------------------

    def plan_fit(self, n_images: int, numbers: Sequence[int] | None = None) -> None:
        """The number of training images to come: the fit checks at its first batch that their
        memory bank fits in RAM, instead of failing after minutes of backbone passes. Under
        torchrun `numbers` is the list the caller fills, as it reads them, with the training-list
        number of each image this rank fits: the ranks' patches are put in one process's order by it."""
        self._planned_images = int(n_images)
        self._fit_numbers = numbers

    def _check_coreset_size(self, bank_size: int) -> int:
        """The coreset's size for a bank of `bank_size` patches; a one-line ModelError when it holds
        fewer rows than the PATCHCORE_NEIGHBORS the image score needs."""
        count = coreset_size(bank_size, self.coreset_ratio)
        if count < max(self.neighbors, 1):
            raise ModelError(
                f"CORESET_RATIO={self.coreset_ratio} keeps {count} of {bank_size} training patches, fewer than the "
                f"PATCHCORE_NEIGHBORS={self.neighbors} the image score needs: raise CORESET_RATIO, train on more images "
                "or set PATCHCORE_NEIGHBORS=0"
            )
        return count

    def fit_memory_bytes(self, n_images: int, positions: int, job_images: int = 0, bank_bytes: int = 4) -> int:
        """RAM the fit needs for `n_images` images of `positions` patches: the bank (`bank_bytes` per
        value: 4 float32, 2 float16, 0 on disk) and its projection, and on the process that selects
        the coreset (one process, or rank 0 of a torchrun job of `job_images` images) the projection
        of every image twice (a copy in fit order, the centred copy the selection works on) and the
        per-point selection arrays."""
        patches, job_patches = n_images * positions, max(job_images, n_images) * positions
        projected = min(self.projection_dim or self.feature_dim, self.feature_dim)
        selecting = job_patches if distributed.is_main() else 0
        kept = coreset_size(job_patches, self.coreset_ratio)
        bank = bank_bytes * patches * self.feature_dim + 4 * patches * projected
        return bank + 4 * selecting * (projected + 4) + 4 * kept * (self.feature_dim + projected)

    def _check_memory(self, n_images: int, positions: int, planned: bool, held: int = 0) -> str:
        """Where the bank can be kept (bank.KINDS): "float32" when that fits in the memory available
        (`memory.available_memory`: RAM, lowered to the cgroup's room), else "float16" (the bank is
        half, the projection the coreset is chosen on stays float32, so the same coreset is chosen and
        only its kept rows are rounded, about 5e-4 of their size), else "disk" (a temporary file:
        RAM holds the projection and the selection only; the same features as float32); a
        ModelError when not even that fits. `n_images`: all the job's images when `planned` (a rank
        holds about 1/N of them), else this process's so far (under torchrun: of a job of at least
        the planned images). `held`: bytes of the bank this fit already holds in RAM, counted in
        what it needs and so added to what is free."""
        ranks = distributed.world_size()
        own, job = (math.ceil(n_images / ranks), n_images) if planned else (n_images, max(n_images, self._planned_images * (ranks > 1)))
        free = available_memory() + held
        for kind, bank_bytes in BYTES_IN_RAM.items():
            if self.fit_memory_bytes(own, positions, job, bank_bytes) <= MEMORY_HEADROOM * free:
                return kind
        needed = self.fit_memory_bytes(own, positions, job, 0)
        per_image = self.fit_memory_bytes(round(1000 * own / job), positions, 1000, 0) / 1000
        fits = int(MEMORY_HEADROOM * free / per_image)
        what = f"{n_images} training images" if planned else f"the first {n_images} training images"
        where = ""
        if distributed.active():
            where = f" on rank {distributed.rank()}" + (" (it gathers every rank's projected patches)" if distributed.is_main() else "")
        raise ModelError(
            f"PatchCore's fit for {what} ({positions} patches x {self.feature_dim} features each) needs "
            f"{size_text(needed)} of RAM{where} even with its memory bank on disk, only {size_text(free)} is free: train on fewer images (about {fits} fit), "
            "lower IMAGE_SIZE (or TILE_SIZE) or PATCHCORE_FEATURE_DIM (CORESET_RATIO and BATCH_SIZE do not change the bank's size)"
        )

    def fit(self, batches: Iterable[torch.Tensor]) -> "PatchCore":
        """Bank every training patch feature (projected as it comes), choose the coreset, keep it.

        Under torchrun each rank banks the images of its shard (maybe none); rank 0 gathers the
        projected rows in one process's fit order and selects the coreset from the same seeded start,
        and every rank ends with one process's coreset (`_fit_order`, `_gather_from_ranks`)."""
        if distributed.active() and self.tile_layout_ is not None:  # tiles of a batch are not in image order
            raise ModelError(f"TILE_SIZE={self.tile_size}: a tiled PatchCore is not fitted under torchrun (its ranks' tiles are not put back in order): set TILE_SIZE=0 or run python train.py")
        started = time.perf_counter()
        bank = PatchBank(self.feature_dim)  # every patch's features, in RAM or on disk (bank.py)
        projected: list[torch.Tensor] = []  # the same rows projected, on the device
        projection, grid, n_images, kind = None, None, 0, "float32"
        width = self.projection_dim if 0 < self.projection_dim < self.feature_dim else self.feature_dim
        for images in batches:
            embedding, grid = self.embed(images)
            positions = grid[0] * grid[1]
            if n_images == 0 and self._planned_images:
                kind = self._check_memory(self._planned_images, positions, planned=True)
                self._check_coreset_size(self._planned_images * positions)  # before minutes of backbone passes, not after
            held = bank.ram_bytes() + sum(part.numel() * part.element_size() for part in projected)
            kind = max(kind, self._check_memory(n_images + len(images), positions, planned=False, held=held), key=KINDS.index)
            if kind != bank.kind:
                own_planned = math.ceil(self._planned_images / distributed.world_size())  # this rank's share of the job
                self._keep_bank_as(bank, kind, positions * max(own_planned, n_images + len(images)))
            if projection is None and width < self.feature_dim:
                projection = projection_matrix(self.feature_dim, self.projection_dim, self.seed, self.device)
            projected.append(embedding if projection is None else embedding @ projection)
            bank.append(embedding)
            n_images += len(images)
            del embedding
        if distributed.active():
            _, grid = distributed.first_given(grid)  # ranks without images learn the grid too
        if grid is None:
            raise ModelError("no training images could be read: nothing to fit")
        positions = grid[0] * grid[1]
        fit_order = self._fit_order(n_images)
        self.bank_size_ = (n_images if fit_order is None else sum(len(part) for part in fit_order)) * positions
        count = self._check_coreset_size(self.bank_size_)
        features_done = time.perf_counter()
        points = torch.cat(projected) if projected else torch.empty(0, width, device=self.device)
        del projected
        if fit_order is not None:  # rank 0: every rank's rows in one process's order; the others: None
            points = self._in_fit_order(points, fit_order, positions)
        if count == self.bank_size_:
            selected = torch.arange(count)
        else:
            selected = torch.empty(count, dtype=torch.long)
            if points is not None:
                start = int(torch.randint(self.bank_size_, (1,), generator=torch.Generator().manual_seed(self.seed)))
                selected = greedy_coreset(points, count, start).cpu().long()
            distributed.broadcast_(selected)
        del points
        if fit_order is None:
            coreset = bank.gather(selected).to(self.device)
        else:
            coreset = self._gather_from_ranks(bank, selected, fit_order[distributed.rank()], positions)
        self.bank_precision_ = bank.kind
        bank.close()
        self.memory_mean_ = coreset.mean(dim=0)
        coreset -= self.memory_mean_
        order, self.group_offsets_ = group_order(coreset)
        self.memory_ = coreset[order].contiguous()
        self.memory_sources_ = (selected // positions).to(torch.int32)[order.cpu()].to(self.device)
        self._prepare_scoring()
        self.grid_size_ = grid
        self.n_train_images_ = self.bank_size_ // positions
        self.fit_seconds_ = {"features": features_done - started, "coreset": time.perf_counter() - features_done}
        return self

    def start_update(self) -> list[torch.Tensor]:
        """An update (`AnomalyModel.update_images`): the new images' patch features, centred on the
        coreset's mean, as `nearest_patches` scores them under the coreset as it was (one backbone
        pass each), gathered on the CPU for `finish_update`. One process."""
        if self.memory_ is None:
            raise ModelError("the model is not fitted: run train.py first")
        return []

    def finish_update(self, update: list[torch.Tensor]) -> dict:
        """The greedy k-center selection continued from the existing coreset over the new patches
        (`coreset.continue_coreset`, on the same projection), adding at most CORESET_RATIO times their
        number; the new points join the group of their nearest group center."""
        started, positions = time.perf_counter(), self.grid_size_[0] * self.grid_size_[1]
        new = torch.cat(update)  # centred: distances, and so the selection, do not depend on the centre
        update.clear()
        width = self.projection_dim if 0 < self.projection_dim < self.feature_dim else self.feature_dim
        projection = projection_matrix(self.feature_dim, width, self.seed, self.device) if width < self.feature_dim else None
        project = (lambda rows: rows) if projection is None else (lambda rows: rows @ projection)  # noqa: E731
        count = coreset_size(len(new), self.coreset_ratio)
        picked, before, after = continue_coreset(project(self.memory_), project(new.to(self.device)), count)
        rows = new.index_select(0, picked).to(self.device)
        starts = torch.tensor(self.group_offsets_[:-1], device=self.device)
        _, new_group = nearest_neighbors(rows, self.memory_.index_select(0, starts))
        old_group = torch.repeat_interleave(torch.arange(len(starts), device=self.device), torch.tensor(self.group_offsets_).diff().to(self.device))
        group = torch.cat([old_group, new_group])
        order = torch.argsort(group, stable=True)  # each group: its rows as before (center first), then the new ones
        sources = torch.cat([self.memory_sources_, (self.bank_size_ // positions + picked // positions).to(torch.int32).to(self.device)])
        self.memory_ = torch.cat([self.memory_, rows])[order].contiguous()
        self.memory_sources_ = sources[order]
        self.group_offsets_ = [0] + torch.bincount(group, minlength=len(starts)).cumsum(0).tolist()
        self.bank_size_ += len(new)
        self._prepare_scoring()
        return {
            "new_patches": int(len(new)), "coreset_added": int(len(picked)), "coreset_size": int(len(self.memory_)),
            "covering_radius_before": before, "covering_radius_after": after, "seconds": time.perf_counter() - started,
        }

    def _keep_bank_as(self, bank: PatchBank, kind: str, planned_rows: int) -> None:
        """Move the bank to `kind` (what the memory check chose) and say so in one line."""
        bank.keep_as(kind, planned_rows)
        free = size_text(available_memory())
        if kind == "float16":
            print(
                f"note: PatchCore's memory bank is kept in float16: in float32 it would not fit in the {free} available "
                "(RAM or the cgroup's limit); the coreset is chosen as in float32, its features rounded to float16",
                file=sys.stderr,
            )
        else:
            print(
                f"note: PatchCore's memory bank is kept on disk, in a temporary file in {disk_folder()} ({size_text(4 * planned_rows * self.feature_dim)}): "
                f"in RAM it would not fit in the {free} available (RAM or the cgroup's limit); the coreset and its features are the same as in RAM",
                file=sys.stderr,
            )

    def _fit_order(self, n_images: int) -> list[torch.Tensor] | None:
        """Under torchrun, per rank, the position each of its images has in one process's fit order
        (training-list order of the images every rank fitted), known to every rank; alone, None.
        Keeps the training-list number of each fit position when known (`_fit_indices`)."""
        if not distributed.active():
            told = self._fit_numbers is not None and len(self._fit_numbers) == n_images
            self._fit_indices = list(self._fit_numbers) if told else None
            return None
        numbers = list(self._fit_numbers or [])
        if len(numbers) != n_images:
            raise ModelError(f"rank {distributed.rank()} fitted {n_images} images but was told the numbers of {len(numbers)}: under torchrun fit PatchCore through train.py")
        per_rank = distributed.all_gather(numbers)
        everything = torch.tensor([number for part in per_rank for number in part], dtype=torch.long)
        self._fit_indices = sorted(everything.tolist())
        position = torch.empty_like(everything)
        position[everything.argsort()] = torch.arange(len(everything))
        return list(position.split([len(part) for part in per_rank]))

    def _in_fit_order(self, points: torch.Tensor, order: list[torch.Tensor], positions: int) -> torch.Tensor | None:
        """Rank 0: every rank's projected rows (sent to it as they are) in one process's fit order,
        image by image (each image's `positions` rows stay together); the other ranks: None."""
        received = distributed.gather_rows(points)
        if received is None:
            return None
        ordered = torch.empty(self.bank_size_, received[0].shape[1], device=received[0].device)
        grid_rows = torch.arange(positions)
        for number, images in enumerate(order):
            destination = (images[:, None] * positions + grid_rows).reshape(-1)
            ordered[destination.to(ordered.device)] = received[number]
            received[number] = None  # freed as it is placed
        return ordered

    def _gather_from_ranks(self, bank: PatchBank, selected: torch.Tensor, mine: torch.Tensor, positions: int) -> torch.Tensor:
        """(K, D) bank rows `selected` (fit-order row numbers) on every rank: each rank fills in the
        rows of its own images (`mine`: their fit positions), zeros elsewhere, and a sum over the
        ranks completes them exactly (x + 0 = x)."""
        local = torch.full((self.bank_size_ // positions,), -1, dtype=torch.long)
        local[mine] = torch.arange(len(mine))
        image = local[selected // positions]  # the selected rows' image number on this rank, -1: another's
        owned = (image >= 0).nonzero().squeeze(1)
        coreset = torch.zeros(len(selected), self.feature_dim, device=self.device)
        if owned.numel():
            rows = image[owned] * positions + selected[owned] % positions
            coreset[owned.to(self.device)] = bank.gather(rows).to(self.device)
        return distributed.all_reduce_sum_(coreset)

    # --- scoring ------------------------------------------------------------------------------

    def _prepare_scoring(self) -> None:
        """Derived scoring state (not saved): the grouped index and the rows' squared norms."""
        self._neighbors = GroupedNeighbors(self.memory_, self.group_offsets_)
        self.memory_norms_ = self._neighbors.norms

    def nearest_patches(
        self, images: torch.Tensor, excluded: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(features minus memory_mean_ (B*P, D), distance (B*P,), nearest coreset row (B*P,), grid).
        `excluded` (K,) bool: coreset rows not to use (out-of-fold scoring); the grouped search
        serves the usual case, a full search the excluded one."""
        if self.memory_ is None:
            raise ModelError("the model is not fitted: run train.py first")
        embedding, grid = self.embed(images)
        self.check_grid(grid)
        embedding.sub_(self.memory_mean_)
        if excluded is None:
            _, nearest = self._neighbors(embedding)
        else:
            _, nearest = self._search_without(excluded)(embedding)
        if self._learning is not None:  # an update in progress learns what was just scored (`start_update`)
            self._learning.append(embedding.cpu())
        return embedding, nearest_distances(embedding, self.memory_, nearest), nearest, grid

    def _search_without(self, excluded: torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The grouped search over the coreset rows not `excluded` (K,) bool, answering row numbers of
        the whole coreset: each group keeps its remaining rows in order (its first remaining row
        serves as its center, the radius measured from it, so the triangle-inequality bound holds),
        empty groups are dropped. Out-of-fold scoring with it reads about as little of the coreset
        as scoring does; a full search over every row took several times the fit on large banks.
        The last search is kept for the same `excluded` tensor: a fold's batches and tiles share it."""
        if self._last_exclusion is not None and self._last_exclusion[0] is excluded:
            return self._last_exclusion[1]
        kept = (~excluded).nonzero().squeeze(1)
        group = torch.repeat_interleave(
            torch.arange(len(self.group_offsets_) - 1, device=kept.device), torch.tensor(self.group_offsets_, device=kept.device).diff()
        )[kept]
        sizes = torch.bincount(group, minlength=len(self.group_offsets_) - 1)
        offsets = [0] + sizes[sizes > 0].cumsum(0).tolist()
        search = GroupedNeighbors(self.memory_.index_select(0, kept), offsets)

        def nearest(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            distances, rows = search(queries)
            return distances, kept[rows]

        self._last_exclusion = (excluded, nearest)
        return nearest

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) distance of each patch to its nearest coreset feature."""
        _, distances, _, grid = self.nearest_patches(images)
        return distances.view(len(images), *grid)

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), image scores (B,)) on the CPU; the score is the map's maximum, times the
        paper's eq. 7 weight when PATCHCORE_NEIGHBORS > 0."""
        maps, scores, _ = self._score(images)
        return maps.cpu(), scores.cpu()

    def score_with_peaks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`score` and each image's peak direction: the worst patch's difference to its nearest
        coreset feature, scaled to length 1 (its length is the patch's score)."""
        self.check_peak_directions(images)
        maps, scores, directions = self._score(images, peaks=True)
        return maps.cpu(), scores.cpu(), directions.cpu()

    def background_peaks(self, images: torch.Tensor, level: float) -> torch.Tensor:
        """(B, d) unit differences to the nearest coreset feature, as `score_with_peaks` gives at the
        worst patch, at each image's background peak (`background_positions`); NaN rows where none."""
        self.check_peak_directions(images)
        embedding, distances, nearest, grid = self.nearest_patches(images)
        count, positions = len(images), grid[0] * grid[1]
        found = background_positions(distances.view(count, *grid), level)
        rows = found.clamp_min(0) + torch.arange(count, device=found.device) * positions
        deviation = embedding[rows] - self.memory_[nearest[rows]]
        directions = deviation / torch.linalg.vector_norm(deviation, dim=1, keepdim=True).clamp_min(1e-12)
        return directions.masked_fill((found < 0)[:, None], float("nan")).cpu()

    def _score(self, images: torch.Tensor, excluded: torch.Tensor | None = None, peaks: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`score` without the coreset rows `excluded` (K,) bool, if given, and the peak directions if asked."""
        patch_scores, worst_embedding, worst_nearest = self._patch_scores_and_worst(images, excluded)
        norms = self.memory_norms_ if excluded is None else self.memory_norms_.masked_fill(excluded, math.inf)
        maps = self.map_maker(patch_scores, tuple(images.shape[-2:]))
        scores = self.image_scores(maps)
        if self.neighbors:
            scores = scores * self.reweighting(worst_embedding, worst_nearest, norms)
        directions = None
        if peaks:
            deviation = worst_embedding - self.memory_[worst_nearest]
            directions = deviation / torch.linalg.vector_norm(deviation, dim=1, keepdim=True).clamp_min(1e-12)
        return maps, scores, directions

    def _patch_scores_and_worst(self, images: torch.Tensor, excluded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """((B, h, w) patch scores of whole working images, (B, D) each image's worst patch's feature
        (minus memory_mean_), (B,) its nearest coreset row). With tiles, the patch scores are the
        tiles' stitched (overlaps averaged) and the worst patch is the farthest of all its tiles' patches."""
        layout = self.working_size(images.shape[-2:])
        if layout is None:
            embedding, distances, nearest, grid = self.nearest_patches(images, excluded)
            count, positions = len(images), grid[0] * grid[1]
            worst = distances.view(count, positions).argmax(dim=1) + torch.arange(count, device=distances.device) * positions
            return distances.view(count, *grid), embedding[worst], nearest[worst]
        count = len(images)
        sums = torch.zeros(count, *layout.grid, dtype=torch.float32, device=self.device)
        worst_distance = torch.full((count,), -math.inf, device=self.device)
        worst_embedding = torch.zeros(count, self.memory_.shape[1], dtype=torch.float32, device=self.device)
        worst_nearest = torch.zeros(count, dtype=torch.long, device=self.device)
        for tiles, image_index, location in layout.chunks(images, TILE_CHUNK, whole_images=False):
            embedding, distances, nearest, grid = self.nearest_patches(tiles, excluded)
            per_tile = distances.view(len(tiles), grid[0] * grid[1])
            layout.add(sums, per_tile.view(len(tiles), *grid), image_index, location)
            best, row = per_tile.max(dim=1)
            row = row + torch.arange(len(tiles), device=row.device) * per_tile.shape[1]
            image_index = image_index.to(self.device)
            now = worst_distance.scatter_reduce(0, image_index, best, reduce="amax")
            wins = best.ge(now[image_index]) & best.gt(worst_distance[image_index])  # this tile holds its image's new worst patch
            worst_embedding[image_index[wins]] = embedding[row[wins]].float()
            worst_nearest[image_index[wins]] = nearest[row[wins]].long()
            worst_distance = now
        return sums.div_(layout.coverage(sums.device)), worst_embedding, worst_nearest

    def reweighting(self, queries: torch.Tensor, matches: torch.Tensor, norms: torch.Tensor, neighbors: int = 0) -> torch.Tensor:
        """(B,) eq. 7 weights (`eq7_weights`) with this model's coreset; `neighbors` replaces
        PATCHCORE_NEIGHBORS (bench/patchcore_neighbors.py)."""
        return eq7_weights(queries, matches, self.memory_, norms, neighbors or self.neighbors)

    def out_of_fold_scores(
        self, batches: Callable[..., Iterable[tuple[torch.Tensor, list[int]]]], folds: np.ndarray, peaks: bool = False
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each training image scored against the coreset without the points that came from
        training images of its own fold (the coreset itself is not re-chosen: see docs/models.md, PatchCore).
        Fold by fold: only the fold's images are read (`batches(wanted)`), each once, and the search
        without the fold's points is built once for them (`_search_without`); the fit's order comes
        from the fit when train.py told it the images' numbers (`plan_fit`), else from a first reading. The fit's order is the
        training list's (`fit`), so a coreset point's source number is its training index."""
        folds = np.asarray(folds)
        order = self._fit_indices  # fit position -> training index, read from the images only when the fit was not told it
        if order is None:
            order = [index for _, indices in batches() for index in indices]
        if len(order) != self.n_train_images_:
            raise ModelError(f"out-of-fold scoring got {len(order)} training images, the model was fitted on {self.n_train_images_}")
        source_folds = torch.as_tensor(folds[order])[self.memory_sources_.long().cpu()].to(self.device)
        for fold in np.unique(folds[order]):
            excluded = source_folds == int(fold)
            left = int((~excluded).sum())
            if left < max(1, self.neighbors):
                if left == 0:
                    raise ModelError(f"fold {fold} holds the sources of all {len(excluded)} coreset points: out-of-fold scoring needs coreset points from another fold: raise CORESET_RATIO, add training images, or set OUT_OF_FOLD_FOLDS = 0")
                raise ModelError(
                    f"without the coreset points of training-image fold {fold}, {left} of the {len(excluded)} points are left, "
                    f"fewer than the {self.neighbors} the out-of-fold scoring needs (PATCHCORE_NEIGHBORS): raise CORESET_RATIO, "
                    "lower PATCHCORE_NEIGHBORS, or set OUT_OF_FOLD_FOLDS=0"
                )
            try:
                for images, indices in batches([index for index in order if folds[index] == fold]):
                    maps, scores, directions = self._score(images, excluded, peaks)
                    yield list(indices), maps.cpu(), scores.cpu(), None if directions is None else directions.cpu()
            finally:
                self._last_exclusion = None  # the fold's search holds a copy of most of the coreset

    def patch_score_module(self, release: bool = False) -> "PatchCoreScores":
        return PatchCoreScores(self, release)

    # --- saving and loading -------------------------------------------------------------------

    def settings(self) -> dict:
        return {
            **super().settings(),
            "coreset_ratio": self.coreset_ratio,
            "neighbors": self.neighbors,
            "feature_dim": self.feature_dim,
            "projection_dim": self.projection_dim,
        }

    def fitted_state(self) -> dict:
        return {
            **super().fitted_state(),
            "coreset_size": int(self.memory_.shape[0]),
            "bank_size": self.bank_size_,
            "group_offsets": list(self.group_offsets_),
        }

    def load_fitted_state(self, state: dict) -> None:
        super().load_fitted_state(state)
        check(state, {"coreset_size": integer(minimum=1), "bank_size": integer(minimum=1), "group_offsets": sequence(integer(minimum=0), min_length=2)}, "state")
        self._coreset_size = int(state["coreset_size"])
        self.bank_size_ = int(state["bank_size"])
        self.group_offsets_ = [int(offset) for offset in state["group_offsets"]]
        if self.group_offsets_[0] != 0 or self.group_offsets_[-1] != self._coreset_size or sorted(self.group_offsets_) != self.group_offsets_:
            # a ValueError: the caller (store.model_file_guard) names the model's model.json and says retrain
            raise ValueError(f"state.coreset_size {self._coreset_size} does not fit state.group_offsets (ending at {self.group_offsets_[-1]})")

    def save_arrays(self, out) -> None:
        out.write_npy("coreset.npy", self.memory_.cpu().numpy())
        out.write_npy("coreset_mean.npy", self.memory_mean_.cpu().numpy())
        out.write_npy("coreset_sources.npy", self.memory_sources_.cpu().numpy(), dtype="<i4")

    def load_arrays(self, folder, files: dict) -> None:
        count = self._coreset_size
        memory = read_npy(folder, "coreset.npy", files, (count, self.feature_dim))
        mean = read_npy(folder, "coreset_mean.npy", files, (self.feature_dim,))
        sources = read_npy(folder, "coreset_sources.npy", files, (count,), dtype="<i4")
        self.memory_ = torch.from_numpy(np.ascontiguousarray(memory)).to(self.device)
        self.memory_mean_ = torch.from_numpy(np.ascontiguousarray(mean)).to(self.device)
        self.memory_sources_ = torch.from_numpy(np.ascontiguousarray(sources)).to(self.device)
        self._prepare_scoring()

    def to(self, device: torch.device) -> "PatchCore":
        super().to(device)
        if self.memory_ is not None:
            self._prepare_scoring()
        return self


class PatchCoreScores(nn.Module):
    """Layer features -> (N, h, w) patch scores of a fitted PatchCore, in operations ONNX has (the
    model's part of `AnomalyModel.export_module`), and with PATCHCORE_NEIGHBORS > 0 the (N,) eq. 7
    weights of the image scores. The nearest coreset row is found by the model's own grouped search
    (`GroupedNeighbors.search_traced`): groups that cannot hold a query's nearest row are skipped
    by data-dependent selections (ONNX NonZero), so onnxruntime reads about as little of the
    coreset as torch does, and queries the groups prune poorly take the same dense pass as in torch;
    a dense search of every query over every row was 2-5x slower than torch. Such a graph
    is written by tracing (`DATA_DEPENDENT_SHAPES`, see `onnx_file.write_onnx`).
    `release`: the module takes the model's coreset instead of a copy."""

    DATA_DEPENDENT_SHAPES = True

    def __init__(self, model: PatchCore, release: bool = False) -> None:
        super().__init__()
        self.grid = tuple(model.grid_size_)
        self.neighbors = model.neighbors
        memory = model.memory_.cpu()
        self.register_buffer("memory", memory if release else memory.clone())
        self.register_buffer("memory_mean", model.memory_mean_.cpu().clone())
        self.search = GroupedNeighbors(self.memory, model.group_offsets_)
        self.register_buffer("memory_norms", self.search.norms)
        if release:
            model.memory_ = None
            model._neighbors = None
        self.pooling_count = 0 if model._pooling is None else len(model._pooling)
        for index in range(self.pooling_count):
            self.register_buffer(f"pooling_{index}", model._pooling[index].cpu().clone())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        count, (height, width) = features[0].shape[0], self.grid
        pooling = [getattr(self, f"pooling_{index}") for index in range(self.pooling_count)] or None
        queries = patch_features(features, pooling) - self.memory_mean
        distances, nearest = self.search.search_traced(queries)
        scores = distances.view(count, height, width)
        if not self.neighbors:
            return scores
        worst = distances.view(count, height * width).argmax(dim=1) + torch.arange(count) * (height * width)
        return scores, eq7_weights(queries[worst], nearest[worst], self.memory, self.memory_norms, self.neighbors)
