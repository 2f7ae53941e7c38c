"""The embedded tiny model: a real Llama-2-style checkpoint, built once, atomically and reproducibly."""
import os
import shutil
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

from loraforge.model import tiny


def _build_in(home: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    return tiny.ensure_tiny_model()


def _staging_leftovers(home: Path) -> list[Path]:
    return list((home / "models").glob(".tiny-llama-v2.tmp-*"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build shared by the read-only tests: (home, checkpoint folder)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        return home, _build_in(home, mp)


@pytest.fixture(scope="module")
def tok(built):
    return AutoTokenizer.from_pretrained(built[1])


# --- the checkpoint --------------------------------------------------------------------------

def test_builds_a_loadable_llama_checkpoint(built):
    home, path = built
    assert path == home / "models" / "tiny-llama-v2"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert not _staging_leftovers(home)

    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 768, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 4, 1024)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert 2000 <= cfg.vocab_size <= 4000
    assert 3_000_000 < model.num_parameters() < 8_000_000
    assert all(t.dtype == torch.float32 for t in load_file(path / "model.safetensors").values())

    gen = GenerationConfig.from_pretrained(path)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 0)

    with torch.no_grad():
        logits = model(torch.tensor([[1, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_loads_in_4bit_nf4_on_the_cpu(built):
    import bitsandbytes as bnb

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(built[1], quantization_config=quant, device_map={"": "cpu"})
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    ids = torch.tensor([[1, 100, 200]])
    # The training path: gradients flow back through the frozen 4-bit layers to the embeddings.
    model.train()
    model.model.embed_tokens.weight.requires_grad_(True)
    model(ids).logits.sum().backward()
    assert model.model.embed_tokens.weight.grad[100].abs().sum() > 0
    # Inference last: on CPUs with AVX512-BF16 it repacks the weights (dims must divide by 32), and
    # after that bitsandbytes 0.50 passes no gradient through them.
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_two_builds_are_identical(built, tmp_path, monkeypatch):
    first = built[1]
    second = _build_in(tmp_path / "other-home", monkeypatch)
    assert second != first
    assert (second / "tokenizer.model").read_bytes() == (first / "tokenizer.model").read_bytes()
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_second_call_reuses_the_build(built, monkeypatch):
    home, path = built
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    monkeypatch.setattr(tiny, "build_tiny_model", lambda out_dir: pytest.fail("rebuilt a complete checkpoint"))
    assert tiny.ensure_tiny_model() == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_a_crashed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash_mid_save(self, save_directory, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")  # half written, then the disk fills up
        raise OSError("No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(transformers.LlamaForCausalLM, "save_pretrained", crash_mid_save)
        with pytest.raises(OSError, match="No space left"):
            _build_in(tmp_path, mp)
    target = tmp_path / "models" / "tiny-llama-v2"
    assert not target.exists()
    assert not _staging_leftovers(tmp_path)

    # A build killed outright (no cleanup) and a hand-made partial folder do not fool the next call.
    killed = tmp_path / "models" / ".tiny-llama-v2.tmp-killed"
    killed.mkdir()
    (killed / "tokenizer.model").write_bytes(b"partial")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))  # killed two hours ago
    target.mkdir()
    (target / "config.json").write_text("{}")
    path = _build_in(tmp_path, monkeypatch)
    assert path == target and tiny.is_complete(path)
    assert not killed.exists()  # stale staging folders are cleaned up
    AutoModelForCausalLM.from_pretrained(path)


def test_losing_a_build_race_keeps_the_winners_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "models" / "tiny-llama-v2"
    real_build = tiny.build_tiny_model

    def build_then_another_process_finishes_first(out_dir):
        real_build(out_dir)
        shutil.copytree(out_dir, target)
        (target / "winner").write_text("")

    monkeypatch.setattr(tiny, "build_tiny_model", build_then_another_process_finishes_first)
    path = _build_in(tmp_path, monkeypatch)
    assert path == target and (target / "winner").exists()
    assert not _staging_leftovers(tmp_path)


def test_home_and_names(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFORGE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny.loraforge_home() == tmp_path / ".cache" / "loraforge"
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "lf"))
    assert tiny.loraforge_home() == tmp_path / "lf"
    assert tiny.TINY_MODEL_NAME == "tiny-llama-v2"
    assert all(tiny.is_tiny(b) for b in ("tiny", "loraforge/tiny-llama-v2"))
    assert not any(tiny.is_tiny(b) for b in (None, "meta-llama/Llama-2-7b-chat-hf", "./tiny", ""))  # None: the real default


# --- the tokenizer ---------------------------------------------------------------------------

def test_tokenizer_is_llama2_like(tok, built):
    assert tok.is_fast and type(tok).__name__ == "LlamaTokenizer"
    assert len(tok) == AutoModelForCausalLM.from_pretrained(built[1]).config.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side) == ("<unk>", 0, "right")
    assert tok.convert_ids_to_tokens([3, 3 + 0x41]) == ["<0x00>", "<0x41>"]  # Llama's byte pieces

    ids = tok("Hello there").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # BOS added, EOS not, like Llama-2

    ids = tok("<s>[INST] hi [/INST] hello </s>", add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[-1] == 2
    assert 1 not in ids[1:] and 2 not in ids[:-1]


def test_tokenizer_matches_sentencepiece(tok, built):
    sp = spm.SentencePieceProcessor(model_file=str(built[1] / "tokenizer.model"))
    assert sp.get_piece_size() == len(tok)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    for text in ("Why is the sky blue?", "In 2024, 1234 people came.\nThen\ttabs  and spaces.", "Grüße, 你好 😀"):
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text


@pytest.mark.parametrize("text", [
    "The capital of France is Paris. It has 2,148,000 people!",
    "Line one\nLine two\n\n  indented code(x)",
    "你好，世界",
    "Emoji: 😀🚀 and café",
    "[INST] <<SYS>> <</SYS>> [/INST]",
])
def test_round_trip_without_unknowns(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_offsets_map_back_to_the_text(tok):
    text = "<s>[INST] What is 2+2? [/INST] 4 </s>"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [text[a:b] for a, b in enc.offset_mapping]
    assert pieces[0] == "<s>" and pieces[-1] == "</s>"
    assert "".join(pieces) == text  # contiguous, no gaps, no overlaps


# --- the chat template -----------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": " And 3+3? "},
    {"role": "assistant", "content": "6"},
]


def test_chat_template_is_metas_llama2_format(tok):
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s>"
        "<s>[INST] And 3+3? [/INST] 6 </s>"
    )
    assert tok.apply_chat_template(CONVERSATION[1:3], tokenize=False) == "<s>[INST] What is 2+2? [/INST] 4 </s>"


def test_chat_template_generation_prompt(tok):
    prompt = tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s>"
        "<s>[INST] And 3+3? [/INST]"
    )
    # The prompt's tokens are exactly the start of the full conversation's tokens.
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok(full, add_special_tokens=False).input_ids[: len(prompt_ids)] == prompt_ids


def test_chat_template_rejects_non_alternating_roles(tok):
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
