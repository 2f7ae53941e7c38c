"""Attention kernels of the fused path: causal attention within each packed sequence, with the softmax
statistics (log-sum-exp) kept, and the matching backward from (q, k, v, out, statistics) alone.

The statistics are what let a layer checkpoint keep its attention output and skip the attention forward in
the recompute (attention.attend). Kernels, all through PyTorch's own ops (no kernel written here):
- `FlashKernel`: PyTorch's FlashAttention-2 varlen kernels over the whole stream (NVIDIA, Ampere on);
- `CudnnKernel`: PyTorch's cuDNN attention (torch.nn.attention's CUDNN_ATTENTION backend) for each sequence of
  at least `min_len` tokens, FlashAttention-2 for the rest. On Hopper cuDNN's kernels are the fast ones; its
  graphs are built per shape (~ms of host time each, once), so a long sequence is zero-padded at its end to
  one of 8 lengths per octave (causal: the padded rows and columns change nothing) and short ones stay varlen;
- `MathKernel`: explicit float32 softmax per sequence, for the CPU (the reference the tests compare against).
`choose_kernel` picks one for the machine and says why the faster one is off.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

CUDNN_MIN_LEN = 4096  # sequences at least this long go through cuDNN (docs/perf-notes.md: the crossover measured)


@dataclass
class Segments:
    """Sequence boundaries of a packed token stream."""
    bounds: list[int]          # [0, end_1, end_2, ..., T] on the host
    cu: torch.Tensor           # the same as int32 on the device
    max_len: int

    def lengths(self) -> list[int]:
        return [e - s for s, e in zip(self.bounds[:-1], self.bounds[1:])]


def segments(bounds: list[int], device) -> Segments:
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return Segments(bounds, cu, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))


class FlashKernel:
    """PyTorch's FlashAttention-2 varlen forward/backward over the whole stream (cu_seqlens, no padding)."""
    name = "flash"

    def forward(self, q, k, v, seg: Segments, scale: float):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, 0.0, True, False, scale=scale)
        return out, (lse, rng, unused)

    def backward(self, dout, q, k, v, out, aux, seg: Segments, scale: float):
        lse, rng, unused = aux
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, seg.cu, seg.cu, seg.max_len, seg.max_len, 0.0, True, rng, unused, scale=scale)


def padded_length(n: int) -> int:
    """n rounded up to one of 8 lengths per octave (at most 12.5% more; multiples of 128)."""
    step = 1 << max(7, n.bit_length() - 4)
    return -(-n // step) * step


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, 0, 0, rows - t.shape[0]))


class CudnnKernel:
    """cuDNN attention (dense, batch 1) for each sequence of >= min_len tokens; FlashAttention-2 varlen for the rest.

    `expand_kv`: repeat k/v heads to the query heads where this cuDNN refuses grouped-query attention.
    """
    name = "cudnn"

    def __init__(self, min_len: Optional[int] = None, expand_kv: bool = False):
        self.min_len = CUDNN_MIN_LEN if min_len is None else min_len
        self.expand_kv = expand_kv
        self.flash = FlashKernel()

    def pieces(self, seg: Segments) -> list[tuple]:
        """[(start, end, sub-Segments or None for a cuDNN sequence)], cached on the Segments object."""
        cached = getattr(seg, "_cudnn_pieces", None)
        if cached is not None and cached[0] == self.min_len:
            return cached[1]
        out, run = [], []
        for s, e in zip(seg.bounds[:-1], seg.bounds[1:]):
            if e - s >= self.min_len:
                if run:
                    out.append(run)
                    run = []
                out.append((s, e, None))
            else:
                run.append((s, e))
        if run:
            out.append(run)
        made = []
        for p in out:
            if isinstance(p, tuple):
                made.append(p)
            elif len(out) == 1:  # all short: the stream's own bounds (no new device tensor, no host sync)
                made.append((0, seg.bounds[-1], seg))
            else:  # a run of short sequences: one varlen call over its (contiguous) tokens
                s0 = p[0][0]
                made.append((s0, p[-1][1], segments([s0 - s0] + [e - s0 for _, e in p], seg.cu.device)))
        seg._cudnn_pieces = (self.min_len, made)
        return made

    def forward(self, q, k, v, seg: Segments, scale: float):
        pieces = self.pieces(seg)
        if len(pieces) == 1:
            s, e, sub = pieces[0]
            return self._forward_piece(q, k, v, sub, scale)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        aux = []
        for s, e, sub in pieces:
            o, a = self._forward_piece(q[s:e], k[s:e], v[s:e], sub, scale)
            out[s:e] = o
            aux += list(a)
        return out, tuple(aux)

    def backward(self, dout, q, k, v, out, aux, seg: Segments, scale: float):
        pieces = self.pieces(seg)
        if len(pieces) == 1:
            return self._backward_piece(dout, q, k, v, out, aux, pieces[0][2], scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i, (s, e, sub) in enumerate(pieces):
            g = self._backward_piece(dout[s:e], q[s:e], k[s:e], v[s:e], out[s:e], aux[3 * i:3 * i + 3], sub, scale)
            dq[s:e], dk[s:e], dv[s:e] = g
        return dq, dk, dv

    def _forward_piece(self, q, k, v, sub: Optional[Segments], scale):
        if sub is not None:
            return self.flash.forward(q, k, v, sub, scale)
        n = q.shape[0]
        rows = padded_length(n)
        q4, k4, v4 = (self._heads_first(_pad_rows(t, rows)) for t in self._kv(q, k, v))
        out4, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k4, v4, None, True, 0.0, True, False, scale=scale)
        return out4.transpose(1, 2)[0, :n], (lse, seed, offset)

    def _backward_piece(self, dout, q, k, v, out, aux, sub: Optional[Segments], scale):
        if sub is not None:
            return self.flash.backward(dout, q, k, v, out, aux, sub, scale)
        lse, seed, offset = aux
        n, rows = q.shape[0], lse.shape[2]
        qe, ke, ve = self._kv(q, k, v)
        q4, k4, v4, o4, d4 = (self._heads_first(_pad_rows(t, rows)) for t in (qe, ke, ve, out, dout))
        # None for the bias and the varlen offsets: the dense path (an undefined tensor in ATen).
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            d4, q4, k4, v4, o4, lse, seed, offset, None, None, None, rows, rows, 0.0, True, scale=scale)
        dq, dk, dv = (t.transpose(1, 2)[0, :n] for t in (dq, dk, dv))
        if self.expand_kv and k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            dk = dk.unflatten(1, (k.shape[1], g)).sum(2)
            dv = dv.unflatten(1, (k.shape[1], g)).sum(2)
        return dq, dk, dv

    def _kv(self, q, k, v):
        if self.expand_kv and k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return q, k, v

    @staticmethod
    def _heads_first(t: torch.Tensor) -> torch.Tensor:
        """(S, H, D) -> a (1, H, S, D) view of the same storage (cuDNN reads the strides)."""
        return t.unsqueeze(0).transpose(1, 2)


class MathKernel:
    """Explicit float32 softmax per sequence, with its log-sum-exp; backward as flash attention computes it."""
    name = "math"

    def forward(self, q, k, v, seg: Segments, scale: float):
        outs, lses = [], []
        for s, e in zip(seg.bounds[:-1], seg.bounds[1:]):
            qi, ki, vi = _heads(q[s:e], k[s:e], v[s:e])
            scores = _causal(qi @ ki.transpose(1, 2) * scale)
            lse = torch.logsumexp(scores, -1)
            outs.append((torch.exp(scores - lse[..., None]) @ vi).transpose(0, 1).to(q.dtype))
            lses.append(lse)
        return torch.cat(outs), tuple(lses)

    def backward(self, dout, q, k, v, out, aux, seg: Segments, scale: float):
        dqs, dks, dvs = [], [], []
        groups = q.shape[1] // k.shape[1]
        for (s, e), lse in zip(zip(seg.bounds[:-1], seg.bounds[1:]), aux):
            qi, ki, vi = _heads(q[s:e], k[s:e], v[s:e])
            do, o = (t[s:e].transpose(0, 1).float() for t in (dout, out))
            p = torch.exp(_causal(qi @ ki.transpose(1, 2) * scale) - lse[..., None])
            dp = do @ vi.transpose(1, 2)
            ds = p * (dp - (do * o).sum(-1, keepdim=True))
            dq, dk, dv = ds @ ki * scale, ds.transpose(1, 2) @ qi * scale, p.transpose(1, 2) @ do
            if groups > 1:  # the query heads sharing a k/v head add up
                dk, dv = (t.unflatten(0, (-1, groups)).sum(1) for t in (dk, dv))
            dqs.append(dq.transpose(0, 1))
            dks.append(dk.transpose(0, 1))
            dvs.append(dv.transpose(0, 1))
        return tuple(torch.cat(g).to(t.dtype) for g, t in zip((dqs, dks, dvs), (q, k, v)))


def _heads(q, k, v):
    groups = q.shape[1] // k.shape[1]
    qi, ki, vi = (t.transpose(0, 1).float() for t in (q, k, v))
    if groups > 1:
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
    return qi, ki, vi


def _causal(scores):
    n = scores.shape[-1]
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))


def flash_usable(dtype, head_dim: int) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and head_dim % 8 == 0


def choose_kernel(on_gpu: bool, dtype, heads: int, kv_heads: int, head_dim: int, setting: str):
    """(kernel or None for per-sequence SDPA, {fast path: why it is off}) for `train.attention_kernel`."""
    if not on_gpu:
        return MathKernel(), {"cuDNN attention": "no CUDA GPU"}
    if not flash_usable(dtype, head_dim):
        why = f"{dtype} / head dim {head_dim}: PyTorch's flash and cuDNN kernels take fp16/bf16, head dim <= 256"
        return None, {"flash attention": why, "cuDNN attention": why}
    if setting == "flash":
        return FlashKernel(), {"cuDNN attention": "train.attention_kernel: flash"}
    problem, expand = cudnn_problem(dtype, heads, kv_heads, head_dim)
    if problem:
        return FlashKernel(), {"cuDNN attention": problem + "; FlashAttention-2 runs"}
    return CudnnKernel(expand_kv=expand), {}


@functools.lru_cache(maxsize=None)
def cudnn_problem(dtype, heads: int, kv_heads: int, head_dim: int) -> tuple[Optional[str], bool]:
    """(None, expand_kv) where cuDNN attention runs here and agrees with FlashAttention-2 on a small
    grouped-query problem, forward and backward; else (the reason, False)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU", False
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"needs a Hopper GPU or newer (this one is sm_{major}{minor}, where FlashAttention-2 is as fast)", False
    if not torch.backends.cudnn.is_available():
        return "this PyTorch has no cuDNN", False
    last = "?"
    for expand in (False, True):
        try:
            worst = _agreement(CudnnKernel(min_len=1, expand_kv=expand), dtype, heads, kv_heads, head_dim)
        except Exception as err:  # noqa: BLE001 - an unsupported shape or build: say which, run flash
            last = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            continue
        if worst < 2e-2:
            return None, expand
        last = f"disagrees with FlashAttention-2 (relative error {worst:.1e})"
    return f"cuDNN attention check failed ({last})", False


def _agreement(kernel, dtype, heads, kv_heads, head_dim, n=300) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(n, heads, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    k, v = (torch.randn(n, kv_heads, head_dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    seg = segments([0, n], "cuda")
    scale = head_dim ** -0.5
    worst = 0.0
    results = []
    for kern in (FlashKernel(), kernel):
        out, aux = kern.forward(q, k, v, seg, scale)
        results.append((out, *kern.backward(dout, q, k, v, out, aux, seg, scale)))
    for ref, got in zip(*results):
        worst = max(worst, float((got.float() - ref.float()).norm() / ref.float().norm()))
    return worst
