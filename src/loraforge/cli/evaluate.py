"""`loraforge eval RUN_DIR`: did fine-tuning help? Base vs fine-tuned on the same rows; eval.json + report."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text


def register(sub) -> None:
    from loraforge.cli import metric_code_option, trust_option

    p = sub.add_parser(
        "eval", help="compare the base and the fine-tuned model of a run: loss, perplexity, task metrics, answers",
        description="Evaluate RUN_DIR's adapter against its own base model (the same quantized weights with the "
        "adapter turned off) on the run's held-out rows: loss and perplexity on response tokens and on all "
        "tokens, task metrics on greedy answers (exact match, contains-reference, ROUGE-L, or your own "
        "function), and answers side by side. Writes RUN_DIR/eval.json and updates RUN_DIR/report.html.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `loraforge train`")
    p.add_argument("--split", choices=("eval", "train"), default="eval",
                   help="held-out rows (default; a run without an eval split falls back to a fixed sample of "
                   "training rows, labelled as such) or training rows")
    p.add_argument("--rows", type=int, metavar="N", help="evaluate at most N rows (default: every eval row, or "
                   "64 training rows)")
    p.add_argument("--metric", dest="metrics", action="append", default=[], metavar="NAME",
                   help="task metric: exact_match, contains, rouge_l (default: the run's eval.metrics, else all "
                   "three), none (loss only), or "
                   "your own as module.path:function or file.py:function, called as "
                   "function(prediction, reference, row) -> float. Repeatable or comma-separated. Metric code the "
                   "run's config names runs only with --allow-metric-code")
    p.add_argument("--samples", type=int, default=5, metavar="N", help="answers shown side by side (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="generation length (default 128)")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per batch for the loss and the "
                   "answers (default: the run's eval.batch_size, else train.micro_batch_size)")
    p.add_argument("--adapter", metavar="PATH", help="evaluate this adapter or checkpoint folder instead of "
                   "RUN_DIR/adapter (default: the final adapter, else the newest checkpoint)")
    metric_code_option(p)
    trust_option(p)
    p.set_defaults(handler=run)


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.0f}"


def _change(base, tuned, lower_is_better: bool) -> str:
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)):
        return "-"
    d = tuned - base
    if d == 0:
        return "0"
    color = "green" if (d < 0) == lower_is_better else "red"
    return f"[{color}]{d:+.4f}[/{color}]" if abs(d) < 1000 else f"[{color}]{d:+,.0f}[/{color}]"


def print_result(result: dict, console: Console, answers_title: str = "answers (greedy)") -> None:
    """The eval table and the answers side by side; text from the data and the model as it is (never markup)."""
    table = Table(title=Text(f"base vs fine-tuned: {result['rows']} {result['split']} rows"), title_justify="left")
    for col in ("", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for key, label in (("responses", "response tokens"), ("all", "all tokens")):
        b, t = result["loss"][key]["base"], result["loss"][key]["tuned"]
        table.add_row(f"loss ({label})", _num(b["loss"]), _num(t["loss"]), _change(b["loss"], t["loss"], True))
        table.add_row(f"perplexity ({label})", _num(b["perplexity"]), _num(t["perplexity"]),
                      _change(b["perplexity"], t["perplexity"], True))
    for name, v in result["metrics"].items():
        table.add_row(Text(f"{name} ({v['rows']} rows)"), _num(v["base"]), _num(v["tuned"]),
                      _change(v["base"], v["tuned"], False))
    console.print(table)
    if result.get("loss_note"):
        console.print(result["loss_note"], markup=False, soft_wrap=True)
    if result.get("metric_note"):
        console.print(result["metric_note"], markup=False, soft_wrap=True)
    if result["samples"]:
        answers = Table(title=answers_title, title_justify="left", show_lines=True)
        for col in ("prompt", "base", "fine-tuned", "reference"):
            answers.add_column(col, overflow="fold")
        for s in result["samples"]:
            answers.add_row(*(Text(text) for text in (s["question"], s["base"] or "(empty)", s["tuned"] or "(empty)",
                                                      s["reference"])))
        console.print(answers)


def run(args) -> int:
    from loraforge.evaluate.compare import EvalOptions, evaluate_run
    from loraforge.evaluate.report import write_report_safely
    from loraforge.rundir import EVAL_FILE

    console = Console(highlight=False)
    opts = EvalOptions(split=args.split, rows=args.rows, metrics=args.metrics, samples=args.samples,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, adapter=args.adapter,
                       trust_remote_code=args.trust_remote_code, allow_metric_code=args.allow_metric_code)
    run_dir = Path(args.run_dir)
    if run_dir.is_dir():  # eval.json goes into the run: say now if it cannot, not after the model ran
        from loraforge.atomic import check_writable
        from loraforge.ownership import lock_run_folder
        from loraforge.rundir import check_run_dir

        check_writable(run_dir / EVAL_FILE, "eval:")
        lock_run_folder(check_run_dir(run_dir), "loraforge eval")  # one writer: not while training writes it

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            console.print(f"generated answers for {done}/{total} prompts", markup=False)

    say = lambda m: console.print(m, markup=False, soft_wrap=True)  # noqa: E731  unwrapped: paths stay whole
    result = evaluate_run(run_dir, opts, log=say, progress=progress)
    print_result(result, console)
    report = write_report_safely(run_dir, say=say)
    console.print(f"eval results: {run_dir / EVAL_FILE}" + (f"\nreport:       {report}" if report else ""),
                  markup=False, soft_wrap=True)
    sys.stdout.flush()
    return 0
