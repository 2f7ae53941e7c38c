"""The QLoRA projection nodes: frozen (NF4) base matmul + LoRA, with PEFT's LoRA dropout, as one autograd node.

PEFT computes y = base(x) + s * B(A(dropout(x))) with one nn.Dropout per adapted projection. Here a
group of projections sharing x (q/k/v, gate/up, o, down) is one node; each adapted projection with
dropout p > 0 draws its own mask with `torch.native_dropout` - the op nn.Dropout runs on CUDA (and the
same draws on the CPU) - in PEFT's order (q, k, v, o, gate, up, down), so the same generator state
gives the same masks as the plain path. The node keeps the boolean mask (1 byte a value) and remakes
the dropped input from x in backward; the layer checkpoint restores the generator state for the
recompute (offload.LayerCheckpoint), so forward and recompute agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from loraforge.model.fused.elementwise import silu_mul_grads, silu_mul_value
from loraforge.model.fused.weights import QuantGroup, dense_weight


@dataclass
class Projection:
    base: nn.Module
    lora_A: Optional[nn.Parameter] = None  # (r, in), trained in fp32
    lora_B: Optional[nn.Parameter] = None  # (out, r)
    scale: float = 1.0
    dropout: float = 0.0  # LoRA dropout probability on this projection's LoRA input

    @property
    def out_features(self) -> int:
        state = getattr(self.base.weight, "quant_state", None)
        return state.shape[0] if state is not None else self.base.weight.shape[0]

    def lora_A_zero(self, dtype) -> torch.Tensor:
        """An (out, 0) block: a projection without LoRA in a block-diagonal B."""
        return torch.zeros((self.out_features, 0), dtype=dtype, device=self.base.weight.device)


def projection(module: nn.Module) -> Projection:
    if not hasattr(module, "lora_A"):
        return Projection(module)
    name = module.active_adapters[0]
    if module.disable_adapters or module.merged or name not in module.lora_A:
        return Projection(module.base_layer)
    drop = module.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and module.training else 0.0
    return Projection(module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight,
                      float(module.scaling[name]), p)


def _b_blocks(projs, dtype):
    """The block-diagonal [s_1 B_1, s_2 B_2, ...] (sum out, sum r) in dtype (A's are made in _lora_down)."""
    blocks = [(p.lora_B * p.scale) if p.lora_A is not None
              else p.lora_A_zero(dtype) for p in projs]
    return torch.block_diag(*blocks).to(dtype)


# --- LoRA dropout ------------------------------------------------------------------------------

def dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dropout(x), its boolean keep-mask), drawn as PEFT's nn.Dropout draws it; (x, None) for p = 0."""
    if p <= 0:
        return x, None
    return torch.native_dropout(x, p, True)


def redropped(x: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """dropout(x) again from the kept mask: x * mask / (1 - p), rounded as native_dropout rounds it."""
    return x if mask is None else x.mul(mask).mul_(1.0 / (1.0 - p))


def _lora_down(x: torch.Tensor, with_lora: list[Projection], dtype) -> tuple[Optional[torch.Tensor], list]:
    """t = [dropout_1(x) A_1^T, dropout_2(x) A_2^T, ...] (tokens, sum r) and the masks (None: no dropout)."""
    if not with_lora:
        return None, []
    if all(p.dropout <= 0 for p in with_lora):  # one matmul for all the A's
        return x @ torch.cat([p.lora_A for p in with_lora]).to(dtype).t(), [None] * len(with_lora)
    parts, masks = [], []
    for p in with_lora:
        xd, mask = dropped(x, p.dropout)
        parts.append(xd @ p.lora_A.to(dtype).t())
        masks.append(mask)
        del xd
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]), masks


def _lora_up_grads(x, dt, with_lora: list[Projection], masks, dx: Optional[torch.Tensor]):
    """Given dt = d(loss)/d(t) (tokens, sum r): the A gradients, and dx with the LoRA path's share added."""
    dtype = x.dtype
    if all(m is None for m in masks):
        a_cat = torch.cat([p.lora_A for p in with_lora]).to(dtype)
        if dx is not None:
            dx.addmm_(dt, a_cat)
        dA = dt.t() @ x  # (sum r, in)
        out, r0 = [], 0
        for p in with_lora:
            r = p.lora_A.shape[0]
            out.append(dA[r0:r0 + r].to(p.lora_A.dtype))
            r0 += r
        return out, dx
    if _stackable(with_lora, masks):
        return _lora_up_grads_stacked(x, dt, with_lora, masks, dx)
    out, r0 = [], 0
    for p, mask in zip(with_lora, masks):
        r = p.lora_A.shape[0]
        dt_i = dt[:, r0:r0 + r]
        a = p.lora_A.to(dtype)
        xd = redropped(x, mask, p.dropout)
        out.append((dt_i.t() @ xd).to(p.lora_A.dtype))
        del xd
        if dx is not None:
            if mask is None:
                dx.addmm_(dt_i, a)
            else:  # dropout's backward: the gradient through the kept values, times 1 / (1 - p)
                dx.add_((dt_i @ a).mul_(mask), alpha=1.0 / (1.0 - p.dropout))
        r0 += r
    return out, dx


def _stackable(with_lora: list[Projection], masks) -> bool:
    """Several projections, each with a mask, one dropout p and one rank (PEFT's usual set-up)."""
    return (len(with_lora) > 1 and all(m is not None for m in masks)
            and len({(p.dropout, p.lora_A.shape) for p in with_lora}) == 1)


def _lora_up_grads_stacked(x, dt, with_lora: list[Projection], masks, dx):
    """_lora_up_grads for k projections with dropout as batched matmuls over a (k, tokens, in) stack:
    a handful of launches instead of eight per projection (the host, not the device, bounds small-rank steps)."""
    k, (r, _) = len(with_lora), with_lora[0].lora_A.shape
    p = with_lora[0].dropout
    mask = torch.stack(masks)  # (k, tokens, in) bool
    dt3 = dt.view(x.shape[0], k, r).transpose(0, 1)  # (k, tokens, r)
    xd = redropped(x, mask, p)  # each projection's dropout(x), (k, tokens, in)
    dA = torch.bmm(dt3.transpose(1, 2), xd)  # (k, r, in)
    del xd
    if dx is not None:  # dropout's backward: the gradient through the kept values, times 1 / (1 - p)
        a3 = torch.stack([q.lora_A for q in with_lora]).to(x.dtype)
        dx.add_(torch.bmm(dt3, a3).mul_(mask).sum(0), alpha=1.0 / (1.0 - p))
    return [dA[i].to(q.lora_A.dtype) for i, q in enumerate(with_lora)], dx


# --- the nodes -------------------------------------------------------------------------------------

class LoRAProjections(torch.autograd.Function):
    """y_i = x W_i^T + s_i (dropout_i(x) A_i^T) B_i^T for projections sharing the input x, as one node.

    Saves x, t = [dropout_1(x) A_1^T, ...] (tokens x sum of ranks), the dropout masks and, for a group,
    the small block-diagonal B; the base weights are dequantized again in backward. Matmuls run in x's
    dtype (bf16/fp16 on GPUs, as autocast does); LoRA gradients come back in the parameters' dtype
    (fp32). With a QuantGroup the projections' weights are one stacked matrix and the output is one
    (tokens, sum of outputs) tensor; otherwise one output each.
    """

    @staticmethod
    def forward(ctx, x, projs, group, given, *lora_params):
        dtype = x.dtype
        ctx.projs, ctx.group = projs, group
        with_lora = [p for p in projs if p.lora_A is not None]
        t, masks = _lora_down(x, with_lora, dtype)  # drawn also when given: the same masks as the forward's
        ctx.has_mask = [m is not None for m in masks]
        if group is not None:
            b_blk = _b_blocks(projs, dtype) if with_lora else None  # kept: backward needs it too
            ctx.save_for_backward(x, t, b_blk, *[m for m in masks if m is not None])
            if given is not None:
                return _given(given[0], x, sum(p.out_features for p in projs))
            w = group.dense(dtype)
            y = x @ w.t()
            del w
            if with_lora:
                y.addmm_(t, b_blk.t())
            return y
        ctx.save_for_backward(x, t, None, *[m for m in masks if m is not None])
        outs, r0 = [], 0
        for i, p in enumerate(projs):
            r = p.lora_A.shape[0] if p.lora_A is not None else 0
            if given is not None and given[i] is not None:
                outs.append(_given(given[i], x, p.out_features))
                r0 += r
                continue
            w = dense_weight(p.base, dtype)
            y = x @ w.t()
            del w
            if p.lora_A is not None:
                y.addmm_(t[:, r0:r0 + r], p.lora_B.to(dtype).t(), alpha=p.scale)
                r0 += r
            outs.append(y)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, t, b_blk, *kept = ctx.saved_tensors
        kept = iter(kept)
        masks = [next(kept) if has else None for has in ctx.has_mask]
        projs, group = ctx.projs, ctx.group
        dtype = x.dtype
        with_lora = [p for p in projs if p.lora_A is not None]
        need_dx = ctx.needs_input_grad[0]
        if group is not None:
            dy = grads[0].to(dtype)
            dx = None
            if need_dx:
                w = group.dense(dtype)
                dx = dy @ w
                del w
            if not with_lora:
                return (dx, None, None, None)
            dt = dy @ b_blk  # d(dropout(x) A^T) with the scales, (tokens, sum r)
            dB_full = dy.t() @ t  # (sum out, sum r): the diagonal blocks are the LoRA B gradients / scale
            dBs, o, r0 = [], 0, 0
            for p in projs:
                n = p.out_features
                if p.lora_A is not None:
                    r = p.lora_A.shape[0]
                    dBs.append((dB_full[o:o + n, r0:r0 + r] * p.scale).to(p.lora_B.dtype))
                    r0 += r
                o += n
            del dB_full
        else:
            dx, dts, dBs, r0 = None, [], [], 0
            for p, dy in zip(projs, grads):
                if dy is None:
                    dy = torch.zeros((x.shape[0], p.out_features), dtype=dtype, device=x.device)
                dy = dy.to(dtype)
                if need_dx:
                    w = dense_weight(p.base, dtype)
                    dx = dy @ w if dx is None else dx.addmm_(dy, w)
                    del w
                if p.lora_A is not None:
                    r = p.lora_A.shape[0]
                    dBs.append((dy.t() @ t[:, r0:r0 + r]).mul_(p.scale).to(p.lora_B.dtype))  # (out, r)
                    dts.append((dy @ p.lora_B.to(dtype)).mul_(p.scale))  # d(dropout(x) A^T), (tokens, r)
                    r0 += r
            if not with_lora:
                return (dx, None, None, None)
            dt = torch.cat(dts, dim=1) if len(dts) > 1 else dts[0]
        dAs, dx = _lora_up_grads(x, dt, with_lora, masks, dx)
        flat = [g for dA, dB in zip(dAs, dBs) for g in (dA, dB)]
        return (dx, None, None, None, *flat)


UNREAD = "unread"  # `given` for an output nobody reads


def unread(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """A stand-in output nobody reads (zeros, no memory): in a checkpoint's recompute the block's last
    projection is only back-propagated through, and its backward needs its input, not its output."""
    return x.new_zeros(()).expand(x.shape[0], out_features)


def _given(value, x, out_features):
    return unread(x, out_features) if isinstance(value, str) else value


def project(x: torch.Tensor, modules: list[nn.Module], group: Optional[QuantGroup] = None, skip_output=False,
            memo=None, kind: Optional[str] = None, keep_outputs: Optional[list[int]] = None):
    """The projections' outputs, one per module (split views when they share a QuantGroup).

    `skip_output`: outputs nobody reads (`unread`). With a checkpoint's `memo` and a `kind`, the outputs
    `keep_outputs` (default all) are kept in its forward and given back in its recompute, which then
    skips their matmuls (keep.Memo); the node's backward is the same either way.
    """
    projs = [projection(m) for m in modules]
    params = [t for p in projs if p.lora_A is not None for t in (p.lora_A, p.lora_B)]
    grouped = group is not None and group.matches([p.base for p in projs])
    n_out = 1 if grouped else len(projs)
    which = keep_outputs if keep_outputs is not None else list(range(n_out))
    given = (UNREAD,) * n_out if skip_output else None
    kept = memo.take(kind) if memo is not None and kind else None
    if kept is not None:
        given = tuple(kept[which.index(i)] if i in which else None for i in range(n_out))
    out = LoRAProjections.apply(x, projs, group if grouped else None, given, *params)
    if memo is not None and kind and not memo.recomputing:
        outs = (out,) if grouped else out
        memo.keep(kind, [outs[i] for i in which])
    if grouped:
        return out.split([p.out_features for p in projs], dim=1)
    return out


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(g) * u) with its LoRA (and LoRA dropout), as one autograd node.

    Saves g, u, the tiny dropout(act) A^T and the dropout mask, never the (tokens, intermediate)
    product act itself: backward remakes it for the LoRA A gradient and frees it before the product's
    gradient is made, so the MLP's backward holds one intermediate-wide tensor fewer.
    """

    @staticmethod
    def forward(ctx, g, u, proj: Projection, liger, skip_output, *lora_params):
        dtype = g.dtype
        ctx.proj, ctx.liger = proj, liger
        if skip_output and proj.lora_A is None:
            ctx.save_for_backward(g, u, None, None)
            return unread(g, proj.out_features)
        act = silu_mul_value(g, u, liger)
        y = None
        if not skip_output:
            w = dense_weight(proj.base, dtype)
            y = act @ w.t()
            del w
        t = mask = None
        if proj.lora_A is not None:
            xd, mask = dropped(act, proj.dropout)
            t = xd @ proj.lora_A.to(dtype).t()
            del xd
            if y is not None:
                y.addmm_(t, proj.lora_B.to(dtype).t(), alpha=proj.scale)
        del act
        ctx.save_for_backward(g, u, t, mask)
        return y if y is not None else unread(g, proj.out_features)

    @staticmethod
    def backward(ctx, dy):
        g, u, t, mask = ctx.saved_tensors
        p, dtype = ctx.proj, g.dtype
        dy = dy.to(dtype)
        lora = []
        if p.lora_A is not None:
            dt = (dy @ p.lora_B.to(dtype)).mul_(p.scale)
            dB = (dy.t() @ t).mul_(p.scale)
            act = redropped(silu_mul_value(g, u, ctx.liger), mask, p.dropout)
            dA = dt.t() @ act
            del act
            lora = [dA.to(p.lora_A.dtype), dB.to(p.lora_B.dtype)]
        w = dense_weight(p.base, dtype)
        d_act = dy @ w
        del w
        if p.lora_A is not None:
            if mask is None:
                d_act.addmm_(dt, p.lora_A.to(dtype))
            else:
                d_act.add_((dt @ p.lora_A.to(dtype)).mul_(mask), alpha=1.0 / (1.0 - p.dropout))
        dg, du = silu_mul_grads(g, u, d_act, ctx.liger)
        return (dg, du, None, None, None, *lora)


def swiglu_down(g: torch.Tensor, u: torch.Tensor, module: nn.Module, liger, skip_output=False) -> torch.Tensor:
    p = projection(module)
    params = (p.lora_A, p.lora_B) if p.lora_A is not None else ()
    return SwiGLUDown.apply(g, u, p, liger, skip_output, *params)
