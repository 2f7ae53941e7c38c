"""Out of memory in the training loop: one message with the step, what was running, what is safe on disk,
and the setting that lowers the memory per pass (cli/train.py adds the resume command)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.errors import UserError, allocation, out_of_memory


class TrainingOutOfMemory(UserError):
    """The host or the GPU ran out of memory during a step; `settings` are --set flags that lower it."""

    def __init__(self, message: str, checkpoint: Optional[Path], settings: list[str]):
        super().__init__(message)
        self.checkpoint, self.settings = checkpoint, settings


@dataclass
class PassWatch:
    """What the loop is doing, for the message: the step, evaluation or a pass of some rows."""
    step: int = 0
    phase: str = "train"  # train | eval | save
    rows: int = 0
    tokens: int = 0  # the pass's tokens as computed (padding included)

    def training(self, rows: int, tokens: int) -> None:
        self.phase, self.rows, self.tokens = "train", rows, tokens


@contextlib.contextmanager
def out_of_memory_stops_the_run(watch: PassWatch, checkpoints, micro_batch_size: int, max_length: int):
    """Turn an out-of-memory inside the block into TrainingOutOfMemory; other errors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        kind = out_of_memory(e)
        if kind is None:
            raise
        raise _stopped(watch, kind, e, checkpoints.last, micro_batch_size, max_length) from None


def _stopped(watch: PassWatch, kind: str, error: Exception, checkpoint: Optional[Path], micro_batch_size: int,
             max_length: int) -> TrainingOutOfMemory:
    where = "GPU memory" if kind == "GPU" else "memory (RAM)"
    settings: list[str] = []
    if watch.phase == "eval":
        what = f"in the evaluation after step {watch.step}"
        advice = (f"the evaluation runs batches of train.micro_batch_size ({micro_batch_size}) held-out rows: lower "
                  "it, or data.max_length")
    elif watch.phase == "save":
        what, advice = f"while saving the checkpoint of step {watch.step}", "free memory and resume"
    elif watch.rows > 1:
        what = f"in step {watch.step} (a pass of {watch.rows} rows, {watch.tokens} tokens)"
        half = max(1, watch.tokens // 2)
        settings = [f"train.max_tokens_per_micro_batch={half}"]
        advice = (f"set train.max_tokens_per_micro_batch={half} (the same rows and loss, in passes of at most that many "
                  f"tokens), or lower train.micro_batch_size ({micro_batch_size}) or data.max_length ({max_length})")
    else:
        what = f"in step {watch.step} (one row of {watch.tokens} tokens)"
        advice = f"lower data.max_length ({max_length}); on a GPU, model.quantization: nf4 needs the least memory"
    kept = (f"the last checkpoint, {checkpoint}, is intact" if checkpoint is not None
            else "no checkpoint was saved before it (train.save_steps saves one every N steps)")
    return TrainingOutOfMemory(f"training ran out of {where}{allocation(error)} {what}; {kept}. To need less: "
                               f"{advice}", checkpoint, settings)
