"""One process against several under torchrun (Gloo, CPU, one thread each): time, and sameness.

    .venv/bin/python bench/distributed.py [--dataset ../shared/data/tire] [--processes 2]
        [--backbone mobilenet_v2] [--weights imagenet-offline] [--repeats 1] [--reference-batch B]
        [KEY=VALUE ...]
    .venv/bin/python bench/distributed.py ANOMALY_MODEL=patchcore OUT_OF_FOLD_FOLDS=0   # PatchCore

Runs the real scripts, as a user would: `python train.py` and `python test.py` for one process,
`python -m torch.distributed.run --standalone --nproc_per_node=N train.py` (torchrun) for N, all
with OMP_NUM_THREADS=1 so N processes use N cores and the comparison is per core. Timed: the
scripts' own figures (train: fit + validation + save, without starting Python; test: scoring and
pictures, per image) and the whole command's wall time (Python, torch import and torchrun's
rendezvous included). Compared: the N-process model against the 1-process one (PaDiM: mean and
Cholesky factors, max |difference| / max |value|; PatchCore, with ANOMALY_MODEL=patchcore: whether
the coreset, its mean and its source images are identical), and predictions.csv of the same 1-process model
scored by 1 and by N processes (must be identical) and of each run's own model. Extra KEY=VALUE
settings go to every run (CLASSIFIER=False is the default here: the classifier's XGBoost fit
runs on rank 0 alone and is not what is measured). Results: bench/out/distributed.{json,md}
(PatchCore: distributed-patchcore.{json,md}).
Wrap timing runs in `flock /tmp/bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def command(script: str, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(ROOT / script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(ROOT / script)]


def run(script: str, processes: int, settings: list[str]) -> tuple[str, float]:
    """(stdout and stderr, wall seconds) of one script run; stops the benchmark when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    result = subprocess.run(command(script, processes) + settings, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{script} with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr, wall


def relative_difference(folder_a: Path, folder_b: Path, name: str) -> float:
    a, b = np.load(folder_a / name), np.load(folder_b / name)
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


def bar_seconds(output: str, name: str) -> float | None:
    """Elapsed seconds of rank 0's last finished tqdm bar `name` ("coreset: 100%| ... [00:31<00:00"), if any."""
    found = re.findall(rf"{name}: 100%.*?\[(?:(\d+):)?(\d+):(\d+)<", output)
    return None if not found else 3600 * int(found[-1][0] or 0) + 60 * int(found[-1][1]) + int(found[-1][2])


def compare_models(one: Path, other: Path) -> dict:
    """PatchCore: whether the coreset files are identical (and the coreset's largest relative
    difference); PaDiM: the mean's and the Cholesky factors' largest relative differences."""
    if (one / "coreset.npy").is_file():
        files = ("coreset.npy", "coreset_mean.npy", "coreset_sources.npy")
        return {"coreset_identical": all(np.array_equal(np.load(one / f), np.load(other / f)) for f in files),
                "coreset.npy": relative_difference(one, other, "coreset.npy")}
    return {file: relative_difference(one, other, file) for file in ("mean.npy", "cholesky.npy")}


def model_line(compared: dict) -> str:
    if "coreset_identical" in compared:
        return f"coreset, its mean and source images identical: {compared['coreset_identical']} (coreset {compared['coreset.npy']:.2e})"
    return f"mean {compared['mean.npy']:.2e}, Cholesky factors {compared['cholesky.npy']:.2e}"


def predictions(results: Path) -> list[dict]:
    (run_dir,) = [p for p in results.rglob("predictions.csv")]
    with open(run_dir) as file:
        return list(csv.DictReader(file))


def compare_predictions(a: list[dict], b: list[dict]) -> dict:
    """Same images in the same order; largest relative image-score difference; verdicts that differ."""
    same_order = [row["path"] for row in a] == [row["path"] for row in b]
    scores_a = np.array([float(row["image_score"]) for row in a])
    scores_b = np.array([float(row["image_score"]) for row in b]) if same_order else scores_a
    return {
        "same_images_same_order": same_order,
        "identical": a == b,
        "max_relative_image_score_difference": float(np.abs(scores_a - scores_b).max() / np.abs(scores_a).max()),
        "verdicts_differing": int(sum(x["verdict"] != y["verdict"] for x, y in zip(a, b))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "tire")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet-offline")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the 1- and N-process runs this many times; the fastest of each is reported")
    parser.add_argument("--reference-batch", type=int, default=0,
                        help="also train one process with this BATCH_SIZE: how much merely adding the sums in another order moves the model")
    parser.add_argument("settings", nargs="*", help="extra KEY=VALUE settings for every run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    common = [f"DATASET_DIR={args.dataset.resolve()}", f"BACKBONE={args.backbone}", f"WEIGHTS={args.weights}",
              "CLASSIFIER=False", "NUM_WORKERS=0", *args.settings]
    name = args.dataset.resolve().name
    report = {"dataset": str(args.dataset), "backbone": args.backbone, "weights": args.weights, "settings": common, "runs": {}}
    counts = (1, args.processes)
    try:
        for repeat in range(args.repeats):
            for processes in counts:
                out, wall = run("train.py", processes, [*common, f"MODEL_DIR={work / f'model-{processes}'}"])
                match = re.search(r"trained on (\d+) images, calibrated on (\d+) validation images.*? in ([\d.]+) s", out)
                entry = report["runs"].setdefault(f"train {processes}", {"images": int(match[1]), "train_s": [], "wall_s": []})
                entry["train_s"].append(float(match[3]))
                entry["wall_s"].append(round(wall, 1))
                entry.setdefault("coreset_s", []).append(bar_seconds(out, "coreset"))  # PatchCore's selection on rank 0
                print(f"train, {processes} process(es): {match[3]} s ({wall:.1f} s wall)", flush=True)
        runs = [(1, 1), (args.processes, 1), (args.processes, args.processes)]  # (processes, model of how many)
        for repeat in range(args.repeats):
            for processes, model in runs:
                results = work / f"results-{processes}-model-{model}-{repeat}"
                out, wall = run("test.py", processes, [*common, f"MODEL_DIR={work / f'model-{model}'}", f"RESULTS_DIR={results}"])
                match = re.search(r"(\d+) images scored in ([\d.]+) s", out)
                images, seconds = int(match[1]), float(match[2])
                entry = report["runs"].setdefault(f"test {processes} model {model}", {"images": images, "s_per_image": [], "wall_s": []})
                entry["s_per_image"].append(round(seconds / images, 4))
                entry["wall_s"].append(round(wall, 1))
                print(f"test, {processes} process(es), model of {model}: {seconds / images:.4f} s/img ({wall:.1f} s wall)", flush=True)
        one, many = work / "model-1" / name, work / f"model-{args.processes}" / name
        report["model"] = compare_models(one, many)
        if args.reference_batch:
            run("train.py", 1, [*common, f"BATCH_SIZE={args.reference_batch}", f"MODEL_DIR={work / 'model-reference'}"])
            reference = work / "model-reference" / name
            report["reference"] = {"batch_size": args.reference_batch, **compare_models(one, reference)}
        last = args.repeats - 1
        base = predictions(work / f"results-1-model-1-{last}")
        report["predictions_same_model"] = compare_predictions(base, predictions(work / f"results-{args.processes}-model-1-{last}"))
        report["predictions_own_models"] = compare_predictions(base, predictions(work / f"results-{args.processes}-model-{args.processes}-{last}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stem = "distributed-patchcore" if "coreset_identical" in report["model"] else "distributed"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report, args.processes)
    (OUT / f"{stem}.md").write_text(table + "\n")
    print(table)


def markdown(report: dict, processes: int) -> str:
    """The fastest of the repeats (the least disturbed by other work on the machine), each run in brackets."""
    runs = report["runs"]

    def best(entry: dict, key: str) -> str:
        values = entry[key]
        return f"{min(values):.4g}" + (f" ({', '.join(f'{v:.4g}' for v in values)})" if len(values) > 1 else "")

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{min(a[key]) / min(b[key]):.2f}x"

    one, many = runs["train 1"], runs[f"train {processes}"]
    test_one, test_many = runs["test 1 model 1"], runs[f"test {processes} model 1"]
    lines = [
        "| processes | train s (fit + validation + save) | train wall s | test s/img | test wall s |",
        "|---|---|---|---|---|",
        f"| 1 | {best(one, 'train_s')} | {best(one, 'wall_s')} | {best(test_one, 's_per_image')} | {best(test_one, 'wall_s')} |",
        f"| {processes} | {best(many, 'train_s')} | {best(many, 'wall_s')} | {best(test_many, 's_per_image')} | {best(test_many, 'wall_s')} |",
        f"| speed-up | {ratio(one, many, 'train_s')} | {ratio(one, many, 'wall_s')} | "
        f"{ratio(test_one, test_many, 's_per_image')} | {ratio(test_one, test_many, 'wall_s')} |",
        "",
        f"- model of {processes} processes vs 1: {model_line(report['model'])} (max |difference| / max |value|)",
    ]
    if None not in one["coreset_s"] + many["coreset_s"]:
        lines.append(f"- of the train s, PatchCore's coreset selection (rank 0, tqdm's whole seconds): {best(one, 'coreset_s')} s with 1 "
                     f"process, {best(many, 'coreset_s')} s with {processes}")
    if "reference" in report:
        reference = report["reference"]
        lines.append(
            f"- for scale, one process with BATCH_SIZE={reference['batch_size']} vs the default: {model_line(reference)}"
        )
    lines += [
        f"- same model scored by 1 and {processes} processes: predictions.csv identical: "
        f"{report['predictions_same_model']['identical']}",
        f"- each run's own model: max relative image-score difference "
        f"{report['predictions_own_models']['max_relative_image_score_difference']:.2e}, verdicts differing: "
        f"{report['predictions_own_models']['verdicts_differing']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
