"""Inspect: score every image under FOLDER with a trained model; verdicts, heat maps and masks.

    python test.py [FOLDER] [KEY=VALUE ...]

Without FOLDER: TEST_DIR, else the dataset's test folder. Writes RESULTS_DIR/<model>/test-.../
predictions.csv and pictures/ (heat-map overlay with the defect contour, mask PNG at full size).
IMAGE_FALSE_REJECT_RATE / CLASSIFIER_FALSE_REJECT_RATE on the command line move the operating
point: the thresholds are re-picked from the honest good scores the model stores (no retraining).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import chosen_categories, chosen_model_dir, model_dir_for, run
from pipeline.inspection import load_for_settings
from pipeline.prediction import predict_folder
from settings import SettingsError, load


def _jobs(settings, folder_arg: str | None) -> list[tuple[Path, Path, str]]:
    """(model dir, folder to score, model name) for each model this run uses."""
    folder = folder_arg or settings.TEST_DIR
    if folder:
        model_dir = chosen_model_dir(settings, "to say which model scores the folder,")
        return [(model_dir, Path(folder), model_dir.name)]
    categories = chosen_categories(settings)
    jobs = []
    for category in categories:
        if category.test_dir is None:
            raise SettingsError(f"{category.name} has no test folder: give one, python test.py FOLDER")
        model_dir = model_dir_for(settings, category.name, len(categories))
        jobs.append((model_dir, category.test_dir, model_dir.name))
    return jobs


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if len(extra) > 1:
        raise SettingsError(f"test.py takes one FOLDER and KEY=VALUE settings, got {extra}")
    for model_dir, folder, name in _jobs(settings, extra[0] if extra else None):
        inspector = load_for_settings(model_dir, settings, argv)
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
