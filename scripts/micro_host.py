"""Host cost per call of the ops a fused layer runs (the w1 rows are bound by the host): N calls, one sync.

On the GPU host, from the project root with .whl installed to /tmp/site (see scripts/gpu_bench.sh):
    PYTHONPATH=/tmp/site python3 scripts/micro_host.py | grep MICRO
Prints "MICRO <op> host <us>/call incl. device <us>" (docs/perf/2026-12-03/micro_host_us.txt).
"""
import time, torch, sys
sys.path.insert(0, "src")
from loraforge.model.fused import support
liger = support.liger_ops()
T, D = 1548, 4096
dev = "cuda"
x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = torch.ones(D, device=dev, dtype=torch.bfloat16)
def bench(name, fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize(); tot = (time.perf_counter() - t) / n * 1e6
    print(f"MICRO {name:40s} host {host:8.1f} us/call  incl. device {tot:8.1f}")
dy = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
def liger_rms():
    y = liger.rms_norm.apply(x, w, 1e-5, 0.0, "llama", True); y.backward(dy.clone())
def torch_rms():
    y = torch.nn.functional.rms_norm(x, (D,), w, 1e-5); y.backward(dy)
bench("liger rms fwd+bwd", liger_rms)
bench("F.rms_norm fwd+bwd", torch_rms)
with torch.no_grad():
    bench("liger rms fwd (no grad)", lambda: liger.rms_norm.apply(x, w, 1e-5, 0.0, "llama", True))
    bench("F.rms_norm fwd (no grad)", lambda: torch.nn.functional.rms_norm(x, (D,), w, 1e-5))
    a = torch.randn(T, D, device=dev, dtype=torch.bfloat16); b = torch.randn(8, D, device=dev, dtype=torch.bfloat16)
    bench("mm (T,D)x(D,8)", lambda: a @ b.t())
    bench("add_ (T,D)", lambda: a.add_(a))
    bench("native_dropout (T,D)", lambda: torch.native_dropout(a, 0.05, True))
    bench("to(bf16) of (8,D) fp32", lambda: b.float().to(torch.bfloat16))
    import bitsandbytes.functional as F
    W = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    from loraforge.model.fused.weights import dense_weight
    class B: pass
    base = B(); base.weight = q; q.quant_state = st
    bench("dense_weight NF4 double quant 4096^2", lambda: dense_weight(base, torch.bfloat16))
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(st.absmax, st.state2.absmax, st.state2.code, st.state2.blocksize, torch.float32)
    bench("dequantize_4bit op only", lambda: torch.ops.bitsandbytes.dequantize_4bit.default(q, absmax, 64, "nf4", st.shape, torch.bfloat16))
    from bitsandbytes.backends.cuda import ops as cops
    out = torch.empty(st.shape, dtype=torch.bfloat16, device=dev)
    bench("_dequantize_4bit_impl direct", lambda: cops._dequantize_4bit_impl(q, absmax, 64, "nf4", torch.bfloat16, out=out))
    bench("dequantize_blockwise op", lambda: torch.ops.bitsandbytes.dequantize_blockwise.default(st.absmax, st.state2.absmax, st.state2.code, st.state2.blocksize, torch.float32))
    cos = torch.randn(T, 128, device=dev, dtype=torch.bfloat16); sin = torch.randn_like(cos)
    qh = torch.randn(T, 32, 128, device=dev, dtype=torch.bfloat16); kh = torch.randn_like(qh)
    from loraforge.model.fused.elementwise import rope
    bench("liger rope fwd", lambda: rope(qh, kh, cos, sin, liger))
    g = torch.randn(T, 11008, device=dev, dtype=torch.bfloat16); u = torch.randn_like(g)
    bench("liger swiglu fwd", lambda: liger.swiglu_forward(g, u))
    bench("silu*mul torch", lambda: torch.nn.functional.silu(g) * u)
    bench("torch.cuda.get_rng_state", lambda: torch.cuda.get_rng_state())
    st_ = torch.cuda.get_rng_state()
    bench("torch.cuda.set_rng_state", lambda: torch.cuda.set_rng_state(st_))
    bench("torch.get_rng_state (cpu)", lambda: torch.get_rng_state())
