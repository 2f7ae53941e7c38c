"""Atomic checkpoints: written under a temporary name, renamed into place only when complete.

A checkpoint folder `checkpoints/step-NNNNNN/` holds the adapter (safetensors), the optimizer and
scheduler state and the RNG states of Python, NumPy, torch and CUDA (tensors and plain lists,
loadable with `torch.load(weights_only=True)`: no pickled objects), and `trainer_state.json`
(the step - which fixes the data position, as the batch plan is a pure function of it - and the
bookkeeping to carry on: best eval, patience, skipped steps).

Only a folder named `step-NNNNNN` holding every file in `loraforge.rundir.CHECKPOINT_FILES` counts
as a checkpoint (`rundir.list_checkpoints` finds them). A crash or kill mid-save leaves a `.tmp-*`
folder (never picked up, removed at the next save); pruning renames a folder to `.trash-*` before
deleting it, so a kill mid-prune cannot leave a half-deleted `step-*` folder that looks complete.
`TrainerState` is `trainer_state.json`, typed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loraforge.atomic import SCRATCH_PREFIXES, written_whole
from loraforge.errors import UserError, first_line
from loraforge.rundir import (ADAPTER_DIR, CHECKPOINT_ADAPTER_WEIGHTS, CHECKPOINT_DIR, CHECKPOINT_FILES,
                              CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_RNG_FILE, CHECKPOINT_SCHEDULER_FILE,
                              CHECKPOINT_STATE_FILE, checkpoint_name, list_checkpoints)


@dataclass
class TrainerState:
    """What a checkpoint carries besides tensors (`trainer_state.json`): the step - which fixes the data
    position, as the batch plan is a pure function of it - and the bookkeeping that carries on."""

    step: int = 0
    best_eval_loss: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_gain: int = 0
    bad_steps: int = 0  # non-finite steps skipped so far (train.max_bad_steps)
    world_size: int = 1  # ranks that wrote it: a checkpoint resumes only on as many

    TYPES = {"step": int, "best_eval_loss": (float, int, type(None)), "best_step": (int, type(None)),
             "evals_without_gain": int, "bad_steps": int, "world_size": int}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState":
        """The state saved in `checkpoint`; a missing, unreadable or mistyped file is a UserError naming it."""
        path = Path(checkpoint) / CHECKPOINT_STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"checkpoint {checkpoint}: {CHECKPOINT_STATE_FILE} is not readable JSON ({first_line(e)}); "
                            f"resume from an earlier checkpoint in {Path(checkpoint).parent}") from None
        raw = raw if isinstance(raw, dict) else {}
        raw.setdefault("world_size", 1)  # written only by several ranks before it was typed
        bad = [k for k, t in cls.TYPES.items() if k not in raw or not isinstance(raw[k], t) or isinstance(raw[k], bool)]
        if bad:
            raise UserError(f"checkpoint {checkpoint}: {CHECKPOINT_STATE_FILE} has no valid {', '.join(bad)}; resume "
                            f"from an earlier checkpoint in {Path(checkpoint).parent}")
        return cls(**{k: raw.get(k) for k in cls.TYPES})


def checkpoint_world(checkpoint: Path) -> int:
    try:
        return TrainerState.read(checkpoint).world_size
    except UserError:  # named by verify_checkpoint, which reads every file before the run starts
        return 1


def check_world(checkpoint: Optional[Path], world: int) -> None:
    """A checkpoint continues exactly only on as many ranks as wrote it (the split of each step and
    each rank's random state are part of it): anything else is refused."""
    if checkpoint is None:
        return
    saved = checkpoint_world(checkpoint)
    if saved != world:
        how = f"--devices {saved}" if saved > 1 else "without --devices"
        raise UserError(f"--resume: checkpoint {checkpoint} was written by a run on {saved} device(s), this one has "
                        f"{world}; resume it on the same number ({how}) to continue it exactly")


def rng_state() -> dict:
    """Every random generator training draws from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _discard(path: Path) -> None:
    """Delete a folder by first renaming it out of sight, so a kill mid-delete leaves only scratch."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_scratch(root: Path, keep: Path | None = None) -> None:
    """Remove `.tmp-*` / `.trash-*` leftovers of crashed or killed saves (one trainer writes a run)."""
    for p in root.iterdir() if root.is_dir() else []:
        if p.name.startswith(SCRATCH_PREFIXES) and p != keep:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainerState,
                    keep: int, protect: set[int] = frozenset(), *, adapter_state: dict | None = None,
                    optimizer_state: dict | None = None, rngs: list[dict] | None = None) -> Path:
    """Write checkpoint `state.step` atomically and prune all but the newest `keep` (and `protect`ed steps).

    The previous checkpoints are untouched until the new one is complete; any OSError (a full disk)
    propagates after the partial folder is removed. Several ranks (train/distributed.py): rank 0
    writes the gathered `adapter_state` / `optimizer_state` and every rank's random state `rngs`.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _clean_scratch(root)
    step = state.step
    final = root / checkpoint_name(step)
    with written_whole(final, folder=True) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True, state_dict=adapter_state)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
                   tmp / CHECKPOINT_OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / CHECKPOINT_SCHEDULER_FILE)
        rngs = rngs or [rng_state()]
        for rank, rank_rngs in enumerate(rngs):
            torch.save(rank_rngs, tmp / rng_file(rank))
        # Written last: a folder with this file was complete when the rename happened.
        (tmp / CHECKPOINT_STATE_FILE).write_text(dataclasses.replace(state, world_size=len(rngs)).to_json())
    prune_checkpoints(run_dir, keep, protect | {step})
    return final


class RunCheckpoints:
    """The loop's checkpoints: every rank takes part in a save (a sharded model's parts are gathered), rank 0
    writes; remembers the last one written. `model` is the unwrapped PEFT model, `wrapped` what the ranks run."""

    def __init__(self, run_dir: Path, model, wrapped, optimizer, scheduler, ranks, keep: int, last: Optional[Path]):
        self.run_dir, self.model, self.wrapped, self.ranks = run_dir, model, wrapped, ranks
        self.optimizer, self.scheduler, self.keep, self.last = optimizer, scheduler, keep, last

    def save(self, state: TrainerState) -> Path:
        from loraforge.train import distributed

        protect = {state.best_step} if state.best_step is not None else set()
        parts = distributed.checkpoint_parts(self.wrapped, self.optimizer, self.ranks, rng_state())  # every rank's
        saved = error = None
        try:
            if self.ranks.is_main:
                saved = save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, state, self.keep,
                                        protect, **parts)
        except OSError as e:
            error = (f"could not write the checkpoint for step {state.step} in {self.run_dir}: {e.strerror or e}. "
                     f"The previous checkpoint ({self.last}) is intact; free space and resume")
        saved, error = distributed.broadcast(self.ranks, (saved, error))
        if error:
            raise UserError(error)
        self.last = saved
        return saved

    def save_once(self, state: TrainerState) -> Path:
        """save(state), unless this step was just saved (a best eval, then a signal or the end)."""
        if self.last is not None and Path(self.last).name == checkpoint_name(state.step):
            return self.last
        return self.save(state)


def prune_checkpoints(run_dir: Path, keep: int, protect: set[int] = frozenset()) -> None:
    """Keep the newest `keep` complete checkpoints and the `protect`ed steps (e.g. the best eval)."""
    found = list_checkpoints(run_dir)
    for step, path in found[:-keep] if keep else found:
        if step not in protect:
            _discard(path)


def verify_checkpoint(path: Path) -> None:
    """Read every file of checkpoint `path` once, before a resume writes anything: a damaged file is a
    UserError naming it, not a failure after the run directory was touched."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    TrainerState.read(path)
    try:
        with safe_open(str(path / CHECKPOINT_ADAPTER_WEIGHTS), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: {CHECKPOINT_ADAPTER_WEIGHTS} is damaged ({e}); resume from an earlier "
                        f"checkpoint in {path.parent}") from None
    import pickle

    for name in (CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_SCHEDULER_FILE, CHECKPOINT_RNG_FILE):
        try:
            torch.load(path / name, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(f"checkpoint {path}: {name} is damaged ({first_line(e)}); resume from an earlier checkpoint "
                            f"in {path.parent}") from None


def load_adapter_weights(path: Path, model) -> None:
    """Only the adapter weights of checkpoint `path` (train.keep_best: the best evaluation's)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(path) / CHECKPOINT_ADAPTER_WEIGHTS)))


def rng_file(rank: int) -> str:
    return CHECKPOINT_RNG_FILE if rank == 0 else f"rng-rank{rank}.pt"


def load_checkpoint(path: Path, model, optimizer, scheduler, *, rank: int = 0, set_adapter=None,
                    set_optimizer=None) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG (this `rank`'s); return the trainer state.

    Everything loads with `weights_only=True` or safetensors; a missing or unreadable file is a
    UserError naming it. `set_adapter(weights)` / `set_optimizer(state)` replace the plain loading
    (a sharded model, train/distributed.py).
    """
    import pickle

    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in (*CHECKPOINT_FILES, *([rng_file(rank)] if rank else [])) if not (path / f).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete (no {', '.join(missing)}); "
                        f"resume from an earlier one in {path.parent}")
    try:
        weights = load_file(str(path / CHECKPOINT_ADAPTER_WEIGHTS))
        if set_adapter is not None:
            set_adapter(weights)
        else:
            result = set_peft_model_state_dict(model, weights)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise UserError(f"checkpoint {path}: the adapter has weights this model does not ({unexpected[0]}, "
                                "...); it was saved with different lora settings")
        optimizer_state = torch.load(path / CHECKPOINT_OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        (set_optimizer or optimizer.load_state_dict)(optimizer_state)
        scheduler.load_state_dict(torch.load(path / CHECKPOINT_SCHEDULER_FILE, weights_only=True))
        set_rng_state(torch.load(path / rng_file(rank), weights_only=True))
        return TrainerState.read(path)
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {path} cannot be loaded ({first_line(e)}); "
                        f"resume from an earlier one in {path.parent}") from e
