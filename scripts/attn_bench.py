"""The device ceilings and the attention kernels the fused path can pick, on the GPU host (issue 24).

Prints the bf16 matmul rate (8192^3, random data), pinned host<->device copy rates, and for each sequence layout
(8B shape: 32 query / 8 k/v heads, head dim 128, bf16) the forward and backward time per call of
FlashAttention-2 varlen and cuDNN (dense per sequence, as attention_kernels.CudnnKernel runs it), wall time of
10 back-to-back calls (host time included, as training sees it), with the rate in TFLOP/s (causal: forward
2 x heads x dim x L(L+1), backward 2.5 x that as these kernels compute it), and cuDNN's first call (graph build).

    PYTHONPATH=src python scripts/attn_bench.py [--out FILE]
"""
import argparse
import json
import time

import torch

from loraforge.model.fused.attention_kernels import CudnnKernel, FlashKernel, cudnn_problem, segments


def wall_ms(fn, calls=10, repeats=3):
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t0) / calls * 1e3)
    return sorted(best)[len(best) // 2]


def copy_gbs(nbytes=1 << 28):
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h = wall_ms(lambda: host.copy_(dev, non_blocking=True), calls=5)
    h2d = wall_ms(lambda: dev.copy_(host, non_blocking=True), calls=5)
    return nbytes / d2h / 1e6, nbytes / h2d / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    a = ap.parse_args()
    from loraforge.bench import matmul_tflops

    rows = [{"what": "bf16 matmul 8192^3", "tflops": round(matmul_tflops(), 1)}]
    d2h, h2d = copy_gbs()
    rows.append({"what": "pinned copy 256 MiB", "d2h_gbs": round(d2h, 1), "h2d_gbs": round(h2d, 1)})
    H, K, D, bf = a.heads, a.kv_heads, 128, torch.bfloat16
    layouts = [[n] for n in (1024, 2048, 4096, 8192, 16384, 32768)]
    layouts += [[1400, 900, 2100, 4096], [1358, 1700, 800, 2500]]  # conversations (c8-like steps)
    problem, expand = cudnn_problem(bf, H, K, D)
    rows.append({"what": "cudnn check", "problem": problem, "expand_kv": expand})
    flash, cudnn = FlashKernel(), CudnnKernel(min_len=1, expand_kv=expand)
    for lengths in layouts:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        T = bounds[-1]
        seg = segments(bounds, "cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, dout = (torch.randn(T, H, D, device="cuda", dtype=bf, generator=g) for _ in range(2))
        k, v = (torch.randn(T, K, D, device="cuda", dtype=bf, generator=g) for _ in range(2))
        fwd_flops = sum(2 * H * D * n * (n + 1) for n in lengths)
        row = {"what": f"attention {lengths}", "tokens": T}
        for name, kern in (("flash", flash), ("cudnn", cudnn)):
            try:
                t0 = time.perf_counter()
                out, aux = kern.forward(q, k, v, seg, D ** -0.5)
                kern.backward(dout, q, k, v, out, aux, seg, D ** -0.5)
                torch.cuda.synchronize()
                first = (time.perf_counter() - t0) * 1e3
                calls = 10 if T <= 8192 else 3
                f = wall_ms(lambda: kern.forward(q, k, v, seg, D ** -0.5), calls)
                b = wall_ms(lambda: kern.backward(dout, q, k, v, out, aux, seg, D ** -0.5), calls)
                row.update({f"{name}_fwd_ms": round(f, 3), f"{name}_bwd_ms": round(b, 3),
                            f"{name}_fwd_tflops": round(fwd_flops / f / 1e9, 1),
                            f"{name}_bwd_tflops": round(2.5 * fwd_flops / b / 1e9, 1),
                            f"{name}_first_call_ms": round(first, 1)})
            except Exception as err:  # noqa: BLE001 - report, go on with the next
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        del q, k, v, dout
        torch.cuda.empty_cache()
    text = "\n".join(json.dumps(r) for r in rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(f"{'layout':<36} {'tokens':>7} {'flash f/b ms':>16} {'cudnn f/b ms':>16} {'flash f/b TF/s':>15} "
          f"{'cudnn f/b TF/s':>15}")
    for r in rows[3:]:
        print(f"{r['what'][10:46]:<36} {r['tokens']:>7} {r.get('flash_fwd_ms', '-')!s:>7}/{r.get('flash_bwd_ms', '-')!s:<8} "
              f"{r.get('cudnn_fwd_ms', '-')!s:>7}/{r.get('cudnn_bwd_ms', '-')!s:<8} "
              f"{r.get('flash_fwd_tflops', '-')!s:>6}/{r.get('flash_bwd_tflops', '-')!s:<8} "
              f"{r.get('cudnn_fwd_tflops', '-')!s:>6}/{r.get('cudnn_bwd_tflops', '-')!s:<8}")
    print(rows[0], rows[1], rows[2])


if __name__ == "__main__":
    main()
