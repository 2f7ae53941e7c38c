"""A finished run directory -> the base model (quantized as in training), the adapter, the tokenizer and
the training template: everything chat, generate, merge and export need, checked with clear errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml
from pydantic import ValidationError

from loraforge.config import ModelSettings, RunConfig
from loraforge.errors import UserError

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class RunInfo:
    """What a run directory says about itself; nothing heavy is loaded."""

    run_dir: Path
    cfg: RunConfig
    adapter_dir: Path
    template_record: dict


@dataclass
class Session:
    model: object
    tokenizer: object
    template: object
    base: str  # the base model's path or Hub id
    with_adapter: bool
    device: str
    quantization: str  # as in training: nf4, fp4, int8 or none


def check_run_dir(run_dir) -> Path:
    """`run_dir` as a Path, if it is a folder `loraforge train` wrote (it has config.yaml); else a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; give the folder `loraforge train` wrote "
                        "(it printed the path at the end, under runs/ by default)")
    if not (run_dir / "config.yaml").is_file():
        if (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is a model checkpoint, not a run directory; give the folder "
                            "`loraforge train` wrote (with adapter/ and config.yaml)")
        raise UserError(f"{run_dir} has no config.yaml, so it is not a loraforge run directory (or training "
                        "failed before it started); give the folder `loraforge train` wrote")
    return run_dir


def load_run_config(run_dir) -> RunConfig:
    """The resolved RunConfig of a run directory (finished or not), every problem named."""
    from loraforge.config import _format_errors

    path = check_run_dir(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of sections, found {type(raw).__name__}; restore the "
                            "file the run wrote")
        return RunConfig.model_validate(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({e}); restore the file the run wrote") from None
    except ValidationError as e:
        raise UserError(_format_errors(e, str(path)) + "\n(was it written by another loraforge version?)") from None


def read_run(run_dir) -> RunInfo:
    """Check that `run_dir` is a finished run (config, template, adapter) and read its settings."""
    run_dir = check_run_dir(run_dir)
    adapter_dir = run_dir / ADAPTER_DIR
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise UserError(f"run directory {run_dir} has no adapter ({adapter_dir / missing[0]} is missing): the run "
                        "did not finish. Continue it with `loraforge train RECIPE --resume "
                        f"{run_dir}`, or point at a finished run")
    check_adapter(adapter_dir)
    cfg = load_run_config(run_dir)
    template_path = next((p for p in (run_dir / "template.json", adapter_dir / "template.json") if p.is_file()), None)
    if template_path is None:
        raise UserError(f"{run_dir} has no template.json, so the training chat format is unknown; "
                        "restore it from the run (a copy is in adapter/template.json)")
    record = read_json_object(template_path)
    if not isinstance(record.get("name"), str) or not isinstance(record.get("system_prompt") or "", str):
        raise UserError(f"{template_path}: no template name in it (\"name\": \"llama2\", ...); restore the file "
                        "the run wrote (a copy is in adapter/template.json)")
    return RunInfo(run_dir=run_dir, cfg=cfg, adapter_dir=adapter_dir, template_record=record)


def check_adapter(adapter_dir: Path) -> None:
    """adapter_config.json parses as a PEFT config and the weights file has a whole safetensors header:
    a damaged adapter is named here, before minutes of model loading."""
    from peft import PeftConfig
    from safetensors import SafetensorError, safe_open

    config = Path(adapter_dir) / "adapter_config.json"
    read_json_object(config)
    try:
        PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # noqa: BLE001 - this file is peft's only input here: whatever it raises, the file is bad
        raise UserError(f"{config} is not a valid PEFT adapter config ({type(e).__name__}: {e}); restore the "
                        "file the run wrote") from None
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is damaged ({e}); restore it, or use a checkpoint's adapter "
                        "(eval --adapter RUN/checkpoints/step-N)") from None


def read_json_object(path: Path) -> dict:
    """A JSON object a run wrote, or a UserError naming the file (bad bytes, bad JSON, another type)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file the run wrote") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(record).__name__}; restore the file the run wrote")
    return record


def inference_settings(settings: ModelSettings, device: str) -> tuple[ModelSettings, "torch.dtype"]:
    """The run's model settings adjusted to this machine: a GPU-only dtype or attention falls back to
    what works here (a run trained on a GPU can still be tried on a laptop)."""
    from loraforge.model.load import resolve_dtype

    if settings.attention == "flash_attention_2" and not device.startswith("cuda"):
        settings = settings.model_copy(update={"attention": "sdpa"})
    try:
        dtype = resolve_dtype(settings.compute_dtype, device)
    except UserError:
        dtype = resolve_dtype("auto", device)
    return settings, dtype


def load_run_tokenizer(info: RunInfo):
    """The tokenizer saved with the adapter (the one training used), else the base's."""
    from loraforge.model.load import load_tokenizer, resolve_base

    if (info.adapter_dir / "tokenizer_config.json").is_file():  # a local folder: no Hub revision applies
        return load_tokenizer(info.cfg.model.model_copy(update={"revision": None}), str(info.adapter_dir))
    return load_tokenizer(info.cfg.model, resolve_base(info.cfg.model))


def load_run_template(info: RunInfo, tokenizer, system: Optional[str] = None):
    """The training template, verified to render as in training; `system` replaces the run's system prompt."""
    from loraforge.data.templates import get_template, template_from_record

    template = template_from_record(info.template_record, tokenizer)
    if system is not None:
        template = get_template(template.name, tokenizer, system_prompt=system)
    return template


def load_run_model(cfg: RunConfig, adapter_dir: Optional[Path], device: Optional[str] = None):
    """The run's base quantized as in training (in what works on this machine), with the adapter at
    `adapter_dir` unless None, in eval mode; returns (model, base path or Hub id, device)."""
    from peft import PeftModel

    from loraforge.model.load import load_base_model, resolve_base, select_device

    device = device or select_device()
    settings, dtype = inference_settings(cfg.model, device)
    base = resolve_base(settings)
    model = load_base_model(settings, dtype, device, base)
    if adapter_dir is not None:
        check_adapter(adapter_dir)
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load the adapter {adapter_dir} onto {cfg.model.base or 'the tiny model'}: "
                            f"{first}. Was the run's base model changed?") from e
    model.eval()
    return model, base, device


def load_session(run_dir, *, base_only: bool = False, system: Optional[str] = None,
                 device: Optional[str] = None) -> Session:
    """The run's base model quantized as in training, with the adapter applied unless `base_only`."""
    info = read_run(run_dir)
    tokenizer = load_run_tokenizer(info)
    template = load_run_template(info, tokenizer, system)
    model, base, device = load_run_model(info.cfg, None if base_only else info.adapter_dir, device)
    return Session(model=model, tokenizer=tokenizer, template=template, base=base, with_adapter=not base_only,
                   device=device, quantization=info.cfg.model.quantization)
