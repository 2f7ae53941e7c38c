"""`python -m loraforge.bench`: the shared QLoRA benchmark workload through loraforge's training path.

Reads WORKLOAD, MODEL_DIR, DATA_FILE, BATCH, MAX_LENGTH, STEPS and WARMUP from the environment
(as ../shared/bench/compare.sh sets them), trains with `run_training` - the code `loraforge train`
runs, not a separate fast path - and prints one line:
RESULT {"tokens_per_s": ..., "peak_gib": ..., "tokens": ..., "mean_loss": ...}
Extra settings for experiments: BENCH_SET="train.packing=false model.attention=eager" (--set syntax).
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
    the same `batch` sequences per optimizer step in file order, loss on every token."""
    raw = {
        "model": {"base": model_dir, "quantization": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"datasets": [{"path": data_file, "format": "tokens"}], "max_length": max_length,
                 "train_on": "all", "truncation": "truncate"},
        "train": {"max_steps": steps, "micro_batch_size": batch, "gradient_accumulation": 1,
                  "learning_rate": 2e-4, "lr_scheduler": "linear", "warmup_ratio": 0.0, "optimizer": "adamw",
                  "shuffle": False, "packing": True, "gradient_checkpointing": True, "tensorboard": False,
                  "logging_steps": 5},
        "output_dir": run_dir, "samples": 0,
    }
    return RunConfig.model_validate(apply_overrides(raw, list(extra)))


def main() -> None:
    from loraforge.train.loop import run_training

    env = os.environ
    warmup, steps = int(env.get("WARMUP", 5)), int(env.get("STEPS", 30))
    run_dir = tempfile.mkdtemp(prefix="loraforge-bench-")
    cfg = workload_config(env["DATA_FILE"], env["MODEL_DIR"], int(env.get("BATCH", 4)),
                          int(env.get("MAX_LENGTH", 1024)), warmup + steps, run_dir,
                          env.get("BENCH_SET", "").split())
    cuda = torch.cuda.is_available()
    meter = {"start": None, "tokens": 0, "losses": []}

    def on_step(step: int, record: dict | None) -> None:
        if record is None and step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            meter["start"] = time.perf_counter()
        elif record is not None and step >= warmup:
            meter["tokens"] += record["tokens"]
            meter["losses"].append(record["loss"])
            if step == warmup + steps - 1:
                if cuda:
                    torch.cuda.synchronize()
                    meter["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                meter["seconds"] = time.perf_counter() - meter["start"]

    run_training(cfg, run_dir, step_hook=on_step)
    result = {
        "tokens_per_s": round(meter["tokens"] / meter["seconds"], 1), "tokens": meter["tokens"],
        "seconds": round(meter["seconds"], 2),
        "peak_gib": meter.get("peak_gib"),
        "mean_loss": round(sum(meter["losses"]) / len(meter["losses"]), 4),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "settings": env.get("BENCH_SET", ""),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
