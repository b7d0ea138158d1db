"""Evaluate: image ROCAUC, pooled pixel ROCAUC, PRO, operating-point figures and pictures.

    python eval.py [KEY=VALUE ...]

Writes RESULTS_DIR/eval-<time>/: report.html (every table and picture on one page), metrics.md
and metrics.json (a row per category and the mean, like PaDiM's tables) and, per category,
<category>/metrics.json, ROC / PR / PRO curves, score histograms and localization sheets.
IMAGE_FALSE_REJECT_RATE / CLASSIFIER_FALSE_REJECT_RATE on the command line evaluate another
operating point, re-picked from the honest good scores the model stores (no retraining); the
curves show the point in force.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from anomaly_model import distributed
from evaluation.plots import plot_pro, plot_roc
from evaluation.report import write_report
from evaluation.tables import markdown_category, markdown_summary, summary_table, terminal_table
from pipeline.cli import chosen_categories, model_dir_for, require_models, run
from pipeline.evaluation_run import CategoryEvaluation, evaluate_category
from pipeline.inspection import load_for_settings
from settings import SettingsError, load


def _overall_figures(evaluations: list[CategoryEvaluation], folder: Path, limit: float) -> dict[str, str]:
    """With several categories, one figure per curve kind holding every category's curve."""
    if len(evaluations) < 2:
        return {}
    figures = {}
    image = {e.metrics["category"]: e.image_curves["max score"] for e in evaluations if "max score" in e.image_curves}
    pixel = {e.metrics["category"]: e.pixel_curve for e in evaluations if e.pixel_curve is not None}
    pro = {e.metrics["category"]: e.pro_curve for e in evaluations if e.pro_curve is not None}
    if image:
        figures["image ROC, all categories"] = plot_roc(image, "image ROC per category", folder / "roc_image_all.png")
    if pixel:
        figures["pixel ROC, all categories"] = plot_roc(pixel, "pixel ROC per category", folder / "roc_pixel_all.png")
    if pro:
        figures["PRO, all categories"] = plot_pro(pro, limit, "per-region overlap per category", folder / "pro_all.png")
    return {title: path.name for title, path in figures.items()}


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if extra:
        raise SettingsError(f"eval.py takes only KEY=VALUE settings, not {extra[0]!r}")
    categories = chosen_categories(settings)
    model_dirs = [model_dir_for(settings, category.name, len(categories)) for category in categories]
    untested = [category.name for category in categories if not category.test_images]
    if untested and len(categories) > 1:  # said before any category is scored, not after the others' work
        raise SettingsError(f"no labeled test images for {', '.join(repr(name) for name in untested)}: give MODEL_NAME=<another category> "
                            "to evaluate the others (test/good/ and test/<defect type>/ folders make a test set)")
    require_models(model_dirs)
    evaluations = []
    run_name = f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    with distributed.SharedFolder(Path(settings.RESULTS_DIR) / run_name, replace=False) as out:
        for category, model_dir in zip(categories, model_dirs):
            inspector = load_for_settings(model_dir, settings, argv)
            evaluations.append(evaluate_category(inspector, category, settings, out.temporary / category.name))
        if not distributed.is_main():
            return  # under torchrun the other ranks only scored their shares: rank 0 writes
        rows = [e.metrics for e in evaluations]
        overall = _overall_figures(evaluations, out.temporary, settings.EVAL_PRO_FPR_LIMIT)
        table = summary_table(rows)
        summary = {
            "categories": rows,
            "table": table,
            "mean_image_rocauc": table["mean"]["image_rocauc"],
            "mean_pixel_rocauc": table["mean"]["pixel_rocauc"],
            "mean_pro": table["mean"]["pro"],
            "pro_fpr_limit": settings.EVAL_PRO_FPR_LIMIT,
            "figures": overall,
        }
        (out.temporary / "metrics.json").write_text(json.dumps(summary, indent=2))
        markdown = [f"# {run_name}", "", markdown_summary(rows), ""] + [markdown_category(row) for row in rows]
        (out.temporary / "metrics.md").write_text("\n".join(markdown))
        write_report(out.temporary, rows, overall, f"Evaluation of {settings.DATASET_DIR}, {datetime.now():%Y-%m-%d %H:%M} ({run_name})")
    print(terminal_table(rows))
    print(f"report: {out.target / 'report.html'}")
    print(f"metrics and ROC curves: {out.target}")


if __name__ == "__main__":
    run(main)
