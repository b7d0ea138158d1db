"""Saving and loading a trained model folder: atomic, checksummed, and free of pickles.

MODEL_DIR/<name>/
  model.json         settings, thresholds, validation statistics, versions, file checksums
  mean.npy           (P, d) float32 Gaussian means
  cholesky.npy       (P, d(d+1)/2) float32 packed lower Cholesky factors L (Sigma = L L^T)
  ...                files other components add (the classifier's booster JSON)

The statistics are .npy rather than torch.save files because they are written and read in
chunks of positions: the packed copy never has to exist in memory next to the full factors.
Reading one is a header parse and raw float32 reads; like JSON, it cannot run code. Everything is written into a temporary
folder beside the target and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from anomaly_model.backbone import ModelError
from anomaly_model.padim import Padim

FORMAT_VERSION = 2  # 2: Cholesky factors L (1 held their inverses)
_CHUNK_POSITIONS = 128  # positions per block written or read: ~78 MB for Wide-ResNet


def library_versions() -> dict:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}


def backbone_fingerprint(padim: Padim) -> str:
    """sha256 of the backbone tensors in use, to notice weights that changed since training."""
    digest = hashlib.sha256()
    for key, value in padim.extractor.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _lower_triangle_index(dim: int, device: torch.device) -> torch.Tensor:
    """Flat indices of a d x d matrix's lower triangle, row by row: the packed layout on disk."""
    rows, cols = torch.tril_indices(dim, dim, device=device)
    return rows * dim + cols


def check_writable(folder: Path) -> None:
    """Fail before any long work when results could not be written to `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ModelError(f"cannot write to {folder} ({error.strerror}): choose a writable folder") from None


class AtomicFolder:
    """A folder written under a temporary name and renamed into place on success.

    The previous folder of the same name is kept until the new one is complete, then removed.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.temporary = self.target.parent / f".{self.target.name}.partial-{uuid.uuid4().hex[:8]}"
        self.checksums: dict[str, dict] = {}

    def __enter__(self) -> "AtomicFolder":
        check_writable(self.target.parent)
        self.temporary.mkdir()
        return self

    def write_bytes(self, name: str, data: bytes) -> None:
        with open(self.temporary / name, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        self.checksums[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_json(self, name: str, content: dict) -> None:
        self.write_bytes(name, json.dumps(content, indent=2).encode())

    def write_npy_chunks(self, name: str, shape: tuple, chunks: Iterable[np.ndarray]) -> None:
        """A float32 .npy of `shape` written from an iterator of row blocks. Each block is hashed
        and written on a second thread while the next one is packed: for Wide-ResNet's 1.9 GB
        that takes ~6 s instead of ~10 s one after the other (hashlib and file writes release the GIL)."""
        digest, size = hashlib.sha256(), 0

        def hash_and_write(block: np.ndarray) -> None:
            digest.update(block)
            file.write(block)

        with open(self.temporary / name, "wb") as file, ThreadPoolExecutor(max_workers=1) as writer:
            np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
            header = file.tell()
            pending = None
            for chunk in chunks:
                block = np.ascontiguousarray(chunk, dtype="<f4")
                if pending is not None:
                    pending.result()  # at most two blocks in memory; re-raises a failed write
                pending = writer.submit(hash_and_write, block)
                size += block.nbytes
            if pending is not None:
                pending.result()
            file.flush()
            os.fsync(file.fileno())
        self.checksums[name] = {"sha256": digest.hexdigest(), "bytes": size, "header_bytes": header}

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            return
        previous = self.target.parent / f".{self.target.name}.previous-{uuid.uuid4().hex[:8]}"
        if self.target.exists():
            os.replace(self.target, previous)
        os.replace(self.temporary, self.target)
        shutil.rmtree(previous, ignore_errors=True)


def save_model(folder: Path, padim: Padim, info: dict, extra_files: dict[str, bytes] | None = None) -> int:
    """Write the fitted model and `info` (thresholds, preprocessing, ...) atomically; returns bytes written."""
    mean = padim.mean_.cpu()
    positions, dim = mean.shape
    factors = padim.cholesky_.view(positions, dim * dim)
    lower = _lower_triangle_index(dim, factors.device)
    with AtomicFolder(folder) as out:
        out.write_npy_chunks("mean.npy", tuple(mean.shape), [mean.numpy()])
        packed = (
            factors[start : start + _CHUNK_POSITIONS].index_select(1, lower).cpu().numpy()
            for start in range(0, positions, _CHUNK_POSITIONS)
        )
        out.write_npy_chunks("cholesky.npy", (positions, lower.numel()), packed)
        for name, data in (extra_files or {}).items():
            out.write_bytes(name, data)
        description = {
            "format_version": FORMAT_VERSION,
            "padim": {
                "backbone": padim.backbone,
                "weights": padim.weights,
                "layers": list(padim.layers),
                "feature_dim": padim.feature_dim,
                "epsilon": padim.epsilon,
                "blur_sigma": padim.blur_sigma,
                "seed": padim.seed,
                "precision": padim.precision,
                "channel_indices": padim.channel_indices_.tolist(),
                "grid_size": list(padim.grid_size_),
                "n_train_images": padim.n_train_images_,
                "backbone_sha256": backbone_fingerprint(padim),
            },
            **info,
            "versions": library_versions(),
            "files": out.checksums,
        }
        out.write_json("model.json", description)
    return sum(entry["bytes"] for entry in out.checksums.values()) + len(json.dumps(description, indent=2))


def read_description(folder: Path) -> dict:
    """model.json of a model folder, with clear errors for a missing, old or damaged model."""
    folder = Path(folder)
    path = folder / "model.json"
    if not path.is_file():
        raise ModelError(f"no trained model at {folder} (model.json missing): run python train.py first")
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is damaged ({error}): retrain with python train.py") from None
    version = description.get("format_version") if isinstance(description, dict) else None
    if version != FORMAT_VERSION:
        raise ModelError(
            f"model {folder} has format {version}, this code reads format {FORMAT_VERSION}: retrain with python train.py"
        )
    return description


def read_checked_bytes(folder: Path, name: str, description: dict) -> bytes:
    """An extra file of the model folder, verified against its recorded checksum."""
    path = Path(folder) / name
    expected = description["files"].get(name)
    if expected is None or not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")
    return data


def _npy_row_chunks(path: Path, expected: dict, shape: tuple) -> Iterator[np.ndarray]:
    """Row blocks of a float32 .npy, read with plain file reads and checked against the recorded
    sha256 once all are read. Plain reads rather than a memory map: mapped pages would count
    toward the process's memory next to the unpacked factors (+1.9 GB for Wide-ResNet)."""
    if not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    damaged = f"model file {path} is damaged or truncated"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            if np.lib.format.read_magic(file) != (1, 0):
                raise ValueError("unexpected .npy version")
            stored, fortran, dtype = np.lib.format.read_array_header_1_0(file)
            if tuple(stored) != tuple(shape) or fortran or dtype != np.dtype("<f4"):
                raise ModelError(f"model file {path} holds {stored} {dtype}, expected {shape} float32: retrain")
            row_bytes = int(np.prod(shape[1:])) * 4
            for start in range(0, shape[0], _CHUNK_POSITIONS):
                rows = min(_CHUNK_POSITIONS, shape[0] - start)
                data = bytearray(rows * row_bytes)
                if file.readinto(data) != len(data):
                    raise ValueError("file ends early")
                digest.update(data)
                yield np.frombuffer(data, dtype="<f4").reshape(rows, *shape[1:])
    except (OSError, ValueError) as error:
        raise ModelError(f"{damaged} ({error}): retrain with python train.py") from None
    if digest.hexdigest() != expected.get("sha256"):
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")


def load_model(folder: Path, device: str = "auto") -> tuple[Padim, dict]:
    """The fitted Padim and the model's description (settings, thresholds, ...)."""
    folder = Path(folder)
    description = read_description(folder)
    settings = description["padim"]
    padim = Padim(
        backbone=settings["backbone"],
        weights=settings["weights"],
        layers=tuple(settings["layers"]),
        feature_dim=settings["feature_dim"],
        epsilon=settings["epsilon"],
        blur_sigma=settings["blur_sigma"],
        seed=settings["seed"],
        device=device,
        precision=settings["precision"],
    )
    if backbone_fingerprint(padim) != settings["backbone_sha256"]:
        raise ModelError(
            f"the backbone weights {settings['weights']!r} differ from those model {folder} was trained with: "
            "restore them or retrain"
        )
    padim.channel_indices_ = torch.tensor(settings["channel_indices"], dtype=torch.long)
    padim.grid_size_ = tuple(settings["grid_size"])
    padim.n_train_images_ = settings["n_train_images"]
    positions, dim = padim.grid_size_[0] * padim.grid_size_[1], padim.feature_dim
    files = description["files"]
    mean = np.concatenate(list(_npy_row_chunks(folder / "mean.npy", files.get("mean.npy", {}), (positions, dim))))
    packed = _npy_row_chunks(folder / "cholesky.npy", files.get("cholesky.npy", {}), (positions, dim * (dim + 1) // 2))
    lower = _lower_triangle_index(dim, padim.device)
    factors = torch.zeros(positions, dim * dim, dtype=torch.float32, device=padim.device)
    start = 0
    for block in packed:
        factors[start : start + block.shape[0]].index_copy_(1, lower, torch.from_numpy(block).to(padim.device))
        start += block.shape[0]
    padim.mean_ = torch.from_numpy(mean).to(padim.device)
    padim.cholesky_ = factors.view(positions, dim, dim)
    return padim, description
