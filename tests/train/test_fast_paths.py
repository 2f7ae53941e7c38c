"""The fast training paths change how the step is computed, never what is learned.

Each test compares loss and LoRA gradients of `train.fused_layers` (model/kernels.py) with the plain
transformers + PEFT forward on a tiny model, on the CPU in fp32 (tolerance: rtol 1e-4 on the loss and
the gradients). The Triton (liger) and flash-attention kernels only run on CUDA: their equality is
checked on the GPU host by scripts/device_check_kernels.py and recorded in docs/perf-notes.md; here
we check that they are switched on only where they can run.
"""
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.config import LoraSettings, RunConfig, TrainSettings
from loraforge.errors import UserError
from loraforge.model import kernels
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate, collate_packed, split_by_tokens, trained_tokens

LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-4, 1e-6


def _rows(lengths=((9, 4), (17, 6), (5, 2), (12, 12)), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, prompt in lengths:
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        labels = [-100] * min(prompt, n - 1) + ids[min(prompt, n - 1):]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model(kv_heads=2, dropout=0.0, targets="all-linear", checkpointing=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    model = attach_lora(LlamaForCausalLM(cfg), LoraSettings(r=4, dropout=dropout, targets=targets),
                        gradient_checkpointing=checkpointing)
    for name, p in model.named_parameters():  # B starts at zero; give it values so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model


def _train_cfg(**kw):
    return TrainSettings(**{"fused_layers": "on", "liger_kernels": "auto", **kw})


def _loss_and_grads(model, batch, n_items):
    model.zero_grad()
    loss = micro_batch_loss(model, batch, n_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=LOSS_RTOL), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL), name


def _plain_then_fused(model, batch_fn, rows, train_cfg=None):
    n = trained_tokens(rows)
    plain = _loss_and_grads(model, collate(rows, 0), n)
    assert kernels.apply_fast_paths(model, train_cfg or _train_cfg(), "cpu", say=lambda *_: None)
    fused = _loss_and_grads(model, batch_fn(rows, 0), n)
    return plain, fused


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("batch_fn", [collate_packed, collate], ids=["packed", "padded"])
def test_fused_forward_equals_plain_path(batch_fn, checkpointing):
    model = _model(checkpointing=checkpointing)
    plain, fused = _plain_then_fused(model, batch_fn, _rows(),
                                     _train_cfg(gradient_checkpointing=checkpointing))
    _assert_same(plain, fused)


def test_fused_forward_with_grouped_query_attention_and_attention_only_targets():
    model = _model(kv_heads=1, targets="attention")
    plain, fused = _plain_then_fused(model, collate_packed, _rows())
    _assert_same(plain, fused)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]], ids=["all", "some"])
def test_fused_forward_on_nf4_weights(tmp_path, targets):
    """The real set-up: NF4 double-quant base through bitsandbytes (CPU kernels), LoRA in fp32, q/k/v
    weights stacked into one buffer (QuantGroup), also where only some projections have LoRA."""
    from loraforge.config import ModelSettings
    from loraforge.model.load import load_base_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    base = load_base_model(ModelSettings(base=str(tmp_path)), torch.float32, "cpu", str(tmp_path))
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = attach_lora(base, LoraSettings(r=4, dropout=0.0, targets=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    rows = _rows()
    with torch.no_grad():
        logits_before = model(**collate(rows, 0)).logits
    plain, fused = _plain_then_fused(model, collate_packed, rows)
    switched = " ".join(kernels.apply_fast_paths(model, _train_cfg(), "cpu", say=lambda *_: None))
    assert "q/k/v NF4 weights stacked (2 layers)" in switched
    for layer in model.get_base_model().model.layers:
        assert layer.self_attn._loraforge_qkv_group.matches(
            [getattr(m, "base_layer", m) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)])
    _assert_same(plain, fused)
    model.eval()  # the plain forward still reads the same weights after they were stacked
    with torch.no_grad():
        assert torch.equal(model(**collate(rows, 0)).logits, logits_before)


def test_accumulated_token_capped_parts_equal_one_pass():
    model = _model()
    rows = _rows()
    n = trained_tokens(rows)
    kernels.apply_fast_paths(model, _train_cfg(), "cpu", say=lambda *_: None)
    whole = _loss_and_grads(model, collate_packed(rows, 0), n)
    parts = split_by_tokens(rows, 20)
    assert len(parts) > 1 and [r for p in parts for r in p] == rows
    model.zero_grad()
    total = 0.0
    for part in parts:
        loss = micro_batch_loss(model, collate_packed(part, 0), n)
        loss.backward()
        total = total + loss.detach()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    _assert_same(whole, (total, grads))


def test_split_by_tokens_keeps_order_and_cap():
    rows = [{"input_ids": [0] * n} for n in (300, 500, 100, 900, 50, 2000, 10)]
    parts = split_by_tokens(rows, 1024)
    assert [r for p in parts for r in p] == rows
    for p in parts:
        assert len(p) == 1 or sum(len(r["input_ids"]) for r in p) <= 1024
    assert split_by_tokens(rows[:2], 1024) == [rows[:2]]


def test_linear_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr(kernels, "CE_CHUNK_ELEMENTS", 7 * 50)  # chunks of 7 tokens, a ragged last one
    torch.manual_seed(1)
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(50, 16)
    t = torch.randint(0, 50, (30,))
    t[[0, 5, 29]] = -100
    got = kernels.LinearCrossEntropy.apply(h, w, t, 1 / 23)
    (gh,) = torch.autograd.grad(got, h)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum", ignore_index=-100) / 23
    (rh,) = torch.autograd.grad(ref, h)
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, rtol=1e-5, atol=1e-7)


def test_eval_and_disabled_adapter_use_the_model_s_own_forward():
    model = _model()
    rows = _rows()
    batch = collate(rows, 0)
    with torch.no_grad():
        ref = model(**batch).logits
    kernels.apply_fast_paths(model, _train_cfg(), "cpu", say=lambda *_: None)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits is not None and torch.allclose(out.logits, ref)
    model.train()
    with model.disable_adapter():
        assert model(**batch).logits is not None  # the fused path returns no logits


def test_switches_validate_and_stay_off_where_they_cannot_run():
    model = _model()
    say = lambda *_: None  # noqa: E731
    assert kernels.apply_fast_paths(model, TrainSettings(), "cpu", say) == []  # auto: CUDA only
    with pytest.raises(UserError, match="liger_kernels"):
        kernels.apply_fast_paths(model, _train_cfg(liger_kernels="on"), "cpu", say)
    with pytest.raises(UserError, match="offload_activations"):
        kernels.apply_fast_paths(model, _train_cfg(offload_activations=True), "cpu", say)
    with pytest.raises(UserError, match="offload_activations"):
        kernels.apply_fast_paths(model, TrainSettings(offload_activations=True), "cpu", say)
    switched = kernels.apply_fast_paths(model, _train_cfg(), "cpu", say)
    assert "fused layers" in switched and not any("liger" in s for s in switched)
    with pytest.raises(Exception):
        RunConfig.model_validate({"train": {"liger_kernels": "yes"}})


def test_unsupported_set_ups_fall_back_or_refuse():
    model = _model(dropout=0.1)
    assert "dropout" in kernels.why_unsupported(model)
    assert kernels.apply_fast_paths(model, _train_cfg(fused_layers="auto"), "cuda", lambda *_: None) == []
    with pytest.raises(UserError, match="dropout"):
        kernels.apply_fast_paths(model, _train_cfg(), "cpu", lambda *_: None)


def test_liger_is_used_only_on_cuda_tensors(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(rms_norm=None, rope=None, silu_mul=None)
    monkeypatch.setattr(kernels, "liger_ops", lambda: calls.append(1) or fake)
    model = _model()
    rows = _rows()
    kernels.apply_fast_paths(model, _train_cfg(), "cuda", say=lambda *_: None)  # as on a GPU host...
    assert model.get_base_model()._loraforge_fast.liger and calls
    # ...but these tensors are on the CPU: the torch ops run (the fake kernels would fail if called)
    micro_batch_loss(model, collate_packed(rows, 0), trained_tokens(rows)).backward()


# --- on a CUDA GPU (the device host): the Triton and flash kernels against the torch reference ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@cuda
def test_cuda_kernels_match_torch_reference():
    """liger RMSNorm/RoPE/SiLU-mul and varlen flash attention vs the torch ops in fp32; prints the errors."""
    dev, bf = "cuda", torch.bfloat16
    liger = kernels.liger_ops()
    torch.manual_seed(0)
    T, H, D = 700, 8, 128
    errors = {}
    if liger is not None:
        x = torch.randn(T, H * D, device=dev, dtype=bf, requires_grad=True)
        norm = torch.nn.Module()
        norm.weight = torch.nn.Parameter(torch.rand(H * D, device=dev, dtype=bf) + 0.5, requires_grad=False)
        norm.variance_epsilon = 1e-5
        dy = torch.randn(T, H * D, device=dev, dtype=bf)
        got = kernels.rms_norm(x, norm, liger)
        (gx,) = torch.autograd.grad(got, x, dy.clone())  # liger writes dX over dY
        xr = x.detach().double().requires_grad_(True)
        ref = norm.weight.double() * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5))
        (rx,) = torch.autograd.grad(ref, xr, dy.double())
        errors["rms_norm"], errors["rms_norm_grad"] = _rel(got, ref), _rel(gx, rx)

        q = torch.randn(T, H, D, device=dev, dtype=bf)
        k = torch.randn(T, H, D, device=dev, dtype=bf)
        pos = torch.cat([torch.arange(300), torch.arange(400)]).to(dev)
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
        ang = pos[:, None].float() * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().to(bf), emb.sin().to(bf)
        rq, rk = kernels.rope(q.double(), k.double(), cos.double(), sin.double(), None)
        gq, gk = kernels.rope(q.clone(), k.clone(), cos, sin, liger)
        errors["rope"] = max(_rel(gq, rq), _rel(gk, rk))

        g = torch.randn(T, 1000, device=dev, dtype=bf, requires_grad=True)
        u = torch.randn(T, 1000, device=dev, dtype=bf, requires_grad=True)
        dy = torch.randn(T, 1000, device=dev, dtype=bf)
        out = kernels.silu_mul(g.clone(), u.clone(), liger)
        gr, ur = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
        ref = torch.nn.functional.silu(gr) * ur
        dg, du = torch.autograd.grad(ref, (gr, ur), dy.double())
        g2, u2 = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
        got = kernels.silu_mul(g2 * 1, u2 * 1, liger)
        got_g, got_u = torch.autograd.grad(got, (g2, u2), dy)
        errors["silu_mul"] = _rel(out, ref)
        errors["silu_mul_grad"] = max(_rel(got_g, dg), _rel(got_u, du))

    lengths = [300, 17, 383]
    bounds = [0, 300, 317, 700]
    seg = kernels.Segments(bounds, torch.tensor(bounds, dtype=torch.int32, device=dev), max(lengths))
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    dout = torch.randn(T, H, D, device=dev, dtype=bf)
    got = kernels.packed_attention(q, k, v, seg, D ** -0.5, use_flash=True)
    gg = torch.autograd.grad(got, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = kernels.packed_attention(q64, k64, v64, seg, D ** -0.5, use_flash=False)
    rg = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    errors["varlen_flash"] = _rel(got, ref)
    errors["varlen_flash_grad"] = max(_rel(a, b) for a, b in zip(gg, rg))
    for name, err in errors.items():
        print(f"GPUCHECK {name} rel_err {err:.2e}")
    assert all(err < 2e-2 for err in errors.values()), errors


@cuda
def test_cuda_fused_forward_matches_plain_path_in_bf16(tmp_path):
    """Whole tiny model, NF4 base, bf16 under autocast, as training runs on a GPU: the fused path (liger,
    varlen flash, stacked q/k/v, offloaded checkpoints) against the plain transformers + PEFT path."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    from loraforge.config import ModelSettings
    from loraforge.model.load import load_base_model

    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    base = load_base_model(ModelSettings(base=str(tmp_path)), torch.bfloat16, "cuda", str(tmp_path))  # NF4
    model = attach_lora(base, LoraSettings(r=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    rows = _rows(lengths=((120, 10), (300, 30), (57, 5), (211, 211)))
    rows = [{"input_ids": [i % 512 for i in r["input_ids"]], "labels": [(i % 512) if i != -100 else -100 for i in r["labels"]]} for r in rows]
    n = trained_tokens(rows)
    acc = Accelerator(mixed_precision="bf16")
    model = acc.prepare(model)

    def run(batch):
        model.zero_grad()
        loss = micro_batch_loss(model, {k: v.cuda() for k, v in batch.items()}, n)
        loss.backward()
        return loss.detach().float(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}

    plain = run(collate(rows, 0))
    kernels.apply_fast_paths(model, _train_cfg(offload_activations=True), "cuda", say=print)
    fused = run(collate_packed(rows, 0))
    worst = max(_rel(fused[1][k], g) for k, g in plain[1].items())
    print(f"GPUCHECK tiny_model loss plain {float(plain[0]):.6f} fused {float(fused[0]):.6f} "
          f"rel {abs(float(fused[0] - plain[0])) / float(plain[0]):.2e}; worst LoRA grad rel_err {worst:.2e}")
    assert abs(float(fused[0] - plain[0])) / float(plain[0]) < 1e-2
    assert worst < 5e-2
