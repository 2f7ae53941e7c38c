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


@torch.no_grad()
def response_and_all_token_loss(model, rows: list[dict], batch_size: int, pad_id: int,
                                device) -> dict[str, tuple[float, int]]:
    """{"responses": (mean loss, tokens) over the trained tokens, "all": the same over every token after
    the first}, both from one forward pass per batch (two `mean_token_loss` calls would cost two)."""
    was_training = model.training
    model.eval()
    sums = {"responses": [0.0, 0], "all": [0.0, 0]}
    try:
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits[:, :-1].float()  # fp32, as transformers' own loss
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:],
                                                           reduction="none")
            del logits
            for name, counted in (("responses", batch["labels"][:, 1:] != -100),
                                  ("all", batch["attention_mask"][:, 1:].bool())):
                sums[name][0] += float(token_loss[counted].sum())
                sums[name][1] += int(counted.sum())
    finally:
        model.train(was_training)
    return {name: (total / count if count else float("nan"), count) for name, (total, count) in sums.items()}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
