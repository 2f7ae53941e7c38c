"""What the fused path can run: the model checks (`why_unsupported`) and the optional kernel library.

Only what depends on the loaded model or the machine is checked here; what follows from the config
alone is checked in `loraforge.config` before anything loads.
"""
from __future__ import annotations

import functools
import types
from typing import Optional

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@functools.lru_cache(maxsize=1)
def liger_ops():
    """liger-kernel's Triton functions, or None when it is not installed."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction, swiglu_backward, swiglu_forward
    except Exception:  # noqa: BLE001 - missing package or a Triton that cannot load
        return None
    return types.SimpleNamespace(rope=LigerRopeFunction, silu_mul=LigerSiLUMulFunction,
                                 swiglu_forward=swiglu_forward, swiglu_backward=swiglu_backward)


def peft_inner(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def why_unsupported(model: nn.Module) -> Optional[str]:
    """None if `fused_forward` computes exactly what this model computes; else the reason it does not."""
    lm = peft_inner(model)
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
        for proj in projections(layer):
            reason = _projection_problem(proj)
            if reason:
                return reason
    return None


def projections(layer):
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
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"LoRA dropout module {type(dropout).__name__}"
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
