"""eval.py's work: score a labeled test set, compute metrics, draw the ROC curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from dataset_manager import Category, DataError, read_mask
from dataset_manager.images import image_size
from evaluation.metrics import image_rocauc, per_defect_rocauc, pixel_rocauc
from evaluation.plots import plot_roc
from pipeline.detector import Detector


def check_masks(category: Category) -> None:
    """Every mask must have its image's size; checked from file headers before any scoring."""
    for item in category.test_images:
        if item.mask_path is None:
            continue
        mask_size, size = image_size(item.mask_path), image_size(item.path)
        if mask_size != size:
            raise DataError(
                f"mask {item.mask_path} is {mask_size[1]}x{mask_size[0]} but its image {item.path} is "
                f"{size[1]}x{size[0]}: fix or remove the mask"
            )


def evaluate_category(detector: Detector, category: Category, settings, out_dir: Path) -> dict:
    """Metrics of one category, written with its ROC curves to `out_dir`."""
    if not category.test_images:
        raise DataError(f"no labeled test images for {category.name}: expected {category.root}/test/<type>/ folders")
    check_masks(category)
    items = category.test_images
    scores = np.full(len(items), np.nan)
    pixel_maps, pixel_masks = [], []
    results, batches = detector.inspect([item.path for item in items], settings.BATCH_SIZE, settings.NUM_WORKERS, label=f"eval {category.name}")
    for result in results:
        item = items[result.index]
        scores[result.index] = result.score
        if item.mask_path is not None or not item.is_defect:
            mask = read_mask(item.mask_path) if item.mask_path is not None else np.zeros(result.size, dtype=bool)
            pixel_masks.append(detector.preprocessor.mask_tensor(mask))
            pixel_maps.append(result.anomaly_map.half())
    for path, reason in batches.skipped:
        print(f"WARNING: skipped {path}: {reason}", file=sys.stderr)
    scored = ~np.isnan(scores)
    labels = np.array([item.is_defect for item in items])[scored]
    types = [item.defect_type for item, ok in zip(items, scored) if ok]
    scores = scores[scored]
    n_masked_defects = sum(1 for item in items if item.is_defect and item.mask_path is not None)
    metrics = {
        "category": category.name,
        "n_images": int(scored.sum()),
        "n_good": int((~labels).sum()),
        "n_defect": int(labels.sum()),
        "image_rocauc": image_rocauc(labels, scores),
        "pixel_rocauc": None,
        "n_pixel_images": 0,
        "per_defect": per_defect_rocauc(types, scores),
        "skipped_files": [str(path) for path, _ in batches.skipped],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if metrics["image_rocauc"] is not None:
        plot_roc({"image score": (labels, scores, metrics["image_rocauc"])}, f"{category.name}: image ROC", out_dir / "roc_image.png")
    if n_masked_defects:
        maps = torch.stack(pixel_maps).float().numpy()
        masks = torch.stack(pixel_masks).numpy()
        metrics["pixel_rocauc"] = pixel_rocauc(masks, maps)
        metrics["n_pixel_images"] = len(pixel_maps)
        if metrics["pixel_rocauc"] is not None:
            plot_roc({"pixels": (masks.reshape(-1), maps.reshape(-1), metrics["pixel_rocauc"])}, f"{category.name}: pixel ROC", out_dir / "roc_pixel.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
