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


def own_cgroup_files() -> list[tuple[str, str]]:
    """(limit, usage) files of the process's own memory cgroup and of its ancestors below the
    mount's root, as /proc/self/cgroup names them (v2 "0::/path", v1 "N:memory:/path"): a limit
    set on a child cgroup (`systemd-run -p MemoryMax=`, a container's own cgroup, a job's) is not
    in the root's files. Paths that do not exist here (another namespace's names) are skipped."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            root, names = "/sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, names = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [part for part in path.split("/") if part and part not in (".", "..")]
        for depth in range(len(parts), 0, -1):
            folder = Path(root, *parts[:depth])
            files.append((str(folder / names[0]), str(folder / names[1])))
    return files


def reclaimable_cache(usage_file: str) -> int:
    """Bytes of the cgroup's usage that are inactive file cache (`memory.stat` beside `usage_file`:
    v1's hierarchical total_inactive_file, else inactive_file): pages the kernel drops before it
    refuses an allocation. Usage counts the page cache, so reading a few hundred training images
    (~0.9 GB of tire's at full size) would otherwise look like memory the fit cannot have; the
    "working set" that container runtimes compare with the limit leaves them out in the same way."""
    try:
        fields = dict(line.split() for line in Path(usage_file).with_name("memory.stat").read_text().splitlines() if line.count(" ") == 1)
        return int(fields.get("total_inactive_file", fields.get("inactive_file", 0)))
    except (OSError, ValueError):
        return 0


def cgroup_room() -> int | None:
    """Bytes the process's cgroups still allow (the least of limit less usage over its own cgroup,
    its ancestors and the mount's root; usage without its inactive file cache), None without a limit."""
    rooms = []
    for limit_file, usage_file in [*own_cgroup_files(), *CGROUP_FILES]:
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # v1 writes a huge number for "no limit"
                continue
            usage = max(0, int(Path(usage_file).read_text()) - reclaimable_cache(usage_file))
            rooms.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            continue
    return min(rooms) if rooms else None


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for new tensors on `device`: a GPU's free memory, else RAM as MemAvailable
    or the cgroup's room, whichever is lower."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    room = cgroup_room()
    available = _mem_available()
    return available if room is None else min(available, room)
