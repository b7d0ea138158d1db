"""PADIM_SCORE variants and the Chebyshev pixel threshold, measured on real data.

    .venv/bin/python bench/chebyshev_scores.py [--sets tire,gray_tire,ksdd,demo] [--out bench/out/chebyshev]

Per data set, PaDiM (config.py defaults: MobileNetV2, offline ImageNet weights) is fitted once;
the validation and test embeddings are computed once; then every variant scores them through
`Padim.embedding_scores` (all variants share the same statistics, so nothing is refitted) and
the shared map post-processing. Reported per variant: image ROCAUC, pixel ROCAUC, PRO, the cost
of the score itself (ms per image, beside the backbone's; for the settings the least of --repeats
interleaved runs, for the candidates one run) and, for each pixel threshold (the validation
quantile and the Chebyshev bound at PIXEL_FALSE_REJECT_RATE and at other bounds), how often good
validation pixels, good test pixels and defect pixels reach it. The fit is the same for every
variant (nothing extra is computed or stored), so it is timed once.

Rows marked "(not a setting)" are candidates computed here from the same two quantities the
shipped scores use (the distance M and the largest channel deviation k_max): the Gaussian tail
-log10 P(chi2_d >= M^2) (what a Bonferroni or min combination of the Gaussian and Chebyshev tail
probabilities reduces to, see anomaly_model/chebyshev.py), and both terms as Chebyshev k-values,
w M + (1 - w) k_max.

Data sets: tire (../shared/data/tire), gray_tire (tire converted to gray into a temporary
folder), ksdd (../shared/data/ksdd, no validation split: VALIDATION_FRACTION of train), demo
(generated into a temporary folder). Timings: run under `flock /tmp/bench.lock` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_model.chebyshev import chebyshev_term  # noqa: E402
from anomaly_model.gaussian import deviations  # noqa: E402
from anomaly_model.store import build_model  # noqa: E402
from dataset_manager import ImageBatches, find_categories, read_mask  # noqa: E402
from dataset_manager.demo import generate_demo_dataset  # noqa: E402
from evaluation.metrics import image_rocauc, pixel_auc, pixel_curves, pro_auc  # noqa: E402
from pipeline.training import calibrate, make_preprocessor, split_validation  # noqa: E402
from settings import load  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS_SWEPT = (0.25, 0.5, 0.75, 0.9)
VARIANTS = [("mahalanobis", 1.0), *[("hybrid", w) for w in WEIGHTS_SWEPT], ("chebyshev", 0.0)]
RATES_SWEPT = (0.005, 0.05, 0.1, 0.25)  # false-alarm bounds the Chebyshev threshold is also shown at


def gray_copy(source: Path, target: Path) -> Path:
    """A copy of an MVTec category with every image (not the masks) converted to gray."""
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg") and "ground_truth" not in path.parts:
            Image.open(path).convert("L").save(out)
        else:
            out.write_bytes(path.read_bytes())
    return target


def dataset_dir(name: str, scratch: Path) -> Path:
    if name == "tire":
        return SHARED / "data" / "tire"
    if name == "ksdd":
        return SHARED / "data" / "ksdd"
    if name == "gray_tire":
        return gray_copy(SHARED / "data" / "tire", scratch / "gray" / "tire")
    if name == "demo":
        return generate_demo_dataset(scratch / "demo", seed=0)
    raise SystemExit(f"unknown data set {name!r}: tire, gray_tire, ksdd, demo")


def embed_all(model, paths, preprocessor, settings) -> tuple[list[torch.Tensor], float]:
    """Position-major embeddings of every readable image, per batch, and seconds spent."""
    embeddings, seconds = [], 0.0
    for batch in ImageBatches(paths, preprocessor, settings.BATCH_SIZE, 0):
        started = time.perf_counter()
        embedding, grid = model.embed(batch.images)
        seconds += time.perf_counter() - started
        embeddings.append(embedding.cpu())
    return embeddings, seconds


def maps_of(model, embeddings, size, score=None) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(maps, seconds in the score, patch scores) of every batch: through `embedding_scores`, or
    through `score(embedding)` for the candidates that are not settings."""
    maps, patches, seconds = [], [], 0.0
    for embedding in embeddings:
        started = time.perf_counter()
        patch = model.embedding_scores(embedding, model.mean_, model.cholesky_) if score is None else score(embedding)
        seconds += time.perf_counter() - started
        patches.append(patch)
        maps.append(model.map_maker(patch.view(-1, *model.grid_size_), size))
    return torch.cat(maps), seconds, torch.cat(patches)


def gaussian_tail(distance: torch.Tensor, dim: int) -> torch.Tensor:
    """-log10 P(chi2_d >= M^2), by the Wilson-Hilferty normal approximation (no underflow)."""
    ratio = (distance.double().square() / dim).pow(1 / 3)
    z = (ratio - (1 - 2 / (9 * dim))) / math.sqrt(2 / (9 * dim))
    return (-torch.special.log_ndtr(-z) / math.log(10)).float()


def score_timings(model, embeddings, repeats: int) -> dict[str, float]:
    """Least ms per image of each shipped variant's `embedding_scores` over the test embeddings,
    the variants interleaved `repeats` times: the least of several runs is the figure a shared,
    loaded machine disturbs least, and interleaving exposes every variant to the same load."""
    images = sum(embedding.shape[1] for embedding in embeddings)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for kind, weight in VARIANTS:
            model.score_kind, model.chebyshev_weight = kind, weight
            started = time.perf_counter()
            for embedding in embeddings:
                model.embedding_scores(embedding, model.mean_, model.cholesky_)
            label = kind if kind != "hybrid" else f"hybrid w={weight}"
            best[label] = min(best.get(label, math.inf), 1000 * (time.perf_counter() - started) / images)
    return best


def measure(name: str, scratch: Path, overrides: list[str], with_candidates: bool = True, repeats: int = 5) -> dict:
    directory = dataset_dir(name, scratch)
    settings, _ = load([f"DATASET_DIR={directory}", "NUM_WORKERS=0", *overrides])
    (category,) = find_categories(directory)
    train, validation = split_validation(category, settings.VALIDATION_FRACTION, settings.SEED)
    model = build_model(settings)
    preprocessor = make_preprocessor(settings, train, model.stride)
    started = time.perf_counter()
    model.fit_images(batch.images for batch in ImageBatches(train, preprocessor, settings.BATCH_SIZE, 0))
    fit_seconds = time.perf_counter() - started
    items = category.test_images
    validation_embeddings, _ = embed_all(model, validation, preprocessor, settings)
    test_embeddings, embed_seconds = embed_all(model, [item.path for item in items], preprocessor, settings)
    size = preprocessor.size
    labels = np.array([item.is_defect for item in items])
    masks = np.stack([
        preprocessor.mask_tensor(read_mask(item.mask_path)).numpy() if item.mask_path else np.zeros(size, dtype=bool) for item in items
    ])
    masked = labels & np.array([item.mask_path is not None for item in items])
    good_pixels, defect_pixels = ~labels, masks & masked[:, None, None]
    dim, rate = model.feature_dim, settings.PIXEL_FALSE_REJECT_RATE
    distance, largest = deviations(torch.cat(validation_embeddings, dim=1), model.mean_, model.cholesky_, channel_max=True)
    result = {
        "data": name,
        "n_train": len(train),
        "n_validation": len(validation),
        "n_test_good": int((~labels).sum()),
        "n_test_defect": int(labels.sum()),
        "d": dim,
        "fit_seconds": fit_seconds,
        "embed_ms_per_image": 1000 * embed_seconds / len(items),
        # what the Chebyshev thresholds rest on: E[M^2] <= d and E[k_c^2] <= 1 for good patches
        "validation_mean_m2_over_d": float(distance.square().mean() / dim),
        "validation_share_beyond_k_sigma": {},
        "variants": [],
    }
    centered = torch.cat(validation_embeddings, dim=1) - model.mean_[:, None, :]
    sigma = torch.linalg.vector_norm(model.cholesky_, dim=2)[:, None, :]
    for k in (1.5, 2.0, 3.0, 4.0):
        result["validation_share_beyond_k_sigma"][str(k)] = {"share": float((centered.abs() >= k * sigma).float().mean()), "bound": 1 / k**2}
    del centered, distance, largest
    candidates = [
        ("gaussian tail -log10 P(chi2_d >= M^2) (not a setting)", lambda e: gaussian_tail(deviations(e, model.mean_, model.cholesky_)[0], dim)),
        *[(f"k-hybrid w={w} (not a setting)", lambda e, w=w: _k_hybrid(e, model, w)) for w in WEIGHTS_SWEPT],
        ("chebyshev, sigma^2 without epsilon (not a setting)", lambda e: _chebyshev_without_epsilon(e, model)),
    ]
    for kind, weight in VARIANTS:
        model.score_kind, model.chebyshev_weight = kind, weight
        label = kind if kind != "hybrid" else f"hybrid w={weight}"
        result["variants"].append(_variant(label, model, None, validation_embeddings, test_embeddings, size, labels, masks, good_pixels, defect_pixels, rate, len(items)))
    for entry, (label, milliseconds) in zip(result["variants"], score_timings(model, test_embeddings, repeats).items()):
        entry["score_ms_per_image"] = milliseconds  # the least of `repeats` interleaved runs, not the single run above
    model.score_kind, model.chebyshev_weight = "mahalanobis", 1.0
    for label, score in candidates if with_candidates else []:
        result["variants"].append(_variant(label, model, score, validation_embeddings, test_embeddings, size, labels, masks, good_pixels, defect_pixels, rate, len(items)))
    return result


def _chebyshev_without_epsilon(embedding: torch.Tensor, model) -> torch.Tensor:
    """The Chebyshev term with the training variance alone: sigma_c^2 = sum_j L_cj^2 - epsilon."""
    variance = torch.linalg.vector_norm(model.cholesky_, dim=2).square_().sub_(model.epsilon).clamp_min_(1e-12)
    k_squared = (embedding - model.mean_[:, None, :]).square_().div_(variance[:, None, :]).amax(dim=2)
    return chebyshev_term(k_squared).T.contiguous()


def _k_hybrid(embedding: torch.Tensor, model, weight: float) -> torch.Tensor:
    distance, largest = deviations(embedding, model.mean_, model.cholesky_, channel_max=True)
    return distance.mul_(weight).add_(largest.sqrt_(), alpha=1 - weight)


def _variant(label, model, score, validation_embeddings, test_embeddings, size, labels, masks, good_pixels, defect_pixels, rate, n_test) -> dict:
    validation_maps, _, _ = maps_of(model, validation_embeddings, size, score)
    test_maps, score_seconds, _ = maps_of(model, test_embeddings, size, score)
    maps = test_maps.numpy()
    curves = pixel_curves(masks, maps)
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    calibrated = calibrate(validation_maps, validation_maps.flatten(1).max(dim=1).values, 0.05, rate)["thresholds"]["pixel"]
    thresholds = {"validation": calibrated}
    if score is None:
        thresholds["chebyshev"] = model.bounded_pixel_threshold(rate)[0]
        thresholds.update({f"chebyshev at {swept}": model.bounded_pixel_threshold(swept)[0] for swept in RATES_SWEPT})
    policy = {
        name: {
            "threshold": level,
            "validation_good_share": float((validation_maps >= level).float().mean()),
            "test_good_share": float((maps[good_pixels] >= level).mean()),
            "defect_pixel_recall": float((maps[defect_pixels] >= level).mean()) if defect_pixels.any() else None,
        }
        for name, level in thresholds.items()
    }
    entry = {
        "variant": label,
        "image_rocauc": image_rocauc(labels, image_scores),
        "pixel_rocauc": pixel_auc(curves),
        "pro": pro_auc(curves, 0.3),
        "score_ms_per_image": 1000 * score_seconds / n_test,
        "pixel_thresholds": policy,
        "finite": bool(np.isfinite(maps).all() and torch.isfinite(validation_maps).all()),
    }
    print(f"  {label:52s} image {entry['image_rocauc']:.4f} pixel {entry['pixel_rocauc']:.4f} PRO {entry['pro']:.4f} "
          f"score {entry['score_ms_per_image']:.1f} ms/img", flush=True)
    return entry


def table(results: list[dict]) -> str:
    lines = [
        "| data | PADIM_SCORE | image ROCAUC | pixel ROCAUC | PRO | score ms/img | Chebyshev pixel threshold | good validation px above | good test px above | defect px above |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for entry in result["variants"]:
            cheb = entry["pixel_thresholds"].get("chebyshev")
            extra = (
                f"{cheb['threshold']:.6g} | {100 * cheb['validation_good_share']:.3g} % | {100 * cheb['test_good_share']:.3g} % | "
                + (f"{100 * cheb['defect_pixel_recall']:.3g} %" if cheb["defect_pixel_recall"] is not None else "n/a")
                if cheb else "— | — | — | —"
            )
            lines.append(
                f"| {result['data']} | {entry['variant']} | {entry['image_rocauc']:.4f} | {entry['pixel_rocauc']:.4f} | {entry['pro']:.4f} | "
                f"{entry['score_ms_per_image']:.1f} | {extra} |"
            )
    lines += ["", "| data | pixel threshold (Mahalanobis maps) | level | good validation px above | good test px above | defect px above |", "|---|---|---|---|---|---|"]
    for result in results:
        for name, entry in result["variants"][0]["pixel_thresholds"].items():
            if name == "chebyshev":
                continue
            recall = entry["defect_pixel_recall"]
            lines.append(
                f"| {result['data']} | {name if name != 'validation' else 'validation quantile'} | {entry['threshold']:.4g} | "
                f"{100 * entry['validation_good_share']:.3g} % | {100 * entry['test_good_share']:.3g} % | {'n/a' if recall is None else f'{100 * recall:.3g} %'} |"
            )
    lines += ["", "| data | train / validation / test good / test defect | d | fit s | backbone + embedding ms/img | validation mean M^2 / d | validation share of abs(x_c - mu_c) >= k sigma_c (k = 1.5, 2, 3, 4; bounds 44, 25, 11, 6.3 %) | validation px above the validation threshold (Mahalanobis) |",
              "|---|---|---|---|---|---|---|---|"]
    for result in results:
        shares = ", ".join(f"{100 * v['share']:.3g} %" for v in result["validation_share_beyond_k_sigma"].values())
        validation_share = result["variants"][0]["pixel_thresholds"]["validation"]["validation_good_share"]
        lines.append(
            f"| {result['data']} | {result['n_train']} / {result['n_validation']} / {result['n_test_good']} / {result['n_test_defect']} | {result['d']} | "
            f"{result['fit_seconds']:.1f} | {result['embed_ms_per_image']:.1f} | {result['validation_mean_m2_over_d']:.3f} | {shares} | {100 * validation_share:.3g} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="tire,gray_tire,ksdd,demo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "chebyshev")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing runs of each PADIM_SCORE (the least is reported)")
    parser.add_argument("--no-candidates", action="store_true", help="only the PADIM_SCORE settings (a shorter timing run)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings for every set (config.py defaults otherwise)")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in arguments.sets.split(","):
            print(f"{name}:", flush=True)
            results.append(measure(name, Path(scratch), arguments.overrides, not arguments.no_candidates, arguments.repeats))
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "results.json").write_text(json.dumps(results, indent=2))
    (arguments.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
