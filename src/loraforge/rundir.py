"""The run directory: the one place that knows its layout, used by every stage.

`loraforge train` writes it; chat, generate, merge, export, eval and report read it. Its files:

    config.yaml          the resolved RunConfig (secrets removed)
    template.json        the training chat template (a copy also lies in adapter/)
    data_report.json/.png
    metrics.jsonl        one JSON record per step or evaluation; tb/ mirrors it for TensorBoard
    checkpoints/step-NNNNNN/   adapter/, optimizer.pt, scheduler.pt, rng.pt, trainer_state.json
    adapter/             the final adapter (PEFT format, tokenizer, template.json)
    summary.json         written when training ends
    eval.json            written by `loraforge eval`
    report.html          written by `loraforge report` (and at the end of train and eval)
    .loraforge           the ownership marker: `train --overwrite` empties only a folder that has it
    .loraforge.lock(.json)  the one-writer lock, held by train/eval/report while they write (and its holder)

Nothing here loads a model: `read_run` checks the folder and reads its small files on demand.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from loraforge.config import RunConfig
from loraforge.errors import UserError

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "template.json"
DATA_REPORT_FILE = "data_report.json"
DATA_REPORT_CHART = "data_report.png"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
REPORT_FILE = "report.html"

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STATE_FILE = "trainer_state.json"
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_SCHEDULER_FILE = "scheduler.pt"
CHECKPOINT_RNG_FILE = "rng.pt"
CHECKPOINT_ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"
# A checkpoint counts only when it holds all of these; the state file is written last.
CHECKPOINT_FILES = (CHECKPOINT_ADAPTER_WEIGHTS, f"{ADAPTER_DIR}/{ADAPTER_CONFIG}", CHECKPOINT_OPTIMIZER_FILE,
                    CHECKPOINT_SCHEDULER_FILE, CHECKPOINT_RNG_FILE, CHECKPOINT_STATE_FILE)
_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")


# --- checking and reading --------------------------------------------------------------------

def check_run_dir(run_dir) -> Path:
    """`run_dir` as a Path, if it is a folder `loraforge train` wrote (it has config.yaml); else a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; give the folder `loraforge train` wrote "
                        "(it printed the path at the end, under runs/ by default)")
    if not (run_dir / CONFIG_FILE).is_file():
        if (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is a model checkpoint, not a run directory; give the folder "
                            "`loraforge train` wrote (with adapter/ and config.yaml)")
        raise UserError(f"{run_dir} has no config.yaml, so it is not a loraforge run directory (or training "
                        "failed before it started); give the folder `loraforge train` wrote")
    return run_dir


def load_run_config(run_dir) -> RunConfig:
    """The resolved RunConfig of a run directory (finished or not), every problem named."""
    import yaml
    from pydantic import ValidationError

    from loraforge.config import format_errors

    path = check_run_dir(run_dir) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections, found {type(raw).__name__}; restore the "
                            "file the run wrote")
        return RunConfig.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({e}); restore the file the run wrote") from None
    except ValidationError as e:
        raise UserError(format_errors(e, str(path)) + "\n(was it written by another loraforge version?)") from None


def read_json(path: Path) -> Any:
    """A JSON file of the run, None when it does not exist; a broken one is a UserError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not readable JSON ({e}); restore the file the run wrote, or delete it and "
                        "rerun the command that writes it") from None


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


@dataclass
class Run:
    """A run directory (checked to have config.yaml); each file is read on first use, then kept."""

    run_dir: Path

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER_DIR

    @cached_property
    def cfg(self) -> RunConfig:
        return load_run_config(self.run_dir)

    @cached_property
    def config_text(self) -> str:
        return (self.run_dir / CONFIG_FILE).read_text()

    @cached_property
    def template_record(self) -> Optional[dict]:
        """template.json of the run, else the copy saved with the adapter; None when neither exists."""
        path = next((p for p in (self.run_dir / TEMPLATE_FILE, self.adapter_dir / TEMPLATE_FILE) if p.is_file()),
                    None)
        if path is None:
            return None
        record = read_json(path)
        if not isinstance(record, dict) or not isinstance(record.get("name"), str) \
                or not isinstance(record.get("system_prompt") or "", str):
            raise UserError(f"{path}: no template name in it (\"name\": \"llama2\", ...); restore the file "
                            "the run wrote (a copy is in adapter/template.json)")
        return record

    @cached_property
    def metrics(self) -> list[dict]:
        return read_metrics(self.run_dir)

    @cached_property
    def summary(self) -> Optional[dict]:
        return read_json(self.run_dir / SUMMARY_FILE)

    @cached_property
    def data_report(self) -> Optional[dict]:
        return read_json(self.run_dir / DATA_REPORT_FILE)

    @cached_property
    def eval_result(self) -> Optional[dict]:
        return read_json(self.run_dir / EVAL_FILE)


def read_run(run_dir, finished: bool = False) -> Run:
    """The run directory `run_dir`. With `finished`, also check now that training finished (the adapter is
    saved) and read its config and template, so that a command fails before it loads any weights."""
    run = Run(check_run_dir(run_dir))
    if not finished:
        return run
    missing = [name for name in ADAPTER_FILES if not (run.adapter_dir / name).is_file()]
    if missing:
        raise UserError(f"run directory {run.run_dir} has no adapter ({run.adapter_dir / missing[0]} is missing): "
                        "the run did not finish. Continue it with `loraforge train RECIPE --resume "
                        f"{run.run_dir}`, or point at a finished run")
    check_adapter(run.adapter_dir)
    run.cfg  # noqa: B018 - validated now, before anything loads
    if run.template_record is None:
        raise UserError(f"{run.run_dir} has no template.json, so the training chat format is unknown; "
                        "restore it from the run (a copy is in adapter/template.json)")
    return run


# --- the adapter and the checkpoints ---------------------------------------------------------

def check_adapter(adapter_dir: Path) -> None:
    """adapter_config.json parses as a PEFT config and the weights file has a whole safetensors header:
    a damaged adapter is named here, before minutes of model loading."""
    from peft import PeftConfig
    from safetensors import SafetensorError, safe_open

    config = Path(adapter_dir) / ADAPTER_CONFIG
    if not isinstance(read_json(config), dict):
        raise UserError(f"{config}: expected a JSON object; restore the file the run wrote")
    try:
        PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # noqa: BLE001 - this file is peft's only input here: whatever it raises, the file is bad
        raise UserError(f"{config} is not a valid PEFT adapter config ({type(e).__name__}: {e}); restore the "
                        "file the run wrote") from None
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is damaged ({e}); restore it, or use a checkpoint's adapter "
                        "(eval --adapter RUN/checkpoints/step-N)") from None


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete_checkpoint(path: Path) -> bool:
    path = Path(path)
    return all((path / f).is_file() for f in CHECKPOINT_FILES)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; partial and scratch folders are ignored."""
    root = Path(run_dir) / CHECKPOINT_DIR
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir() and is_complete_checkpoint(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_adapter(run_dir: Path, adapter: Optional[str] = None) -> tuple[Path, str]:
    """The adapter folder to use and how it was chosen.

    `adapter` may be an adapter folder or a checkpoint folder; by default the run's final
    `adapter/`, else (a run still going or stopped) its newest complete checkpoint.
    """
    def is_adapter(p: Path) -> bool:
        return (p / ADAPTER_CONFIG).is_file()

    if adapter:
        p = Path(adapter)
        for candidate in (p, p / ADAPTER_DIR):
            if is_adapter(candidate):
                return candidate, f"adapter {candidate}"
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (nor in {p / ADAPTER_DIR}); give an "
                        "adapter folder or a checkpoint folder such as RUN/checkpoints/step-000100")
    final = Path(run_dir) / ADAPTER_DIR
    if is_adapter(final):
        return final, f"final adapter {final}"
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is not None and is_adapter(ckpt / ADAPTER_DIR):
        return ckpt / ADAPTER_DIR, f"no final adapter yet: newest checkpoint {ckpt.name}"
    raise UserError(f"{run_dir} has no adapter/ and no complete checkpoint: training has not saved anything yet")
