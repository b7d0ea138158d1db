"""Export: write a trained model as ONNX (MODEL_DIR/<name>/model.onnx) for runtimes without PyTorch.

    python export.py [KEY=VALUE ...]

Checks itself: a few good images of the dataset go through torch and onnxruntime, and nothing is
written unless their maps agree. Then `python test.py FOLDER RUNTIME=onnxruntime` scores with the
file; docs/deployment.md "Deploying without PyTorch" scores an image with numpy, Pillow, onnxruntime and xgboost.
"""

from __future__ import annotations

from pipeline.cli import chosen_categories, model_dir_for, run
from pipeline.exporting import check_paths, export_model
from settings import SettingsError, load


def main(argv: list[str]) -> None:
    settings, extra = load(argv)
    if extra:
        raise SettingsError(f"export.py takes only KEY=VALUE settings, not {extra[0]!r}")
    categories = chosen_categories(settings)
    for category in categories:
        model_dir = model_dir_for(settings, category.name, len(categories))
        summary = export_model(model_dir, check_paths(category, settings.EXPORT_CHECK_IMAGES))
        files = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in summary.files.items())
        print(
            f"{model_dir.name}: exported in {summary.seconds:.1f} s to {model_dir}: {files}; on {summary.n_check_images} "
            f"check images onnxruntime's maps differ from torch's by at most {summary.max_map_difference:.1e} of their range"
        )


if __name__ == "__main__":
    run(main)
