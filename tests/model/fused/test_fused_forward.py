"""The fused training forward (model/fused/) changes how the step is computed, never what is learned.

Each test compares loss and LoRA gradients of `train.fused_layers` with the plain transformers + PEFT
forward on a tiny model, on the CPU in fp32 (rtol 1e-4 on the loss and every gradient). The Triton
(liger) and flash-attention kernels only run on CUDA: test_fused_cuda.py checks them on the GPU host.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fused_helpers import (QUIET, assert_same, give_lora_B_values, loss_and_grads, plain_then_fused, rows,
                           tiny_lora_model, train_cfg)
from loraforge.config import LoraSettings
from loraforge.model.fused import apply_fast_paths
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate, collate_packed, split_by_tokens, trained_tokens


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("batch_fn", [collate_packed, collate], ids=["packed", "padded"])
def test_fused_forward_equals_plain_path(batch_fn, checkpointing):
    model = tiny_lora_model(checkpointing=checkpointing)
    plain, fused = plain_then_fused(model, batch_fn, rows(), train_cfg(gradient_checkpointing=checkpointing))
    assert_same(plain, fused)


@pytest.mark.parametrize("checkpointing,keep", [(True, "auto"), (True, "on"), (False, "auto")],
                         ids=["checkpointed", "checkpointed-keep-attention", "no-checkpoints"])
@pytest.mark.parametrize("lora", [dict(dropout=0.3), dict(dropout=0.1, targets=["q_proj", "v_proj", "down_proj"],
                                                          r=8, alpha=16, use_rslora=True)], ids=["all7", "some-rslora"])
def test_lora_dropout_equals_peft_given_the_same_masks(lora, checkpointing, keep):
    """Dropout on the LoRA input: with the same generator state the fused nodes draw PEFT's masks (in
    PEFT's order q, k, v, o, gate, up, down), and the layer checkpoint's recompute draws them again, also
    where it takes the kept attention and skips the o/down outputs."""
    model = tiny_lora_model(checkpointing=checkpointing, **lora)
    data = rows()
    other_masks = loss_and_grads(model, collate_packed(data, 0), trained_tokens(data), seed=8)
    cfg = train_cfg(gradient_checkpointing=checkpointing, keep_activations=keep)
    plain, fused = plain_then_fused(model, collate_packed, data, cfg, plain_fn=collate_packed, seed=7)
    assert not torch.allclose(other_masks[0], plain[0], rtol=1e-3)  # dropout is really on: masks move the loss
    assert_same(plain, fused)


@pytest.mark.parametrize("keep", ["auto", "on"])
def test_fused_forward_with_grouped_query_attention_and_attention_only_targets(keep):
    model = tiny_lora_model(kv_heads=1, targets="attention")
    plain, fused = plain_then_fused(model, collate_packed, rows(), train_cfg(keep_activations=keep))
    assert_same(plain, fused)


@pytest.mark.parametrize("batch_fn", [collate_packed, collate], ids=["packed", "padded"])
def test_kept_attention_and_skipped_outputs_leave_loss_and_gradients_unchanged(batch_fn, monkeypatch):
    """keep_activations on: checkpoints keep the attention output and softmax statistics, the q/k/v and up outputs;
    their recompute runs no attention forward and no q/k/v or up matmul, and, like every recompute, no
    o_proj / down_proj output (counted here); loss and gradients stay the same."""
    from loraforge.model.fused import attention_kernels, projection

    calls = {"attention": 0, "weights": 0}
    forward, dense = attention_kernels.MathKernel.forward, projection.dense_weight
    monkeypatch.setattr(attention_kernels.MathKernel, "forward",
                        lambda *a: calls.__setitem__("attention", calls["attention"] + 1) or forward(*a))
    monkeypatch.setattr(projection, "dense_weight", lambda *a: calls.__setitem__("weights", calls["weights"] + 1) or dense(*a))
    model = tiny_lora_model()
    data = rows()
    plain = loss_and_grads(model, collate(data, 0), trained_tokens(data))
    counted = {}
    for keep in ("off", "on"):
        apply_fast_paths(model, train_cfg(keep_activations=keep), "cpu", say=QUIET)
        calls.update(attention=0, weights=0)
        fused = loss_and_grads(model, batch_fn(data, 0), trained_tokens(data))
        assert_same(plain, fused)
        counted[keep] = dict(calls)
    layers = 2  # per layer: 7 weights in forward, 7 in backward; in the recompute 5 (no o, no down), or 1 (gate)
    assert counted["off"] == {"attention": 2 * layers, "weights": 19 * layers}
    assert counted["on"] == {"attention": layers, "weights": 15 * layers}


@pytest.mark.parametrize("double_quant,targets,dropout", [(True, "all-linear", 0.0), (False, ["q_proj", "v_proj"], 0.1)],
                         ids=["double-all", "single-qv-dropout"])
def test_fused_forward_on_nf4_weights(tmp_path, double_quant, targets, dropout):
    """The real set-up: NF4 base through bitsandbytes (CPU kernels), LoRA in fp32, q/k/v weights stacked
    into one buffer (QuantGroup, with or without double quantization), also where only some
    projections have LoRA, with the guanaco recipe's kind of dropout."""
    from loraforge.config import ModelSettings
    from loraforge.model.load import load_base_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    base = load_base_model(ModelSettings(base=str(tmp_path), double_quant=double_quant), torch.float32, "cpu",
                           str(tmp_path))
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = attach_lora(base, LoraSettings(r=4, dropout=dropout, targets=targets))
    give_lora_B_values(model)
    model.train()
    data = rows()
    with torch.no_grad():
        logits_before = model.eval()(**collate(data, 0)).logits
    model.train()
    plain, fused = plain_then_fused(model, collate_packed, data, plain_fn=collate_packed, seed=3)
    switched = " ".join(apply_fast_paths(model, train_cfg(), "cpu", say=QUIET).on)
    assert "q/k/v NF4 weights stacked (2 layers)" in switched
    for layer in model.get_base_model().model.layers:
        attn = layer.self_attn
        assert attn._loraforge_qkv_group.matches([getattr(m, "base_layer", m)
                                                  for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    assert_same(plain, fused)
    model.eval()  # the plain forward still reads the same weights after they were stacked
    with torch.no_grad():
        assert torch.equal(model(**collate(data, 0)).logits, logits_before)


def test_accumulated_token_capped_parts_equal_one_pass():
    model = tiny_lora_model()
    data = rows()
    n = trained_tokens(data)
    apply_fast_paths(model, train_cfg(), "cpu", say=QUIET)
    whole = loss_and_grads(model, collate_packed(data, 0), n)
    parts = split_by_tokens(data, 20)
    assert len(parts) > 1 and [r for p in parts for r in p] == data
    model.zero_grad()
    total = 0.0
    for part in parts:
        loss = micro_batch_loss(model, collate_packed(part, 0), n)
        loss.backward()
        total = total + loss.detach()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert_same(whole, (total, grads))


def test_eval_and_disabled_adapter_use_the_model_s_own_forward():
    model = tiny_lora_model(dropout=0.1)
    batch = collate(rows(), 0)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    apply_fast_paths(model, train_cfg(), "cpu", say=QUIET)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits is not None and torch.allclose(out.logits, ref)
    model.train()
    with model.disable_adapter():
        assert model(**batch).logits is not None  # the fused path returns no logits


def test_loss_curve_of_the_new_defaults_equals_the_old_plain_path():
    """A few optimizer steps: padded rows through the plain path (the old defaults) and packed rows through
    the fused path (the new defaults on CUDA) give the same loss curve, up to fp32 rounding."""
    data = [rows(seed=s) for s in range(4)]

    def curve(fused: bool):
        model = tiny_lora_model()
        if fused:
            apply_fast_paths(model, train_cfg(), "cpu", say=QUIET)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step_rows in data:
            batch = (collate_packed if fused else collate)(step_rows, 0)
            loss = micro_batch_loss(model, batch, trained_tokens(step_rows))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses

    old, new = curve(False), curve(True)
    assert old[-1] != old[0]  # it trains
    assert new == pytest.approx(old, rel=1e-4)
