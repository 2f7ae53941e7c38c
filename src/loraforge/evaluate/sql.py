"""A task metric for text-to-SQL: run the generated and the reference query in SQLite, compare results.

Use it as `loraforge eval RUN --metric loraforge.evaluate.sql:execution_match`. The database is
built in memory from the CREATE TABLE / INSERT statements found in the prompt (system prompt or
user turn, e.g. the `sql_context` column put into the input); for a real database file wrap it:

    from loraforge.evaluate.sql import execution_match
    def my_db_match(prediction, reference, row):
        return execution_match(prediction, reference, row, database="chinook.sqlite")

Returns 1.0 when both queries give the same rows (order-insensitive unless the reference has
ORDER BY), 0.0 when they differ or the generated query fails, and None (row not counted) when the
reference itself cannot run or there is no schema to run it against.
"""
from __future__ import annotations

import re
import sqlite3
from collections import Counter
from typing import Optional

_FENCE = re.compile(r"```(?:sql|sqlite)?\s*(.*?)```", re.S | re.I)
_SCHEMA = re.compile(r"\b(CREATE\s+(?:TABLE|VIEW|INDEX|UNIQUE\s+INDEX)|INSERT\s+INTO)\b.*?;", re.S | re.I)


def extract_sql(text: str) -> str:
    """The query in a model answer: a ```sql fenced block if any, else the text up to the first `;`."""
    m = _FENCE.search(text)
    sql = (m.group(1) if m else text).strip()
    if ";" in sql:
        sql = sql[:sql.index(";")]
    return sql.strip()


def schema_statements(row: dict) -> list[str]:
    """CREATE/INSERT statements (each ending with `;`) in the prompt's turns, in order."""
    texts = [m.get("content", "") for m in row.get("messages") or []] or [row.get("prompt", "")]
    return [m.group(0) for t in texts for m in _SCHEMA.finditer(t or "")]


# The queries only read: a model's answer (or a data row) such as `VACUUM INTO '/some/path'` or `ATTACH` would
# otherwise write files, and this metric runs from any config (evaluate/metrics.py PACKAGED).
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: SQLITE_RECURSIVE
MAX_STEPS = 20_000_000  # SQLite VM steps per query (a fraction of a second to a few seconds): no endless queries


def _read_only(action, *_) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def _run(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    steps = iter(range(MAX_STEPS // 1000))
    conn.set_progress_handler(lambda: next(steps, None) is None, 1000)  # a true result interrupts the query
    conn.set_authorizer(_read_only)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.set_authorizer(None)
        conn.set_progress_handler(None, 0)


def execution_match(prediction: str, reference: str, row: dict, database: Optional[str] = None) -> Optional[float]:
    if database:
        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    else:
        statements = schema_statements(row)
        if not statements:
            return None
        conn = sqlite3.connect(":memory:")
        try:
            conn.executescript("\n".join(statements))
        except sqlite3.Error:
            conn.close()
            return None
    try:
        try:
            expected = _run(conn, extract_sql(reference))
        except sqlite3.Error:
            return None
        try:
            got = _run(conn, extract_sql(prediction))
        except (sqlite3.Error, sqlite3.Warning):
            return 0.0
    finally:
        conn.close()
    if re.search(r"\border\s+by\b", reference, re.I):
        return float(got == expected)
    return float(Counter(got) == Counter(expected))
