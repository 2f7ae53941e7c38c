"""Naming a row's line and explaining a file the loader rejected read the file in bounded pieces
(`data/locate.py`): the answers are those of reading it whole, with blocks, marks and the line cap made tiny so
that every piece boundary is crossed."""
import json

import pytest

from loraforge.data import locate
from loraforge.errors import UserError


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(locate, "BLOCK", 7)
    monkeypatch.setattr(locate, "MARK_EVERY", 3)


def test_row_lines_skip_blank_lines_like_the_loader(tmp_path, small_pieces):
    lines = [json.dumps({"text": "x" * (i * 5)}) if i % 4 else ("  " if i % 8 else "") for i in range(40)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    index = locate.LineIndex(str(path))
    asked = [20, 3, len(expected) - 1, 0, 11, 12, 4]
    assert [index.line_of(r) for r in asked] == [expected[r] for r in asked]
    assert index.line_of(len(expected)) is None
    assert len(index.marks) > 3  # later questions start from a mark, not from the top
    assert locate.LineIndex(str(path)).line_of(len(expected) - 1) == expected[-1]


def test_jsonl_errors(tmp_path, small_pieces, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"a.jsonl: line 5: expected a JSON object with named fields, got list"):
        locate.explain_jsonl(str(path))
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(UserError, match=r"line 2: not valid JSON \(Expecting value"):
        locate.explain_jsonl(str(path))
    monkeypatch.setattr(locate, "MAX_LINE", 50)  # a line longer than the cap is skipped, never held
    path.write_text(json.dumps({"a": "x" * 200}) + "\n" + "oops" * 30 + "\n" + '{"a": 1}\n' + "nope\n")
    with pytest.raises(UserError, match="line 4: not valid JSON"):
        locate.explain_jsonl(str(path))


@pytest.mark.parametrize("content, message", [
    ('[{"a": 1},\n {"a": 2},\n {"a": }\n]', r"line 3: not valid JSON \(Expecting value, in row 3\)"),
    ('[{"a": 1},\n 5]', "line 2: row 2: expected an object with named fields, got int"),
    ('[{"a": 1},\n {"a": 2}', r"line 2: not valid JSON \(expected , or \] after row 2\)"),
    ('{"a": 1}', r"line 1: not valid JSON \(expected a JSON array"),
    ('[{"a": "' + "y" * 300 + '"},\n\n{"b": tru}]', r"line 3: not valid JSON \(Expecting value, in row 2\)"),
])
def test_json_array_errors(tmp_path, small_pieces, content, message):
    path = tmp_path / "a.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        locate.explain_json_array(str(path))


def test_a_valid_json_array_has_nothing_to_explain(tmp_path, small_pieces):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "z" * 100, "n": [1, 2, {"k": "]"}]}] * 5, indent=2))
    locate.explain_json_array(str(path))  # returns: rows elements span many blocks, ] inside strings
    path.write_text("[]")
    locate.explain_json_array(str(path))
