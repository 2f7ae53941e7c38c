"""The built-in tiny model (`model.base: tiny`): a random Llama-2-style chat checkpoint built locally, once.

It is a normal Hugging Face checkpoint folder (config, safetensors weights, `tokenizer.model`,
`tokenizer.json`, chat template), so loading, 4-bit quantization, LoRA, merging and GGUF export
treat it exactly like a real Llama-2 chat model. The weights are random (fixed seed); the
tokenizer is a SentencePiece BPE with byte fallback, trained on the bundled demo data with
Llama-2's trainer options, and special ids `<unk>`=0, `<s>`=1, `</s>`=2 like Llama-2.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Optional

from loraforge.model.cache import build_once, loraforge_home
from loraforge.model.cache import is_complete as cache_is_complete
from loraforge.model.quiet import quiet_progress_bars

TINY_MODEL_NAME = "tiny-llama-v2"  # v2: the output head drawn wider (HEAD_INIT_STD)
_TINY_ALIASES = {"tiny", TINY_MODEL_NAME, f"loraforge/{TINY_MODEL_NAME}"}
DEMO_DATA = Path(__file__).resolve().parent.parent / "assets" / "demo_chat.jsonl"

# A complete build has all of these; the folder only ever appears complete (renamed into place).
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                  "tokenizer.json", "tokenizer_config.json")

VOCAB_SIZE = 3000  # an upper bound: a small corpus supports fewer pieces (hard_vocab_limit=False)
# Every linear dimension is a multiple of 256: bitsandbytes' CPU 4-bit inference needs multiples
# of 32 (688, Llama's 2.6875 ratio, fails) and llama.cpp's k-quants need rows of 256.
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=1024)

# The output head stays frozen under LoRA. At the usual std of 0.02 a 256-wide random head gives the
# largest logit a normalized hidden state can reach about 5, so no adapter can push the loss far
# below ln(vocab) and the demo would not visibly learn; at 0.1 it can (trained heads are that wide).
HEAD_INIT_STD = 0.1

# Markers of the Llama-2 chat format: removed from the tokenizer's training text, so that they do
# not dominate the merges (Llama-2's own vocabulary has no single piece for them either).
_CHAT_MARKERS = re.compile(r"<s>|</s>|\[INST\]|\[/INST\]|<<SYS>>|<</SYS>>")

# A little plain English, so the vocabulary is sensible even if the demo data shrinks, and one
# line that puts the marker characters in the alphabet (they still need no byte fallback).
_SEED_TEXT = """\
The quick brown fox jumps over the lazy dog.
Please answer the question below in a few short sentences.
I am sorry, but I do not know the answer to that question.
Here is a short summary of the main points, followed by an example.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 are written with digits.
Chat markers look like [INST], [/INST], <<SYS>> and <</SYS>>.
"""

# Meta's Llama-2 chat format (the reference `chat_completion` code): the system prompt is folded
# into the first user turn, every exchange is `<s>[INST] {user} [/INST] {assistant} </s>`.
# Contents are stripped, as in Meta's code and loraforge.data.templates. A prompt for the next
# reply already ends with ` [/INST]`, so add_generation_prompt needs to add nothing.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is not none -%}"
    "{{- bos_token + '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def is_tiny(base: Optional[str]) -> bool:
    """Whether a `model.base` setting names the embedded tiny model (None is the real default model)."""
    return base in _TINY_ALIASES


def tiny_model_dir() -> Path:
    return loraforge_home() / "models" / TINY_MODEL_NAME


def is_complete(path: Path) -> bool:
    return cache_is_complete(path, REQUIRED_FILES)


def ensure_tiny_model() -> Path:
    """The tiny checkpoint's folder, built on first use (atomically: see `cache.build_once`)."""
    return build_once(tiny_model_dir(), lambda out_dir: build_tiny_model(out_dir), REQUIRED_FILES)


def build_tiny_model(out_dir: Path) -> None:
    """Write the tokenizer and the fixed-seed model into `out_dir`."""
    spm_proto = train_sentencepiece(corpus_lines())
    (out_dir / "tokenizer.model").write_bytes(spm_proto)
    tokenizer = _save_hf_tokenizer(out_dir)
    _save_model(out_dir, vocab_size=len(tokenizer))


def corpus_lines(path: Path = DEMO_DATA) -> list[str]:
    """The tokenizer's training text: the demo conversations without chat markers, plus the seed text."""
    lines = _SEED_TEXT.splitlines()
    if path.is_file():
        for row in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(row).get("text", "") if row.strip() else ""
            for piece in _CHAT_MARKERS.sub("\n", text).splitlines():
                if piece.strip():
                    lines.append(piece.strip())
    return lines


def train_sentencepiece(lines: list[str]) -> bytes:
    """A serialized SentencePiece BPE model with Llama-2's trainer options, deterministic."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="bpe", vocab_size=VOCAB_SIZE, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=0.99995, max_sentencepiece_length=16, unk_surface=" \u2047 ",
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _save_hf_tokenizer(out_dir: Path):
    """Convert `tokenizer.model` with transformers' Llama tokenizer and save its files next to it."""
    from transformers import LlamaTokenizer

    # transformers 5 defaults (legacy=False: no extra "▁" after special tokens), the same as a real
    # Llama-2 checkpoint gets from it; `legacy` would not survive save_pretrained anyway. Adding BOS
    # is kept in tokenizer.json's post-processor (tokenizer_config.json no longer records it).
    tokenizer = LlamaTokenizer.from_pretrained(
        str(out_dir), add_bos_token=True, add_eos_token=False,
        pad_token="<unk>", padding_side="right",  # a pad token that does not grow the vocabulary
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _save_model(out_dir: Path, vocab_size: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, **MODEL_SHAPE, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, HEAD_INIT_STD)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with quiet_progress_bars():
        model.save_pretrained(str(out_dir))  # safetensors, the only format transformers 5 writes
