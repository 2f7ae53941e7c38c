"""On a CUDA GPU (the device host; CI has none, so these are deselected there): the Triton, flash and
fused kernels against the torch reference, and whole tiny models through the fused path against the
plain path in bf16 and fp16 (with LoRA dropout). Each prints a GPUCHECK line for docs/perf-notes.md."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fused_helpers import rows, train_cfg
from loraforge.config import LoraSettings
from loraforge.model.fused import apply_fast_paths, attention, attention_kernels, elementwise, offload, support
from loraforge.model.lora import attach_lora
from loraforge.train.loop import micro_batch_loss
from loraforge.train.plan import collate_packed, trained_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@cuda
def test_cuda_kernels_match_torch_reference():
    """RMSNorm (torch's CUDA kernel), liger RoPE/SiLU-mul, FlashAttention-2 varlen and cuDNN attention (long
    sequences padded, a short one through flash between them; multi-head and grouped-query) vs fp64 references;
    prints the errors."""
    dev, bf = "cuda", torch.bfloat16
    liger = support.liger_ops()
    torch.manual_seed(0)
    T, H, D = 700, 8, 128
    problem, expand = attention_kernels.cudnn_problem(bf, H, 2, D)
    assert problem is None, problem  # the H200: cuDNN attention runs, MHA and GQA
    print(f"GPUCHECK cudnn attention runs; k/v heads expanded for grouped-query: {expand}")
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
    seg = attention.segments(bounds, dev)
    for kv_heads in (H, 2):  # multi-head and grouped-query
        q = torch.randn(T, H, D, device=dev, dtype=bf)
        k, v = (torch.randn(T, kv_heads, D, device=dev, dtype=bf) for _ in range(2))
        dout = torch.randn(T, H, D, device=dev, dtype=bf)
        q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
        cpu_seg = attention.segments(bounds, "cpu")
        ref, ref_aux = attention_kernels.MathKernel().forward(q64, k64, v64, cpu_seg, D ** -0.5)
        rg = attention_kernels.MathKernel().backward(dout.double().cpu(), q64, k64, v64, ref, ref_aux, cpu_seg, D ** -0.5)
        # cuDNN: the long sequences alone (padded), the 17-token one through flash between them
        for name, kernel in (("flash", attention_kernels.FlashKernel()),
                             ("cudnn", attention_kernels.CudnnKernel(min_len=200, expand_kv=expand))):
            out, aux = kernel.forward(q, k, v, seg, D ** -0.5)
            gg = kernel.backward(dout, q, k, v, out, aux, seg, D ** -0.5)
            assert all(bool(torch.isfinite(t).all()) for t in (out, *gg))  # the pieces' rows all written
            tag = f"{name}_{'gqa' if kv_heads < H else 'mha'}"
            errors[tag] = _rel(out.cpu(), ref)
            errors[tag + "_grad"] = max(_rel(a.cpu(), b) for a, b in zip(gg, rg))
    for name, err in errors.items():
        print(f"GPUCHECK {name} rel_err {err:.2e}")
    assert all(err < 2e-2 for err in errors.values()), errors


@cuda
@pytest.mark.parametrize("dtype,lora,double_quant,attn", [
    (torch.bfloat16, dict(r=8, dropout=0.0), True, {}),
    (torch.bfloat16, dict(r=64, alpha=16, dropout=0.1, targets=["q_proj", "v_proj"]), False, {}),  # guanaco's LoRA
    (torch.float16, dict(r=16, alpha=32, dropout=0.05), True, {}),  # the T4 recipe's
    # the long-context path at toy size: cuDNN for sequences >= 128 tokens (flash below), grouped-query,
    # attention kept (offloaded) for the recompute, which skips it and the o/down outputs
    (torch.bfloat16, dict(r=16, dropout=0.05), True, dict(min_len=128, kv_heads=1, keep="on")),
    # no pinned memory left: the checkpoints on the device, nothing kept besides
    (torch.bfloat16, dict(r=16, dropout=0.0), True, dict(min_len=128, kv_heads=1, keep="on", host_full=True)),
    (torch.bfloat16, dict(r=16, dropout=0.0), True, dict(kernel="flash", keep="on")),
], ids=["bf16", "bf16-guanaco-dropout", "fp16-dropout", "bf16-cudnn-gqa-kept", "bf16-cudnn-host-full",
        "bf16-flash-kept"])
def test_cuda_fused_forward_matches_plain_path(tmp_path, monkeypatch, dtype, lora, double_quant, attn):
    """Whole tiny model, NF4 base, under autocast as training runs on a GPU: the fused path (liger,
    flash / cuDNN attention, stacked q/k/v, offloaded checkpoints, kept attention, LoRA dropout) against the
    plain transformers + PEFT path, from the same generator state (so the same dropout masks)."""
    from loraforge.config import ModelSettings
    from loraforge.model.load import load_base_model

    monkeypatch.setattr(attention_kernels, "CUDNN_MIN_LEN", attn.get("min_len", attention_kernels.CUDNN_MIN_LEN))
    if attn.get("host_full"):  # no pinned memory left: checkpoints stay on the device, nothing more is kept
        monkeypatch.setattr(offload, "host_has_room", lambda *a, **k: False)
    torch.manual_seed(0)
    kv_heads = attn.get("kv_heads", 2)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=kv_heads, head_dim=128, attn_implementation="sdpa")
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
    report = apply_fast_paths(model, train_cfg(offload_activations=True, keep_activations=attn.get("keep", "auto"),
                                               attention_kernel=attn.get("kernel", "auto")), "cuda", say=print)
    fused = run(collate_packed(data, 0))
    worst = max(_rel(fused[1][k], g) for k, g in plain[1].items())
    rel = abs(float(fused[0] - plain[0])) / float(plain[0])
    print(f"GPUCHECK tiny_model {str(dtype)[6:]} {lora} {attn} loss plain {float(plain[0]):.6f} fused {float(fused[0]):.6f} "
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
