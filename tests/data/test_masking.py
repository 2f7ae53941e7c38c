"""Label masks exact at the boundaries, for every template: the first response token is trained, the
last prompt token is not, the end of turn / EOS is trained; multi-turn; prompts tokenize to the prefix."""
import pytest

from data_helpers import spans
from loraforge.data.templates import Segment, get_template
from loraforge.data.tokenize import IGNORE, encode_batch

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the answer?"},
    {"role": "assistant", "content": "The answer is 42."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Write more code."},
]

# (template, tokenizer fixture) -> the trained text of each assistant turn, written by hand.
EXPECTED = {
    ("llama2", "tok"): [" The answer is 42. </s>", " Write more code. </s>"],
    ("tokenizer", "tok"): [" The answer is 42. </s>", " Write more code. </s>"],
    ("human_response", "tok"): ["The answer is 42.</s>", "Write more code.</s>"],
    ("alpaca", "tok"): ["The answer is 42.</s>", "Write more code.</s>"],
    ("chatml", "tok"): ["The answer is 42.<|im_end|></s>", "Write more code.<|im_end|></s>"],
    ("llama3", "tok"): ["The answer is 42.<|eot_id|></s>", "Write more code.<|eot_id|></s>"],
    ("chatml", "bl_tok"): ["The answer is 42.<|im_end|>", "Write more code.<|im_end|>"],
    ("llama3", "bl_tok"): ["The answer is 42.<|eot_id|>", "Write more code.<|eot_id|>"],
    ("human_response", "bl_tok"): ["The answer is 42.<|end_of_text|>", "Write more code.<|end_of_text|>"],
}
# The text of the last prompt token before each reply ends with this.
PROMPT_END = {"llama2": "]", "tokenizer": "]", "human_response": "\n", "alpaca": "\n", "chatml": "\n",
              "llama3": "\n"}


def token_texts(tokenizer, text):
    """Each token's text, from the tokenizer's own offsets (the test's oracle)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [text[a:b] for a, b in enc["offset_mapping"]]


@pytest.mark.parametrize("name,tokname", list(EXPECTED))
def test_mask_boundaries(name, tokname, request):
    tokenizer = request.getfixturevalue(tokname)
    t = get_template(name, tokenizer)
    (enc,) = encode_batch([t.render(CONV)], tokenizer, train_all=False)
    ids, texts = token_texts(tokenizer, t.text(CONV))
    assert enc.input_ids == ids
    assert "".join(texts) == t.text(CONV)  # the tokens cover the text, so runs below are exact
    runs = spans(enc.labels)
    assert ["".join(texts[a:b]) for a, b in runs] == EXPECTED[(name, tokname)]
    for a, b in runs:
        assert enc.labels[a:b] == ids[a:b]  # trained labels are the token ids themselves
        assert enc.labels[a - 1] == IGNORE and texts[a - 1].endswith(PROMPT_END[name])  # last prompt token
    assert enc.labels[-1] == ids[-1] != IGNORE  # the final end of turn / EOS is trained
    assert ids[-1] in t.stop_token_ids
    assert enc.straddles == 0


@pytest.mark.parametrize("name,tokname", list(EXPECTED))
def test_inference_prompt_tokenizes_to_the_training_prefix(name, tokname, request):
    tokenizer = request.getfixturevalue(tokname)
    t = get_template(name, tokenizer)
    (enc,) = encode_batch([t.render(CONV)], tokenizer, train_all=False)
    starts = [a for a, _ in spans(enc.labels)]
    for k, start in zip((2, 4), starts):
        prompt = t.prompt(CONV[:k])
        assert t.text(CONV).startswith(prompt)
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == enc.input_ids[:start]


def test_llama2_first_response_token_carries_the_space(tok):
    # SentencePiece: ` [/INST] The` -> `]`, `▁The`: the space belongs to the response token.
    t = get_template("llama2", tok)
    (enc,) = encode_batch([t.render(CONV[1:3])], tok, train_all=False)
    first = spans(enc.labels)[0][0]
    assert tok.convert_ids_to_tokens(enc.input_ids[first]).startswith("▁")
    assert tok.convert_ids_to_tokens(enc.input_ids[first - 1]) == "]"
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.eos_token_id) == 1 and enc.input_ids[-1] == tok.eos_token_id


def test_multi_turn_bos_eos_once_per_exchange(tok):
    t = get_template("llama2", tok)
    (enc,) = encode_batch([t.render(CONV)], tok, train_all=False)
    assert enc.input_ids.count(tok.bos_token_id) == 2
    assert enc.input_ids.count(tok.eos_token_id) == 2
    second_bos = enc.input_ids.index(tok.bos_token_id, 1)
    assert enc.labels[second_bos] == IGNORE  # the next exchange's <s> is prompt
    assert enc.labels[second_bos - 1] == tok.eos_token_id  # the first reply's </s> is trained


def test_train_on_all(tok):
    t = get_template("llama2", tok)
    (enc,) = encode_batch([t.render(CONV)], tok, train_all=True)
    assert enc.labels == enc.input_ids
    assert sum(enc.response) < len(enc.input_ids)  # prompt/response is still known for the report


def test_a_token_across_a_boundary_is_counted(tok):
    # "INST" is one token for this tokenizer; cutting the segments inside it must be noticed.
    (enc,) = encode_batch([[Segment("<s>[IN", False), Segment("ST] hi", True)]], tok, train_all=False)
    assert enc.straddles == 1


class _SlowTokenizer:
    """A tokenizer without offset mappings (a Python/SentencePiece backend)."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast

    def encode(self, text, add_special_tokens=False):
        return self.fast.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("name", ["llama2", "human_response", "chatml"])
def test_slow_tokenizer_gives_the_same_labels(tok, name):
    segs = get_template(name, tok).render(CONV)
    (fast,) = encode_batch([segs], tok, train_all=False)
    (slow,) = encode_batch([segs], _SlowTokenizer(tok), train_all=False)
    assert slow.input_ids == fast.input_ids and slow.labels == fast.labels


def test_guanaco_text_with_a_llama3_tokenizer_is_re_rendered(bl_tok):
    # <s>/</s> in the data are Llama-2's spelling; the render uses this tokenizer's BOS/EOS.
    t = get_template("llama2", bl_tok)
    msgs = t.parse("<s>[INST] Hi there [/INST] Hello! </s>")
    assert msgs == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert t.text(msgs) == "<|begin_of_text|>[INST] Hi there [/INST] Hello! <|end_of_text|>"


SQL_TURNS = [
    {"role": "system", "content": "Reply with one SQLite query."},
    {"role": "user", "content": "CREATE TABLE t (name TEXT, n INTEGER);\nQuestion: Which names have n above 3?"},
    {"role": "assistant", "content": "SELECT name FROM t WHERE n > 3;"},
    {"role": "user", "content": "And the count?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM t;"},
]


@pytest.mark.parametrize("name", ["tokenizer", "chatml"])
@pytest.mark.parametrize("conv", [CONV, SQL_TURNS], ids=["chat", "sql"])
def test_masks_are_exact_with_the_real_models_bpe_vocabulary(name, conv, smollm2_tokenizer):
    """SmolLM2's byte-level BPE (49,152 tokens) with its own ChatML template and with ours: exactly each reply
    and its `<|im_end|>` are trained, at every boundary, and each inference prompt is the training prefix."""
    tokenizer = smollm2_tokenizer
    t = get_template(name, tokenizer)
    (enc,) = encode_batch([t.render(conv)], tokenizer, train_all=False)
    ids, texts = token_texts(tokenizer, t.text(conv))
    assert enc.input_ids == ids and "".join(texts) == t.text(conv) and enc.straddles == 0
    runs = spans(enc.labels)
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    assert ["".join(texts[a:b]) for a, b in runs] == [r + "<|im_end|>" for r in replies]
    for (a, b), k in zip(runs, (3 if conv[0]["role"] == "system" else 2, 5)):
        assert enc.labels[a:b] == ids[a:b] and ids[b - 1] == tokenizer.eos_token_id
        assert texts[a - 1] == "\n" and enc.labels[a - 1] == IGNORE  # "<|im_start|>assistant\n" is prompt
        prompt = t.prompt(conv[:k - 1])
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids[:a]
    assert t.text(conv).count("<|im_start|>") == len(conv)  # no extra BOS: SmolLM2's BOS is <|im_start|>
