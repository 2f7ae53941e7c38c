"""Fast training forward for Llama-family QLoRA models: same function, fewer launches, less memory.

`apply_fast_paths(model, train_cfg, device)` replaces the training forward of a PEFT-wrapped
LlamaForCausalLM (or Mistral without sliding windows) with `fused_forward`, which computes the same
loss and the same gradients as transformers + PEFT, but:

- packs the micro-batch into one padding-free token stream and runs *varlen* flash attention
  (`cu_seqlens`): no padding, no T x T mask, no cross-sequence attention;
- runs each group of LoRA projections that share an input (q/k/v, gate/up, o, down) as one autograd
  node (`LoRAProjections`): the NF4 weights are dequantized once per use, the LoRA A matrices of
  the group are one matmul, no dropout no-ops or fp32 round trips; it saves its input and the
  tiny x @ A^T, never a dequantized weight;
- uses liger-kernel's Triton RMSNorm, RoPE and SiLU-mul where available (CUDA), torch otherwise;
- computes the loss with a chunked linear + cross-entropy (`LinearCrossEntropy`): the vocabulary-wide
  logits exist one chunk at a time and the gradient of the hidden states is made in the forward;
- checkpoints each half of a decoder layer (attention, MLP) itself (`LayerCheckpoint`): the recompute
  of one half never holds the other's activations; optionally the checkpoints live in pinned CPU
  memory, copied on a side stream and prefetched one half-layer ahead during backward.

Evaluation, generation and anything with the adapter disabled use the model's own forward.
Equality with the plain path is tested on the CPU (tests/train/test_fast_paths.py) and recorded
for the GPU kernels in docs/perf-notes.md.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
CE_CHUNK_ELEMENTS = 1 << 25  # logits elements per loss chunk: 1024 tokens x 32000 vocabulary in fp32 = 128 MiB


# --- what can run where ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def liger_ops():
    """liger-kernel's Triton functions, or None when it is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction, swiglu_backward, swiglu_forward
    except Exception:  # noqa: BLE001 - missing package or a Triton that cannot load
        return None
    return types.SimpleNamespace(rms_norm=LigerRMSNormFunction, rope=LigerRopeFunction, silu_mul=LigerSiLUMulFunction,
                                 swiglu_forward=swiglu_forward, swiglu_backward=swiglu_backward)


def _peft_inner(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def why_unsupported(model: nn.Module) -> Optional[str]:
    """None if `fused_forward` computes exactly what this model computes; else the reason it does not."""
    lm = _peft_inner(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) > 1:
        return "not a plain SiLU-gated Llama MLP"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projection biases"
    if not isinstance(getattr(lm, "lm_head", None), nn.Linear) or lm.lm_head.bias is not None:
        return "the output head is adapted or has a bias"
    body = getattr(lm, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "unexpected module layout"
    for layer in body.layers:
        for proj in _projections(layer):
            reason = _projection_problem(proj)
            if reason:
                return reason
    return None


def _projections(layer):
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def _projection_problem(proj: nn.Module) -> Optional[str]:
    if not hasattr(proj, "lora_A"):
        base = proj
        return None if _is_plain_linear(base) else f"unsupported layer {type(base).__name__}"
    if len(proj.active_adapters) != 1:
        return "several active adapters"
    name = proj.active_adapters[0]
    if name not in proj.lora_A:
        return None if _is_plain_linear(proj.base_layer) else f"unsupported layer {type(proj.base_layer).__name__}"
    if getattr(proj, "use_dora", {}).get(name, False) or name in getattr(proj, "lora_variant", {}):
        return "DoRA"
    dropout = proj.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return "LoRA dropout > 0"
    if getattr(proj.lora_B[name], "bias", None) is not None:
        return "LoRA bias"
    if not _is_plain_linear(proj.base_layer):
        return f"unsupported base layer {type(proj.base_layer).__name__}"
    return None


def _is_plain_linear(module) -> bool:
    if getattr(module, "bias", None) is not None:
        return False
    if type(module).__name__ == "Linear4bit":
        return True
    return type(module) is nn.Linear


# --- weights -----------------------------------------------------------------------------------

def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) matrix in `dtype`: NF4/FP4 dequantized on the fly."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w if w.dtype == dtype else w.to(dtype)
    # bitsandbytes.functional.dequantize_4bit without its Python checks: the same two kernels.
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32)
        absmax += state.offset
    out = torch.ops.bitsandbytes.dequantize_4bit.default(w.data, absmax, state.blocksize, state.quant_type,
                                                          state.shape, state.dtype)
    return out if out.dtype == dtype else out.to(dtype)


@dataclass
class Projection:
    base: nn.Module
    lora_A: Optional[nn.Parameter] = None  # (r, in), trained in fp32
    lora_B: Optional[nn.Parameter] = None  # (out, r)
    scale: float = 1.0

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
    return Projection(module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight,
                      float(module.scaling[name]))


class QuantGroup:
    """The NF4 weights of projections that share an input (q/k/v), laid end to end in one buffer.

    One dequantize then makes the stacked (sum of outputs, in) matrix for one matmul, instead of a
    dequantize and a matmul per projection. Each layer's Params4bit data and quantization state
    become views of the shared buffers, so the model is unchanged for everything else; `matches`
    checks, at every use, that they still are.
    """

    def __init__(self, bases: list[nn.Module]):
        states = [b.weight.quant_state for b in bases]
        first = states[0]
        self.blocksize, self.quant_type, self.dtype = first.blocksize, first.quant_type, first.dtype
        self.bs2, self.code = first.state2.blocksize, first.state2.code
        self.shape = (sum(s.shape[0] for s in states), first.shape[1])
        self.outs = [s.shape[0] for s in states]
        data = [b.weight.data for b in bases]
        self.data = torch.cat([d.reshape(-1) for d in data])
        self.absmax_q = torch.cat([s.absmax.reshape(-1) for s in states])
        self.absmax2 = torch.cat([s.state2.absmax.reshape(-1) for s in states])
        self.blocks = [s.absmax.numel() for s in states]
        self.offsets = torch.stack([s.offset.reshape(()) for s in states]).float()
        o = ob = ob2 = 0
        for b, s, d in zip(bases, states, data):
            n, nb, nb2 = d.numel(), s.absmax.numel(), s.state2.absmax.numel()
            b.weight.data = self.data[o:o + n].view(d.shape)
            s.absmax = self.absmax_q[ob:ob + nb].view(s.absmax.shape)
            s.state2.absmax = self.absmax2[ob2:ob2 + nb2].view(s.state2.absmax.shape)
            o, ob, ob2 = o + n, ob + nb, ob2 + nb2
        self.ptrs = [b.weight.data.data_ptr() for b in bases]

    @staticmethod
    def possible(bases: list[nn.Module]) -> bool:
        states = [getattr(b.weight, "quant_state", None) for b in bases]
        if len(bases) < 2 or any(s is None or not s.nested for s in states):
            return False
        s0 = states[0]
        return all(s.blocksize == s0.blocksize and s.quant_type == s0.quant_type and s.dtype == s0.dtype
                   and s.shape[1] == s0.shape[1] and s.state2.blocksize == s0.state2.blocksize
                   and torch.equal(s.state2.code, s0.state2.code)
                   and s.absmax.numel() % s.state2.blocksize == 0 and b.weight.data.is_contiguous()
                   for s, b in zip(states, bases))

    def matches(self, bases) -> bool:
        return [b.weight.data.data_ptr() for b in bases] == self.ptrs

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            self.absmax_q, self.absmax2, self.code, self.bs2, torch.float32)
        if len(set(self.blocks)) == 1:
            absmax.view(len(self.blocks), -1).add_(self.offsets[:, None])
        else:
            o = 0
            for i, n in enumerate(self.blocks):
                absmax[o:o + n] += self.offsets[i]
                o += n
        out = torch.ops.bitsandbytes.dequantize_4bit.default(self.data, absmax, self.blocksize, self.quant_type,
                                                              self.shape, self.dtype)
        return out if out.dtype == dtype else out.to(dtype)


def group_quantized_projections(lm: nn.Module) -> int:
    """Lay each layer's q/k/v NF4 weights end to end (QuantGroup); returns how many layers have one."""
    made = 0
    for layer in lm.model.layers:
        attn = layer.self_attn
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        bases = [getattr(m, "base_layer", m) for m in mods]
        group = getattr(attn, "_loraforge_qkv_group", None)
        if group is not None and group.matches(bases):
            made += 1
            continue
        if QuantGroup.possible(bases):
            attn._loraforge_qkv_group = QuantGroup(bases)
            made += 1
    return made


def _lora_blocks(projs, dtype):
    """[A_1; A_2; ...] (sum r, in) and the block-diagonal [s_1 B_1, s_2 B_2, ...] (sum out, sum r) in dtype."""
    a = torch.cat([p.lora_A for p in projs if p.lora_A is not None]).to(dtype)
    blocks = [(p.lora_B * p.scale) if p.lora_A is not None
              else p.lora_A_zero(dtype) for p in projs]
    return a, torch.block_diag(*blocks).to(dtype)


class LoRAProjections(torch.autograd.Function):
    """y_i = x W_i^T + s_i (x A_i^T) B_i^T for projections sharing the input x, as one autograd node.

    Saves x and t = x [A_1; A_2; ...]^T (tokens x sum of ranks); the weights are dequantized again in
    backward. Matmuls run in x's dtype (bf16 on GPUs, as autocast does); LoRA gradients come back
    in the parameters' dtype (fp32). With a QuantGroup the projections' weights are one stacked
    matrix and the output is one (tokens, sum of outputs) tensor; otherwise one output each.
    """

    @staticmethod
    def forward(ctx, x, projs, group, *lora_params):
        dtype = x.dtype
        ctx.projs, ctx.group = projs, group
        with_lora = [p for p in projs if p.lora_A is not None]
        t = None
        if group is not None:
            w = group.dense(dtype)
            y = x @ w.t()
            del w
            if with_lora:
                a_cat, b_blk = _lora_blocks(projs, dtype)
                t = x @ a_cat.t()
                y.addmm_(t, b_blk.t())
            ctx.save_for_backward(x, t)
            return y
        a_cat = torch.cat([p.lora_A for p in with_lora]).to(dtype) if with_lora else None
        t = x @ a_cat.t() if with_lora else None
        outs, r0 = [], 0
        for p in projs:
            w = dense_weight(p.base, dtype)
            y = x @ w.t()
            del w
            if p.lora_A is not None:
                r = p.lora_A.shape[0]
                y.addmm_(t[:, r0:r0 + r], p.lora_B.to(dtype).t(), alpha=p.scale)
                r0 += r
            outs.append(y)
        ctx.save_for_backward(x, t)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, t = ctx.saved_tensors
        projs, group = ctx.projs, ctx.group
        dtype = x.dtype
        if group is not None:
            return LoRAProjections._grouped_backward(ctx, x, t, projs, group, grads[0].to(dtype))
        dx = None
        lora_grads, dts, r0 = [], [], 0
        for p, dy in zip(projs, grads):
            if dy is None:
                dy = torch.zeros((x.shape[0], p.out_features), dtype=dtype, device=x.device)
            dy = dy.to(dtype)
            if ctx.needs_input_grad[0]:
                w = dense_weight(p.base, dtype)
                dx = dy @ w if dx is None else dx.addmm_(dy, w)
                del w
            if p.lora_A is not None:
                r = p.lora_A.shape[0]
                t_i = t[:, r0:r0 + r]
                b = p.lora_B.to(dtype)
                dB = (dy.t() @ t_i).mul_(p.scale)  # (out, r)
                dts.append((dy @ b).mul_(p.scale))  # d(x A^T), (tokens, r)
                lora_grads.append([None, dB.to(p.lora_B.dtype)])
                r0 += r
        if dts:
            dt = torch.cat(dts, dim=1) if len(dts) > 1 else dts[0]
            with_lora = [p for p in projs if p.lora_A is not None]
            a_cat = torch.cat([p.lora_A for p in with_lora]).to(dtype)
            if ctx.needs_input_grad[0]:
                dx.addmm_(dt, a_cat)
            dA = dt.t() @ x  # (sum r, in)
            r0 = 0
            for p, g in zip(with_lora, lora_grads):
                r = p.lora_A.shape[0]
                g[0] = dA[r0:r0 + r].to(p.lora_A.dtype)
                r0 += r
        flat = [g for pair in lora_grads for g in pair]
        return (dx, None, None, *flat)

    @staticmethod
    def _grouped_backward(ctx, x, t, projs, group, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            w = group.dense(dtype=x.dtype)
            dx = dy @ w
            del w
        with_lora = [p for p in projs if p.lora_A is not None]
        if not with_lora:
            return (dx, None, None)
        a_cat, b_blk = _lora_blocks(projs, x.dtype)
        dt = dy @ b_blk  # d(x A^T) with the scales, (tokens, sum r)
        if dx is not None:
            dx.addmm_(dt, a_cat)
        dA = dt.t() @ x
        dB_full = dy.t() @ t  # (sum out, sum r): the diagonal blocks are the LoRA B gradients / scale
        flat, o, r0 = [], 0, 0
        for p in projs:
            n = p.out_features
            if p.lora_A is not None:
                r = p.lora_A.shape[0]
                flat.append(dA[r0:r0 + r].to(p.lora_A.dtype))
                flat.append((dB_full[o:o + n, r0:r0 + r] * p.scale).to(p.lora_B.dtype))
                r0 += r
            o += n
        return (dx, None, None, *flat)


def project(x: torch.Tensor, modules: list[nn.Module], group: Optional[QuantGroup] = None):
    """The projections' outputs, one per module (split views when they share a QuantGroup)."""
    projs = [projection(m) for m in modules]
    params = [t for p in projs if p.lora_A is not None for t in (p.lora_A, p.lora_B)]
    if group is not None and group.matches([p.base for p in projs]):
        y = LoRAProjections.apply(x, projs, group, *params)
        return y.split([p.out_features for p in projs], dim=1)
    return LoRAProjections.apply(x, projs, None, *params)


# --- elementwise: liger's Triton kernels on CUDA, torch elsewhere -------------------------------

def rms_norm(x: torch.Tensor, norm: nn.Module, liger) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    if liger is not None:
        return liger.rms_norm.apply(x, norm.weight, eps, 0.0, "llama", True)  # dX written over dY
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


def _silu_mul_value(g, u, liger):
    if liger is not None and g.is_cuda:
        return liger.swiglu_forward(g, u)[2]
    return F.silu(g) * u


def _silu_mul_grads(g, u, d_act, liger):
    """(d g, d u) of silu(g) * u; liger's kernel writes them over g and u."""
    if liger is not None and g.is_cuda:
        return liger.swiglu_backward(g, u, d_act)
    gf = g.float()
    sig = torch.sigmoid(gf)
    d = d_act.float()
    return (d * u.float() * sig * (1 + gf * (1 - sig))).to(g.dtype), (d * gf * sig).to(u.dtype)


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(g) * u) with its LoRA, as one autograd node.

    Saves g, u and the tiny act A^T, never the (tokens, intermediate) product act itself: backward
    remakes it for the LoRA A gradient and frees it before the product's gradient is made, so the
    MLP's backward holds one intermediate-wide tensor fewer.
    """

    @staticmethod
    def forward(ctx, g, u, proj: "Projection", liger, *lora_params):
        dtype = g.dtype
        act = _silu_mul_value(g, u, liger)
        w = dense_weight(proj.base, dtype)
        y = act @ w.t()
        del w
        t = None
        if proj.lora_A is not None:
            t = act @ proj.lora_A.to(dtype).t()
            y.addmm_(t, proj.lora_B.to(dtype).t(), alpha=proj.scale)
        del act
        ctx.save_for_backward(g, u, t)
        ctx.proj, ctx.liger = proj, liger
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u, t = ctx.saved_tensors
        p, dtype = ctx.proj, g.dtype
        dy = dy.to(dtype)
        lora = []
        if p.lora_A is not None:
            dt = (dy @ p.lora_B.to(dtype)).mul_(p.scale)
            dB = (dy.t() @ t).mul_(p.scale)
            act = _silu_mul_value(g, u, ctx.liger)
            dA = dt.t() @ act
            del act
            lora = [dA.to(p.lora_A.dtype), dB.to(p.lora_B.dtype)]
        w = dense_weight(p.base, dtype)
        d_act = dy @ w
        del w
        if p.lora_A is not None:
            d_act.addmm_(dt, p.lora_A.to(dtype))
        dg, du = _silu_mul_grads(g, u, d_act, ctx.liger)
        return (dg, du, None, None, *lora)


def swiglu_down(g: torch.Tensor, u: torch.Tensor, module: nn.Module, liger) -> torch.Tensor:
    p = projection(module)
    params = (p.lora_A, p.lora_B) if p.lora_A is not None else ()
    return SwiGLUDown.apply(g, u, p, liger, *params)


# --- attention over packed sequences -----------------------------------------------------------

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


# --- loss ----------------------------------------------------------------------------------------

class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of cross_entropy(h W^T) * scale, a chunk of tokens at a time.

    The logits are computed in h's dtype and upcast to fp32 for the softmax, as transformers' loss
    does; the gradient w.r.t. h is made in the forward, chunk by chunk, so no vocabulary-wide tensor
    outlives its chunk. The head's weight is frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, scale):
        n, vocab = h.shape[0], weight.shape[0]
        chunk = max(1, CE_CHUNK_ELEMENTS // vocab)
        need_grad = ctx.needs_input_grad[0]
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
                probs.mul_((valid.to(probs.dtype) * scale)[:, None])
                grad_h[s:e] = probs.to(h.dtype) @ weight
                del probs
            del logits
        ctx.save_for_backward(grad_h)
        return total * scale

    @staticmethod
    def backward(ctx, dloss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * dloss.to(grad_h.dtype), None, None, None


# --- layer checkpointing with optional CPU offload ----------------------------------------------

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
    inside get their gradients from the recomputed graph, accumulated into `.grad` directly.
    """

    @staticmethod
    def forward(ctx, h, run, offloader: Optional[Offloader]):
        ctx.run, ctx.offloader = run, offloader
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
        with torch.enable_grad():
            out = ctx.run(h)
        torch.autograd.backward(out, dout)
        ctx.run = None
        return h.grad, None, None


# --- the model -----------------------------------------------------------------------------------

@dataclass
class FastSettings:
    liger: bool
    checkpoint: bool
    offload: bool


def attention_block(layer: nn.Module, h: torch.Tensor, cos, sin, seg: Segments, liger) -> torch.Tensor:
    """h + self-attention(norm(h)) of one Llama decoder layer, on a packed (T, hidden) stream."""
    attn = layer.self_attn
    n = h.shape[0]
    head_dim = attn.head_dim
    x = rms_norm(h, layer.input_layernorm, liger)
    q, k, v = project(x, [attn.q_proj, attn.k_proj, attn.v_proj], getattr(attn, "_loraforge_qkv_group", None))
    q, k, v = q.view(n, -1, head_dim), k.view(n, -1, head_dim), v.view(n, -1, head_dim)
    q, k = rope(q, k, cos, sin, liger)
    o = packed_attention(q, k, v, seg, attn.scaling, flash_usable(q))
    (o,) = project(o.reshape(n, -1), [attn.o_proj])
    return h + o


def mlp_block(layer: nn.Module, h: torch.Tensor, cos=None, sin=None, seg=None, liger=None) -> torch.Tensor:
    """h + MLP(norm(h)) of one Llama decoder layer."""
    mlp = layer.mlp
    x = rms_norm(h, layer.post_attention_layernorm, liger)
    g, u = project(x, [mlp.gate_proj, mlp.up_proj])
    return h + swiglu_down(g, u, mlp.down_proj, liger)


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


def fused_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                  num_items_in_batch=None, **kwargs):
    """LlamaForCausalLM.forward for training: returns an output whose `.loss` equals transformers'."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    settings: FastSettings = self._loraforge_fast
    fallback = (labels is None or input_ids is None or not self.training or not torch.is_grad_enabled()
                or kwargs.get("inputs_embeds") is not None or _adapters_disabled(self))
    if fallback:
        return self._loraforge_original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, labels=labels,
                                                num_items_in_batch=num_items_in_batch, **kwargs)
    body = self.model
    ids, targets, positions, seg = pack_batch(input_ids, labels, attention_mask, position_ids)
    liger = liger_ops() if settings.liger and ids.is_cuda else None
    with torch.autocast(ids.device.type, enabled=False):
        h = body.embed_tokens(ids)  # (T, hidden); frozen, so it needs grad only as the layers' input
        cos, sin = body.rotary_emb(h[None], positions[None])
        cos, sin = cos[0], sin[0]
        if settings.checkpoint and not h.requires_grad:
            h = h.detach().requires_grad_(True)
        offloader = Offloader(h.device) if settings.offload and h.is_cuda else None
        for layer in body.layers:
            # Checkpoints at each half layer: the recompute of one half never holds the other's activations.
            for block in (attention_block, mlp_block):
                run = functools.partial(block, layer, cos=cos, sin=sin, seg=seg, liger=liger)
                h = LayerCheckpoint.apply(h, run, offloader) if settings.checkpoint else run(h)
        h = rms_norm(h, body.norm, liger)
        if num_items_in_batch is None:
            scale = 1.0 / max(1, int((targets != -100).sum()))
        else:
            scale = 1.0 / float(num_items_in_batch)
        loss = LinearCrossEntropy.apply(h, self.lm_head.weight, targets, scale)
    return CausalLMOutputWithPast(loss=loss)


def _adapters_disabled(lm) -> bool:
    for module in lm.model.layers[0].modules():
        if hasattr(module, "lora_A"):
            return bool(module.disable_adapters or module.merged)
    return False


# --- switching it on --------------------------------------------------------------------------

def apply_fast_paths(model: nn.Module, train_cfg, device: str, say=print) -> list[str]:
    """Install the fused training forward as `train_cfg` asks; returns what was switched on.

    `train.fused_layers`: auto (on for supported models on CUDA) | on | off.
    `train.liger_kernels`: auto (on where liger-kernel imports, on CUDA) | on | off.
    `train.offload_activations`: keep layer checkpoints in pinned CPU memory (CUDA, with checkpointing).
    """
    on_gpu = device.startswith("cuda")
    mode = train_cfg.fused_layers
    reason = why_unsupported(model)
    if mode == "off" or (mode == "auto" and (not on_gpu or reason)):
        if train_cfg.liger_kernels == "on":
            raise UserError("train.liger_kernels: on needs train.fused_layers (the fused path is where the "
                            f"kernels are used){'; it is off here because: ' + reason if reason else ''}")
        if train_cfg.offload_activations:
            raise UserError("train.offload_activations needs train.fused_layers"
                            f"{'; it is off here because: ' + reason if reason else ''}")
        return []
    if reason:
        raise UserError(f"train.fused_layers: on, but this set-up is not supported: {reason}. Use 'auto' or 'off'")
    liger = train_cfg.liger_kernels
    if liger == "on":
        if not on_gpu:
            raise UserError("train.liger_kernels: on needs a CUDA GPU (liger-kernel is Triton); use 'auto' or 'off'")
        if liger_ops() is None:
            raise UserError("train.liger_kernels: on, but liger-kernel is not installed (pip install liger-kernel)")
    use_liger = on_gpu and liger != "off" and liger_ops() is not None
    if train_cfg.offload_activations and not on_gpu:
        raise UserError("train.offload_activations needs a CUDA GPU")
    if train_cfg.offload_activations and not train_cfg.gradient_checkpointing:
        raise UserError("train.offload_activations needs train.gradient_checkpointing: true")
    lm = _peft_inner(model)
    grouped = group_quantized_projections(lm) if train_cfg.fused_layers != "off" else 0
    lm._loraforge_fast = FastSettings(liger=use_liger, checkpoint=train_cfg.gradient_checkpointing,
                                      offload=bool(train_cfg.offload_activations))
    if not hasattr(lm, "_loraforge_original_forward"):
        lm._loraforge_original_forward = lm.forward
    lm.forward = types.MethodType(fused_forward, lm)
    switched = ["fused layers", "varlen attention" if on_gpu else "packed attention", "chunked CE"]
    if grouped:
        switched.append(f"q/k/v NF4 weights stacked ({grouped} layers)")
    if use_liger:
        switched.append("liger RMSNorm/RoPE/SiLU-mul")
    if train_cfg.offload_activations:
        switched.append("CPU-offloaded checkpoints")
    say("fast paths: " + ", ".join(switched))
    return switched
