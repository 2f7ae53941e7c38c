"""Switching the fused path on: what `train.fused_layers / liger_kernels / offload_activations` become here.

Config-only contradictions (offload without checkpointing, liger on with fused off, ...) are
rejected by `loraforge.config` before anything loads; what is left here depends on the machine
(CUDA, liger-kernel installed) or on the loaded model (`support.why_unsupported`). Every `auto`
that ends up off says so in one line, and the result (`FastPathReport`) goes into the run's summary.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

from torch import nn

from loraforge.errors import UserError
from loraforge.model.fused import attention_kernels, support
from loraforge.model.fused.forward import FastSettings, fused_forward
from loraforge.model.fused.projection import projection
from loraforge.model.fused import weights


@dataclass
class FastPathReport:
    on: list[str] = field(default_factory=list)
    off: dict[str, str] = field(default_factory=dict)  # fast path -> why it is off

    def as_dict(self) -> dict:
        return {"on": list(self.on), "off": dict(self.off)}


def apply_fast_paths(model: nn.Module, train_cfg, device: str, say=print) -> FastPathReport:
    """Install the fused training forward as `train_cfg` asks; returns what is on and what is off (and why).

    `train.fused_layers`: auto (on for supported models on CUDA) | on | off.
    `train.liger_kernels`: auto (on where liger-kernel imports, on CUDA) | on | off.
    `train.offload_activations`: auto (on with the fused path and checkpointing, on CUDA) | on | off.
    `train.attention_kernel`: auto (cuDNN for long sequences on Hopper or newer where its check passes,
    FlashAttention-2 for the rest) | cudnn | flash.
    `train.keep_activations`: auto (checkpoints keep attention, q/k/v and up outputs within copy time: keep.plan)
    | on | off.
    """
    report = FastPathReport()
    on_gpu = device.startswith("cuda")
    mode = train_cfg.fused_layers
    reason = support.why_unsupported(model) if mode != "off" else None
    if mode == "on" and reason:
        raise UserError(f"train.fused_layers: on, but this set-up is not supported: {reason}. Use 'auto' or 'off'")
    if mode == "off" or (mode == "auto" and (not on_gpu or reason)):
        why = "train.fused_layers: off" if mode == "off" else (reason or "no CUDA GPU: the fused path is for CUDA")
        for key, name in (("liger_kernels", "liger kernels"), ("offload_activations", "CPU-offloaded checkpoints")):
            if getattr(train_cfg, key) == "on":
                raise UserError(f"train.{key}: on needs the fused path, which is off here because: {why}")
        report.off["fused layers"] = why
        if mode == "auto":
            say(f"fast paths off: fused layers ({why}); training runs the plain transformers + PEFT forward")
        _record(model, report)
        return report

    liger = train_cfg.liger_kernels
    if liger == "on":
        if not on_gpu:
            raise UserError("train.liger_kernels: on needs a CUDA GPU (liger-kernel is Triton); use 'auto' or 'off'")
        if support.liger_ops() is None:
            raise UserError("train.liger_kernels: on, but liger-kernel is not installed (pip install liger-kernel)")
    use_liger = on_gpu and liger != "off" and support.liger_ops() is not None
    if not use_liger:
        report.off["liger kernels"] = ("train.liger_kernels: off" if liger == "off" else
                                       "no CUDA GPU" if not on_gpu else "liger-kernel is not installed")

    offload = train_cfg.offload_activations
    if offload == "on" and not on_gpu:
        raise UserError("train.offload_activations: on needs a CUDA GPU; use 'auto' or 'off'")
    use_offload = on_gpu and train_cfg.gradient_checkpointing and offload != "off"
    if not use_offload:
        report.off["CPU-offloaded checkpoints"] = (
            "train.offload_activations: off" if offload == "off" else "no CUDA GPU" if not on_gpu
            else "train.gradient_checkpointing is false")

    lm = support.peft_inner(model)
    grouped = weights.group_quantized_projections(lm)
    if on_gpu and weights.has_4bit_weights(lm) and weights.cuda_impls() is None:
        report.off["direct NF4 dequantize"] = (
            "this bitsandbytes' CUDA dequantize functions are not the ones loraforge calls: through its ops, "
            "~15 us more host time per weight use")
    dropout = any(projection(m).dropout > 0 for layer in lm.model.layers for m in support.projections(layer))
    kernel, attention_on, keep = _attention(lm, train_cfg, on_gpu, report)
    lm._loraforge_fast = FastSettings(liger=use_liger, checkpoint=train_cfg.gradient_checkpointing,
                                      offload=use_offload, dropout=dropout, kernel=kernel, keep_activations=keep)
    if not hasattr(lm, "_loraforge_original_forward"):
        lm._loraforge_original_forward = lm.forward
    lm.forward = types.MethodType(fused_forward, lm)
    report.on += ["fused layers", *attention_on, "chunked CE"]
    if dropout:
        report.on.append("LoRA dropout in the fused nodes")
    if grouped:
        report.on.append(f"q/k/v NF4 weights stacked ({grouped} layers)")
    if use_liger:
        report.on.append("liger RoPE/SiLU-mul")
    if use_offload:
        report.on.append("CPU-offloaded checkpoints")
    say("fast paths: " + ", ".join(report.on))
    asked_off = {"liger kernels": liger == "off", "CPU-offloaded checkpoints": offload == "off",
                 "cuDNN attention": train_cfg.attention_kernel == "flash",
                 "kept attention": train_cfg.keep_activations == "off"}
    auto_off = {k: v for k, v in report.off.items() if not asked_off.get(k, False)}
    if auto_off:
        say("fast paths off: " + "; ".join(f"{k} ({v})" for k, v in auto_off.items()))
    _record(model, report)
    return report


def _attention(lm: nn.Module, train_cfg, on_gpu: bool, report: FastPathReport):
    """The attention kernel, its report lines, and what checkpoints keep (train.attention_kernel, keep_activations)."""
    config = lm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = lm.model.embed_tokens.weight.dtype
    kernel, off = attention_kernels.choose_kernel(on_gpu, dtype, heads, getattr(config, "num_key_value_heads", None)
                                                  or heads, head_dim, train_cfg.attention_kernel)
    if train_cfg.attention_kernel == "cudnn" and "cuDNN attention" in off:
        raise UserError(f"train.attention_kernel: cudnn, but cuDNN attention does not run here: "
                        f"{off['cuDNN attention']}. Use 'auto' or 'flash'")
    report.off.update(off)
    on = {"cudnn": [f"cuDNN attention (sequences >= {attention_kernels.CUDNN_MIN_LEN} tokens; FlashAttention-2 below)"],
          "flash": ["FlashAttention-2 varlen attention"], "math": ["packed attention"]}.get(
              getattr(kernel, "name", None), ["per-sequence SDPA"])
    keep = train_cfg.keep_activations if train_cfg.gradient_checkpointing else "off"
    if keep != "off":
        what = "attention, q/k/v, up outputs" if kernel is not None else "q/k/v, up outputs"
        on.append(f"kept activations ({what}; {'within copy time' if keep == 'auto' else 'all'})")
        if kernel is None:
            report.off["kept attention"] = ("needs the flash or cuDNN kernels' softmax statistics; "
                                            "per-sequence SDPA runs here")
    return kernel, on, keep


def _record(model: nn.Module, report: FastPathReport) -> None:
    support.peft_inner(model)._loraforge_fast_report = report
