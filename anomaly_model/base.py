"""What every anomaly model of the suite shares: a pretrained backbone, one interface for fitting
and scoring, and one map post-processing.

A model (PaDiM, PatchCore) only says how it fits good images and how far each patch of a new
image is from what it learned (`patch_scores`, on the backbone's feature grid). Everything else
is here, once: building the backbone, running it in slices, turning patch scores into anomaly
maps (`maps.MapMaker`), image scores, moving to a device, and the description `store.py` saves.
Shaped like a scikit-learn estimator: settings in __init__, learned state in attributes ending
in "_".
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from anomaly_model import distributed
from anomaly_model.backbone import FeatureExtractor, ModelError
from anomaly_model.maps import MapMaker
from anomaly_model.schema import check
from settings import integer, sequence

# Images per backbone pass on the CPU. The layer maps of 8 images take a quarter of a 32-image
# batch's memory (~0.5 GB less for Wide-ResNet at 224 px), and oneDNN is no slower per image
# at 8 (Wide-ResNet 0.159-0.163 s/image against 0.165-0.185 at 32 in two bench/benchmark.py runs,
# 2-core CPU). GPUs take the whole batch.
BACKBONE_SLICE = 8

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"DEVICE={name} but no CUDA GPU is available: use DEVICE=auto or cpu")
    return device


class AnomalyModel:
    """Base of the anomaly models: fit on good images, then maps and scores for any image.

    Subclasses set `kind` (saved as the model's type), `OWN_SETTINGS`, and implement `fit`,
    `patch_scores`, `settings`, `fitted_state`, `save_arrays` and `load_arrays`.
    """

    kind = ""
    OWN_SETTINGS: dict[str, str] = {}

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "imagenet",
        layers: tuple[int, ...] = (1, 2, 3),
        blur_sigma: float = 4.0,
        seed: int = 0,
        device: str = "auto",
        precision: str = "float32",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.blur_sigma = float(blur_sigma)
        self.seed = int(seed)
        self.device = resolve_device(device)
        if precision == "float16" and self.device.type != "cuda":
            raise ModelError("BACKBONE_PRECISION=float16 needs a CUDA GPU: use bfloat16 or float32 on the CPU")
        self.precision = precision
        self.extractor = FeatureExtractor(backbone, weights, self.layers, seed, precision).to(self.device)
        self.map_maker = MapMaker(self.blur_sigma)
        self.grid_size_: tuple[int, int] | None = None  # patch grid (h, w) of the fitted images
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

    def settings(self) -> dict:
        """Constructor arguments, as saved in model.json (with the values the model resolved)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "layers": list(self.layers),
            "blur_sigma": self.blur_sigma,
            "seed": self.seed,
            "precision": self.precision,
        }

    def fitted_state(self) -> dict:
        """Learned values small enough for model.json (the arrays go to `save_arrays`)."""
        return {"grid_size": list(self.grid_size_), "n_train_images": self.n_train_images_}

    def load_fitted_state(self, state: dict) -> None:
        """The inverse of `fitted_state`; a missing or wrong entry raises SchemaError naming it."""
        check(state, {"grid_size": sequence(integer(minimum=1), length=2), "n_train_images": integer(minimum=1)}, "state")
        self.grid_size_ = tuple(state["grid_size"])
        self.n_train_images_ = int(state["n_train_images"])

    def save_arrays(self, out) -> None:
        """Write the learned arrays into the `files.AtomicFolder` `out`."""
        raise NotImplementedError

    def load_arrays(self, folder, files: dict) -> None:
        """Read back what `save_arrays` wrote (checksums in `files`), after `load_fitted_state`."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def backbone_slices(self, images: torch.Tensor) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(start index, layer features) per slice of BACKBONE_SLICE images on the CPU (the whole
        batch on a GPU): the layer maps of a whole batch never exist at once."""
        images = images.to(self.device)
        step = BACKBONE_SLICE if self.device.type == "cpu" else len(images)
        with torch.no_grad():
            for start in range(0, len(images), step):
                yield start, self.extractor(images[start : start + step])

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Images must give the patch grid the model was fitted on."""
        if self.grid_size_ is None:
            raise ModelError("the model is not fitted: run train.py first")
        if tuple(grid) != tuple(self.grid_size_):
            raise ModelError(f"images give a {tuple(grid)} patch grid, the model was fitted on {self.grid_size_}: use the model's CROP")

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly maps at the input resolution: patch scores upsampled and blurred."""
        return self.map_maker(self.patch_scores(images), tuple(images.shape[-2:]))

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,) image scores of (B, H, W) maps: their maximum, as PaDiM scores an image."""
        return maps.flatten(1).max(dim=1).values

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), image scores (B,)) on the CPU: what test.py, eval.py and training use."""
        maps = self.anomaly_maps(images)
        return maps.cpu(), self.image_scores(maps).cpu()

    def to(self, device: torch.device) -> "AnomalyModel":
        self.device = torch.device(device)
        self.extractor.to(self.device)
        for name, value in vars(self).items():
            if name.endswith("_") and isinstance(value, torch.Tensor):
                setattr(self, name, value.to(self.device))
        return self
