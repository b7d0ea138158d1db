"""Train: fit the anomaly model (ANOMALY_MODEL: PaDiM or PatchCore) on the good images of DATASET_DIR and save it to MODEL_DIR/<name>/.

    python train.py [KEY=VALUE ...]      (settings: config.py)
    python train.py ADD_GOOD=<folder> ADD_DEFECT=<folder>   (update the trained model: docs/updating.md)
"""

from __future__ import annotations

import sys

from pipeline.cli import chosen_categories, chosen_model_dir, model_dir_for, run
from pipeline.training import train_category, warn_of_updates
from anomaly_model.store import other_models_settings
from settings import SettingsError, command_line_keys, load


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if extra:
        raise SettingsError(f"train.py takes only KEY=VALUE settings, not {extra[0]!r}")
    if settings.ADD_GOOD or settings.ADD_DEFECT:
        update(settings)
        return
    ignored = other_models_settings(settings.ANOMALY_MODEL, command_line_keys(argv))
    if ignored:
        print(f"note: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used by ANOMALY_MODEL={settings.ANOMALY_MODEL} (docs/settings.md says which model takes which setting)", file=sys.stderr)
    categories = chosen_categories(settings)
    summaries = []
    for category in categories:
        model_dir = model_dir_for(settings, category.name, len(categories))
        warn_of_updates(model_dir)
        summary = train_category(category, settings, model_dir)
        summaries.append(summary)
        print(
            f"{summary.model_dir.name}: trained on {summary.n_train} images, calibrated on {summary.n_validation} validation images"
            + (f" and {summary.n_out_of_fold} training images out-of-fold" if summary.n_out_of_fold else "")
            + f" in {summary.seconds:.1f} s at {summary.image_size[0]} x {summary.image_size[1]}"
            + (f" in {summary.tiles} tiles" if summary.tiles else "")
            + f"; model {summary.model_dir} "
            f"({summary.model_bytes / 1e6:.1f} MB); thresholds image {_shown(summary.image_threshold)} "
            f"pixel {_shown(summary.pixel_threshold)}"
            + (f"; {len(summary.skipped)} unreadable files skipped" if summary.skipped else "")
        )
    if len(summaries) > 1:
        print(f"{len(summaries)} models in {settings.MODEL_DIR}", file=sys.stderr)


# An update that raises the image threshold by at least this share says which new good scored highest:
# one wrong "good" can lift it far (smaller rises are the honest goods' ordinary spread).
THRESHOLD_RISE_NOTED = 0.05


def _shown(value: float) -> str:
    """A threshold or score for a summary line: 3 decimals, or 4 significant digits for tiny values (never "0.000")."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"


def update(settings) -> None:
    """ADD_GOOD / ADD_DEFECT: the model test.py would use learns those folders (pipeline/updating.py)."""
    from pipeline.updating import update_model

    model_dir = chosen_model_dir(settings, "to say which model learns the images,")
    summary = update_model(model_dir, settings, settings.ADD_GOOD, settings.ADD_DEFECT)
    if not summary.saved:
        return
    report = summary.model_report
    image_before, pixel_before = summary.thresholds_before
    radius = (f"; coreset +{report['coreset_added']} points, covering radius of the new patches "
              f"{report['covering_radius_before']:.4g} -> {report['covering_radius_after']:.4g}") if "coreset_added" in report else ""
    print(
        f"{model_dir.name}: learned {summary.n_good} good and {summary.n_defect} defect images in {summary.seconds:.1f} s"
        + (f" ({summary.n_known} already learned, skipped)" if summary.n_known else "")
        + (f", {summary.n_unreadable} unreadable skipped" if summary.n_unreadable else "")
        + f"{radius}; thresholds image {_shown(image_before)} -> {_shown(summary.image_threshold)}, pixel {_shown(pixel_before)} -> "
        + f"{_shown(summary.pixel_threshold)}; model {model_dir}"
        + (f" (previous kept as {model_dir.name}.backup-1)" if settings.MODEL_BACKUPS else "")
    )
    for line in threshold_notes(summary, model_dir, settings.MODEL_BACKUPS):
        print(f"note: {line}", file=sys.stderr)


def threshold_notes(summary, model_dir, backups: int) -> list[str]:
    """What a rise of the thresholds by THRESHOLD_RISE_NOTED or more means: new goods above the old
    image threshold raised it (the highest named: one wrong "good" can lift it far); below it, they
    cannot have, so the rise comes from re-picking a threshold set by an older rule. A higher pixel
    threshold marks smaller defect areas (the masks, defect_area_fraction)."""
    if summary.highest_new_good is None:
        return []
    image_before, pixel_before = summary.thresholds_before
    undo = f"restore {model_dir.name}.backup-1" if backups else "retrain without them"
    score, path = summary.highest_new_good
    lines = []
    if 0 < image_before * (1 + THRESHOLD_RISE_NOTED) <= summary.image_threshold:
        rise = f"{summary.image_threshold / image_before - 1:.0%}"
        if score >= image_before:
            lines.append(f"the new goods raised the image threshold by {rise} (the highest scored {_shown(score)} before the update, "
                         f"above the threshold: {path}): fewer defects will be flagged; if any of them is not a good part, {undo}")
        else:
            lines.append(f"the image threshold rose by {rise} though every new good scored below it: it was set by an older version's "
                         "rule (a quantile between two goods' scores) and is now one of the honest goods' own scores at the model's rate")
    if 0 < pixel_before * (1 + THRESHOLD_RISE_NOTED) <= summary.pixel_threshold:
        lines.append(f"the new goods raised the pixel threshold by {summary.pixel_threshold / pixel_before - 1:.0%}: smaller defect areas "
                     f"will be marked (masks, defect_area_fraction); if any of them is not a good part, {undo}")
    return lines


if __name__ == "__main__":
    run(main)
