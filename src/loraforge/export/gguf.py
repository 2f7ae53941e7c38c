"""Write a Llama checkpoint (a run's merged model, or a merged folder) as a GGUF file for llama.cpp.

Written with the `gguf` package, llama.cpp's own writer: architecture metadata (GQA, tied embeddings, RoPE
frequency factors), the vocabulary (SentencePiece with scores, or byte-level BPE with merges and the
pre-tokenizer identity llama.cpp needs), token types, special tokens and the training chat template, and the
weights in llama.cpp's tensor names and layout (f32, f16 or q8_0). The 4/5-bit types (q4_0, q4_k_m, q5_k_m)
come from llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`) applied to that f16 file:
`gguf` cannot write K-quants, and llama.cpp's choice of per-tensor types is what its users expect.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loraforge.errors import UserError, first_line
from loraforge.export import GGUF_LLAMA_CPP_TYPES, GGUF_TYPES
from loraforge.export.gguf_vocab import (added_special_tokens, end_of_turn_id, space_after_special, special_vocab,
                                         vocabulary)

SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"


@dataclass
class GGUFResult:
    path: Path
    tensors: int
    vocab_size: int
    chat_template: Optional[str]
    note: Optional[str]
    modelfile: Optional[Path] = None  # the Ollama Modelfile written beside it
    modelfile_note: Optional[str] = None


def check_architecture(config, where: str) -> None:
    """Only plain Llama checkpoints: their tensors map one to one onto llama.cpp's `llama` architecture."""
    architectures = list(getattr(config, "architectures", None) or [])
    if SUPPORTED_ARCHITECTURE not in architectures or getattr(config, "model_type", None) != "llama":
        found = ", ".join(architectures) or getattr(config, "model_type", None) or "unknown"
        raise UserError(f"export gguf: {where} is a {found} model; loraforge writes GGUF for {SUPPORTED_ARCHITECTURE} "
                        "(Llama-2-style) checkpoints only. Merge it with `loraforge merge` and convert the merged "
                        "folder with llama.cpp's convert_hf_to_gguf.py")
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        raise UserError(f"export gguf: {where} uses RoPE scaling '{kind}', which loraforge does not write (it writes "
                        f"{', '.join(ROPE_TYPES)}); convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"export gguf: {where} has bias terms in its linear layers, which loraforge does not write; "
                        "convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


# RoPE types that only rescale each frequency by a constant: llama.cpp applies them as the `rope_freqs` tensor.
ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(config) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default"))


def rope_frequency_factors(model, config) -> Optional[torch.Tensor]:
    """llama.cpp's `rope_freqs` (each frequency is divided by its factor) for linear / Llama-3 RoPE scaling, read
    off the frequencies the transformers model itself uses; None for plain RoPE."""
    if rope_type(config) == "default":
        return None
    rotary = model.get_decoder().rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UserError(f"export gguf: RoPE scaling '{rope_type(config)}' scales attention, which loraforge does not "
                        "write; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    used = getattr(rotary, "original_inv_freq", rotary.inv_freq).float()
    return (plain / used).to(torch.float32)


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotary layout (rotate half) to llama.cpp's
    (interleaved pairs): the inverse of the permutation HF's Llama conversion script applied."""
    out_dim = weight.shape[0]
    return (weight.reshape(n_head, 2, out_dim // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model, config):
    """(GGUF name, float32 tensor) for every weight, in llama.cpp's names and layout."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export gguf: the checkpoint has a tensor '{hf_name}' that llama.cpp's llama "
                            "architecture does not have; convert with llama.cpp's convert_hf_to_gguf.py")
        tensor = tensor.detach().to(torch.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, n_kv)
        yield name, tensor


def encode_tensor(tensor: torch.Tensor, out_type: str):
    """(numpy data, raw GGML type or None). Norm vectors stay float32, as llama.cpp expects."""
    import gguf

    data = tensor.numpy()
    if data.ndim == 1 or out_type == "f32":
        return data.astype(np.float32), None
    if out_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(merged, path: Path, out_type: str) -> GGUFResult:
    """Write `merged` (loraforge.export.merge.Merged) to `path`."""
    import gguf

    from loraforge.export.chat_template import training_chat_template

    if out_type not in GGUF_TYPES:
        raise UserError(f"--type {out_type}: choose one of {', '.join(GGUF_TYPES)}")
    if out_type in GGUF_LLAMA_CPP_TYPES:
        llama_cpp_quantizer(out_type)  # refuse before the work
    config = merged.model.config
    check_architecture(config, merged.name)
    n_vocab = merged.model.get_input_embeddings().weight.shape[0]
    vocab = vocabulary(merged.tokenizer_dir, merged.tokenizer, n_vocab, merged.name)
    chat_template = (training_chat_template(merged.template) if merged.template is not None
                     else getattr(merged.tokenizer, "chat_template", None))
    written_type = "f16" if out_type in GGUF_LLAMA_CPP_TYPES else out_type
    target = path.with_name(path.name + ".f16") if out_type in GGUF_LLAMA_CPP_TYPES else path

    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(merged.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[written_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.model == "llama":
        writer.add_add_space_prefix(space_after_special(merged.tokenizer))
    special = special_vocab(merged, n_vocab, load_merges=vocab.model == "gpt2")
    special.add_special_token.update(added_special_tokens(merged.tokenizer))
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    if merged.template is not None:  # `loraforge serve FILE.gguf` chats in exactly the training template
        from loraforge.infer.server.models import GGUF_TEMPLATE_KEY

        writer.add_string(GGUF_TEMPLATE_KEY, json.dumps(merged.template.record(), ensure_ascii=False))
    eot = end_of_turn_id(merged)
    if eot is not None:
        writer.add_eot_token_id(eot)

    count = 0
    factors = rope_frequency_factors(merged.model, config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
        count += 1
    for name, tensor in gguf_tensors(merged.model, config):
        data, raw_type = encode_tensor(tensor, written_type)
        writer.add_tensor(name, data, raw_dtype=raw_type)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if target != path:
        try:
            quantize_with_llama_cpp(target, path, out_type)
        finally:
            target.unlink(missing_ok=True)
    return GGUFResult(path=path, tensors=count, vocab_size=n_vocab, chat_template=chat_template, note=merged.note)


def llama_cpp_quantizer(out_type: str):
    """llama-cpp-python's binding of llama.cpp's quantizer, or a refusal saying how to get the file otherwise."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"export gguf --type {out_type}: llama.cpp's quantizer writes this type, and it comes with "
                        "llama-cpp-python, which is not installed: pip install llama-cpp-python (it compiles "
                        "llama.cpp), or export --type f16 and run llama.cpp's `llama-quantize model-f16.gguf "
                        f"model-{out_type}.gguf {out_type.upper()}`") from None
    return llama_cpp


def quantize_with_llama_cpp(source: Path, out: Path, out_type: str) -> None:
    """llama.cpp's own quantization of the f16 file `source` into `out` (its per-tensor type choices included)."""
    import os

    llama_cpp = llama_cpp_quantizer(out_type)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}[out_type]
    params.nthread = os.cpu_count() or 1
    llama_logger = logging.getLogger("llama-cpp-python")  # llama.cpp logs through it: a line per tensor
    previous = llama_logger.level
    llama_logger.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    finally:
        llama_logger.setLevel(previous)
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({status}) writing {out_type}; this is a bug in loraforge")


def load_merged_folder(folder: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A merged checkpoint folder (e.g. from `loraforge merge`) as a Merged, architecture checked before loading;
    code named in it (auto_map) runs only with `trust_remote_code` (the command line's flag)."""
    from transformers import AutoModelForCausalLM

    from loraforge.config import ModelSettings
    from loraforge.data.templates import template_from_record
    from loraforge.export.merge import Merged
    from loraforge.model.load import load_model_config, load_tokenizer
    from loraforge.rundir import TEMPLATE_FILE

    settings = ModelSettings(base=str(folder))
    settings._remote_code_allowed = trust_remote_code  # the folder has no config that could ask: the flag decides
    check_architecture(load_model_config(settings, str(folder)), str(folder))
    tokenizer = load_tokenizer(settings, str(folder))
    record_path = folder / TEMPLATE_FILE
    template = template_from_record(json.loads(record_path.read_text()), tokenizer) if record_path.is_file() else None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": "cpu"}, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # e.g. pickled weights only: loraforge loads safetensors
        raise UserError(f"export gguf: could not load the weights of {folder}: {first_line(e)}") from e
    return Merged(model=model, tokenizer=tokenizer, template=template, tokenizer_dir=folder,
                  name=folder.resolve().name)


def export_gguf(source, out, out_type: str = "f16", force: bool = False, trust_remote_code: bool = False) -> GGUFResult:
    """`loraforge export gguf`: a run directory (merged in memory, in float32) or a merged folder -> `out`. Code
    shipped with the model runs only with `trust_remote_code` (the command line's flag)."""
    from loraforge.export.merge import merge_run
    from loraforge.atomic import written_whole
    from loraforge.export.modelfile import modelfile_path
    from loraforge.export.paths import GGUF_MAGIC, check_output, check_replaceable_output
    from loraforge.infer.session import allow_run_code
    from loraforge.model.load import load_model_config
    from loraforge.rundir import CONFIG_FILE, read_run

    source = Path(source)
    if out_type not in GGUF_TYPES:
        raise UserError(f"--type {out_type}: choose one of {', '.join(GGUF_TYPES)}")
    if (source / "config.json").is_file() and not (source / CONFIG_FILE).is_file():
        out = check_output(out, force, magic=GGUF_MAGIC, command="loraforge export gguf")
        modelfile = check_output(modelfile_path(out), force, "the Modelfile")
        merged = load_merged_folder(source, trust_remote_code=trust_remote_code)
    else:
        info = read_run(source, finished=True)
        allow_run_code(info, trust_remote_code)
        check_architecture(load_model_config(info.cfg.model), f"the base of {source}")
        out = check_output(out, force, magic=GGUF_MAGIC, command="loraforge export gguf")
        modelfile = check_output(modelfile_path(out), force, "the Modelfile")
        merged = merge_run(info, torch.float32)
    with written_whole(out, before_replace=lambda: check_replaceable_output(out, "--out", magic=GGUF_MAGIC)) as tmp:
        result = write_gguf(merged, tmp, out_type)
    result.path = out
    result.modelfile, result.modelfile_note = write_modelfile(merged, out, modelfile)
    return result


def write_modelfile(merged, gguf_path: Path, path: Path) -> tuple[Path, Optional[str]]:
    """The Ollama Modelfile for the GGUF file at `gguf_path` (see export/modelfile.py); (its path, a note)."""
    from loraforge.atomic import written_whole
    from loraforge.data.templates import get_template
    from loraforge.export.modelfile import modelfile_text

    template = merged.template
    if template is None and getattr(merged.tokenizer, "chat_template", None):
        template = get_template("tokenizer", merged.tokenizer)
    text, note = modelfile_text(gguf_path.name, template, added_special_tokens(merged.tokenizer)["bos"],
                                getattr(merged.model.config, "max_position_embeddings", None))
    with written_whole(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path, note
