"""`python -m loraforge.bench`: trains the benchmark's pre-tokenized rows through `run_training` in the
peers' row order and prints a RESULT line whose token count is exactly that of the measured steps."""
import json
import os
import random
import subprocess
import sys

import pytest

from loraforge.bench import model_flops, peers_order, reorder_rows


def write_rows(path, n, vocab, seed=0):
    rng = random.Random(seed)
    rows = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))] for _ in range(n)]
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return rows


def test_peers_order_is_a_seeded_permutation():
    order = peers_order(50)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert peers_order(50) == order and peers_order(50, seed=1) != order


def test_reorder_rows_writes_every_row_once_in_peers_order(tmp_path):
    rows = write_rows(tmp_path / "data.jsonl", 30, 100)
    out = reorder_rows(str(tmp_path / "data.jsonl"), str(tmp_path))
    got = [json.loads(line)["input_ids"] for line in open(out)]
    assert got == [rows[i] for i in peers_order(30)]


@pytest.mark.parametrize("order", ["peers", "file"])
def test_bench_counts_the_tokens_of_the_measured_steps(tmp_path, tiny_model_dir, order):
    rows = write_rows(tmp_path / "w.jsonl", 24, 500)
    batch, warmup, steps = 2, 1, 2
    env = {**os.environ, "WORKLOAD": "t", "MODEL_DIR": str(tiny_model_dir), "DATA_FILE": str(tmp_path / "w.jsonl"),
           "BATCH": str(batch), "MAX_LENGTH": "32", "STEPS": str(steps), "WARMUP": str(warmup), "BENCH_ORDER": order}
    out = subprocess.run([sys.executable, "-m", "loraforge.bench"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    index = peers_order(len(rows)) if order == "peers" else list(range(len(rows)))
    measured = index[warmup * batch:(warmup + steps) * batch]
    assert result["tokens"] == sum(min(len(rows[i]), 32) for i in measured)
    assert result["order"] == order and result["tokens_per_s"] > 0 and result["mean_loss"] > 0
    lengths = [min(len(rows[i]), 32) for i in measured]
    arch = json.loads((tiny_model_dir / "config.json").read_text())
    assert result["model_tflop"] == pytest.approx(model_flops(arch, 16, "all-linear", lengths) / 1e12, rel=1e-4)
    assert result["mfu"] is None  # no GPU: no matmul rate to compare with


def test_model_flops_of_a_llama_2_7b_step_counts_each_part_once():
    """Model FLOPs as the RESULT's MFU uses them: the frozen base 4 x params a token (forward and input
    gradient), LoRA 6 x its params, the head 4 x its params, causal attention 6 x heads x head_dim x L(L+1)
    a layer (forward + backward), no recompute."""
    arch = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
    base = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6.48e9 linear parameters
    lora = 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # r=16 on all 7 projections
    flops = model_flops(arch, 16, "all-linear", [1000, 24])
    attention = 32 * 6 * 4096 * (1000 * 1001 + 24 * 25)
    assert flops == 1024 * (4 * base + 6 * lora + 4 * 4096 * 32000) + attention
    assert model_flops(arch, 16, ["q_proj", "v_proj"], [10]) == 10 * (4 * base + 6 * 32 * 16 * 2 * 8192
                                                                     + 4 * 4096 * 32000) + 32 * 6 * 4096 * 110
    gqa = dict(arch, num_key_value_heads=8)
    assert model_flops(gqa, 16, "attention", [1]) < model_flops(arch, 16, "attention", [1])


@pytest.mark.parametrize("recipe", ["llama2-7b-guanaco", "llama2-7b-human-response", "llama2-7b-sql-mix"])
def test_bench_recipe_brings_the_recipe_s_lora_and_training_keys(recipe, tmp_path):
    """BENCH_RECIPE: the recipe's LoRA, speed/memory training keys and compute dtype on the workload's
    data, steps, learning rate and NF4 base; the peers get the same LoRA through LORA_* (lora-env)."""
    from loraforge.bench import RECIPE_TRAIN_KEYS, env_lora_settings, lora_env, recipe_settings, workload_config
    from loraforge.config import load_config

    shipped = load_config(recipe)
    cfg = workload_config(str(tmp_path / "w.jsonl"), str(tmp_path), 4, 1024, 35, str(tmp_path), recipe_settings(recipe))
    assert cfg.lora == shipped.lora and cfg.model.compute_dtype == shipped.model.compute_dtype
    assert all(getattr(cfg.train, k) == getattr(shipped.train, k) for k in RECIPE_TRAIN_KEYS)
    assert (cfg.train.learning_rate, cfg.train.micro_batch_size, cfg.train.max_steps, cfg.train.shuffle) == (2e-4, 4, 35, False)
    assert (cfg.model.quantization, cfg.model.double_quant, cfg.data.train_on) == ("nf4", True, "all")
    env = dict(kv.split("=", 1) for kv in lora_env(recipe).split())
    from_env = workload_config(str(tmp_path / "w.jsonl"), str(tmp_path), 4, 1024, 35, str(tmp_path), env_lora_settings(env))
    assert (from_env.lora.r, from_env.lora.alpha, from_env.lora.dropout) == (shipped.lora.r, shipped.lora.alpha,
                                                                           shipped.lora.dropout)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if shipped.lora.targets == "attention" else shipped.lora.targets
    assert from_env.lora.targets == targets
