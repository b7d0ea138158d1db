"""Model and result folders on disk: written atomically, every file checksummed, nothing pickled.

An `AtomicFolder` is filled under a temporary name beside its target and renamed into place
when complete, so a crash never leaves a half-written model or result. Large arrays are float32
`.npy` files written and read in row blocks (a header and raw rows: like JSON, reading one cannot
run code), so a model's statistics never need a second full copy in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from anomaly_model.backbone import ModelError

CHUNK_ROWS = 128  # rows per block read: ~78 MB of Wide-ResNet PaDiM factors


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
    `checksums` records the sha256 and size of every file written through this object.
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

    def write_npy_chunks(self, name: str, shape: tuple, chunks: Iterable[np.ndarray], dtype: str = "<f4") -> None:
        """A .npy of `shape` written from an iterator of row blocks. Each block is hashed and
        written on a second thread while the next one is packed: for Wide-ResNet's 1.9 GB that
        takes ~6 s instead of ~10 s one after the other (hashlib and file writes release the GIL)."""
        digest, size = hashlib.sha256(), 0

        def hash_and_write(block: np.ndarray) -> None:
            digest.update(block)
            file.write(block)

        with open(self.temporary / name, "wb") as file, ThreadPoolExecutor(max_workers=1) as writer:
            np.lib.format.write_array_header_1_0(file, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
            header = file.tell()
            pending = None
            for chunk in chunks:
                block = np.ascontiguousarray(chunk, dtype=dtype)
                if pending is not None:
                    pending.result()  # at most two blocks in memory; re-raises a failed write
                pending = writer.submit(hash_and_write, block)
                size += block.nbytes
            if pending is not None:
                pending.result()
            file.flush()
            os.fsync(file.fileno())
        self.checksums[name] = {"sha256": digest.hexdigest(), "bytes": size, "header_bytes": header}

    def write_npy(self, name: str, array: np.ndarray, dtype: str = "<f4") -> None:
        """A whole (small) array as one .npy."""
        self.write_npy_chunks(name, tuple(array.shape), [array], dtype)

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            return
        previous = self.target.parent / f".{self.target.name}.previous-{uuid.uuid4().hex[:8]}"
        if self.target.exists():
            os.replace(self.target, previous)
        os.replace(self.temporary, self.target)
        shutil.rmtree(previous, ignore_errors=True)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace one file (model.json when export.py adds its section): written beside it under a
    temporary name, flushed to disk, then renamed over it, so a crash leaves the old or the new."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_checksum(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, read in blocks (an exported Wide-ResNet model is 3.8 GB)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
            size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def read_checked_bytes(folder: Path, name: str, files: dict) -> bytes:
    """A file of a model folder, verified against its checksum in `files` (model.json's "files")."""
    path = Path(folder) / name
    expected = files.get(name)
    if expected is None or not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")
    return data


def read_npy_chunks(folder: Path, name: str, files: dict, shape: tuple, dtype: str = "<f4") -> Iterator[np.ndarray]:
    """Row blocks of a .npy of a model folder, read with plain file reads and checked against the
    sha256 in `files` once all are read. Plain reads rather than a memory map: mapped pages would
    count toward the process's memory next to the unpacked state (+1.9 GB for Wide-ResNet)."""
    path = Path(folder) / name
    if not path.is_file():
        raise ModelError(f"model file {path} is missing: retrain with python train.py")
    expected = files.get(name, {})
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            if np.lib.format.read_magic(file) != (1, 0):
                raise ValueError("unexpected .npy version")
            stored, fortran, stored_dtype = np.lib.format.read_array_header_1_0(file)
            if tuple(stored) != tuple(shape) or fortran or stored_dtype != np.dtype(dtype):
                raise ModelError(f"model file {path} holds {stored} {stored_dtype}, expected {shape} {np.dtype(dtype)}: retrain")
            row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            for start in range(0, shape[0], CHUNK_ROWS):
                rows = min(CHUNK_ROWS, shape[0] - start)
                data = bytearray(rows * row_bytes)
                if file.readinto(data) != len(data):
                    raise ValueError("file ends early")
                digest.update(data)
                yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])
    except (OSError, ValueError) as error:
        raise ModelError(f"model file {path} is damaged or truncated ({error}): retrain with python train.py") from None
    if digest.hexdigest() != expected.get("sha256"):
        raise ModelError(f"model file {path} is damaged (checksum mismatch): retrain with python train.py")


def read_npy(folder: Path, name: str, files: dict, shape: tuple, dtype: str = "<f4") -> np.ndarray:
    """A whole (small) checked .npy of a model folder."""
    blocks = list(read_npy_chunks(folder, name, files, shape, dtype))
    return np.concatenate(blocks) if blocks else np.zeros(shape, dtype=dtype)
