"""Host cost per call of the ops a fused layer runs (the w1 rows are bound by the host): N calls, one sync.

On the GPU host, from the project root with .whl installed to /tmp/site (see scripts/gpu_bench.sh):
    PYTHONPATH=/tmp/site:src python3 scripts/micro_host.py | grep MICRO
Prints "MICRO <op> host <us>/call incl. device <us>" (docs/perf/2026-12-03/micro_host_us.txt).
"""
import time
import types

import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from bitsandbytes.backends.cuda import ops as bnb_cuda

from loraforge.model.fused import support
from loraforge.model.fused.elementwise import rope
from loraforge.model.fused.weights import dense_weight

TOKENS, HIDDEN, MLP, HEADS = 1548, 4096, 11008, 32  # w1's tokens a step; Llama-2-7B's sizes
DEV, BF16 = "cuda", torch.bfloat16


def bench(name: str, fn, n: int = 300) -> None:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / n * 1e6
    print(f"MICRO {name:40s} host {host:8.1f} us/call  incl. device {total:8.1f}")


def main() -> None:
    liger = support.liger_ops()
    x = torch.randn(TOKENS, HIDDEN, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.ones(HIDDEN, device=DEV, dtype=BF16)
    dy = torch.randn(TOKENS, HIDDEN, device=DEV, dtype=BF16)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    bench("liger rms fwd+bwd", lambda: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", True).backward(dy.clone()))
    bench("F.rms_norm fwd+bwd", lambda: F.rms_norm(x, (HIDDEN,), w, 1e-5).backward(dy))
    with torch.no_grad():
        bench("liger rms fwd (no grad)", lambda: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", True))
        bench("F.rms_norm fwd (no grad)", lambda: F.rms_norm(x, (HIDDEN,), w, 1e-5))
        a = torch.randn(TOKENS, HIDDEN, device=DEV, dtype=BF16)
        lora_a = torch.randn(8, HIDDEN, device=DEV, dtype=BF16)
        bench("mm (T,D)x(D,8)", lambda: a @ lora_a.t())
        bench("add_ (T,D)", lambda: a.add_(a))
        bench("native_dropout (T,D)", lambda: torch.native_dropout(a, 0.05, True))
        bench("to(bf16) of (8,D) fp32", lambda: lora_a.float().to(BF16))

        weight = torch.randn(HIDDEN, HIDDEN, device=DEV, dtype=BF16)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        packed.quant_state = state
        bench("dense_weight NF4 double quant 4096^2", lambda: dense_weight(types.SimpleNamespace(weight=packed), BF16))
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32)
        bench("dequantize_4bit op only", lambda: torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, absmax, 64, "nf4", state.shape, BF16))
        out = torch.empty(state.shape, dtype=BF16, device=DEV)
        bench("_dequantize_4bit_impl direct", lambda: bnb_cuda._dequantize_4bit_impl(packed, absmax, 64, "nf4", BF16, out=out))
        bench("dequantize_blockwise op", lambda: torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32))

        cos = torch.randn(TOKENS, 128, device=DEV, dtype=BF16)
        sin = torch.randn_like(cos)
        q = torch.randn(TOKENS, HEADS, 128, device=DEV, dtype=BF16)
        k = torch.randn_like(q)
        bench("liger rope fwd", lambda: rope(q, k, cos, sin, liger))
        g = torch.randn(TOKENS, MLP, device=DEV, dtype=BF16)
        u = torch.randn_like(g)
        bench("liger swiglu fwd", lambda: liger.swiglu_forward(g, u))
        bench("silu*mul torch", lambda: F.silu(g) * u)
        bench("torch.cuda.get_rng_state", lambda: torch.cuda.get_rng_state())
        rng = torch.cuda.get_rng_state()
        bench("torch.cuda.set_rng_state", lambda: torch.cuda.set_rng_state(rng))
        bench("torch.get_rng_state (cpu)", lambda: torch.get_rng_state())


if __name__ == "__main__":
    main()
