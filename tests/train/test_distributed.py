"""Several devices, tested as 2 CPU processes over gloo through the real `loraforge train --devices 2`.

- DDP on 2 ranks computes what one process computes with the same global batch (2 x 2 rows: each rank
  one micro-batch of 2), step by step, and writes the same adapter;
- only rank 0 writes (one metrics line per step, one set of files, each message printed once);
- SIGTERM to one rank stops both after the same step with one checkpoint, and `--resume` on 2
  ranks continues exactly as the uninterrupted 2-rank run;
- a rank killed outright ends the run with a message and a non-zero status, nothing hangs;
- FSDP2 with the NF4 base (quant_storage float32: bitsandbytes' 4-bit CPU path shards on gloo)
  trains to the same losses, holds about half the parameter bytes per rank, and its gathered
  adapter and optimizer state resume exactly.

Not testable on a CPU: NCCL, CUDA memory per rank, fsdp_cpu_offload's pinned copies, the fused
CUDA forward per rank; `--devices 1` with fsdp on a GPU is run by hand (README).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli

STEPS = 6
RUN = ["--set", f"train.max_steps={STEPS}", "--set", "data.max_length=48", "--set", "train.micro_batch_size=2",
       "--set", "train.gradient_accumulation=2", "--set", "lora.r=8", "--set", "samples=0",
       "--set", "data.eval_fraction=0", "--set", "data.eval_size=4", "--set", "train.eval_steps=3",
       "--set", "train.packing=true", "--set", "train.tensorboard=false", "--set", "train.logging_steps=1",
       "--set", "train.save_steps=3"]
RANKS_ENV = {"OMP_NUM_THREADS": "1"}
SECRET = "hf_SECRETtoken0123456789abcdef"


def train(run_dir: Path, *extra: str):
    result = run_cli("train", "tiny", *RUN, *extra, "--output-dir", str(run_dir), env=RANKS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def steps(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_close_runs(got: Path, want: Path, loss_rtol: float, weight_rtol: float) -> None:
    a, b = steps(got), steps(want)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=loss_rtol), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=loss_rtol * 10), (x, y)
    evals = [[r["eval/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if "eval/loss" in r] for d in (got, want)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=loss_rtol)
    wa, wb = adapter(got), adapter(want)
    assert wa.keys() == wb.keys()
    for name in wa:
        scale = wb[name].abs().max().clamp_min(1e-12)
        assert float((wa[name] - wb[name]).abs().max() / scale) <= weight_rtol, name


def test_each_rank_gets_a_contiguous_share_of_the_step_and_idle_ranks_keep_step():
    from loraforge.train.distributed import Ranks, share

    step = [[0, 1, 2], [3, 4, 5], [6]]  # micro-batches of 3 rows; 7 rows in the step
    assert share(step, Ranks(0, 2, 0, "ddp"), 3) == [([0, 1, 2], 1.0)]
    assert share(step, Ranks(1, 2, 0, "ddp"), 3) == [([3, 4, 5], 1.0), ([6], 1.0)]
    # FSDP: every rank runs as many passes (each gathers the shards); a zero-weight pass fills in.
    assert share(step, Ranks(0, 2, 0, "fsdp"), 3) == [([0, 1, 2], 1.0), ([0], 0.0)]
    # More ranks than rows: the rank without any still takes part, with weight 0.
    assert share([[0]], Ranks(0, 2, 0, "ddp"), 3) == [([0], 0.0)]
    assert share([[0]], Ranks(1, 2, 0, "ddp"), 3) == [([0], 1.0)]
    # One device: the config's own micro-batches, split further by tokens if asked.
    halves = lambda rows: [rows[:1], rows[1:]]  # noqa: E731
    assert share(step[:1], Ranks(), 3, halves) == [([0], 1.0), ([1, 2], 1.0)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, train(run_dir, "--devices", "2")


def test_ddp_on_two_ranks_equals_one_process_with_the_same_global_batch(single, ddp):
    run_dir, _ = ddp
    assert_close_runs(run_dir, single, loss_rtol=1e-5, weight_rtol=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["devices"], summary["distributed"]) == (2, "ddp")
    assert [r["parameter_bytes"] for r in summary["memory_per_rank"]] == \
           [r["model_parameter_bytes"] for r in summary["memory_per_rank"]]  # DDP: a full copy on each rank


def test_only_rank_0_writes(single, ddp):
    run_dir, result = ddp
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(steps(run_dir)) == STEPS  # one line per step, not one per rank
    for text in ("training: ", "done: ", "adapter (PEFT format):"):
        assert result.stdout.count(text) == 1, text
    assert "shared by 2 devices, ddp" in " ".join(result.stdout.split())
    checkpoint = run_dir / "checkpoints" / "step-000006"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    rngs = [torch.load(checkpoint / name, weights_only=True)["torch"] for name in ("rng.pt", "rng-rank1.pt")]
    assert not torch.equal(*rngs), "each rank's own random state is kept"
    assert "Traceback" not in result.stderr


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in children(launcher.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under {launcher.pid}")


def start(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = run_dir.parent / "stdout.txt", run_dir.parent / "stderr.txt"
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", "tiny", *RUN, *extra,
                             "--output-dir", str(run_dir)], stdout=open(out, "w"), stderr=open(err, "w"),
                            env={**os.environ, **RANKS_ENV})
    return proc, out, err


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.is_file() and f'"step": {step},' in path.read_text()):
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.02)


def test_sigterm_on_one_rank_stops_all_after_the_same_step_and_resume_continues_exactly(ddp, tmp_path):
    straight, _ = ddp
    run_dir = tmp_path / "run"
    proc, out, err = start(run_dir, "--devices", "2", "--set", "train.save_steps=100", "--set",
                           f"model.hub_token={SECRET}")
    wait_for_step(run_dir, 1, proc)
    for rank in (0, 1):  # the token reaches each rank in its environment; argv is readable by any user
        pid = rank_pid(proc, rank)
        assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert f"LORAFORGE_HUB_TOKEN={SECRET}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    os.kill(rank_pid(proc, 1), signal.SIGTERM)  # not rank 0, not the launcher: the ranks must agree
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stdout = out.read_text()
    assert "Traceback" not in err.read_text()
    stopped = len(steps(run_dir))
    assert 1 <= stopped < STEPS
    assert f"stopped by signal 15 after step {stopped}" in stdout
    # One checkpoint for the stop (and the best eval's at step 3, if the stop came later).
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved[-1] == f"step-{stopped:06d}" and set(saved) <= {"step-000003", saved[-1]}, saved
    resume = next(line for line in stdout.splitlines() if line.startswith("Resume with: "))
    assert resume.endswith(f"--resume {run_dir} --devices 2")
    printed = [stdout, err.read_text()] + [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file()]
    assert not [text for text in printed if SECRET in text], "the Hub token was printed or written"

    refused = run_cli(*resume.removeprefix("Resume with: loraforge ").split()[:-2], env=RANKS_ENV)
    assert refused.returncode == 2 and "written by a run on 2 device(s)" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    resumed = run_cli(*resume.removeprefix("Resume with: loraforge ").split(), env=RANKS_ENV)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {stopped} of {STEPS}" in " ".join(resumed.stdout.split())
    keys = ("step", "loss", "grad_norm", "lr", "tokens")
    assert [{k: r[k] for k in keys} for r in steps(run_dir)] == [{k: r[k] for k in keys} for r in steps(straight)]
    want, got = adapter(straight), adapter(run_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_killed_rank_ends_the_run_with_a_message_not_a_hang(tmp_path):
    run_dir = tmp_path / "run"
    proc, out, err = start(run_dir, "--devices", "2", "--set", "train.max_steps=500")
    wait_for_step(run_dir, 1, proc)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    killed = time.monotonic()
    status = proc.wait(timeout=90)
    assert time.monotonic() - killed < 60
    assert status not in (0, 2), status
    assert "rank 1 of 2 was killed by SIGKILL; the other ranks were stopped" in err.read_text()
    assert not any(children(proc.pid))


def test_fsdp_shards_the_nf4_base_trains_the_same_and_resumes_exactly(single, tmp_path):
    run_dir = tmp_path / "fsdp"
    train(run_dir, "--devices", "2", "--set", "train.distributed=fsdp")
    assert_close_runs(run_dir, single, loss_rtol=1e-5, weight_rtol=1e-3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["distributed"] == "fsdp"
    # Each rank holds about half: the 4-bit weights (in float32 storage), norms and LoRA are all sharded.
    for rank in summary["memory_per_rank"]:
        assert rank["parameter_bytes"] / rank["model_parameter_bytes"] == pytest.approx(0.5, abs=0.02), rank

    # The gathered checkpoint (full LoRA weights, full optimizer state by parameter name) loads back
    # into the sharded model: from step 3 the run ends where the uninterrupted one did.
    resumed_dir = tmp_path / "resumed"
    result = run_cli("train", "tiny", *RUN, "--devices", "2", "--set", "train.distributed=fsdp",
                     "--resume", str(run_dir / "checkpoints" / "step-000003"), "--output-dir", str(resumed_dir),
                     env=RANKS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    want, got = steps(run_dir), steps(resumed_dir)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in got] == [(r["step"], r["loss"], r["grad_norm"])
                                                                      for r in want[3:]]
    assert all(torch.equal(adapter(run_dir)[k], adapter(resumed_dir)[k]) for k in adapter(run_dir))
