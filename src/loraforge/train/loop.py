"""The training loop: plain PyTorch on accelerate, top to bottom.

load tokenizer -> prepare data (fails fast, before the weights) -> load and quantize the base ->
attach LoRA -> optimizer/schedule -> for each optimizer step: micro-batches with gradient
accumulation, clip, step, log, evaluate, checkpoint -> save the adapter. (The before/after answers and
the base-vs-tuned evaluation that end `loraforge train` are the cli's: it runs `evaluate` after this.)
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from loraforge.atomic import write_text_whole, written_whole
from loraforge.config import RunConfig, save_config
from loraforge.environment import environment_info
from loraforge.errors import UserError
from loraforge.model.load import (check_max_length, load_base_model, load_tokenizer, resolve_base, resolve_dtype,
                                  select_device)
from loraforge.model.fused import FastPathReport, apply_fast_paths
from loraforge.model.lora import attach_lora, count_parameters
from loraforge.rundir import (ADAPTER_DIR, CHECKPOINT_DIR, CONFIG_FILE, SUMMARY_FILE, TEMPLATE_FILE, checkpoint_name,
                              read_metrics)
from loraforge.train import checkpoint as ckpt
from loraforge.train import distributed
from loraforge.train.checkpoint import TrainerState
from loraforge.train.health import CollapseWatch
from loraforge.train.loss import mean_token_loss, perplexity
from loraforge.train.metrics import MetricsLog
from loraforge.train.oom import PassWatch, out_of_memory_stops_the_run
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
    stopped_early: Optional[str] = None
    best_eval: Optional[dict] = None
    warnings: list[str] = field(default_factory=list)  # said during the run, repeated at its end
    model: object = field(default=None, repr=False)  # the trained model (PEFT), e.g. for the cli's evaluation


def run_training(cfg: RunConfig, run_dir: Path, resume_from: Optional[Path] = None, console=None,
                 step_hook: Optional[Callable[[int, dict], None]] = None) -> Optional[TrainResult]:
    """Train as `cfg` says into `run_dir`; `step_hook(step, record)` is called before each step
    (record None) and after it (the step's metrics), e.g. by the benchmark to time steps.
    On a rank other than 0 of a multi-device run (train/distributed.py) it returns None."""
    # Unwrapped and literal: paths stay whole at any terminal width, and text from the data is never markup.
    say = (lambda m: console.print(m, markup=False, soft_wrap=True)) if console is not None else print
    run_dir = Path(run_dir)
    t = _set_up(cfg, run_dir, say)
    state = TrainerState()
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, t.accelerator.unwrap_model(t.model), t.optimizer, t.scheduler,
                                     rank=t.ranks.rank, **distributed.checkpoint_loaders(t.model, t.optimizer, t.ranks))
        say(f"resumed from {resume_from} at step {state.step} of {t.total_steps}")
    metrics = MetricsLog(run_dir, cfg.train.tensorboard, resume_step=state.step if resume_from else None,
                         active=t.ranks.is_main)
    checkpoints = ckpt.RunCheckpoints(run_dir, t.accelerator.unwrap_model(t.model), t.model, t.optimizer, t.scheduler,
                                      t.ranks, cfg.train.save_total_limit, last=resume_from)
    say(f"training: {len(t.data.train)} rows, {t.total_steps} steps of {t.plan.rows_per_step} rows "
        f"({cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation} accumulation"
        + (f", shared by {t.ranks.world} devices, {t.ranks.mode}" if t.ranks.collective else "")
        + f"), run directory {run_dir}")
    t.model.train()
    # On resume, the losses before the checkpoint come from the log, so the summary covers the whole run.
    losses: list[float] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r] if resume_from else []
    throughput = {"tokens": 0, "seconds": 0.0}
    stopped_early, warnings = None, []
    collapse = CollapseWatch(len(t.tokenizer), cfg.train.learning_rate)
    watch = t.watch  # an out-of-memory names the step and the pass, and what is intact (train/oom.py)
    with StopOnSignal(announce=t.ranks.is_main) as stop, TrainProgress(t.total_steps, state.step, console) as progress, \
            out_of_memory_stops_the_run(watch, checkpoints, cfg.train.micro_batch_size, cfg.data.max_length):
        for step in range(state.step, t.total_steps):
            if step_hook:
                step_hook(step, None)
            watch.step = step + 1
            started = time.perf_counter()
            step_loss, step_tokens = _forward_backward(t, cfg, step)
            loss, step_tokens, signum = distributed.step_totals(t.ranks, step_loss, step_tokens, stop.signum)
            grad_norm = _clip(t.accelerator, t.params, cfg.train.max_grad_norm)
            lr_used = _optimizer_step(t, cfg, state, step + 1, loss, grad_norm, checkpoints.last, metrics, say)
            state.step = step + 1

            seconds = time.perf_counter() - started
            throughput["tokens"] += step_tokens
            throughput["seconds"] += seconds
            losses.append(loss)
            record = {"step": step + 1, "epoch": round(t.plan.epoch_of(step + 1), 4), "loss": loss,
                      "lr": lr_used, "grad_norm": grad_norm, "tokens": step_tokens,
                      "tokens_per_s": step_tokens / seconds if seconds else 0.0}
            if t.device.startswith("cuda"):
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.log(record)
            if warning := collapse.check(record):
                say(warning)
                warnings.append(warning)
            if step_hook:
                step_hook(step, record)
            progress.update(step + 1, record)
            if (step + 1) % cfg.train.logging_steps == 0 or step + 1 == t.total_steps:
                progress.log_line(record)

            last = step + 1 == t.total_steps
            if cfg.train.eval_steps and t.data.eval and ((step + 1) % cfg.train.eval_steps == 0 or last):
                watch.phase = "eval"
                stopped_early = _evaluate(t, cfg, state, metrics, checkpoints, say)
            watch.phase = "save"
            if signum:  # a signal on any rank stops every rank after this same step
                saved = checkpoints.save_once(state)
                metrics.close()
                raise TrainingInterrupted(signum, state.step, saved)
            if cfg.train.save_steps and (step + 1) % cfg.train.save_steps == 0 and not last:
                checkpoints.save(state)
            if stopped_early:
                break
        checkpoints.save_once(state)
    metrics.close()
    return _finish(t, cfg, run_dir, state, checkpoints.last, losses, throughput, stopped_early, warnings, say)


@dataclass
class _Training:
    """What the loop works with, made by `_set_up`."""
    ranks: distributed.Ranks
    device: str
    dtype: torch.dtype
    base: str
    tokenizer: object
    data: object
    model: torch.nn.Module
    fast_paths: FastPathReport
    parameters: tuple[int, int]  # trainable, total
    accelerator: Accelerator
    plan: BatchPlan
    make_batch: Callable
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list  # the trainable ones, whose gradients are clipped
    watch: PassWatch = field(default_factory=PassWatch)  # what runs now, for an out-of-memory message


def _set_up(cfg: RunConfig, run_dir: Path, say) -> _Training:
    """Data, then the quantized base with LoRA, the fast paths, the batch plan, optimizer and schedule."""
    from loraforge.data import prepare, write_data_report

    set_seed(cfg.train.seed)
    ranks = distributed.env_ranks(cfg.train.distributed)  # one process per device; rank 0 writes the files
    device = distributed.start(ranks, select_device())
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    base = resolve_base(cfg.model)

    # Data first: a bad row should fail in seconds, not after loading 7B weights.
    check_max_length(cfg.model, cfg.data.max_length, cfg.data.allow_beyond_context, base)
    tokenizer = load_tokenizer(cfg.model, base)
    data = prepare(cfg.data, tokenizer, log=say)
    if ranks.is_main:
        save_config(cfg, run_dir / CONFIG_FILE)
        write_text_whole(run_dir / TEMPLATE_FILE, json.dumps(data.template_record(), indent=1))
        write_data_report(data, run_dir)

    model = load_base_model(cfg.model, dtype, device, base, shardable=ranks.sharded)
    model = attach_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    if ranks.sharded:  # the fused forward reads whole weights; FSDP's are sharded (config.py refuses 'on')
        fast_paths = FastPathReport(off={"fused layers": "train.distributed: fsdp (the weights are sharded)"})
        say("fast paths off: fused layers (train.distributed: fsdp shards the weights); training runs the plain "
            "transformers + PEFT forward")
    else:
        fast_paths = apply_fast_paths(model, cfg.train, device, say)  # what is on, and why anything is off
    trainable, total = count_parameters(model)
    say(f"model: {base} ({cfg.model.quantization}, compute {str(dtype).removeprefix('torch.')}, {device}); "
        f"LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[dtype], cpu=device == "cpu")
    if ranks.sharded:  # FSDP2 shards in place, before the optimizer sees the parameters
        model = distributed.shard(model, ranks, cfg.train.fsdp_cpu_offload)
        model.forward = accelerator.autocast()(model.forward)
    plan = BatchPlan(data.train.lengths(), cfg.train.micro_batch_size,
                     cfg.train.gradient_accumulation, cfg.train.seed, cfg.train.group_by_length, cfg.train.shuffle)
    # Packing is exact either way; auto packs where the fused path runs (varlen attention), since on the
    # plain path the block-diagonal mask over the whole stream costs more than the padding it saves.
    packed = cfg.train.packing == "on" or (cfg.train.packing == "auto" and "fused layers" in fast_paths.on)
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(model.parameters(), cfg.train, device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    if ranks.sharded:
        optimizer = accelerator.prepare(optimizer)
    else:  # DDP when there are several ranks
        model, optimizer = accelerator.prepare(model, optimizer)
    if ranks.rank:  # the other ranks' dropout draws its own numbers (rank 0 draws what one device would)
        set_seed(cfg.train.seed + ranks.rank)
    return _Training(ranks, device, dtype, base, tokenizer, data, model, fast_paths, (trainable, total), accelerator,
                     plan, collate_packed if packed else collate, total_steps, optimizer, scheduler,
                     [p for p in model.parameters() if p.requires_grad])


def micro_batch_loss(model, batch: dict, n_items: int) -> torch.Tensor:
    """Sum of token losses over `n_items`, the trained tokens of the whole optimizer step.

    Dividing each micro-batch's sum by the step total makes accumulated gradients equal to one
    big batch's token mean, however the tokens fall into micro-batches.
    """
    # No KV cache in training: with one, transformers ignores the packed sequences' boundaries.
    return model(**batch, num_items_in_batch=n_items, use_cache=False).loss


def _forward_backward(t: _Training, cfg: RunConfig, step: int) -> tuple[torch.Tensor, int]:
    """This rank's share of optimizer step `step`: gradients accumulated over its micro-batches; returns
    their summed loss and the tokens it saw."""
    micro_batches = [[t.data.train[i] for i in rows] for rows in t.plan.step_rows(step)]
    n_items = sum(trained_tokens(rows) for rows in micro_batches)  # of the whole step, on every rank
    split = None
    if cfg.train.max_tokens_per_micro_batch:  # same rows, same loss: only the memory per pass changes
        split = functools.partial(split_by_tokens, max_tokens=cfg.train.max_tokens_per_micro_batch)
    passes = distributed.share(micro_batches, t.ranks, cfg.train.micro_batch_size, split)  # this rank's
    step_loss = torch.zeros((), device=t.accelerator.device)
    step_tokens = 0
    for index, (rows, weight) in enumerate(passes):
        batch = {k: v.to(t.accelerator.device) for k, v in t.make_batch(rows, t.tokenizer.pad_token_id).items()}
        t.watch.training(len(rows), batch["input_ids"].numel())
        step_tokens += sum(len(r["input_ids"]) for r in rows) if weight else 0
        last = index == len(passes) - 1
        with t.accelerator.no_sync(t.model) if not last else contextlib.nullcontext():
            loss = micro_batch_loss(t.model, batch, n_items) * weight
            t.accelerator.backward(loss * distributed.gradient_scale(t.ranks))
        step_loss += loss.detach().float()
    return step_loss, step_tokens


def _optimizer_step(t: _Training, cfg: RunConfig, state: TrainerState, step: int, loss: float, grad_norm: float,
                    last_checkpoint: Optional[Path], metrics: MetricsLog, say) -> float:
    """Apply the step, or skip it when its loss or gradient is not finite (stopping once more than
    train.max_bad_steps were skipped); move the schedule on. Returns the learning rate it trained with."""
    if not math.isfinite(loss) or (t.accelerator.scaler is None and not math.isfinite(grad_norm)):
        state.bad_steps += 1
        t.optimizer.zero_grad(set_to_none=True)
        if state.bad_steps > cfg.train.max_bad_steps:
            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "no checkpoint was saved yet")
            metrics.close()
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; {where}. "
                "Lower train.learning_rate, check the data, or allow skips with train.max_bad_steps")
        say(f"step {step}: non-finite loss/gradient, step skipped ({state.bad_steps} of "
            f"{cfg.train.max_bad_steps} allowed)")
    else:
        t.optimizer.step()
    lr_used = t.scheduler.get_last_lr()[0]  # the rate this step trained with, before the schedule moves on
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    return lr_used


def _evaluate(t: _Training, cfg: RunConfig, state: TrainerState, metrics: MetricsLog, checkpoints: ckpt.RunCheckpoints,
              say) -> Optional[str]:
    """Eval loss after `state.step`; a new best is checkpointed. Returns why training stops early, if it does."""
    step = state.step
    eval_loss, _ = mean_token_loss(t.model, t.data.eval, cfg.train.micro_batch_size, t.tokenizer.pad_token_id,
                                   t.accelerator.device)
    eval_loss = distributed.broadcast(t.ranks, eval_loss)  # one value decides for all ranks
    improved = state.best_eval_loss is None or eval_loss < state.best_eval_loss
    metrics.log({"step": step, "eval/loss": eval_loss, "eval/perplexity": perplexity(eval_loss)})
    say(f"step {step}: eval loss {eval_loss:.4f} (perplexity {perplexity(eval_loss):.2f})"
        + (" - best so far" if improved else ""))
    if improved:
        state.best_eval_loss, state.best_step, state.evals_without_gain = eval_loss, step, 0
        checkpoints.save(state)
        return None
    state.evals_without_gain += 1
    patience = cfg.train.early_stopping_patience
    if patience and state.evals_without_gain >= patience:
        say(stopped := f"early stopping at step {step}: no eval gain in {patience} evaluations")
        return stopped
    return None


def _finish(t: _Training, cfg: RunConfig, run_dir: Path, state: TrainerState, last_checkpoint: Optional[Path],
            losses: list[float], throughput: dict, stopped_early: Optional[str], warnings: list[str],
            say) -> Optional[TrainResult]:
    """The adapter (the best evaluation's with train.keep_best) and summary.json; the result on rank 0."""
    unwrapped = t.accelerator.unwrap_model(t.model)
    if not t.ranks.sharded:
        _best_or_final(cfg, state, run_dir, unwrapped, say)
    elif cfg.train.keep_best:
        say("train.keep_best: not applied under train.distributed: fsdp; the adapter is the last step's "
            "(the best evaluation's checkpoint is kept)")
    adapter_dir = run_dir / ADAPTER_DIR
    adapter_weights, error = distributed.adapter_state(t.model, t.ranks), None
    try:  # written aside and renamed: a kill or a full disk never leaves a half-written adapter
        if t.ranks.is_main:
            with written_whole(adapter_dir, folder=True) as tmp:
                unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=adapter_weights)
                t.tokenizer.save_pretrained(tmp)
                (tmp / TEMPLATE_FILE).write_text((run_dir / TEMPLATE_FILE).read_text())
    except OSError as e:
        error = (f"could not write the adapter to {adapter_dir}: {e.strerror or e}. The final checkpoint "
                 f"{last_checkpoint} is complete: free space and run the same command with --resume")
    if distributed.broadcast(t.ranks, error):
        raise UserError(error or "rank 0 could not write the adapter")
    memory = distributed.gather(t.ranks, {"peak_mem_gib": distributed.peak_memory_gib(t.device),
                                          **distributed.parameter_bytes(t.model)})
    if not t.ranks.is_main:
        return None
    window = max(1, len(losses) // 10)
    best = state.best_step
    result = TrainResult(
        run_dir=run_dir, adapter_dir=adapter_dir, steps=state.step,
        first_losses=_mean(losses[:window]), last_losses=_mean(losses[-window:]),
        tokens_per_s=throughput["tokens"] / throughput["seconds"] if throughput["seconds"] else 0.0,
        stopped_early=stopped_early, warnings=warnings,
        best_eval={"step": best, "loss": state.best_eval_loss,
                   "checkpoint": str(run_dir / CHECKPOINT_DIR / checkpoint_name(best))} if best else None,
        model=unwrapped)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items() if k != "model"}
    trainable, total = t.parameters
    summary.update(trainable_parameters=trainable, total_parameters=total, base_model=t.base, device=t.device,
                   fast_paths=t.fast_paths.as_dict(),
                   compute_dtype=str(t.dtype).removeprefix("torch."), environment=environment_info(t.device))
    if t.ranks.collective:
        summary.update(devices=t.ranks.world, distributed=t.ranks.mode, memory_per_rank=memory)
    write_text_whole(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return result


def _best_or_final(cfg: RunConfig, state: TrainerState, run_dir: Path, model, say) -> None:
    """When an earlier evaluation was better than the end, say so; with train.keep_best, take its weights."""
    best, completed = state.best_step, state.step
    if best is None or best == completed:
        return
    best_dir = run_dir / CHECKPOINT_DIR / checkpoint_name(best)
    if cfg.train.keep_best:
        ckpt.load_adapter_weights(best_dir, model)
        say(f"train.keep_best: the adapter is the best evaluation's (step {best}, eval loss "
            f"{state.best_eval_loss:.4f}), not the last step's ({completed})")
    else:
        say(f"note: the best eval loss ({state.best_eval_loss:.4f}) was at step {best}, not at the last step "
            f"({completed}); the adapter is the last step's. The best is kept in {best_dir} (loraforge eval RUN "
            f"--adapter {best_dir}); set train.keep_best=true to make it the adapter")


def _clip(accelerator, params, max_norm: Optional[float]) -> float:
    if max_norm:
        return float(distributed.full(accelerator.clip_grad_norm_(params, max_norm)))
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    grads = [distributed.full(p.grad.detach().float().norm()) for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
