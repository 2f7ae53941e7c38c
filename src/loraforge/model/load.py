"""Load the base model and tokenizer: local folder or Hub id, dtype for the hardware, bitsandbytes quantization."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from loraforge.config import TRUST_FLAG, ModelSettings, remote_code_refusal
from loraforge.errors import UserError, first_line
from loraforge.model import smollm2, tiny

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def select_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on the CPU.

    The same dtype is used for the base's compute, the non-quantized weights and autocast, so the
    fp16-on-a-bf16-checkpoint crash of the notebooks (GradScaler on bf16 grads) cannot happen.
    """
    on_gpu = device.startswith("cuda")
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "float16" and not on_gpu:
        raise UserError("model.compute_dtype: float16 needs a CUDA GPU; on the CPU use 'auto' (float32) or 'bfloat16'")
    if name == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise UserError("model.compute_dtype: this GPU has no bfloat16 support; use 'auto' or 'float16'")
    return DTYPES[name]


def resolve_base(cfg: ModelSettings) -> str:
    """The path or Hub id to load from; the built-in models (the default SmolLM2, `tiny`) are built on first use."""
    if tiny.is_tiny(cfg.base):
        return str(tiny.ensure_tiny_model())
    if smollm2.is_smollm2(cfg.base):
        return str(smollm2.ensure_smollm2())
    path = Path(os.path.expanduser(cfg.base))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.base: {path} has no config.json; point it at a Hugging Face checkpoint folder")
        return str(path)
    if cfg.base.startswith((".", "/", "~")) or cfg.base.count("/") > 1:
        raise UserError(f"model.base: folder {cfg.base} does not exist")
    return cfg.base


def _hub_kwargs(cfg: ModelSettings) -> dict:
    """Hub options for every from_pretrained. Code shipped with the model runs only when this command line said
    --trust-remote-code (cfg.remote_code_allowed); `trust_remote_code` is always passed, as transformers asks
    on stdin when it is left out."""
    if cfg.trust_remote_code and not cfg.remote_code_allowed:  # the CLI refuses sooner; this is the backstop
        raise UserError(remote_code_refusal("the config", ["model.trust_remote_code"]))
    token = cfg.hub_token or os.environ.get("HF_TOKEN") or None
    return dict(revision=cfg.revision, token=token, trust_remote_code=cfg.remote_code_allowed)


def load_model_config(cfg: ModelSettings, base: Optional[str] = None):
    """The base's transformers config (config.json), under the same rules as its weights."""
    from transformers import AutoConfig

    base = base or resolve_base(cfg)
    try:
        return AutoConfig.from_pretrained(base, **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise _explain_load_failure("config", base, e) from e


def _explain_load_failure(what: str, base: str, err: Exception) -> UserError:
    if "trust_remote_code" in str(err):  # transformers' refusal of a folder's auto_map
        return UserError(f"refused to run code shipped with '{base}': its {what} names its own Python code "
                         f"(auto_map), which loraforge runs only when the command line asks. If you have read that "
                         f"code and trust it, add {TRUST_FLAG} to this command")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = ("HF_HUB_OFFLINE=1 is set, so only cached models load" if offline
            else "check the name, your connection, and HF_TOKEN for gated models")
    return UserError(f"could not load the {what} of '{base}': {first_line(err)}. {hint}")


def load_tokenizer(cfg: ModelSettings, base: Optional[str] = None):
    """The base's tokenizer with a pad token that does not grow the vocabulary."""
    from transformers import AutoTokenizer

    base = base or resolve_base(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(base, **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise _explain_load_failure("tokenizer", base, e) from e
    if tok.pad_token is None:
        # A new pad token would resize the embeddings and break the adapter's portability.
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok


def _config_json(base: str, cfg: ModelSettings) -> Optional[dict]:
    """The checkpoint's config.json as plain data (no model code runs), or None when it cannot be read here."""
    import json

    path = Path(base) / "config.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            hub = _hub_kwargs(cfg)
            path = Path(hf_hub_download(base, "config.json", revision=hub["revision"], token=hub["token"]))
        config = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - offline, gated, not JSON: loading the weights will say what is wrong
        return None
    return config if isinstance(config, dict) else None


def context_length(base: str, cfg: ModelSettings) -> Optional[tuple[int, str]]:
    """(tokens, where that number comes from) of the model's context: max_position_embeddings, extended by a
    linear or dynamic RoPE scaling factor (a scaling with original_max_position_embeddings, as Llama 3's or YaRN's,
    already counts in it). None when the config does not say."""
    config = _config_json(base, cfg) or {}
    n = config.get("max_position_embeddings")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    how = f"config.json max_position_embeddings {n}"
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if isinstance(factor, (int, float)) and factor > 1 and kind not in (None, "default"):
        extended = int(original * factor) if isinstance(original, int) else int(n * factor) if kind in (
            "linear", "dynamic") else n
        if extended > n:
            how += f", {kind} RoPE scaling x{factor:g}"
            n = extended
    return n, how


def check_max_length(cfg: ModelSettings, max_length: int, allow_beyond: bool, base: Optional[str] = None) -> None:
    """data.max_length must fit the model's context, unless data.allow_beyond_context (checked before any weights)."""
    if allow_beyond:
        return
    base = base or resolve_base(cfg)
    found = context_length(base, cfg)
    if found is not None and max_length > found[0]:
        limit, how = found
        raise UserError(f"data.max_length {max_length} is more than the context of {cfg.base or 'smollm2-135m-instruct'}: "
                        f"{limit} tokens ({how}); its positions past {limit} were never trained. Lower data.max_length "
                        f"to {limit} or less, or set data.allow_beyond_context: true if you know this model works "
                        "on longer sequences")


def quantization_config(cfg: ModelSettings, dtype: torch.dtype, shardable: bool = False):
    """bitsandbytes settings; `shardable` stores the 4-bit values in the compute dtype (quant_storage), which
    FSDP needs to shard them alongside the other weights (train/distributed.py)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=dtype if shardable else torch.uint8)


def load_base_model(cfg: ModelSettings, dtype: torch.dtype, device: str, base: Optional[str] = None,
                    quantize: bool = True, shardable: bool = False):
    """The base model on `device`, quantized as configured (quantize=False loads 16/32-bit, e.g. for merging)."""
    from transformers import AutoModelForCausalLM

    if cfg.attention == "flash_attention_2" and not device.startswith("cuda"):
        raise UserError("model.attention: flash_attention_2 needs a CUDA GPU; use 'sdpa'")
    base = base or resolve_base(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=dtype, device_map={"": device}, attn_implementation=cfg.attention, use_safetensors=True,
            quantization_config=quantization_config(cfg, dtype, shardable) if quantize else None, **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise _explain_load_failure("weights", base, e) from e
    model.config.use_cache = False
    if device == "cpu":
        use_exact_cpu_kernels(model)
    return model


def use_exact_cpu_kernels(model) -> None:
    """Keep bitsandbytes' 4-bit layers on one numerics path on the CPU.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 kernel at the first
    eval-mode forward; its outputs then differ from the fp32 training path by ~1e-2, so an eval
    or a reloaded adapter would not reproduce what training computed.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
