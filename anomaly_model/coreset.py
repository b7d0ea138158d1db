"""PatchCore's memory-bank arithmetic: the greedy k-center coreset and exact nearest neighbours.

Coreset (Roth et al. 2022, Algorithm 1): starting from one seeded random point, repeatedly add
the bank point farthest from every point chosen so far, measured on a seeded random projection
of the features (dimension PATCHCORE_PROJECTION_DIM, 128 in the paper). The selection is exact;
only the work per step differs from a straightforward loop:

* squared distances throughout (same argmax), with the squared norms computed once:
  |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the projected bank is centred first so that this expansion
  loses no precision;
* on the GPU ("dense"), one fused pass per step into preallocated buffers, no host synchronisation;
* on the CPU ("blocked", the default there), lazily by blocks of bank rows. A point's distance to
  its nearest chosen point only shrinks as points are chosen, so a block's largest distance as
  last measured is an upper bound of its largest distance now. Each step brings up to date only
  the block with the highest bound, against every point chosen since that block was last
  measured (one matrix product of a cache-sized block by those points, instead of one pass over
  the whole bank per chosen point); once the block brought up to date still has the highest
  bound, its farthest point is the farthest of the bank. A pass over the bank per step is bound
  by memory bandwidth (196,000 x 128 float32 = 100 MB, ~10 ms); the same arithmetic as matrix
  products of a block by tens of points runs near the core's arithmetic speed, and blocks whose
  bound is below the current radius are not read at all. It does not depend on how the data is
  spread: the triangle-inequality test of "pruned" lets almost every point through on
  homogeneous gray parts (ksdd: ~20 points per second against ~1,000 here, bench/coreset_speed.py);
* "pruned" (the previous CPU default, kept for comparison): the triangle inequality skips points
  that cannot get closer: a point i whose nearest center a(i) is at squared distance D_i
  satisfies |i - c| >= |a(i) - c| - |i - a(i)|, so when |a(i) - c|^2 >= 4 D_i the new center c
  cannot be closer than a(i) and i is not touched.

Nearest neighbours: the distance of each query to its nearest coreset point, exactly.
`nearest_neighbors` computes every distance, as blocked matrix products (`NEIGHBOR_BLOCK`
elements at a time, so memory stays bounded). `GroupedNeighbors` gives the same answer reading
far fewer coreset points: the coreset is kept in groups around its first (farthest-first) points,
and the triangle inequality skips every group that cannot hold a query's nearest point.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from anomaly_model.errors import ModelError
from anomaly_model.threads import cpu_threads

# Query x coreset distance elements computed at once (float32: 64 MB): large enough for fast
# matrix products, small enough that scoring memory does not grow with the coreset.
NEIGHBOR_BLOCK = 16 * 1024 * 1024
# CPU threads of the pruned selection. Its steps are many small operations on arrays of a few
# MB; on this 2-core machine shared with other jobs, two threads made them 7x slower than one
# (OpenMP barriers waiting for a descheduled thread: 734 s against 100 s for 3000 steps on
# tire's Wide-ResNet bank; bench/coreset_speed.py --threads 1,2), and on an idle machine a second
# thread gains little.
PRUNED_THREADS = 1
# Bank rows per block of the blocked selection: 2048 x 128 float32 = 1 MB, the L2 cache of one
# core here, and few enough blocks (96 for ksdd's 196,000 patches) that the per-step bookkeeping
# stays far below the matrix product's time.
SELECTION_BLOCK = 2048
# Chosen points a block is measured against in one matrix product (bounds its scratch memory:
# 2048 x 1024 float32 = 8 MB) when it was not brought up to date for many steps.
SELECTION_CHUNK = 1024
# CPU threads of the blocked selection. Its matrix products are small (a 1 MB block by tens to
# hundreds of points); on this 2-core machine shared with other jobs, two threads made the whole
# ksdd selection 5x slower than one (132 s against 25 s; bench/coreset_speed.py --threads 1,2).
BLOCKED_THREADS = 1


def projection_matrix(in_dim: int, out_dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(in_dim, out_dim) seeded Gaussian random projection, scaled by 1/sqrt(out_dim) so that
    distances are kept on average (Johnson-Lindenstrauss), generated on the CPU so every device
    gets the same matrix."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)).to(device)


def coreset_size(n_points: int, ratio: float) -> int:
    """Points a CORESET_RATIO keeps of a bank of `n_points`: ceil(ratio * n), at least 1."""
    return max(1, min(n_points, math.ceil(ratio * n_points - 1e-9)))


@dataclass
class SelectionStats:
    """What a selection read, for bench/coreset_speed.py: bank rows measured (each against one
    or more chosen points) and steps taken."""

    rows_touched: int = 0
    steps: int = 0
    products: int = 0  # matrix products of a block (or the bank) by chosen points


def greedy_coreset(
    points: torch.Tensor, count: int, start: int, method: str = "auto", progress: bool = True, stats: SelectionStats | None = None
) -> torch.Tensor:
    """Indices (count,) of the greedy k-center selection on `points` (N, d), in selection order,
    starting from index `start`: each next point is the one farthest from all chosen so far.

    `method`: "dense" (one full pass per step: the GPU's), "blocked" (lazy block updates: the
    CPU's), "pruned" (triangle-inequality skipping), or "auto" (by the points' device). All give
    the same selection (up to float32 rounding between points at equal distance). `stats`, if
    given, is filled with what the selection read."""
    n_points = points.shape[0]
    if not 1 <= count <= n_points:
        raise ModelError(f"a coreset of {count} points cannot be chosen from {n_points}")
    if not 0 <= start < n_points:
        raise ValueError(f"start index {start} outside 0..{n_points - 1}")
    if method == "auto":
        method = "blocked" if points.device.type == "cpu" else "dense"
    if method not in SELECTIONS:
        raise ValueError(f"coreset method {method!r}: one of auto, {', '.join(SELECTIONS)}")
    points = points.float()
    points = (points - points.mean(dim=0)).contiguous()  # distances unchanged, the expansion stays precise
    norms = (points * points).sum(dim=1)
    bar = tqdm(total=count, desc="coreset", unit="pt", file=sys.stderr, disable=not progress, mininterval=1.0)
    stats = stats if stats is not None else SelectionStats()
    with cpu_threads(_cpu_threads(method), points.device), torch.no_grad(), bar:
        return SELECTIONS[method](points, norms, count, start, bar, stats)


def _select_dense(points: torch.Tensor, norms: torch.Tensor, count: int, start: int, bar, stats: SelectionStats) -> torch.Tensor:
    """One pass over the bank per step, into preallocated buffers; no host synchronisation, so a
    GPU runs the steps back to back."""
    selected = torch.empty(count, dtype=torch.long, device=points.device)
    nearest = torch.empty_like(norms)  # squared distance of each point to its nearest chosen point
    scratch = torch.empty_like(norms)
    center = torch.empty(1, points.shape[1], device=points.device)
    chosen = torch.tensor([start], device=points.device)
    for step in range(count):
        selected[step : step + 1].copy_(chosen)
        torch.index_select(points, 0, chosen, out=center)
        target = nearest if step == 0 else scratch
        torch.addmv(norms, points, center[0], alpha=-2.0, out=target)
        target.add_(norms.index_select(0, chosen))
        if step:
            torch.minimum(nearest, scratch, out=nearest)
        torch.argmax(nearest, dim=0, keepdim=True, out=chosen)
        if step % 256 == 255:
            bar.update(256)
    bar.update(count - bar.n)
    stats.rows_touched += count * len(points)
    stats.steps += count
    stats.products += count
    return selected


def _select_pruned(points: torch.Tensor, norms: torch.Tensor, count: int, start: int, bar, stats: SelectionStats) -> torch.Tensor:
    """Triangle-inequality skipping: each step reads the per-point (nearest center, 4 x squared
    distance) arrays and only the bank rows of the points the new center may be closer to."""
    n_points, dim = points.shape
    selected = torch.empty(count, dtype=torch.long)
    centers = torch.empty(count, dim)  # the chosen points, contiguous: center-to-center distances
    center_norms = torch.empty(count)
    center_distances = torch.empty(count)  # squared distance of each chosen point to the new one
    owner = torch.zeros(n_points, dtype=torch.long)  # which chosen point each point is nearest to (int64: faster gathers)
    bound = torch.empty(n_points)  # squared distance of each point's owner to the new center
    candidate = torch.empty(n_points, dtype=torch.bool)
    quadruple = torch.empty(n_points)  # 4 x squared distance to the nearest chosen point
    chosen = start
    for step in range(count):
        vector, norm = points[chosen], norms[chosen]
        selected[step], centers[step], center_norms[step] = chosen, vector, norm
        if step == 0:
            torch.addmv(norms, points, vector, alpha=-2.0, out=quadruple)
            quadruple.add_(norm).mul_(4.0)
        else:
            torch.addmv(center_norms[:step], centers[:step], vector, alpha=-2.0, out=center_distances[:step])
            center_distances[:step].add_(norm)
            torch.index_select(center_distances, 0, owner, out=bound)
            torch.lt(bound, quadruple, out=candidate)
            indices = candidate.nonzero().squeeze(1)
            stats.rows_touched += len(indices)
            distances = torch.addmv(norms.index_select(0, indices), points.index_select(0, indices), vector, alpha=-2.0)
            distances.add_(norm).mul_(4.0)
            closer = distances < quadruple.index_select(0, indices)
            moved = indices[closer]
            quadruple.index_copy_(0, moved, distances[closer])
            owner.index_fill_(0, moved, step)
        chosen = int(torch.argmax(quadruple))
        if step % 256 == 255:
            bar.update(256)
    bar.update(count - bar.n)
    stats.rows_touched += n_points
    stats.steps += count
    stats.products += count
    return selected


def _select_blocked(points: torch.Tensor, norms: torch.Tensor, count: int, start: int, bar, stats: SelectionStats) -> torch.Tensor:
    """Lazy block updates (module docstring): `nearest` holds each point's squared distance to
    the chosen points its block was measured against (`measured[b]` of them, the first ones), and
    `bound[b]` the block's largest such distance, an upper bound of its largest distance now."""
    n_points, dim = points.shape
    block = SELECTION_BLOCK
    n_blocks = -(-n_points // block)
    selected = torch.empty(count, dtype=torch.long)
    centers = torch.empty(count, dim)  # the chosen points, in order
    center_norms = torch.empty(count)
    nearest = torch.full((n_points,), math.inf)
    bound = np.full(n_blocks, np.inf)  # small arrays: numpy's per-call cost is a few times torch's lower
    measured = np.zeros(n_blocks, dtype=np.int64)
    chosen = start
    for step in range(count):
        selected[step] = chosen
        centers[step], center_norms[step] = points[chosen], norms[chosen]
        if step == count - 1:
            break
        while True:
            number = int(bound.argmax())
            first, last = number * block, min(n_points, (number + 1) * block)
            rows, row_norms, row_nearest = points[first:last], norms[first:last], nearest[first:last]
            for c0 in range(int(measured[number]), step + 1, SELECTION_CHUNK):
                c1 = min(step + 1, c0 + SELECTION_CHUNK)
                distances = torch.addmm(center_norms[c0:c1], rows, centers[c0:c1].T, alpha=-2.0).amin(dim=1)
                torch.minimum(row_nearest, distances.add_(row_norms), out=row_nearest)
                stats.products += 1
            stats.rows_touched += last - first
            measured[number] = step + 1
            value, where = row_nearest.max(dim=0)
            bound[number] = float(value)
            if bound[number] >= bound.max():  # still the highest bound: its farthest point is the bank's
                chosen = first + int(where)
                break
        if step % 256 == 255:
            bar.update(256)
    bar.update(count - bar.n)
    stats.steps += count
    return selected


SELECTIONS = {"dense": _select_dense, "blocked": _select_blocked, "pruned": _select_pruned}


def _cpu_threads(method: str) -> int:
    """CPU threads a selection runs with (the module's constants read when called, so that a
    benchmark may change them); the dense pass keeps the caller's."""
    return {"pruned": PRUNED_THREADS, "blocked": BLOCKED_THREADS}.get(method, torch.get_num_threads())


def nearest_neighbors(
    queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance (Q,), index (Q,)) of each query's nearest bank row, exact Euclidean distance.

    `bank_norms` are the bank rows' squared norms; +inf there excludes a row (out-of-fold
    scoring excludes a fold's points this way, without copying the bank). Computed as
    |q|^2 + min_j (|b_j|^2 - 2 q.b_j) in blocks of `NEIGHBOR_BLOCK` elements."""
    if bank_norms is None:
        bank_norms = (bank * bank).sum(dim=1)
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    best = torch.full((n_queries,), math.inf, device=queries.device)
    index = torch.zeros(n_queries, dtype=torch.long, device=queries.device)
    bank_step = max(1, min(n_bank, NEIGHBOR_BLOCK // 1024))
    query_step = max(1, NEIGHBOR_BLOCK // bank_step)
    scratch = torch.empty(min(query_step, n_queries), min(bank_step, n_bank), device=queries.device)
    with torch.no_grad():
        for q0 in range(0, n_queries, query_step):
            block = queries[q0 : q0 + query_step]
            for b0 in range(0, n_bank, bank_step):
                rows = bank[b0 : b0 + bank_step]
                products = scratch[: block.shape[0], : rows.shape[0]]
                torch.addmm(bank_norms[b0 : b0 + bank_step], block, rows.T, alpha=-2.0, out=products)
                values, where = products.min(dim=1)
                better = values < best[q0 : q0 + query_step]
                best[q0 : q0 + query_step] = torch.where(better, values, best[q0 : q0 + query_step])
                index[q0 : q0 + query_step] = torch.where(better, where + b0, index[q0 : q0 + query_step])
        best += (queries * queries).sum(dim=1)
    return best.clamp_min_(0).sqrt_(), index


# Groups of the coreset for `GroupedNeighbors`: GROUP_FACTOR x sqrt(K) of them (256 for tire's
# 16,464-point coreset). More groups prune more finely but cost more small matrix products.
GROUP_FACTOR = 2.0
# Rows per query measured exactly, of those the fast expansion |m|^2 - 2 q.m ranks nearest
# (`nearest_candidate`): its float32 rounding (about 1e-7 of |q| |m|) can put a row that is nearly
# as near first; among a few candidates the exact distances pick the true one.
NEIGHBOR_CANDIDATES = 4
# Relative slack on the triangle-inequality test, so float32 rounding in the distances can never
# skip a group holding the nearest point; it only lets a few more groups through.
PRUNE_SLACK = 1e-3
# A query whose triangle-inequality bounds leave more than this share of the coreset to read is
# measured against every row in a few large products instead: on homogeneous parts (ksdd's gray
# patches) the bounds rule out almost nothing, and the per-group products then cost several times
# one dense pass (bench/neighbor_speed.py: 0.25 is about where the two cost the same on tire).
# Same rows either way: both measure their best candidates exactly.
DENSE_SHARE = 0.25
# Chunk of the dense pass: DENSE_QUERIES x DENSE_ROWS float32 products (16 MB, reused), bank chunks
# of 4096 x 128 float32 = 2 MB that stay in cache; one product over the whole coreset, allocated
# anew each time, made the dense pass about 1.5x slower on ksdd's MobileNetV2 bank.
DENSE_QUERIES = 1024
DENSE_ROWS = 4096


def group_order(coreset: torch.Tensor, groups: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(order (K,), offsets (G+1,)): the coreset rows regrouped around its first G rows (the
    greedy selection's first, farthest-apart points), each row in the group of its nearest such
    center, the center first. `coreset[order]` is what `GroupedNeighbors` reads."""
    count = len(coreset)
    groups = groups or min(count, max(1, round(GROUP_FACTOR * math.sqrt(count))))
    _, parent = nearest_neighbors(coreset, coreset[:groups])
    parent[:groups] = torch.arange(groups, device=parent.device)  # a center is its own group's first row
    is_member = (torch.arange(count, device=parent.device) >= groups).long()
    order = torch.argsort(parent * 2 + is_member, stable=True)
    offsets = [0] + torch.bincount(parent, minlength=groups).cumsum(0).tolist()
    return order, offsets


def nearest_candidate(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance (Q,), column (Q,)) of the nearest of each query's candidate rows `candidates` (Q, C)
    of `bank`, measured from the differences (no expansion, no cancellation): what the grouped
    search and the exported graph (`patchcore.PatchCoreScores`) both decide with."""
    exact = torch.stack([torch.linalg.vector_norm(queries - bank[column], dim=1) for column in candidates.T], dim=1)
    distances, column = exact.min(dim=1)
    return distances, column


class GroupedNeighbors:
    """Exact nearest row of `bank` (K, D) for each query, for a bank ordered by `group_order`.

    Group g holds rows offsets[g] .. offsets[g+1]-1, its first row being its center c_g, and
    radius rho_g = the largest distance of a member to c_g. A query at distance D_g from c_g has
    every member of g at least D_g - rho_g away; once a row at distance u is known (the nearest
    center to begin with, then the best in the query's own group), a group with D_g - rho_g > u
    cannot hold a nearer row and is skipped. Same distances as `nearest_neighbors`, fewer read
    (on tire, Wide-ResNet seeded: about a tenth of the coreset per query with 256 groups). A query
    the bounds leave more than DENSE_SHARE of the coreset to read is measured against every row
    in a few large products instead (`_search_densely`: ksdd's gray patches).

    Bank and queries must be centred (minus the bank's mean, as the models store and query it):
    the distances come from |q|^2 - 2 q.c + |c|^2, whose float32 rounding PRUNE_SLACK covers at that
    scale; 100 units off centre it exceeds distances of 1e-4 and a group holding the nearest row
    could be skipped.
    """

    def __init__(self, bank: torch.Tensor, offsets: list[int]) -> None:
        self.bank = bank
        self.offsets = list(offsets)
        self.norms = (bank * bank).sum(dim=1)
        starts = torch.tensor(self.offsets[:-1], device=bank.device)
        self.centers = bank.index_select(0, starts)
        self.center_norms = self.norms.index_select(0, starts)
        self.center_rows = starts
        self.radius = torch.stack([
            (bank[start:end] - bank[start]).norm(dim=1).max() for start, end in zip(self.offsets[:-1], self.offsets[1:])
        ])
        self.sizes = torch.tensor(self.offsets, device=bank.device).diff().to(bank.dtype)  # (G,) rows per group
        count = len(bank)
        self.chunks = [(start, min(start + DENSE_ROWS, count)) for start in range(0, count, DENSE_ROWS)]  # the dense pass's

    def __call__(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance (Q,), row (Q,)) of each query's nearest bank row."""
        step = max(1, NEIGHBOR_BLOCK // (4 * len(self.offsets)))
        parts = [self._search(queries[start : start + step]) for start in range(0, len(queries), step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def search_traced(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`__call__` for a traced graph: every query at once (the traced batch is free), the groups
        a query cannot reach skipped by data-dependent selections (NonZero in ONNX), not by Python tests."""
        return self._search(queries, traced=True)

    def _search(self, queries: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`traced`: the same search written for a traced graph (`patchcore.PatchCoreScores`, the
        ONNX export): no Python test on the data (a traced `if` would freeze the example's answer),
        each query's own group chosen by a mask per group instead of one sort, and empty selections
        computed through (onnxruntime runs an empty matrix product in no time)."""
        query_norms = (queries * queries).sum(dim=1)
        to_centers = torch.addmm(self.center_norms, queries, self.centers.T, alpha=-2.0)
        to_centers = (to_centers + query_norms[:, None]).clamp_min(0).sqrt()  # (Q, G) distances
        _, own = to_centers.min(dim=1)
        # the nearest center's distance measured from the difference: the expansion's can be far too
        # small for a query almost on a center (cancellation, then a square root), and nearer rows
        # would then be rejected by `_update`'s comparison against it
        best = torch.linalg.vector_norm(queries - self.centers.index_select(0, own), dim=1)
        row = self.center_rows[own]
        # lower bound of every member's distance, group-major so each group's column is contiguous
        bounds = (to_centers - self.radius[None, :]).T.contiguous()
        del to_centers
        groups = len(self.offsets) - 1
        if traced:
            for group in range(groups):  # first each query's own group: a tight u for the rest
                self._update(queries, query_norms, (own == group).nonzero().squeeze(1), group, best, row)
        else:
            by_group = torch.argsort(own)
            counts = torch.bincount(own, minlength=groups).tolist()
            start = 0
            for group, count in enumerate(counts):  # first each query's own group: a tight u for the rest
                if count:
                    self._update(queries, query_norms, by_group[start : start + count], group, best, row)
                    start += count
        bounds = self._search_densely(queries, bounds, best, row, traced)
        for group in range(groups):
            limit = best * (1 + PRUNE_SLACK) + PRUNE_SLACK
            candidates = ((bounds[group] <= limit) & (own != group)).nonzero().squeeze(1)
            if traced or candidates.numel():
                self._update(queries, query_norms, candidates, group, best, row)
        return best, row

    def _search_densely(self, queries, bounds, best, row, traced: bool = False) -> torch.Tensor:
        """Measures the queries the bounds prune poorly (more than DENSE_SHARE of the rows left to
        read) against every row; returns `bounds` with theirs set to +inf, so the group loop skips them.

        The bank is read in chunks of DENSE_ROWS rows, each measured like a group (`_measure`): the
        chunks stay in cache and their products go into one reused scratch array. `traced`: all
        such queries at once, with no Python test on how many there are (the graph then holds the
        coreset twice, as the groups' and as the chunks' constants)."""
        limit = best * (1 + PRUNE_SLACK) + PRUNE_SLACK
        reads = self.sizes @ (bounds <= limit[None, :]).to(self.sizes.dtype)  # (Q,) rows each query would read
        dense = reads > DENSE_SHARE * len(self.bank)
        chosen = dense.nonzero().squeeze(1)
        if traced:
            for start, end in self.chunks:
                self._measure(queries, chosen, start, end, best, row)
        elif chosen.numel():
            scratch = torch.empty(min(DENSE_QUERIES, len(chosen)), min(DENSE_ROWS, len(self.bank)), device=queries.device)
            for first in range(0, len(chosen), DENSE_QUERIES):
                for start, end in self.chunks:
                    self._measure(queries, chosen[first : first + DENSE_QUERIES], start, end, best, row, scratch)
        return bounds.masked_fill(dense[None, :], math.inf)

    def _update(self, queries, query_norms, chosen, group, best, row) -> None:
        """Exact distances of queries `chosen` to the rows of `group`; keeps any nearer row found."""
        self._measure(queries, chosen, self.offsets[group], self.offsets[group + 1], best, row)

    def _measure(self, queries, chosen, start, end, best, row, scratch: torch.Tensor | None = None) -> None:
        """Exact distances of queries `chosen` to bank rows start..end-1 (the NEIGHBOR_CANDIDATES the
        expansion ranks first, measured by `nearest_candidate`); keeps any nearer row found. The
        expansion's products go into `scratch` when given (a reused array, no allocation)."""
        block = queries.index_select(0, chosen)
        if scratch is None:
            squared = torch.addmm(self.norms[start:end], block, self.bank[start:end].T, alpha=-2.0)
        else:
            squared = torch.addmm(self.norms[start:end], block, self.bank[start:end].T, alpha=-2.0,
                                  out=scratch[: len(chosen), : end - start])
        candidates = squared.topk(min(NEIGHBOR_CANDIDATES, end - start), dim=1, largest=False).indices
        distances, pick = nearest_candidate(block, self.bank[start:end], candidates)
        where = candidates.gather(1, pick[:, None]).squeeze(1)
        nearer = distances < best.index_select(0, chosen)
        chosen = chosen[nearer]
        best.index_copy_(0, chosen, distances[nearer])
        row.index_copy_(0, chosen, where[nearer] + start)


def continue_coreset(
    chosen: torch.Tensor, points: torch.Tensor, count: int, progress: bool = True
) -> tuple[torch.Tensor, float, float]:
    """The greedy k-center selection continued over new `points` (N, d) from an existing coreset
    `chosen` (K, d), both projected alike: each new point starts at its distance to the coreset,
    then at most `count` of them are picked, each the point farthest from everything chosen so far
    (fewer when every new point is already chosen or a duplicate). Returns (indices into `points`
    in selection order, the new points' covering radius before, and after): the radius is the
    largest distance of a new point to its nearest chosen point, the quantity the paper's
    guarantee bounds. One pass over the new points per pick (they are few: an update's images)."""
    with torch.no_grad():
        center = points.float().mean(dim=0)
        points = (points.float() - center).contiguous()
        nearest, _ = nearest_neighbors(points, (chosen.float() - center).contiguous())
        nearest = nearest.square_()
        before = float(nearest.max().sqrt()) if len(nearest) else 0.0
        norms = (points * points).sum(dim=1)
        picked: list[int] = []
        for _ in tqdm(range(min(count, len(points))), desc="coreset update", unit="pt", file=sys.stderr, disable=not progress, mininterval=1.0):
            index = int(nearest.argmax())
            if nearest[index] <= 0:
                break
            picked.append(index)
            distance = torch.addmv(norms, points, points[index], alpha=-2.0).add_(norms[index])
            torch.minimum(nearest, distance.clamp_min_(0), out=nearest)
            nearest[index] = 0.0
        after = float(nearest.max().sqrt()) if len(nearest) else 0.0
    return torch.tensor(picked, dtype=torch.long), before, after
