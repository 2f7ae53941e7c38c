"""Causal attention over a packed, padding-free token stream: each sequence attends only to itself.

`pack_batch` flattens a micro-batch (padded rows or packed rows with restarting positions) into one stream
with its sequence bounds; `attend` runs an attention kernel (attention_kernels: cuDNN / FlashAttention-2 on
CUDA, explicit softmax on the CPU) over it. Inside a layer checkpoint (offload.Memo) the forward may keep the
attention output and its softmax statistics, and the recompute then takes them instead of running the
attention forward again: backward needs only q, k, v (recomputed, cheap) and those.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.model.fused.attention_kernels import Segments, flash_usable, segments

__all__ = ["Segments", "attend", "pack_batch", "segments"]


class Attention(torch.autograd.Function):
    """Attention through `kernel`, or the output and statistics a checkpoint kept (`stored`), with the
    kernel's backward from (q, k, v, out, statistics)."""

    @staticmethod
    def forward(ctx, q, k, v, seg: Segments, scale: float, kernel, stored):
        out, aux = stored if stored is not None else kernel.forward(q, k, v, seg, scale)
        ctx.save_for_backward(q, k, v, out, *aux)
        ctx.seg, ctx.scale, ctx.kernel = seg, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *aux = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout.contiguous(), q, k, v, out, tuple(aux), ctx.seg, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attend(q, k, v, seg: Segments, scale: float, kernel, memo=None) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hk, D) -> (T, Hq, D), each sequence attending causally to itself.

    `memo` (a checkpointed block's, keep.Memo): in its forward the output and statistics are kept where its
    plan says so; in its recompute they are taken back instead of computed.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if kernel is None or (q.is_cuda and not flash_usable(q.dtype, q.shape[-1])):
        return _per_sequence_sdpa(q, k, v, seg, scale)
    if memo is not None and not memo.recomputing:  # checkpoint forward: no graph is built
        out, aux = kernel.forward(q, k, v, seg, scale)
        memo.keep("attention", [out, *aux])
        return out
    kept = memo.take("attention") if memo is not None else None
    stored = (kept[0], tuple(kept[1:])) if kept is not None else None
    return Attention.apply(q, k, v, seg, scale, kernel, stored)


def _per_sequence_sdpa(q, k, v, seg: Segments, scale: float) -> torch.Tensor:
    """SDPA under autograd, one sequence at a time: where no kernel above runs (fp32 on a GPU, odd head dims)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(seg.bounds[:-1], seg.bounds[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


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
    return ids, targets, positions, segments(bounds, ids.device)
