"""The agreement checks of test_agreement.py on the real default model (SmolLM2-135M-Instruct, byte-level BPE,
ChatML) after the short NF4 run of the default recipe: the adapter as chat/generate load it vs plain PEFT, the
merged float32 checkpoint vs the adapter on the float32 base, and the 4-bit run vs the merged model.

Its logits reach about 30 (the tiny model's 7), so tolerances are relative to the largest |logit|; NF4 rounds the
base's own weights, so the 4-bit run is held to top-1 agreement with the merged model rather than to its replies.
`pytest -s tests/export/test_agreement_smollm2.py | grep AGREEMENT` prints what was measured.
"""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from cli_runner import run_cli
from loraforge.infer.session import load_session

QUESTIONS = ["CREATE TABLE t (name TEXT, n INTEGER);\nINSERT INTO t VALUES ('a', 1), ('b', 5);\n"
             "Question: Which names have n above 3?", "What is the capital of France?"]
FORCED_TOKENS = 16


@pytest.fixture(scope="module")
def session(smollm2_short_run):
    return load_session(smollm2_short_run)  # the 4-bit base plus the adapter, as chat and generate load it


@pytest.fixture(scope="module")
def prompts(session):
    return [session.tokenizer(session.template.prompt([{"role": "user", "content": q}]), add_special_tokens=False,
                              return_tensors="pt").input_ids for q in QUESTIONS]


@pytest.fixture(scope="module")
def merged(smollm2_short_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged-smollm2"
    result = run_cli("merge", str(smollm2_short_run), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def forced_greedy(model, ids):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2,
                             min_new_tokens=FORCED_TOKENS, max_new_tokens=FORCED_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def measured(name: str, diffs: list[float], scale: float) -> None:
    print(f"AGREEMENT smollm2 {name}: largest logit difference {max(diffs):.2e} (largest |logit| {scale:.1f})")


def test_plain_peft_reload_gives_the_chat_models_outputs(session, prompts, smollm2_dir, smollm2_short_run):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": "cpu"})
    for module in base.modules():  # the exact-kernel setting training used (see model/load.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(base, smollm2_short_run / "adapter").eval()
    diffs, scale = [], 0.0
    for ids in prompts:
        mine, theirs = logits(session.model, ids), logits(plain, ids)
        diffs.append((mine - theirs).abs().max().item())
        scale = max(scale, mine.abs().max().item())
        assert diffs[-1] <= 1e-5 * scale
        assert forced_greedy(plain, ids) == forced_greedy(session.model, ids)
    measured("plain PeftModel reload vs chat model", diffs, scale)


def test_merged_checkpoint_equals_the_adapter_on_the_same_float32_base(merged, prompts, smollm2_dir,
                                                                       smollm2_short_run):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, smollm2_short_run / "adapter").eval()
    diffs, scale = [], 0.0
    for ids in prompts:
        exact = logits(plain, ids)
        diffs.append((logits(merged, ids) - exact).abs().max().item())
        scale = max(scale, exact.abs().max().item())
        assert diffs[-1] <= 1e-4 * scale
        assert forced_greedy(merged, ids) == forced_greedy(plain, ids)
    measured("merged vs adapter on the float32 base", diffs, scale)


def agreement(quantized_model, exact_model, prompts) -> tuple[float, float, float, float]:
    """(top-1 agreement over the prompt positions, mean KL(exact || quantized) per position, largest logit
    difference, largest |logit|)."""
    agree = total = 0
    diffs, kls, scale = [], [], 0.0
    for ids in prompts:
        quantized, exact = logits(quantized_model, ids), logits(exact_model, ids)
        diffs.append((quantized - exact).abs().max().item())
        scale = max(scale, exact.abs().max().item())
        kl = torch.nn.functional.kl_div(quantized.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        kls.append(kl.mean().item())
        agree += (quantized.argmax(-1) == exact.argmax(-1)).sum().item()
        total += ids.shape[1]
    return agree / total, sum(kls) / len(kls), max(diffs), scale


def test_the_4bit_run_agrees_with_the_merged_model_as_closely_as_nf4_rounding_allows(merged, session, prompts,
                                                                                    smollm2_dir):
    tuned_agree, tuned_kl, diff, scale = agreement(session.model, merged, prompts)
    # The same measure with no adapter at all: the NF4 base against the float32 base it was rounded from.
    exact_base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with session.model.disable_adapter():
        base_agree, base_kl, _, _ = agreement(session.model, exact_base, prompts)
    print(f"AGREEMENT smollm2 NF4 vs merged: top-1 {tuned_agree:.0%}, mean KL(merged || NF4) {tuned_kl:.3f} nats; "
          f"NF4 base vs float32 base (no adapter): top-1 {base_agree:.0%}, mean KL {base_kl:.3f} nats")
    measured(f"NF4 adapter vs merged float32 (top-1 agreement {tuned_agree:.0%})", [diff], scale)
    # Measured 2026-12-02: 57% / 1.22 nats with the adapter, 60% / 1.17 nats for the base alone - NF4's rounding
    # of a 135M model's weights (already 4-bit Q4_1 in the GGUF) is the whole gap; int8 gives 90% / 0.06
    # (README "How closely they agree"). Training, merging and reloading must add nothing measurable to it.
    assert tuned_agree >= base_agree - 0.05
    assert tuned_kl <= 1.2 * base_kl + 0.05
    assert tuned_agree >= 0.5 and tuned_kl < 2.0  # and the rounding itself did not get worse
