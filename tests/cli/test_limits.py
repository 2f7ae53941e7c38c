"""Limits end in one clear message, exit 2, no traceback: running out of memory (host or GPU) in train, eval,
generate, merge and export; data.max_length above the model's context; a CSV whose header has a field over
csv's 128 KiB limit. The out-of-memory errors are injected (an allocation that fails) into the real command,
run in this process (`loraforge.cli.main`)."""
import json
import shlex
from pathlib import Path

import pytest
import torch

from loraforge.errors import out_of_memory

FAST = ["--set", "data.max_length=64", "--set", "train.micro_batch_size=2", "--set", "train.tensorboard=false",
        "--set", "samples=0", "--set", "lora.r=4", "--set", "train.eval_steps=null"]
GPU_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB is free."


def cli(capsys, *args) -> tuple[int, str, str]:
    from loraforge.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    assert err.count("error: ") == 1 and "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_what_counts_as_out_of_memory():
    assert out_of_memory(torch.OutOfMemoryError(GPU_OOM)) == "GPU"
    assert out_of_memory(MemoryError()) == "host"
    assert out_of_memory(RuntimeError("CUDA error: out of memory")) == "GPU"
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                      "you tried to allocate 123 bytes")) == "host"
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise ValueError("failed while handling it")
    except ValueError as wrapped:
        assert out_of_memory(wrapped) == "host"
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("memory")) is None


def fail_on_call(number: int, error: BaseException):
    calls = []

    def hook(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return hook.original(*args, **kwargs)
    return hook


def test_training_out_of_gpu_memory_names_the_step_and_resumes_with_smaller_passes(capsys, tmp_path, monkeypatch,
                                                                                   tiny_model_dir):
    from loraforge.train import loop

    run = tmp_path / "run"
    hook = fail_on_call(3, torch.OutOfMemoryError(GPU_OOM))  # the pass of step 3; step 2 saved a checkpoint
    hook.original = loop.micro_batch_loss
    monkeypatch.setattr(loop, "micro_batch_loss", hook)
    status, _, err = cli(capsys, "train", "tiny", *FAST, "--set", "train.max_steps=4", "--set", "train.save_steps=2",
                         "--output-dir", str(run))
    assert_one_error(status, err, "training ran out of GPU memory (it tried to allocate 2.00 GiB) in step 3 (a pass "
                     "of 2 rows, ", f"the last checkpoint, {run / 'checkpoints' / 'step-000002'}, "
                     "is intact", "set train.max_tokens_per_micro_batch=", "Then resume with: loraforge train tiny")
    assert (run / "checkpoints" / "step-000002").is_dir() and not (run / "adapter").exists()
    command = shlex.split(err.split("Then resume with: ")[1].strip())
    assert "--resume" in command and any(c.startswith("train.max_tokens_per_micro_batch=") for c in command)
    monkeypatch.setattr(loop, "micro_batch_loss", hook.original)
    status, out, err = cli(capsys, *command[1:])  # the printed command, as given: smaller passes are allowed
    assert status == 0, err
    assert "resumed from" in out and (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_training_out_of_host_memory_before_any_checkpoint(capsys, tmp_path, monkeypatch, tiny_model_dir):
    from loraforge.train import loop

    hook = fail_on_call(1, MemoryError())
    hook.original = loop.micro_batch_loss
    monkeypatch.setattr(loop, "micro_batch_loss", hook)
    status, _, err = cli(capsys, "train", "tiny", *FAST, "--set", "train.max_steps=2", "--set",
                         "train.micro_batch_size=1", "--output-dir", str(tmp_path / "run"))
    assert_one_error(status, err, "training ran out of memory (RAM) in step 1 (one row of ",
                     "no checkpoint was saved before it", "lower data.max_length (64)")
    assert "resume" not in err.lower()
    assert not (tmp_path / "run").exists()  # nothing a user could want back: the same command works once fixed


def test_out_of_memory_in_the_evaluation_that_ends_training(capsys, tmp_path, monkeypatch, tiny_model_dir):
    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError(GPU_OOM)
    monkeypatch.setattr("loraforge.evaluate.compare.evaluate_run", fail)
    run = tmp_path / "run"
    status, _, err = cli(capsys, "train", "tiny", *FAST, "--set", "train.max_steps=1", "--set", "samples=1",
                         "--output-dir", str(run))
    assert_one_error(status, err, f"training finished and its adapter is saved ({run / 'adapter'}), but the "
                     "evaluation at the end ran out of GPU memory", f"loraforge eval {run} --batch-size 1")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command, patch, fragments", [
    (["eval", "{run}", "--metric", "none"], "loraforge.evaluate.compare.loss_side_by_side",
     ["eval ran out of GPU memory (it tried to allocate 2.00 GiB); lower --batch-size"]),
    (["generate", "{run}", "--prompt", "Hi", "--greedy"], "loraforge.infer.generate.generate_reply",
     ["generate ran out of GPU memory", "lower --max-new-tokens"]),
    (["merge", "{run}", "--out", "{tmp}/merged"], "loraforge.export.merge.merge_run",
     ["merge ran out of memory (RAM)", "--dtype bfloat16"]),
    (["export", "gguf", "{run}", "--out", "{tmp}/m.gguf"], "loraforge.export.merge.merge_run",
     ["export ran out of memory (RAM)", "loraforge merge RUN --out DIR --dtype bfloat16"]),
])
def test_out_of_memory_after_training(capsys, tmp_path, monkeypatch, short_run, command, patch, fragments):
    error = torch.OutOfMemoryError(GPU_OOM) if "GPU" in fragments[0] else MemoryError()

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(patch, fail)
    args = [a.format(run=short_run, tmp=tmp_path) for a in command]
    status, _, err = cli(capsys, *args)
    assert_one_error(status, err, *fragments)
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_max_length_above_the_model_context(capsys, tmp_path, tiny_model_dir):
    status, _, err = cli(capsys, "data", "inspect", "tiny", "--max-length", "2048")
    assert_one_error(status, err, "data.max_length 2048 is more than the context of tiny: 1024 tokens "
                     "(config.json max_position_embeddings 1024)", "data.allow_beyond_context: true")
    status, _, err = cli(capsys, "train", "tiny", *FAST, "--set", "data.max_length=1100", "--output-dir",
                         str(tmp_path / "run"))
    assert_one_error(status, err, "data.max_length 1100 is more than the context of tiny: 1024 tokens")
    assert not (tmp_path / "run").exists()  # refused before the weights (and before the folder)
    status, out, err = cli(capsys, "data", "inspect", "tiny", "--max-length", "2048", "--set",
                           "data.allow_beyond_context=true")
    assert status == 0, err
    assert "Tokens per row (max_length 2048)" in out


@pytest.mark.parametrize("rope, limit, how", [
    ({"rope_type": "linear", "factor": 4.0}, 8192, "linear RoPE scaling x4"),
    ({"type": "dynamic", "factor": 2.0}, 4096, "dynamic RoPE scaling x2"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, 65536, "llama3"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 2048, None),
    ({"rope_type": "default", "rope_theta": 10000.0}, 2048, None),
])
def test_context_length_counts_rope_scaling(tmp_path, rope, limit, how):
    from loraforge.config import ModelSettings
    from loraforge.model.load import context_length

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048, "rope_scaling": rope}))
    found, said = context_length(str(tmp_path), ModelSettings(base=str(tmp_path)))
    assert found == limit
    assert (how in said) if how else said == "config.json max_position_embeddings 2048"


def test_csv_header_over_the_field_limit(capsys, tmp_path, tiny_model_dir):
    giant = tmp_path / "giant.csv"
    giant.write_text("input,output," + "c" * 140_000 + "\nq,a,z\n")
    status, _, err = cli(capsys, "data", "inspect", "tiny", "--dataset", str(giant))
    assert_one_error(status, err, f"{giant}: the first line cannot be read as a CSV header",
                     "field larger than field limit", "The first line must name the columns")
    wide = tmp_path / "wide.csv"  # a header over 128 KiB made of ordinary column names is fine
    names = ["input", "output"] + [f"extra_column_{i:05d}" for i in range(9000)]
    wide.write_text(",".join(names) + "\n" + ",".join(["q?", "a."] + ["x"] * 9000) + "\n")
    assert wide.stat().st_size > 128 * 1024
    status, out, err = cli(capsys, "data", "inspect", "tiny", "--dataset", str(wide), "--set", "data.eval_fraction=0")
    assert status == 0, err
    assert "rows: 1 train" in out
