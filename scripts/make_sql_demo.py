"""Write src/loraforge/assets/sql_demo.jsonl: the default demo's text-to-SQL task, deterministic.

Eight small tables (CREATE TABLE + a few rows, in the prompt, so the metric
`loraforge.evaluate.sql:execution_match` can build each database) and nine kinds of question.
Every table appears in training, but the held-out rows (the file's last HELD_OUT rows) ask kinds
of question that training never asked *of that table*: the model must compose what it learned,
not recall it. Every reference query is run in sqlite3 here and must return at least one row.

    python scripts/make_sql_demo.py          # rewrites the file; the same bytes every time
    python scripts/make_sql_demo.py --check  # exit 1 unless the file is exactly what this script writes
"""
from __future__ import annotations

import json
import random
import sqlite3
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "loraforge" / "assets" / "sql_demo.jsonl"
SYSTEM = "Reply with one SQLite query."
TRAIN_ROWS = 128
HELD_OUT = 32  # the demo recipe reads rows [:TRAIN_ROWS] for training and [TRAIN_ROWS:] as held out

# table, singular, label column, category column, two numeric columns, rows (label, category, n1, n2)
TABLES = [
    ("employees", "employee", "name", "department", "salary", "age",
     [("Ann", "Sales", 52000, 34), ("Bob", "IT", 61000, 45), ("Cara", "Sales", 48000, 29),
      ("Dev", "HR", 45000, 51)]),
    ("books", "book", "title", "genre", "pages", "year",
     [("Dune", "SciFi", 412, 1965), ("Emma", "Romance", 474, 1815), ("Neuromancer", "SciFi", 271, 1984),
      ("Beloved", "Drama", 324, 1987)]),
    ("cities", "city", "name", "country", "population", "area",
     [("Lyon", "France", 513, 48), ("Porto", "Portugal", 232, 41), ("Nice", "France", 342, 72),
      ("Braga", "Portugal", 193, 183)]),
    ("products", "product", "name", "category", "price", "stock",
     [("Lamp", "Home", 25, 40), ("Kettle", "Kitchen", 30, 15), ("Rug", "Home", 80, 7),
      ("Pan", "Kitchen", 22, 60)]),
    ("students", "student", "name", "club", "score", "grade",
     [("Mia", "Chess", 88, 10), ("Noah", "Drama", 72, 11), ("Olga", "Chess", 95, 12),
      ("Pete", "Robotics", 64, 10)]),
    ("movies", "movie", "title", "genre", "rating", "runtime",
     [("Heat", "Crime", 83, 170), ("Up", "Family", 83, 96), ("Alien", "Horror", 85, 117),
      ("Coco", "Family", 84, 105)]),
    ("cars", "car", "model", "maker", "horsepower", "doors",
     [("Civic", "Honda", 158, 4), ("Mustang", "Ford", 450, 2), ("Accord", "Honda", 192, 4),
      ("Focus", "Ford", 160, 5)]),
    ("players", "player", "name", "team", "goals", "matches",
     [("Ruiz", "Lions", 12, 30), ("Sato", "Hawks", 7, 28), ("Tate", "Lions", 19, 33),
      ("Uma", "Bears", 3, 25)]),
]


def schema(t) -> str:
    name, _, label, cat, n1, n2, rows = t
    create = f"CREATE TABLE {name} ({label} TEXT, {cat} TEXT, {n1} INTEGER, {n2} INTEGER);"
    values = ", ".join(f"('{a}', '{b}', {c}, {d})" for a, b, c, d in rows)
    return f"{create}\nINSERT INTO {name} VALUES {values};"


def _middle(values: list[int]) -> int:
    """A threshold some rows pass and some do not."""
    s = sorted(values)
    return s[len(s) // 2 - 1]


def questions(t, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Each kind of question: (question, reference query) variants for this table."""
    name, one, label, cat, n1, n2, rows = t
    cats = sorted({r[1] for r in rows})
    c = rng.choice(cats)
    out = {}
    out["count_all"] = [(f"How many {name} are there?", f"SELECT COUNT(*) FROM {name};"),
                        (f"Count the {name}.", f"SELECT COUNT(*) FROM {name};")]
    out["count_where"] = [(f"How many {name} have {cat} {c}?", f"SELECT COUNT(*) FROM {name} WHERE {cat} = '{c}';"),
                          (f"Count the {name} whose {cat} is {c}.", f"SELECT COUNT(*) FROM {name} WHERE {cat} = '{c}';")]
    out["list_where"] = [(f"List the {label} of every {one} with {cat} {c}.", f"SELECT {label} FROM {name} WHERE {cat} = '{c}';"),
                         (f"Which {name} have {cat} {c}? Give the {label}.", f"SELECT {label} FROM {name} WHERE {cat} = '{c}';")]
    for col, kind in ((n1, "greater_1"), (n2, "greater_2")):
        k = _middle([r[2] if col == n1 else r[3] for r in rows])
        out[kind] = [(f"Which {name} have a {col} greater than {k}? Give the {label}.",
                      f"SELECT {label} FROM {name} WHERE {col} > {k};"),
                     (f"List the {label} of the {name} with {col} above {k}.",
                      f"SELECT {label} FROM {name} WHERE {col} > {k};")]
    out["max"] = [(f"What is the highest {n1} of all {name}?", f"SELECT MAX({n1}) FROM {name};"),
                  (f"What is the largest {n2} among the {name}?", f"SELECT MAX({n2}) FROM {name};")]
    out["min"] = [(f"What is the lowest {n2} of all {name}?", f"SELECT MIN({n2}) FROM {name};"),
                  (f"What is the smallest {n1} among the {name}?", f"SELECT MIN({n1}) FROM {name};")]
    out["avg_where"] = [(f"What is the average {n1} of the {name} with {cat} {c}?",
                         f"SELECT AVG({n1}) FROM {name} WHERE {cat} = '{c}';"),
                        (f"What is the total {n2} of the {name} whose {cat} is {c}?",
                         f"SELECT SUM({n2}) FROM {name} WHERE {cat} = '{c}';")]
    out["top"] = [(f"Which {one} has the highest {n1}? Give the {label}.",
                   f"SELECT {label} FROM {name} ORDER BY {n1} DESC LIMIT 1;"),
                  (f"Give the {label} of the {one} with the lowest {n2}.",
                   f"SELECT {label} FROM {name} ORDER BY {n2} ASC LIMIT 1;")]
    out["group"] = [(f"How many {name} are there for each {cat}?", f"SELECT {cat}, COUNT(*) FROM {name} GROUP BY {cat};"),
                    (f"For each {cat}, count the {name}.", f"SELECT {cat}, COUNT(*) FROM {name} GROUP BY {cat};")]
    return out


def check(t, query: str) -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema(t))
    rows = conn.execute(query).fetchall()
    conn.close()
    if not rows or rows == [(0,)] or rows == [(None,)]:
        sys.exit(f"reference query returns nothing useful on {t[0]}: {query}")


def row(t, question: str, query: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"{schema(t)}\nQuestion: {question}"},
                         {"role": "assistant", "content": query}]}


def main() -> None:
    rng = random.Random(10)
    train, held_out = [], []
    for i, t in enumerate(TABLES):
        qs = questions(t, rng)
        kinds = sorted(qs)
        # Two kinds per table are never asked of it in training (a different pair for each table).
        unseen = {kinds[(2 * i) % len(kinds)], kinds[(2 * i + 1) % len(kinds)]}
        for kind in kinds:
            for question, query in qs[kind]:
                check(t, query)
                (held_out if kind in unseen else train).append(row(t, question, query))
    rng.shuffle(train)
    rng.shuffle(held_out)
    train = (train * (TRAIN_ROWS // len(train) + 1))[:TRAIN_ROWS]  # repeated rows: epochs in one pass
    held_out = held_out[:HELD_OUT]
    assert len(held_out) == HELD_OUT, len(held_out)
    text = "".join(json.dumps(r) + "\n" for r in train + held_out)
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else f"{OUT} differs from what {__file__} writes")
    OUT.write_text(text)
    print(f"{OUT}: {len(train)} training rows, {len(held_out)} held-out rows")


if __name__ == "__main__":
    main()
