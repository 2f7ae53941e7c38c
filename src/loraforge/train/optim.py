"""Optimizer and learning-rate schedule for the adapter parameters."""
from __future__ import annotations

import functools
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
    return without_per_tensor_syncs(cls)(params, **kw)


@functools.lru_cache(maxsize=None)
def without_per_tensor_syncs(cls: type) -> type:
    """The bitsandbytes optimizer `cls` with a step that launches its per-tensor updates back to back.

    bitsandbytes' step synchronizes the device after every parameter tensor (256 a step for a LoRA on
    all of a 7B model's attention projections: milliseconds of host time while the device idles). The
    updates themselves are bitsandbytes' own (update_step), in the same order on the same stream, so
    they are ordered without it; paged states keep the one synchronize at the end that bitsandbytes
    does for them (their prefetches are asynchronous).
    """

    class NoSyncStep(cls):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            last = None
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    last = p
            if self.is_paged and last is not None and last.is_cuda:
                torch.cuda.synchronize(last.device)
            return loss

    NoSyncStep.__name__ = NoSyncStep.__qualname__ = cls.__name__
    return NoSyncStep


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
