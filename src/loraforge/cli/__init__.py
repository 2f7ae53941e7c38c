"""The `loraforge` command: a thin layer that parses flags and calls the pipeline stages.

Each sub-command lives in its own module here with `register(subparsers)`; this file only
dispatches and turns UserError into one clear message and exit status 2.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from loraforge import __version__
from loraforge.errors import UserError, allocation, out_of_memory

# Modules under loraforge.cli, each adding its sub-commands.
COMMAND_MODULES = ["train", "recipes", "config_show", "data", "evaluate", "report", "infer", "export", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Fine-tune Llama-family chat models with QLoRA. `loraforge train` with no arguments "
        "runs the built-in demo on the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"loraforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"loraforge.cli.{name}").register(sub)
    return parser


def command_group(sub, name: str, help: str):
    """`loraforge NAME SUBCOMMAND ...` (`data`, `config`): NAME alone prints its help. Returns its subparsers."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(handler=lambda args: (p.print_help(), 0)[1])
    return p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")


def trust_option(p) -> None:
    """--trust-remote-code: the one way to let code shipped with a model, run folder or dataset run (docs/security.md)."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python code that ships with the model, run folder or dataset (auto_map) to run; "
                   "read it first. A trust_remote_code setting in a config or folder never does this on its own")


def metric_code_option(p) -> None:
    """--allow-metric-code: metric functions named in a config (not on this command line) may run."""
    p.add_argument("--allow-metric-code", action="store_true",
                   help="run metric functions that the config's eval.metrics names (file.py:function or "
                   "module:function); read them first. Built-in metrics and loraforge's own always run")


def _quiet_libraries() -> None:
    """Library chatter (deprecations, 'kernels not installed') hides our own output."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):  # the hub's "Retrying in Ns" lines among them
        if not os.environ.get(name):  # read when they are imported: they reset their loggers' levels then
            os.environ[name] = "error"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "torch", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # a log file or CI: tqdm bars ("Loading weights") are noise there
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].disable_progress_bar()


# Failures of the machine, not of loraforge: a full, read-only or missing location. Any other
# OSError (a missing file loraforge itself should have made, say) stays an internal error.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EROFS: "the location is read-only; choose another",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another location",
    errno.EISDIR: "that is a folder; give a file name",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the device reported an I/O error; check the disk",
}


def environment_error(e: OSError) -> str | None:
    """One line for an OSError caused by the machine (see ENVIRONMENT_ERRNOS), else None."""
    hint = ENVIRONMENT_ERRNOS.get(e.errno)
    if hint is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or os.strerror(e.errno)}; {hint}"


# What lowers the memory a command needs, said when it runs out (train's loop says more: cli/train.py).
OOM_ADVICE = {
    "train": "lower train.micro_batch_size or data.max_length, or set train.max_tokens_per_micro_batch (the same "
             "rows and loss in smaller passes); on a GPU, 4-bit weights (model.quantization: nf4) need the least",
    "eval": "lower --batch-size (default eval.batch_size), --max-new-tokens or --rows",
    "chat": "lower --max-new-tokens, or start a shorter conversation (/reset)",
    "generate": "lower --max-new-tokens, or shorten the prompts",
    "merge": "merging loads the whole base unquantized: use --dtype bfloat16 or float16 (half of float32), or a "
             "machine with more memory",
    "export": "exporting a run merges it in float32 first: merge it with `loraforge merge RUN --out DIR --dtype "
              "bfloat16` and export that folder, or use a machine with more memory",
    "data": "lower data.max_length, or split the dataset",
}


def out_of_memory_message(command: str | None, error: BaseException, kind: str) -> str:
    where = "GPU memory" if kind == "GPU" else "memory (RAM)"
    advice = OOM_ADVICE.get(command or "", "free memory (close other programs) and try again")
    return f"{command or 'loraforge'} ran out of {where}{allocation(error)}; {advice}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --debug is a global flag, but users also type it after the sub-command.
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "--debug" in options[1:]:
        argv.remove("--debug")
        argv.insert(0, "--debug")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if not args.debug:
        _quiet_libraries()
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so briefly; --debug shows the traceback
        if args.debug:
            raise
        message = environment_error(e) if isinstance(e, OSError) else None
        if message:  # a full or read-only disk: the user's to fix
            print(f"error: {message}", file=sys.stderr)
            return 2
        kind = out_of_memory(e)
        if kind:  # the settings decide how much memory a command needs: say which
            print(f"error: {out_of_memory_message(args.command, e, kind)}", file=sys.stderr)
            return 2
        print(f"internal error: {type(e).__name__}: {e}\nThis looks like a bug in loraforge; "
              "rerun with --debug for the traceback and report it.", file=sys.stderr)
        return 1
    finally:  # the command is over: its run folders are free for the next writer
        from loraforge.ownership import release_run_locks

        release_run_locks()
