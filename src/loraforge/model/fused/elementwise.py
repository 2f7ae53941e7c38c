"""Elementwise ops of the fused forward: liger-kernel's Triton kernels on CUDA, torch elsewhere.

RoPE and SiLU-mul are liger's (a field library) where `liger` is given; RMSNorm on CUDA is torch's own
fused kernel (F.rms_norm: one launch each way; host time per call on an H200 12 against liger's 77 us
forward, 142 against 486 us forward + backward, scripts/micro_host.py). The torch compositions are the reference the CPU tests and the GPU
checks compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    if x.is_cuda:  # fp32 inside, rounded once (transformers rounds the normalized x before the weight)
        weight = norm.weight if norm.weight.dtype == x.dtype else norm.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, liger):
    """q (T, Hq, D), k (T, Hk, D); cos/sin (T, D) as the model's rotary embedding makes them."""
    if liger is not None:
        # liger works on (batch, heads, seq, dim) views of (batch, seq, heads, dim) storage.
        q4, k4 = liger.rope.apply(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                                  cos.unsqueeze(0), sin.unsqueeze(0))
        return q4.transpose(1, 2).squeeze(0), k4.transpose(1, 2).squeeze(0)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def silu_mul(g: torch.Tensor, u: torch.Tensor, liger) -> torch.Tensor:
    if liger is not None:
        return liger.silu_mul.apply(g, u)
    return F.silu(g) * u


def silu_mul_value(g, u, liger):
    if liger is not None and g.is_cuda:
        return liger.swiglu_forward(g, u)[2]
    return F.silu(g) * u


def silu_mul_grads(g, u, d_act, liger):
    """(d g, d u) of silu(g) * u; liger's kernel writes them over g and u."""
    if liger is not None and g.is_cuda:
        return liger.swiglu_backward(g, u, d_act)
    gf = g.float()
    sig = torch.sigmoid(gf)
    d = d_act.float()
    return (d * u.float() * sig * (1 + gf * (1 - sig))).to(g.dtype), (d * gf * sig).to(u.dtype)
