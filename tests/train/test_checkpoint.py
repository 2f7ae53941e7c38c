"""Checkpoints: atomic, complete or ignored, pruned safely; crashes, NaNs and evaluation in the real loop.

The first half drives `loraforge.train.checkpoint` with a small PEFT model (milliseconds); the
second half runs the real training loop on the tiny model, in-process, with faults injected
by monkeypatching.
"""
import json
import math
import os
import random
import re
import shutil
import signal
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loraforge import rundir
from loraforge.errors import UserError
from loraforge.train import checkpoint as ckpt
from loraforge.train.resume import find_resume_checkpoint


# --- the checkpoint module on a small PEFT model -------------------------------------------------

def toy():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(lin=nn.Linear(8, 8), out=nn.Linear(8, 8)))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin", "out"], lora_dropout=0.5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    """One step that draws from every generator the loop's state covers (dropout: torch)."""
    x = torch.randn(4, 8) + random.random() + float(np.random.rand())
    loss = model(x).pow(2).mean()
    loss.backward()
    loss = loss.detach()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def save(run_dir, step, parts, keep=3, protect=frozenset(), **state):
    return ckpt.save_checkpoint(run_dir, *parts, ckpt.TrainerState(step=step, **state), keep, set(protect))


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    parts = toy()
    for _ in range(3):
        train_step(*parts)
    path = save(tmp_path, 3, parts, best_step=2)
    straight = [train_step(*parts) for _ in range(3)]
    want = adapter_weights(parts[0])

    fresh = toy()  # the same base, but other adapter weights and generator states: all must be restored
    with torch.no_grad():
        for p in fresh[0].parameters():
            if p.requires_grad:
                p.normal_()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    state = ckpt.load_checkpoint(path, *fresh)
    assert state == ckpt.TrainerState(step=3, best_step=2)
    resumed = [train_step(*fresh) for _ in range(3)]
    assert resumed == straight
    got = adapter_weights(fresh[0])
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert fresh[2].get_last_lr() == parts[2].get_last_lr()


def test_checkpoint_files_load_without_pickled_objects(tmp_path):
    parts = toy()
    train_step(*parts)
    path = save(tmp_path, 1, parts)
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} >= set(rundir.CHECKPOINT_FILES)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # raises on anything but tensors and plain values
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= rng.keys() and isinstance(rng["numpy"][1], torch.Tensor)
    assert load_file(str(path / rundir.CHECKPOINT_ADAPTER_WEIGHTS))
    assert json.loads((path / rundir.CHECKPOINT_STATE_FILE).read_text()) == {
        "step": 1, "best_eval_loss": None, "best_step": None, "evals_without_gain": 0, "bad_steps": 0, "world_size": 1}


@pytest.mark.parametrize("fault", [RuntimeError("simulated crash"), OSError(28, "No space left on device")],
                         ids=["crash", "full-disk"])
def test_a_fault_mid_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, fault):
    parts = toy()
    train_step(*parts)
    good = save(tmp_path, 1, parts)
    before = {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    train_step(*parts)

    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the optimizer is written, the scheduler is not
            raise fault
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(fault)):
        save(tmp_path, 2, parts)
    monkeypatch.undo()

    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"], "no partial folder left"
    assert {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert rundir.latest_checkpoint(tmp_path) == good
    assert ckpt.load_checkpoint(good, *toy()).step == 1


def test_partial_checkpoints_left_by_a_hard_kill_are_ignored(tmp_path):
    parts = toy()
    train_step(*parts)
    good = save(tmp_path, 2, parts)
    root = tmp_path / "checkpoints"
    # A kill mid-save: the temporary folder with some files...
    (root / ".tmp-step-000004-12345" / "adapter").mkdir(parents=True)
    (root / ".tmp-step-000004-12345" / "optimizer.pt").write_bytes(b"\x80partial")
    # ...and a step folder missing its last file (as a copy tool or a hand-made folder could leave).
    partial = root / "step-000006"
    partial.mkdir()
    for name in rundir.CHECKPOINT_FILES:
        if name != rundir.CHECKPOINT_STATE_FILE:
            (partial / name).parent.mkdir(exist_ok=True)
            (partial / name).write_bytes(b"x")
    # ...and one whose state file is there but a tensor file is not (a delete cut short).
    gutted = root / "step-000007"
    shutil.copytree(good, gutted)
    (gutted / "optimizer.pt").unlink()
    (root / "step-000008").write_text("not a folder")
    (root / "notes").mkdir()

    assert rundir.list_checkpoints(tmp_path) == [(2, good)]
    assert rundir.latest_checkpoint(tmp_path) == good
    assert find_resume_checkpoint("latest", tmp_path) == good
    assert find_resume_checkpoint(str(tmp_path), tmp_path) == good
    with pytest.raises(UserError, match=r"step-000006 is incomplete \(no trainer_state.json\)"):
        find_resume_checkpoint(str(partial), tmp_path)
    with pytest.raises(UserError, match=r"step-000006 is incomplete"):
        ckpt.load_checkpoint(partial, *toy())
    (partial / rundir.CHECKPOINT_STATE_FILE).write_text("{}")  # complete names, garbage content: a clear error, no traceback
    with pytest.raises(UserError, match=r"step-000006 cannot be loaded"):
        ckpt.load_checkpoint(partial, *toy())

    save(tmp_path, 3, parts)  # the next save sweeps the leftovers of the killed one
    assert not (root / ".tmp-step-000004-12345").exists()


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    parts = toy()
    for step in range(1, 6):
        train_step(*parts)
        save(tmp_path, step, parts, keep=2, protect={2})
    assert [s for s, _ in rundir.list_checkpoints(tmp_path)] == [2, 4, 5]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_saving_a_step_again_replaces_it_whole_or_not_at_all(tmp_path, monkeypatch):
    parts = toy()
    train_step(*parts)
    save(tmp_path, 1, parts, best_step=None)
    path = save(tmp_path, 1, parts, best_step=1)  # e.g. best eval, then SIGTERM, at the same step
    assert json.loads((path / rundir.CHECKPOINT_STATE_FILE).read_text())["best_step"] == 1

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save(tmp_path, 1, parts, best_step=7)
    assert rundir.is_complete_checkpoint(path) and json.loads((path / rundir.CHECKPOINT_STATE_FILE).read_text())["best_step"] == 1


def test_a_second_signal_cannot_fall_between_the_renames_of_a_replace(tmp_path, monkeypatch):
    """Replacing a checkpoint takes two renames; SIGTERM is held in between, so the folder always exists."""
    parts = toy()
    train_step(*parts)
    path = save(tmp_path, 1, parts)
    real_replace, seen = os.replace, []

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if not Path(dst).name.startswith(".trash-") and not Path(src).name.startswith(".tmp-"):
            return  # a rename inside the writers (e.g. save_pretrained's own), not the swap under test
        seen.append(Path(dst).name)
        if len(seen) == 1:  # the old folder is renamed aside: the worst moment for a signal
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append(f"still running, final exists: {path.exists()}")

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    old_handler = signal.signal(signal.SIGTERM, exit_now)
    try:
        monkeypatch.setattr(ckpt.os, "replace", replace_then_signal)
        with pytest.raises(SystemExit):
            save(tmp_path, 1, parts, best_step=1)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert seen[1] == "still running, final exists: False" and seen[2] == "step-000001"
    assert rundir.is_complete_checkpoint(path) and json.loads((path / rundir.CHECKPOINT_STATE_FILE).read_text())["best_step"] == 1


# --- the real loop, in-process, with faults injected ---------------------------------------------

SMALL = ["--set", "data.max_length=64", "--set", "train.micro_batch_size=1", "--set", "train.tensorboard=false",
         "--set", "samples=0", "--set", "train.logging_steps=1", "--set", "lora.r=4", "--set", "train.eval_steps=null"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """The `loraforge` command in this process (so monkeypatches apply): exit status, stdout, stderr."""
    from loraforge.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out.replace("\n", ""), err.replace("\n", " ")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_steps_are_skipped_up_to_the_limit_then_the_run_stops(tmp_path, capsys, monkeypatch, tiny_model_dir):
    from loraforge.train import loop

    real, calls = loop.micro_batch_loss, []

    class InfiniteGradient(torch.autograd.Function):
        """The loss passes unchanged; its gradient comes back infinite (as in an fp16 overflow)."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def nan_loss_on_step_2_inf_gradient_on_step_4(model, batch, n_items):
        calls.append(1)  # one micro-batch per step here
        loss = real(model, batch, n_items)
        return {2: loss * float("nan"), 4: InfiniteGradient.apply(loss)}.get(len(calls), loss)

    monkeypatch.setattr(loop, "micro_batch_loss", nan_loss_on_step_2_inf_gradient_on_step_4)
    run_dir = tmp_path / "run"
    status, out, err = cli(capsys, "train", "tiny", *SMALL, "--set", "train.max_steps=6", "--set", "train.save_steps=1",
                           "--set", "train.save_total_limit=6", "--set", "train.max_bad_steps=1",
                           "--output-dir", str(run_dir))
    last_good = run_dir / "checkpoints" / "step-000003"
    assert status == 2, err
    # Step 4's loss is finite: the gradient norm alone stops it.
    assert re.search(r"error: training diverged at step 4: loss \d+\.\d+, gradient norm (nan|inf);", err), err
    assert f"the last good checkpoint is {last_good}" in err and "train.max_bad_steps" in err
    assert "Traceback" not in err
    assert "step 2: non-finite loss/gradient, step skipped (1 of 1 allowed)" in out

    assert [s for s, _ in rundir.list_checkpoints(run_dir)] == [1, 2, 3]  # nothing saved from the bad step
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and math.isnan(steps[1]["loss"])
    w = {s: load_file(str(p / rundir.CHECKPOINT_ADAPTER_WEIGHTS)) for s, p in rundir.list_checkpoints(run_dir)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1]), "a skipped step must not change the weights"
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[2]), "the step after it trains again"
    assert all(torch.isfinite(t).all() for t in w[3].values())
    assert json.loads((last_good / rundir.CHECKPOINT_STATE_FILE).read_text())["bad_steps"] == 1


def test_a_crash_mid_save_then_resume_continues_from_the_last_whole_checkpoint(tmp_path, capsys, monkeypatch,
                                                                               tiny_model_dir):
    from loraforge.config import load_config
    from loraforge.train.loop import run_training

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [*SMALL, "--set", "train.max_steps=5", "--set", "train.save_steps=2"]
    cfg = load_config("tiny", [a for a in args if a != "--set"] + [f"output_dir={run_dir}"])
    real_save, saves = torch.save, []

    def crash_in_second_checkpoint(obj, f, *a, **kw):
        saves.append(Path(f).parent.name)
        if len(set(saves)) == 2:
            raise RuntimeError("simulated crash while writing the step-4 checkpoint")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crash_in_second_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, run_dir)
    monkeypatch.undo()
    good = run_dir / "checkpoints" / "step-000002"
    assert rundir.list_checkpoints(run_dir) == [(2, good)]
    # A hard kill would have left these instead of cleaning up; they must be ignored too.
    (run_dir / "checkpoints" / ".tmp-step-000004-99999").mkdir()
    (run_dir / "checkpoints" / "step-000004" / "adapter").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000004" / "optimizer.pt").write_bytes(b"partial")

    status, out, err = cli(capsys, "train", "tiny", *args, "--resume", str(run_dir))
    assert status == 0, err
    assert f"resumed from {good} at step 2 of 5" in out
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [s for s, _ in rundir.list_checkpoints(run_dir)] == [4, 5]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_evaluation_logs_perplexity_stops_early_and_keeps_the_best_checkpoint(tmp_path, capsys, monkeypatch,
                                                                             tiny_model_dir):
    from loraforge.train import loop

    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop, "mean_token_loss", lambda *a, **kw: (next(scripted), 100))
    run_dir = tmp_path / "run"
    status, out, err = cli(capsys, "train", "tiny", *SMALL, "--set", "train.max_steps=8", "--set", "train.eval_steps=1",
                           "--set", "train.early_stopping_patience=2", "--set", "train.save_total_limit=1",
                           "--output-dir", str(run_dir))
    assert status == 0, err
    evals = [r for r in records(run_dir) if "eval/loss" in r]
    assert [(r["step"], r["eval/loss"]) for r in evals] == [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.6)]
    assert all(r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"])) for r in evals)
    assert "early stopping at step 4: no eval gain in 2 evaluations" in out
    best = run_dir / "checkpoints" / "step-000002"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_eval"] == {"step": 2, "loss": 2.0, "checkpoint": str(best)}
    # save_total_limit=1 keeps the newest, and the best is kept besides.
    assert rundir.list_checkpoints(run_dir) == [(2, best), (4, run_dir / "checkpoints" / "step-000004")]
    assert json.loads((best / rundir.CHECKPOINT_STATE_FILE).read_text())["best_step"] == 2


def test_trainer_state_reads_an_older_checkpoint_and_names_a_mistyped_field(tmp_path):
    older = {"step": 7, "best_eval_loss": 1.5, "best_step": 6, "evals_without_gain": 1, "bad_steps": 0}
    (tmp_path / rundir.CHECKPOINT_STATE_FILE).write_text(json.dumps(older))  # one device, before world_size
    assert ckpt.TrainerState.read(tmp_path) == ckpt.TrainerState(7, 1.5, 6, 1, 0, world_size=1)
    (tmp_path / rundir.CHECKPOINT_STATE_FILE).write_text(json.dumps(dict(older, bad_steps="0", step=True)))
    with pytest.raises(UserError, match=r"trainer_state.json has no valid step, bad_steps; resume from an earlier"):
        ckpt.TrainerState.read(tmp_path)
    state = ckpt.TrainerState(step=3, best_eval_loss=0.5, best_step=2, world_size=2)
    (tmp_path / rundir.CHECKPOINT_STATE_FILE).write_text(state.to_json())
    assert ckpt.TrainerState.read(tmp_path) == state
