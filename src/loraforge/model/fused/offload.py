"""Half-layer checkpoints, optionally kept in pinned CPU memory (copied on a side stream, prefetched)."""
from __future__ import annotations

import functools
from typing import Optional

import torch


class Offloader:
    """Layer inputs kept in pinned CPU memory: copied out on a side stream in forward, copied back
    one layer ahead in backward. A new one is made for each forward."""

    def __init__(self, device):
        self.stream = _side_stream(device)
        self.device = device
        self.saved: list[list] = []

    def save(self, t: torch.Tensor) -> int:
        buf = _pinned_slot(len(self.saved), t)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(t, non_blocking=True)
        t.record_stream(self.stream)
        self.saved.append([buf, None, None])
        return len(self.saved) - 1

    def prefetch(self, index: int) -> None:
        if index < 0 or self.saved[index][0] is None or self.saved[index][1] is not None:
            return
        entry = self.saved[index]
        with torch.cuda.stream(self.stream):
            entry[1] = entry[0].to(self.device, non_blocking=True)
            entry[2] = torch.cuda.Event()
            entry[2].record(self.stream)

    def load(self, index: int) -> torch.Tensor:
        self.prefetch(index)
        entry = self.saved[index]
        current = torch.cuda.current_stream(self.device)
        current.wait_event(entry[2])
        t = entry[1]
        t.record_stream(current)
        self.saved[index] = [None, None, None]
        return t


@functools.lru_cache(maxsize=None)
def _side_stream(device):
    return torch.cuda.Stream(device)


_PINNED: dict[tuple, torch.Tensor] = {}
PINNED_MIN_TOKENS = 4096


def _pinned_slot(slot: int, t: torch.Tensor) -> torch.Tensor:
    """A pinned host buffer shaped like `t` for checkpoint number `slot`, reused across passes.

    Pinning memory is slow (and can stall the device), so each slot keeps its buffer and only grows,
    with headroom. Reuse is safe: every copy into or out of a slot runs on the one side stream, in
    program order.
    """
    need = t.numel()
    key = (slot, t.dtype)
    buf = _PINNED.get(key)
    if buf is None or buf.numel() < need:
        floor = PINNED_MIN_TOKENS * t.shape[-1] if t.dim() > 1 else need
        _PINNED[key] = buf = torch.empty(max(int(need * 1.25), floor), dtype=t.dtype, pin_memory=True)
    return buf[:need].view(t.shape)


class LayerCheckpoint(torch.autograd.Function):
    """Run a decoder layer without keeping its activations; recompute them in backward.

    Only the layer's input is kept (on the device, or in the Offloader). The LoRA parameters used
    inside get their gradients from the recomputed graph, accumulated into `.grad` directly. With
    `random` (LoRA dropout), the generator states are kept and restored for the recompute, so it
    draws the same dropout masks as the forward did (as torch.utils.checkpoint does).
    """

    @staticmethod
    def forward(ctx, h, run, offloader: Optional[Offloader], random: bool = False):
        ctx.run, ctx.offloader = run, offloader
        ctx.rng = _rng_state(h.device) if random else None
        if offloader is not None:
            ctx.index = offloader.save(h)
        else:
            ctx.save_for_backward(h)
        with torch.no_grad():
            return run(h)

    @staticmethod
    def backward(ctx, dout):
        if ctx.offloader is not None:
            h = ctx.offloader.load(ctx.index)
            ctx.offloader.prefetch(ctx.index - 1)  # the next layer back, while this one computes
        else:
            (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(True)
        if ctx.rng is None:
            with torch.enable_grad():
                out = ctx.run(h)
        else:
            before = _rng_state(h.device)
            _set_rng_state(ctx.rng, h.device)
            try:
                with torch.enable_grad():
                    out = ctx.run(h)
            finally:
                _set_rng_state(before, h.device)
        torch.autograd.backward(out, dout)
        ctx.run = ctx.rng = None
        return h.grad, None, None, None


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator a dropout on `device` draws from (that device's own; the CPU's for the CPU)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
