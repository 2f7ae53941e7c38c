"""The tokenizer half of a GGUF file: the vocabulary (SentencePiece with scores, or byte-level BPE with merges
and the pre-tokenizer identity llama.cpp needs), token types and the special tokens, read from the tokenizer
the run trained with. export/gguf.py writes them beside the weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.errors import UserError


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre: how llama.cpp splits text before BPE
    tokens: list
    types: list
    scores: Optional[list] = None  # SentencePiece only


# Byte-level BPE pre-tokenizers (tokenizer.json) that llama.cpp reproduces, by its `tokenizer.ggml.pre` name:
# the split regex (None: GPT-2's, inside ByteLevel), whether digits are split one by one first, and whether the
# BPE model skips merges for words already in the vocabulary (llama.cpp does so for llama-bpe only).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
BPE_PRE_TOKENIZERS = {
    # (split regex, digits split one by one, ignore_merges): llama.cpp name, the models that use it
    (LLAMA3_REGEX, False, True): ("llama-bpe", "Llama 3"),
    (QWEN2_REGEX, False, False): ("qwen2", "Qwen2"),
    (None, True, False): ("smollm", "SmolLM/SmolLM2"),
    (None, False, False): ("gpt-2", "GPT-2"),
}


def _pre_tokenizer_steps(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def bpe_pre_tokenizer(spec: dict, where: str) -> str:
    """llama.cpp's name for the tokenizer.json's normalizer + pre-tokenizer, or a refusal."""
    unsupported = (f"export gguf: the byte-level BPE tokenizer of {where} splits text in a way loraforge cannot "
                   "name for llama.cpp ({}); loraforge writes the pre-tokenizers of "
                   + ", ".join(f"{models} ({name})" for name, models in BPE_PRE_TOKENIZERS.values())
                   + ". Convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if spec.get("normalizer") not in (None, {}) and not (spec["normalizer"].get("type") == "NFC"):
        raise UserError(unsupported.format(f"normalizer {spec['normalizer'].get('type')}"))
    regex, digits, byte_level = None, False, None
    for step in _pre_tokenizer_steps(spec):
        kind = step.get("type")
        if kind == "Split" and regex is None and byte_level is None and "Regex" in (step.get("pattern") or {}) \
                and step.get("behavior") == "Isolated" and not step.get("invert"):
            regex = step["pattern"]["Regex"]
        elif kind == "Digits" and step.get("individual_digits") and not digits and byte_level is None:
            digits = True
        elif kind == "ByteLevel" and byte_level is None and not step.get("add_prefix_space"):
            byte_level = step
        else:
            raise UserError(unsupported.format(f"pre-tokenizer step {json.dumps(step)[:120]}"))
    if byte_level is None or (regex is None) != bool(byte_level.get("use_regex", True)):
        raise UserError(unsupported.format("not GPT-2-style byte-level"))
    key = (regex, digits, bool(spec["model"].get("ignore_merges", False)))
    if key not in BPE_PRE_TOKENIZERS or (spec.get("normalizer") and BPE_PRE_TOKENIZERS[key][0] != "qwen2"):
        raise UserError(unsupported.format(f"split {regex!r}, digits one by one: {digits}, "
                                           f"ignore_merges: {key[2]}"))
    return BPE_PRE_TOKENIZERS[key][0]


def bpe_vocabulary(tokenizer, n_vocab: int, where: str) -> Vocabulary:
    """Tokens and types of a byte-level BPE tokenizer.json, padded to the embedding's rows: added tokens as control
    (special) or user-defined, vocabulary entries as normal, missing ids as unused [PADn]."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise UserError(f"export gguf: {where} has neither a SentencePiece tokenizer.model nor a GPT-2-style "
                        "byte-level BPE tokenizer.json (the two kinds loraforge writes); convert the merged folder "
                        "with llama.cpp's convert_hf_to_gguf.py")
    pre = bpe_pre_tokenizer(spec, where)
    pieces = {token_id: piece for piece, token_id in model["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    largest = max([*pieces, *added])
    if largest >= n_vocab:
        raise UserError(f"export gguf: the tokenizer has ids up to {largest} but the model's embedding only "
                        f"{n_vocab} rows; the tokenizer does not belong to this model")
    tokens, types = [], []
    for token_id in range(n_vocab):
        if token_id in added:
            tokens.append(added[token_id]["content"])
            types.append(gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED)
        elif token_id in pieces:
            tokens.append(pieces[token_id])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    return Vocabulary(model="gpt2", pre=pre, tokens=tokens, types=types)


def vocabulary(tokenizer_dir: Path, tokenizer, n_vocab: int, where: str = "the checkpoint") -> Vocabulary:
    """The SentencePiece vocabulary when the base has a tokenizer.model, else the byte-level BPE one."""
    from loraforge.export.merge import sentencepiece_file

    spm = sentencepiece_file(tokenizer_dir)
    if spm is None:
        return bpe_vocabulary(tokenizer, n_vocab, where)
    return sentencepiece_vocabulary(spm, tokenizer, n_vocab)


def sentencepiece_vocabulary(spm: Path, tokenizer, n_vocab: int) -> Vocabulary:
    """Tokens, scores and types from the SentencePiece model, padded to the embedding's rows like llama.cpp's
    converter (added tokens as user-defined or control, unknown rows as unused [PADn])."""
    import gguf

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
    return Vocabulary(model="llama", pre="default", tokens=tokens, scores=scores, types=types)


def added_special_tokens(tokenizer) -> dict:
    """Whether the tokenizer adds BOS / EOS to plain text (llama.cpp's add_bos_token / add_eos_token), as measured."""
    with_special = tokenizer("x").input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and with_special[:1] == [bos] and plain[:1] != [bos],
            "eos": eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]}


def end_of_turn_id(merged) -> Optional[int]:
    """The training template's end-of-turn token when it is a single token other than EOS (llama.cpp stops there)."""
    if merged.template is None:
        return None
    ids = [i for i in merged.template.stop_token_ids if i != merged.tokenizer.eos_token_id]
    return ids[0] if ids else None


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


def special_vocab(merged, n_vocab: int, load_merges: bool = False):
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
            return gguf.SpecialVocab(Path(tmp), load_merges=load_merges, n_vocab=n_vocab)
    finally:
        logging.getLogger("gguf").setLevel(previous)
