"""Each shape, named or detected (format: auto), column mapping, and the ambiguity error."""
import pytest

from data_helpers import spans
from loraforge.config import DataSettings
from loraforge.data import prepare
from loraforge.errors import UserError


def run(tok, sources, **data):
    return prepare(DataSettings.model_validate({"datasets": sources, **data}), tok, log=lambda s: None)


def text_of(prepared, tok, i=0):
    return tok.decode(prepared.train[i]["input_ids"])


def trained_texts(prepared, tok, i=0):
    row = prepared.train[i]
    return [tok.decode(row["input_ids"][a:b]) for a, b in spans(row["labels"])]


def test_text_guanaco(tok, write_jsonl):
    path = write_jsonl("g.jsonl", [{"text": "<s>[INST] What is the answer? [/INST] The answer is 42. </s>"}])
    p = run(tok, [{"path": path}])
    assert p.report["sources"][0]["shape"] == "text" and p.report["sources"][0]["shape_detected"]
    assert trained_texts(p, tok) == ["The answer is 42. </s>"]  # decode drops the leading "▁" space


def test_instruction_with_and_without_input(tok, write_jsonl):
    path = write_jsonl("alpaca.jsonl", [
        {"instruction": "Sum the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    p = run(tok, [{"path": path}])
    assert p.report["sources"][0]["shape"] == "instruction"
    assert text_of(p, tok, 0) == "<s>[INST] Sum the numbers.\n\n2 and 3 [/INST] 5 </s>"
    assert text_of(p, tok, 1) == "<s>[INST] Say hi. [/INST] Hi! </s>"


def test_input_output_with_column_mapping(tok, write_jsonl):
    path = write_jsonl("sql.jsonl", [{"sql_prompt": "Count the users.", "sql": "SELECT COUNT(*) FROM users;",
                                      "context": "ignored"}])
    p = run(tok, [{"path": path, "format": "input_output", "columns": {"input": "sql_prompt", "output": "sql"}}])
    assert trained_texts(p, tok) == ["SELECT COUNT(*) FROM users; </s>"]
    # detected too, once the columns are mapped
    p = run(tok, [{"path": path, "columns": {"input": "sql_prompt", "output": "sql"}}])
    assert p.report["sources"][0]["shape"] == "input_output"
    assert p.report["sources"][0]["columns"] == {"input": "sql_prompt", "output": "sql"}


def test_messages_multi_turn_with_system(tok, write_jsonl):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    p = run(tok, [{"path": write_jsonl("m.jsonl", [{"messages": conv}])}])
    assert p.report["sources"][0]["shape"] == "messages"
    assert text_of(p, tok) == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
                               "<s>[INST] Bye [/INST] Goodbye. </s>")
    assert trained_texts(p, tok) == ["Hello. </s>", "Goodbye. </s>"]  # loss on every assistant turn
    assert p.samples == [{"messages": conv[:4], "reference": "Goodbye."}]


def test_sharegpt_spelling(tok, write_jsonl):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}]}
    p = run(tok, [{"path": write_jsonl("s.jsonl", [row])}])
    assert p.report["sources"][0]["shape"] == "messages"
    assert p.report["sources"][0]["columns"] == {"messages": "conversations"}
    assert text_of(p, tok) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"


def test_tokens_with_and_without_labels(tok, write_jsonl):
    path = write_jsonl("t.jsonl", [{"input_ids": [1, 50, 51, 52, 2], "labels": [-100, -100, 51, 52, 2]},
                                   {"input_ids": [1, 60, 61, 2]}])
    p = run(tok, [{"path": path}])
    assert p.report["sources"][0]["shape"] == "tokens"
    assert p.train == [{"input_ids": [1, 50, 51, 52, 2], "labels": [-100, -100, 51, 52, 2]},
                       {"input_ids": [1, 60, 61, 2], "labels": [1, 60, 61, 2]}]
    assert p.samples == []  # no conversations to ask
    p = run(tok, [{"path": path}], train_on="all")
    assert p.train[0]["labels"] == [1, 50, 51, 52, 2]


def test_ambiguous_shape_is_an_error(tok, write_jsonl):
    # tatsu-lab/alpaca has instruction/input/output *and* a formatted text column
    path = write_jsonl("amb.jsonl", [{"instruction": "a", "input": "", "output": "b", "text": "### Instruction: a"}])
    with pytest.raises(UserError, match=r"ambiguous shape: .* fit text and instruction\. Set format:"):
        run(tok, [{"path": path}])
    assert run(tok, [{"path": path, "format": "instruction"}]).report["sources"][0]["shape"] == "instruction"


def test_unknown_shape_lists_columns(tok, write_jsonl):
    path = write_jsonl("q.jsonl", [{"query": "a", "reply": "b"}])
    with pytest.raises(UserError, match=r"cannot tell the dataset's shape from its columns \(query, reply\)"):
        run(tok, [{"path": path}])


def test_named_shape_with_missing_columns(tok, write_jsonl):
    path = write_jsonl("q.jsonl", [{"query": "a", "reply": "b"}])
    with pytest.raises(UserError, match=r"format 'input_output' needs the field\(s\) input, output"):
        run(tok, [{"path": path, "format": "input_output"}])


def test_column_mapping_errors(tok, write_jsonl):
    path = write_jsonl("q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match="no column 'reply'"):
        run(tok, [{"path": path, "columns": {"input": "question", "output": "reply"}}])
    with pytest.raises(UserError, match="'ouput' is not a field loraforge knows. Did you mean 'output'"):
        run(tok, [{"path": path, "columns": {"input": "question", "ouput": "answer"}}])


def test_system_prompts(tok, write_jsonl):
    rows = [{"input": "Hi", "output": "Hello."}, {"input": "Yo", "output": "Hey.", "system": "Be terse."}]
    path = write_jsonl("io.jsonl", rows)
    # per-row system column wins, then the source's system_prompt, then data.system_prompt (in the template)
    p = run(tok, [{"path": path, "system_prompt": "Per source."}], system_prompt="Global.")
    assert text_of(p, tok, 0).startswith("<s>[INST] <<SYS>>\nPer source.\n<</SYS>>")
    assert text_of(p, tok, 1).startswith("<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>")
    p = run(tok, [{"path": path}], system_prompt="Global.")
    assert text_of(p, tok, 0).startswith("<s>[INST] <<SYS>>\nGlobal.\n<</SYS>>")
    assert p.template.prompt([{"role": "user", "content": "New?"}]) == \
        "<s>[INST] <<SYS>>\nGlobal.\n<</SYS>>\n\nNew? [/INST]"
    assert p.template_record()["system_prompt"] == "Global."


def test_text_in_another_template_is_converted_for_the_bundled_set(tok):
    # The bundled rows are llama2-formatted; a run with another template re-renders them.
    p = prepare(DataSettings(template="human_response", max_length=512), tok, log=lambda s: None)
    assert p.report["sources"][0]["shape"] == "text"
    assert all("[INST]" not in tok.decode(r["input_ids"]) for r in p.train)
    assert tok.decode(p.train[0]["input_ids"]).startswith("<s>### HUMAN:\n")


def test_text_train_on_all_keeps_unmatched_text(tok, write_jsonl):
    path = write_jsonl("raw.jsonl", [{"text": "Once upon a time there was a model."}])
    p = run(tok, [{"path": path}], train_on="all")
    assert p.train[0]["labels"] == p.train[0]["input_ids"]
    assert tok.decode(p.train[0]["input_ids"]) == "Once upon a time there was a model."


def test_tokens_without_labels_under_responses_warns(tok, write_jsonl):
    p = run(tok, [{"path": write_jsonl("t.jsonl", [{"input_ids": [1, 60, 61, 2]}])}])
    assert any("have no labels: every token is trained" in w for w in p.report["warnings"])
