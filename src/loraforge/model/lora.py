"""Attach LoRA adapters with PEFT, after freezing and preparing the (quantized) base for training."""
from __future__ import annotations

import torch
from torch import nn

from loraforge.config import LoraSettings
from loraforge.errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
OUTPUT_LAYERS = ("lm_head",)


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers (plain or bitsandbytes) in the decoder, in first-seen order."""
    names: dict[str, None] = {}
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and leaf not in OUTPUT_LAYERS:
            names.setdefault(leaf)
    return list(names)


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """`attention` -> q/k/v/o; `all-linear` -> every linear layer but the output head; or named layers, checked."""
    available = linear_module_names(model)
    if targets == "all-linear":
        return available
    if targets == "attention":
        found = [n for n in ATTENTION_PROJECTIONS if n in available]
        if not found:
            raise UserError(f"lora.targets: this model has no q/k/v/o projections; its linear layers are {available}")
        return found
    missing = [t for t in targets if t not in available and t not in OUTPUT_LAYERS]
    if missing:
        raise UserError(f"lora.targets: {missing} not found in the model; its linear layers are {available}")
    return list(targets)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """Freeze the base and set up checkpointing.

    Done by hand rather than peft.prepare_model_for_kbit_training, which upcasts every
    non-quantized weight (embeddings, lm_head) to fp32: ~1 GB more on a 7B model for nothing.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def attach_lora(model: nn.Module, cfg: LoraSettings, gradient_checkpointing: bool = True):
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, cfg.targets)
    prepare_for_training(model, gradient_checkpointing)
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    # Adapters train in fp32 whatever the base's dtype: small, and stable under fp16/bf16 autocast.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the number of values they hold (whatever their storage dtype)."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
