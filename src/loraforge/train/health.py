"""Notice a run that stopped learning without going NaN: with a far too high learning rate the
model collapses to guessing (loss at ln(vocabulary), the uniform distribution's) and the gradient
vanishes, and training would go on for hours doing nothing."""
from __future__ import annotations

import math
from typing import Optional

FLAT_GRAD = 1e-4  # gradient norm at or below this: nothing is learned
PATIENCE = 3  # consecutive steps before warning


class CollapseWatch:
    def __init__(self, vocab_size: int, learning_rate: float):
        self.uniform_loss = math.log(max(vocab_size, 2))
        self.learning_rate = learning_rate
        self.flat_steps = 0
        self.warned = False

    def check(self, record: dict) -> Optional[str]:
        """A one-time warning when `record` (a step's metrics) is the PATIENCE-th collapsed step in a row."""
        loss, grad = record.get("loss"), record.get("grad_norm")
        if loss is None or grad is None or not (math.isfinite(loss) and math.isfinite(grad)):
            return None
        at_uniform = abs(loss - self.uniform_loss) < 0.02 * self.uniform_loss
        self.flat_steps = self.flat_steps + 1 if grad <= FLAT_GRAD or (at_uniform and grad <= 1e-2) else 0
        if self.flat_steps < PATIENCE or self.warned:
            return None
        self.warned = True
        return (f"warning: step {record['step']}: training has collapsed: gradient norm {grad:.3g} for "
                f"{PATIENCE} steps, loss {loss:.3f} (uniform guessing over the vocabulary is "
                f"{self.uniform_loss:.3f}). Nothing is being learned; stop the run (Ctrl-C) and lower "
                f"train.learning_rate (now {self.learning_rate:g}).")
