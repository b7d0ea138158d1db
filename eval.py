"""Evaluate: image and pixel ROCAUC, per-defect figures and ROC curves on the labeled test set.

    python eval.py [KEY=VALUE ...]

Writes RESULTS_DIR/eval-<time>/<category>/ (metrics.json, ROC curve PNGs) and, for several
categories, a summary table in RESULTS_DIR/eval-<time>/metrics.json.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from anomaly_model.store import AtomicFolder
from pipeline.cli import load_categories, model_dir_for, run
from pipeline.detector import Detector
from pipeline.evaluation_run import evaluate_category
from settings import SettingsError, load


def _cell(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if extra:
        raise SettingsError(f"eval.py takes only KEY=VALUE settings, not {extra[0]!r}")
    categories = load_categories(settings)
    rows = []
    run_name = f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    with AtomicFolder(Path(settings.RESULTS_DIR) / run_name) as out:
        for category in categories:
            detector = Detector(model_dir_for(settings, category.name, len(categories)), settings.DEVICE)
            detector.report_differences(settings)
            rows.append(evaluate_category(detector, category, settings, out.temporary / category.name))
        image = [r["image_rocauc"] for r in rows if r["image_rocauc"] is not None]
        pixel = [r["pixel_rocauc"] for r in rows if r["pixel_rocauc"] is not None]
        summary = {
            "categories": rows,
            "mean_image_rocauc": sum(image) / len(image) if image else None,
            "mean_pixel_rocauc": sum(pixel) / len(pixel) if pixel else None,
        }
        (out.temporary / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"{'category':<20} {'image ROCAUC':>12} {'pixel ROCAUC':>12}")
    for row in rows:
        print(f"{row['category']:<20} {_cell(row['image_rocauc']):>12} {_cell(row['pixel_rocauc']):>12}")
        for kind, entry in row["per_defect"].items():
            print(f"  {kind:<18} {_cell(entry['image_rocauc']):>12}   ({entry['count']} images)")
    if len(rows) > 1:
        print(f"{'mean':<20} {_cell(summary['mean_image_rocauc']):>12} {_cell(summary['mean_pixel_rocauc']):>12}")
    print(f"metrics and ROC curves: {out.target}")


if __name__ == "__main__":
    run(main)
