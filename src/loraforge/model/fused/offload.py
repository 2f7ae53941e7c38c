"""Half-layer checkpoints: what each keeps (its input; for long sequences the attention output and softmax
statistics), where (pinned CPU memory, copied on a side stream and prefetched, or the device), and the
recompute in backward, which skips what was kept and the block's last projection output (never read)."""
from __future__ import annotations

import functools
from typing import Optional

import torch

KEEP_MIN_CONTEXT = 4096  # auto keeps attention when sum(L^2)/T >= this: recomputing costs more than copying


class CheckpointStore:
    """Tensors the checkpoints of one forward keep for backward, by entry (one per checkpoint).

    With `offload` (CUDA), each tensor goes to a pinned CPU buffer on a side stream while compute goes on,
    and comes back one entry ahead in backward; where the host has no room left (`_pinned_slot`) it stays
    on the device. Without, entries hold the device tensors.
    """

    def __init__(self, device, offload: bool):
        self.device = device
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
            buf = _pinned_slot((index, len(items)), t) if self.offload and t.numel() >= 4096 else None
            if buf is None:
                items.append([None, t, None])
                continue
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buf.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
            items.append([buf, None, None])

    def room_for(self, index: int, tensors) -> bool:
        """Whether `tensors` added to entry `index` fit: in pinned buffers that exist or the host can still
        pin, or else on the device with DEVICE_SPARE of it left free (measured now)."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.offload:
            first = len(self.entries[index])
            have = sum(b.numel() * b.element_size() for (slot, _), b in _PINNED.items()
                       if slot[0] == index and slot[1] >= first)
            if host_has_room(max(0, nbytes - have)):
                return True
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
PINNED_MIN_TOKENS = 4096
HOST_SHARE = 0.7  # of the memory available when the first buffer is pinned: at most this much is pinned
DEVICE_SPARE = 0.1  # kept attention stays on the device only while this share of its memory stays free


def _pinned_slot(slot: tuple, t: torch.Tensor) -> Optional[torch.Tensor]:
    """A pinned host buffer shaped like `t` for checkpoint tensor `slot`, reused across passes; None where
    the host has no room for it (the tensor then stays on the device).

    Pinning memory is slow (and can stall the device), so each slot keeps its buffer and only grows, to a
    power of two of bytes (the size torch's pinned-memory allocator takes anyway). Reuse is safe: every copy
    into or out of a slot runs on the one side stream, in program order.
    """
    need = t.numel()
    key = (slot, t.dtype)
    buf = _PINNED.get(key)
    if buf is None or buf.numel() < need:
        floor = PINNED_MIN_TOKENS * t.shape[-1] if t.dim() == 2 else need  # (tokens, hidden): room to grow
        nbytes = 1 << (max(need, floor) * t.element_size() - 1).bit_length()
        if not host_has_room(nbytes):
            return None
        _PINNED.pop(key, None)
        _PINNED[key] = buf = torch.empty(nbytes // t.element_size(), dtype=t.dtype, pin_memory=True)
        _EVER_PINNED[0] += nbytes
    return buf[:need].view(t.shape)


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


class Memo:
    """What one checkpointed block keeps beyond its input, and whether it is being recomputed.

    `keep` ('auto' | 'on' | 'off'): keep the attention output and statistics (auto: when the sequences are
    long enough that recomputing attention costs more than copying its output out and back). In the
    recompute the block also skips its last projection's output (offload.LayerCheckpoint only back-propagates
    through it), see projection.LoRAProjections.
    """

    def __init__(self, keep: str = "off", store: Optional[CheckpointStore] = None, index: int = 0):
        self.keep, self.store, self.index = keep, store, index
        self.recomputing = False
        self.tensors: list[torch.Tensor] = []
        self.attention: Optional[int] = None  # number of statistics tensors kept with the output

    def keep_attention(self, seg, out, aux) -> None:
        if self.keep == "off" or (self.keep == "auto" and not long_context(seg)):
            return
        if self.store is not None and not self.store.room_for(self.index, [out, *aux]):
            return  # no room on the host or the device: the recompute runs attention again
        self.tensors = [out, *aux]
        self.attention = len(aux)

    def take_attention(self):
        if self.attention is None or not self.tensors:
            return None
        out, *aux = self.tensors
        self.tensors, self.attention = [], None
        return out, tuple(aux)


def long_context(seg) -> bool:
    lengths = seg.lengths()
    return sum(n * n for n in lengths) >= KEEP_MIN_CONTEXT * sum(lengths)


class LayerCheckpoint(torch.autograd.Function):
    """Run a half decoder layer without keeping its activations; recompute them in backward.

    Kept: the input (in `store`: device or pinned CPU memory) and what the block's Memo chose to keep. The
    LoRA parameters used inside get their gradients from the recomputed graph, accumulated into `.grad`
    directly. With `random` (LoRA dropout), the generator state is kept and restored for the recompute, so it
    draws the same dropout masks as the forward did (as torch.utils.checkpoint does).
    """

    @staticmethod
    def forward(ctx, h, run, store: CheckpointStore, random: bool = False, keep: str = "off"):
        ctx.run, ctx.store = run, store
        ctx.rng = _rng_state(h.device) if random else None
        ctx.index = store.save([h])
        memo = Memo(keep, store, ctx.index)
        with torch.no_grad():
            out = run(h, memo=memo)
        if memo.tensors:
            store.add(ctx.index, memo.tensors)
            memo.tensors = []
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
        return h.grad, None, None, None, None


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator a dropout on `device` draws from (that device's own; the CPU's for the CPU)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
