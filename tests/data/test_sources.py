"""Each source kind: .jsonl, .json array, .csv, .parquet, save_to_disk folder, glob, Hub id (offline)."""
import json

import pytest

from loraforge.config import DataSettings
from loraforge.data import prepare
from loraforge.errors import UserError

ROWS = [{"instruction": f"Name number {i}.", "output": f"It is {i}."} for i in range(6)]


def run(tok, **data):
    return prepare(DataSettings.model_validate(data), tok, log=lambda s: None)


def replies(prepared, tok):
    """The trained text of each train row, decoded."""
    return [tok.decode([t for t in r["labels"] if t != -100], skip_special_tokens=True).strip() for r in prepared.train]


def test_jsonl(tok, write_jsonl):
    p = run(tok, datasets=[{"path": write_jsonl("a.jsonl", ROWS)}])
    assert replies(p, tok) == [f"It is {i}." for i in range(6)]
    assert p.report["sources"][0]["kind"] == "file"
    assert p.report["sources"][0]["shape"] == "instruction"


def test_json_array(tok, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert replies(run(tok, datasets=[{"path": str(path)}]), tok)[-1] == "It is 5."


def test_csv_keeps_numeric_answers_as_text(tok, tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,output\n"What is 6*7?",42\n"And 1, 2?",007\n')
    p = run(tok, datasets=[{"path": str(path)}])
    assert replies(p, tok) == ["42", "007"]
    assert p.samples[0] == {"messages": [{"role": "user", "content": "What is 6*7?"}], "reference": "42"}


def test_parquet(tok, tmp_path):
    import datasets

    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert len(run(tok, datasets=[{"path": str(path)}]).train) == 6


def test_save_to_disk_with_splits(tok, tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                               "validation": datasets.Dataset.from_list(ROWS[4:])})
    dd.save_to_disk(str(tmp_path / "ds"))
    p = run(tok, datasets=[{"path": str(tmp_path / "ds")}], eval_split="validation")
    assert len(p.train) == 4 and len(p.eval) == 2
    assert p.report["rows"]["eval_from"].startswith("split 'validation'")
    assert [s["reference"] for s in p.samples] == ["It is 4.", "It is 5."]  # samples come from eval rows
    with pytest.raises(UserError, match="no split 'test'; it has: train, validation"):
        run(tok, datasets=[{"path": str(tmp_path / "ds"), "split": "test"}])


def test_save_to_disk_single_dataset(tok, tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(run(tok, datasets=[{"path": str(tmp_path / "one")}]).train) == 6


def test_plain_folder_is_not_a_dataset(tok, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="not one written by datasets' save_to_disk"):
        run(tok, datasets=[{"path": str(tmp_path / "d")}])


def test_glob_reads_every_file_and_names_the_file_of_a_bad_row(tok, tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n")
    (tmp_path / "parts" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3:]) + "\n")
    p = run(tok, datasets=[{"path": str(tmp_path / "parts" / "*.jsonl")}])
    assert len(p.train) == 6 and p.report["sources"][0]["kind"] == "glob"
    bad = ROWS[3:] + [{"instruction": "x", "output": ""}]
    (tmp_path / "parts" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    with pytest.raises(UserError, match=r"parts/b\.jsonl line 4: 'output': the response is empty"):
        run(tok, datasets=[{"path": str(tmp_path / "parts" / "*.jsonl")}])


def test_glob_without_matches(tok, tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        run(tok, datasets=[{"path": str(tmp_path / "nothing" / "*.jsonl")}])


def test_missing_file_and_unsupported_type(tok, tmp_path):
    with pytest.raises(UserError, match="not found"):
        run(tok, datasets=[{"path": str(tmp_path / "missing.jsonl")}])
    (tmp_path / "a.txt").write_text("one example a line\n")
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'"):
        run(tok, datasets=[{"path": str(tmp_path / "a.txt")}])


def test_split_slice_and_max_rows(tok, write_jsonl):
    path = write_jsonl("a.jsonl", ROWS)
    assert len(run(tok, datasets=[{"path": path, "split": "train[:2]"}]).train) == 2
    assert len(run(tok, datasets=[{"path": path, "max_rows": 3}]).train) == 3
    with pytest.raises(UserError, match="no split 'validation'"):
        run(tok, datasets=[{"path": path}], eval_split="validation")


@pytest.mark.timeout(120)
def test_hub_id_offline_is_a_clear_error(tok, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        run(tok, datasets=[{"path": "made-up-org/no-such-dataset-x1", "split": "train"}])
    msg = str(e.value)
    assert msg.startswith("could not load dataset made-up-org/no-such-dataset-x1 from the Hub: ")
    assert "Check the name or your connection" in msg and "HF_HUB_OFFLINE=0" in msg


def test_hub_arguments_are_passed(tok, monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, name=None, **kw):
        seen.update(path=path, name=name, **kw)
        return datasets.Dataset.from_list(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    p = run(tok, datasets=[{"path": "org/set", "subset": "en", "revision": "abc", "split": "train"}])
    assert seen == {"path": "org/set", "name": "en", "split": "train", "revision": "abc"}  # no trust_remote_code
    assert p.report["sources"][0]["kind"] == "hub"
    asking = [{"path": "org/set", "trust_remote_code": True}]
    with pytest.raises(UserError, match="add --trust-remote-code to this command"):  # a setting alone never does
        run(tok, datasets=asking)
    data = DataSettings.model_validate({"datasets": asking})
    data.datasets[0]._remote_code_allowed = True  # what RunConfig.allow_remote_code sets for --trust-remote-code
    prepare(data, tok, log=lambda s: None)
    assert seen["trust_remote_code"] is True


def test_empty_file(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="the file is empty"):
        run(tok, datasets=[{"path": str(tmp_path / "e.jsonl")}])
