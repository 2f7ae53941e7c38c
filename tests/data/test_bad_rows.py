"""Every bad-row case names the file, the row (1-based line for .jsonl) and what to do."""
import json

import pytest

from loraforge.config import DataSettings
from loraforge.data import prepare
from loraforge.errors import UserError

GOOD = {"instruction": "Say hi.", "output": "Hi!"}


def fails(tok, path, match, **data):
    with pytest.raises(UserError) as e:
        prepare(DataSettings.model_validate({"datasets": [{"path": path}], **data}), tok, log=lambda s: None)
    assert path in str(e.value)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_unparseable_line_counts_blank_lines(tok, write_jsonl):
    path = write_jsonl("a.jsonl", None, raw_lines=[json.dumps(GOOD), "", json.dumps(GOOD), '{"instruction": "x", "output": }'])
    msg = fails(tok, path, "line 4: not valid JSON")
    assert "fix or remove the line" in msg


def test_line_that_is_not_an_object(tok, write_jsonl):
    path = write_jsonl("a.jsonl", None, raw_lines=[json.dumps(GOOD), "[1, 2]"])
    fails(tok, path, "line 2: expected a JSON object")


def test_missing_field(tok, write_jsonl):
    path = write_jsonl("a.jsonl", [GOOD, GOOD, {"instruction": "No answer here."}])
    fails(tok, path, "line 3: 'output' is missing or null. Fill it in or remove the row.")


def test_mistyped_field(tok, write_jsonl):
    path = write_jsonl("a.jsonl", [GOOD, {"instruction": "Six times seven?", "output": 42}])
    fails(tok, path, "line 2: 'output' should be text, got a number (42)")


def test_empty_response(tok, write_jsonl):
    path = write_jsonl("a.jsonl", [GOOD, GOOD, GOOD, {"instruction": "Say nothing.", "output": "  "}])
    fails(tok, path, "line 4: 'output': the response is empty; there is nothing to learn")


def test_empty_response_in_text_row(tok, write_jsonl):
    path = write_jsonl("a.jsonl", [{"text": "<s>[INST] q [/INST] a </s>"}, {"text": "<s>[INST] q [/INST] </s>"}])
    fails(tok, path, "line 2: 'text' has no assistant turn")


@pytest.mark.parametrize("conv,problem", [
    ([("user", "a"), ("user", "b"), ("assistant", "c")],
     "turn 2 is from the user but the assistant should speak next"),
    ([("assistant", "a"), ("user", "b"), ("assistant", "c")],
     "turn 1 is from the assistant but the user should speak next"),
    ([("user", "a"), ("system", "s"), ("assistant", "c")], "turn 2 is a system turn; only the first turn may be"),
    ([("user", "a"), ("assistant", "b"), ("user", "c")], "ends with a user turn that has no reply"),
    ([("user", "a"), ("assistant", "")], "turn 2 (assistant) is empty"),
    ([("user", "a"), ("robot", "b")], "turn 2 has role 'robot'"),
])
def test_conversation_problems(tok, write_jsonl, conv, problem):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": r, "content": c} for r, c in conv]}
    path = write_jsonl("m.jsonl", [ok, ok, bad])
    fails(tok, path, f"line 3: 'messages' {problem}")


def test_turn_without_content(tok, write_jsonl):
    path = write_jsonl("m.jsonl", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}])
    fails(tok, path, "line 1: 'messages' turn 1 needs 'role' and 'content'")


def test_text_that_does_not_match_the_template(tok, write_jsonl):
    rows = [{"text": "<s>[INST] q [/INST] a </s>"}, {"text": "### HUMAN:\nq\n\n### RESPONSE:\na</s>"}]
    msg = fails(tok, write_jsonl("t.jsonl", rows), "line 2: 'text' does not match the llama2 template")
    assert "set data.template: human_response" in msg and "data.train_on: all" in msg


def test_tokens_problems(tok, write_jsonl):
    fails(tok, write_jsonl("t.jsonl", [{"input_ids": [1, 5, 2]}, {"input_ids": [1, 5, 999999]}]),
          "line 2: 'input_ids' has token ids outside this tokenizer's vocabulary (0..2999)")
    fails(tok, write_jsonl("t2.jsonl", [{"input_ids": [1, 5, 2], "labels": [1, 5]}]),
          "line 1: 'labels' has 2 entries but input_ids has 3")
    fails(tok, write_jsonl("t3.jsonl", [{"input_ids": [1, "x"]}]), "line 1: 'input_ids' should contain only integers")
    fails(tok, write_jsonl("t4.jsonl", [{"input_ids": [1, 5, 2], "labels": [-100, 5, 2**40]}]),
          "line 1: 'labels' holds values that are neither -100 (not trained) nor token ids")


def test_several_bad_rows_are_listed_together(tok, write_jsonl):
    rows = [GOOD] + [{"instruction": "x", "output": ""}] * 14
    msg = fails(tok, write_jsonl("a.jsonl", rows), "14 bad row(s)")
    assert "line 2:" in msg and "line 11:" in msg and "line 12:" not in msg
    assert "... and 4 more" in msg


def test_csv_and_json_rows_are_numbered_by_row(tok, tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("instruction,output\nSay hi.,Hi!\nSay bye.,\n")
    fails(tok, str(csv), "row 2: 'output' is missing or null")
    js = tmp_path / "a.json"
    js.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "output": False}]))
    fails(tok, str(js), "row 3: 'output' should be text, got a boolean")
