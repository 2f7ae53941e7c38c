"""The real `loraforge train` command, driven in temp dirs as a user would."""
import json

import pytest
import torch

from cli_runner import SHORT_RUN_STEPS, SMOLLM2_RUN_STEPS, run_cli


def test_short_run_leaves_every_artifact(short_run):
    out = (short_run / "stdout.txt").read_text()
    for name in ("adapter", "config.yaml", "metrics.jsonl", "data_report.json", "checkpoints"):
        assert str(short_run / name) in out, f"the end of training should say where {name} went"
    adapter = short_run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file() or (adapter / "tokenizer.model").is_file()
    steps = [r for r in map(json.loads, (short_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, SHORT_RUN_STEPS + 1))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in map(json.loads, (short_run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == ["step-000016", "step-000024"]
    saved = (short_run / "config.yaml").read_text()
    assert "max_steps: 24" in saved and "quantization: nf4" in saved


def test_adapter_loads_with_plain_peft_and_changes_the_model(short_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    tok = AutoTokenizer.from_pretrained(short_run / "adapter")
    ids = tok("<s>[INST] What is the capital of France? [/INST]", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        tuned = PeftModel.from_pretrained(base, short_run / "adapter")
        after = tuned(**ids).logits
    assert not torch.allclose(before, after, atol=1e-3), "the trained adapter should change the outputs"


def test_refuses_to_overwrite_an_existing_run(short_run):
    before = sorted(p.name for p in short_run.iterdir())
    result = run_cli("train", "tiny", "--set", "train.max_steps=1", "--output-dir", str(short_run))
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in short_run.iterdir()) == before


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_the_recipes_bitsandbytes_optimizers_train_through_the_cli(optimizer, tmp_path):
    """The 7B recipes' optimizers (train/optim.py's bitsandbytes step) on the tiny model, as a user sets one."""
    run_dir = tmp_path / "run"
    result = run_cli("train", "tiny", "--set", f"train.optimizer={optimizer}", "--set", "train.max_steps=3",
                     "--set", "train.logging_steps=1", "--set", "samples=0", "--set", "data.max_length=64",
                     "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "eval" not in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.load(run_dir / "checkpoints" / "step-000003" / "optimizer.pt", weights_only=True)["state"]


def test_config_errors_exit_2_before_any_loading(tmp_path):
    result = run_cli("train", "tiny", "--set", "lora.r=0", "--set", "train.optimizer=sgd", "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "lora.r" in result.stderr and "train.optimizer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_recipes_command_lists_every_recipe_with_a_description():
    result = run_cli("recipes")
    assert result.returncode == 0
    for name in ("demo", "llama2-7b-guanaco", "llama2-7b-human-response", "llama2-7b-sql-mix", "llama2-7b-chat-system"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20


@pytest.mark.parametrize("group, subcommand", [("data", "inspect"), ("config", "show")])
def test_a_command_group_alone_prints_its_subcommands(capsys, group, subcommand):
    from loraforge.cli import main

    assert main([group]) == 0
    out = capsys.readouterr().out
    assert f"usage: loraforge {group}" in out and subcommand in out


def test_train_help_explains_the_options():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--set", "--resume", "--overwrite", "--output-dir"):
        assert flag in result.stdout


def test_the_default_trains_the_real_model_in_nf4_and_ends_with_base_vs_tuned(smollm2_short_run, smollm2_dir):
    """`loraforge train` (the default recipe) cut short: the real model in NF4 through the CLI, then the held-out
    evaluation it ends with. The full demo's time and scores are measured by scripts/time_demo.sh."""
    out = (smollm2_short_run / "stdout.txt").read_text()
    assert f"model: {smollm2_dir} (nf4" in " ".join(out.split())
    assert "execution_match" in out and "before and after fine-tuning" in out
    summary = json.loads((smollm2_short_run / "summary.json").read_text())
    assert summary["steps"] == SMOLLM2_RUN_STEPS and summary["base_model"] == str(smollm2_dir)
    scores = summary["eval"]["metrics"]["loraforge.evaluate.sql:execution_match"]
    assert scores["rows"] == 2 and 0 <= scores["base"] <= 1 and 0 <= scores["tuned"] <= 1
    loss = summary["eval"]["response_loss"]
    assert loss["tuned"] < loss["base"], "a few steps on the SQL rows already lower the held-out response loss"
    assert len(summary["samples"]) == 2
    for sample in summary["samples"]:
        for answer in (sample["before"], sample["after"]):
            assert "<|im_start|>" not in answer and "<|im_end|>" not in answer
    evaluation = json.loads((smollm2_short_run / "eval.json").read_text())
    assert evaluation["split"] == "eval" and evaluation["rows"] == 2
    assert evaluation["settings"]["batch_size"] == 32, "the recipe's eval.batch_size, not train.micro_batch_size (2)"
    assert [s["tuned"] for s in evaluation["samples"]] == [s["after"] for s in summary["samples"]]
    adapter = json.loads((smollm2_short_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir)
    assert "execution_match" in (smollm2_short_run / "report.html").read_text()  # the report's eval table
