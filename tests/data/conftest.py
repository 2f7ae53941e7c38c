"""Fixtures for the data stage: the tiny model's Llama-2 tokenizer (from tests/conftest.py), a
Llama-3-like byte-level tokenizer with real special tokens, and small file writers."""
import json
import os
import tempfile

import pytest

# datasets reads these when first imported: keep its cache out of the user's home, and stay offline.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="loraforge-test-datasets-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def tok(tiny_tokenizer):
    """Llama-2 style: SentencePiece BPE with byte fallback, <s>/</s>, Meta's chat template."""
    return tiny_tokenizer


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer(llama3_split: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("the answer is a question what how why code data model train write list python sql table "
             "select where count name value first hello world please explain more then").split()
    lines = [" ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 9)) + ("?" if i % 3 else ".")
             for i in range(300)]
    t = Tokenizer(models.BPE())
    if llama3_split:  # as Llama 3's tokenizer.json: its own split pattern, then bytes
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's pattern
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(lines + ["\n\n", "\n"] * 20, trainers.BpeTrainer(
        vocab_size=600, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   additional_special_tokens=LLAMA3_SPECIALS[2:])


@pytest.fixture(scope="session")
def bl_tok():
    """Llama-3 style: byte-level BPE with Llama 3's split pattern, BOS <|begin_of_text|>, EOS
    <|end_of_text|>, <|eot_id|> etc. as single special tokens, no chat template."""
    return byte_level_tokenizer(llama3_split=True)


@pytest.fixture(scope="session")
def gpt2_split_tok():
    """Like bl_tok but with GPT-2's split pattern, which cuts "\\n\\nThe" as "\\n", "\\n", "The"."""
    return byte_level_tokenizer(llama3_split=False)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name, rows, raw_lines=None):
        path = tmp_path / name
        lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return write
