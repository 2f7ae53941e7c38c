"""Training metrics: one JSON line per record in `metrics.jsonl`, mirrored to TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

from loraforge.atomic import write_text_whole
from loraforge.errors import UserError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `metrics.jsonl`. A last line cut off by a kill mid-write is left out (the step is
    redone on resume); any other line that is not JSON is a UserError naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            if number == len(lines):
                break
            raise UserError(f"{path}, line {number}: not valid JSON; fix or delete the line and rerun") from None
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            raise UserError(f"{path}, line {number}: expected a JSON object with an integer \"step\"; fix or "
                            "delete the line and rerun")
        records.append(record)
    return records


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            # Drop records past the checkpoint we resume from: they will be produced again.
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_whole(self.path, "".join(json.dumps(r) + "\n" for r in kept))  # a kill keeps the old file
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
