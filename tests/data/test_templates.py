"""Every template rendered against hand-written strings; prompts, parsing, records."""
import pytest

from loraforge.data.templates import (Segment, check_messages, get_template, guess_template, misplaced_turn,
                                      template_from_record)
from loraforge.errors import UserError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]
NO_SYS = CONV[1:3]

LLAMA2 = [
    Segment("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]", False),
    Segment(" 4. </s>", True),
    Segment("<s>[INST] And 3+3? [/INST]", False),
    Segment(" 6. </s>", True),
]


def test_llama2_segments_follow_meta(tok):
    assert get_template("llama2", tok).render(CONV) == LLAMA2
    assert get_template("llama2", tok).text(NO_SYS) == "<s>[INST] What is 2+2? [/INST] 4. </s>"


def test_contents_are_stripped_like_metas_code(tok):
    messy = [{"role": "user", "content": "  What is 2+2?\n"}, {"role": "assistant", "content": "\n4.  "}]
    assert get_template("llama2", tok).text(messy) == "<s>[INST] What is 2+2? [/INST] 4. </s>"


def test_human_response(tok):
    t = get_template("human_response", tok)
    assert t.text(CONV) == ("<s>Be brief.\n\n### HUMAN:\nWhat is 2+2?\n\n### RESPONSE:\n4.</s>"
                            "\n\n### HUMAN:\nAnd 3+3?\n\n### RESPONSE:\n6.</s>")
    assert [s.text for s in t.render(NO_SYS) if s.trainable] == ["4.</s>"]
    assert t.stop_strings == ["</s>", "\n### HUMAN:"]


def test_alpaca_uses_its_preamble_without_a_system_turn(tok):
    t = get_template("alpaca", tok)
    assert t.text(NO_SYS) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4.</s>")
    assert t.text(CONV[:3]) == "<s>Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4.</s>"


def test_chatml_appends_eos_when_im_end_is_not_a_token(tok):
    t = get_template("chatml", tok)
    assert t.render(CONV) == [
        Segment("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                "<|im_start|>assistant\n", False),
        Segment("4.<|im_end|></s>", True),
        Segment("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("6.<|im_end|></s>", True),
    ]
    assert t.stop_strings == ["<|im_end|>", "</s>"]


def test_chatml_with_a_tokenizer_that_has_im_end(bl_tok):
    t = get_template("chatml", bl_tok)
    assert t.text(NO_SYS) == ("<|begin_of_text|><|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                              "<|im_start|>assistant\n4.<|im_end|>")


def test_llama3_matches_metas_format(bl_tok):
    t = get_template("llama3", bl_tok)
    assert t.text(CONV) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n6.<|eot_id|>")
    assert [s.text for s in t.render(CONV) if s.trainable] == ["4.<|eot_id|>", "6.<|eot_id|>"]
    assert t.stop_strings == ["<|eot_id|>", "<|end_of_text|>"]
    assert t.stop_token_ids == [bl_tok.convert_tokens_to_ids("<|eot_id|>"), bl_tok.convert_tokens_to_ids("<|end_of_text|>")]


def test_llama3_with_a_llama2_tokenizer_ends_turns_with_eos(tok):
    assert get_template("llama3", tok).text(NO_SYS).endswith("4.<|eot_id|></s>")


def test_tokenizer_template_agrees_with_llama2(tok):
    # The tiny model ships Meta's Llama-2 chat template as Jinja: two independent implementations.
    assert tok.chat_template
    t = get_template("tokenizer", tok)
    assert t.render(CONV) == LLAMA2
    assert t.prompt(CONV[:4]) == "".join(s.text for s in LLAMA2[:3])
    assert t.record()["chat_template"] == tok.chat_template
    assert t.record()["format"] == get_template("llama2", tok).record()["format"]


def test_tokenizer_template_needs_one(bl_tok):
    with pytest.raises(UserError, match="no chat template"):
        get_template("tokenizer", bl_tok)


def test_tokenizer_template_that_rewrites_history_is_refused(bl_tok, monkeypatch):
    # Renders only the last assistant turn's content in full: earlier turns change once later ones exist.
    jinja = ("{% for m in messages %}<{{ m['role'] }}>{% if loop.last or m['role'] != 'assistant' %}"
             "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    monkeypatch.setattr(bl_tok, "chat_template", jinja, raising=False)
    with pytest.raises(UserError, match="renders earlier turns differently"):
        get_template("tokenizer", bl_tok).render(CONV[1:])


@pytest.mark.parametrize("name", ["llama2", "human_response", "alpaca", "chatml"])
def test_prompt_is_the_training_prefix_for_every_turn(tok, name):
    t = get_template(name, tok)
    full = t.text(CONV)
    for k in (2, 4):  # before each assistant turn
        p = t.prompt(CONV[:k])
        assert full.startswith(p)
        reply = full[len(p):]
        stripped = reply.lstrip()
        assert stripped.startswith(CONV[k]["content"])  # the prompt stops exactly where the reply starts


def test_prompt_hand_written(tok):
    assert get_template("llama2", tok).prompt(CONV[:4]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST]")
    assert get_template("human_response", tok).prompt(NO_SYS[:1]) == "<s>### HUMAN:\nWhat is 2+2?\n\n### RESPONSE:\n"


def test_prompt_needs_a_user_turn_last(tok):
    with pytest.raises(ValueError):
        get_template("llama2", tok).prompt(CONV[:3])


def test_default_system_prompt_only_where_missing(tok):
    t = get_template("llama2", tok, system_prompt="Answer in French.")
    assert t.prompt(NO_SYS[:1]) == "<s>[INST] <<SYS>>\nAnswer in French.\n<</SYS>>\n\nWhat is 2+2? [/INST]"
    assert t.text(CONV[:3]).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>")


@pytest.mark.parametrize("name", ["llama2", "human_response", "alpaca", "chatml"])
def test_parse_inverts_render(tok, name):
    t = get_template(name, tok)
    assert t.parse(t.text(CONV)) == CONV
    assert t.parse(t.text(NO_SYS)) == NO_SYS


def test_parse_llama3(bl_tok):
    t = get_template("llama3", bl_tok)
    assert t.parse(t.text(CONV)) == CONV


def test_parse_guanaco_variants(tok):
    t = get_template("llama2", tok)
    assert t.parse("<s>[INST] Hi there [/INST] Hello! </s>") == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    # no </s> at the end, no space before [/INST], newlines around: still one exchange
    assert t.parse("<s>[INST]Hi there[/INST]\nHello!\n") == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    # two exchanges where the first lacks its </s>
    assert t.parse("<s>[INST] a [/INST] b <s>[INST] c [/INST] d </s>") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert t.parse("### HUMAN:\nhi\n\n### RESPONSE:\nyo") is None
    assert t.parse("just some text") is None
    assert t.parse("<s>[INST] a [/INST] b </s> trailing words") is None


def test_guess_template(tok):
    assert guess_template("### HUMAN:\nhi\n\n### RESPONSE:\nyo</s>", tok) == "human_response"
    assert guess_template("<s>[INST] hi [/INST] yo </s>", tok) == "llama2"
    assert guess_template("plain words", tok) is None


def test_record_round_trip_and_mismatch(tok):
    t = get_template("llama2", tok, system_prompt="Be kind.")
    rec = t.record()
    assert rec["name"] == "llama2" and rec["system_prompt"] == "Be kind."
    assert rec["format"] == ("<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user_1} [/INST] {assistant_1} </s>"
                             "<s>[INST] {user_2} [/INST] {assistant_2} </s>")
    assert rec["prompt_format"] == "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user_1} [/INST]"
    again = template_from_record(rec, tok)
    assert again.prompt(NO_SYS[:1]) == t.prompt(NO_SYS[:1])
    with pytest.raises(UserError, match="renders differently"):
        template_from_record({**rec, "format": rec["format"].replace("[INST]", "[inst]")}, tok)


def test_unknown_template(tok):
    with pytest.raises(UserError, match="unknown template"):
        get_template("vicuna", tok)


@pytest.mark.parametrize("roles, found", [
    (["system", "user", "assistant", "user"], None),
    (["assistant", "user"], (1, "user")),
    (["user", "user"], (2, "assistant")),
    (["user", "assistant", "system"], (3, None)),
])
def test_one_turn_order_rule_for_rows_and_prompts(roles, found):
    assert misplaced_turn(roles) == found


def test_check_messages_names_the_earliest_problem():
    with pytest.raises(ValueError, match="turn 2: expected a assistant turn, got user"):
        check_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "x"}])
    with pytest.raises(ValueError, match=r"turn 2: expected \{'role'"):
        check_messages([{"role": "user", "content": "a"}, {"role": "x"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="turn 2: a system turn is only allowed first"):
        check_messages([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}])
