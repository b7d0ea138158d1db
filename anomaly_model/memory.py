"""How much memory a fit may still take, asked once by every model before it allocates.

One function for PaDiM's statistics, PatchCore's bank and the coreset selection, so that all of
them see the same number: on a GPU its free memory; on the CPU the OS's MemAvailable, lowered to
what the process's cgroup still allows (a container or `systemd-run -p MemoryMax=` limit is the
one that kills a process, whatever MemAvailable says).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# (limit, usage) files of cgroup v2 and of cgroup v1's memory controller.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _mem_available() -> int:
    """The OS's MemAvailable in bytes (free pages where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return sys.maxsize


def cgroup_room() -> int | None:
    """Bytes the process's cgroup still allows (its limit less its usage), None without a limit."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # v1 writes a huge number for "no limit"
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for new tensors on `device`: a GPU's free memory, else RAM as MemAvailable
    or the cgroup's room, whichever is lower."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    room = cgroup_room()
    available = _mem_available()
    return available if room is None else min(available, room)
