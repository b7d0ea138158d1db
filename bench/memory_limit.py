"""Run a command under a memory limit, as a container or `systemd-run -p MemoryMax=` would, and
report what it used: how a fit behaves when the cgroup's limit, not the machine's RAM, is the bound.

    .venv/bin/python bench/memory_limit.py --limit 3.0G [--out FILE.json] -- python train.py KEY=VALUE ...

The command runs in a new child of this process's own memory cgroup (cgroup v1's memory controller
or cgroup v2, as /proc/self/cgroup names them; writing there needs the rights a container's root
has), with the limit set on that child; it inherits the limit through `cgroup.procs`, and so does
everything it starts. Printed (and written as JSON with --out): the command's exit status, wall
seconds, the limit, the cgroup's peak usage (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`),
how often an allocation hit the limit (v1 `memory.failcnt`, v2 `memory.events` "max") and whether
the kernel's OOM killer ran (v1 `memory.oom_control`, v2 `memory.events` "oom_kill"). The child
cgroup is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'3.0G', '1800M' or a byte count -> bytes."""
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def own_memory_cgroup() -> tuple[Path, int]:
    """(folder, version) of this process's memory cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/"), 2
    sys.exit("memory_limit.py: no memory cgroup in /proc/self/cgroup: run it where cgroups are mounted")


def read_counters(folder: Path, version: int) -> dict:
    if version == 1:
        oom = dict(line.split() for line in (folder / "memory.oom_control").read_text().splitlines())
        return {
            "peak_bytes": int((folder / "memory.max_usage_in_bytes").read_text()),
            "limit_hits": int((folder / "memory.failcnt").read_text()),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }
    events = dict(line.split() for line in (folder / "memory.events").read_text().splitlines())
    peak = folder / "memory.peak"
    return {
        "peak_bytes": int(peak.read_text()) if peak.exists() else None,
        "limit_hits": int(events.get("max", 0)),
        "oom_kills": int(events.get("oom_kill", 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", required=True, help="the memory limit: bytes, or 1800M, 3.0G")
    parser.add_argument("--out", help="write the figures here as JSON too")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    limit = parse_size(args.limit)
    parent, version = own_memory_cgroup()
    child = parent / f"limit-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as error:
        sys.exit(f"memory_limit.py: cannot make a cgroup in {parent} ({error.strerror}): run it with the rights to, e.g. as a container's root")
    try:
        (child / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(str(limit))
        started = time.perf_counter()
        process = subprocess.Popen(command, preexec_fn=lambda: (child / "cgroup.procs").write_text(str(os.getpid())))
        status = process.wait()
        figures = {
            "command": command, "limit_bytes": limit, "cgroup_version": version, "exit_status": status,
            "wall_s": round(time.perf_counter() - started, 1), **read_counters(child, version),
        }
    finally:
        for _ in range(50):  # the child's last pages may take a moment to leave
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    print(json.dumps(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    sys.exit(status)


if __name__ == "__main__":
    main()
