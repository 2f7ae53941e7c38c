"""Replies end at EOS or a template marker, stream exactly what is returned, and repeat with a seed."""
import pytest
import torch

from loraforge.data.templates import get_template
from loraforge.infer.generate import (ReplyStream, Sampling, check_fits, generate_replies, generate_reply,
                                     reply_stop_strings)
from loraforge.infer.session import load_session


def stream_text(tokenizer, text: str, stops) -> tuple[ReplyStream, list[str]]:
    """Feed `text`'s real token ids one by one, as generate() does after the prompt."""
    pieces: list[str] = []
    stream = ReplyStream(tokenizer, stops, on_text=pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        stream.put(torch.tensor([token_id]))
    stream.end()
    return stream, pieces


def test_stream_stops_at_a_marker_and_never_shows_it(tiny_tokenizer):
    stops = reply_stop_strings(get_template("llama2", tiny_tokenizer))
    stream, pieces = stream_text(tiny_tokenizer, " Paris is the capital. [INST] and more", stops)
    assert stream.stopped
    assert stream.reply == "Paris is the capital."
    assert "".join(pieces).strip() == stream.reply
    assert not any("[" in p for p in pieces), "not even the start of a marker is shown"


def test_stream_holds_back_a_possible_marker_until_it_is_not_one(tiny_tokenizer):
    stops = reply_stop_strings(get_template("human_response", tiny_tokenizer))
    assert "\n### HUMAN:" in stops
    text = "Use lists.\n### Notes\nKeep it short."
    stream, pieces = stream_text(tiny_tokenizer, text, stops)
    assert not stream.stopped and stream.reply == text
    assert "".join(pieces) == text  # held-back text comes out once it cannot be a marker


@pytest.fixture(scope="module")
def session(short_run):
    return load_session(short_run)


def test_greedy_reply_ends_at_eos_and_streams_what_it_returns(session):
    prompt = session.template.prompt([{"role": "user", "content": "How can I make my writing more concise?"}])
    ids = session.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        raw = session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                     do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    pieces = []
    reply = generate_reply(session.model, session.tokenizer, prompt, max_new_tokens=48,
                           stop_strings=reply_stop_strings(session.template), on_text=pieces.append)
    assert session.tokenizer.eos_token_id in raw, "after the short run the model ends its turn by itself"
    expected = session.tokenizer.decode(raw[:raw.index(session.tokenizer.eos_token_id)], skip_special_tokens=True)
    assert reply == expected.strip()
    assert "".join(pieces).strip() == reply
    assert "</s>" not in reply and "[INST]" not in reply


def test_batched_greedy_replies_equal_one_by_one_replies_on_the_real_model(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    template = get_template("tokenizer", smollm2_tokenizer)
    # Prompts of different lengths: the short ones are left-padded, and must not see the padding.
    questions = ["Hi!", "What is the capital of France?", "Name three colours.",
                 "Explain, step by step and with an example, how a hash map handles collisions."]
    prompts = [template.prompt([{"role": "user", "content": q}]) for q in questions]
    stops = reply_stop_strings(template)
    one_by_one = [generate_reply(model, smollm2_tokenizer, p, max_new_tokens=16, stop_strings=stops) for p in prompts]
    assert len(set(one_by_one)) == len(prompts) and "Paris" in one_by_one[1]
    for batch_size in (4, 3):  # one batch; a full batch then a batch of one
        assert generate_replies(model, smollm2_tokenizer, prompts, max_new_tokens=16, stop_strings=stops,
                                batch_size=batch_size) == one_by_one


def test_sampling_repeats_with_a_seed_and_varies_without_the_same_one(session):
    prompt = session.template.prompt([{"role": "user", "content": "Tell me something."}])
    kw = Sampling(max_new_tokens=24, temperature=1.5, top_p=1.0, seed=5).as_kwargs()
    first = generate_reply(session.model, session.tokenizer, prompt, **kw)
    again = generate_reply(session.model, session.tokenizer, prompt, **kw)
    others = {generate_reply(session.model, session.tokenizer, prompt, **{**kw, "seed": s}) for s in range(6, 10)}
    assert first == again
    assert len(others | {first}) > 1, "different seeds should give different samples at temperature 1.5"
    assert Sampling(temperature=0.9, greedy=True).as_kwargs()["temperature"] == 0.0


def test_prompt_longer_than_the_context_is_a_clear_error(session):
    from loraforge.errors import UserError

    prompt = session.template.prompt([{"role": "user", "content": "word " * 1000}])
    check_fits(session.model, session.tokenizer, prompt, 8)
    with pytest.raises(UserError, match="--prompt is 100[0-9] tokens and 64 new tokens.*context is 1024 tokens"):
        check_fits(session.model, session.tokenizer, prompt, 64, "--prompt")


def test_a_batch_with_a_row_too_long_fails_before_answering_any(session):
    from loraforge.errors import UserError
    from loraforge.infer.batch import answer_rows

    answers = answer_rows(session, [{"prompt": "hi"}, {"prompt": "word " * 1100}], Sampling(max_new_tokens=8))
    with pytest.raises(UserError, match="prompt 2 of 2 is"):
        next(answers)


def scripted_model(vocab_size: int, script: list[int]):
    """A one-layer Llama whose logits always pick the next token of `script`: what a model that learned to
    answer with a marker written as text produces, through transformers' real `generate`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Scripted(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            self.step = 0 if input_ids.shape[1] > 1 else self.step + 1  # the prompt comes first, whole
            logits = torch.full_like(out.logits, -1e4)
            logits[:, -1, script[min(self.step, len(script) - 1)]] = 0
            out.logits = logits
            return out

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return Scripted(config).eval()


@pytest.mark.parametrize("name,tokname,written", [
    ("llama2", "tiny_tokenizer", "Write </s> to end a reply, or [/INST] after a question."),
    ("chatml", "smollm2_tokenizer", "End a turn with <|im_end|> or </s>; start one with <|im_start|>."),
    ("tokenizer", "smollm2_tokenizer", "Type <|im_end|> then <|endoftext|>."),
])
def test_an_answer_that_writes_the_end_marker_as_text_is_not_cut(name, tokname, written, request):
    from loraforge.data.tokenize import encode_prompt
    from loraforge.infer.generate import text_stops

    tokenizer = request.getfixturevalue(tokname)
    template = get_template(name, tokenizer)
    stops = reply_stop_strings(template)
    controls = [s for s in stops if s not in text_stops(tokenizer, stops)]
    assert tokenizer.eos_token in controls  # ends a reply by its id only
    answer = tokenizer(" " + written, add_special_tokens=False, split_special_tokens=True).input_ids
    end = tokenizer.convert_tokens_to_ids(template.stop_strings[0])
    model = scripted_model(len(tokenizer), answer + [end] + answer)
    prompt = encode_prompt(template, [{"role": "user", "content": "How do I end a turn? With </s>?"}])
    pieces = []
    reply = generate_reply(model, tokenizer, prompt, max_new_tokens=2 * len(answer) + 4, stop_strings=stops,
                           on_text=pieces.append)
    expected = written.split(" [/INST]")[0] if name == "llama2" else written  # [/INST] is plain text there
    assert reply == expected.rstrip(",") and "".join(pieces).strip() == reply
    assert generate_replies(model, tokenizer, [prompt], max_new_tokens=2 * len(answer) + 4,
                            stop_strings=stops) == [reply]


def test_batch_prompts_keep_markers_as_text(tiny_tokenizer):
    from types import SimpleNamespace

    from loraforge.infer.batch import answer_rows

    tok = tiny_tokenizer
    answer = tok(" Fine </s> really.", add_special_tokens=False, split_special_tokens=True).input_ids
    seen = []

    class Recording(torch.nn.Module):  # the scripted model, noting the prompt it is given
        def __init__(self):
            super().__init__()
            self.inner = scripted_model(len(tok), answer + [tok.eos_token_id])
            self.config = self.inner.config

        def generate(self, input_ids, **kwargs):
            seen.append(input_ids[0].tolist())
            return self.inner.generate(input_ids=input_ids, **kwargs)

    session = SimpleNamespace(model=Recording(), tokenizer=tok, template=get_template("llama2", tok))
    rows = [{"prompt": "Say </s><s>[INST] x"}, {"messages": [{"role": "user", "content": "a </s> b"}]}]
    answers = list(answer_rows(session, rows, Sampling(max_new_tokens=len(answer) + 2, greedy=True)))
    assert [a["answer"] for a in answers] == ["Fine </s> really."] * 2
    assert all(ids.count(tok.eos_token_id) == 0 and ids.count(tok.bos_token_id) == 1 for ids in seen)
