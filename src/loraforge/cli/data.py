"""`loraforge data inspect [CONFIG] [--dataset PATH]`: check and describe the data without loading weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from loraforge.config import FORMAT_NAMES, TEMPLATE_NAMES
from loraforge.errors import UserError, first_line
from loraforge.rundir import CONFIG_FILE, DATA_REPORT_FILE


def register(sub) -> None:
    from loraforge.cli import command_group, trust_option

    i = command_group(sub, "data", "inspect a dataset as training will see it").add_parser(
        "inspect", help="rows, shape, token lengths, masking and truncation, without loading the model",
        description="Load the data as `loraforge train CONFIG` would (only the tokenizer, no weights) and report "
        "rows per source, the shape found, token lengths next to max_length, the trained share and three "
        "examples with the masked part marked. With --out DIR, also writes data_report.json and data_report.png there.")
    recipe_options(i, "data.train_on=all", dest="config")
    dataset_options(i, "inspect")
    i.add_argument("--template", choices=TEMPLATE_NAMES,
                   help="chat template (default: the config's)")
    i.add_argument("--max-length", type=int, metavar="N", help="max tokens per row (default: the config's)")
    i.add_argument("--out", metavar="DIR", help="also write data_report.json/.png into DIR (replacing earlier ones; "
                   "default: write nothing)")
    i.add_argument("--force", action="store_true", help="allow --out to be a training run directory")
    trust_option(i)
    i.set_defaults(handler=run_inspect)


def recipe_options(p, example: str, dest: str = "recipe") -> None:
    """RECIPE and its --set overrides (`train`, `data inspect`, `config show`)."""
    p.add_argument(dest, nargs="?", help="recipe name or YAML path (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable)")


def dataset_options(p, verb: str) -> None:
    """--dataset PATH and the --format / --column that describe it (`train`, `data inspect`, `config show`)."""
    p.add_argument("--dataset", metavar="PATH", help=f"{verb} this dataset (file, glob, save_to_disk folder or Hub "
                   "id) instead of the recipe's")
    p.add_argument("--format", choices=FORMAT_NAMES,
                   help="shape of --dataset (default: auto)")
    p.add_argument("--column", dest="columns", action="append", default=[], metavar="FIELD=COLUMN",
                   help="with --dataset: read our FIELD from the dataset's COLUMN, e.g. --column input=question "
                   "--column output=answer (repeatable; the config's columns: mapping)")


def dataset_override(args) -> list[str]:
    """--dataset PATH [--format F] [--column A=B] as one `--set data.datasets=[...]` (so a printed resume
    command repeats it); relative local paths are made absolute."""
    if not args.dataset:
        if args.format or args.columns:
            raise UserError(f"{'--format' if args.format else '--column'} describes --dataset; for a config's "
                            "datasets set format: / columns: in the config")
        return []
    path = args.dataset
    local = Path(os.path.expanduser(path))
    if local.exists() or any(ch in path for ch in "*?["):
        path = str(local.absolute()) if local.exists() else os.path.abspath(os.path.expanduser(path))
    source = {"path": path, "format": args.format or "auto"}
    for text in args.columns:
        ours, sep, theirs = text.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise UserError(f"--column {text!r}: expected FIELD=COLUMN, e.g. --column output=answer")
        source.setdefault("columns", {})[ours.strip()] = theirs.strip()
    return [f"data.datasets=[{json.dumps(source)}]"]  # JSON is YAML: --set parses it back


def build_config(args):
    from loraforge.config import load_config

    overrides = list(args.overrides) + dataset_override(args)
    if args.template:
        overrides.append(f"data.template={args.template}")
    if args.max_length is not None:
        overrides.append(f"data.max_length={args.max_length}")
    cfg = load_config(args.config, overrides)
    return cfg.allow_remote_code(args.trust_remote_code, f"the config ({args.config or 'demo'})")


def load_tokenizer_for(cfg):
    """Only the tokenizer of the config's base model (the tiny model's is built on first use), after checking
    data.max_length against the model's context (its config.json)."""
    from loraforge.model.load import check_max_length, load_tokenizer, resolve_base

    try:
        base = resolve_base(cfg.model)
    except UserError as e:
        raise UserError(f"the tokenizer could not be loaded: {e}") from None
    check_max_length(cfg.model, cfg.data.max_length, cfg.data.allow_beyond_context, base)
    try:
        return load_tokenizer(cfg.model, base)
    except UserError as e:
        raise UserError(f"the tokenizer could not be loaded: {e}") from None
    except Exception as e:  # noqa: BLE001 - anything from transformers/sentencepiece
        raise UserError(f"the tokenizer of '{cfg.model.base or 'smollm2-135m-instruct'}' could not be loaded: "
                        f"{first_line(e)}. Check model.base and model.revision.") from None


def run_inspect(args) -> int:
    from rich.console import Console

    cfg = build_config(args)
    out = Path(args.out) if args.out else None
    if out is not None and (out / CONFIG_FILE).is_file() and (out / DATA_REPORT_FILE).exists() and not args.force:
        raise UserError(f"--out {out} is a training run directory; its {DATA_REPORT_FILE} describes that run. "
                        "Choose another --out, or add --force to replace it.")
    if out is not None:
        from loraforge.atomic import check_writable

        check_writable(out / "data_report.json", "--out")
        if (out / CONFIG_FILE).is_file():  # a run folder: one writer at a time
            from loraforge.ownership import lock_run_folder

            lock_run_folder(out, "loraforge data inspect")
    console = Console(highlight=False)
    tokenizer = load_tokenizer_for(cfg)

    from loraforge.data import prepare, write_data_report

    prepared = prepare(cfg.data, tokenizer, log=lambda s: console.print(s, markup=False, style="dim", soft_wrap=True),
                       keep_tokens=False)  # counts and lengths only: memory does not grow with the rows' tokens
    show(console, prepared.report)
    if out is not None:
        json_path, png_path = write_data_report(prepared, out)
        console.print(f"\nreport: {json_path}\nlength histogram: {png_path}", markup=False, soft_wrap=True)
    return 0


def show(console, report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    src = Table(title="Sources", title_justify="left")
    for col in ("dataset", "kind", "shape", "rows", "train rows", "columns"):
        src.add_column(col, overflow="fold")
    for s in report["sources"]:
        shape = s["shape"] + (" (detected)" if s["shape_detected"] else "")
        cols = ", ".join(f"{k}<-{v}" if k != v else k for k, v in s["columns"].items())
        src.add_row(*(Text(str(cell)) for cell in (s["label"], s["kind"], shape, s["rows"], s.get("train_rows", ""),
                                                   cols)))  # names from the data: literal, never markup
    console.print(src)

    lengths = Table(title=f"Tokens per row (max_length {report['max_length']})", title_justify="left")
    lengths.add_column("")
    for col in ("min", "median", "p95", "max", "mean"):
        lengths.add_column(col, justify="right")
    for name in ("prompt", "response", "total"):
        d = report["tokens"][name]
        lengths.add_row(name, *(str(d[k]) for k in ("min", "median", "p95", "max", "mean")))
    console.print(lengths)

    r = report["rows"]
    ev = f" (from {r['eval_from']})" if r["eval_from"] else ""
    console.print(Text(
        f"rows: {r['train']} train, {r['eval']} eval{ev}\n"
        f"template: {report['template']['name']}; loss on {report['train_on']}; "
        f"{report['trainable_share']:.1%} of train tokens are trained\n"
        f"longer than max_length: {report['over_max_length']} "
        f"(truncated {report['truncated']}, dropped {report['dropped_too_long']}); "
        f"dropped with no trainable token: {report['dropped_no_trainable']}"))
    for w in report["warnings"]:
        console.print(Text(f"warning: {w}", style="yellow"))
    marked = report.get("markers_in_text") or {}
    if marked.get("rows"):
        console.print(Text(f"rows with template markers in their message text: {marked['rows']}; the first:"))
        for row in marked["shown"]:
            console.print(Text(f"  {row['where']}: {row['marker']}"), soft_wrap=True)
    for ex in report["examples"]:
        console.print(Text(f"\nexample: {ex['where']} ({ex['tokens']} tokens, {ex['trained_tokens']} trained)",
                           style="bold"))
        text = Text()
        for seg in ex["segments"]:
            if seg["trainable"]:
                text.append(seg["text"], style="green")
            else:
                text.append("⟦" + seg["text"] + "⟧", style="dim")
        console.print(text, soft_wrap=True)  # unwrapped: the example's own line breaks only
    if report["examples"]:
        console.print(Text(report["legend"], style="italic"))
