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


def read_run(run_dir) -> RunInfo:
    """Check that `run_dir` is a finished run (config, template, adapter) and read its settings."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; give the folder `loraforge train` wrote "
                        "(it printed the path at the end, under runs/ by default)")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        if (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} is a model checkpoint, not a run directory; chat and generate take the "
                            "folder `loraforge train` wrote (with adapter/ and config.yaml)")
        raise UserError(f"{run_dir} is not a loraforge run directory: no config.yaml; give the folder "
                        "`loraforge train` wrote")
    adapter_dir = run_dir / ADAPTER_DIR
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise UserError(f"run directory {run_dir} has no adapter ({adapter_dir / missing[0]} is missing): the run "
                        "did not finish. Continue it with `loraforge train RECIPE --resume "
                        f"{run_dir}`, or point at a finished run")
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
        cfg = RunConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{config_path} is not a valid loraforge config ({first}); restore the file the run "
                        "wrote") from None
    template_path = next((p for p in (run_dir / "template.json", adapter_dir / "template.json") if p.is_file()), None)
    if template_path is None:
        raise UserError(f"{run_dir} has no template.json, so the training chat format is unknown; "
                        "restore it from the run (a copy is in adapter/template.json)")
    try:
        record = json.loads(template_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{template_path} is not valid JSON ({e}); restore the file the run wrote") from None
    return RunInfo(run_dir=run_dir, cfg=cfg, adapter_dir=adapter_dir, template_record=record)


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


def load_session(run_dir, *, base_only: bool = False, system: Optional[str] = None,
                 device: Optional[str] = None) -> Session:
    """The run's base model quantized as in training, with the adapter applied unless `base_only`."""
    from peft import PeftModel

    from loraforge.model.load import load_base_model, resolve_base, select_device

    info = read_run(run_dir)
    device = device or select_device()
    settings, dtype = inference_settings(info.cfg.model, device)
    tokenizer = load_run_tokenizer(info)
    template = load_run_template(info, tokenizer, system)
    base = resolve_base(settings)
    model = load_base_model(settings, dtype, device, base)
    if not base_only:
        model = PeftModel.from_pretrained(model, info.adapter_dir)
    model.eval()
    return Session(model=model, tokenizer=tokenizer, template=template, base=base, with_adapter=not base_only,
                   device=device, quantization=settings.quantization)
