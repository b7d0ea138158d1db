"""Side-by-side benchmark: this project's PaDiM and PatchCore against the naive ones in
bench/naive_padim.py and bench/naive_patchcore.py.

    .venv/bin/python bench/benchmark.py [--dataset ../shared/data/tire] [--weights none]
        [--backbones resnet18,wide_resnet50_2,mobilenet_v2:imagenet-offline] [--models padim,patchcore]
        [--limit-train 50] [--big-images 5,20] [--coreset-ratio 0.1] [--neighbors 0]

A backbone written `name:weights` uses those weights instead of --weights. PatchCore's fit is
split into features (backbone + bank), coreset selection and save; its rows go to a table of
their own (table-patchcore.md).

Every measurement runs in its own subprocess, so each peak RSS (VmHWM from /proc, i.e. what
the OS saw) belongs to that measurement alone. Images are read in the measuring process
(--num-workers 0 by default) so loader workers do not hide memory. Results go to bench/out/
(results.json, table.md; with --precision bfloat16: results-bfloat16.json, table-bfloat16.md)
and the markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
NAIVE_NOTE = "naive model size: float32 mean + full inverse covariances, as np.save writes them"


# ---------------------------------------------------------------------------------------------
# helpers shared by the workers


def gpu_peak_bytes() -> int | None:
    """Peak GPU memory torch allocated in this process (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def peak_rss_bytes() -> int:
    """This process's peak resident set size, from the kernel (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def category_files(dataset: Path) -> tuple[list[Path], list[tuple[Path, Path | None, bool]]]:
    """Train paths, and (test path, mask path or None, is defect) for an MVTec-format category."""
    from dataset_manager.images import IMAGE_EXTENSIONS

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    train = images(dataset / "train" / "good")
    test = []
    for kind in sorted(d.name for d in (dataset / "test").iterdir() if d.is_dir()):
        for path in images(dataset / "test" / kind):
            mask = dataset / "ground_truth" / kind / f"{path.stem}_mask.png"
            test.append((path, mask if mask.is_file() else None, kind != "good"))
    return train, test


def preprocessor():
    """The published geometry (resize 256, crop 224), as the naive implementation has it."""
    from config import NORMALIZE_MEAN, NORMALIZE_STD
    from dataset_manager import Preprocessor
    from dataset_manager.images import PUBLISHED_CROP, PUBLISHED_RESIZE

    return Preprocessor(PUBLISHED_RESIZE, PUBLISHED_CROP, NORMALIZE_MEAN, NORMALIZE_STD)


def rocaucs(labels: list[bool], scores: list[float], masks: list, maps: list) -> tuple[float | None, float | None]:
    """Image ROCAUC (max of the map) and pixel ROCAUC pooled over all masked / good images."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    image = float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else None
    pixel = None
    if masks:
        truth = np.concatenate([m.reshape(-1) for m in masks])
        if 0 < truth.sum() < truth.size:
            pixel = float(roc_auc_score(truth, np.concatenate([m.reshape(-1) for m in maps])))
    return image, pixel


# ---------------------------------------------------------------------------------------------
# workers: each runs in its own process and prints one JSON line


def work_backbone(args) -> dict:
    """The backbone's own forward time, the floor PaDiM builds on: run as Padim runs it (slices of
    BACKBONE_SLICE images on the CPU) and, for reference, on whole batches."""
    import torch

    from anomaly_model.backbone import FeatureExtractor
    from anomaly_model.base import BACKBONE_SLICE, resolve_device
    from dataset_manager import ImageBatches

    _, test = category_files(Path(args.dataset))
    paths = [p for p, _, _ in test][: args.max_test or None]
    device = resolve_device(args.device)
    extractor = FeatureExtractor(args.backbone, args.weights, (1, 2, 3), 0, args.precision).to(device)
    batches = [b.images.to(device) for b in ImageBatches(paths, preprocessor(), args.batch_size, 0)]
    step = BACKBONE_SLICE[args.backbone] if device.type == "cpu" else args.batch_size
    result = {"n": len(paths), "slice": step}
    with torch.inference_mode():
        extractor(batches[0][:2])  # warm-up
        for key, size in (("backbone_s_per_image", step), ("backbone_whole_batch_s_per_image", args.batch_size)):
            started = time.perf_counter()
            for images in batches:
                for part in images.split(size):
                    extractor(part)
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[key] = (time.perf_counter() - started) / len(paths)
    return result


def work_read(args) -> dict:
    """Reading, decoding and preprocessing the test images alone: part of every test s/img."""
    from dataset_manager import ImageBatches

    _, test = category_files(Path(args.dataset))
    paths = [p for p, _, _ in test][: args.max_test or None]
    started = time.perf_counter()
    for _ in ImageBatches(paths, preprocessor(), args.batch_size, args.num_workers):
        pass
    return {"read_s_per_image": (time.perf_counter() - started) / len(paths), "n": len(paths)}


def _model_path(args) -> Path:
    precision = "" if args.precision == "float32" or args.impl == "naive" else f"-{args.precision}"
    model = "" if args.model == "padim" else f"-{args.model}-{args.coreset_ratio}-{args.neighbors}-{args.n_train}-{args.feature_dim}"
    return OUT / "models" / f"{args.impl}-{args.backbone}-{args.weights.replace('/', '_')}{precision}{model}"


def fit_patchcore(args, images) -> dict:
    """PatchCore's fit, timed in its three parts: features (backbone and bank), coreset, save."""
    if args.impl == "ours":
        from anomaly_model.patchcore import PatchCore, PatchCoreSettings
        from anomaly_model.store import save_model

        settings = PatchCoreSettings(backbone=args.backbone, weights=args.weights, coreset_ratio=args.coreset_ratio,
                                     neighbors=args.neighbors, feature_dim=args.feature_dim, precision=args.precision)
        model = PatchCore(settings, device=args.device)
        model.fit(images)
        started = time.perf_counter()
        nbytes = save_model(_model_path(args), model, {}) if args.save else 0
        bank = model.bank_size_ * model.feature_dim * 4
    else:
        from bench.naive_patchcore import NaivePatchCore

        model = NaivePatchCore(args.backbone, args.weights, coreset_ratio=args.coreset_ratio, neighbors=args.neighbors,
                               feature_dim=args.feature_dim)
        model.fit(images)
        started = time.perf_counter()
        nbytes = model.state_bytes()
        if args.save:
            _model_path(args).mkdir(parents=True, exist_ok=True)
            model.save(str(_model_path(args) / "naive.pt"))
        bank = None
    timings = model.fit_seconds_ if args.impl == "ours" else model.timings
    selected = len(model.memory_) if args.impl == "ours" else None  # coreset points chosen
    return {"features_s": timings["features"], "coreset_s": timings["coreset"], "save_s": time.perf_counter() - started,
            "model_bytes": nbytes, "bank_bytes": bank,
            "coreset_points_per_s": selected / timings["coreset"] if selected and timings["coreset"] else None}


def work_fit(args) -> dict:
    from dataset_manager import ImageBatches
    from tqdm import tqdm

    train, _ = category_files(Path(args.dataset))
    train = train[: args.n_train or None]
    batches = ImageBatches(train, preprocessor(), args.batch_size, args.num_workers)
    images = (b.images for b in tqdm(batches, desc=f"fit {args.impl} {args.backbone}", unit="batch", file=sys.stderr))
    started = time.perf_counter()
    if args.model == "patchcore":
        result = fit_patchcore(args, images)
        return {**result, "fit_s": time.perf_counter() - started, "fit_peak_rss": peak_rss_bytes(), "n_train": len(train),
                "fit_gpu_peak": gpu_peak_bytes()}
    if args.impl == "ours":
        from anomaly_model.padim import Padim, PadimSettings
        from anomaly_model.store import save_model

        model = Padim(PadimSettings(backbone=args.backbone, weights=args.weights, layers=(1, 2, 3), precision=args.precision), device=args.device)
        model.fit(images)
        nbytes = save_model(_model_path(args), model, {}) if args.save else 0
    else:
        from bench.naive_padim import NaivePadim

        model = NaivePadim(args.backbone, args.weights)
        model.fit(images)
        nbytes = model.state_bytes()
        if args.save:
            _model_path(args).mkdir(parents=True, exist_ok=True)
            model.save(str(_model_path(args) / "naive"))
            (_model_path(args) / "grid.json").write_text(json.dumps(list(model.grid)))
    seconds = time.perf_counter() - started
    return {"fit_s": seconds, "fit_peak_rss": peak_rss_bytes(), "model_bytes": nbytes, "n_train": len(train),
            "fit_gpu_peak": gpu_peak_bytes()}


def work_test(args) -> dict:
    import numpy as np
    import torch

    from dataset_manager import ImageBatches, read_mask

    prep = preprocessor()
    if args.big_dir:
        paths = sorted(Path(args.big_dir).glob("*.jpg"))
        test = [(p, None, False) for p in paths]
    else:
        _, test = category_files(Path(args.dataset))
        test = test[: args.max_test or None]
    if args.impl == "ours":
        from anomaly_model.store import load_model

        model, _ = load_model(_model_path(args), args.device)
        model.prepare_scoring()  # as test.py's Inspector does: what scoring reuses is built before timing
        to_maps = lambda images: model.score(images)  # noqa: E731
    elif args.model == "patchcore":
        from bench.naive_patchcore import NaivePatchCore

        model = NaivePatchCore(args.backbone, args.weights, coreset_ratio=args.coreset_ratio, neighbors=args.neighbors,
                               feature_dim=args.feature_dim)
        model.load(str(_model_path(args) / "naive.pt"))
        to_maps = lambda images: tuple(torch.from_numpy(a).float() for a in model.score(images))  # noqa: E731
    else:
        from bench.naive_padim import NaivePadim

        model = NaivePadim(args.backbone, args.weights)
        model.load(str(_model_path(args) / "naive"), json.loads((_model_path(args) / "grid.json").read_text()))
        to_maps = lambda images: (torch.from_numpy(model.anomaly_maps(images)).float(), None)  # noqa: E731
    pictures = OUT / "pictures" / f"{args.impl}-{args.backbone}"
    pictures.mkdir(parents=True, exist_ok=True)
    batches = ImageBatches([p for p, _, _ in test], prep, args.batch_size, args.num_workers, 640 if args.draw_pictures else 0)
    labels, scores, masks, maps_kept = [], [], [], []
    threshold, scale, picture_seconds = None, None, 0.0
    started = time.perf_counter()
    for batch in batches:
        maps, batch_scores = to_maps(batch.images)
        if batch_scores is None:
            batch_scores = maps.flatten(1).max(dim=1).values
        if args.draw_pictures:
            from pipeline.pictures import picture_arrays, write_pictures

            if threshold is None:  # any fixed values do: this measures the drawing cost
                threshold = float(torch.quantile(maps[:, ::4, ::4].flatten(), 0.99))
                scale = (float(maps.median()), float(maps.max()))
            tick = time.perf_counter()
            for row, index in enumerate(batch.indices):
                arrays = picture_arrays(maps[row], batch.sizes[row], batch.previews[row], prep, threshold, scale)
                write_pictures(pictures, test[index][0].stem + f"_{index}", arrays)
            picture_seconds += time.perf_counter() - tick
        for row, index in enumerate(batch.indices):
            path, mask_path, defect = test[index]
            labels.append(defect)
            scores.append(float(batch_scores[row]))
            if not args.big_dir and (mask_path is not None or not defect):
                mask = read_mask(mask_path) if mask_path is not None else np.zeros(batch.sizes[row], dtype=bool)
                masks.append(prep.mask_tensor(mask).numpy())
                maps_kept.append(maps[row].half().numpy())
    seconds = time.perf_counter() - started
    image, pixel = rocaucs(labels, scores, masks, maps_kept) if not args.big_dir else (None, None)
    n = len(scores)
    return {"test_s_per_image": seconds / n, "picture_s_per_image": picture_seconds / n if args.draw_pictures else None,
            "test_peak_rss": peak_rss_bytes(), "test_gpu_peak": gpu_peak_bytes(), "image_rocauc": image, "pixel_rocauc": pixel, "n_test": n}


WORKERS = {"backbone": work_backbone, "read": work_read, "fit": work_fit, "test": work_test}
WORKER_OPTIONS = ("dataset", "weights", "batch_size", "num_workers", "device", "max_test", "precision", "coreset_ratio", "neighbors",
                  "feature_dim")


# ---------------------------------------------------------------------------------------------
# the driver


def run_worker(kind: str, args, **overrides) -> dict:
    """Runs one measurement in a fresh interpreter and returns its JSON result."""
    options = {key: value for key, value in vars(args).items() if key in WORKER_OPTIONS} | overrides
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    print(f"[bench] {kind} {options.get('impl', '')} {options['backbone']} {overrides}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        print(f"[bench] FAILED ({done.returncode}): {' '.join(command)}", file=sys.stderr)
        return {"error": f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[bench]   {time.perf_counter() - started:.1f} s wall: {result}", file=sys.stderr, flush=True)
    return result


def make_big_images(folder: Path, count: int, size: tuple[int, int] = (4000, 3000)) -> Path:
    """`count` synthetic width x height JPEGs (noise over a gradient) to check flat test memory."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    base = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    for i in range(count):
        target = folder / f"big_{i:03d}.jpg"
        if not target.exists():
            noise = rng.integers(0, 55, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray((base + noise).astype(np.uint8)).save(target, quality=85)
    return folder


def gb(value) -> str:
    return "—" if value is None else f"{value / 1e9:.2f}"


def fmt(value, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def table(rows: list[dict]) -> str:
    head = ("| impl | backbone | train imgs | fit s | fit peak RSS GB | test s/img | test img/s | "
            "img/s with pictures | pictures ms/img | test peak RSS GB | GPU peak GB fit / test | model MB | image ROCAUC | pixel ROCAUC |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = r.get("test_s_per_image")
        with_pictures = r.get("pictures_s_per_image")
        lines.append(
            f"| {r['impl']} | {r['backbone']} | {r.get('n_train', '—')} | {fmt(r.get('fit_s'), '.1f')} | "
            f"{gb(r.get('fit_peak_rss'))} | {fmt(per, '.3f')} | {fmt(1 / per if per else None, '.1f')} | "
            f"{fmt(1 / with_pictures if with_pictures else None, '.1f')} | "
            f"{fmt(r['picture_s_per_image'] * 1000 if r.get('picture_s_per_image') else None, '.1f')} | "
            f"{gb(r.get('test_peak_rss'))} | {gb(r.get('fit_gpu_peak'))} / {gb(r.get('test_gpu_peak'))} | "
            f"{fmt(r['model_bytes'] / 1e6 if r.get('model_bytes') else None, '.1f')} | "
            f"{fmt(r.get('image_rocauc'), '.4f')} | {fmt(r.get('pixel_rocauc'), '.4f')} |"
        )
    return "\n".join(lines)


def patchcore_table(rows: list[dict], floors: dict[str, float]) -> str:
    head = ("| impl | backbone | train imgs | features s | coreset s | coreset points/s | save s | fit s | fit peak RSS GB | "
            "bank GB | test s/img | test / backbone | test peak RSS GB | GPU peak GB fit / test | model MB | image ROCAUC | "
            "pixel ROCAUC |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per, floor = r.get("test_s_per_image"), floors.get(r["backbone"])
        lines.append(
            f"| {r['impl']} | {r['backbone']} | {r.get('n_train', '—')} | {fmt(r.get('features_s'), '.1f')} | "
            f"{fmt(r.get('coreset_s'), '.1f')} | {fmt(r.get('coreset_points_per_s'), '.0f')} | {fmt(r.get('save_s'), '.2f')} | "
            f"{fmt(r.get('fit_s'), '.1f')} | {gb(r.get('fit_peak_rss'))} | {gb(r.get('bank_bytes'))} | {fmt(per, '.3f')} | "
            f"{fmt(per / floor if per and floor else None, '.2f')} | {gb(r.get('test_peak_rss'))} | "
            f"{gb(r.get('fit_gpu_peak'))} / {gb(r.get('test_gpu_peak'))} | "
            f"{fmt(r['model_bytes'] / 1e6 if r.get('model_bytes') else None, '.1f')} | "
            f"{fmt(r.get('image_rocauc'), '.4f')} | {fmt(r.get('pixel_rocauc'), '.4f')} |"
        )
    return "\n".join(lines)


def drive_patchcore(args, backbones: list[tuple[str, str]]) -> None:
    """PatchCore ours vs naive per backbone: fit (features / coreset / save), test, ROCAUCs."""
    rows, notes, floors = [], [], {}
    for backbone, weights in backbones:
        floor = run_worker("backbone", args, backbone=backbone, weights=weights)
        floors[backbone] = floor.get("backbone_s_per_image")
        for impl in args.impls.split(","):
            row = {"impl": impl, "backbone": backbone, "weights": weights}
            limit = {"model": "patchcore", "n_train": args.patchcore_train}
            row |= run_worker("fit", args, backbone=backbone, weights=weights, impl=impl, save=True, **limit)
            max_test = args.naive_max_test if impl == "naive" and args.naive_max_test else args.max_test
            row |= run_worker("test", args, backbone=backbone, weights=weights, impl=impl, max_test=max_test, **limit)
            rows.append(row)
        pair = {r["impl"]: r for r in rows if r["backbone"] == backbone}
        if "ours" in pair and "naive" in pair:
            for key in ("coreset_s", "fit_s", "test_s_per_image"):
                if pair["ours"].get(key) and pair["naive"].get(key):
                    notes.append(f"{backbone}: {key} naive / ours = {pair['naive'][key] / pair['ours'][key]:.1f}x")
            for key in ("image_rocauc", "pixel_rocauc"):
                if pair["ours"].get(key) is not None and pair["naive"].get(key) is not None:
                    notes.append(f"{backbone}: {key} difference ours - naive = {pair['ours'][key] - pair['naive'][key]:+.4f}")
        if floors[backbone]:
            notes.append(f"{backbone}: backbone forward alone {floors[backbone]:.3f} s/img ({weights})")
    text = patchcore_table(rows, floors) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    text += (f"\n\nDataset {args.dataset} ({args.patchcore_train or 'all'} training images), CORESET_RATIO={args.coreset_ratio}, PATCHCORE_NEIGHBORS={args.neighbors}, "
             f"PATCHCORE_FEATURE_DIM={args.feature_dim}, "
             f"batch {args.batch_size}, device {args.device}, torch threads default.\n")
    suffix = (f"-{args.patchcore_train}" if args.patchcore_train else "") + (f"-d{args.feature_dim}" if args.feature_dim else "")
    (OUT / f"results-patchcore{suffix}.json").write_text(json.dumps({"rows": rows, "notes": notes, "args": vars(args)}, indent=2))
    (OUT / f"table-patchcore{suffix}.md").write_text(text)
    print(text)


def drive(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    backbones = [tuple(item.split(":", 1)) if ":" in item else (item, args.weights) for item in args.backbones.split(",")]
    if "patchcore" in args.models.split(","):
        drive_patchcore(args, backbones)
    if "padim" not in args.models.split(","):
        return
    rows, notes = [], []
    for backbone in [name for name, _ in backbones]:
        base = {"backbone": backbone}
        floor = run_worker("backbone", args, backbone=backbone)
        if backbone == args.backbones.split(",")[0]:
            reading = run_worker("read", args, backbone=backbone)
            if "read_s_per_image" in reading:
                notes.append(f"reading and preprocessing a test image alone: {reading['read_s_per_image']:.3f} s/img "
                             "(included in every test s/img)")
        if "backbone_s_per_image" in floor:
            notes.append(f"{backbone}: backbone forward alone {floor['backbone_s_per_image']:.3f} s/img as Padim runs it "
                         f"(slices of {floor['slice']} within batches of {args.batch_size}); whole batches "
                         f"{floor['backbone_whole_batch_s_per_image']:.3f} s/img")
        for impl in args.impls.split(","):
            row = {"impl": impl, **base}
            row |= run_worker("fit", args, backbone=backbone, impl=impl, save=True)
            max_test = args.naive_max_test if impl == "naive" and args.naive_max_test else args.max_test
            row |= run_worker("test", args, backbone=backbone, impl=impl, max_test=max_test)
            if impl == "ours" and args.pictures:
                with_pictures = run_worker("test", args, backbone=backbone, impl=impl, draw_pictures=True)
                row["pictures_s_per_image"] = with_pictures.get("test_s_per_image")
                row["picture_s_per_image"] = with_pictures.get("picture_s_per_image")
            rows.append(row)
            if args.limit_train:
                small = run_worker("fit", args, backbone=backbone, impl=impl, n_train=args.limit_train)
                rows.append({"impl": impl, **base, **small})
        if "ours" in args.impls and "naive" in args.impls:
            ours = next(r for r in rows if r["backbone"] == backbone and r["impl"] == "ours" and "test_s_per_image" in r)
            naive = next(r for r in rows if r["backbone"] == backbone and r["impl"] == "naive" and "test_s_per_image" in r)
            if ours.get("model_bytes") and naive.get("model_bytes"):
                notes.append(f"{backbone}: model file {ours['model_bytes'] / naive['model_bytes']:.3f}x the naive float32 size")
            for key in ("image_rocauc", "pixel_rocauc"):
                if ours.get(key) is not None and naive.get(key) is not None:
                    notes.append(f"{backbone}: {key} difference ours - naive = {ours[key] - naive[key]:+.4f}")
    if args.big_images:
        backbone = args.backbones.split(",")[0]
        for count in (int(c) for c in args.big_images.split(",")):
            folder = make_big_images(Path("/tmp") / f"padim-big-{count}", count)
            result = run_worker("test", args, backbone=backbone, impl="ours", draw_pictures=True, big_dir=str(folder))
            notes.append(f"{count} synthetic 4000x3000 JPEGs ({backbone}, pictures on): test peak RSS {gb(result.get('test_peak_rss'))} GB, "
                         f"{fmt(result.get('test_s_per_image'), '.3f')} s/img, pictures {fmt((result.get('picture_s_per_image') or 0) * 1000, '.0f')} ms/img")
    text = table(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes + [NAIVE_NOTE])
    text += (f"\n\nDataset {args.dataset}, WEIGHTS={args.weights}, batch {args.batch_size}, device {args.device}, "
             f"our backbone in {args.precision}, torch threads default.\n")
    suffix = "" if args.precision == "float32" else f"-{args.precision}"
    (OUT / f"results{suffix}.json").write_text(json.dumps({"rows": rows, "notes": notes, "args": vars(args)}, indent=2))
    (OUT / f"table{suffix}.md").write_text(text)
    print(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tire"))
    parser.add_argument("--weights", default="none", help="none (seeded random), imagenet, or a state-dict file")
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    parser.add_argument("--impls", default="ours,naive")
    parser.add_argument("--models", default="padim", help="padim, patchcore or both (padim,patchcore)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's CORESET_RATIO")
    parser.add_argument("--neighbors", type=int, default=0, help="PatchCore's PATCHCORE_NEIGHBORS")
    parser.add_argument("--feature-dim", type=int, default=0, help="PatchCore's PATCHCORE_FEATURE_DIM (0: all channels)")
    parser.add_argument("--patchcore-train", type=int, default=0,
                        help="fit PatchCore (ours and naive) on the first N training images only (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", help="our backbone's arithmetic: float32, bfloat16, float16 (GPU)")
    parser.add_argument("--limit-train", type=int, default=0, help="also fit on only the first N training images")
    parser.add_argument("--max-test", type=int, default=0, help="score only the first N test images (0 = all)")
    parser.add_argument("--naive-max-test", type=int, default=0, help="fewer test images for the naive one (RAM/time)")
    parser.add_argument("--no-pictures", dest="pictures", action="store_false", help="skip the with-pictures test run")
    parser.add_argument("--big-images", default="", help="e.g. 5,20: test peak RSS on that many 4000x3000 images")
    # worker-only options
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--model", default="padim")
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--draw-pictures", action="store_true")
    parser.add_argument("--big-dir", default="")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    drive(args)


if __name__ == "__main__":
    main()
