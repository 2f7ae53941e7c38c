"""Half-layer checkpoints: where their inputs and what they keep besides (keep.Memo) are held - pinned CPU
memory, copied on a side stream and prefetched, or the device - and the recompute in backward, which skips
what was kept and the block's last projection output (never read)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

from loraforge.model.fused.keep import KeepPlan, Memo


class CheckpointStore:
    """Tensors the checkpoints of one forward keep for backward, by entry (one per checkpoint).

    With `offload` (CUDA), each tensor goes to a pinned CPU buffer on a side stream while compute goes on,
    and comes back one entry ahead in backward; where the host has no room left (`_pinned_slot`) it stays
    on the device. Without, entries hold the device tensors.
    """

    def __init__(self, device, offload: bool, tokens: int = 0):
        self.device, self.tokens = device, tokens
        self.offload = offload and device.type == "cuda"
        self.stream = _side_stream(device) if self.offload else None
        self.entries: list[list[list]] = []  # entry -> [[host buffer or None, device tensor or None, event], ...]

    def save(self, tensors) -> int:
        self.entries.append([])
        self.add(len(self.entries) - 1, tensors)
        return len(self.entries) - 1

    def add(self, index: int, tensors) -> None:
        items = self.entries[index]
        for t in tensors:
            buf = _pinned_slot((index, len(items)), t, self.tokens) if self.offload and t.numel() >= 4096 else None
            if buf is None:
                items.append([None, t, None])
                continue
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buf.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            items.append([buf, None, None])

    def room_for(self, index: int, tensors) -> bool:
        """Whether `tensors` (kept beyond the checkpoint's input, keep.Memo) fit when added to entry `index`:
        offloading, in pinned buffers that exist or the host can still pin (never on the device: keeping them
        must not cost device memory); else on the device with DEVICE_SPARE of it left free (measured now)."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.offload:
            first = len(self.entries[index])
            have = sum(b.numel() * b.element_size() for (slot, _), b in _PINNED.items()
                       if slot[0] == index and slot[1] >= first)
            return host_has_room(max(0, nbytes - have))
        if self.device.type != "cuda":
            return True
        free, total = torch.cuda.mem_get_info(self.device)
        return free - nbytes >= DEVICE_SPARE * total

    def prefetch(self, index: int) -> None:
        if index < 0:
            return
        for item in self.entries[index]:
            if item[0] is not None and item[1] is None:
                with torch.cuda.stream(self.stream):
                    item[1] = item[0].to(self.device, non_blocking=True)
                    item[2] = torch.cuda.Event()
                    item[2].record(self.stream)

    def load(self, index: int) -> list[torch.Tensor]:
        self.prefetch(index)
        out = []
        for item in self.entries[index]:
            if item[2] is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(item[2])
                item[1].record_stream(current)
            out.append(item[1])
        self.entries[index] = []
        return out


@functools.lru_cache(maxsize=None)
def _side_stream(device):
    return torch.cuda.Stream(device)


_PINNED: dict[tuple, torch.Tensor] = {}
_EVER_PINNED = [0]  # bytes of every pinned buffer made: torch's pinned-memory cache keeps the outgrown ones
PINNED_MIN_TOKENS = 16384
HOST_SHARE = 0.7  # of the memory available when the first buffer is pinned: at most this much is pinned
DEVICE_SPARE = 0.1  # without offload, kept tensors stay on the device only while this share of it stays free


def _pinned_slot(slot: tuple, t: torch.Tensor, tokens: int = 0) -> Optional[torch.Tensor]:
    """A pinned host buffer shaped like `t` for checkpoint tensor `slot`, reused across passes; None where
    the host has no room for it (the tensor then stays on the device).

    Pinning memory is slow (and can stall the device), so each slot keeps its buffer and only grows, to a
    power of two of bytes (the size torch's pinned-memory allocator takes anyway), at first to room for
    PINNED_MIN_TOKENS rows where `t` has one per token of the stream. Reuse is safe: every copy into or out of a
    slot runs on the one side stream, in program order.
    """
    need = t.numel()
    key = (slot, t.dtype)
    buf = _PINNED.get(key)
    if buf is None or buf.numel() < need:
        per_row = need // max(1, t.shape[0]) if t.dim() > 1 and t.shape[0] == tokens else 0
        nbytes = _pow2(need * t.element_size())
        roomy = _pow2(PINNED_MIN_TOKENS * per_row * t.element_size())
        if buf is None and roomy > nbytes and host_has_room(roomy):
            nbytes = roomy
        if not host_has_room(nbytes):
            return None
        _PINNED.pop(key, None)
        _PINNED[key] = buf = torch.empty(nbytes // t.element_size(), dtype=t.dtype, pin_memory=True)
        count_pinned(nbytes)
    return buf[:need].view(t.shape)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def count_pinned(nbytes: int) -> None:
    _EVER_PINNED[0] += nbytes


def pinned_bytes() -> int:
    return _EVER_PINNED[0]


def host_has_room(more: int, limit: Optional[int] = None) -> bool:
    """Whether `more` bytes can be pinned within `limit` (default: HOST_SHARE of what the host had available
    when this process first asked)."""
    return pinned_bytes() + more <= (limit if limit is not None else _host_limit())


@functools.lru_cache(maxsize=1)
def _host_limit() -> int:
    return int(HOST_SHARE * (_available_bytes() + pinned_bytes()))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=None)
def device_rates(device=None) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device -> pinned host bytes/s) of this GPU, measured once (~10 ms). The operands are
    made without the generator, which the LoRA dropout masks draw from."""
    n = 4096
    a = torch.arange(n * n, device=device or "cuda", dtype=torch.float32).sin_().view(n, n).to(torch.bfloat16)
    src = torch.empty(1 << 26, dtype=torch.uint8, device=a.device)
    dst = torch.empty(1 << 26, dtype=torch.uint8, pin_memory=True)
    count_pinned(dst.numel())
    times = []
    for work in (lambda: a @ a, lambda: dst.copy_(src, non_blocking=True)):
        work()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            work()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 5 / 1e3)
    return 2 * n ** 3 / times[0], src.numel() / times[1]


class LayerCheckpoint(torch.autograd.Function):
    """Run a half decoder layer without keeping its activations; recompute them in backward.

    Kept: the input (in `store`: device or pinned CPU memory) and what the block's Memo chose to keep. The
    LoRA parameters used inside get their gradients from the recomputed graph, accumulated into `.grad`
    directly. With `random` (LoRA dropout), the generator state is kept and restored for the recompute, so it
    draws the same dropout masks as the forward did (as torch.utils.checkpoint does).
    """

    @staticmethod
    def forward(ctx, h, run, store: CheckpointStore, random: bool = False, plan: Optional[KeepPlan] = None,
                layer: int = 0):
        ctx.run, ctx.store = run, store
        ctx.rng = _rng_state(h.device) if random else None
        ctx.index = store.save([h])
        memo = Memo(plan, layer, store, ctx.index)  # adds what it keeps to the entry of h
        with torch.no_grad():
            out = run(h, memo=memo)
        ctx.memo = memo
        return out

    @staticmethod
    def backward(ctx, dout):
        h, *kept = ctx.store.load(ctx.index)
        ctx.store.prefetch(ctx.index - 1)  # the next block back, while this one computes
        memo = ctx.memo
        memo.recomputing, memo.tensors = True, kept
        h = h.detach().requires_grad_(True)
        before = None
        if ctx.rng is not None:
            before = _rng_state(h.device)
            _set_rng_state(ctx.rng, h.device)
        try:
            with torch.enable_grad():
                out = ctx.run(h, memo=memo)
        finally:
            if before is not None:
                _set_rng_state(before, h.device)
        torch.autograd.backward(out, dout)
        ctx.run = ctx.rng = ctx.memo = None
        return h.grad, None, None, None, None, None


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator a dropout on `device` draws from (that device's own; the CPU's for the CPU)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
