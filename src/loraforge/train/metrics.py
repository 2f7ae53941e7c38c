"""Training metrics: one JSON line per record in `metrics.jsonl`, mirrored to TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

from loraforge.atomic import write_text_whole
from loraforge.rundir import METRICS_FILE, TENSORBOARD_DIR, read_metrics

class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None, active: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self._file = self._tb = None
        if not active:  # a rank other than 0 of a multi-device run: it writes nothing
            return
        if resume_step is not None:
            # Drop records past the checkpoint we resume from: they will be produced again.
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_whole(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a kill keeps the old file
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
