"""What a layer checkpoint keeps beyond its input, so that its recompute does less (`train.keep_activations`).

Three things are costly to recompute and cheap to keep when the copy engine is idle anyway: a block's attention
output with its softmax statistics (the recompute then runs no attention forward), the stacked q/k/v projection
output (no q/k/v matmul) and the MLP's up-projection output (no up matmul). Kept tensors go where the
checkpoints go (offload.CheckpointStore: pinned CPU memory, copied on the side stream). `plan` decides per step:
- auto, checkpoints offloaded: a step of at least KEEP_MIN_TOKENS tokens (below, steps are bound by the host and
  copies cost host time) keeps, in that order, what the copy engine can move while a layer computes: the
  forward's FLOPs at ACHIEVED of the device's matmul rate, times the measured copy rate, less the checkpoints'
  own inputs. The first layers keep (the same ones each step: their pinned buffers are made once);
- auto, checkpoints on the device: the attention of long sequences only (sum L^2 / T >= KEEP_MIN_CONTEXT);
- on: everything, every layer; off: nothing.
A block keeps only where the host (or else the device) has room (offload.CheckpointStore.room_for).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

KEEP_MIN_TOKENS = 4096
KEEP_MIN_CONTEXT = 4096  # on the device: attention kept when sum(L^2)/T >= this
ACHIEVED = 0.7  # share of the measured matmul rate a layer's forward runs at (8B, 32k tokens, H200: ~0.68)
COPY_SHARE = 0.9  # of the copy engine's time in a forward that kept tensors (and the inputs) may take
KINDS = ("attention", "qkv", "up")  # in order of priority (FLOPs saved per byte copied)


@dataclass
class KeepPlan:
    """For one forward: how many of the first layers keep each kind."""
    layers: dict = field(default_factory=dict)

    def keeps(self, kind: str, layer: int) -> bool:
        return layer < self.layers.get(kind, 0)


def long_context(lengths: list[int]) -> bool:
    return sum(n * n for n in lengths) >= KEEP_MIN_CONTEXT * sum(lengths)


def plan(mode: str, offload: bool, lengths: list[int], arch, itemsize: int, rates=(0.0, 0.0),
         attention: bool = True) -> KeepPlan:
    """The KeepPlan of a step over sequences of `lengths` (see the module's docstring); `attention`: whether the
    attention kernel gives the statistics its backward needs (not per-sequence SDPA)."""
    n_layers = arch.num_hidden_layers
    kinds = KINDS if attention else KINDS[1:]
    if mode == "off":
        return KeepPlan()
    if mode == "on":
        return KeepPlan({k: n_layers for k in kinds})
    if not offload:
        return KeepPlan({"attention": n_layers} if attention and long_context(lengths) else {})
    tokens = sum(lengths)
    if tokens < KEEP_MIN_TOKENS:
        return KeepPlan()
    flops_per_s, copy_per_s = rates  # offload.device_rates
    h, heads = arch.hidden_size, arch.num_attention_heads
    d = getattr(arch, "head_dim", None) or h // heads
    kv = getattr(arch, "num_key_value_heads", None) or heads
    linear = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * arch.intermediate_size
    forward = (2 * linear * tokens + 2 * heads * d * sum(n * (n + 1) for n in lengths)) / (ACHIEVED * flops_per_s)
    budget = n_layers * (COPY_SHARE * forward * copy_per_s - 2 * tokens * h * itemsize)
    sizes = {"attention": tokens * heads * (d * itemsize + 4), "qkv": tokens * (heads + 2 * kv) * d * itemsize,
             "up": tokens * arch.intermediate_size * itemsize}
    layers = {}
    for kind in kinds:
        count = max(0, min(n_layers, int(budget // sizes[kind])))
        layers[kind] = count
        budget -= count * sizes[kind]
    return KeepPlan(layers)


class Memo:
    """What one checkpointed block keeps beyond its input (`keep`), and what its recompute takes back (`take`).

    In the recompute the block also skips its last projection's output, which nothing reads (see
    projection.LoRAProjections' `given`).
    """

    def __init__(self, plan: Optional[KeepPlan] = None, layer: int = 0, store=None, index: int = 0):
        self.plan, self.layer, self.store, self.index = plan or KeepPlan(), layer, store, index
        self.recomputing = False
        self.tensors: list[torch.Tensor] = []
        self.kinds: list[tuple[str, int]] = []  # (kind, number of tensors) in the order kept

    def keep(self, kind: str, tensors) -> None:
        """In the checkpoint's forward: keep `tensors` for the recompute, where the plan and the room allow."""
        if self.recomputing or not self.plan.keeps(kind, self.layer):
            return
        tensors = list(tensors)
        if self.store is None:
            self.tensors += tensors
        elif self.store.room_for(self.index, tensors):
            self.store.add(self.index, tensors)  # now: the copy out overlaps the rest of the block
        else:
            return  # no room: the recompute computes it again
        self.kinds.append((kind, len(tensors)))

    def take(self, kind: str) -> Optional[list]:
        """In the recompute: what the forward kept of `kind`, or None."""
        if not self.recomputing:
            return None
        start = 0
        for name, count in self.kinds:
            if name == kind:
                return self.tensors[start:start + count]
            start += count
        return None
