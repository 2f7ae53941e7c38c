"""Starting or resuming a training run: the run directory chosen, locked for this one writer, protected from
silent overwrites (only a folder loraforge made is emptied), and checked against the config when resuming.
Its layout is `loraforge.rundir`'s; the marker and the lock are `loraforge.ownership`'s."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from loraforge.config import RunConfig, key_paths
from loraforge.errors import UserError
from loraforge.ownership import (RUN, check_replaceable, foreign_entries, link_target, lock_run_folder, marker_kind,
                                 write_marker)
from loraforge.rundir import (ADAPTER_DIR, CHECKPOINT_DIR, CHECKPOINT_FILES, CHECKPOINT_RNG_FILE,
                              CHECKPOINT_STATE_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, is_complete_checkpoint,
                              latest_checkpoint)

# Keys whose change leaves a resumed run's numbers exactly as an uninterrupted run's: where
# things are written, how often, and what is only observed (evaluation runs without gradients
# or dropout, so it draws no random numbers); gradient checkpointing only trades memory for time
# (it replays dropout with the saved random state: bitwise the same on the CPU); splitting a micro-batch by
# tokens computes the same gradient in smaller passes (the same up to float rounding), which is how a run that ran
# out of memory continues (train/oom.py). Everything else - model, data, LoRA shape, batch, schedule, seed, step
# count - is refused on resume.
HARMLESS_KEYS = {
    "description", "output_dir", "samples", "eval.metrics", "eval.max_new_tokens", "eval.rows",
    "eval.batch_size", "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.tensorboard",
    "train.eval_steps", "train.early_stopping_patience", "train.max_bad_steps", "train.gradient_checkpointing",
    "train.keep_best", "train.max_tokens_per_micro_batch", "data.allow_beyond_context",
}


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def differing_keys(saved: dict, current: dict) -> list[str]:
    a, b = key_paths(saved), key_paths(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in HARMLESS_KEYS)


def describe_differences(saved: dict, current: dict) -> str:
    a, b = key_paths(saved), key_paths(current)
    return "; ".join(f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} now" for k in differing_keys(saved, current))


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path:
    """`resume` is 'latest' (the run directory's newest checkpoint), a run directory, or a checkpoint."""
    target = run_dir if resume == "latest" else Path(resume)
    if (target / CHECKPOINT_STATE_FILE).is_file() or (target / CHECKPOINT_RNG_FILE).is_file():  # one checkpoint
        if not is_complete_checkpoint(target):
            missing = [f for f in CHECKPOINT_FILES if not (target / f).is_file()]
            raise UserError(f"--resume: checkpoint {target} is incomplete (no {', '.join(missing)}), probably "
                            f"cut off mid-save; resume from the run directory {target.parent.parent} to use "
                            "its newest complete checkpoint")
        return target
    found = latest_checkpoint(target)
    if found is None:
        where = target / CHECKPOINT_DIR
        raise UserError(f"--resume: no complete checkpoint in {where}; "
                        "start afresh without --resume (add --overwrite to reuse the folder)")
    return found


def check_resume_config(cfg: RunConfig, run_dir: Path) -> None:
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {saved_path} is not valid YAML ({e}); restore it from the run's "
                        "original config") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {saved_path} is not a mapping of sections; restore it from the run's "
                        "original config")
    changed = differing_keys(saved, cfg.saved_dict())
    if changed:
        raise UserError(f"--resume: the config differs from the run's ({saved_path}) in {', '.join(changed)} "
                        f"({describe_differences(saved, cfg.saved_dict())}). These change the result, so "
                        "resuming would not continue the same run: give the same values (the same recipe and "
                        "--set flags), or start a new run with another --output-dir")


TRAIN_COMMAND = "loraforge train"


def prepare_run_dir(cfg: RunConfig, name: str, resume: Optional[str], overwrite: bool) -> tuple[Path, Optional[Path]]:
    """Create or reuse the run directory and take its one-writer lock (held until the command ends); return
    it and the checkpoint to resume from (if any). `overwrite` empties only a folder loraforge made."""
    if resume and resume != "latest" and not cfg.output_dir:
        checkpoint = find_resume_checkpoint(resume, Path(resume))
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else Path(resume)
    else:
        if resume and not cfg.output_dir:
            raise UserError("--resume needs the run to continue: give --output-dir RUN_DIR or --resume RUN_DIR")
        run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(name)
        checkpoint = find_resume_checkpoint(resume, run_dir) if resume else None
    if checkpoint is not None:
        source = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else run_dir
        check_resume_config(cfg, source)  # against the run that wrote the checkpoint
        if source.resolve() == run_dir.resolve():
            lock_run_folder(run_dir, TRAIN_COMMAND)
            return run_dir, checkpoint
        # --resume OTHER_RUN --output-dir NEW: continue another run's checkpoint in a new folder.
    if run_dir.is_symlink() and not run_dir.exists():
        raise UserError(f"run directory {run_dir} is a symbolic link to {link_target(run_dir)}, which does not "
                        "exist; choose another --output-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file, not a folder; choose another --output-dir")
    if run_dir.is_dir() and foreign_entries(run_dir) and (overwrite or marker_kind(run_dir) != RUN):
        _check_reusable(run_dir, overwrite)  # a folder not ours is refused before anything is written into it
    created = _make_folders(run_dir)
    lock_run_folder(run_dir, TRAIN_COMMAND)  # then a run folder another train is filling is named as busy
    old = foreign_entries(run_dir)
    if old:
        _check_reusable(run_dir, overwrite)
        for path in old:  # the folder itself stays, and with it the lock this command holds
            _remove(path)
    if old or marker_kind(run_dir) != RUN:
        write_marker(run_dir, RUN)
    _created_folders[os.path.realpath(run_dir)] = created
    return run_dir, checkpoint


def _check_reusable(run_dir: Path, overwrite: bool) -> None:
    """A non-empty `run_dir` is reused only with --overwrite, and only when loraforge made it."""
    if not overwrite:
        raise UserError(f"run directory {run_dir} already exists and is not empty; "
                        "use --resume to continue it, --overwrite to replace it, or another --output-dir")
    check_replaceable(run_dir, RUN, "--overwrite", "choose another --output-dir")


# Folders prepare_run_dir created in this process (the run folder and the parents it needed), per run folder:
# what a fresh run that fails before its first step takes away again.
_created_folders: dict[str, list[Path]] = {}


def _make_folders(run_dir: Path) -> list[Path]:
    """mkdir -p `run_dir`; returns the folders it created, innermost first."""
    missing, folder = [], run_dir.absolute()
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, under a file, under /proc...
        for made in missing:
            with contextlib.suppress(OSError):
                made.rmdir()
        raise UserError(f"run directory {run_dir} cannot be created: {e.strerror}; "
                        "choose another --output-dir") from None
    return missing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def finished_at(checkpoint: Optional[Path]) -> Optional[int]:
    """The last step of a run that already finished at `checkpoint` (its summary.json says so), else None:
    resuming it would train nothing and only write the outputs again."""
    if checkpoint is None or checkpoint.parent.name != CHECKPOINT_DIR:
        return None
    import json

    from loraforge.train.checkpoint import TrainerState

    try:
        steps = json.loads((checkpoint.parent.parent / SUMMARY_FILE).read_text())["steps"]
        at = TrainerState.read(checkpoint).step
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None
    return at if isinstance(steps, int) and at >= steps else None


def is_unstarted(run_dir: Path) -> bool:
    """True when the run wrote nothing a user could want back: no checkpoint, adapter or step record."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_DIR).exists() or (run_dir / ADAPTER_DIR).exists():
        return False
    metrics = run_dir / METRICS_FILE
    return not (metrics.is_file() and metrics.stat().st_size > 0)


def discard_if_unstarted(run_dir: Path) -> None:
    """After a fresh run failed before its first step (bad data, a model that will not load), take away what
    it made - the folder and the parents it created, or, in a folder that was there (empty, or emptied by
    --overwrite), what it wrote - so that fixing the mistake and running the same command again works."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not is_unstarted(run_dir):
        return
    created = _created_folders.pop(os.path.realpath(run_dir), [])
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in created[1:]:  # innermost first; one the user filled meanwhile stays
            with contextlib.suppress(OSError):
                parent.rmdir()
        return
    for path in run_dir.iterdir():  # all of it this run's: a folder with anything else was refused or emptied
        with contextlib.suppress(OSError):
            _remove(path)


def resume_command(recipe: Optional[str], overrides: list[str], run_dir: Path) -> str:
    """The command that continues this run: the same recipe and --set flags (secrets left out, also from a
    section set whole; they come from HF_TOKEN or a new --set), and --resume RUN_DIR."""
    import shlex

    from loraforge.config_messages import redacted_override

    parts = ["loraforge", "train"] + ([shlex.quote(recipe)] if recipe else [])
    for text in overrides:
        shown = redacted_override(text)
        if shown is None or shown.split("=", 1)[0].strip() == "output_dir":
            continue
        parts += ["--set", shlex.quote(shown)]
    return " ".join(parts + ["--resume", shlex.quote(str(run_dir))])
