"""The run directory: chosen, protected from silent overwrites, and checked when resuming."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from loraforge.config import RunConfig
from loraforge.errors import UserError
from loraforge.train.checkpoint import CHECKPOINT_DIR, latest_checkpoint

# Keys whose change makes a resumed run differ from an uninterrupted one.
HARMLESS_KEYS = {
    "description", "output_dir", "samples",
    "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.tensorboard",
    "train.eval_steps", "train.early_stopping_patience", "train.max_bad_steps", "train.gradient_checkpointing",
}


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing_keys(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in HARMLESS_KEYS)


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path:
    """`resume` is 'latest' (the run directory's newest checkpoint), a run directory, or a checkpoint."""
    target = run_dir if resume == "latest" else Path(resume)
    if (target / "trainer_state.json").is_file():
        return target
    found = latest_checkpoint(target)
    if found is None:
        raise UserError(f"--resume: no complete checkpoint in {target / CHECKPOINT_DIR}; "
                        "start afresh without --resume (add --overwrite to reuse the folder)")
    return found


def prepare_run_dir(cfg: RunConfig, name: str, resume: Optional[str], overwrite: bool) -> tuple[Path, Optional[Path]]:
    """Create or reuse the run directory; return it and the checkpoint to resume from (if any)."""
    if resume and resume != "latest" and not cfg.output_dir:
        checkpoint = find_resume_checkpoint(resume, Path(resume))
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else Path(resume)
    else:
        if resume and not cfg.output_dir:
            raise UserError("--resume needs the run to continue: give --output-dir RUN_DIR or --resume RUN_DIR")
        run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(name)
        checkpoint = find_resume_checkpoint(resume, run_dir) if resume else None
    if checkpoint is not None:
        saved_path = run_dir / "config.yaml"
        if saved_path.is_file():
            changed = differing_keys(yaml.safe_load(saved_path.read_text()) or {}, cfg.saved_dict())
            if changed:
                raise UserError(f"--resume: the config differs from the run's in {', '.join(changed)}; "
                                "these change the result, so resuming would not continue the same run. "
                                "Restore them, or start a new run")
        return run_dir, checkpoint
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run directory {run_dir} already exists and is not empty; "
                            "use --resume to continue it, --overwrite to replace it, or another --output-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None
