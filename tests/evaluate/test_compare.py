"""Which rows eval uses, how prompts and references are recovered from prepared rows, and the one sampler of
before/after answers."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from loraforge.data.templates import get_template
from loraforge.errors import UserError
from loraforge.evaluate.compare import (DEFAULT_TRAIN_ROWS, find_adapter, generate_both, prompt_and_reference,
                                        select_rows)


def _rows(n, tag):
    return [{"input_ids": [1, i], "labels": [-100, i], "tag": f"{tag}{i}"} for i in range(n)]


def test_eval_split_is_used_when_the_run_has_one():
    data = SimpleNamespace(train=_rows(100, "t"), eval=_rows(10, "e"))
    sel = select_rows(data)
    assert sel.split == "eval" and [r["tag"] for r in sel.rows] == [f"e{i}" for i in range(10)]
    assert sel.note == "10 held-out rows (the run's eval split)."
    first3 = select_rows(data, "eval", 3)
    assert first3.indices == [0, 1, 2] and "first 3 of 10" in first3.note


def test_no_eval_split_falls_back_to_a_labelled_fixed_sample_of_training_rows():
    data = SimpleNamespace(train=_rows(100, "t"), eval=[])
    sel = select_rows(data)
    assert sel.split == "train" and len(sel.rows) == DEFAULT_TRAIN_ROWS
    assert "has no eval split" in sel.note and "not held out" in sel.note
    assert sel.indices == sorted(set(sel.indices)) and sel.indices != list(range(DEFAULT_TRAIN_ROWS))
    assert [r["tag"] for r in sel.rows] == [f"t{i}" for i in sel.indices]
    assert select_rows(data).indices == sel.indices  # the same rows every time
    small = select_rows(data, "train", 5)
    assert len(small.indices) == 5 and "has no eval split" not in small.note


def test_bad_row_choices_are_user_errors():
    data = SimpleNamespace(train=_rows(4, "t"), eval=[])
    with pytest.raises(UserError, match="--rows 0"):
        select_rows(data, "eval", 0)
    with pytest.raises(UserError, match="--split test"):
        select_rows(data, "test")


@pytest.fixture(scope="module")
def llama2(tiny_tokenizer):
    from loraforge.data.templates import get_template

    return get_template("llama2", tiny_tokenizer)


def _encode(template, tokenizer, messages, train_all=False):
    from loraforge.data.tokenize import encode_batch

    enc, = encode_batch([template.rendered(messages)], tokenizer, train_all, template.control_tokens)
    return {"input_ids": enc.input_ids, "labels": enc.labels}


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.mark.parametrize("train_all", [False, True])
def test_prompt_and_reference_parse_the_row_back_to_the_training_prompt(llama2, tiny_tokenizer, train_all):
    row = _encode(llama2, tiny_tokenizer, CHAT, train_all)
    ex = prompt_and_reference(row, tiny_tokenizer, llama2)
    assert ex["reference"] == "Rome, since 1871."
    assert ex["messages"] == CHAT[:-1]
    assert ex["prompt"] == ("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat is the capital of France? [/INST] "
                            "Paris. </s><s>[INST] And of Italy? [/INST]")
    prompt_ids = tiny_tokenizer(ex["prompt"], add_special_tokens=False).input_ids
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("name,tokname,end,eos", [
    ("llama2", "tiny_tokenizer", "</s><s>[INST]", "</s>"),
    ("chatml", "smollm2_tokenizer", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
])
def test_a_question_holding_markers_is_parsed_back_as_written(name, tokname, end, eos, request):
    """Markers written in a row's text came from text tokens: eval reads them as text, and generates from
    the very prompt tokens training saw."""
    from loraforge.data.tokenize import encode_prompt

    tokenizer = request.getfixturevalue(tokname)
    template = get_template(name, tokenizer)
    chat = [{"role": "user", "content": f"What does {end} do?"}, {"role": "assistant", "content": f"Ends: {eos} x."},
            {"role": "user", "content": f"And {end}?"}, {"role": "assistant", "content": f"Also {eos} ends."}]
    row = _encode(template, tokenizer, chat)
    ex = prompt_and_reference(row, tokenizer, template)
    assert ex["messages"] == chat[:-1] and ex["reference"] == chat[-1]["content"]
    assert ex["prompt_ids"] == encode_prompt(template, chat[:-1]) == row["input_ids"][:len(ex["prompt_ids"])]


def test_where_a_question_reads_two_ways_the_labels_decide(llama2, tiny_tokenizer):
    """`[/INST]` is plain text in Llama 2's format: a question holding it parses as a shorter question, which the
    trained labels contradict; the reference and prompt then come from the labels."""
    chat = [{"role": "user", "content": "What does [/INST] mean?"}, {"role": "assistant", "content": "It ends a question."}]
    row = _encode(llama2, tiny_tokenizer, chat)
    ex = prompt_and_reference(row, tiny_tokenizer, llama2)
    assert ex["reference"] == "It ends a question."
    assert ex["prompt"] == "<s>[INST] What does [/INST] mean? [/INST]"
    assert ex["prompt_ids"] == row["input_ids"][:len(ex["prompt_ids"])] and row["labels"][len(ex["prompt_ids"])] != -100


def test_rows_in_no_template_fall_back_to_the_trained_labels(llama2, tiny_tokenizer):
    prompt_ids = tiny_tokenizer("Question: what is two plus two? Answer:", add_special_tokens=False).input_ids
    answer_ids = tiny_tokenizer(" four", add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    row = {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}
    ex = prompt_and_reference(row, tiny_tokenizer, llama2)
    assert ex["reference"] == "four"
    assert ex["prompt"] == "Question: what is two plus two? Answer:"
    assert ex["messages"] == [{"role": "user", "content": ex["prompt"]}]
    # Every token trained and no template to parse: no way to tell prompt from reply.
    ids = prompt_ids + answer_ids
    assert prompt_and_reference({"input_ids": ids, "labels": list(ids)}, tiny_tokenizer, llama2) is None


def test_find_adapter_prefers_the_final_adapter_then_the_newest_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no adapter/ and no complete checkpoint"):
        find_adapter(tmp_path)
    step = tmp_path / "checkpoints" / "step-000008"
    (step / "adapter").mkdir(parents=True)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                 "rng.pt", "trainer_state.json"):  # what a complete checkpoint holds
        (step / name).write_text("{}")
    path, note = find_adapter(tmp_path)
    assert path == step / "adapter" and "newest checkpoint step-000008" in note
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert find_adapter(tmp_path)[0] == tmp_path / "adapter"
    assert find_adapter(tmp_path, str(step))[0] == step / "adapter"  # a checkpoint folder works too
    with pytest.raises(UserError, match="--adapter .*no adapter_config.json"):
        find_adapter(tmp_path, str(tmp_path / "nowhere"))


# --- the one before/after sampler (train's end-of-run table and eval) ------------------------

class ScriptedModel(torch.nn.Module):
    """Generates a fixed continuation token by token for every row of the batch (through the stopping
    criteria, like `generate`), with the adapter on or off: what a weakly trained model does when it writes
    the next turn instead of ending its own."""

    def __init__(self, tokenizer, tuned: str, base: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ids = {True: tokenizer(tuned, add_special_tokens=False).input_ids,
                    False: tokenizer(base, add_special_tokens=False).input_ids}
        self.adapter_on = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def generate(self, input_ids, stopping_criteria, eos_token_id, max_new_tokens, pad_token_id, **_):
        out, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for token in self.ids[self.adapter_on][:max_new_tokens]:  # every row gets the same script
            step = torch.where(done, torch.tensor(pad_token_id), torch.tensor(token))
            out = torch.cat([out, step[:, None]], dim=1)
            done |= (step == token) & torch.tensor(token in eos_token_id)
            done |= stopping_criteria(out, None)
            if done.all():
                break
        return out


@pytest.mark.parametrize("template_name", ["llama2", "chatml"])
def test_before_after_answers_never_contain_a_turn_marker(template_name, tiny_tokenizer):
    template = get_template(template_name, tiny_tokenizer)
    next_turn = template.prompt([{"role": "user", "content": "And France?"}])  # markers without an end string
    model = ScriptedModel(tiny_tokenizer, tuned="SELECT 1;\n" + next_turn + " SELECT 2;",
                          base="Paris " + template.turn_markers[-1] + " more")
    examples = [{"prompt": template.prompt([{"role": "user", "content": "Capital of Italy?"}])}]
    [(base, tuned)] = generate_both(model, tiny_tokenizer, examples, template, max_new_tokens=64)
    assert (base, tuned) == ("Paris", "SELECT 1;")
    for answer in (base, tuned):
        assert not any(marker in answer for marker in template.turn_markers)


def test_the_models_own_chat_template_stops_at_its_turn_tokens(smollm2_tokenizer):
    template = get_template("tokenizer", smollm2_tokenizer)
    assert set(template.turn_markers) >= {"<|im_start|>", "<|im_end|>"}
    model = ScriptedModel(smollm2_tokenizer, tuned="SELECT 1;<|im_start|>user\nmore", base="Paris<|im_end|>\nmore")
    examples = [{"prompt": template.prompt([{"role": "user", "content": "Capital of Italy?"}])}]
    assert generate_both(model, smollm2_tokenizer, examples, template, max_new_tokens=64) == [("Paris", "SELECT 1;")]
