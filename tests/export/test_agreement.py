"""Every artifact of a run computes the same model: the adapter as chat/generate load it, the adapter reloaded
with plain PEFT, the merged checkpoint with plain transformers, and the GGUF file with transformers' GGUF loader.

Tolerances (max |logit difference|, logits of the tiny model reach |5|), measured after the 24-step short run:
- same base weights (PEFT on the 4-bit base, or adapter vs merged on the float32 base): measured <= 1e-6,
  asserted 1e-4, and identical greedy tokens;
- 4-bit adapter vs merged float32: measured 0.05-0.16, mean 0.009 against the adapter's own effect of mean
  0.36; asserted max 0.3, mean under a tenth of the adapter's effect, 90% top-1 agreement (measured 97%),
  and the same greedy replies;
- GGUF f16 vs merged: measured 3e-4, asserted 2e-3, and 32 identical greedy tokens;
- GGUF q8_0 vs merged: measured 1e-2, asserted 5e-2, and the same greedy replies.
"""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from cli_runner import run_cli
from loraforge.infer.session import load_session

QUESTIONS = ["How can I make my writing more concise?", "What is the capital of France?",
             "Give me three tips for sleeping better."]
FORCED_TOKENS = 32  # greedy continuations with EOS suppressed, to compare more than a short reply


@pytest.fixture(scope="module")
def merged_dir(short_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    result = run_cli("merge", str(short_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "not the 4-bit nf4 weights used in training" in result.stdout
    return out


@pytest.fixture(scope="module")
def gguf_f16(short_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "run-f16.gguf"
    result = run_cli("export", "gguf", str(short_run), "--out", str(out))  # straight from the run directory
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def gguf_q8(merged_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "merged-q8_0.gguf"
    result = run_cli("export", "gguf", str(merged_dir), "--out", str(out), "--type", "q8_0")  # from the merged folder
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def session(short_run):
    return load_session(short_run)  # what chat and generate use: the 4-bit base plus the adapter


@pytest.fixture(scope="module")
def merged(merged_dir):
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(session):
    return [session.tokenizer(session.template.prompt([{"role": "user", "content": q}]), add_special_tokens=False,
                              return_tensors="pt").input_ids for q in QUESTIONS]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def greedy(model, ids, forced: bool = False, eos=2):
    kw = dict(min_new_tokens=FORCED_TOKENS, max_new_tokens=FORCED_TOKENS) if forced else dict(max_new_tokens=48)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=eos,
                             pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_plain_peft_reload_gives_the_chat_models_outputs(session, prompts, tiny_model_dir, short_run):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    for module in base.modules():  # the same exact-kernel setting training used (see model/load.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(base, short_run / "adapter").eval()
    diffs = []
    for ids in prompts:
        diffs.append((logits(plain, ids) - logits(session.model, ids)).abs().max().item())
        assert torch.allclose(logits(plain, ids), logits(session.model, ids), rtol=0, atol=1e-5)
        assert greedy(plain, ids, forced=True) == greedy(session.model, ids, forced=True)
    measured("plain PeftModel reload vs chat model", diffs)


def measured(name: str, diffs: list[float]) -> None:
    """What README's agreement table reports: `pytest -s tests/export/test_agreement.py | grep AGREEMENT`."""
    print(f"AGREEMENT {name}: largest logit difference {max(diffs):.2e}")


def test_merged_checkpoint_equals_the_adapter_on_the_same_float32_base(merged, prompts, tiny_model_dir, short_run):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, short_run / "adapter").eval()
    diffs = []
    for ids in prompts:
        diffs.append((logits(merged, ids) - logits(plain, ids)).abs().max().item())
        assert diffs[-1] < 1e-4
        assert greedy(merged, ids, forced=True) == greedy(plain, ids, forced=True)
    measured("merged vs adapter on the float32 base", diffs)
    assert merged.config.use_cache and not hasattr(merged, "peft_config")


def test_merged_is_close_to_the_4bit_adapter_run(merged, session, prompts, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    agree = total = 0
    diffs, means, effects = [], [], []
    for ids in prompts:
        reply = greedy(merged, ids)
        full = torch.cat([ids, torch.tensor([reply])], dim=1)
        quantized, exact, untuned = logits(session.model, full), logits(merged, full), logits(base, full)
        error, effect = (quantized - exact).abs(), (untuned - exact).abs()
        diffs.append(error.max().item()), means.append(error.mean().item()), effects.append(effect.mean().item())
        assert error.max() < 0.5
        assert error.mean() < effect.mean() / 10, "4-bit rounding must be far smaller than what the adapter learned"
        agree += (quantized.argmax(-1) == exact.argmax(-1)).sum().item()
        total += full.shape[1]
        assert greedy(session.model, ids) == reply
    measured(f"NF4 adapter vs merged float32 (mean {sum(means) / len(means):.3f}, adapter effect mean "
             f"{sum(effects) / len(effects):.3f}, top-1 agreement {agree / total:.0%})", diffs)
    assert agree / total >= 0.9


def test_gguf_f16_loads_in_transformers_and_matches_the_merged_model(gguf_f16, merged, prompts):
    model = AutoModelForCausalLM.from_pretrained(gguf_f16.parent, gguf_file=gguf_f16.name, dtype=torch.float32).eval()
    diffs = []
    for ids in prompts:
        diffs.append((logits(model, ids) - logits(merged, ids)).abs().max().item())
        assert diffs[-1] < 4e-3
        assert greedy(model, ids, forced=True) == greedy(merged, ids, forced=True)
    scale = max(logits(merged, ids).abs().max().item() for ids in prompts)
    measured(f"GGUF f16 (transformers) vs merged (largest |logit| {scale:.1f})", diffs)


def test_gguf_q8_0_is_close_to_the_merged_model(gguf_q8, gguf_f16, merged, prompts):
    model = AutoModelForCausalLM.from_pretrained(gguf_q8.parent, gguf_file=gguf_q8.name, dtype=torch.float32).eval()
    diffs = []
    for ids in prompts:
        diffs.append((logits(model, ids) - logits(merged, ids)).abs().max().item())
        assert diffs[-1] < 1e-1
        assert greedy(model, ids) == greedy(merged, ids)
    measured("GGUF q8_0 vs merged", diffs)
    assert gguf_q8.stat().st_size < 0.6 * gguf_f16.stat().st_size


def test_gguf_carries_the_vocabulary_special_tokens_and_chat_template(gguf_f16, merged_dir, session):
    import gguf

    reader = gguf.GGUFReader(gguf_f16)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.attention.head_count")) == (4, 256, 4)
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert field("tokenizer.ggml.add_bos_token") is True
    assert len(field("tokenizer.ggml.tokens")) == 3000
    assert set(field("tokenizer.ggml.token_type")) >= {int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL),
                                                       int(gguf.TokenType.BYTE), int(gguf.TokenType.UNKNOWN)}

    tokenizer = AutoTokenizer.from_pretrained(gguf_f16.parent, gguf_file=gguf_f16.name)
    original = AutoTokenizer.from_pretrained(merged_dir)
    text = "Hello world,   how are you?\n12 caf\u00e9s \U0001f642 [INST] done"
    assert tokenizer(text).input_ids == original(text).input_ids
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    training_prompt = session.template.prompt(conversation)
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == training_prompt
    assert original.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == training_prompt


def test_merged_folder_is_a_plain_checkpoint(merged_dir):
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "template.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
