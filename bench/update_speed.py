"""Updating a model with 30 new goods against fitting it again on all (docs/updating.md).

For each training-set size N: holds out HOLD training goods, fits on N others, updates that model
with the HOLD held out (`pipeline.updating.update_model`, what train.py ADD_GOOD= runs), and fits a
second model on the same N + HOLD images; both use the dataset's validation goods and the same
geometry. Reports the times (in process: interpreter start-up and imports left out), how far the
updated model's maps lie from the full fit's (max relative difference over the test images), the
image and pixel ROCAUCs of both and their thresholds. Two sizes show that the update's time follows
the new images, not the training set.

    flock /tmp/bench.lock .venv/bin/python bench/update_speed.py --dataset tire \\
        --sizes 90,180 -- ANOMALY_MODEL=padim BACKBONE=mobilenet_v2 WEIGHTS=imagenet-offline CLASSIFIER=False OUT_OF_FOLD_FOLDS=0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anomaly_model.store import load_model  # noqa: E402
from dataset_manager import Preprocessor, find_categories, read_mask  # noqa: E402
from evaluation.metrics import image_rocauc  # noqa: E402
from pipeline.training import content_digest, train_category  # noqa: E402
from pipeline.updating import score_files, update_model  # noqa: E402
from settings import load  # noqa: E402
from ablation_sets import flipped_set  # noqa: E402
from classifier_ablation import set_folder  # noqa: E402
from config import VALIDATION_FRACTION  # noqa: E402  (tire, ksdd, demo: the demo is generated on first use)


def category_with(root: Path, source: Path, train: list[Path], validation: list[Path]) -> Path:
    """A category folder of links: `train` as train/good, the source's test and masks, and its
    validation folder, or `validation` as validation/good where it has none (so that the model
    updated and the one fitted on all have the same validation goods, not a share of each's training set)."""
    folders = {"train": train, "validation": validation} if validation else {"train": train}
    for name, paths in folders.items():
        (root / name / "good").mkdir(parents=True)
        for path in paths:
            os.symlink(path.resolve(), root / name / "good" / path.name)
    for name in ("validation", "test", "ground_truth"):
        if (source / name).exists() and not (root / name).exists():
            os.symlink((source / name).resolve(), root / name)
    return root


def evaluate(model_dir: Path, category) -> dict:
    """Test maps, image and pixel ROCAUC (every 4th pixel each way) and thresholds of a saved model."""
    model, description = load_model(model_dir, "auto")
    preprocessor = Preprocessor.from_description(description["preprocessing"])
    images = list(category.test_images)
    scored = score_files(model, preprocessor, [image.path for image in images], 16, "test")
    labels = np.array([image.is_defect for image in images], dtype=int)
    masks = torch.stack([preprocessor.mask_tensor(read_mask(image.mask_path)) if image.mask_path else torch.zeros(preprocessor.size, dtype=torch.bool)
                         for image in images])
    from sklearn.metrics import roc_auc_score

    pixel = roc_auc_score(masks[:, ::4, ::4].reshape(-1).numpy(), scored.maps[:, ::4, ::4].reshape(-1).numpy())
    return {"maps": scored.maps, "image_rocauc": image_rocauc(labels, scored.scores.numpy()), "pixel_rocauc": float(pixel),
            "thresholds": (description["thresholds"]["image"], description["thresholds"]["pixel"]), "model": model}


def statistics_difference(updated, full) -> str:
    """How far the updated model's learned statistics lie from the full fit's."""
    if updated.kind == "padim":
        mean = float((updated.mean_ - full.mean_).abs().max() / full.mean_.abs().max())
        factor = float((updated.cholesky_ - full.cholesky_).abs().max() / full.cholesky_.abs().max())
        return f"mean {mean:.1e}, Cholesky {factor:.1e} (max abs diff / max abs)"
    return f"coreset {len(updated.memory_)} points (full fit {len(full.memory_)})"


def run_size(dataset: Path, extra: list[str], size: int, hold: int, seed: int, work: Path) -> dict:
    source = find_categories(dataset)[0]
    # each picture once (ksdd holds 15 twice): an update skips a picture the model already holds, which
    # a fit on all would learn twice, so a duplicate split across both sides would not compare the same sets
    digests, train = set(), []
    for path in source.train_images:
        if (digest := content_digest(path)) not in digests:
            digests.add(digest)
            train.append(path)
    order = np.random.default_rng(seed).permutation(len(train))
    held = [train[i] for i in order[:hold]]
    # no validation folder: the same VALIDATION_FRACTION of the training goods validates both models
    validating = 0 if (dataset / "validation").exists() else round(VALIDATION_FRACTION * len(train))
    validation = [train[i] for i in order[hold : hold + validating]]
    kept = [train[i] for i in order[hold + validating : hold + validating + size]]
    if len(kept) < size:
        raise SystemExit(f"{dataset} has {len(train)} distinct training goods: at most {len(kept)} are left for --sizes after {hold} held out and {validating} validating")
    base_dir = category_with(work / f"base{size}" / source.name, dataset, kept, validation)
    full_dir = category_with(work / f"full{size}" / source.name, dataset, kept + held, validation)
    held_dir = work / f"held{size}"
    held_dir.mkdir()
    for path in held:
        os.symlink(path.resolve(), held_dir / path.name)
    settings, _ = load([*extra, "MODEL_BACKUPS=0"])
    models = work / f"models{size}"
    started = time.perf_counter()
    train_category(find_categories(base_dir)[0], settings, models / "base")
    base_seconds = time.perf_counter() - started
    started = time.perf_counter()
    summary = update_model(models / "base", settings, str(held_dir), "")
    update_seconds = time.perf_counter() - started
    started = time.perf_counter()
    train_category(find_categories(full_dir)[0], settings, models / "full")
    full_seconds = time.perf_counter() - started
    category = find_categories(full_dir)[0]
    updated, full = evaluate(models / "base", category), evaluate(models / "full", category)
    relative = float(((updated["maps"] - full["maps"]).abs() / full["maps"].abs().clamp_min(1e-6)).max())
    return {
        "size": size, "fit_seconds": base_seconds, "update_seconds": update_seconds, "full_seconds": full_seconds,
        "map_relative_difference": relative, "statistics": statistics_difference(updated["model"], full["model"]),
        "rocauc_updated": (updated["image_rocauc"], updated["pixel_rocauc"]), "rocauc_full": (full["image_rocauc"], full["pixel_rocauc"]),
        "thresholds_updated": updated["thresholds"], "thresholds_full": full["thresholds"], "model_report": summary.model_report,
        "update_stages": summary.stage_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a category folder, or tire, ksdd, demo, tire-flipped (the last two are made under --work)")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "update_speed", help="where the demo is generated")
    parser.add_argument("--sizes", default="90,180", help="training-set sizes (before the update)")
    parser.add_argument("--hold", type=int, default=30, help="training goods held out and added by the update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("settings", nargs="*", help="KEY=VALUE settings (after --)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dataset == "tire-flipped":  # tire's 210 training goods and their flips: 840
        args.dataset = flipped_set(set_folder("tire", args.work), args.work / "tire-flipped")
    else:
        args.dataset = set_folder(args.dataset, args.work)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in (int(s) for s in args.sizes.split(",")):
            row = run_size(args.dataset, [*args.settings, f"DATASET_DIR={args.dataset}"], size, args.hold, args.seed, Path(work))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str), file=sys.stderr)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.dataset} {' '.join(args.settings)}; {platform.node()} {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, shared with other jobs; {when}")
    print("| training goods | fit N s | update +%d s | full fit N+%d s | update / full | max map rel. diff | statistics diff | image ROCAUC upd / full | pixel ROCAUC upd / full | image thr. upd / full | pixel thr. upd / full |" % (args.hold, args.hold))
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['fit_seconds']:.1f} | {r['update_seconds']:.1f} | {r['full_seconds']:.1f} | {r['update_seconds'] / r['full_seconds']:.0%} "
              f"| {r['map_relative_difference']:.1e} | {r['statistics']} | {r['rocauc_updated'][0]:.4f} / {r['rocauc_full'][0]:.4f} "
              f"| {r['rocauc_updated'][1]:.4f} / {r['rocauc_full'][1]:.4f} | {r['thresholds_updated'][0]:.3f} / {r['thresholds_full'][0]:.3f} "
              f"| {r['thresholds_updated'][1]:.3f} / {r['thresholds_full'][1]:.3f} |")
        learning = r["model_report"].get("seconds")  # the model's own learning (PaDiM: the factorization), within "score and learn"
        print(f"  update stages N={r['size']}: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in r["update_stages"].items())
              + (f" (of which the anomaly model's learning after the pass {learning:.2f} s)" if learning is not None else ""))
        if "coreset_added" in r["model_report"]:
            m = r["model_report"]
            print(f"  PatchCore N={r['size']}: +{m['coreset_added']} coreset points for {m['new_patches']} new patches; covering radius of the new patches {m['covering_radius_before']:.3f} -> {m['covering_radius_after']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, default=str, indent=2))


if __name__ == "__main__":
    main()
