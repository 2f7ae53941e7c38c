"""Which rows go into which micro-batch of which optimizer step: a pure function of the seed.

Resuming at step k only needs k: the order is recomputed, never stored, so it continues exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MEGABATCH_STEPS = 50  # group_by_length sorts within windows of this many steps, like HF's sampler


@dataclass
class BatchPlan:
    lengths: list[int]
    micro_batch_size: int
    gradient_accumulation: int
    seed: int
    group_by_length: bool = False
    shuffle: bool = True

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.lengths) / self.rows_per_step))

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps else max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.lengths), generator=g).tolist()
        else:
            order = list(range(len(self.lengths)))
        if not self.group_by_length:
            return order
        window = self.rows_per_step * MEGABATCH_STEPS
        grouped: list[int] = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            grouped += sorted(chunk, key=lambda i: -self.lengths[i])
        return grouped

    def step_rows(self, step: int) -> list[list[int]]:
        """The micro-batches (lists of row indices) of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        rows = order[index * self.rows_per_step:(index + 1) * self.rows_per_step]
        if not rows:  # a last partial epoch: wrap around rather than yield an empty step
            rows = order[:self.rows_per_step]
        return [rows[i:i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest row; padded labels are ignored (-100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One padding-free row: sequences concatenated, positions restarting at each sequence.

    transformers turns restarting position_ids (with no attention_mask) into a block-diagonal
    causal mask, so no sequence sees another. The first label of each sequence is masked so the
    last token of one sequence is not trained to predict the first token of the next.
    """
    ids, labels, positions = [], [], []
    for r in rows:
        ids += r["input_ids"]
        labels += [-100] + list(r["labels"][1:])
        positions += range(len(r["input_ids"]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def trained_tokens(rows: list[dict]) -> int:
    """Tokens that carry loss: labels after the causal shift, as the model's loss counts them."""
    return sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)


def split_by_tokens(rows: list[dict], max_tokens: int) -> list[list[dict]]:
    """Cut a micro-batch, in order, into as few parts as keep each under `max_tokens` tokens, of
    near-equal size (a row longer than that is a part of its own). The loop divides every part's
    loss by the whole step's trained tokens, so the step's gradient does not change."""
    total = sum(len(r["input_ids"]) for r in rows)
    if total <= max_tokens or len(rows) < 2:
        return [rows]
    target = total / math.ceil(total / max_tokens)
    parts, part, size = [], [], 0
    for r in rows:
        n = len(r["input_ids"])
        if part and (size + n > max_tokens or size + n / 2 > target):
            parts.append(part)
            part, size = [], 0
        part.append(r)
        size += n
    parts.append(part)
    return parts
