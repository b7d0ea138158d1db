"""Inspect: score every image under FOLDER with a trained model; verdicts, heat maps and masks.

    python test.py [FOLDER] [KEY=VALUE ...]

Without FOLDER: TEST_DIR, else the dataset's test folder. Writes RESULTS_DIR/<model>/test-.../
predictions.csv and pictures/ (heat-map overlay with the defect contour, mask PNG at full size).
IMAGE_FALSE_REJECT_RATE / CLASSIFIER_FALSE_REJECT_RATE on the command line move the operating
point: the thresholds are re-picked from the honest good scores the model stores (no retraining).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dataset_manager import Category
from pipeline.cli import chosen_categories, chosen_model_dir, model_dir_for, require_models, run, trained_elsewhere
from pipeline.inspection import load_for_settings
from pipeline.prediction import predict_folder
from settings import SettingsError, load


def _jobs(settings, folder_arg: str | None) -> list[tuple[Path, Path, Category | None]]:
    """(model dir, folder to score, the category whose test folder it is, or None) for each model
    this run uses; every model checked before the first is scored."""
    folder = folder_arg or settings.TEST_DIR
    if folder:
        model_dir = chosen_model_dir(settings, "to say which model scores the folder,")
        return [(model_dir, Path(folder), None)]
    categories = chosen_categories(settings)
    jobs = []
    for category in categories:
        if category.test_dir is None:
            advice = (f"give MODEL_NAME=<another category> to test the others, or python test.py FOLDER MODEL_NAME={category.name}"
                      if len(categories) > 1 else "give one, python test.py FOLDER")
            raise SettingsError(f"{category.name} has no test folder: {advice}")
        jobs.append((model_dir_for(settings, category.name, len(categories)), category.test_dir, category))
    require_models([model_dir for model_dir, _, _ in jobs])
    return jobs


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if len(extra) > 1:
        raise SettingsError(f"test.py takes one FOLDER and KEY=VALUE settings, got {extra}")
    for model_dir, folder, category in _jobs(settings, extra[0] if extra else None):
        name = model_dir.name
        inspector = load_for_settings(model_dir, settings, argv)
        elsewhere = trained_elsewhere(inspector.detector.description, category) if category is not None else ""
        if elsewhere:  # MODEL_NAME picked another part's model, or a data set of the same name replaced it
            print(f"note: the model {model_dir} was trained on {elsewhere}, scoring here the test folder of {category.name!r} ({category.root})",
                  file=sys.stderr)
        summary = predict_folder(inspector, folder, Path(settings.RESULTS_DIR) / name, settings)
        print(
            f"{name}: {summary.n_images} images scored in {summary.seconds:.1f} s, {summary.n_defects} judged defect"
            + (f", {len(summary.skipped)} unreadable skipped" if summary.skipped else "")
        )
        print(f"  predictions: {summary.run_dir / 'predictions.csv'}")
        if settings.SAVE_PICTURES:
            print(f"  pictures:    {summary.run_dir / 'pictures'}")


if __name__ == "__main__":
    run(main)
