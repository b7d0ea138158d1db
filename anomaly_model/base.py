"""What every anomaly model of the suite shares: a pretrained backbone, one interface for fitting
and scoring, and one map post-processing.

A model (PaDiM, PatchCore) only says how it fits good backbone inputs and how far each patch of
a new input is from what it learned (`fit`, `patch_scores`, on the backbone's feature grid).
Everything else is here, once: building the backbone, running it in slices, tiling large working
images (`fit_images`, `image_patch_scores`: the model sees tiles, the caller whole images),
turning patch scores into anomaly maps (`maps.MapMaker`), image scores, moving to a device, the
memory check, and the description `store.py` saves. Shaped like a scikit-learn estimator:
settings in __init__, learned state in attributes ending in "_".

Tiles (TILE_SIZE > 0): each working image is cut into overlapping TILE_SIZE tiles (tiles.py);
the model fits and scores the tiles, their patch scores are stitched onto the image's patch grid
(overlaps averaged) and the map is made once. TILE_STATISTICS says what the tiles share:
"shared", one set of statistics for every tile (textures, webs; any model), or "location",
statistics per tile location (aligned parts; models listing it in TILE_STATISTICS_KINDS, PaDiM:
a Gaussian per position of each tile location).
"""

from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from anomaly_model import distributed
from anomaly_model.backbone import FeatureExtractor
from anomaly_model.errors import ModelError
from anomaly_model.maps import MapMaker, apply_operators
from anomaly_model.memory import available_memory
from anomaly_model.schema import check
from settings import integer, sequence
from anomaly_model.tiles import TileLayout, check_tile_settings

# Images per backbone pass on the CPU, by backbone. The layer maps of 8 images take a quarter of a
# 32-image batch's memory (~0.5 GB less for Wide-ResNet at 224 px), and oneDNN is no slower per
# image at 8 (Wide-ResNet 0.159-0.163 s/image against 0.165-0.185 at 32 in two bench/benchmark.py
# runs, 2-core CPU). MobileNetV2, whose expanded early layers are the largest maps per image, takes
# 18-42 % less time per image in slices of 4 than of 8; the ResNets 0-4 % more
# (`bench/backbone_speed.py --slices 8,4,2`, docs/performance.md). GPUs take the whole batch.
BACKBONE_SLICE = {"resnet18": 8, "wide_resnet50_2": 8, "mobilenet_v2": 4}
# Tiles handed to the model at once: bounds the memory of tiling whatever the image size (a
# chunk's embedding is that of a 32-image batch at 224 px). With TILE_STATISTICS="location" a
# chunk holds whole images (every location of each, at least one image): bounded too, since the
# statistics of many locations are refused by the memory check long before their chunk is large.
TILE_CHUNK = 32
# Share of the free memory the statistics may take before the fit is refused.
MEMORY_SHARE = 0.8

# config.py key -> constructor argument, for the settings every model has. A model class adds its
# own in `OWN_SETTINGS`; the same table builds a model from config.py (pipeline/training.py) and
# tells a user which config.py values a loaded model overrides (pipeline/detector.py).
COMMON_SETTINGS = {
    "BACKBONE": "backbone",
    "WEIGHTS": "weights",
    "LAYERS": "layers",
    "BLUR_SIGMA": "blur_sigma",
    "SEED": "seed",
    "BACKBONE_PRECISION": "precision",
    "TILE_SIZE": "tile_size",
    "TILE_OVERLAP": "tile_overlap",
    "TILE_STATISTICS": "tile_statistics",
}


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else CPU; a named device must exist. Under torchrun each rank
    takes its own GPU, cuda:LOCAL_RANK (`distributed.rank_device`)."""
    name = distributed.rank_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"DEVICE={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # torch names more (mps, xpu, ...), which this suite does not run on
        raise ModelError(f"DEVICE={name!r} is not a device this suite runs on: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"DEVICE={name} but no CUDA GPU is available: use DEVICE=auto or cpu")
    return device


@dataclass(frozen=True)
class ModelSettings:
    """What every anomaly model is built from: the config.py settings of COMMON_SETTINGS, under their
    constructor names. A model class extends it with its own (`SETTINGS`); model.json saves the
    fields flat (`AnomalyModel.settings`), and `SETTINGS(**saved)` builds the same model again."""

    backbone: str = "resnet18"
    weights: str = "imagenet"
    layers: tuple[int, ...] = ()  # () = the model's DEFAULT_LAYERS
    blur_sigma: float = 4.0
    seed: int = 0
    precision: str = "float32"
    tile_size: int = 0
    tile_overlap: int = 0
    tile_statistics: str = "shared"


class AnomalyModel:
    """Base of the anomaly models: fit on good images, then maps and scores for any image.

    Subclasses set `kind` (saved as the model's type), `OWN_SETTINGS`, and implement `fit`,
    `patch_scores`, `settings`, `fitted_state`, `save_arrays` and `load_arrays`; optionally
    `statistics_bytes` (the memory check), TILE_STATISTICS_KINDS, and `start_update` / `finish_update`
    with their scoring feeding `_learning` (train.py ADD_GOOD). Callers use `fit_images`,
    `anomaly_maps`, `score` and `update_images`, which take whole working images, tiled or not.
    """

    kind = ""
    HAS_PEAK_DIRECTIONS = False  # True where `score_with_peaks` works (untiled): PaDiM through `patch_scores_and_peaks`, PatchCore its own
    MIN_IMAGES_OUTSIDE_FOLD = 1  # training images an out-of-fold model needs besides a fold's (PaDiM: 2, a covariance)
    OWN_SETTINGS: dict[str, str] = {}
    SETTINGS: type[ModelSettings] = ModelSettings  # the settings dataclass of this model class
    DEFAULT_LAYERS: tuple[int, ...] = (1, 2, 3)  # the stages LAYERS = () stands for (PaDiM 1-3, PatchCore 2-3)
    TILE_STATISTICS_KINDS: tuple[str, ...] = ("shared",)  # "location" too where the model has statistics per position
    _learning: object | None = None  # while `update_images` runs: the `start_update` state its scoring feeds

    def __init__(self, settings: ModelSettings | None = None, device: str = "auto") -> None:
        settings = settings if settings is not None else self.SETTINGS()
        backbone, weights, seed, precision = settings.backbone, settings.weights, settings.seed, settings.precision
        tile_size, tile_overlap, tile_statistics = settings.tile_size, settings.tile_overlap, settings.tile_statistics
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(settings.layers) or self.DEFAULT_LAYERS
        self.blur_sigma = float(settings.blur_sigma)
        self.seed = int(seed)
        self.device = resolve_device(device)
        if precision == "float16" and self.device.type != "cuda":
            raise ModelError("BACKBONE_PRECISION=float16 needs a CUDA GPU: use bfloat16 or float32 on the CPU")
        self.precision = precision
        self.extractor = FeatureExtractor(backbone, weights, self.layers, seed, precision).to(self.device)
        self.map_maker = MapMaker(self.blur_sigma)
        self.cell = self.extractor.strides[0]  # pixels per patch-grid cell
        self.stride = self.extractor.strides[-1]  # the deepest layer's: sizes divisible by it fit every layer
        self.tile_size, self.tile_overlap = int(tile_size), int(tile_overlap)
        check_tile_settings(self.tile_size, self.tile_overlap, self.stride)
        if tile_statistics not in self.TILE_STATISTICS_KINDS:
            raise ModelError(
                f"TILE_STATISTICS={tile_statistics!r} is not available for {self.kind or 'this model'}: "
                f"choose {' or '.join(repr(k) for k in self.TILE_STATISTICS_KINDS)}"
            )
        self.tile_statistics = tile_statistics
        self.grid_size_: tuple[int, int] | None = None  # patch grid (h, w) of the fitted inputs (tiles when tiled)
        self.image_size_: tuple[int, int] | None = None  # working image size (H, W) fitted on
        self.tile_layout_: TileLayout | None = None
        self.n_train_images_ = 0

    @classmethod
    def setting_names(cls) -> dict[str, str]:
        """config.py key -> constructor argument, for every setting this model type takes."""
        return {**COMMON_SETTINGS, **cls.OWN_SETTINGS}

    # --- what each model implements ---------------------------------------------------------

    def fit(self, batches: Iterable[torch.Tensor]) -> "AnomalyModel":
        """Fit on batches of normalized good images (B, 3, H, W)."""
        raise NotImplementedError

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) anomaly score of each patch of each image, on the model's feature grid."""
        raise NotImplementedError

    def prepare_scoring(self) -> None:
        """Precompute what scoring will reuse for every image (a loaded model about to inspect many:
        `pipeline.inspection.Inspector`), so the first image does not pay for it. Nothing by default."""

    def plan_fit(self, n_images: int, numbers: Sequence[int] | None = None) -> None:
        """Told the number of training images before `fit`, so that a model whose memory grows
        with it (PatchCore's bank) can refuse at once rather than after minutes; under torchrun
        also `numbers`, filled as the batches are read: the training-list number of each image
        this rank fits (PatchCore puts the ranks' patches in one process's order). Default: nothing."""

    def out_of_fold_scores(
        self, batches: Callable[..., Iterable[tuple[torch.Tensor, list[int]]]], folds: np.ndarray, peaks: bool = False
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """After `fit` on the same images: honest anomaly maps of the training images themselves.
        `batches()` returns a fresh iterable over exactly the training images the model was fitted on,
        in the fit's order, as (images (B, 3, H, W), their indices in the training list);
        `batches(wanted)` only those of the training indices `wanted` (increasing). `folds[i]` is
        the fold of training image i. Yields (indices, maps (b, H, W) on the CPU, image scores (b,) on
        the CPU, with `peaks` their peak directions (b, d) on the CPU as `score_with_peaks` gives them,
        else None), each image scored by a model that did not see its fold. The fitted model is unchanged."""
        raise NotImplementedError(f"{type(self).__name__} has no out-of-fold scores")

    def patch_scores_and_peaks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) patch scores, as `patch_scores`, and (B, d) unit vectors saying in which way each
        image's highest-scoring patch deviates from the good patches (`score_with_peaks`)."""
        raise NotImplementedError(f"{type(self).__name__} has no peak directions")

    def background_peaks(self, images: torch.Tensor, level: float) -> torch.Tensor:
        """(B, d) unit directions, as `patch_scores_and_peaks` gives at the peak, at each image's
        background peak (`background_positions` with `level`); NaN rows where it has none."""
        raise NotImplementedError(f"{type(self).__name__} has no background peaks")

    def settings(self) -> dict:
        """Constructor arguments, as saved in model.json (with the values the model resolved)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "layers": list(self.layers),
            "blur_sigma": self.blur_sigma,
            "seed": self.seed,
            "precision": self.precision,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "tile_statistics": self.tile_statistics,
        }

    def fitted_state(self) -> dict:
        """Learned values small enough for model.json (the arrays go to `save_arrays`)."""
        state = {"grid_size": list(self.grid_size_), "n_train_images": self.n_train_images_}
        if self.image_size_ is not None:
            state["image_size"] = list(self.image_size_)
        if self.tile_layout_ is not None:
            state["tiles"] = {"count": self.tile_layout_.count, "tops": list(self.tile_layout_.tops), "lefts": list(self.tile_layout_.lefts)}
        return state

    def load_fitted_state(self, state: dict) -> None:
        """The inverse of `fitted_state`; a missing or wrong entry raises SchemaError naming it."""
        check(state, {"grid_size": sequence(integer(minimum=1), length=2), "n_train_images": integer(minimum=1)}, "state")
        self.grid_size_ = tuple(state["grid_size"])
        self.n_train_images_ = int(state["n_train_images"])
        self.image_size_ = tuple(state["image_size"]) if "image_size" in state else None
        self.tile_layout_ = None
        if "tiles" in state:
            tiles = state["tiles"]
            self.tile_layout_ = TileLayout(self.image_size_, self.tile_size, self.cell, tuple(tiles["tops"]), tuple(tiles["lefts"]))

    def statistics_bytes(self, positions: int) -> int:
        """Bytes the fitted statistics take for `positions` patch positions (0: nothing to check)."""
        return 0

    def save_arrays(self, out) -> None:
        """Write the learned arrays into the `files.AtomicFolder` `out`."""
        raise NotImplementedError

    def load_arrays(self, folder, files: dict) -> None:
        """Read back what `save_arrays` wrote (checksums in `files`), after `load_fitted_state`."""
        raise NotImplementedError

    def bounded_pixel_threshold(self, rate: float) -> tuple[float, str] | None:
        """(the map level a good pixel exceeds with probability at most `rate` whatever the
        distribution of good features, the rule it follows from), for PIXEL_THRESHOLD_POLICY =
        "chebyshev"; None for a model that has no such bound."""
        return None

    def patch_score_module(self, release: bool = False) -> nn.Module:
        """The fitted `patch_scores` as a torch module of operations ONNX has, taking the backbone's
        layer features (what `export_module` puts between the backbone and the maps) and returning
        the (N, h, w) patch scores, or (patch scores, (N,) factors of the image scores) for a model
        whose image score is not the map's plain maximum (PatchCore's eq. 7). `release`: the module
        may take over the model's statistics, and the model cannot score afterwards."""
        raise ModelError(f"ANOMALY_MODEL={self.kind!r} models cannot be exported to ONNX yet: use RUNTIME=torch")

    # --- shared -------------------------------------------------------------------------------

    def backbone_slices(self, images: torch.Tensor) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(start index, layer features) per slice of BACKBONE_SLICE images on the CPU (the whole
        batch on a GPU): the layer maps of a whole batch never exist at once."""
        images = images.to(self.device)
        step = BACKBONE_SLICE[self.backbone] if self.device.type == "cpu" else len(images)
        with torch.no_grad():
            for start in range(0, len(images), step):
                yield start, self.extractor(images[start : start + step])

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Inputs must give the patch grid the model was fitted on."""
        if self.grid_size_ is None:
            raise ModelError("the model is not fitted: run train.py first")
        if tuple(grid) != tuple(self.grid_size_):
            raise ModelError(f"images give a {tuple(grid)} patch grid, the model was fitted on {self.grid_size_}: use the model's IMAGE_SIZE")

    # --- working images: tiles, memory --------------------------------------------------------

    @property
    def statistics_locations(self) -> int:
        """How many sets of statistics per position: the tile count with TILE_STATISTICS="location", else 1."""
        tiled_by_location = self.tile_layout_ is not None and self.tile_statistics == "location"
        return self.tile_layout_.count if tiled_by_location else 1

    def fit_positions(self) -> int:
        """Patch positions the statistics hold at the working size (backbone grids round up)."""
        if self.tile_layout_ is None:
            return math.ceil(self.image_size_[0] / self.cell) * math.ceil(self.image_size_[1] / self.cell)
        return self.statistics_locations * self.tile_layout_.tile_grid**2

    def working_size(self, image_size: tuple[int, int]) -> TileLayout | None:
        """The tile layout (None untiled) for scoring working images of `image_size`, which must be
        the size the model was fitted on: every map of a model has one size."""
        image_size = (int(image_size[0]), int(image_size[1]))
        if self.image_size_ is None:  # fitted through `fit` directly: untiled, the grid check guards it
            if self.tile_size:
                raise ModelError("the tiled model is not fitted: run train.py first")
            return None
        if image_size != self.image_size_:
            raise ModelError(
                f"images are {image_size[0]} x {image_size[1]}, the model works at "
                f"{self.image_size_[0]} x {self.image_size_[1]}: use the model's IMAGE_SIZE"
            )
        return self.tile_layout_

    def start_fit(self, image_size: tuple[int, int]) -> TileLayout | None:
        """Fix the working size of a fit and its tile layout; refuse it when the statistics would not
        fit in memory (with the estimate and what to lower). train.py calls it before reading images."""
        image_size = (int(image_size[0]), int(image_size[1]))
        layout = TileLayout.build(image_size, self.tile_size, self.tile_overlap, self.cell) if self.tile_size else None
        self.image_size_, self.tile_layout_ = image_size, layout
        positions = self.fit_positions()
        needed, free = self.statistics_bytes(positions), available_memory(self.device)
        if needed > MEMORY_SHARE * free:
            if layout is not None and self.tile_statistics == "location":
                advice = "use TILE_STATISTICS='shared' (one set for all tiles), or lower IMAGE_SIZE or FEATURE_DIM"
            elif layout is not None:
                advice = "lower TILE_SIZE or FEATURE_DIM"
            else:
                advice = "lower IMAGE_SIZE or FEATURE_DIM, or cut the image into tiles (TILE_SIZE, TILE_STATISTICS='shared')"
            self.image_size_, self.tile_layout_ = None, None
            raise ModelError(
                f"the statistics for {image_size[0]} x {image_size[1]} images would take about {needed / 1e9:.1f} GB "
                f"({positions} patch positions) but {free / 1e9:.1f} GB of memory is free on {self.device}: {advice}"
            )
        return layout

    def fit_images(self, batches: Iterable[torch.Tensor]) -> "AnomalyModel":
        """Fit on batches of whole normalized working images (B, 3, H, W): what train.py calls.
        Untiled, the model's `fit` sees the images; tiled, it sees their tiles in bounded chunks."""
        seen = [0]
        self.fit(self._model_inputs(batches, seen))
        self.n_train_images_ = sum(distributed.all_gather(seen[0]))  # under torchrun: every rank's images
        return self

    def start_update(self) -> object:
        """The state of an update of the fitted model (train.py ADD_GOOD) that its scoring feeds while
        `update_images` runs: each model's scoring hands what it computed of its inputs (PaDiM: the
        embeddings, PatchCore: the patch features) to `_learning`, and `finish_update` learns it.
        Models that cannot learn without a retrain say so."""
        raise ModelError(f"{self.kind} models cannot learn new images without a retrain: run python train.py")

    def finish_update(self, update: object) -> dict:
        """Make what `update` (from `start_update`) gathered part of the model; returns what the model
        reports of its update (PatchCore: the covering radius of the new patches)."""
        raise NotImplementedError

    def update_images(self, batches: Iterable[torch.Tensor], scored: Callable[[torch.Tensor, torch.Tensor], None]) -> dict:
        """Learn batches of good working images of the fitted size without the training images
        (train.py ADD_GOOD), one backbone pass each: the pass that scores a batch under the model as
        it was before the update (`score`, tiled as it tiles; its (maps, image scores) on the CPU go
        to `scored`: honest goods, as the validation images are) also hands its features to the
        update, which the model learns after the last batch. Returns the model's report ({} when
        no batch came: the model is unchanged)."""
        update = self.start_update()
        self._learning, count = update, 0
        try:
            for images in batches:
                scored(*self.score(images))
                count += len(images)
        finally:
            self._learning = None
        if not count:
            return {}
        report = self.finish_update(update)
        self.n_train_images_ += count
        return report

    def _model_inputs(self, batches: Iterable[torch.Tensor], seen: list[int]) -> Iterator[torch.Tensor]:
        """The model's inputs for batches of working images: the images, or their tiles in bounded
        chunks; `seen[0]` counts the images. The first batch fixes the working size (a fit)."""
        for images in batches:
            size = tuple(images.shape[-2:])
            layout = self.start_fit(size) if seen[0] == 0 else self.working_size(size)
            seen[0] += len(images)
            if layout is None:
                yield images
                continue
            for tiles, _, _ in layout.chunks(images, TILE_CHUNK, whole_images=self.statistics_locations > 1):
                yield tiles

    def image_patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch scores of whole working images on their own patch grid: the model's
        `patch_scores` of the images, or of their tiles (bounded chunks) stitched, overlaps averaged."""
        layout = self.working_size(images.shape[-2:])
        if layout is None:
            return self.patch_scores(images)
        sums = torch.zeros(len(images), *layout.grid, dtype=torch.float32, device=self.device)
        for tiles, image_index, location in layout.chunks(images, TILE_CHUNK, whole_images=self.statistics_locations > 1):
            layout.add(sums, self.patch_scores(tiles), image_index, location)
        return sums.div_(layout.coverage(sums.device))

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly maps at the input resolution: patch scores upsampled and blurred."""
        return self.map_maker(self.image_patch_scores(images), tuple(images.shape[-2:]))

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,) image scores of (B, H, W) maps: their maximum, as PaDiM scores an image."""
        return max_of_maps(maps)

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), image scores (B,)) on the CPU: what test.py, eval.py and training use."""
        maps = self.anomaly_maps(images)
        return maps.cpu(), self.image_scores(maps).cpu()

    @property
    def has_peak_directions(self) -> bool:
        """Whether `score_with_peaks` works: a model that has them (HAS_PEAK_DIRECTIONS), untiled
        (a tiled image's peak would need its tile's embedding: not done yet)."""
        return self.HAS_PEAK_DIRECTIONS and self.tile_size == 0

    def check_peak_directions(self, images: torch.Tensor) -> None:
        """A one-line ModelError unless this model gives peak directions for working images of this size."""
        if not self.has_peak_directions:
            raise ModelError(f"{self.kind} models{' with tiles' if self.tile_size else ''} have no peak directions: retrain with CLASSIFIER_DEFECT_SIMILARITY=False")
        self.working_size(images.shape[-2:])

    def score_with_peaks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `score` returns and each image's peak direction (B, d), all on the CPU, from one
        backbone pass: for a classifier that compares images with labeled defects. This default
        serves models whose image score is the map's maximum and that implement `patch_scores_and_peaks`."""
        self.check_peak_directions(images)
        patch_scores, directions = self.patch_scores_and_peaks(images)
        maps = self.map_maker(patch_scores, tuple(images.shape[-2:]))
        return maps.cpu(), self.image_scores(maps).cpu(), directions.cpu()

    def export_module(self, image_size: tuple[int, int], release: bool = False) -> "ScoringModule":
        """What `score` computes for (N, 3, H, W) images of `image_size`, as one torch module that
        torch.onnx can export (pipeline/exporting.py): backbone, this model's patch scores, the map
        post-processing and the image scores, on the CPU in float32. `release=True` when this is the
        model's last use (export.py): its statistics may become the module's instead of being
        copied (Wide-ResNet PaDiM: 3.8 GB less at the export's peak), and the model cannot score."""
        self.check_grid(self.grid_size_)
        if self.tile_layout_ is not None:
            raise ModelError("tiled models (TILE_SIZE > 0) cannot be exported to ONNX yet: use RUNTIME=torch")
        if self.precision != "float32":
            raise ModelError(
                f"this model runs its backbone in BACKBONE_PRECISION={self.precision}; only float32 models are exported "
                "(the ONNX graph is float32): retrain with BACKBONE_PRECISION=float32"
            )
        if self.device.type != "cpu":
            raise ModelError("export a model loaded on the CPU (DEVICE=cpu): the exported graph must not hold GPU tensors")
        rows, columns = self.map_maker.operators(self.grid_size_, tuple(image_size), torch.device("cpu"))
        if rows.is_sparse or columns.is_sparse:
            raise ModelError(f"maps of {image_size[0]} x {image_size[1]} pixels use sparse operators, which ONNX export does not take: lower IMAGE_SIZE")
        return ScoringModule(self.extractor, self.patch_score_module(release), rows.clone(), columns.clone()).eval()

    def to(self, device: torch.device) -> "AnomalyModel":
        self.device = torch.device(device)
        self.extractor.to(self.device)
        for name, value in vars(self).items():
            if name.endswith("_") and isinstance(value, torch.Tensor):
                setattr(self, name, value.to(self.device))
        return self


BACKGROUND_GROW = 2  # patches a defect's region is grown by before its image's background peak is looked for


def background_positions(patch_scores: torch.Tensor, level: float, grow: int = BACKGROUND_GROW) -> torch.Tensor:
    """(B,) flat index of each image's background peak: its highest patch outside the peak's region,
    -1 where the region covers everything. The region: the patches above `level` connected (8
    neighbours) to the highest one, grown by `grow` patches. Why: the patches of a labeled defect's
    image away from its defect were taken exactly like it; they are the goods that show whether a
    direction the labeled defects share is the defects' or the acquisition's (classification_model.evidence)."""
    count, height, width = patch_scores.shape
    flat = patch_scores.reshape(count, -1)
    high = patch_scores > level
    region = torch.zeros(count, height * width, dtype=torch.bool, device=patch_scores.device)
    region[torch.arange(count, device=patch_scores.device), flat.argmax(dim=1)] = True
    region = region.view(count, height, width)

    def dilated(mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0

    while True:  # flood the high patches from the peak, all images at once
        grown = region | (dilated(region) & high)
        if torch.equal(grown, region):
            break
        region = grown
    for _ in range(grow):
        region = dilated(region)
    outside = flat.masked_fill(region.reshape(count, -1), -math.inf)
    best, position = outside.max(dim=1)
    return torch.where(torch.isfinite(best), position, torch.full_like(position, -1))


def max_of_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B,) maximum of each (B, H, W) map: PaDiM's image score."""
    return maps.flatten(1).max(dim=1).values


class ScoringModule(nn.Module):
    """(N, 3, H, W) float32 images -> ((N, H, W) anomaly maps, (N,) image scores) of one fitted model:
    the module export.py writes as ONNX. The backbone, the maps (the `maps.MapMaker` operators as two
    constant matrices) and the image scores are shared; only `patch_scores` is the model's own."""

    def __init__(self, extractor: nn.Module, patch_scores: nn.Module, rows: torch.Tensor, columns: torch.Tensor) -> None:
        super().__init__()
        self.extractor = extractor
        self.patch_scores = patch_scores
        self.register_buffer("rows", rows)
        self.register_buffer("columns", columns)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.patch_scores(self.extractor(images))
        scores, factors = scores if isinstance(scores, tuple) else (scores, None)
        maps = apply_operators(scores, self.rows, self.columns)
        return maps, max_of_maps(maps) if factors is None else max_of_maps(maps) * factors
