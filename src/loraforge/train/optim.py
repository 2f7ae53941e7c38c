"""Optimizer and learning-rate schedule for the adapter parameters."""
from __future__ import annotations

import math

import torch

from loraforge.config import TrainSettings


def build_optimizer(params, cfg: TrainSettings, device: str) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # The fused CUDA kernel updates every adapter tensor in one launch.
        return torch.optim.AdamW(params, fused=device.startswith("cuda"), **kw)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optimizer]
    return cls(params, **kw)


def warmup_steps(cfg: TrainSettings, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def build_scheduler(optimizer, cfg: TrainSettings, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.lr_scheduler))
