"""On a CUDA GPU (the device host; CI has none, so these are deselected there): the Triton, flash and
fused kernels against the torch reference, and whole tiny models through the fused path against the
plain path in bf16 and fp16 (with LoRA dropout). Each prints a GPUCHECK line for docs/perf-notes.md."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fused_helpers import rows, train_cfg
from loraforge.config import LoraSettings
from loraforge.model.fused import apply_fast_paths, attention, elementwise, support
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate_packed, trained_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@cuda
def test_cuda_kernels_match_torch_reference():
    """RMSNorm (torch's CUDA kernel), liger RoPE/SiLU-mul and varlen flash attention vs the torch ops in fp64;
    prints the errors."""
    dev, bf = "cuda", torch.bfloat16
    liger = support.liger_ops()
    torch.manual_seed(0)
    T, H, D = 700, 8, 128
    errors = {}
    if liger is not None:
        x = torch.randn(T, H * D, device=dev, dtype=bf, requires_grad=True)
        norm = torch.nn.Module()
        norm.weight = torch.nn.Parameter(torch.rand(H * D, device=dev, dtype=bf) + 0.5, requires_grad=False)
        norm.variance_epsilon = 1e-5
        dy = torch.randn(T, H * D, device=dev, dtype=bf)
        got = elementwise.rms_norm(x, norm)
        (gx,) = torch.autograd.grad(got, x, dy.clone())
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
        rq, rk = elementwise.rope(q.double(), k.double(), cos.double(), sin.double(), None)
        gq, gk = elementwise.rope(q.clone(), k.clone(), cos, sin, liger)
        errors["rope"] = max(_rel(gq, rq), _rel(gk, rk))

        g = torch.randn(T, 1000, device=dev, dtype=bf, requires_grad=True)
        u = torch.randn(T, 1000, device=dev, dtype=bf, requires_grad=True)
        dy = torch.randn(T, 1000, device=dev, dtype=bf)
        out = elementwise.silu_mul(g.clone(), u.clone(), liger)
        gr, ur = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
        ref = torch.nn.functional.silu(gr) * ur
        dg, du = torch.autograd.grad(ref, (gr, ur), dy.double())
        g2, u2 = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
        got = elementwise.silu_mul(g2 * 1, u2 * 1, liger)
        got_g, got_u = torch.autograd.grad(got, (g2, u2), dy)
        errors["silu_mul"] = _rel(out, ref)
        errors["silu_mul_grad"] = max(_rel(got_g, dg), _rel(got_u, du))

    lengths = [300, 17, 383]
    bounds = [0, 300, 317, 700]
    seg = attention.Segments(bounds, torch.tensor(bounds, dtype=torch.int32, device=dev), max(lengths))
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    dout = torch.randn(T, H, D, device=dev, dtype=bf)
    got = attention.packed_attention(q, k, v, seg, D ** -0.5, use_flash=True)
    gg = torch.autograd.grad(got, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = attention.packed_attention(q64, k64, v64, seg, D ** -0.5, use_flash=False)
    rg = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    errors["varlen_flash"] = _rel(got, ref)
    errors["varlen_flash_grad"] = max(_rel(a, b) for a, b in zip(gg, rg))
    for name, err in errors.items():
        print(f"GPUCHECK {name} rel_err {err:.2e}")
    assert all(err < 2e-2 for err in errors.values()), errors


@cuda
@pytest.mark.parametrize("dtype,lora,double_quant", [
    (torch.bfloat16, dict(r=8, dropout=0.0), True),
    (torch.bfloat16, dict(r=64, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"]), False),  # guanaco's LoRA
    (torch.float16, dict(r=16, alpha=32, dropout=0.05), True),  # the T4 recipe's
], ids=["bf16", "bf16-guanaco-dropout", "fp16-dropout"])
def test_cuda_fused_forward_matches_plain_path(tmp_path, dtype, lora, double_quant):
    """Whole tiny model, NF4 base, under autocast as training runs on a GPU: the fused path (liger,
    varlen flash, stacked q/k/v, offloaded checkpoints, LoRA dropout) against the plain transformers +
    PEFT path, from the same generator state (so the same dropout masks)."""
    from loraforge.config import ModelSettings
    from loraforge.model.load import load_base_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(tmp_path)
    base = load_base_model(ModelSettings(base=str(tmp_path), double_quant=double_quant), dtype, "cuda", str(tmp_path))
    model = attach_lora(base, LoraSettings(**lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    data = rows(lengths=((120, 10), (300, 30), (57, 5), (211, 211)))
    data = [{"input_ids": [i % 512 for i in r["input_ids"]],
             "labels": [(i % 512) if i != -100 else -100 for i in r["labels"]]} for r in data]
    n = trained_tokens(data)

    def run(batch):  # under autocast, as accelerate's mixed precision runs it (one Accelerator per process)
        torch.manual_seed(5)
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = micro_batch_loss(model, {k: v.cuda() for k, v in batch.items()}, n)
        loss.backward()
        return loss.detach().float(), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}

    plain = run(collate_packed(data, 0))
    report = apply_fast_paths(model, train_cfg(offload_activations=True), "cuda", say=print)
    fused = run(collate_packed(data, 0))
    worst = max(_rel(fused[1][k], g) for k, g in plain[1].items())
    rel = abs(float(fused[0] - plain[0])) / float(plain[0])
    print(f"GPUCHECK tiny_model {str(dtype)[6:]} {lora} loss plain {float(plain[0]):.6f} fused {float(fused[0]):.6f} "
          f"rel {rel:.2e}; worst LoRA grad rel_err {worst:.2e}; on: {report.on}")
    assert rel < 1e-2
    assert worst < 5e-2


@cuda
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "single"])
def test_dense_weight_calls_bitsandbytes_kernels_directly_with_the_same_result(nested):
    """weights.dense_weight skips the torch.library dispatch of bitsandbytes' ops (host time): same values."""
    import types

    import bitsandbytes.functional as bnbf

    from loraforge.model.fused import weights

    assert weights.cuda_impls() is not None, "this bitsandbytes' CUDA functions moved: dense_weight uses the ops"
    torch.manual_seed(0)
    w = torch.randn(384, 1024, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    packed.quant_state = state
    got = weights.dense_weight(types.SimpleNamespace(weight=packed), torch.bfloat16)
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state))
