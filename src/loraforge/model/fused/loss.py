"""The training loss without vocabulary-wide logits for the whole stream: chunked linear + cross-entropy."""
from __future__ import annotations

import torch

CE_CHUNK_ELEMENTS = 1 << 25  # logits elements per loss chunk: 1024 tokens x 32000 vocabulary in fp32 = 128 MiB


class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of cross_entropy(h W^T) * scale, a chunk of tokens at a time.

    The logits are computed in h's dtype and upcast to fp32 for the softmax, as transformers' loss
    does; the gradient w.r.t. h is made in the forward, chunk by chunk, so no vocabulary-wide tensor
    outlives its chunk. The head's weight is frozen (no gradient). In fp16 (T4 recipes) the saved
    gradient is per token, without `scale`: probabilities / tokens-in-the-step would fall under fp16's
    range before the GradScaler's factor arrives; backward then applies both in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, scale):
        n, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, CE_CHUNK_ELEMENTS // vocab)
        need_grad = ctx.needs_input_grad[0]
        unscaled = h.dtype == torch.float16
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            tgt = targets[s:e]
            valid = tgt != -100
            safe = tgt.clamp(min=0)
            logits = (h[s:e] @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(e - s, device=h.device), safe] -= 1.0
                probs.mul_((valid.to(probs.dtype) * (1.0 if unscaled else scale))[:, None])
                grad_h[s:e] = probs.to(h.dtype) @ weight
                del probs
            del logits
        ctx.save_for_backward(grad_h)
        ctx.scale = scale if unscaled else None
        return total * scale

    @staticmethod
    def backward(ctx, dloss):
        (grad_h,) = ctx.saved_tensors
        if ctx.scale is None:
            return grad_h * dloss.to(grad_h.dtype), None, None, None
        return (grad_h.float() * (dloss.float() * ctx.scale)).to(grad_h.dtype), None, None, None
