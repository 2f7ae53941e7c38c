"""`loraforge data inspect`: config or --dataset, report files only with --out, a run's kept without --force."""
import json

import pytest

from loraforge.cli import main

ROWS = [{"text": "<s>[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>"},
        {"text": "<s>[INST] Say hello. [/INST] Hello! </s><s>[INST] Say bye. [/INST] Bye! </s>"}]


@pytest.fixture(autouse=True)
def only_data_command(monkeypatch):
    # main()'s real dispatch and error handling, independent of the other sub-commands' modules
    monkeypatch.setattr("loraforge.cli.COMMAND_MODULES", ["data"])


@pytest.fixture
def dataset(write_jsonl):
    return write_jsonl("chat.jsonl", ROWS)


def test_inspect_dataset(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "inspect", "tiny", "--dataset", dataset, "--max-length", "32", "--out", str(out),
                 "--set", "data.eval_fraction=0"]) == 0
    text = capsys.readouterr().out
    assert "shape text (detected)" in text
    assert "⟦<s>[INST] What is the capital of France? [/INST]⟧" in text  # rich markup did not eat [INST]
    report = json.loads((out / "data_report.json").read_text())
    assert report["max_length"] == 32 and report["rows"] == {"train": 2, "eval": 0, "eval_from": None}
    assert report["over_max_length"] == 1 and report["truncated"] == 1
    assert (out / "data_report.png").read_bytes()[:4] == b"\x89PNG"
    # its own report is replaced; a training run's is not, unless --force
    assert main(["data", "inspect", "tiny", "--dataset", dataset, "--out", str(out), "--max-length", "64"]) == 0
    assert json.loads((out / "data_report.json").read_text())["max_length"] == 64
    (out / "config.yaml").write_text("{}\n")
    assert main(["data", "inspect", "tiny", "--dataset", dataset, "--out", str(out)]) == 2
    assert "is a training run directory" in capsys.readouterr().err
    assert main(["data", "inspect", "tiny", "--dataset", dataset, "--out", str(out), "--force", "--max-length", "48"]) == 0
    assert json.loads((out / "data_report.json").read_text())["max_length"] == 48


def test_inspect_config_with_overrides(tiny_model_dir, dataset, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  base: tiny\ndata:\n  datasets:\n    - path: chat.jsonl\n  template: llama2\n  max_length: 128\n")
    assert dataset == str(tmp_path / "chat.jsonl")  # next to the config, referenced relatively
    out = tmp_path / "o"
    assert main(["data", "inspect", str(cfg), "--set", "data.train_on=all", "--out", str(out)]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_on"] == "all" and report["trainable_share"] == 1.0
    assert report["sources"][0]["path"] == str(tmp_path / "chat.jsonl")  # relative to the config file


def test_inspect_bad_row_exits_2(tiny_model_dir, write_jsonl, tmp_path, capsys):
    path = write_jsonl("bad.jsonl", [{"input": "q", "output": "a"}, {"input": "q", "output": ""}])
    assert main(["data", "inspect", "tiny", "--dataset", path, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: 1 bad row(s)" in err and "line 2: 'output': the response is empty" in err


def test_tokenizer_failure_is_a_user_error(tmp_path, dataset, capsys):
    missing = tmp_path / "no-model"
    code = main(["data", "inspect", "--dataset", dataset, "--set", f"model.base={missing}", "--out", str(tmp_path)])
    assert code == 2
    assert "the tokenizer could not be loaded" in capsys.readouterr().err


def test_inspect_counts_and_shows_rows_with_markers_in_their_text(tiny_model_dir, write_jsonl, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Say </s> please"}, {"role": "assistant", "content": "</s>"}]},
            {"input": "Explain [/INST].", "output": "It closes a question."}]
    first, second = write_jsonl("chat.jsonl", rows[:2]), write_jsonl("qa.jsonl", rows[2:])
    out = tmp_path / "out"
    assert main(["data", "inspect", "tiny", "--dataset", first, "--out", str(out), "--set", "data.eval_fraction=0"]) == 0
    text = capsys.readouterr().out
    assert "rows with template markers in their message text: 1" in text and "chat.jsonl line 2: </s>" in text
    report = json.loads((out / "data_report.json").read_text())
    assert report["markers_in_text"]["rows"] == 1
    assert main(["data", "inspect", "tiny", "--dataset", second, "--out", str(out), "--set", "data.eval_fraction=0"]) == 0
    assert "qa.jsonl line 1: [/INST]" in capsys.readouterr().out
