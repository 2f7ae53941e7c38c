"""Which tokenizers and models the GGUF writer accepts, and the refusals (reason + alternative) for the rest.
llama.cpp's agreement on what is accepted is tested in test_gguf_llama_cpp.py."""
import json
import shutil
import sys

import pytest
from transformers import LlamaConfig

from cli_runner import run_cli
from loraforge.errors import UserError
from loraforge.export.gguf import check_architecture, llama_cpp_quantizer
from loraforge.export.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX, bpe_pre_tokenizer


def spec(*steps, ignore_merges=False, normalizer=None):
    return {"normalizer": normalizer, "pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)},
            "model": {"type": "BPE", "ignore_merges": ignore_merges}}


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


DIGITS = {"type": "Digits", "individual_digits": True}


def test_known_byte_level_pre_tokenizers_get_llama_cpp_names():
    assert bpe_pre_tokenizer(spec(split(LLAMA3_REGEX), byte_level(False), ignore_merges=True), "m") == "llama-bpe"
    assert bpe_pre_tokenizer(spec(DIGITS, byte_level(True)), "m") == "smollm"
    assert bpe_pre_tokenizer(spec(byte_level(True)), "m") == "gpt-2"
    assert bpe_pre_tokenizer(spec(split(QWEN2_REGEX), byte_level(False), normalizer={"type": "NFC"}), "m") == "qwen2"


@pytest.mark.parametrize("bad", [
    spec(split(LLAMA3_REGEX), byte_level(False)),  # Llama 3's split without ignore_merges: llama.cpp would differ
    spec(split(r"\s+"), byte_level(False)),  # a split llama.cpp has no name for
    spec({"type": "Metaspace", "replacement": "\u2581"}),  # not byte-level
    spec(DIGITS, byte_level(True), normalizer={"type": "Lowercase"}),
    spec(byte_level(False)),  # byte-level without any split
])
def test_other_pre_tokenizers_are_refused_with_the_alternative(bad):
    with pytest.raises(UserError, match="splits text in a way.*llama-bpe.*convert_hf_to_gguf.py"):
        bpe_pre_tokenizer(bad, "m")


def test_rope_scaling_that_scales_attention_is_refused():
    config = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(UserError, match="RoPE scaling 'yarn'.*default, linear, llama3.*convert_hf_to_gguf.py"):
        check_architecture(config, "m")


def test_k_quants_without_llama_cpp_python_say_how_to_get_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(UserError, match="pip install llama-cpp-python.*llama-quantize model-f16.gguf model-q4_k_m"):
        llama_cpp_quantizer("q4_k_m")


def test_cli_refuses_a_tokenizer_it_cannot_write(llama3_dir, tmp_path):
    folder = tmp_path / "wordlevel"
    shutil.copytree(llama3_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = run_cli("export", "gguf", str(folder), "--out", str(tmp_path / "x.gguf"), "--type", "q8_0")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "convert_hf_to_gguf.py" in result.stderr
    assert not (tmp_path / "x.gguf").exists()
