"""PatchCore's nearest-neighbour search alone: every distance vs the grouped (pruned) search.

    .venv/bin/python bench/neighbor_speed.py MODEL_DIR CATEGORY_DIR [--images 16] [--groups 0,64,128,256,512]

MODEL_DIR is a PatchCore model folder (train.py's, or bench/out/models/ours-...-patchcore-...);
the features of the first `--images` test images of CATEGORY_DIR are computed once, then each
search is timed on them (best of `--repeats`), with the backbone's own time on the same images
for scale. Both searches must return the same rows; the grouped one reports the share of the
coreset it read. `--groups 0` is the model's own grouping (GROUP_FACTOR x sqrt(K)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anomaly_model.coreset as coreset  # noqa: E402
from anomaly_model.store import load_model  # noqa: E402
from dataset_manager import ImageBatches, Preprocessor, find_categories  # noqa: E402


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("category_dir")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--groups", default="0,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-shares", default=str(coreset.DENSE_SHARE),
                        help="coreset.DENSE_SHARE values to try (1 = never a dense pass, the search before it existed)")
    args = parser.parse_args()
    model, description = load_model(Path(args.model_dir), "cpu")
    preprocessor = Preprocessor.from_description(description["preprocessing"])
    (category,) = find_categories(Path(args.category_dir))
    paths = [item.path for item in category.test_images][: args.images]
    images = torch.cat([batch.images for batch in ImageBatches(paths, preprocessor, len(paths), 0)])
    backbone = best_of(lambda: [None for _ in model.backbone_slices(images)], args.repeats)
    queries = model.embed(images)[0] - model.memory_mean_
    memory, count = model.memory_, len(paths)
    full = best_of(lambda: coreset.nearest_neighbors(queries, memory), args.repeats)
    _, expected = coreset.nearest_neighbors(queries, memory)
    print(f"{category.name}, {description['anomaly_model']['settings']['backbone']}: coreset {tuple(memory.shape)}, "
          f"{count} images, {len(queries)} patches, torch threads {torch.get_num_threads()}")
    print(f"backbone forward alone: {backbone / count * 1e3:.1f} ms/img; every distance: {full / count * 1e3:.1f} ms/img\n")
    print("| groups | DENSE_SHARE | ms/img | faster than every distance | coreset share read per patch | same rows |")
    print("|---|---|---|---|---|---|")
    read = []
    original = coreset.GroupedNeighbors._measure  # every product of the search goes through it

    def counting(self, queries, chosen, start, end, best, row, scratch=None):
        read.append(len(chosen) * (end - start))
        return original(self, queries, chosen, start, end, best, row, scratch)

    variants = [(int(g), float(share)) for g in args.groups.split(",") for share in args.dense_shares.split(",")]
    for groups, share in variants:
        coreset.DENSE_SHARE = share
        if groups:
            order, offsets = coreset.group_order(memory, groups)
            bank = memory[order].contiguous()
        else:
            order, offsets, bank = torch.arange(len(memory)), model.group_offsets_, memory
        index = coreset.GroupedNeighbors(bank, offsets)
        seconds = best_of(lambda: index(queries), args.repeats)
        coreset.GroupedNeighbors._measure = counting
        read.clear()
        _, rows = index(queries)
        coreset.GroupedNeighbors._measure = original
        same = bool(torch.equal(order[rows], expected))
        read_share = sum(read) / (len(queries) * len(memory))
        print(f"| {len(offsets) - 1}{' (model)' if not groups else ''} | {share:g} | {seconds / count * 1e3:.1f} | {full / seconds:.1f}x | "
              f"{read_share * 100:.1f} % | {same} |")


if __name__ == "__main__":
    main()
