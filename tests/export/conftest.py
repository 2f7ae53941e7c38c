"""Fixtures for the export tests: the real SmolLM2-135M-Instruct as a plain transformers checkpoint, and one short
NF4 LoRA run of it through the CLI.
`smollm2_dir` (tests/conftest.py) is the default model's own build (loraforge.model.smollm2).
"""
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli

SMOLLM2_RUN_STEPS = 2


@pytest.fixture(scope="session")
def smollm2_run(smollm2_dir, tmp_path_factory) -> Path:
    """A short NF4 LoRA fine-tune of the real model on the bundled chat data, in the tokenizer's own template."""
    run_dir = tmp_path_factory.mktemp("runs") / "smollm2"
    result = run_cli("train", "tiny", "--set", f"model.base={smollm2_dir}", "--set", "data.template=tokenizer",
                     "--set", f"train.max_steps={SMOLLM2_RUN_STEPS}", "--set", "train.learning_rate=1e-3",
                     "--set", "train.lr_scheduler=constant", "--set", "train.warmup_ratio=0",
                     "--set", "data.max_length=128", "--set", "train.micro_batch_size=2", "--set", "samples=0",
                     "--set", "train.eval_steps=1000", "--set", "train.save_steps=1000",
                     "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


LLAMA3_FIT_STEPS = 60
# The Llama-3-shaped model's test questions with the answers it is fitted on (as a fine-tune answers what it was
# trained on): a random model fitted on the demo texts alone meets near-ties (top-2 logit margins ~1e-3) within 32
# greedy tokens, where f16 rounding (logit error ~0.02) picks either; fitted answers have margins of several logits.
LLAMA3_CHATS = [
    ("What causes thunder?", "Lightning heats the air so fast that it expands with a loud bang."),
    ("Write SELECT * FROM t;", "SELECT * FROM t;"),
    ("Count: 1 2 3 4 5", "6 7 8 9 10"),
    ("Ça va? 😀", "Ça va bien, merci! 😀"),
    ("  spaced  out ", "The text has runs of spaces around two words."),
    ("def f(x):\n    return x", "This function returns its argument unchanged."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("Translate 'hello' to French.", "Bonjour."),
    ("ok", "Glad to help."),
    ("Name 3 colours.", "Red, green and blue."),
    # long enough for Llama 3's RoPE scaling to matter (its factors change every frequency with a wavelength > 16)
    (" ".join(["The weather today is mild."] * 20), "Yes, the weather is mild today."),
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_llama3_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained here with Llama 3's pre-tokenizer (its split regex, then ByteLevel without
    GPT-2's regex), ignore_merges, its special tokens, and BOS added by the post-processor like Llama 3's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from loraforge.export.gguf_vocab import LLAMA3_REGEX

    backend = Tokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")


def build_tiny_llama3(out: Path) -> Path:
    """A tiny random Llama-3-shaped checkpoint: GQA (4 query heads, 2 key/value heads), Llama 3 RoPE scaling,
    tied embeddings, an embedding wider than the vocabulary (unused rows), and the BPE tokenizer above."""
    import json as _json

    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.data.templates import get_template
    from loraforge.model.tiny import DEMO_DATA
    from tokenizer_corpus import CODE, NUMBERS, PROSE, UNICODE, WHITESPACE

    texts = [_json.loads(line)["text"] for line in DEMO_DATA.read_text().splitlines() if line.strip()]
    tokenizer = build_llama3_tokenizer(texts + PROSE + CODE + NUMBERS + UNICODE + WHITESPACE)
    tokenizer.chat_template = None
    template = get_template("llama3", tokenizer)
    chats = [template.text([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for q, a in LLAMA3_CHATS]
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 12, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, initializer_range=0.1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    fit_briefly(model, tokenizer, texts, chats)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def fit_briefly(model, tokenizer, texts, chats, steps: int = LLAMA3_FIT_STEPS) -> None:
    """A few optimizer steps on the demo texts, each batch also holding the test's chats: a random model's
    next-token margins are so small that f16 arithmetic (llama.cpp's, 2e-2 on logits of 7) flips greedy choices;
    a slightly trained one is decisive."""
    ids = torch.tensor([i for text in texts for i in tokenizer(text).input_ids])
    rows = ids[: len(ids) // 64 * 64].view(-1, 64)
    chat_ids = [tokenizer(chat, add_special_tokens=False).input_ids for chat in chats]  # the template writes BOS
    width = max(len(i) for i in chat_ids)
    chat_rows = torch.full((len(chat_ids), width), tokenizer.pad_token_id)
    chat_labels = torch.full((len(chat_ids), width), -100)
    for row, chat in enumerate(chat_ids):
        chat_rows[row, :len(chat)] = torch.tensor(chat)
        chat_labels[row, :len(chat)] = torch.tensor(chat)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss = loss + model(input_ids=chat_rows, labels=chat_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    return build_tiny_llama3(tmp_path_factory.mktemp("llama3") / "tiny-llama3")


@pytest.fixture(scope="session")
def llama3_questions() -> list[str]:
    return [question for question, _ in LLAMA3_CHATS]
