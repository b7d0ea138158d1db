"""Diagnostic: can a labeled defect image's own normal patches stand in for goods taken like it?

Why: the labeled-defect similarity stage (classification_model/similarity.py) compares each image's
peak direction with the labeled defects'. When those defects were photographed unlike the training
goods (tire's test split), the direction they share is partly the acquisition's, the held-out
evidence (validation goods only) sees a gain, and on goods taken like the defects it is gone
(docs/classifier.md). Goods taken like the labeled defects are at hand in every labeled defect:
its patches away from the defect. This measures, per set, how the similarity ranks the labeled
defects against them, next to what the evidence sees today and what holds on the test split.

    .venv/bin/python bench/own_patches_diagnostic.py [SET ...] [--work DIR] [--seeds 5] [--labeled 10]

SET as bench/classifier_ablation.py takes them (tire, tire-gray, ksdd, ksdd-crop, ksdd-shifted,
ksdd-large, tire-large, demo, a category folder); default tire, ksdd. PaDiM, config.py's defaults
with the offline MobileNetV2 weights, fitted on each set's training goods. Per image: the unit
whitened deviation at its peak patch (`Padim.patch_scores_and_peaks`'s direction) and, for test
defects, at its **own-patch peak**: the highest patch outside the defect's region, found from the
map alone (the connected patches above the validation goods' 99.5 % patch-score quantile that hold
the peak, grown by `--grow` patches). Per seed, `--labeled` test defects are the labeled ones; the
similarity is the cosine with their mean direction (leave-one-out for their own rows). Printed:
ROCAUC of the similarity for labeled defects vs validation goods (what the evidence weighs today),
vs their own-patch peaks (goods taken like them), and for the other test defects vs the test goods
(the truth on the test split, read here only to judge the stand-in; nothing is chosen from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from classifier_ablation import MapSource, set_folder  # noqa: E402
from dataset_manager import ImageBatches  # noqa: E402
from settings import load  # noqa: E402

LEVEL_QUANTILE = 0.995  # a patch above this quantile of the validation goods' patch scores is "high"


def rocauc(positives: np.ndarray, negatives: np.ndarray) -> float:
    difference = np.asarray(positives)[:, None] - np.asarray(negatives)[None, :]
    return float(((difference > 0) + 0.5 * (difference == 0)).mean())


def own_patch_peak(grid_scores: np.ndarray, level: float, grow: int) -> int:
    """Flat index of the highest patch outside the peak's region (-1 when nothing is left)."""
    peak = np.unravel_index(int(grid_scores.argmax()), grid_scores.shape)
    components, _ = ndimage.label(grid_scores > level)
    region = components == components[peak] if components[peak] > 0 else np.zeros(grid_scores.shape, bool)
    region[peak] = True
    if grow:
        region = ndimage.binary_dilation(region, iterations=grow)
    outside = np.where(region, -np.inf, grid_scores)
    return int(outside.argmax()) if np.isfinite(outside.max()) else -1


def directions(model, images: torch.Tensor, choose) -> tuple[np.ndarray, list[np.ndarray]]:
    """(B, P) patch scores and, for each position list `choose(scores)` gives, the unit whitened deviations there."""
    with torch.no_grad():
        embedding, grid = model.embed(images)
        scores = model.embedding_scores(embedding, model.mean_, model.cholesky_)
        found = []
        for positions in choose(scores.numpy().reshape(len(images), *grid)):
            index = torch.as_tensor(positions)
            valid = index >= 0
            index = index.clamp_min(0)
            deviation = embedding[index, torch.arange(len(index))] - model.mean_[index]
            whitened = torch.linalg.solve_triangular(model.cholesky_[index], deviation[:, :, None], upper=False)[:, :, 0]
            whitened = whitened / whitened.norm(dim=1, keepdim=True).clamp_min(1e-12)
            whitened[~valid] = float("nan")
            found.append(whitened.numpy())
    return scores.numpy(), found


def measure(name: str, work: Path, seeds: int, labeled: int, grow: int) -> dict[str, np.ndarray]:
    settings, _ = load(["NUM_WORKERS=0", "WEIGHTS=imagenet-offline"])
    source = MapSource(set_folder(name, work), settings, None)
    model, preprocessor = source.model, source.preprocessor
    good_peaks, good_patch_scores = [], []
    for batch in ImageBatches(source.validation_paths, preprocessor, settings.BATCH_SIZE, 0):
        scores, (peak,) = directions(model, batch.images, lambda s: [s.reshape(len(s), -1).argmax(1)])
        good_peaks.append(peak)
        good_patch_scores.append(scores.ravel())
    good_peaks = np.concatenate(good_peaks)
    level = float(np.quantile(np.concatenate(good_patch_scores), LEVEL_QUANTILE))
    tests = source.category.test_images
    peaks, own = [], []
    for batch in ImageBatches([item.path for item in tests], preprocessor, settings.BATCH_SIZE, 0):
        _, (peak, own_peak) = directions(
            model, batch.images, lambda s: [s.reshape(len(s), -1).argmax(1), [own_patch_peak(m, level, grow) for m in s]])
        peaks.append(peak)
        own.append(own_peak)
    peaks, own = np.concatenate(peaks), np.concatenate(own)
    is_defect = np.array([item.is_defect for item in tests])
    defects, goods = np.flatnonzero(is_defect), np.flatnonzero(~is_defect)
    rows = []
    for seed in range(seeds):
        chosen = np.random.default_rng(seed).choice(defects, labeled, replace=False)
        others = np.setdiff1d(defects, chosen)
        prototype = peaks[chosen].mean(0)
        prototype /= np.linalg.norm(prototype)
        left_out = np.stack([peaks[np.setdiff1d(chosen, [j])].mean(0) for j in chosen])
        left_out /= np.linalg.norm(left_out, axis=1, keepdims=True)
        labeled_similarity = np.einsum("kd,kd->k", peaks[chosen], left_out)
        own_similarity = np.einsum("kd,kd->k", own[chosen], left_out)
        own_similarity = own_similarity[np.isfinite(own_similarity)]
        rows.append([
            rocauc(labeled_similarity, good_peaks @ prototype),
            rocauc(labeled_similarity, own_similarity),
            rocauc(peaks[others] @ prototype, peaks[goods] @ prototype),
            float(np.mean(good_peaks @ prototype)), float(np.mean(own_similarity)), float(np.mean(peaks[goods] @ prototype)),
        ])
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", default=["tire", "ksdd"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/classifier_ablation"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--labeled", type=int, default=10)
    parser.add_argument("--grow", type=int, default=2, help="patches the defect's region is grown by")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| set | similarity ROCAUC: labeled defects vs validation goods (the evidence today) | vs their own-patch peaks | "
          "other test defects vs test goods (the test split) | mean similarity: validation goods / own-patch peaks / test goods |")
    print("|---|---|---|---|---|")
    for name in args.sets:
        rows = measure(name, args.work, args.seeds, args.labeled, args.grow)
        mean, worst = rows.mean(0), rows.min(0)
        print(f"| {name} | {mean[0]:.3f} ({worst[0]:.3f}) | {mean[1]:.3f} ({worst[1]:.3f}) | {mean[2]:.3f} ({worst[2]:.3f}) | "
              f"{mean[3]:.3f} / {mean[4]:.3f} / {mean[5]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
