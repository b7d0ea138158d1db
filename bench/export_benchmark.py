"""Export benchmark: export time and file size per backbone, test.py's speed with torch against
onnxruntime, and how far onnxruntime's maps are from torch's on a real category.

    .venv/bin/python bench/export_benchmark.py [--dataset ../shared/data/tire]
        [--backbones resnet18,wide_resnet50_2,mobilenet_v2] [--models padim,patchcore] [--weights none]
        [--threads N] [--test-only]

Per anomaly model and backbone: train.py (CLASSIFIER=False, OUT_OF_FOLD_FOLDS=0: the classifier costs the same in both runtimes), export.py,
then test.py on the test folder with RUNTIME=torch and RUNTIME=onnxruntime (SAVE_PICTURES=False,
NUM_WORKERS=0: images are read in the measuring process), each a subprocess of its own whose peak
RSS (VmHWM) is its own; s/img is test.py's own "scored in" time (reading, preprocessing, scoring,
features, CSV) over the images. Then the maps of every test image from both runtimes, compared:
the largest |onnxruntime - torch| relative to that map's range (max - min). MobileNetV2 uses its
ImageNet weights (imagenet-offline); --weights applies to the ResNets (only "none" works offline).
--threads N runs both runtimes on N CPU threads (OMP_NUM_THREADS; onnxruntime follows torch's
thread count); --test-only times test.py again on the models an earlier run trained and exported.
Results: bench/out/export/results.json and table.md (bench/out/export-threads-N/ with --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "export"  # with --threads N: bench/out/export-threads-N
# Runs a script as `python script.py ...` would, then writes its peak RSS (VmHWM) to stderr.
MEASURED = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(f"PEAK_RSS_KB {line.split()[1]}", file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(script: str, *args: str, threads: int = 0) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS GB) of one script run; a failure stops the benchmark."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED, script, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    peak = int(re.findall(r"PEAK_RSS_KB (\d+)", result.stderr)[-1]) * 1024 / 1e9
    return result.stdout, seconds, peak


def map_differences(model_dir: Path, paths: list[Path]) -> dict:
    """Largest difference between onnxruntime's and torch's maps and scores over `paths`, one runtime at a time."""
    import numpy as np

    from pipeline.detector import Detector
    from pipeline.exporting import relative_differences

    results = {}
    for runtime in ("torch", "onnxruntime"):
        detector = Detector(model_dir, "cpu", runtime)
        items = sorted(detector.inspect(paths, 16, 0)[0], key=lambda item: item.index)
        results[runtime] = (np.stack([item.anomaly_map.numpy() for item in items]), np.array([item.score for item in items]))
        del detector
    (maps, scores), (reference_maps, reference_scores) = results["onnxruntime"], results["torch"]
    map_difference, score_difference = relative_differences(maps, scores, reference_maps.astype(np.float64), reference_scores)
    return {
        "max_relative_map_difference": map_difference,
        "max_relative_score_difference": score_difference,
        "max_absolute_map_difference": float(np.abs(maps - reference_maps).max()),
        "map_range": [float(reference_maps.min()), float(reference_maps.max())],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tire"))
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2,mobilenet_v2")
    parser.add_argument("--models", default="padim", help="anomaly models (ANOMALY_MODEL), comma-separated")
    parser.add_argument("--weights", default="none", help="weights of the ResNets (MobileNetV2: imagenet-offline)")
    parser.add_argument("--test-only", action="store_true", help="time test.py only, on the models of an earlier run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of both runtimes (OMP_NUM_THREADS); 0: their default")
    args = parser.parse_args()
    from dataset_manager import find_images

    out = OUT.with_name(f"export-threads-{args.threads}") if args.threads else OUT
    dataset = Path(args.dataset).resolve()
    test_dir = dataset / "test"
    n_test = len(find_images(test_dir))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, backbone in [(kind, backbone) for kind in args.models.split(",") for backbone in args.backbones.split(",")]:
        name = backbone if kind == "padim" else f"{kind}-{backbone}"
        weights = "imagenet-offline" if backbone == "mobilenet_v2" else args.weights
        common = [
            f"DATASET_DIR={dataset}", f"BACKBONE={backbone}", f"WEIGHTS={weights}", f"MODEL_DIR={OUT / 'models'}",
            f"MODEL_NAME={name}", f"ANOMALY_MODEL={kind}", f"RESULTS_DIR={out / 'results'}", "CLASSIFIER=False", "OUT_OF_FOLD_FOLDS=0", "NUM_WORKERS=0",
        ]
        model_dir = OUT / "models" / name
        row = {"model": kind, "backbone": backbone, "weights": weights, "n_test": n_test}
        if not args.test_only:
            print(f"{name}: training ...", file=sys.stderr)
            _, row["train_s"], row["train_peak_gb"] = run_measured("train.py", *common)
            print(f"{name}: exporting ...", file=sys.stderr)
            _, row["export_s"], row["export_peak_gb"] = run_measured("export.py", *common)
        export = json.loads((model_dir / "model.json").read_text())["export"]
        row["onnx_mb"] = {name: entry["bytes"] / 1e6 for name, entry in export["files"].items()}
        row["model_npy_mb"] = sum(path.stat().st_size for path in model_dir.glob("*.npy")) / 1e6
        row["export_check"] = export["check"]
        for runtime in ("torch", "onnxruntime"):
            print(f"{name}: test.py RUNTIME={runtime} ...", file=sys.stderr)
            stdout, _, peak = run_measured(
                "test.py", str(test_dir), *common, f"RUNTIME={runtime}", "SAVE_PICTURES=False", threads=args.threads
            )
            seconds = float(re.search(r"scored in ([\d.]+) s", stdout).group(1))
            row[f"test_s_per_img_{runtime}"] = seconds / n_test
            row[f"test_peak_gb_{runtime}"] = peak
        print(f"{name}: comparing maps ...", file=sys.stderr)
        row.update(map_differences(model_dir, find_images(test_dir)))
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = [
        "| model | backbone | export s | export peak RSS GB | ONNX files MB | model .npy MB | test s/img torch | test s/img onnxruntime "
        "| test peak RSS GB torch / onnxruntime | largest map difference (of map range) | largest absolute map difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        files = " + ".join(f"{mb:.1f}" for mb in r["onnx_mb"].values())
        export = f"{r['export_s']:.1f} | {r['export_peak_gb']:.2f}" if "export_s" in r else "— | —"
        table.append(
            f"| {r.get('model', 'padim')} | {r['backbone']} ({r['weights']}) | {export} | {files} | {r['model_npy_mb']:.1f} "
            f"| {r['test_s_per_img_torch']:.3f} | {r['test_s_per_img_onnxruntime']:.3f} "
            f"| {r['test_peak_gb_torch']:.2f} / {r['test_peak_gb_onnxruntime']:.2f} "
            f"| {r['max_relative_map_difference']:.1e} | {r['max_absolute_map_difference']:.1e} |"
        )
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
