"""A fitted model as an ONNX file, for runtimes without PyTorch: writing it, and scoring with it.

MODEL_DIR/<name>/model.onnx (export.py) holds `AnomalyModel.export_module`: input "images"
(N, 3, H, W) float32 at the working size, preprocessed as model.json's "preprocessing" says; outputs
"anomaly_maps" (N, H, W) and "image_scores" (N,). Its metadata entry "anomaly_detector"
(JSON) holds what a runtime needs besides the graph: preprocessing, thresholds, the classifier's
features, levels and threshold, and the id of the trained model it came from. A model past
protobuf's 2 GB limit (Wide-ResNet PaDiM: 3.8 GB of inverse factors) keeps its tensors in
`model.onnx.data` beside it (ONNX external data).

torch.onnx's exporter needs the PyPI packages onnx and onnxscript; scoring needs onnxruntime
(onnxruntime-gpu for CUDA). They are imported only here, when used, so a missing one is a
one-line error naming the package.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomaly_model.errors import ModelError
from anomaly_model.files import file_checksum, model_file
from anomaly_model.store import EXPORT_SCHEMA, check_description, model_id

ONNX_FILE = "model.onnx"
INPUT = "images"
OUTPUTS = ("anomaly_maps", "image_scores")
METADATA_KEY = "anomaly_detector"
# Tensors above this many bytes go to model.onnx.data (ONNX external data), written one by one.
# A protobuf cannot pass 2 GB, and serializing one holds about three more copies of the tensors
# (measured: a 0.7 GB Wide-ResNet model at 96 px peaked 2.5 GB higher in one file, +0 GB with
# external data). Below this, one file is simpler to copy and costs < 1 GB extra while written:
# ResNet18 at 224 px (140 MB) is one file, MobileNetV2 (300 MB) and Wide-ResNet (3.9 GB) two.
EXTERNAL_DATA_BYTES = 2**28
PACKAGES = {"onnx": "onnx==1.23.*", "onnxscript": "onnxscript==0.7.*", "onnxruntime": "onnxruntime==1.32.*"}


def require(name: str):
    """Import an optional package of the export, or say which pip package to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ModelError(
            f"ONNX export and RUNTIME=onnxruntime need the Python package {name}: "
            f"pip install '{PACKAGES[name]}' (it is in requirements.txt)"
        ) from None


def write_onnx(module: nn.Module, image_size: tuple[int, int], folder: Path, metadata: dict) -> list[str]:
    """Export `module` ((N, 3, H, W) images -> maps, scores; N dynamic) to folder/model.onnx, with
    `metadata` as its "anomaly_detector" entry; returns the names of the files written (model.onnx,
    and model.onnx.data when the tensors are past protobuf's 2 GB limit)."""
    for name in ("onnx", "onnxscript"):
        require(name)
    module.eval()
    example = torch.zeros(2, 3, *image_size)  # a batch of 2: torch.export would fix a batch of 1
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    before = {path.name for path in Path(folder).iterdir()}
    if any(getattr(part, "DATA_DEPENDENT_SHAPES", False) for part in module.modules()):
        _write_traced(module, example, Path(folder) / ONNX_FILE, metadata, tensor_bytes > EXTERNAL_DATA_BYTES)
    else:
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad():
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                dynamic_shapes={"images": {0: batch}}, verbose=False,
            )
        program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
        program.model.doc_string = DOC_STRING
        program.save(Path(folder) / ONNX_FILE, external_data=tensor_bytes > EXTERNAL_DATA_BYTES)
    return sorted({path.name for path in Path(folder).iterdir()} - before)


DOC_STRING = "anomaly maps and image scores; see the metadata entry 'anomaly_detector'"


def _write_traced(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict, external_data: bool) -> None:
    """A module whose graph has data-dependent shapes (PatchCore's grouped search: which queries
    read a group depends on the data) written by torch.onnx's tracing exporter: torch.export
    reasons symbolically about every such shape (hundreds of NonZero for a coreset's groups; it
    did not finish a 128-group search in 30 minutes), the tracer records the operations as they
    run (about 20 s). The batch axis is declared free; the traced graph has no Python branch on
    the data (`GroupedNeighbors.search_traced`)."""
    onnx = require("onnx")
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about every shape it records as a value
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=17, input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_axes={INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}},
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    model.doc_string = DOC_STRING
    onnx.save(model, str(path), save_as_external_data=external_data, location=f"{ONNX_FILE}.data" if external_data else None)


def execution_providers(device: str) -> list:
    """onnxruntime providers for DEVICE: CUDA when asked for ("cuda", "cuda:N") or present ("auto")."""
    ort = require("onnxruntime")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device.startswith("cuda"):
        if not has_cuda:
            raise ModelError(
                f"DEVICE={device} with RUNTIME=onnxruntime needs onnxruntime's CUDA provider: "
                "pip install onnxruntime-gpu instead of onnxruntime, or use DEVICE=auto or cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device != "auto":
        raise ModelError(f"DEVICE={device!r} is not a device: use auto, cpu, cuda or cuda:N")
    return (["CUDAExecutionProvider"] if has_cuda else []) + ["CPUExecutionProvider"]


def open_session(path: Path, device: str = "auto"):
    """An onnxruntime session on an exported model; a file onnxruntime cannot load is a ModelError."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    options.intra_op_num_threads = torch.get_num_threads()  # as many CPU threads as torch uses (OMP_NUM_THREADS)
    try:
        return ort.InferenceSession(str(path), options, providers=execution_providers(device))
    except ModelError:
        raise
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"onnxruntime cannot load {path} ({first_line}): export it again with python export.py") from None


def read_metadata(session) -> dict:
    """The "anomaly_detector" metadata of an exported model ({} when absent or unreadable)."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def run_session(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W), image scores (N,)) of preprocessed (N, 3, H, W) float32 images."""
    maps, scores = session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(images, dtype=np.float32)})
    return maps, scores


def not_exportable(description: dict) -> str:
    """Why export.py would refuse this model, read from its model.json ("" when it would not): so that
    RUNTIME=onnxruntime does not send the user to export.py for nothing."""
    settings = description.get("anomaly_model", {}).get("settings", {})
    if settings.get("tile_size"):
        return "tiled models (TILE_SIZE > 0) are not exported to ONNX yet"
    if settings.get("precision", "float32") != "float32":
        return f"its backbone runs in BACKBONE_PRECISION={settings['precision']}; only float32 models are exported"
    kind, weight = settings.get("score_kind", "mahalanobis"), settings.get("chebyshev_weight", 1)
    if kind != "mahalanobis" and not (kind == "hybrid" and weight == 1):
        return f"PADIM_SCORE={kind!r} models are not exported yet (only the Mahalanobis distance)"
    return ""


class OnnxScorer:
    """A model's exported file in onnxruntime, scoring like `AnomalyModel.score`: what `Detector`
    uses with RUNTIME=onnxruntime. Only the file export.py recorded in this model's model.json is
    used: a missing, replaced or stale file is refused with what to run."""

    def __init__(self, model_dir: Path, description: dict, device: str = "auto") -> None:
        path = Path(model_dir) / ONNX_FILE
        entry = description.get("export")
        if entry is None:
            blocked = not_exportable(description)
            if blocked:
                raise ModelError(f"model {model_dir} cannot run with RUNTIME=onnxruntime: {blocked}; use RUNTIME=torch")
            if path.exists():
                raise ModelError(
                    f"{path} is not recorded in model {model_dir}'s model.json: it was exported from another model, "
                    "an earlier training or the model before an update (ADD_GOOD / ADD_DEFECT); run python export.py"
                )
            raise ModelError(f"model {model_dir} has not been exported for RUNTIME=onnxruntime: run python export.py first")
        check_description(model_dir, description, EXPORT_SCHEMA)
        for name, expected in entry["files"].items():
            file = model_file(model_dir, name, f"export.files.{name}")
            if not file.is_file():
                raise ModelError(f"{file} is missing: run python export.py")
            if file_checksum(file) != expected:
                raise ModelError(
                    f"{file} is not the file export.py wrote for this model (checksum differs: replaced by another "
                    "export?): run python export.py"
                )
        self.session = open_session(path, device)
        self.metadata = read_metadata(self.session)
        if self.metadata.get("model_id") != model_id(description):
            raise ModelError(f"{path} was exported from another version of model {model_dir}: run python export.py")

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), image scores (B,)) on the CPU, like `AnomalyModel.score`."""
        maps, scores = run_session(self.session, images.cpu().numpy())
        return torch.from_numpy(maps), torch.from_numpy(scores)
