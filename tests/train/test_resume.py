"""Runs that survive: SIGTERM mid-run and `--resume` give the same adapter and losses as a straight run.

Everything goes through the real `loraforge train` command in a subprocess, as a user (or a
preemptible GPU's shutdown hook) would drive it. LoRA dropout is on, so the random state has to
continue exactly, not only the weights and the data order; the learning rate follows a cosine
schedule with warm-up, so the scheduler state must continue too; and gradients are accumulated
over two micro-batches.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli

STEPS = 10
SECRET = "hf_SECRETtoken0123456789abcdef"
RUN = ["--set", f"train.max_steps={STEPS}", "--set", "data.max_length=64", "--set", "train.micro_batch_size=1",
       "--set", "train.gradient_accumulation=2", "--set", "lora.dropout=0.1", "--set", "lora.r=8",
       "--set", "train.lr_scheduler=cosine", "--set", "train.warmup_ratio=0.2", "--set", "train.save_steps=4",
       "--set", "train.eval_steps=5", "--set", "train.logging_steps=1", "--set", "samples=0",
       "--set", "data.eval_fraction=0", "--set", "data.eval_size=4", "--set", "train.tensorboard=false"]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]


def start_cli(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    """`loraforge train ...` in the background, stdout and stderr to files we can read while it runs."""
    out, err = run_dir.parent / f"{run_dir.name}.out", run_dir.parent / f"{run_dir.name}.err"
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", "tiny", *RUN, *extra, "--output-dir", str(run_dir)],
                            stdout=open(out, "w"), stderr=open(err, "w"), env=dict(os.environ))
    return proc, out, err


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def has_step(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and f'"step": {step},' in path.read_text()


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli("train", "tiny", *RUN, "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


def test_sigterm_then_resume_matches_a_straight_run_bitwise(straight_run, tmp_path):
    run_dir = tmp_path / "run"
    # The token rides along, in a section set whole (the recipe's own values), to show that it is written
    # nowhere, not even in the resume command.
    proc, out, err = start_cli(run_dir, "--set", f"model={{base: tiny, hub_token: {SECRET}}}")
    wait_for(lambda: has_step(run_dir, 2), proc, "step 2 was logged")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    stdout, stderr = out.read_text(), err.read_text()
    assert "Traceback" not in stderr
    assert "signal 15 received: finishing this step" in stderr

    stopped = int(re.search(r"stopped by signal 15 after step (\d+); checkpoint saved to (\S+)", stdout).group(1))
    assert 2 <= stopped < STEPS, stopped
    checkpoint = run_dir / "checkpoints" / f"step-{stopped:06d}"
    assert f"checkpoint saved to {checkpoint}" in stdout
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == stopped
    assert not (run_dir / "adapter").exists(), "an interrupted run has no final adapter yet"
    resume_line = next(line for line in stdout.splitlines() if line.startswith("Resume with: "))
    assert resume_line.endswith(f"--resume {run_dir}") and "train.max_steps=10" in resume_line
    assert SECRET not in resume_line and "hub_token" not in resume_line
    assert """--set 'model={"base": "tiny"}'""" in resume_line  # the rest of the section stays
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, stopped + 1))

    # The printed command, run as printed (minus the program name), finishes the run.
    args = shlex.split(resume_line.removeprefix("Resume with: loraforge "))
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {checkpoint} at step {stopped} of {STEPS}" in resumed.stdout.replace("\n", "")

    # Same adapter, bit for bit, and the same losses, learning rates and gradient norms at every step.
    want, got = adapter_tensors(straight_run / "adapter"), adapter_tensors(run_dir / "adapter")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # The logged rate is the one each step trained with: warm-up over 2 steps starts at 1/3 of 3e-3.
    assert step_records(straight_run)[0]["lr"] == pytest.approx(1e-3)
    keys = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [{k: r[k] for k in keys} for r in step_records(run_dir)] == \
           [{k: r[k] for k in keys} for r in step_records(straight_run)]
    assert [r["eval/loss"] for r in eval_records(run_dir)] == [r["eval/loss"] for r in eval_records(straight_run)]
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((straight_run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert (summary["first_losses"], summary["last_losses"]) == (reference["first_losses"], reference["last_losses"])
    assert (summary["best_eval"]["step"], summary["best_eval"]["loss"]) == \
           (reference["best_eval"]["step"], reference["best_eval"]["loss"])

    # The token was only ever in memory.
    texts = {"stdout": stdout + resumed.stdout, "stderr": stderr + resumed.stderr}
    for path in run_dir.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    leaked = [name for name, text in texts.items() if SECRET in text]
    assert not leaked, f"the Hub token was written to {leaked}"
    assert "hub_token" not in (run_dir / "config.yaml").read_text()


def test_a_second_signal_exits_at_once_and_the_last_checkpoint_stays_good(tmp_path):
    from loraforge.rundir import CHECKPOINT_FILES, latest_checkpoint, list_checkpoints

    run_dir = tmp_path / "run"
    proc, out, err = start_cli(run_dir, "--set", "train.save_steps=2", "--set", "train.max_steps=40")
    wait_for(lambda: has_step(run_dir, 3), proc, "step 3 was logged")
    proc.send_signal(signal.SIGINT)  # Ctrl-C first, then a SIGTERM
    wait_for(lambda: "signal 2 received" in err.read_text(), proc, "the first signal was acknowledged")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    status = proc.wait(timeout=60)
    assert time.monotonic() - started < 30
    stderr = err.read_text()
    assert "Traceback" not in stderr
    # Normally the second signal lands while the step or its save is still running: "exiting now",
    # status 143. If the process was quicker (checkpoint saved, handlers given back), the default
    # action ends it (-15). Either way only whole checkpoints may be left behind.
    assert status in (128 + signal.SIGTERM, -signal.SIGTERM), status
    if status == 128 + signal.SIGTERM:
        assert "second signal 15: exiting now" in stderr or "Resume with:" in out.read_text(), stderr

    found = list_checkpoints(run_dir)
    assert found and found[-1][0] >= 2
    for step, path in found:
        for name in CHECKPOINT_FILES:
            assert (path / name).is_file(), (path, name)
        torch.load(path / "optimizer.pt", weights_only=True)
        torch.load(path / "rng.pt", weights_only=True)
        load_file(str(path / "adapter" / "adapter_model.safetensors"))
        assert json.loads((path / "trainer_state.json").read_text())["step"] == step
    assert latest_checkpoint(run_dir) == found[-1][1]
