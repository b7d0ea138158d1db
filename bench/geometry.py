"""What the inspected geometry costs and gives: square vs "auto" vs tiles, through the real scripts.

    .venv/bin/python bench/geometry.py [--datasets tire,ksdd,demo] [--configs square,auto,tiles]
        [--weights imagenet-offline] [--out bench/out/geometry] [--set KEY=VALUE ...] [--classifier]

For each dataset and configuration: train.py (CLASSIFIER=False: the anomaly model alone, unless
--classifier), eval.py (image ROCAUC of the max score, and of the classifier with --classifier;
pixel ROCAUC and PRO at the model's working size) and test.py on
the test folder with pictures, each in its own process, NUM_WORKERS=0 so that each process's peak
RSS (its VmHWM, from wait4) includes reading the images. Results: <out>/results.json and a
markdown table <out>/table.md, printed too. Datasets are named in DATASETS (the demo is generated
on first use; tire-gray is tire converted to gray, made under --out, as the classifier ablation
does); configurations in CONFIGS, each a list of KEY=VALUE settings, per dataset. The same script
compares PaDiM with PatchCore: `--configs square --set ANOMALY_MODEL=patchcore --name patchcore`.
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
sys.path.insert(0, str(ROOT / "bench"))
from classifier_ablation import set_folder  # noqa: E402  (the ablation's sets: tire, tire-gray, ksdd, demo)

DATASETS = ("tire", "tire-gray", "ksdd", "demo")
SQUARE = ["IMAGE_SIZE=(224, 224)", "CENTER_CROP=0.875"]
AUTO = ["IMAGE_SIZE=auto", "CENTER_CROP=1.0"]
# Tiles at the images' own resolution (1.0) for the large ksdd images; at the demo's and tire's
# small sizes a fraction above 1 would only invent pixels, so they are tiled at their own size.
CONFIGS: dict[str, dict[str, list[str]]] = {
    "square": {name: SQUARE for name in DATASETS},
    "auto": {name: AUTO for name in DATASETS},
    "tiles": {name: ["IMAGE_SIZE=1.0", "CENTER_CROP=1.0", "TILE_SIZE=224", "TILE_OVERLAP=64", "TILE_STATISTICS=shared"] for name in DATASETS},
}


# Runs a script as `python script.py ...` would, and reports the process's peak RSS (VmHWM) at exit.
_WRAPPER = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'): print('PEAK_RSS_KB', line.split()[1], file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run(script: str, settings: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a script in its own process; (result, wall seconds, peak RSS bytes of that process)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(ROOT / script), *settings],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    peaks = re.findall(r"PEAK_RSS_KB (\d+)", result.stderr)
    return result, time.perf_counter() - started, int(peaks[-1]) * 1024 if peaks else 0


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _common(name: str, dataset: Path, config: str, settings: list[str], out: Path) -> list[str]:
    work = out / f"{name}-{config}"
    return [f"DATASET_DIR={dataset}", f"MODEL_DIR={work / 'models'}", f"RESULTS_DIR={work / 'results'}", "NUM_WORKERS=0", "CLASSIFIER=False", *settings]


def _classifier_cell(row: dict) -> str:
    return f"{row['classifier_rocauc']:.3f}" if row.get("classifier_rocauc") is not None else "-"


def measure_test(row: dict, common: list[str]) -> dict:
    """test.py on the dataset's test folder with pictures: seconds per image (model loading
    excluded, reading included) and the process's peak RSS."""
    tested, _, peak = run("test.py", common)
    match = re.search(r"(\d+) images scored in ([\d.]+) s", tested.stdout)
    if tested.returncode or not match:
        row["error"] = (tested.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row.update(test_s_per_image=float(match.group(2)) / int(match.group(1)), test_peak_rss_gb=peak / 1e9)
    return row


def measure(name: str, dataset: Path, config: str, settings: list[str], out: Path, with_test: bool = True) -> dict:
    work = out / f"{name}-{config}"
    common = _common(name, dataset, config, settings, out)
    row: dict = {"dataset": name, "config": config, "settings": settings}
    trained, seconds, peak = run("train.py", common)
    if trained.returncode:
        row["error"] = (trained.stderr.strip().splitlines() or ["?"])[-1]
        return row
    match = re.search(r" in ([\d.]+) s at ", trained.stdout)
    row["train_s"], row["train_peak_rss_gb"] = float(match.group(1)), peak / 1e9
    (model_dir,) = [p for p in (work / "models").iterdir() if p.is_dir()]
    description = json.loads((model_dir / "model.json").read_text())
    row["image_size"] = description["preprocessing"]["image_size"]
    row["tiles"] = description["anomaly_model"]["state"].get("tiles", {}).get("count", 0)
    row["model_mb"] = model_bytes(model_dir) / 1e6
    evaluated, _, peak = run("eval.py", common)
    if evaluated.returncode:
        row["error"] = (evaluated.stderr.strip().splitlines() or ["?"])[-1]
        return row
    (run_dir,) = [p for p in (work / "results").iterdir() if p.name.startswith("eval-")]
    (metrics,) = json.loads((run_dir / "metrics.json").read_text())["categories"]
    row.update(
        image_rocauc=metrics["image_rocauc"], classifier_rocauc=metrics.get("classifier_rocauc"),
        pixel_rocauc=metrics["pixel_rocauc"], pro=metrics["pro"], eval_peak_rss_gb=peak / 1e9,
    )
    return measure_test(row, common) if with_test else row


def table(rows: list[dict]) -> str:
    head = "| data | config | working size (h x w) | tiles | image ROCAUC | classifier ROCAUC | pixel ROCAUC | PRO | fit s | test s/img | fit / test peak RSS GB | model MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['config']} | error: {r['error']} |")
            continue
        size = "x".join(str(v) for v in r["image_size"])
        test_s = f"{r['test_s_per_image']:.3f}" if "test_s_per_image" in r else "-"
        test_rss = f"{r['test_peak_rss_gb']:.2f}" if "test_peak_rss_gb" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['config']} | {size} | {r['tiles'] or '-'} | {r['image_rocauc']:.3f} | {_classifier_cell(r)} | {r['pixel_rocauc']:.3f} | "
            f"{r['pro']:.3f} | {r['train_s']:.0f} | {test_s} | {r['train_peak_rss_gb']:.2f} / {test_rss} | {r['model_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="tire,ksdd,demo", help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--configs", default="square,auto,tiles")
    parser.add_argument("--weights", default="imagenet-offline")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "geometry"))
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run (after the configuration's)")
    parser.add_argument("--name", default="", help="suffix of this run's configuration names")
    parser.add_argument("--no-test", action="store_true", help="train and eval only (no test.py timing)")
    parser.add_argument("--test-only", action="store_true", help="only test.py, on models an earlier run of this --out trained")
    parser.add_argument("--classifier", action="store_true", help="train and evaluate the classifier too (CLASSIFIER=True)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    for config in args.configs.split(","):
        for name in args.datasets.split(","):
            extra = ["CLASSIFIER=True"] if args.classifier else []
            settings = [f"WEIGHTS={args.weights}", "BACKBONE=mobilenet_v2", *CONFIGS[config][name], *extra, *args.set]
            label = config + (f"-{args.name}" if args.name else "")
            print(f"{name} {label}: {' '.join(settings)}", file=sys.stderr, flush=True)
            if args.test_only:
                (row,) = [r for r in rows if (r["dataset"], r["config"]) == (name, label)]
                row = measure_test(row, _common(name, set_folder(name, out), label, row["settings"], out))
            else:
                row = measure(name, set_folder(name, out), label, settings, out, not args.no_test)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows = [r for r in rows if (r["dataset"], r["config"]) != (name, label)] + [row]
            results_path.write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
