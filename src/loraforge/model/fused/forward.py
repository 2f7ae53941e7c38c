"""The fused training forward of a Llama-family model: same loss and gradients as transformers + PEFT.

`fused_forward` replaces LlamaForCausalLM.forward in training (install.apply_fast_paths): the
micro-batch becomes one padding-free stream (attention.pack_batch), each half decoder layer
(attention, MLP) runs its projections as fused LoRA nodes (projection) and its attention through the kernel
chosen at install (attention_kernels) under its own checkpoint (offload.LayerCheckpoint, whose Memo says what
the recompute may skip), and the loss is the chunked linear + cross-entropy (loss). Evaluation, generation and
anything with the adapter disabled use the model's own forward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.model.fused.attention import attend, pack_batch
from loraforge.model.fused.elementwise import rms_norm, rope
from loraforge.model.fused.loss import LinearCrossEntropy
from loraforge.model.fused import keep
from loraforge.model.fused.keep import Memo
from loraforge.model.fused.offload import CheckpointStore, LayerCheckpoint, device_rates
from loraforge.model.fused.projection import project, swiglu_down
from loraforge.model.fused import support


@dataclass
class FastSettings:
    liger: bool
    checkpoint: bool
    offload: bool
    dropout: bool = False  # some LoRA dropout > 0: checkpoints keep the generator state for the recompute
    kernel: object = None  # attention_kernels' kernel (None: per-sequence SDPA)
    keep_activations: str = "off"  # auto | on | off: what checkpoints keep besides their input (keep.plan)


@dataclass
class Step:
    """What every block of one forward shares."""
    cos: torch.Tensor
    sin: torch.Tensor
    seg: object
    liger: object
    kernel: object


def attention_block(layer: nn.Module, h: torch.Tensor, step: Step, memo: Memo = None) -> torch.Tensor:
    """h + self-attention(norm(h)) of one Llama decoder layer, on a packed (T, hidden) stream."""
    attn = layer.self_attn
    n = h.shape[0]
    head_dim = attn.head_dim
    x = rms_norm(h, layer.input_layernorm)
    group = getattr(attn, "_loraforge_qkv_group", None)
    modules = [attn.q_proj, attn.k_proj, attn.v_proj]
    # liger's RoPE writes into contiguous q/k: the separate (ungrouped) outputs are kept only without it
    grouped = group is not None and group.matches([getattr(m, "base_layer", m) for m in modules])
    q, k, v = project(x, modules, group, memo=memo, kind="qkv" if grouped or step.liger is None else None)
    q, k, v = q.view(n, -1, head_dim), k.view(n, -1, head_dim), v.view(n, -1, head_dim)
    q, k = rope(q, k, step.cos, step.sin, step.liger)
    o = attend(q, k, v, step.seg, attn.scaling, step.kernel, memo)
    (o,) = project(o.reshape(n, -1), [attn.o_proj], skip_output=_recomputing(memo))
    return h + o


def mlp_block(layer: nn.Module, h: torch.Tensor, step: Step, memo: Memo = None) -> torch.Tensor:
    """h + MLP(norm(h)) of one Llama decoder layer."""
    mlp = layer.mlp
    x = rms_norm(h, layer.post_attention_layernorm)
    g, u = project(x, [mlp.gate_proj, mlp.up_proj], memo=memo, kind="up", keep_outputs=[1])
    return h + swiglu_down(g, u, mlp.down_proj, step.liger, skip_output=_recomputing(memo))


def _recomputing(memo) -> bool:
    return memo is not None and memo.recomputing


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
    liger = support.liger_ops() if settings.liger and ids.is_cuda else None
    with torch.autocast(ids.device.type, enabled=False):
        h = body.embed_tokens(ids)  # (T, hidden); frozen, so it needs grad only as the layers' input
        cos, sin = body.rotary_emb(h[None], positions[None])
        cos, sin = cos[0], sin[0]
        if settings.checkpoint and not h.requires_grad:
            h = h.detach().requires_grad_(True)
        step = Step(cos, sin, seg, liger, settings.kernel)
        store = plan = None
        if settings.checkpoint:
            store = CheckpointStore(h.device, settings.offload, tokens=h.shape[0])
            measure = store.offload and settings.keep_activations == "auto" and h.shape[0] >= keep.KEEP_MIN_TOKENS
            rates = device_rates(h.device) if measure else (0.0, 0.0)
            plan = keep.plan(settings.keep_activations, store.offload, seg.lengths(), self.config, h.element_size(),
                             rates, attention=settings.kernel is not None)
        for i, layer in enumerate(body.layers):
            # Checkpoints at each half layer: the recompute of one half never holds the other's activations.
            for block in (attention_block, mlp_block):
                run = functools.partial(block, layer, step=step)
                if settings.checkpoint:
                    h = LayerCheckpoint.apply(h, run, store, settings.dropout, plan, i)
                else:
                    h = run(h)
        h = rms_norm(h, body.norm)
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
