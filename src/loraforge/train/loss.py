"""Token-weighted mean loss of a model over prepared rows (labels -100 are not counted)."""
from __future__ import annotations

import math

import torch

from loraforge.train.plan import collate, trained_tokens


@torch.no_grad()
def mean_token_loss(model, rows: list[dict], batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """(mean loss per trained token, number of trained tokens) over `rows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            n = trained_tokens(chunk)
            if n == 0:
                continue
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            out = model(**batch, num_items_in_batch=n, use_cache=False)
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
