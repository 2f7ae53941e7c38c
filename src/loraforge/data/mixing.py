"""Held-out split and mixing of several sources, all deterministic in data.seed."""
from __future__ import annotations

import random
from typing import Optional

from loraforge.errors import UserError


def carve_eval(pools: list[list], fraction: float, size: Optional[int], seed: int) -> tuple[list[list], list]:
    """Hold out rows from all sources together: `size` rows, or `fraction` of them (at least 1).

    Returns (train pools with the held-out rows removed, eval rows in a stable order).
    """
    total = sum(len(p) for p in pools)
    if size is None and not fraction:
        return pools, []
    if size is None:  # a fraction: at least one row, and always leave one for training
        n = min(max(1, round(total * fraction)), total - 1)
        if n < 1:
            return pools, []
    else:
        n = size
    if n >= total:
        raise UserError(f"data.eval_size/eval_fraction asks for {n} held-out rows but there are only {total}; "
                        "leave rows for training.")
    keys = [(i, j) for i, p in enumerate(pools) for j in range(len(p))]
    random.Random(seed).shuffle(keys)
    held = set(keys[:n])
    train = [[ex for j, ex in enumerate(p) if (i, j) not in held] for i, p in enumerate(pools)]
    eval_rows = [pools[i][j] for i, j in sorted(keys[:n])]
    return train, eval_rows


def mix(pools: list[list], weights: list[Optional[float]], mode: str, seed: int,
        size: Optional[int] = None) -> tuple[list, list[int]]:
    """Concatenate the pools, or (weighted) sample `size` rows, default all rows' count, with probability ∝ weight.

    Weighted sampling draws the source per row, then walks that source in a shuffled order,
    reshuffling when it runs out (so small sources repeat, large ones are subsampled).
    Returns (rows, rows taken per source).
    """
    if mode == "concat":  # every row once, in source order (size does not apply)
        return [ex for p in pools for ex in p], [len(p) for p in pools]
    live = [i for i, p in enumerate(pools) if p]
    if not live:
        return [], [0] * len(pools)
    w = [float(weights[i]) if weights[i] is not None else 1.0 for i in live]
    total = size if size is not None else sum(len(p) for p in pools)
    rng = random.Random(seed)
    orders = {i: [] for i in live}
    counts = [0] * len(pools)
    rows = []
    for src in rng.choices(live, weights=w, k=total):
        if not orders[src]:
            order = list(range(len(pools[src])))
            rng.shuffle(order)
            orders[src] = order[::-1]
        rows.append(pools[src][orders[src].pop()])
        counts[src] += 1
    return rows, counts
