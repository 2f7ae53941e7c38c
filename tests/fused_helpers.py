"""Shared by the fused-path tests (tests/model/fused/): a tiny LoRA Llama, rows, and loss + gradients.

Tolerances: fp32 on the CPU, rtol 1e-4 on the loss and every LoRA gradient.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.config import LoraSettings, TrainSettings
from loraforge.model.fused import apply_fast_paths
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate, trained_tokens

LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-4, 1e-6
QUIET = lambda *_: None  # noqa: E731


def rows(lengths=((9, 4), (17, 6), (5, 2), (12, 12)), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in lengths:
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n - 1) + ids[min(prompt, n - 1):]
        out.append({"input_ids": ids, "labels": labels})
    return out


def tiny_lora_model(kv_heads=2, checkpointing=True, **lora):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    model = attach_lora(LlamaForCausalLM(cfg), LoraSettings(**{"r": 4, "dropout": 0.0, **lora}),
                        gradient_checkpointing=checkpointing)
    give_lora_B_values(model)
    model.train()
    return model


def give_lora_B_values(model, std=0.1):
    """B starts at zero; give it values so gradients reach A too."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)


def train_cfg(**kw):
    return TrainSettings(**{"fused_layers": "on", "liger_kernels": "auto", **kw})


def loss_and_grads(model, batch, n_items, seed=None):
    if seed is not None:  # the dropout masks come from the generator state
        torch.manual_seed(seed)
    model.zero_grad()
    loss = micro_batch_loss(model, batch, n_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=LOSS_RTOL), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL), name


def plain_then_fused(model, batch_fn, data, cfg=None, plain_fn=collate, seed=None):
    n = trained_tokens(data)
    plain = loss_and_grads(model, plain_fn(data, 0), n, seed)
    assert apply_fast_paths(model, cfg or train_cfg(), "cpu", say=QUIET).on
    fused = loss_and_grads(model, batch_fn(data, 0), n, seed)
    return plain, fused
