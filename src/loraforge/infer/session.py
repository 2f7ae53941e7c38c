"""A finished run directory -> the base model (quantized as in training), the adapter, the tokenizer and
the training template: everything chat, generate, merge and export need, checked with clear errors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from loraforge.config import TRUST_FLAG, ModelSettings, RunConfig
from loraforge.errors import UserError, first_line
from loraforge.rundir import CONFIG_FILE, Run, check_adapter, read_run

if TYPE_CHECKING:
    import torch


@dataclass
class Session:
    model: object
    tokenizer: object
    template: object
    base: str  # the base model's path or Hub id
    with_adapter: bool
    device: str
    quantization: str  # as in training: nf4, fp4, int8 or none


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


def load_run_tokenizer(info: Run):
    """The tokenizer saved with the adapter (the one training used), else the base's."""
    from loraforge.model.load import load_tokenizer, resolve_base

    if (info.adapter_dir / "tokenizer_config.json").is_file():  # a local folder: no Hub revision applies
        return load_tokenizer(info.cfg.model.model_copy(update={"revision": None}), str(info.adapter_dir))
    return load_tokenizer(info.cfg.model, resolve_base(info.cfg.model))


def load_run_template(info: Run, tokenizer, system: Optional[str] = None):
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
    if adapter_dir is not None:
        check_adapter_code(adapter_dir, cfg.model.remote_code_allowed)
    model = load_base_model(settings, dtype, device, base)
    if adapter_dir is not None:
        check_adapter(adapter_dir)
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"could not load the adapter {adapter_dir} onto "
                            f"{cfg.model.base or 'smollm2-135m-instruct'}: {first_line(e)}. "
                            "Was the run's base model changed?") from e
    model.eval()
    return model, base, device


def check_adapter_code(adapter_dir: Path, allowed: bool) -> None:
    """PEFT imports the module an adapter config names in `megatron_core` when `megatron_config` is set (PEFT
    allows only `megatron.*` names; loraforge never writes them): such an adapter needs --trust-remote-code."""
    from loraforge.rundir import ADAPTER_CONFIG, read_json

    config = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    if isinstance(config, dict) and config.get("megatron_config") and not allowed:
        raise UserError(f"refused to run code named by the adapter: {Path(adapter_dir) / ADAPTER_CONFIG} sets "
                        f"megatron_config, for which PEFT imports the module megatron_core names "
                        f"({str(config.get('megatron_core'))[:80]!r}). If you trust it, add {TRUST_FLAG} to this "
                        "command")


def allow_run_code(info: Run, allowed: bool) -> RunConfig:
    """The run's config with this command line's --trust-remote-code applied (refused here, before anything
    loads, when the run's config.yaml asks for remote code without it)."""
    return info.cfg.allow_remote_code(allowed, str(info.run_dir / CONFIG_FILE))


def load_session(run_dir, *, base_only: bool = False, system: Optional[str] = None,
                 device: Optional[str] = None, trust_remote_code: bool = False) -> Session:
    """The run's base model quantized as in training, with the adapter applied unless `base_only`;
    code shipped with the model runs only with `trust_remote_code` (the command line's flag)."""
    info = read_run(run_dir, finished=True)
    allow_run_code(info, trust_remote_code)
    tokenizer = load_run_tokenizer(info)
    template = load_run_template(info, tokenizer, system)
    model, base, device = load_run_model(info.cfg, None if base_only else info.adapter_dir, device)
    return Session(model=model, tokenizer=tokenizer, template=template, base=base, with_adapter=not base_only,
                   device=device, quantization=info.cfg.model.quantization)
