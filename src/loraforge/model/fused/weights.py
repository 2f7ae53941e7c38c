"""The frozen base weights as the fused nodes use them: NF4/FP4 dequantized on the fly, q/k/v stacked."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) matrix in `dtype`: NF4/FP4 dequantized on the fly."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w if w.dtype == dtype else w.to(dtype)
    # bitsandbytes.functional.dequantize_4bit without its Python checks: the same two kernels.
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(absmax, state.state2.absmax, state.state2.code, state.state2.blocksize)
        absmax += state.offset
    out = dequantize_4bit(w.data, absmax, state.blocksize, state.quant_type, state.shape, state.dtype)
    return out if out.dtype == dtype else out.to(dtype)


@functools.lru_cache(maxsize=1)
def cuda_impls():
    """bitsandbytes' CUDA dequantize functions behind its torch.library ops, called directly: the op's
    dispatch costs more host time than the launch itself (25 against 11 us a call on an H200, and the
    fused path dequantizes ~500 times a step). None where this bitsandbytes lays them out otherwise."""
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:  # noqa: BLE001 - no CUDA backend in this build
        return None
    four, block = getattr(ops, "_dequantize_4bit_impl", None), getattr(ops, "_dequantize_blockwise_impl", None)
    expected = {four: ["A", "absmax", "blocksize", "quant_type", "dtype", "out"],
                block: ["A", "absmax", "code", "blocksize", "dtype", "out"]}
    if four is None or block is None or any(list(inspect.signature(f).parameters) != names
                                            for f, names in expected.items()):
        return None
    return four, block


def dequantize_4bit(data, absmax, blocksize: int, quant_type: str, shape, dtype) -> torch.Tensor:
    impls = cuda_impls() if data.is_cuda else None
    if impls is None:
        return torch.ops.bitsandbytes.dequantize_4bit.default(data, absmax, blocksize, quant_type, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=data.device)
    impls[0](data, absmax, blocksize, quant_type, dtype, out=out)
    return out


def dequantize_blockwise(codes, absmax, code, blocksize: int) -> torch.Tensor:
    """The float32 absmax of a double-quantized weight from its 8-bit codes."""
    impls = cuda_impls() if codes.is_cuda else None
    if impls is None:
        return torch.ops.bitsandbytes.dequantize_blockwise.default(codes, absmax, code, blocksize, torch.float32)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    impls[1](codes, absmax, code, blocksize, torch.float32, out=out)
    return out


class QuantGroup:
    """The 4-bit weights of projections that share an input (q/k/v), laid end to end in one buffer.

    One dequantize then makes the stacked (sum of outputs, in) matrix for one matmul, instead of a
    dequantize and a matmul per projection. Each layer's Params4bit data and quantization state
    become views of the shared buffers, so the model is unchanged for everything else; `matches`
    checks, at every use, that they still are.
    """

    def __init__(self, bases: list[nn.Module]):
        states = [b.weight.quant_state for b in bases]
        first = states[0]
        self.nested = bool(first.nested)
        self.blocksize, self.quant_type, self.dtype = first.blocksize, first.quant_type, first.dtype
        self.shape = (sum(s.shape[0] for s in states), first.shape[1])
        self.outs = [s.shape[0] for s in states]
        data = [b.weight.data for b in bases]
        self.data = torch.cat([d.reshape(-1) for d in data])
        self.absmax_q = torch.cat([s.absmax.reshape(-1) for s in states])  # uint8 codes if nested, else fp32
        self.blocks = [s.absmax.numel() for s in states]
        if self.nested:
            self.bs2, self.code = first.state2.blocksize, first.state2.code
            self.absmax2 = torch.cat([s.state2.absmax.reshape(-1) for s in states])
            self.offsets = torch.stack([s.offset.reshape(()) for s in states]).float()
        o = ob = ob2 = 0
        for b, s, d in zip(bases, states, data):
            n, nb = d.numel(), s.absmax.numel()
            b.weight.data = self.data[o:o + n].view(d.shape)
            s.absmax = self.absmax_q[ob:ob + nb].view(s.absmax.shape)
            if self.nested:
                nb2 = s.state2.absmax.numel()
                s.state2.absmax = self.absmax2[ob2:ob2 + nb2].view(s.state2.absmax.shape)
                ob2 += nb2
            o, ob = o + n, ob + nb
        self.ptrs = [b.weight.data.data_ptr() for b in bases]

    @staticmethod
    def possible(bases: list[nn.Module]) -> bool:
        """Same 4-bit layout for all (all double-quantized, or none), contiguous data."""
        states = [getattr(b.weight, "quant_state", None) for b in bases]
        if len(bases) < 2 or any(s is None for s in states) or len({bool(s.nested) for s in states}) > 1:
            return False
        s0 = states[0]
        same = all(s.blocksize == s0.blocksize and s.quant_type == s0.quant_type and s.dtype == s0.dtype
                   and s.shape[1] == s0.shape[1] and b.weight.data.is_contiguous() for s, b in zip(states, bases))
        if not same or not s0.nested:
            return same
        return all(s.state2.blocksize == s0.state2.blocksize and torch.equal(s.state2.code, s0.state2.code)
                   and s.absmax.numel() % s.state2.blocksize == 0 for s in states)

    def matches(self, bases) -> bool:
        return [b.weight.data.data_ptr() for b in bases] == self.ptrs

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.nested:
            absmax = dequantize_blockwise(self.absmax_q, self.absmax2, self.code, self.bs2)
            if len(set(self.blocks)) == 1:
                absmax.view(len(self.blocks), -1).add_(self.offsets[:, None])
            else:
                o = 0
                for i, n in enumerate(self.blocks):
                    absmax[o:o + n] += self.offsets[i]
                    o += n
        else:
            absmax = self.absmax_q
        out = dequantize_4bit(self.data, absmax, self.blocksize, self.quant_type, self.shape, self.dtype)
        return out if out.dtype == dtype else out.to(dtype)


def has_4bit_weights(lm: nn.Module) -> bool:
    return any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in lm.model.layers.modules())


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
