"""Coreset selection alone, on real memory banks: points per second, rows read per step, and the
covering radius in the full feature space against the exact greedy selection.

    .venv/bin/python bench/coreset_speed.py [--banks tire,tire-gray,ksdd,ksdd-600k]
        [--methods blocked,pruned,dense] [--reference dense] [--threads 1,2] [--steps 0] [--ratio 0.1]

Banks (`BANKS`), built once the way train.py builds them (its validation split, its preprocessing
at the bank's IMAGE_SIZE) and cached in bench/out/coreset-<bank>-projected.npy (what the
selection runs on: the seeded 128-d projection, or the features when they have <= 128, float32) and -full.npy (the features the model keeps,
float16, for the covering radius):

* tire: Wide-ResNet50-2 seeded (WEIGHTS=none) on tire's 210 training images, 164,640 patches;
* tire-gray: the same images converted to gray (ITU-R 601 luma in every channel);
* ksdd: the defaults (MobileNetV2 imagenet-offline, 224 x 224) on ksdd's 250 fitted images;
* ksdd-600k: the same at IMAGE_SIZE 392 x 392 (49 x 49 patches each), 600,250 real gray patches.

Each method runs in a fresh subprocess per thread count; `--reference` (default dense, which is
the exact selection the previous CPU default, pruned, also makes) gives the radius the others are
compared with. `--steps N` selects only the first N points (methods and reference alike) and
extrapolates the time of the whole coreset; the radius is then that of the first N points.
Covering radius: max over the bank of the full-feature distance to the nearest selected point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Bank:
    """How one benchmark bank is built: the train.py settings and whether the images go gray."""

    dataset: str
    backbone: str
    weights: str
    image_size: int
    gray: bool = False


BANKS = {
    "tire": Bank("tire", "wide_resnet50_2", "none", 224),
    "tire-gray": Bank("tire", "wide_resnet50_2", "none", 224, gray=True),
    "ksdd": Bank("ksdd", "mobilenet_v2", "imagenet-offline", 224),
    "ksdd-600k": Bank("ksdd", "mobilenet_v2", "imagenet-offline", 392),
}


def bank_paths(name: str) -> tuple[Path, Path]:
    return OUT / f"coreset-{name}-projected.npy", OUT / f"coreset-{name}-full.npy"


def to_gray(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalized (B, 3, H, W) images -> the same images in gray, normalized again."""
    pixels = images * std + mean
    luma = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]
    return (luma.expand_as(pixels) - mean) / std


def build_bank(name: str) -> tuple[Path, Path]:
    """The bank's projected and full features, as PatchCore.fit would bank them (cached)."""
    projected_path, full_path = bank_paths(name)
    if projected_path.is_file() and full_path.is_file():
        return projected_path, full_path
    from anomaly_model.coreset import projection_matrix
    from anomaly_model.store import build_model
    from dataset_manager import ImageBatches
    from pipeline.cli import load_categories
    from pipeline.training import make_preprocessor, split_validation
    from settings import load

    spec = BANKS[name]
    settings, _ = load([f"DATASET_DIR={DATA / spec.dataset}", "ANOMALY_MODEL=patchcore", f"BACKBONE={spec.backbone}",
                        f"WEIGHTS={spec.weights}", f"IMAGE_SIZE=({spec.image_size},{spec.image_size})", "DEVICE=cpu"])
    category = load_categories(settings)[0]
    train, _ = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    model = build_model(settings)
    preprocessor = make_preprocessor(settings, train, model.stride)
    projection = None  # as PatchCore.fit: only a projection to fewer dimensions
    if 0 < model.projection_dim < model.feature_dim:
        projection = projection_matrix(model.feature_dim, model.projection_dim, model.seed)
    projected, full = [], []
    with torch.no_grad():
        for batch in tqdm(ImageBatches(train, preprocessor, settings.BATCH_SIZE, 0), desc=f"bank {name}", file=sys.stderr):
            images = to_gray(batch.images, preprocessor.mean, preprocessor.std) if spec.gray else batch.images
            embedding, _ = model.embed(images)
            projected.append(embedding if projection is None else embedding @ projection)
            full.append(embedding.half())
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(projected_path, torch.cat(projected).numpy())
    np.save(full_path, torch.cat(full).numpy())
    return projected_path, full_path


def covering_radius(full: torch.Tensor, selected: np.ndarray) -> float:
    """max over the bank of the distance to its nearest selected row (full features, float32)."""
    from anomaly_model.coreset import nearest_neighbors

    centers = full[torch.from_numpy(selected)]
    mean = centers.mean(dim=0)  # centred, so that the distance expansion stays precise
    worst = 0.0
    for start in range(0, len(full), 65536):
        distances, _ = nearest_neighbors(full[start : start + 65536] - mean, centers - mean)
        worst = max(worst, float(distances.max()))
    return worst


def work(args) -> dict:
    """One selection in this (fresh) process: its time, rows read, and the indices it chose."""
    import anomaly_model.coreset as coreset

    points = torch.from_numpy(np.load(args.bank))
    count = coreset.coreset_size(len(points), args.ratio)
    steps = min(count, args.steps or count)
    coreset.PRUNED_THREADS = coreset.BLOCKED_THREADS = args.thread_count
    torch.set_num_threads(args.thread_count)
    stats = coreset.SelectionStats()
    started = time.perf_counter()
    selected = coreset.greedy_coreset(points, steps, 0, args.method, progress=False, stats=stats)
    seconds = time.perf_counter() - started
    np.save(args.selection, selected.numpy())
    return {"method": args.method, "threads": args.thread_count, "points": len(points), "coreset": count, "steps": steps,
            "seconds": seconds, "points_per_s": steps / seconds, "estimated_full_s": seconds / steps * count,
            "touched_share": stats.rows_touched / stats.steps / len(points)}


def run_method(bank: str, projected: Path, method: str, threads: int, args) -> dict:
    selection = OUT / f"coreset-{bank}-selection-{method}-{threads}-{args.steps}.npy"
    command = [sys.executable, __file__, "--worker", "--bank", str(projected), "--method", method, "--thread-count", str(threads),
               "--ratio", str(args.ratio), "--steps", str(args.steps), "--selection", str(selection)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["bank"], result["selection"] = bank, str(selection)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", default=",".join(BANKS))
    parser.add_argument("--methods", default="blocked,pruned")
    parser.add_argument("--reference", default="dense", help="the exact selection the radius is compared with ('' for none)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=0, help="select only the first N points (0: the whole coreset)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--bank", default="")
    parser.add_argument("--method", default="blocked")
    parser.add_argument("--thread-count", type=int, default=1)
    parser.add_argument("--selection", default="")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args)))
        return
    rows = []
    for bank in args.banks.split(","):
        projected, full_path = build_bank(bank)
        reference_threads = 2 if args.reference == "dense" else 1  # the dense pass gains from both cores, the others do not
        reference = run_method(bank, projected, args.reference, reference_threads, args) if args.reference else None
        results = [run_method(bank, projected, method, threads, args)
                   for method in args.methods.split(",") for threads in (int(t) for t in args.threads.split(","))]
        full = torch.from_numpy(np.load(full_path)).float()
        radius = {}
        for result in ([reference] if reference else []) + results:
            chosen = np.load(result["selection"])
            same = next((radius[key] for key in radius if np.array_equal(np.load(key), chosen)), None)
            radius[result["selection"]] = same if same is not None else covering_radius(full, chosen)
            result["radius"] = radius[result["selection"]]
            if reference:
                result["radius_ratio"] = result["radius"] / reference["radius"]
                result["same_prefix"] = int(np.argmax(np.append(np.load(reference["selection"]) != chosen, True)))
            print(json.dumps(result), flush=True)
            rows.append(result)
        del full
    print("\n(the machine was shared with other jobs: not quiet)")
    print("| bank | method | threads | bank points | coreset | steps | s | points/s | whole coreset s (est.) | rows read per step | "
          "covering radius | / reference | same first steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bank']} | {r['method']} | {r['threads']} | {r['points']} | {r['coreset']} | {r['steps']} | {r['seconds']:.1f} | "
              f"{r['points_per_s']:.0f} | {r['estimated_full_s']:.0f} | {r['touched_share'] * 100:.1f} % | {r['radius']:.3f} | "
              f"{r.get('radius_ratio', 1):.4f} | {r.get('same_prefix', r['steps'])} |")


if __name__ == "__main__":
    main()
