"""Packing changes the layout of a micro-batch, never what is learned: same loss, same gradients."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.config import LoraSettings
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate, collate_packed, trained_tokens


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in [(9, 4), (17, 6), (5, 2), (12, 12)]:  # the last row trains every token
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n - 1) + ids[min(prompt, n - 1):]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _loss_and_grads(model, batch, n_items):
    model.zero_grad()
    loss = micro_batch_loss(model, batch, n_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_equals_padded_in_loss_and_gradients():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = attach_lora(LlamaForCausalLM(cfg), LoraSettings(r=4, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():  # B starts at zero; give it values so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    rows = _rows()
    n = trained_tokens(rows)
    padded_loss, padded_grads = _loss_and_grads(model, collate(rows, pad_id=0), n)
    packed_loss, packed_grads = _loss_and_grads(model, collate_packed(rows, pad_id=0), n)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, g in padded_grads.items():
        assert torch.allclose(packed_grads[name], g, rtol=1e-4, atol=1e-6), name
    # And the packing really is one padding-free row.
    assert collate_packed(rows, 0)["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))


def test_without_block_mask_sequences_would_leak():
    """Guard for the test above: if positions did not restart, the loss would differ."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    rows = _rows()
    packed = collate_packed(rows, 0)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    n = trained_tokens(rows)
    with torch.no_grad():
        good = micro_batch_loss(model, packed, n)
        bad = micro_batch_loss(model, leaky, n)
        ref = micro_batch_loss(model, collate(rows, 0), n)
    assert torch.allclose(good, ref, rtol=1e-5)
    assert not torch.allclose(bad, ref, rtol=1e-5)  # leaking changes the loss far beyond the tolerance above
