"""`loraforge train [RECIPE] [--set key=value ...]`: fine-tune and say where everything went."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from loraforge.cli.data import dataset_options, dataset_override
from loraforge.config import load_config, recipe_name


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model with QLoRA (no arguments: the built-in demo on the CPU)",
        description="Fine-tune with QLoRA. RECIPE is a shipped recipe name (see `loraforge recipes`) or a YAML "
        "file; leave it out for the embedded demo (tiny model, bundled data, a couple of minutes on a CPU).")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=20 --set lora.r=8 (repeatable)")
    p.add_argument("--dataset", metavar="PATH", help="train on this dataset (file, glob, save_to_disk folder or Hub "
                   "id) instead of the recipe's")
    dataset_options(p)
    p.add_argument("--output-dir", help="run directory (default: runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue from the newest complete checkpoint of the run directory, or of PATH "
                   "(a run directory or one checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run directory")
    p.set_defaults(handler=run)


def run(args) -> int:
    from loraforge.errors import UserError

    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it; give one of them")
    args.overrides = list(args.overrides) + dataset_override(args)  # kept in the printed resume command
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.recipe, overrides)  # validated before the heavy imports below

    from loraforge.evaluate.report import write_report_safely
    from loraforge.train.loop import TrainingInterrupted, run_training
    from loraforge.train.rundir import discard_if_unstarted, finished_at, prepare_run_dir, resume_command

    console = Console(stderr=False, highlight=False)
    run_dir, checkpoint = prepare_run_dir(cfg, recipe_name(args.recipe), args.resume, args.overwrite)
    if checkpoint is not None:  # every file read once now: a damaged one is named before the run folder is touched
        from loraforge.train.checkpoint import verify_checkpoint

        verify_checkpoint(checkpoint)
    if finished_at(checkpoint) is not None:
        console.print(f"{checkpoint.parent.parent} already finished at step {finished_at(checkpoint)}: nothing to "
                      f"resume, nothing written. Its adapter: {checkpoint.parent.parent / 'adapter'}", markup=False)
        return 0
    try:
        result = run_training(cfg, run_dir, checkpoint, console=console)
    except TrainingInterrupted as stop:
        console.print(f"\n{stop}\nResume with: {resume_command(args.recipe, args.overrides, run_dir)}",
                      markup=False, soft_wrap=True)  # one unwrapped line to copy, brackets and all
        return 128 + stop.signum
    except Exception:  # bad data, an unwritable disk, a model that will not load...
        if checkpoint is None:  # failed before its first step: leave no folder that blocks the fixed command
            discard_if_unstarted(run_dir)
        raise
    finally:  # finished, stopped or failed: report.html shows how far the run got
        # ...but not after a second Ctrl-C/SIGTERM (SystemExit): that one means exit at once.
        report = None if isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt)) else \
            write_report_safely(run_dir, say=lambda m: console.print(m, markup=False))

    console.print(f"\n[bold]done[/bold]: {result.steps} steps, loss {result.first_losses:.3f} (first 10%) -> "
                  f"{result.last_losses:.3f} (last 10%), {result.tokens_per_s:.0f} tokens/s")
    if result.stopped_early:
        console.print(result.stopped_early)
    if result.samples:
        table = Table(title="Sample answers, before and after fine-tuning (greedy)", show_lines=True)
        for col in ("question", "before", "after", "reference"):
            table.add_column(col, overflow="fold")
        for s in result.samples:
            table.add_row(s["question"], s["before"] or "(empty)", s["after"] or "(empty)", s["reference"])
        console.print(table)
    d = result.run_dir
    console.print(f"adapter (PEFT format):  {result.adapter_dir}\n"
                  f"config (resolved):      {d / 'config.yaml'}\n"
                  f"metrics:                {d / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {d / 'tb'})\n"
                  f"data report:            {d / 'data_report.json'}\n"
                  f"checkpoints:            {d / 'checkpoints'}"
                  + (f"\nreport:                 {report}" if report else ""))
    console.print(next_commands(d), markup=False, soft_wrap=True)
    sys.stdout.flush()
    return 0


def next_commands(run_dir) -> str:
    """What to do with a finished run, as commands to copy."""
    import shlex

    d = shlex.quote(str(run_dir))
    return (f"\nnext:\n  loraforge eval {d}                      # base vs fine-tuned on the held-out rows\n"
            f"  loraforge chat {d}                      # talk to it\n"
            f"  loraforge merge {d} --out {shlex.quote(str(run_dir) + '-merged')}   # one plain transformers model\n"
            f"  loraforge export gguf {d} --out {shlex.quote(str(run_dir) + '.gguf')}   # for llama.cpp")
