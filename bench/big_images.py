"""Memory of tiled inspection of very large images: test.py's peak RSS against the image size and
the number of images, through the real scripts.

    .venv/bin/python bench/big_images.py [--size 6000] [--tile 224] [--train 3] [--tests 1,3]

Generates a synthetic web (a woven texture with noise, RGB JPEG, --size x --size px) with a few
small dark spots on the test images, trains a tiled model at the images' own resolution
(IMAGE_SIZE=1.0, TILE_SIZE=--tile, shared statistics, CLASSIFIER=False, MobileNetV2
imagenet-offline), then runs test.py (with pictures, NUM_WORKERS=0) on folders of each --tests
count. Each script runs in its own process and reports its peak RSS (VmHWM). Prints a markdown
table; the data and results stay in --out (default bench/out/big_images).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geometry import ROOT, run  # noqa: E402


def web(rng: np.random.Generator, size: int, spots: int) -> np.ndarray:
    """A woven-looking texture: two crossing sine gratings, fibre noise, and `spots` dark 12 px spots."""
    axis = np.arange(size, dtype=np.float32)
    warp = np.sin(axis * 0.9 + rng.uniform(0, 6.3))[None, :]
    weft = np.sin(axis * 0.7 + rng.uniform(0, 6.3))[:, None]
    gray = 150 + 30 * warp * weft + rng.normal(0, 8, (size, size)).astype(np.float32)
    for _ in range(spots):
        y, x = rng.integers(50, size - 50, 2)
        gray[y : y + 12, x : x + 12] = 40
    image = np.clip(gray, 0, 255).astype(np.uint8)
    return np.stack([image, (image * 0.95).astype(np.uint8), (image * 0.85).astype(np.uint8)], axis=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--train", type=int, default=3, help="good training images (one more is held out for thresholds)")
    parser.add_argument("--tests", default="1,3", help="test folder sizes to measure")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "big_images"))
    args = parser.parse_args()
    out = Path(args.out) / str(args.size)
    shutil.rmtree(out, ignore_errors=True)
    data = out / "data"
    rng = np.random.default_rng(0)
    for number in range(args.train):
        (data / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(web(rng, args.size, 0)).save(data / "train" / "good" / f"{number:03d}.jpg", quality=92)
    (data / "validation" / "good").mkdir(parents=True)
    Image.fromarray(web(rng, args.size, 0)).save(data / "validation" / "good" / "000.jpg", quality=92)
    counts = [int(c) for c in args.tests.split(",")]
    for count in counts:
        folder = out / f"test{count}"
        folder.mkdir(parents=True)
        for number in range(count):
            Image.fromarray(web(rng, args.size, 5)).save(folder / f"{number:03d}.jpg", quality=92)
    settings = [
        f"DATASET_DIR={data}", f"MODEL_DIR={out / 'models'}", f"RESULTS_DIR={out / 'results'}", "NUM_WORKERS=0", "CLASSIFIER=False",
        "BACKBONE=mobilenet_v2", "WEIGHTS=imagenet-offline", "IMAGE_SIZE=1.0", "CENTER_CROP=1.0",
        f"TILE_SIZE={args.tile}", f"TILE_OVERLAP={args.overlap}", "TILE_STATISTICS=shared", "MODEL_NAME=web",
    ]
    trained, seconds, peak = run("train.py", settings)
    if trained.returncode:
        sys.exit(trained.stderr)
    rows = [{"script": "train.py", "images": args.train + 1, "seconds": seconds, "peak_rss_gb": peak / 1e9, "line": trained.stdout.strip()}]
    print(trained.stdout.strip(), file=sys.stderr)
    for count in counts:
        tested, seconds, peak = run("test.py", [str(out / f"test{count}"), *settings])
        if tested.returncode:
            sys.exit(tested.stderr)
        scored = re.search(r"scored in ([\d.]+) s", tested.stdout)
        rows.append({"script": "test.py", "images": count, "seconds": float(scored.group(1)), "peak_rss_gb": peak / 1e9})
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"{args.size} x {args.size} images, tiles {args.tile} overlap {args.overlap}: {rows[0]['line']}")
    print("| script | images | s | peak RSS GB |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['script']} | {row['images']} | {row['seconds']:.1f} | {row['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
