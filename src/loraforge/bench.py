"""`python -m loraforge.bench`: the shared QLoRA benchmark workload through loraforge's training path.

Reads WORKLOAD, MODEL_DIR, DATA_FILE, BATCH, MAX_LENGTH, STEPS and WARMUP from the environment
(as ../shared/bench/compare.sh sets them), trains with `run_training` - the code `loraforge train`
runs, not a separate fast path - and prints one line:
RESULT {"tokens_per_s": ..., "peak_gib": ..., "tokens": ..., "mean_loss": ...}
Extra settings for experiments: BENCH_SET="train.packing=false model.attention=eager" (--set syntax).
BENCH_ORDER=peers (default) trains the rows in the order the peers' trainers draw them (see
`peers_order`), so that every optimizer step holds the same sequences as theirs; BENCH_ORDER=file
keeps the file's order.
BENCH_RECIPE=NAME trains with a shipped recipe's LoRA settings, training keys and compute dtype (see
`recipe_settings`) on the benchmark data; otherwise LORA_R / LORA_ALPHA / LORA_DROPOUT / LORA_TARGETS,
when set, replace the workload's LoRA as they do for the peers' runners. `python -m loraforge.bench
lora-env NAME` prints a recipe's LoRA settings as those variables, for the peers.
BENCH_PROFILE=FILE adds 3 steps after the measured ones under torch.profiler and writes the kernel
time table and a breakdown by kind to FILE; they do not count in the RESULT.
The RESULT also gives the model FLOPs of the measured steps (`model_flops`) and the model-FLOPs utilization
against the device's bf16 matmul rate (BENCH_MATMUL_TFLOPS, else measured here: `python -m loraforge.bench
matmul-rate` prints it).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from loraforge.config import RunConfig, apply_overrides


def workload_config(data_file: str, model_dir: str, batch: int, max_length: int, steps: int, run_dir: str,
                    extra: list[str] = ()) -> RunConfig:
    """The benchmark's rules: NF4 + double quant, bf16, LoRA r=16/alpha=32 on all 7 projections, lr 2e-4,
    the same `batch` sequences per optimizer step in the data file's order, loss on every token."""
    raw = {
        "model": {"base": model_dir, "quantization": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"datasets": [{"path": data_file, "format": "tokens"}], "max_length": max_length,
                 "train_on": "all", "truncation": "truncate"},
        "train": {"max_steps": steps, "micro_batch_size": batch, "gradient_accumulation": 1,
                  "learning_rate": 2e-4, "lr_scheduler": "linear", "warmup_ratio": 0.0, "optimizer": "adamw",
                  "shuffle": False, "packing": "on", "gradient_checkpointing": True, "tensorboard": False,
                  "logging_steps": 5,
                  # speed/memory only (tests/model/fused/): fused layers + liger on CUDA (auto),
                  # half-layer checkpoints in pinned CPU memory; the whole step in one pass (no token cap)
                  "fused_layers": "auto", "liger_kernels": "auto", "offload_activations": "on",
                  "max_tokens_per_micro_batch": None},
        "output_dir": run_dir, "samples": 0,
    }
    return RunConfig.model_validate(apply_overrides(raw, list(extra)))


# What a recipe brings to the benchmark: its LoRA, the training keys that decide speed and memory, and
# its compute dtype. The rest is the workload's, the same for every runner: the data, sequences per
# step (BATCH, one micro-batch), the step count and order, lr 2e-4 with linear decay (so the losses
# compare), and the base's quantization (NF4 + double quantization, as the peers load it).
RECIPE_TRAIN_KEYS = ("optimizer", "max_grad_norm", "weight_decay", "gradient_checkpointing", "packing", "fused_layers",
                     "liger_kernels", "offload_activations", "attention_kernel", "keep_activations",
                     "max_tokens_per_micro_batch")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recipe_settings(name: str) -> list[str]:
    """`--set` overrides that put shipped recipe `name`'s LoRA, training keys and compute dtype on the workload."""
    from loraforge.config import load_config

    cfg = load_config(name)
    sets = [f"lora.{k}={json.dumps(v)}" for k, v in cfg.lora.model_dump(mode="json").items()]
    sets += [f"train.{k}={json.dumps(getattr(cfg.train, k))}" for k in RECIPE_TRAIN_KEYS]
    return sets + [f"model.compute_dtype={cfg.model.compute_dtype}"]


def lora_env(name: str) -> str:
    """A recipe's LoRA as the peers' LORA_* variables (shell assignments)."""
    from loraforge.config import load_config

    lora = load_config(name).lora
    targets = {"all-linear": "all-linear", "attention": ",".join(ALL_PROJECTIONS[:4])}.get(lora.targets) \
        if isinstance(lora.targets, str) else ",".join(lora.targets)
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return f"LORA_R={lora.r} LORA_ALPHA={alpha} LORA_DROPOUT={lora.dropout} LORA_TARGETS={targets}"


def env_lora_settings(env) -> list[str]:
    """LORA_* from the environment (as the peers' runners read them) as `--set` overrides."""
    out = []
    for key, cast in (("r", int), ("alpha", float), ("dropout", float)):
        if env.get(f"LORA_{key.upper()}"):
            out.append(f"lora.{key}={cast(env[f'LORA_{key.upper()}'])}")
    if env.get("LORA_TARGETS"):
        t = env["LORA_TARGETS"]
        out.append(f"lora.targets={t if t == 'all-linear' else json.dumps(t.split(','))}")
    return out


def peers_order(n: int, seed: int = 0) -> list[int]:
    """The row order of the peers' runs: TRL's SFTTrainer samples with transformers' RandomSampler,
    which accelerate makes a seedable sampler drawing `torch.randperm(n)` from a generator seeded with
    the trainer's seed (0 in ../shared/bench). Checked against the peers' own token counts of the
    measured steps: 46,427 (w1) and 174,769 (w2) real tokens, as this order gives."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def reorder_rows(data_file: str, out_dir: str) -> str:
    """Write the rows of `data_file` in `peers_order` into `out_dir`; the loop then keeps that order."""
    with open(data_file) as f:
        rows = [line for line in f if line.strip()]
    path = os.path.join(out_dir, "data-peers-order.jsonl")
    with open(path, "w") as f:
        f.writelines(rows[i] if rows[i].endswith("\n") else rows[i] + "\n" for i in peers_order(len(rows)))
    return path


def model_flops(arch: dict, lora_r: int, targets, lengths: list[int]) -> float:
    """FLOPs a step over sequences of `lengths` must do, not counting any recompute (model FLOPs, as PaLM's
    MFU counts them): the frozen base's linear layers and output head forward and input gradient (4 x in x out
    a token; no weight gradient), LoRA forward, input and weight gradients (6 x r x (in + out) a token and
    adapted projection), causal attention forward 2 x heads x head_dim x L(L+1) a layer and sequence, and
    its backward twice that."""
    h, inter, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    d = arch.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = {"all-linear": ALL_PROJECTIONS, "attention": ALL_PROJECTIONS[:4]}.get(targets, targets) \
        if isinstance(targets, str) else targets
    per_token = layers * sum(4 * i * o for i, o in shapes.values()) + 4 * h * arch["vocab_size"]
    per_token += layers * sum(6 * lora_r * sum(shapes[n]) for n in names)
    attention = sum(layers * 6 * heads * d * n * (n + 1) for n in lengths)
    return per_token * sum(lengths) + attention


def matmul_tflops() -> float:
    """The device's bf16 matrix rate: an 8192^3 product on random data, median of 10 after 3 warm-ups."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e12


def measured_lengths(data_file: str, max_length: int, batch: int, warmup: int, steps: int) -> list[int]:
    """The sequence lengths of the measured steps' rows (the loop keeps the file's order, truncated)."""
    with open(data_file) as f:
        rows = [json.loads(line)["input_ids"] for line in f if line.strip()]
    return [min(len(r), max_length) for r in rows[warmup * batch:(warmup + steps) * batch]]


def fast_paths(run_dir: str):
    """What the run's fused path switched on and off (summary.json), or None if it is not there."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("fast_paths")
    except OSError:
        return None


def main() -> None:
    import sys

    from loraforge.model.fused.offload import pinned_bytes
    from loraforge.train.loop import run_training

    if sys.argv[1:2] == ["lora-env"] and len(sys.argv) == 3:
        print(lora_env(sys.argv[2]))
        return
    if sys.argv[1:2] == ["matmul-rate"]:
        print(f"{matmul_tflops():.1f}")
        return

    env = os.environ
    warmup, steps = int(env.get("WARMUP", 5)), int(env.get("STEPS", 30))
    run_dir = tempfile.mkdtemp(prefix="loraforge-bench-")
    profile_to = env.get("BENCH_PROFILE")
    profile_steps = 3 if profile_to else 0
    recipe = env.get("BENCH_RECIPE")
    extra = (recipe_settings(recipe) if recipe else env_lora_settings(env)) + env.get("BENCH_SET", "").split()
    cuda = torch.cuda.is_available()
    if not cuda:
        extra = ["train.offload_activations=off"] + extra
    order = env.get("BENCH_ORDER", "peers")
    if order not in ("peers", "file"):
        raise SystemExit(f"BENCH_ORDER must be 'peers' or 'file', not {order!r}")
    data_file = reorder_rows(env["DATA_FILE"], run_dir) if order == "peers" else env["DATA_FILE"]
    cfg = workload_config(data_file, env["MODEL_DIR"], int(env.get("BATCH", 4)),
                          int(env.get("MAX_LENGTH", 1024)), warmup + steps + profile_steps, run_dir, extra)
    meter = {"start": None, "tokens": 0, "losses": []}
    profiler = {}

    def on_step(step: int, record: dict | None) -> None:
        if profile_to and record is None and step == warmup + steps:
            profiler["p"] = start_profile(cuda)
            profiler["t0"] = time.perf_counter()
        if profile_to and record is not None and step == warmup + steps + profile_steps - 1:
            if cuda:
                torch.cuda.synchronize()
            write_profile(profiler["p"], profile_to, time.perf_counter() - profiler["t0"], profile_steps, env)
        if record is None and step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            meter["start"] = time.perf_counter()
        elif record is not None and warmup <= step < warmup + steps:  # the profiled steps do not count
            meter["tokens"] += record["tokens"]
            meter["losses"].append(record["loss"])
            if step == warmup + steps - 1:
                if cuda:
                    torch.cuda.synchronize()
                    meter["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                meter["seconds"] = time.perf_counter() - meter["start"]

    peak = float(env["BENCH_MATMUL_TFLOPS"]) if env.get("BENCH_MATMUL_TFLOPS") else (matmul_tflops() if cuda else None)
    run_training(cfg, run_dir, step_hook=on_step)
    with open(os.path.join(env["MODEL_DIR"], "config.json")) as f:
        arch = json.load(f)
    lengths = measured_lengths(data_file, cfg.data.max_length, cfg.train.micro_batch_size, warmup, steps)
    flops = model_flops(arch, cfg.lora.r, cfg.lora.targets, lengths) if sum(lengths) == meter["tokens"] else None
    result = {
        "tokens_per_s": round(meter["tokens"] / meter["seconds"], 1), "tokens": meter["tokens"],
        "seconds": round(meter["seconds"], 2),
        "peak_gib": meter.get("peak_gib"),
        "mean_loss": round(sum(meter["losses"]) / len(meter["losses"]), 4),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "settings": env.get("BENCH_SET", ""), "order": order,
        "recipe": recipe, "lora": cfg.lora.model_dump(mode="json"), "compute_dtype": cfg.model.compute_dtype,
        "train": {k: getattr(cfg.train, k) for k in RECIPE_TRAIN_KEYS},
        "fast_paths": fast_paths(run_dir),
        "model_tflop": float(f"{flops / 1e12:.5g}") if flops else None,
        "matmul_tflops": round(peak, 1) if peak else None,
        "mfu": round(flops / meter["seconds"] / (peak * 1e12), 4) if flops and peak else None,
        "pinned_gib": round(pinned_bytes() / 2**30, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)


KINDS = [  # kernel name pattern -> what it is, first match wins
    ("dequantize (bnb NF4)", ("dequant", "kDequantize", "kdequant")),
    ("attention (flash / cuDNN)", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "splitk", "sm80_xmma")),
    ("liger triton (norm/rope/silu)", ("_rms_norm", "rope", "swiglu", "_triton")),
    ("optimizer", ("adam", "optimizer", "multi_tensor")),
    ("copies H2D/D2H", ("memcpy", "Memcpy")),
    ("cross-entropy / softmax", ("logsumexp", "softmax", "gather", "scatter", "index_put", "nll")),
    ("elementwise / reduce / other", ("",)),
]


def start_profile(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    p = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    p.start()
    return p


def write_profile(p, path: str, wall: float, steps: int, env) -> None:
    """Kernel table (self device time) and a breakdown by kind, per step, with the GPU's idle share."""
    p.stop()
    events = p.key_averages()

    def device_time(e):  # microseconds; attribute names changed across torch versions
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, name):
                return getattr(e, name)
        return 0.0

    kinds: dict[str, float] = {}
    counts: dict[str, int] = {}
    rows = []
    for e in events:
        t = device_time(e)
        if t <= 0 or getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        kind = next(k for k, pats in KINDS if any(s.lower() in e.key.lower() for s in pats))
        kinds[kind] = kinds.get(kind, 0.0) + t
        counts[kind] = counts.get(kind, 0) + e.count
        rows.append((t, e.count, e.key))
    busy = sum(kinds.values()) / 1e6
    lines = [f"profile: {steps} steps, wall {wall / steps * 1e3:.1f} ms/step, GPU busy {busy / steps * 1e3:.1f} ms/step "
             f"({100 * busy / wall:.0f}% of wall), kernels/step {sum(counts.values()) / steps:.0f}; "
             f"settings {env.get('BENCH_SET', '')!r}, workload {env.get('WORKLOAD', '')}", "",
             f"{'kind':<32} {'ms/step':>9} {'share':>6} {'kernels/step':>12}"]
    for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<32} {t / 1e3 / steps:>9.1f} {100 * t / 1e6 / busy:>5.0f}% {counts[k] / steps:>12.0f}")
    lines += ["", "top kernels by self device time (ms/step, calls/step, name):"]
    for t, c, name in sorted(rows, reverse=True)[:40]:
        lines.append(f"{t / 1e3 / steps:>9.2f} {c / steps:>7.0f}  {name[:150]}")
    try:
        cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    except Exception as err:  # noqa: BLE001
        cpu_table = f"(no CPU table: {err})"
    text = "\n".join(lines) + "\n\ntop ops by self CPU time (all steps):\n" + cpu_table
    with open(path, "w") as f:
        f.write(text)
    print(text.split("\n\ntop kernels")[0], flush=True)


if __name__ == "__main__":
    main()
