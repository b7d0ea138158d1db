"""Train: fit PaDiM on the good images of DATASET_DIR and save the model to MODEL_DIR/<name>/.

    python train.py [KEY=VALUE ...]      (settings: config.py)
"""

from __future__ import annotations

import sys

from pipeline.cli import load_categories, model_dir_for, run
from pipeline.training import train_category
from settings import SettingsError, load


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if extra:
        raise SettingsError(f"train.py takes only KEY=VALUE settings, not {extra[0]!r}")
    categories = load_categories(settings)
    summaries = []
    for category in categories:
        summary = train_category(category, settings, model_dir_for(settings, category.name, len(categories)))
        summaries.append(summary)
        print(
            f"{summary.category}: trained on {summary.n_train} images, calibrated on {summary.n_validation} validation images"
            + (f" and {summary.n_out_of_fold} training images out-of-fold" if summary.n_out_of_fold else "")
            + f" in {summary.seconds:.1f} s at {summary.image_size[0]} x {summary.image_size[1]}"
            + (f" in {summary.tiles} tiles" if summary.tiles else "")
            + f"; model {summary.model_dir} "
            f"({summary.model_bytes / 1e6:.1f} MB); thresholds image {summary.image_threshold:.3f} "
            f"pixel {summary.pixel_threshold:.3f}"
            + (f"; {len(summary.skipped)} unreadable files skipped" if summary.skipped else "")
        )
    if len(summaries) > 1:
        print(f"{len(summaries)} models in {settings.MODEL_DIR}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
