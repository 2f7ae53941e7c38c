"""The default demo's bundled text-to-SQL task (assets/sql_demo.jsonl, written by scripts/make_sql_demo.py)."""
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from loraforge.config import load_config
from loraforge.evaluate.sql import execution_match, schema_statements

ROOT = Path(__file__).resolve().parents[2]


def _rows():
    cfg = load_config(None)
    path = Path(cfg.data.datasets[0].path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    n_train = int(cfg.data.datasets[0].split.split(":")[1].rstrip("]"))  # "train[:128]"
    assert cfg.data.eval_split == f"train[{n_train}:]"
    return rows[:n_train], rows[n_train:]


def test_the_file_is_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sql_demo.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_reference_query_runs_against_its_schema_and_returns_rows():
    train, held_out = _rows()
    assert len(train) == 128 and len(held_out) == 32
    for row in train + held_out:
        user, reference = row["messages"][1]["content"], row["messages"][2]["content"]
        conn = sqlite3.connect(":memory:")
        conn.executescript("\n".join(schema_statements({"messages": row["messages"][:2]})))
        assert conn.execute(reference).fetchall() not in ([], [(0,)], [(None,)]), reference
        scored = {"messages": row["messages"][:2], "prompt": user, "reference": reference}
        assert execution_match(reference, reference, scored) == 1.0
        assert execution_match("SELECT 1 WHERE 0;", reference, scored) == 0.0


def test_held_out_questions_ask_what_training_never_asked_of_that_table():
    train, held_out = _rows()
    seen_queries = {r["messages"][2]["content"] for r in train}
    seen_questions = {r["messages"][1]["content"] for r in train}
    for row in held_out:
        assert row["messages"][2]["content"] not in seen_queries
        assert row["messages"][1]["content"] not in seen_questions
    tables = lambda rows: {r["messages"][2]["content"].split(" FROM ")[1].split()[0].rstrip(";") for r in rows}  # noqa: E731
    assert tables(held_out) <= tables(train), "every held-out table is known; the question kind is new for it"
