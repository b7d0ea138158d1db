"""Coreset selection alone: the pruned (CPU) and dense (GPU) greedy k-center against the naive loop.

    .venv/bin/python bench/coreset_speed.py [--dataset ../shared/data/tire] [--backbone wide_resnet50_2]
        [--weights none] [--ratio 0.1] [--methods pruned,dense,naive] [--threads 1,2] [--steps 0]

Builds PatchCore's projected memory bank of the dataset's train/good images once (cached in
bench/out/bank-<backbone>-<weights>.npy), then times `greedy_coreset` on it for each method and
thread count, each in a fresh subprocess; "naive" is bench/naive_patchcore.py's loop (a fresh
(N, d) difference per step). `--steps N` times only the first N selections and extrapolates (the
dense and naive loops take many minutes for a whole 10 % coreset on the CPU). The pruned
method also reports the share of points its triangle-inequality test lets through per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"


def build_bank(args) -> Path:
    path = OUT / f"bank-{args.backbone}-{args.weights.replace('/', '_')}.npy"
    if path.is_file():
        return path
    from anomaly_model.coreset import projection_matrix
    from anomaly_model.patchcore import PatchCore
    from bench.benchmark import category_files, preprocessor
    from dataset_manager import ImageBatches

    train, _ = category_files(Path(args.dataset))
    model = PatchCore(args.backbone, args.weights, device="cpu")
    parts = []
    for batch in ImageBatches(train, preprocessor(), 32, 0):
        embedding, _ = model.embed(batch.images)
        if 0 < model.projection_dim < model.feature_dim:
            embedding = embedding @ projection_matrix(model.feature_dim, model.projection_dim, model.seed)
        parts.append(embedding)
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(path, torch.cat(parts).numpy())
    return path


def work(args) -> dict:
    import anomaly_model.coreset as coreset

    points = torch.from_numpy(np.load(args.bank))
    count = coreset.coreset_size(len(points), args.ratio)
    steps = min(count, args.steps or count)
    coreset.PRUNED_THREADS = args.thread_count
    torch.set_num_threads(args.thread_count)
    passed = []
    if args.method == "pruned":  # count the points the triangle-inequality test lets through
        original = torch.Tensor.nonzero

        def counting(tensor, *rest, **options):
            found = original(tensor, *rest, **options)
            passed.append(found.shape[0])
            return found

        torch.Tensor.nonzero = counting
    started = time.perf_counter()
    if args.method == "naive":
        from bench.naive_patchcore import naive_greedy

        naive_greedy(points, steps, 0)
    else:
        coreset.greedy_coreset(points, steps, 0, args.method, progress=False)
    seconds = time.perf_counter() - started
    return {"method": args.method, "threads": args.thread_count, "points": len(points), "coreset": count, "steps": steps,
            "seconds": seconds, "ms_per_step": seconds / steps * 1e3, "estimated_full_s": seconds / steps * count,
            "candidate_share": float(np.mean(passed)) / len(points) if passed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tire"))
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--methods", default="pruned,dense,naive")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=0, help="time only the first N selections (0: the whole coreset)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--bank", default="")
    parser.add_argument("--method", default="pruned")
    parser.add_argument("--thread-count", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args)))
        return
    bank = build_bank(args)
    rows = []
    for method in args.methods.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            command = [sys.executable, __file__, "--worker", "--bank", str(bank), "--method", method, "--thread-count", str(threads),
                       "--ratio", str(args.ratio), "--steps", str(args.steps)]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            rows.append(result)
    print("\n| method | threads | bank points | coreset | steps timed | s | ms/step | whole coreset s (est.) | points tested per step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{r['candidate_share'] * 100:.2f} %" if r["candidate_share"] is not None else "100 %"
        print(f"| {r['method']} | {r['threads']} | {r['points']} | {r['coreset']} | {r['steps']} | {r['seconds']:.1f} | "
              f"{r['ms_per_step']:.2f} | {r['estimated_full_s']:.0f} | {share} |")


if __name__ == "__main__":
    main()
