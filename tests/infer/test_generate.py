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
