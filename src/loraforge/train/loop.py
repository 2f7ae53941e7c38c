"""The training loop: plain PyTorch on accelerate, top to bottom.

load tokenizer -> prepare data (fails fast, before the weights) -> load and quantize the base ->
attach LoRA -> optimizer/schedule -> for each optimizer step: micro-batches with gradient
accumulation, clip, step, log, evaluate, checkpoint -> save the adapter and sample answers.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from loraforge.atomic import written_whole
from loraforge.config import RunConfig, save_config
from loraforge.errors import UserError
from loraforge.evaluate.loss import mean_token_loss, perplexity
from loraforge.evaluate.environment import environment_info
from loraforge.model.load import load_base_model, load_tokenizer, resolve_base, resolve_dtype, select_device
from loraforge.model.fused import apply_fast_paths
from loraforge.model.lora import attach_lora, count_parameters
from loraforge.train import checkpoint as ckpt
from loraforge.train.metrics import MetricsLog, read_metrics
from loraforge.train.optim import build_optimizer, build_scheduler
from loraforge.train.plan import BatchPlan, collate, collate_packed, split_by_tokens, trained_tokens
from loraforge.train.progress import TrainProgress
from loraforge.train.signals import StopOnSignal

MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN/Inf more often than allowed."""


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved to {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    first_losses: float
    last_losses: float
    tokens_per_s: float
    samples: list[dict] = field(default_factory=list)
    stopped_early: Optional[str] = None
    best_eval: Optional[dict] = None


def micro_batch_loss(model, batch: dict, n_items: int) -> torch.Tensor:
    """Sum of token losses over `n_items`, the trained tokens of the whole optimizer step.

    Dividing each micro-batch's sum by the step total makes accumulated gradients equal to one
    big batch's token mean, however the tokens fall into micro-batches.
    """
    # No KV cache in training: with one, transformers ignores the packed sequences' boundaries.
    return model(**batch, num_items_in_batch=n_items, use_cache=False).loss


def run_training(cfg: RunConfig, run_dir: Path, resume_from: Optional[Path] = None, console=None,
                 step_hook: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train as `cfg` says into `run_dir`; `step_hook(step, record)` is called before each step
    (record None) and after it (the step's metrics), e.g. by the benchmark to time steps."""
    from loraforge.data import prepare, write_data_report

    say = console.print if console is not None else print
    run_dir = Path(run_dir)
    set_seed(cfg.train.seed)
    device = select_device()
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    base = resolve_base(cfg.model)

    # Data first: a bad row should fail in seconds, not after loading 7B weights.
    tokenizer = load_tokenizer(cfg.model, base)
    data = prepare(cfg.data, tokenizer, log=say)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "template.json").write_text(json.dumps(data.template_record(), indent=1))
    write_data_report(data, run_dir)

    model = load_base_model(cfg.model, dtype, device, base)
    model = attach_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    fast_paths = apply_fast_paths(model, cfg.train, device, say)  # what is on, and why anything is off
    trainable, total = count_parameters(model)
    say(f"model: {base} ({cfg.model.quantization}, compute {str(dtype).removeprefix('torch.')}, {device}); "
        f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[dtype], cpu=device == "cpu")
    plan = BatchPlan([len(r["input_ids"]) for r in data.train], cfg.train.micro_batch_size,
                     cfg.train.gradient_accumulation, cfg.train.seed, cfg.train.group_by_length, cfg.train.shuffle)
    # Packing is exact either way; auto packs where the fused path runs (varlen attention), since on the
    # plain path the block-diagonal mask over the whole stream costs more than the padding it saves.
    packed = cfg.train.packing == "on" or (cfg.train.packing == "auto" and "fused layers" in fast_paths.on)
    make_batch = collate_packed if packed else collate
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(model.parameters(), cfg.train, device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    state = {"best_eval_loss": None, "best_step": None, "evals_without_gain": 0, "bad_steps": 0}
    start_step = 0
    if resume_from is not None:
        state.update(ckpt.load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler))
        start_step = state.pop("step")
        say(f"resumed from {resume_from} at step {start_step} of {total_steps}")
    metrics = MetricsLog(run_dir, cfg.train.tensorboard, resume_step=start_step if resume_from else None)
    last_checkpoint = resume_from

    def save(step: int) -> Path:
        protect = {state["best_step"]} if state["best_step"] is not None else set()
        try:
            return ckpt.save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                        state, cfg.train.save_total_limit, protect)
        except OSError as e:
            raise UserError(f"could not write the checkpoint for step {step} in {run_dir}: {e.strerror or e}. "
                            f"The previous checkpoint ({last_checkpoint}) is intact; free space and resume") from e

    def save_once(step: int) -> Path:
        """save(step), unless this step was just saved (a best eval, then a signal or the end)."""
        if last_checkpoint is not None and Path(last_checkpoint).name == ckpt.checkpoint_name(step):
            return last_checkpoint
        return save(step)

    say(f"training: {len(data.train)} rows, {total_steps} steps of {plan.rows_per_step} rows "
        f"({cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation} accumulation), run directory {run_dir}")
    model.train()
    # On resume, the losses before the checkpoint come from the log, so the summary covers the whole run.
    step_losses: list[float] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r] if resume_from else []
    tokens_seen, train_seconds = 0, 0.0
    stopped_early = None
    completed = start_step
    with StopOnSignal() as stop, TrainProgress(total_steps, start_step, console) as progress:
        for step in range(start_step, total_steps):
            if step_hook:
                step_hook(step, None)
            started = time.perf_counter()
            micro_batches = [[data.train[i] for i in rows] for rows in plan.step_rows(step)]
            if cfg.train.max_tokens_per_micro_batch:  # same rows, same loss: only the memory per pass changes
                micro_batches = [part for rows in micro_batches
                                 for part in split_by_tokens(rows, cfg.train.max_tokens_per_micro_batch)]
            n_items = sum(trained_tokens(rows) for rows in micro_batches)
            step_loss = torch.zeros((), device=accelerator.device)
            step_tokens = 0
            for index, rows in enumerate(micro_batches):
                batch = {k: v.to(accelerator.device) for k, v in make_batch(rows, tokenizer.pad_token_id).items()}
                step_tokens += sum(len(r["input_ids"]) for r in rows)
                last = index == len(micro_batches) - 1
                with accelerator.no_sync(model) if not last else contextlib.nullcontext():
                    loss = micro_batch_loss(model, batch, n_items)
                    accelerator.backward(loss)
                step_loss += loss.detach().float()
            grad_norm = _clip(accelerator, params, cfg.train.max_grad_norm)
            loss_value = float(step_loss)

            if not math.isfinite(loss_value) or (accelerator.scaler is None and not math.isfinite(grad_norm)):
                state["bad_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
                if state["bad_steps"] > cfg.train.max_bad_steps:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
                    metrics.close()
                    raise TrainingDiverged(
                        f"training diverged at step {step + 1}: loss {loss_value}, gradient norm {grad_norm}; {where}. "
                        "Lower train.learning_rate, check the data, or allow skips with train.max_bad_steps")
                say(f"step {step + 1}: non-finite loss/gradient, step skipped ({state['bad_steps']} of "
                    f"{cfg.train.max_bad_steps} allowed)")
            else:
                optimizer.step()
            lr_used = scheduler.get_last_lr()[0]  # the rate this step trained with, before the schedule moves on
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1

            seconds = time.perf_counter() - started
            tokens_seen += step_tokens
            train_seconds += seconds
            step_losses.append(loss_value)
            record = {"step": step + 1, "epoch": round(plan.epoch_of(step + 1), 4), "loss": loss_value,
                      "lr": lr_used, "grad_norm": grad_norm, "tokens": step_tokens,
                      "tokens_per_s": step_tokens / seconds if seconds else 0.0}
            if device.startswith("cuda"):
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.log(record)
            if step_hook:
                step_hook(step, record)
            progress.update(step + 1, record)
            if (step + 1) % cfg.train.logging_steps == 0 or step + 1 == total_steps:
                progress.log_line(record)

            if cfg.train.eval_steps and data.eval and ((step + 1) % cfg.train.eval_steps == 0 or step + 1 == total_steps):
                eval_loss, _ = mean_token_loss(model, data.eval, cfg.train.micro_batch_size, tokenizer.pad_token_id,
                                               accelerator.device)
                improved = state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]
                metrics.log({"step": step + 1, "eval/loss": eval_loss, "eval/perplexity": perplexity(eval_loss)})
                say(f"step {step + 1}: eval loss {eval_loss:.4f} (perplexity {perplexity(eval_loss):.2f})"
                    + (" - best so far" if improved else ""))
                if improved:
                    state.update(best_eval_loss=eval_loss, best_step=step + 1, evals_without_gain=0)
                    last_checkpoint = save(step + 1)
                else:
                    state["evals_without_gain"] += 1
                    patience = cfg.train.early_stopping_patience
                    if patience and state["evals_without_gain"] >= patience:
                        stopped_early = f"early stopping at step {step + 1}: no eval gain in {patience} evaluations"
                        say(stopped_early)
                        total_steps = step + 1

            if stop.requested:
                last_checkpoint = save_once(step + 1)
                metrics.close()
                raise TrainingInterrupted(stop.signum, step + 1, last_checkpoint)
            if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and step + 1 < total_steps:
                last_checkpoint = save(step + 1)
            if stopped_early:
                break

        last_checkpoint = save_once(completed)
    metrics.close()

    unwrapped = accelerator.unwrap_model(model)
    adapter_dir = run_dir / "adapter"
    try:  # written aside and renamed: a kill or a full disk never leaves a half-written adapter
        with written_whole(adapter_dir, folder=True) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "template.json").write_text((run_dir / "template.json").read_text())
    except OSError as e:
        raise UserError(f"could not write the adapter to {adapter_dir}: {e.strerror or e}. The final checkpoint "
                        f"{last_checkpoint} is complete: free space and run the same command with --resume") from e
    samples = sample_answers(unwrapped, tokenizer, data, cfg.samples)
    window = max(1, len(step_losses) // 10)
    result = TrainResult(
        run_dir=run_dir, adapter_dir=adapter_dir, steps=completed,
        first_losses=_mean(step_losses[:window]), last_losses=_mean(step_losses[-window:]),
        tokens_per_s=tokens_seen / train_seconds if train_seconds else 0.0, samples=samples,
        stopped_early=stopped_early,
        best_eval={"step": state["best_step"], "loss": state["best_eval_loss"],
                   "checkpoint": str(run_dir / ckpt.CHECKPOINT_DIR / ckpt.checkpoint_name(state["best_step"]))}
        if state["best_step"] else None)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
    summary.update(trainable_parameters=trainable, total_parameters=total, base_model=base, device=device,
                   fast_paths=fast_paths.as_dict(),
                   compute_dtype=str(dtype).removeprefix("torch."), environment=environment_info(device))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


def sample_answers(model, tokenizer, data, count: int) -> list[dict]:
    """Greedy answers to a few held-out (or training) prompts, with the adapter off and on."""
    from loraforge.infer.generate import generate_reply

    out = []
    for sample in data.samples[:count]:
        prompt = data.template.prompt(sample["messages"])
        kw = dict(max_new_tokens=48, stop_strings=tuple(data.template.stop_strings))
        with model.disable_adapter():
            before = generate_reply(model, tokenizer, prompt, **kw)
        after = generate_reply(model, tokenizer, prompt, **kw)
        question = next(m["content"] for m in reversed(sample["messages"]) if m["role"] == "user")
        out.append({"question": question, "reference": sample["reference"], "before": before, "after": after})
    return out


def _clip(accelerator, params, max_norm: Optional[float]) -> float:
    if max_norm:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
