"""Fold a run's LoRA adapter into the base weights and save a plain transformers checkpoint."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraforge.errors import UserError
from loraforge.export import MERGE_DTYPES
from loraforge.infer.session import allow_run_code, check_adapter_code, load_run_template, load_run_tokenizer
from loraforge.rundir import TEMPLATE_FILE, Run, read_run


@dataclass
class Merged:
    model: object
    tokenizer: object
    template: object  # the training template, or None for a checkpoint saved without template.json
    tokenizer_dir: Path  # the base's folder: a SentencePiece tokenizer.model there is what GGUF export writes
    name: str
    note: Optional[str] = None  # what the user should know about the numbers


def quantized_note(info: Run, dtype: torch.dtype) -> Optional[str]:
    q = info.cfg.model.quantization
    if q == "none":
        return None
    bits = "8-bit" if q == "int8" else f"4-bit {q}"
    return (f"merging into the {str(dtype).removeprefix('torch.')} base weights, not the {bits} weights used in "
            "training: outputs differ slightly from the quantized adapter run")


def resolve_merge_dtype(name: str, info: Run) -> torch.dtype:
    """`auto`: the dtype the base checkpoint was saved in (float32 when it does not say)."""
    from loraforge.model.load import load_model_config

    if name not in MERGE_DTYPES:
        raise UserError(f"--dtype {name}: choose one of {', '.join(MERGE_DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    saved = getattr(load_model_config(info.cfg.model), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if saved in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def merge_run(info: Run, dtype: torch.dtype) -> Merged:
    """The run's adapter folded into its base, loaded unquantized in `dtype` on the CPU.

    PEFT computes the LoRA update in float32 on the CPU and adds it to the 16/32-bit weights; the
    4-bit weights of training are not used (merging into them would round the update away).
    """
    from peft import PeftModel

    from loraforge.model.load import load_base_model, resolve_base

    settings = info.cfg.model.model_copy(update={"quantization": "none", "attention": "sdpa"})
    base = resolve_base(settings)
    check_adapter_code(info.adapter_dir, settings.remote_code_allowed)
    tokenizer = load_run_tokenizer(info)
    template = load_run_template(info, tokenizer)
    model = load_base_model(settings, dtype, "cpu", base, quantize=False)
    model = PeftModel.from_pretrained(model, info.adapter_dir).merge_and_unload()
    model.config.use_cache = True  # loading for training turned it off; users generate with the result
    model.eval()
    return Merged(model=model, tokenizer=tokenizer, template=template, tokenizer_dir=Path(base),
                  name=info.run_dir.resolve().name, note=quantized_note(info, dtype))


def save_merged(merged: Merged, out: Path, record: Optional[dict]) -> None:
    """A checkpoint folder that plain `AutoModelForCausalLM` / `AutoTokenizer` load, chatting in the
    training template (`apply_chat_template`), with the SentencePiece model for llama.cpp's converter."""
    from loraforge.export.chat_template import training_chat_template

    merged.model.save_pretrained(out, safe_serialization=True)
    tokenizer = merged.tokenizer
    if merged.template is not None:
        tokenizer.chat_template = training_chat_template(merged.template)
    tokenizer.save_pretrained(out)
    spm = sentencepiece_file(merged.tokenizer_dir)
    if spm is not None and not (out / "tokenizer.model").exists():
        shutil.copyfile(spm, out / "tokenizer.model")
    if record is not None:
        (out / TEMPLATE_FILE).write_text(json.dumps(record, indent=1))


def sentencepiece_file(model_dir) -> Optional[Path]:
    """The base's `tokenizer.model` (local folder, or the Hub cache for a Hub id), if it has one."""
    local = Path(model_dir) / "tokenizer.model"
    if local.is_file():
        return local
    try:
        from transformers.utils import cached_file

        found = cached_file(str(model_dir), "tokenizer.model", _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def merge_to_folder(run_dir, out, dtype_name: str = "auto", force: bool = False,
                    trust_remote_code: bool = False) -> tuple[Path, Merged, torch.dtype]:
    """`loraforge merge`: check everything, merge, and write `out` whole (it appears only when complete). Code
    shipped with the model runs only with `trust_remote_code` (the command line's flag)."""
    from loraforge.atomic import written_whole
    from loraforge.export.paths import check_output, check_replaceable_output
    from loraforge.ownership import MERGED, write_marker

    info = read_run(run_dir, finished=True)
    allow_run_code(info, trust_remote_code)
    out = check_output(out, force, kind=MERGED, command="loraforge merge")
    dtype = resolve_merge_dtype(dtype_name, info)
    merged = merge_run(info, dtype)
    with written_whole(out, folder=True, before_replace=lambda: check_replaceable_output(out, "--out", MERGED)) as tmp:
        save_merged(merged, tmp, info.template_record)
        write_marker(tmp, MERGED)  # what a later --force may replace
    return out, merged, dtype
