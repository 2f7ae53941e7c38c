"""The fused QLoRA training path for Llama-family models: same loss and gradients, fewer launches, less memory.

Each piece reads alone:
- `support`: which models and machines it can run on (`why_unsupported`, liger-kernel's ops);
- `weights`: NF4/FP4 base weights dequantized on the fly, q/k/v stacked in one buffer (`QuantGroup`);
- `projection`: the QLoRA projection nodes - base matmul + LoRA with PEFT's dropout, one autograd node
  per group of projections sharing an input, and down_proj fused with SiLU-mul;
- `attention`: the packed, padding-free stream and attention over it (kept output + statistics in checkpoints);
- `attention_kernels`: cuDNN (long sequences, Hopper), FlashAttention-2 varlen, explicit softmax (CPU), the choice;
- `elementwise`: RMSNorm (torch's CUDA kernel), RoPE, SiLU-mul (liger's Triton kernels on CUDA), torch elsewhere;
- `loss`: chunked linear + cross-entropy;
- `keep`: what a checkpoint keeps beyond its input so the recompute does less (`train.keep_activations`);
- `offload`: half-layer checkpoints, optionally in pinned CPU memory;
- `forward`: the decoder forward that puts them together;
- `install`: `apply_fast_paths`, which switches it on as the config asks and reports what is off and why.

Equality with the plain transformers + PEFT path is tested on the CPU (tests/model/fused/) and, for
the GPU kernels, on the device host (docs/perf-notes.md).
"""
from loraforge.model.fused.install import FastPathReport, apply_fast_paths
from loraforge.model.fused.support import why_unsupported

__all__ = ["FastPathReport", "apply_fast_paths", "why_unsupported"]
