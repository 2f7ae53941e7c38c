"""Rules between config keys: contradictions a config can hold although every key is valid on its own.

`config.RunConfig` runs `cross_check` when it validates, so every problem is reported with the others,
before anything loads. Kept beside config.py (the schema) so that the rules read in one place.
"""
from __future__ import annotations

def cross_check(cfg) -> list[str]:
    """Contradictions between keys of `cfg` (a config.RunConfig), each as 'key.path: problem'; all of them, before anything loads.

    Only what follows from the config alone: whether the machine has CUDA or the model suits the
    fused path is checked when the model is there (model/fused/install.py).
    """
    t, problems = cfg.train, []
    if t.early_stopping_patience and not t.eval_steps:
        problems.append("train.early_stopping_patience: needs train.eval_steps")
    if t.fused_layers == "off":
        for key in ("liger_kernels", "offload_activations", "keep_activations"):
            if getattr(t, key) == "on":
                problems.append(f"train.{key}: on needs the fused path, but train.fused_layers is off")
        if t.attention_kernel == "cudnn":
            problems.append("train.attention_kernel: cudnn is the fused path's, but train.fused_layers is off")
    for key, what in (("offload_activations", "offloads the layer checkpoints"),
                      ("keep_activations", "keeps activations for the checkpoints' recompute")):
        if getattr(t, key) == "on" and not t.gradient_checkpointing:
            problems.append(f"train.{key}: on {what}, so it needs train.gradient_checkpointing: true")
    if t.fsdp_cpu_offload and t.distributed != "fsdp":
        problems.append("train.fsdp_cpu_offload: needs train.distributed: fsdp")
    if t.distributed == "fsdp":
        for key in ("fused_layers", "liger_kernels", "offload_activations", "keep_activations", "attention_kernel"):
            if getattr(t, key) in ("on", "cudnn"):
                problems.append(f"train.{key}: {getattr(t, key)} needs the fused forward, which reads whole weights: it "
                                "does not run with train.distributed: fsdp (sharded weights); leave it 'auto', or use ddp")
    if t.fused_layers == "on":
        if cfg.model.quantization == "int8":
            problems.append("train.fused_layers: on does not run bitsandbytes 8-bit layers "
                            "(model.quantization: int8); use nf4/fp4/none, or fused_layers: auto/off")
        if cfg.lora.use_dora:
            problems.append("train.fused_layers: on does not run DoRA (lora.use_dora); use auto or off")
        if cfg.lora.bias != "none":
            problems.append("train.fused_layers: on trains no biases (lora.bias); use bias: none, or auto/off")
    return problems
