"""`loraforge train [RECIPE] [--set key=value ...]`: fine-tune and say where everything went."""
from __future__ import annotations

import json
import sys

from rich.console import Console

from loraforge.cli.data import dataset_options, dataset_override, recipe_options
from loraforge.config import RunConfig, load_config, recipe_name
from loraforge.errors import UserError


def register(sub) -> None:
    from loraforge.cli import metric_code_option, trust_option

    p = sub.add_parser(
        "train", help="fine-tune a model with QLoRA (no arguments: the built-in SQL demo on the CPU)",
        description="Fine-tune with QLoRA. RECIPE is a shipped recipe name (see `loraforge recipes`) or a YAML "
        "file; leave it out for the embedded demo (SmolLM2-135M-Instruct learns text-to-SQL, a few minutes on a "
        "CPU). Ends with the base model and the fine-tuned one side by side on the held-out rows (`loraforge eval`).")
    recipe_options(p, "train.max_steps=20 --set lora.r=8")
    dataset_options(p, "train on")
    p.add_argument("--output-dir", help="run directory (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue from the newest complete checkpoint of the run directory, or of PATH "
                   "(a run directory or one checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run directory that "
                   "`loraforge train` made (other folders are never deleted)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="train on N devices (GPUs; on a CPU, N processes): train.distributed picks ddp or fsdp. "
                   "Under torchrun / accelerate launch it is not needed")
    trust_option(p)
    metric_code_option(p)
    p.set_defaults(handler=run)


def permission_flags(args) -> list[str]:
    """This command line's permissions, repeated in the worker processes' and the printed resume command."""
    return ["--trust-remote-code"] * args.trust_remote_code + ["--allow-metric-code"] * args.allow_metric_code


def run(args) -> int:
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it; give one of them")
    args.overrides = list(args.overrides) + dataset_override(args)  # kept in the printed resume command
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.recipe, overrides)  # validated before the heavy imports below
    source = f"the config ({args.recipe or 'demo'}" + (" and --set)" if args.overrides else ")")
    cfg.allow_remote_code(args.trust_remote_code, source)  # code named in a config runs only when asked here

    from loraforge.evaluate.metrics import check_metric_code
    from loraforge.train import distributed
    from loraforge.train.launch import take_hub_token

    check_metric_code(cfg.eval.metrics, source, args.allow_metric_code)  # not after minutes of training
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices {args.devices}: give a number of devices, 1 or more")
    if distributed.launched():  # started by torchrun / accelerate launch / --devices: one rank of the run
        take_hub_token(cfg)  # --devices hands a token over in the environment, never in argv
        return _run_rank(args, cfg)
    if args.devices or cfg.train.distributed == "fsdp":  # fsdp needs a process group, even on one device
        return _launch(args, cfg, args.devices or 1)
    return _train(args, cfg, distributed.Ranks())


def _launch(args, cfg, devices: int) -> int:
    from loraforge.errors import UserError
    from loraforge.train.checkpoint import check_world
    from loraforge.ownership import hand_lock_to_children
    from loraforge.train.launch import launch
    from loraforge.train.resume import discard_if_unstarted, prepare_run_dir

    import torch

    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise UserError(f"--devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)")
    # Settled once, here: every mistake is reported before N processes start, and all ranks get one folder.
    # This process holds the folder's lock for the whole run; rank 0, its child, writes under it.
    run_dir, checkpoint = prepare_run_dir(cfg, recipe_name(args.recipe), args.resume, args.overwrite)
    check_world(checkpoint, devices)
    hand_lock_to_children()
    worker, env = worker_command(args, cfg, run_dir, checkpoint)
    status = launch(devices, worker, say=lambda m: print(m, file=sys.stderr), env=env)
    if status != 0 and checkpoint is None:  # rank 0 emptied a run that failed before its first step
        discard_if_unstarted(run_dir)
    return status


def worker_command(args, cfg, run_dir, checkpoint) -> tuple[list[str], dict[str, str]]:
    """The `loraforge train` arguments of each rank, and what they get in the environment: argv is visible to
    every user of the machine, so a Hub token goes in the environment only."""
    from loraforge.config_messages import redacted_override
    from loraforge.train.launch import HUB_TOKEN_ENV

    sets = [shown for shown in map(redacted_override, args.overrides) if shown is not None]
    worker = ([args.recipe] if args.recipe else []) + [x for o in sets for x in ("--set", o)]
    worker += ["--output-dir", str(run_dir)] + (["--resume", str(checkpoint)] if checkpoint else [])
    return worker + permission_flags(args), ({HUB_TOKEN_ENV: cfg.model.hub_token} if cfg.model.hub_token else {})


def _run_rank(args, cfg) -> int:
    """One rank of a multi-device run: rank 0 settles the run directory and writes everything."""
    import torch.distributed as dist

    from loraforge.errors import UserError, first_line
    from loraforge.model.load import select_device
    from loraforge.train import distributed
    from loraforge.train.checkpoint import check_world
    from loraforge.train.resume import prepare_run_dir

    ranks = distributed.env_ranks(cfg.train.distributed)
    if args.devices and args.devices != ranks.world:
        raise UserError(f"--devices {args.devices}, but the launcher started {ranks.world} processes (WORLD_SIZE); "
                        "leave --devices out under torchrun / accelerate launch")
    distributed.start(ranks, select_device())
    try:
        try:
            outcome = None
            if ranks.is_main:
                try:
                    outcome = prepare_run_dir(cfg, recipe_name(args.recipe), args.resume, args.overwrite)
                    check_world(outcome[1], ranks.world)
                except UserError as e:
                    outcome = str(e)
            outcome = distributed.broadcast(ranks, outcome)
            if isinstance(outcome, str):
                raise UserError(outcome)
            status = _train(args, cfg, ranks, outcome)
        except UserError as e:
            if ranks.is_main:
                print(f"error: {e}", file=sys.stderr)
            status = e.exit_code
        sys.stdout.flush()
        sys.stderr.flush()
        # The others wait for rank 0's last words: the launcher stops every rank once one has ended.
        distributed.barrier(ranks)
        return status
    except dist.DistError as e:  # another rank died: say so instead of a traceback
        print(f"rank {ranks.rank}: lost contact with the other ranks ({first_line(e)}); stopping", file=sys.stderr)
        return 1
    finally:
        distributed.stop()


def _train(args, cfg, ranks, prepared=None) -> int:
    from loraforge.cli.evaluate import print_result
    from loraforge.evaluate.report import write_report_safely
    from loraforge.rundir import (ADAPTER_DIR, CHECKPOINT_DIR, CONFIG_FILE, DATA_REPORT_FILE, EVAL_FILE, METRICS_FILE,
                                  TENSORBOARD_DIR)
    from loraforge.errors import UserError, out_of_memory
    from loraforge.train.loop import TrainingInterrupted, run_training
    from loraforge.train.oom import TrainingOutOfMemory
    from loraforge.train.resume import discard_if_unstarted, finished_at, prepare_run_dir, resume_command
    from loraforge.train.checkpoint import check_world

    console = Console(stderr=False, highlight=False, quiet=not ranks.is_main)
    if prepared is None:
        prepared = prepare_run_dir(cfg, recipe_name(args.recipe), args.resume, args.overwrite)
        check_world(prepared[1], 1)
    run_dir, checkpoint = prepared
    if checkpoint is not None:  # every file read once now: a damaged one is named before the run folder is touched
        from loraforge.train.checkpoint import verify_checkpoint

        verify_checkpoint(checkpoint)
    if finished_at(checkpoint) is not None:
        console.print(f"{checkpoint.parent.parent} already finished at step {finished_at(checkpoint)}: nothing to "
                      f"resume, nothing written. Its adapter: {checkpoint.parent.parent / ADAPTER_DIR}", markup=False,
                      soft_wrap=True)  # unwrapped: paths stay whole whatever the terminal's width
        return 0
    evaluation = None
    try:
        result = run_training(cfg, run_dir, checkpoint, console=console)
        if result is not None and (cfg.samples or cfg.eval.metrics):  # rank 0 only; a sharded model is reloaded
            try:
                evaluation = evaluate_after_training(cfg, run_dir, console, None if ranks.sharded else result.model,
                                                     args)
            except Exception as e:
                if not out_of_memory(e):
                    raise
                raise UserError(_evaluation_out_of_memory(cfg, result, e)) from None
    except TrainingInterrupted as stop:
        command = " ".join([resume_command(args.recipe, args.overrides, run_dir), *permission_flags(args)])
        if ranks.collective:
            command += f" --devices {ranks.world}"
        console.print(f"\n{stop}\nResume with: {command}",
                      markup=False, soft_wrap=True)  # one unwrapped line to copy, brackets and all
        return 128 + stop.signum
    except Exception as e:  # bad data, an unwritable disk, a model that will not load...
        if checkpoint is None and ranks.is_main:  # failed before its first step: leave no folder that blocks the fixed command
            discard_if_unstarted(run_dir)
        if isinstance(e, TrainingOutOfMemory) and e.checkpoint is not None:
            command = resume_command(args.recipe, list(args.overrides) + e.settings, run_dir)
            raise UserError(f"{e}. Then resume with: {command}"
                            + (f" --devices {ranks.world}" if ranks.collective else "")) from None
        raise
    finally:  # finished, stopped or failed: report.html shows how far the run got
        # ...but not after a second Ctrl-C/SIGTERM (SystemExit): that one means exit at once.
        report = None if isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt)) or not ranks.is_main else \
            write_report_safely(run_dir, say=lambda m: console.print(m, markup=False, soft_wrap=True))
    if result is None:  # a rank other than 0: rank 0 reports
        return 0

    console.print(f"\n[bold]done[/bold]: {result.steps} steps, loss {result.first_losses:.3f} (first 10%) -> "
                  f"{result.last_losses:.3f} (last 10%), {result.tokens_per_s:.0f} tokens/s")
    if result.stopped_early:
        console.print(result.stopped_early, markup=False, soft_wrap=True)
    for warning in result.warnings:  # said when it happened; said again where the run's outcome is read
        console.print(warning, markup=False, soft_wrap=True, style="yellow")
    if evaluation is not None:
        print_result(evaluation, console, answers_title="before and after fine-tuning (greedy, held-out rows)"
                     if evaluation["split"] == "eval" else "before and after fine-tuning (greedy, training rows)")
    d = result.run_dir
    console.print(f"adapter (PEFT format):  {result.adapter_dir}\n"
                  f"config (resolved):      {d / CONFIG_FILE}\n"
                  f"metrics:                {d / METRICS_FILE}  "
                  f"(TensorBoard: tensorboard --logdir {d / TENSORBOARD_DIR})\n"
                  f"data report:            {d / DATA_REPORT_FILE}\n"
                  f"checkpoints:            {d / CHECKPOINT_DIR}"
                  + (f"\neval (base vs tuned):   {d / EVAL_FILE}" if evaluation is not None else "")
                  + (f"\nreport:                 {report}" if report else ""), soft_wrap=True, markup=False)
    console.print(next_commands(d), markup=False, soft_wrap=True)
    sys.stdout.flush()
    return 0


def _evaluation_out_of_memory(cfg: RunConfig, result, error: Exception) -> str:
    import shlex

    from loraforge.errors import allocation, out_of_memory

    where = "GPU memory" if out_of_memory(error) == "GPU" else "memory (RAM)"
    batch = cfg.eval.batch_size or cfg.train.micro_batch_size
    return (f"training finished and its adapter is saved ({result.adapter_dir}), but the evaluation at the end ran out "
            f"of {where}{allocation(error)}. Evaluate with smaller batches: loraforge eval "
            f"{shlex.quote(str(result.run_dir))} --batch-size {max(1, batch // 2)} (eval.batch_size is {batch}; "
            f"eval.max_new_tokens, {cfg.eval.max_new_tokens}, also counts)")


def evaluate_after_training(cfg: RunConfig, run_dir, console, model, args) -> dict:

    """`loraforge eval RUN_DIR` as the run configures it: the base and the tuned model on the same held-out
    rows (loss, `eval.metrics`, the first `samples` answers side by side); eval.json, and the answers in
    summary.json. The run's eval.metrics are the config's: their code runs with --allow-metric-code only."""
    from loraforge.atomic import write_text_whole
    from loraforge.rundir import SUMMARY_FILE
    from loraforge.evaluate.compare import EvalOptions, evaluate_run

    opts = EvalOptions(metrics=[] if cfg.eval.metrics else ["none"], samples=cfg.samples, rows=cfg.eval.rows,
                       max_new_tokens=cfg.eval.max_new_tokens, trust_remote_code=args.trust_remote_code,
                       allow_metric_code=args.allow_metric_code)
    say = lambda m: console.print(m, markup=False, soft_wrap=True)  # noqa: E731

    def progress(done: int, total: int) -> None:
        if done == total or done % 8 == 0:
            say(f"before/after answers: {done}/{total} prompts")

    # The model training left in memory: the same weights `adapter/` reloads to (tests/export/test_agreement.py).
    result = evaluate_run(run_dir, opts, log=say, progress=progress if cfg.eval.metrics else None, model=model)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    summary["samples"] = [{"question": s["question"], "before": s["base"], "after": s["tuned"],
                           "reference": s["reference"]} for s in result["samples"]]
    summary["eval"] = {"split": result["split"], "rows": result["rows"], "metrics": result["metrics"],
                       "response_loss": {who: result["loss"]["responses"][who]["loss"] for who in ("base", "tuned")}}
    write_text_whole(summary_path, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return result
def next_commands(run_dir) -> str:
    """What to do with a finished run, as commands to copy."""
    import shlex

    d = shlex.quote(str(run_dir))
    return (f"\nnext:\n  loraforge eval {d}                      # base vs fine-tuned on the held-out rows\n"
            f"  loraforge chat {d}                      # talk to it\n"
            f"  loraforge merge {d} --out {shlex.quote(str(run_dir) + '-merged')}   # one plain transformers model\n"
            f"  loraforge export gguf {d} --out {shlex.quote(str(run_dir) + '.gguf')}   # for llama.cpp")
