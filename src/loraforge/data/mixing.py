"""Held-out split and mixing of several sources, all deterministic in data.seed."""
from __future__ import annotations

import random
from array import array
from typing import Optional

from loraforge.errors import UserError


def held_out(sizes: list[int], fraction: float, size: Optional[int], seed: int) -> set[int]:
    """Rows held out from all sources together: `size` rows, or `fraction` of them (at least 1, always
    leaving one to train on). Rows are numbered across the sources in order (source 0's first); chosen
    from the sizes alone, before any row is read, so the rows can then be streamed once."""
    total = sum(sizes)
    if size is None and not fraction:
        return set()
    if size is None:  # a fraction: at least one row, and always leave one for training
        n = min(max(1, round(total * fraction)), total - 1)
        if n < 1:
            return set()
    else:
        n = size
    if n >= total:
        raise UserError(f"data.eval_size/eval_fraction asks for {n} held-out rows but there are only {total}; "
                        "leave rows for training.")
    order = array("q", range(total))  # 8 bytes a row; shuffled as a list of (source, row) pairs would be
    random.Random(seed).shuffle(order)
    return set(order[:n])


def mix(pools: list[array], weights: list[Optional[float]], mode: str, seed: int,
        size: Optional[int] = None) -> tuple[array, list[int]]:
    """Concatenate the pools, or (weighted) sample `size` rows, default all rows' count, with probability ∝ weight.

    Weighted sampling draws the source per row, then walks that source in a shuffled order,
    reshuffling when it runs out (so small sources repeat, large ones are subsampled).
    Pools and rows are row numbers (int arrays). Returns (rows, rows taken per source).
    """
    if mode == "concat":  # every row once, in source order (size does not apply)
        rows = array("q")
        for p in pools:
            rows.extend(p)
        return rows, [len(p) for p in pools]
    live = [i for i, p in enumerate(pools) if p]
    if not live:
        return array("q"), [0] * len(pools)
    w = [float(weights[i]) if weights[i] is not None else 1.0 for i in live]
    total = size if size is not None else sum(len(p) for p in pools)
    rng = random.Random(seed)
    orders = {i: [] for i in live}
    counts = [0] * len(pools)
    rows = array("q")
    for src in rng.choices(live, weights=w, k=total):
        if not orders[src]:
            order = list(range(len(pools[src])))
            rng.shuffle(order)
            orders[src] = order[::-1]
        rows.append(pools[src][orders[src].pop()])
        counts[src] += 1
    return rows, counts
