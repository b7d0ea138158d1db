"""PatchCore's memory bank while it fits: every training patch's features until the coreset is chosen.

The bank is the largest thing a PatchCore fit holds (patches x features, e.g. 2.45 GB in float32
for Wide-ResNet50-2 on 400 x 304 images), but the coreset selection never reads it: it works on
the projected rows, and only the chosen rows are read back at the end. So where the bank lives is
a choice made by the memory check, one of three:
- "float32": in RAM, as computed;
- "float16": in RAM, halved, each value rounded (about 5e-4 of its size);
- "disk": in an unnamed temporary file in the system's temporary folder (TMPDIR), float32, read
  back through a memory map for the chosen rows only: the same coreset features as in RAM, bit for
  bit, with the bank's bytes in the page cache, which the kernel can drop (a cgroup's limit then
  holds the projection and the selection, not the bank).
"""

from __future__ import annotations

import mmap
import shutil
import tempfile

import numpy as np
import torch

from anomaly_model.errors import ModelError

KINDS = ("float32", "float16", "disk")
BYTES_IN_RAM = {"float32": 4, "float16": 2, "disk": 0}  # per bank value


def size_text(count: float) -> str:
    """Bytes as "2.4 GB" or "613 MB"."""
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


def disk_folder() -> str:
    """Where a bank kept on disk goes: the system's temporary folder (TMPDIR, else /tmp)."""
    return tempfile.gettempdir()


class PatchBank:
    """The bank as blocks of (rows, width) features, one per batch, in the order they came."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.kind = "float32"
        self.rows = 0
        self._blocks: list[torch.Tensor] = []  # in RAM ("float32" / "float16")
        self._file = None  # "disk": an unnamed temporary file of float32 rows

    def ram_bytes(self) -> int:
        """Bytes the bank holds in RAM now."""
        return sum(block.numel() * block.element_size() for block in self._blocks)

    def keep_as(self, kind: str, planned_rows: int = 0) -> None:
        """Keep the bank as `kind` from now on, converting what it holds; `planned_rows`: the rows a
        disk bank must find room for (a ModelError naming TMPDIR when the folder lacks it)."""
        if kind == self.kind:
            return
        if kind == "float16":
            self._blocks = [block.to(torch.float16) for block in self._blocks]
        elif kind == "disk":
            needed = 4 * max(planned_rows, self.rows) * self.width
            free = shutil.disk_usage(disk_folder()).free
            if needed > free:
                raise ModelError(
                    f"PatchCore's memory bank fits in neither RAM nor the temporary folder {disk_folder()} "
                    f"(it needs {size_text(needed)} there, {size_text(free)} is free): set TMPDIR to a folder with room, "
                    "or lower IMAGE_SIZE (or TILE_SIZE) or PATCHCORE_FEATURE_DIM"
                )
            self._file = tempfile.TemporaryFile(dir=disk_folder(), prefix="patchcore-bank-")
            blocks, self._blocks = self._blocks, []
            for block in blocks:
                self._file.write(block.float().numpy().data)
        self.kind = kind

    def append(self, rows: torch.Tensor) -> None:
        """Add one batch's (n, width) rows (any device)."""
        rows = rows.detach().to("cpu", torch.float16 if self.kind == "float16" else torch.float32)
        if self.kind == "disk":
            self._file.write(rows.contiguous().numpy().data)
        else:
            self._blocks.append(rows)
        self.rows += len(rows)

    def gather(self, selected: torch.Tensor) -> torch.Tensor:
        """(K, width) float32 rows `selected` (bank row numbers, in that order), on the CPU."""
        selected = selected.cpu().long()
        if self.kind == "disk":
            self._file.flush()
            if self.rows == 0:
                return torch.empty(0, self.width)
            with mmap.mmap(self._file.fileno(), 4 * self.rows * self.width, access=mmap.ACCESS_READ) as mapped:
                bank = np.frombuffer(mapped, dtype=np.float32).reshape(self.rows, self.width)
                rows = torch.from_numpy(bank[selected.numpy()])  # a copy: fancy indexing
                del bank  # the map closes only without views on it
            return rows
        out = torch.empty(len(selected), self.width)
        offsets = torch.tensor([0] + [len(block) for block in self._blocks]).cumsum(0)
        block_of = torch.searchsorted(offsets, selected, right=True) - 1
        for number, block in enumerate(self._blocks):
            where = (block_of == number).nonzero().squeeze(1)
            if where.numel():
                out[where] = block.index_select(0, selected[where] - offsets[number]).float()
        return out

    def close(self) -> None:
        """Free the bank (the disk file goes with it: it has no name)."""
        self._blocks = []
        if self._file is not None:
            self._file.close()
            self._file = None
