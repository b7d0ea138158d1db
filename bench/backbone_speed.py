"""The backbone's feature stack (layers 1-3, what PaDiM and PatchCore read) per image, as the suite
runs it (`backbone.FeatureExtractor`), optionally against another checkout's (`--vs DIR`, e.g. a git
worktree of an older commit): each measurement in a fresh process, the two alternating, so both see
the same machine (docs/performance.md).

    git worktree add /tmp/before <commit>
    flock /tmp/bench.lock .venv/bin/python bench/backbone_speed.py --vs /tmp/before \\
        [--backbones mobilenet_v2:imagenet-offline,resnet18:none] [--size 224] [--batches 1,16] [--rounds 3]

`--slices 8,4` instead: PaDiM's embedding of a 16-image batch (`Padim.embed`: the backbone in slices
of `base.BACKBONE_SLICE[backbone]` images on the CPU, each slice's chosen channels written into the batch's
embedding) with each slice size in turn, alternating in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(root: Path, backbone: str, size: int, batch: int) -> float:
    """ms per image of `root`'s FeatureExtractor (median of several passes after one warm-up), in this process."""
    sys.path.insert(0, str(root))
    import torch

    from anomaly_model.backbone import FeatureExtractor

    name, _, weights = backbone.partition(":")
    extractor = FeatureExtractor(name, weights or "none", (1, 2, 3))
    images = torch.randn(batch, 3, size, size)
    extractor(images)
    times = []
    for _ in range(max(5, 60 // batch)):
        started = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1000 / batch


def slice_table(backbones: str, slices: list[int], size: int, rounds: int) -> None:
    """ms per image of `Padim.embed` on a 16-image batch for each BACKBONE_SLICE, alternating."""
    sys.path.insert(0, str(ROOT))
    import torch

    import anomaly_model.base as base
    from anomaly_model.store import build_model
    from settings import load

    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; PaDiM embedding of 16 images at {size} px, ms per image, median of {rounds} rounds")
    print("| backbone | " + " | ".join(f"slices of {n}" for n in slices) + " |")
    print("|---|" + "---|" * len(slices))
    images = torch.randn(16, 3, size, size)
    for backbone in backbones.split(","):
        name, _, weights = backbone.partition(":")
        settings, _ = load([f"BACKBONE={name}", f"WEIGHTS={weights or 'none'}", "DEVICE=cpu", "ANOMALY_MODEL=padim"])
        model, out = build_model(settings), None
        times: dict[int, list[float]] = {n: [] for n in slices}
        for round_number in range(rounds + 1):  # the first round warms up
            for n in slices:
                base.BACKBONE_SLICE[name] = n
                started = time.perf_counter()
                out, _ = model.embed(images, out)
                if round_number:
                    times[n].append((time.perf_counter() - started) * 1000 / len(images))
        print(f"| {backbone} | " + " | ".join(f"{sorted(t)[len(t) // 2]:.1f}" for t in times.values()) + " |", flush=True)


def in_subprocess(root: Path, backbone: str, size: int, batch: int) -> float:
    command = [sys.executable, __file__, "--worker", str(root), "--backbones", backbone, "--size", str(size), "--batches", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenet_v2:imagenet-offline,resnet18:none,wide_resnet50_2:none")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per checkout and case, alternating")
    parser.add_argument("--vs", type=Path, help="another checkout to compare with")
    parser.add_argument("--slices", default="", help="e.g. 8,4: compare BACKBONE_SLICE sizes instead (PaDiM's embedding)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slices:
        slice_table(args.backbones, [int(n) for n in args.slices.split(",")], args.size, max(args.rounds, 5))
        return
    if args.worker:
        print(measure(args.worker, args.backbones, args.size, int(args.batches)))
        return
    roots = {"this checkout": ROOT, **({f"--vs {args.vs}": args.vs} if args.vs else {})}
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.size} px, ms per image, median of {args.rounds} processes each")
    print("| backbone | batch | " + " | ".join(roots) + (" | speed-up |" if args.vs else " |"))
    print("|---|---|" + "---|" * (len(roots) + bool(args.vs)))
    for backbone in args.backbones.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[str, list[float]] = {label: [] for label in roots}
            for _ in range(args.rounds):
                for label, root in roots.items():
                    times[label].append(in_subprocess(root, backbone, args.size, batch))
            medians = [sorted(t)[len(t) // 2] for t in times.values()]
            cells = " | ".join(f"{m:.1f}" for m in medians)
            print(f"| {backbone} | {batch} | {cells}" + (f" | {medians[1] / medians[0]:.2f}x |" if args.vs else " |"), flush=True)


if __name__ == "__main__":
    main()
