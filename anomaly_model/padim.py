"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position over pretrained CNN features.

Shaped like a scikit-learn estimator: settings in __init__, learned state in attributes ending
in "_", `fit` on good images, `anomaly_maps` / `score` on new ones.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from anomaly_model.backbone import DEFAULT_FEATURE_DIM, FeatureExtractor, ModelError
from anomaly_model.gaussian import StreamingGaussian, mahalanobis

# Images per backbone pass on the CPU. The layer maps of 8 images take a quarter of a 32-image
# batch's memory (~0.5 GB less for Wide-ResNet at 224 px), and oneDNN is no slower per image
# at 8 (Wide-ResNet 0.159-0.163 s/image against 0.165-0.185 at 32 in two bench/benchmark.py runs,
# 2-core CPU). GPUs take the whole batch.
BACKBONE_SLICE = 8


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"DEVICE={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"DEVICE={name} but no CUDA GPU is available: use DEVICE=auto or cpu")
    return device


def _blur_matrix(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(size, size) matrix B with B @ v = scipy.ndimage.gaussian_filter1d(v, sigma) (truncate 4,
    mode reflect): the kernel folded onto the signal's mirrored edges. A dense product with B is
    ~30x faster on the CPU than a one-channel conv2d with a 33-tap kernel."""
    radius = min(int(4.0 * sigma + 0.5), size - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = torch.arange(size)[:, None].expand(size, offsets.numel())
    columns = rows + offsets.long()[None, :]
    columns = torch.where(columns < 0, -columns - 1, columns)  # half-sample symmetric, as scipy's "reflect"
    columns = torch.where(columns >= size, 2 * size - columns - 1, columns)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), columns.reshape(-1)), kernel.repeat(size), accumulate=True)
    return matrix.float().to(device)


def _upsample_matrix(source: int, target: int, device: torch.device) -> torch.Tensor:
    """(target, source) matrix U with U @ v = F.interpolate(v, target, bilinear, align_corners=False)."""
    identity = torch.eye(source, dtype=torch.float64)[None, None]
    columns = F.interpolate(identity, size=(target, source), mode="bilinear", align_corners=False)[0, 0]
    return columns.float().to(device)


def _nearest_source(source: int, target: int, device: torch.device) -> torch.Tensor:
    """Source index of each of `target` cells under F.interpolate(mode="nearest"), taken from
    interpolate itself so the channels-last embedding matches the published one exactly."""
    positions = torch.arange(source, dtype=torch.float32, device=device).view(1, 1, -1)
    return F.interpolate(positions, size=target, mode="nearest").view(-1).long()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps, as scipy.ndimage.gaussian_filter (truncate 4, mode reflect)
    computes it, so maps match the published implementation; runs on the maps' device."""
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    rows = _blur_matrix(height, sigma, maps.device)
    columns = _blur_matrix(width, sigma, maps.device)
    return rows @ maps.float() @ columns.T


class Padim:
    """Patch distribution model: fit on good images, then anomaly maps and scores for any image."""

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
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ModelError(f"COVARIANCE_EPSILON={epsilon} must be >= 0 (the paper uses 0.01)")
        self.blur_sigma = float(blur_sigma)
        self.seed = int(seed)
        self.device = resolve_device(device)
        if precision == "float16" and self.device.type != "cuda":
            raise ModelError("BACKBONE_PRECISION=float16 needs a CUDA GPU: use bfloat16 or float32 on the CPU")
        self.precision = precision
        self.extractor = FeatureExtractor(backbone, weights, self.layers, seed, precision).to(self.device)
        total = sum(self.extractor.channels)
        self.feature_dim = int(feature_dim) or min(DEFAULT_FEATURE_DIM[backbone], total)
        if not 0 < self.feature_dim <= total:
            raise ModelError(f"FEATURE_DIM={feature_dim} must be between 1 and {total} for {backbone} layers {self.layers}")
        generator = torch.Generator().manual_seed(self.seed)
        self.channel_indices_ = torch.randperm(total, generator=generator)[: self.feature_dim].sort().values
        self.mean_: torch.Tensor | None = None  # (P, d)
        self.cholesky_: torch.Tensor | None = None  # (P, d, d) lower Cholesky factors of the covariances
        self.grid_size_: tuple[int, int] | None = None  # patch grid (h, w)
        self.n_train_images_ = 0
        self._map_operators: dict = {}  # (grid, image size) -> blur-after-upsample matrices

    def embed(self, images: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) images -> position-major (P, B, d) patch embeddings and the patch grid (h, w).

        The backbone runs on slices of BACKBONE_SLICE images and each slice's embedding is written
        straight into its columns of `out` (reused when its shape fits, as the fit does for every
        batch): the layer maps of a whole batch never exist at once, and no embedding is copied."""
        images = images.to(self.device)
        step = BACKBONE_SLICE if self.device.type == "cpu" else len(images)
        grid = None
        with torch.no_grad():
            for start in range(0, len(images), step):
                features = self.extractor(images[start : start + step])
                grid = tuple(features[0].shape[-2:])
                shape = (grid[0] * grid[1], len(images), self.feature_dim)
                if out is None or tuple(out.shape) != shape:
                    out = torch.empty(shape, dtype=torch.float32, device=self.device)
                columns = out[:, start : start + step]
                self._write_embedding(features, columns.view(*grid, *columns.shape[1:]))  # a view: writes land in out
                del features
        return out, grid

    def fit(self, batches: Iterable[torch.Tensor]) -> "Padim":
        """Fit on batches of normalized good images; memory stays flat in the number of images."""
        accumulator = StreamingGaussian()
        embedding, grid = None, None
        for images in batches:
            if embedding is not None and embedding.shape[1] != len(images):
                embedding = None  # a smaller last batch: free the buffer before its own is made
            embedding, grid = self.embed(images, out=embedding)
            accumulator.update(embedding)  # centers the buffer in place; the next batch overwrites it
        if grid is None:
            raise ModelError("no training images could be read: nothing to fit")
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

    def patch_distances(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) Mahalanobis distance of each patch of each image."""
        if self.mean_ is None:
            raise ModelError("the model is not fitted: run train.py first")
        embedding, grid = self.embed(images)
        if grid != self.grid_size_:
            raise ModelError(f"images give a {grid} patch grid, the model was fitted on {self.grid_size_}: use the model's CROP")
        with torch.no_grad():
            distances = mahalanobis(embedding, self.mean_, self.cholesky_)
        return distances.view(-1, *grid)

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly maps at the input resolution: bilinear upsampling, then Gaussian blur."""
        distances = self.patch_distances(images)
        rows, columns = self._operators(tuple(images.shape[-2:]), distances.device)
        return rows @ distances @ columns.T

    def _operators(self, size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear upsampling and the Gaussian blur are both linear and separable, so each axis
        is one (H, h) matrix, blur @ upsample: the whole map is two small products per image,
        with no (H, W) intermediate and no convolution."""
        key = (self.grid_size_, size, self.blur_sigma, str(device))
        if key not in getattr(self, "_map_operators", {}):
            operators = []
            for source, target in zip(self.grid_size_, size):
                upsample = _upsample_matrix(source, target, device)
                if self.blur_sigma > 0:
                    upsample = _blur_matrix(target, self.blur_sigma, device) @ upsample
                operators.append(upsample)
            self._map_operators = {key: tuple(operators)}
        return self._map_operators[key]

    def to(self, device: torch.device) -> "Padim":
        self.device = device
        self.extractor.to(device)
        if self.mean_ is not None:
            self.mean_ = self.mean_.to(device)
            self.cholesky_ = self.cholesky_.to(device)
        return self
