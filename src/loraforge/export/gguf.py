"""Write a Llama checkpoint (a run's merged model, or a merged folder) as a GGUF file for llama.cpp.

Written with the `gguf` package, llama.cpp's own writer: architecture metadata, the SentencePiece
vocabulary with scores and token types, special tokens and the training chat template, and the weights
in llama.cpp's tensor names and layout (f32, f16 or q8_0).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from loraforge.errors import UserError
from loraforge.export import GGUF_TYPES

SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"


@dataclass
class GGUFResult:
    path: Path
    tensors: int
    vocab_size: int
    chat_template: Optional[str]
    note: Optional[str]


def check_architecture(config, where: str) -> None:
    """Only plain Llama checkpoints: their tensors map one to one onto llama.cpp's `llama` architecture."""
    architectures = list(getattr(config, "architectures", None) or [])
    if SUPPORTED_ARCHITECTURE not in architectures or getattr(config, "model_type", None) != "llama":
        found = ", ".join(architectures) or getattr(config, "model_type", None) or "unknown"
        raise UserError(f"export gguf: {where} is a {found} model; loraforge writes GGUF for {SUPPORTED_ARCHITECTURE} "
                        "(Llama-2-style) checkpoints only. Merge it with `loraforge merge` and convert the merged "
                        "folder with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"export gguf: {where} uses RoPE scaling '{rope.get('rope_type', rope.get('type'))}', which "
                        "loraforge does not write; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError(f"export gguf: {where} has bias terms in its linear layers, which loraforge does not write; "
                        "convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


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


def vocabulary(tokenizer_dir: Path, tokenizer, n_vocab: int):
    """Tokens, scores and types from the SentencePiece model, padded to the embedding's rows like llama.cpp's
    converter (added tokens as user-defined or control, unknown rows as unused [PADn])."""
    import gguf

    from loraforge.export.merge import sentencepiece_file

    spm = sentencepiece_file(tokenizer_dir)
    if spm is None:
        raise UserError(f"export gguf: no SentencePiece tokenizer.model in {tokenizer_dir}; loraforge writes "
                        "Llama-2-style SentencePiece vocabularies only. For other tokenizers convert the merged "
                        "folder with llama.cpp's convert_hf_to_gguf.py")
    vocab = gguf.SentencePieceVocab(spm.parent)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise UserError(f"export gguf: the tokenizer has {len(tokens)} tokens but the model's embedding only "
                        f"{n_vocab} rows; the tokenizer does not belong to this model")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id in range(len(tokens), n_vocab):
        piece = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if piece is None:
            tokens.append(f"[PAD{token_id}]".encode())
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(piece.encode("utf-8"))
            types.append(gguf.TokenType.CONTROL if token_id in special else gguf.TokenType.USER_DEFINED)
        scores.append(-1000.0)
    return tokens, scores, types


def write_gguf(merged, path: Path, out_type: str) -> GGUFResult:
    """Write `merged` (loraforge.export.merge.Merged) to `path`."""
    import gguf

    from loraforge.export.chat_template import training_chat_template

    if out_type not in GGUF_TYPES:
        raise UserError(f"--type {out_type}: choose one of {', '.join(GGUF_TYPES)}")
    config = merged.model.config
    check_architecture(config, merged.name)
    n_vocab = merged.model.get_input_embeddings().weight.shape[0]
    tokens, scores, types = vocabulary(merged.tokenizer_dir, merged.tokenizer, n_vocab)
    chat_template = (training_chat_template(merged.template) if merged.template is not None
                     else getattr(merged.tokenizer, "chat_template", None))

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
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
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_after_special(merged.tokenizer))
    special = _special_vocab(merged, n_vocab)
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)

    count = 0
    for name, tensor in gguf_tensors(merged.model, config):
        data, raw_type = encode_tensor(tensor, out_type)
        writer.add_tensor(name, data, raw_dtype=raw_type)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFResult(path=path, tensors=count, vocab_size=n_vocab, chat_template=chat_template, note=merged.note)


def space_after_special(tokenizer) -> bool:
    """Whether text after a special token starts with SentencePiece's "▁" (llama.cpp's add_space_prefix).

    Chat prompts start with BOS, so this decides the first token of every turn: transformers' current
    Llama tokenizers (legacy=False) add no space there, older ones do; llama.cpp must do as training did.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return True
    pieces = tokenizer.tokenize(f"{bos}x")
    return len(pieces) > 1 and pieces[1].startswith("\u2581")


def _special_vocab(merged, n_vocab: int):
    """BOS/EOS/UNK/PAD ids and whether BOS/EOS are added, from the tokenizer files (gguf's reader)."""
    import tempfile

    import gguf

    previous = logging.getLogger("gguf").level
    logging.getLogger("gguf").setLevel(logging.ERROR)  # it warns about template details it does not need
    try:
        with tempfile.TemporaryDirectory() as tmp:
            merged.tokenizer.save_pretrained(tmp)  # the tokenizer as used in training, pad token included
            config = {"bos_token_id": merged.tokenizer.bos_token_id, "eos_token_id": merged.tokenizer.eos_token_id}
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            return gguf.SpecialVocab(Path(tmp), n_vocab=n_vocab)
    finally:
        logging.getLogger("gguf").setLevel(previous)


def load_merged_folder(folder: Path, dtype: torch.dtype = torch.float32):
    """A merged checkpoint folder (e.g. from `loraforge merge`) as a Merged, architecture checked before loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.config import ModelSettings
    from loraforge.data.templates import template_from_record
    from loraforge.export.merge import Merged
    from loraforge.model.load import load_tokenizer
    from loraforge.rundir import TEMPLATE_FILE

    check_architecture(AutoConfig.from_pretrained(folder), str(folder))
    tokenizer = load_tokenizer(ModelSettings(base=str(folder)), str(folder))
    record_path = folder / TEMPLATE_FILE
    template = template_from_record(json.loads(record_path.read_text()), tokenizer) if record_path.is_file() else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": "cpu"})
    return Merged(model=model, tokenizer=tokenizer, template=template, tokenizer_dir=folder,
                  name=folder.resolve().name)


def export_gguf(source, out, out_type: str = "f16", force: bool = False) -> GGUFResult:
    """`loraforge export gguf`: a run directory (merged in memory, in float32) or a merged folder -> `out`."""
    from transformers import AutoConfig

    from loraforge.export.merge import merge_run
    from loraforge.atomic import written_whole
    from loraforge.export.paths import check_output
    from loraforge.model.load import resolve_base
    from loraforge.rundir import CONFIG_FILE, read_run

    source = Path(source)
    if out_type not in GGUF_TYPES:
        raise UserError(f"--type {out_type}: choose one of {', '.join(GGUF_TYPES)}")
    if (source / "config.json").is_file() and not (source / CONFIG_FILE).is_file():
        out = check_output(out, force)
        merged = load_merged_folder(source)
    else:
        info = read_run(source, finished=True)
        check_architecture(AutoConfig.from_pretrained(resolve_base(info.cfg.model)), f"the base of {source}")
        out = check_output(out, force)
        merged = merge_run(info, torch.float32)
    with written_whole(out) as tmp:
        result = write_gguf(merged, tmp, out_type)
    result.path = out
    return result
