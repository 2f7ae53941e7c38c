"""Causal attention over a packed, padding-free token stream: each sequence attends only to itself.

`pack_batch` flattens a micro-batch (padded rows or packed rows with restarting positions) into
one stream with its sequence bounds; `packed_attention` runs PyTorch's varlen flash-attention
kernels over it on CUDA (cu_seqlens: no padding, no T x T mask), and per-sequence SDPA elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Segments:
    """Sequence boundaries of a packed token stream."""
    bounds: list[int]          # [0, end_1, end_2, ..., T] on the host
    cu: torch.Tensor           # the same as int32 on the device
    max_len: int


class VarlenFlashAttention(torch.autograd.Function):
    """Causal attention within each packed sequence through PyTorch's flash-attention kernels."""

    @staticmethod
    def forward(ctx, q, k, v, seg: Segments, scale: float):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, rng, unused)
        ctx.seg, ctx.scale = seg, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rng, unused = ctx.saved_tensors
        seg = ctx.seg
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, seg.cu, seg.cu, seg.max_len, seg.max_len, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None


def packed_attention(q, k, v, seg: Segments, scale: float, use_flash: bool) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hk, D) -> (T, Hq, D), each sequence attending causally to itself."""
    if use_flash:
        return VarlenFlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), seg, scale)
    groups = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(seg.bounds[:-1], seg.bounds[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def pack_batch(input_ids, labels, attention_mask=None, position_ids=None):
    """Flatten a micro-batch to one token stream: (ids, next-token targets, positions, Segments).

    Rows are right- or left-padded (attention_mask) or already packed (position_ids restarting at 0).
    Targets are the labels shifted by one within each row, -100 where nothing is predicted.
    """
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None and not bool(attention_mask.all()):
        keep = attention_mask.bool()
        lengths = keep.sum(1).tolist()
        ids, targets = input_ids[keep], targets[keep]
        positions = torch.cat([torch.arange(n, device=ids.device) for n in lengths if n])
        # A left-padded row's last real token is its row end: its shifted target is already -100.
    else:
        ids, targets = input_ids.reshape(-1), targets.reshape(-1)
        if position_ids is not None:
            positions = position_ids.reshape(-1)
            starts = (positions == 0).nonzero().flatten().tolist()
            if not starts or starts[0] != 0:
                starts = [0] + starts
            lengths = [e - s for s, e in zip(starts, starts[1:] + [ids.shape[0]])]
        else:
            lengths = [input_ids.shape[1]] * input_ids.shape[0]
            positions = torch.arange(input_ids.shape[1], device=ids.device).repeat(input_ids.shape[0])
    # The last token of each sequence predicts nothing (row ends already are -100 after the shift).
    bounds = [0]
    for n in lengths:
        if n:
            bounds.append(bounds[-1] + n)
    ends = torch.tensor(bounds[1:], device=ids.device) - 1
    targets = targets.clone()
    targets[ends] = -100
    cu = torch.tensor(bounds, dtype=torch.int32, device=ids.device)
    seg = Segments(bounds, cu, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    return ids, targets, positions, seg
