"""Task metrics against hand-checked values, and the custom-metric hook."""
import textwrap

import pytest

from loraforge.errors import UserError
from loraforge.evaluate.metrics import (contains_reference, exact_match, load_callable, mean_scores, normalize,
                                        resolve_metrics, rouge_l)
from loraforge.evaluate.sql import execution_match, extract_sql


def test_normalize_is_squad_style():
    assert normalize("  The Cat,   sat!  ") == "cat sat"
    assert normalize("An apple a day.") == "apple day"
    assert normalize("") == ""


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris.", "paris", 1.0),
    ("The answer is Paris.", "Paris", 0.0),
    ("an  Apple", "apple", 1.0),
    ("42", "forty-two", 0.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("I think the answer is Paris, France.", "Paris", 1.0),
    ("Parisian food is good", "Paris", 0.0),  # whole words only
    ("It is New York City.", "new york", 1.0),
    ("York, New", "new york", 0.0),
])
def test_contains_reference(prediction, reference, expected):
    assert contains_reference(prediction, reference) == expected


def test_rouge_l_hand_checked():
    # LCS "the cat on the mat" = 5 of 6 words on both sides: P = R = F = 5/6.
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # P = 1/4, R = 1/1 -> F = 2PR/(P+R) = 0.4
    assert rouge_l("Paris is the capital", "Paris") == pytest.approx(0.4)
    # "b a c" vs "a b c": LCS of 2 of 3 words -> 2/3
    assert rouge_l("b a c", "a b c") == pytest.approx(2 / 3)
    assert rouge_l("", "abc") == 0.0
    assert rouge_l("Same words here", "same words here") == pytest.approx(1.0)


def test_mean_leaves_out_rows_a_metric_does_not_apply_to():
    metrics = resolve_metrics(["exact_match"])
    per_row = [{"exact_match": 1.0}, {"exact_match": None}, {"exact_match": 0.0}, {"exact_match": 1.0}]
    assert mean_scores(per_row, metrics) == {"exact_match": {"mean": pytest.approx(2 / 3), "rows": 3}}
    assert mean_scores([{"exact_match": None}], metrics) == {"exact_match": {"mean": None, "rows": 0}}


def test_resolve_names_aliases_commas_and_none():
    assert [m.name for m in resolve_metrics([])] == ["exact_match", "contains", "rouge_l"]
    assert [m.name for m in resolve_metrics(["rougeL,em", "contains"])] == ["rouge_l", "exact_match", "contains"]
    assert resolve_metrics(["none"]) == []
    with pytest.raises(UserError, match="unknown metric.*Did you mean 'rouge_l'"):
        resolve_metrics(["rouge_k"])


@pytest.fixture
def metric_module(tmp_path, monkeypatch):
    (tmp_path / "my_task_metrics.py").write_text(textwrap.dedent("""
        calls = []

        def first_word(prediction, reference, row):
            calls.append(row)
            return prediction.split()[:1] == reference.split()[:1]

        def length_ratio(prediction, reference, row):
            return len(prediction) / len(reference)

        def skip_odd(prediction, reference, row):
            return None if row["index"] % 2 else 1.0

        def broken(prediction, reference, row):
            raise KeyError("schema")

        def says_yes(prediction, reference, row):
            return "yes"

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "my_task_metrics.py"


def test_custom_metric_by_import_path_and_by_file(metric_module):
    by_module, = resolve_metrics(["my_task_metrics:first_word"])
    row = {"index": 7, "messages": [], "prompt": "p", "reference": "Blue sky"}
    assert by_module.name == "my_task_metrics:first_word"
    assert by_module.score("Blue whale", "Blue sky", row) == 1.0  # bool -> 1.0
    assert by_module.score("Red sky", "Blue sky", row) == 0.0
    assert by_module.fn.__module__ == "my_task_metrics"
    import my_task_metrics
    assert my_task_metrics.calls[-1] is row  # the row reaches the function as given

    by_file = load_callable(f"{metric_module}:length_ratio")
    assert by_file("abc", "abcdef", {}) == 0.5
    skip, = resolve_metrics(["my_task_metrics:skip_odd"])
    assert skip.score("a", "b", {"index": 3}) is None and skip.score("a", "b", {"index": 4}) == 1.0


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("my_task_metrics:nope", "has no attribute 'nope'; its functions: broken, first_word"),
    ("my_task_metrics:NOT_A_FUNCTION", "is not callable"),
    ("missing_file.py:f", "file missing_file.py not found"),
    (":f", "expected a built-in name"),
])
def test_custom_metric_errors_are_user_errors(metric_module, spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_metrics([spec])


def test_a_failing_or_odd_metric_names_the_row(metric_module):
    broken, = resolve_metrics(["my_task_metrics:broken"])
    with pytest.raises(UserError, match=r"my_task_metrics:broken failed on row 5: KeyError"):
        broken.score("a", "b", {"index": 5})
    odd, = resolve_metrics(["my_task_metrics:says_yes"])
    with pytest.raises(UserError, match="returned 'yes' on row 2; a metric must return a finite number"):
        odd.score("a", "b", {"index": 2})


SCHEMA_ROW = {"index": 0, "messages": [{"role": "user", "content": (
    "CREATE TABLE pets (id INTEGER, name TEXT, kind TEXT);\n"
    "INSERT INTO pets VALUES (1, 'Rex', 'dog'), (2, 'Tom', 'cat'), (3, 'Fido', 'dog');\n"
    "How many dogs are there?")}]}


def test_sql_execution_match_hand_checked():
    ref = "SELECT COUNT(*) FROM pets WHERE kind = 'dog';"
    assert execution_match("SELECT count(id) FROM pets WHERE kind='dog'", ref, SCHEMA_ROW) == 1.0  # both 2
    assert execution_match("```sql\nSELECT COUNT(*) FROM pets\n```", ref, SCHEMA_ROW) == 0.0  # 3 != 2
    assert execution_match("SELEC nonsense", ref, SCHEMA_ROW) == 0.0  # does not run
    assert execution_match("SELECT 1", "SELECT * FROM nowhere", SCHEMA_ROW) is None  # the reference cannot run
    assert execution_match("SELECT 1", "SELECT 1", {"messages": [{"role": "user", "content": "hi"}]}) is None
    # Row order matters only when the reference orders its rows.
    assert execution_match("SELECT name FROM pets ORDER BY id DESC", "SELECT name FROM pets", SCHEMA_ROW) == 1.0
    assert execution_match("SELECT name FROM pets", "SELECT name FROM pets ORDER BY id DESC", SCHEMA_ROW) == 0.0
    assert extract_sql("Here you go:\n```sql\nSELECT 1;\n```\nDone.") == "SELECT 1"


def test_sql_metric_plugs_in_as_a_custom_metric():
    metric, = resolve_metrics(["loraforge.evaluate.sql:execution_match"])
    assert metric.score("SELECT name FROM pets WHERE id = 2", "SELECT name FROM pets WHERE kind = 'cat'",
                        SCHEMA_ROW) == 1.0


def test_sql_metric_only_reads_whatever_the_answer_says(tmp_path):
    """execution_match runs from any config on a model's answers: an answer that would write a file or never end
    scores 0, and nothing is written."""
    for answer in (f"VACUUM INTO '{tmp_path / 'copy.db'}'", f"ATTACH DATABASE '{tmp_path / 'new.db'}' AS x",
                   "DELETE FROM pets", "PRAGMA writable_schema = 1",
                   "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"):
        assert execution_match(answer, "SELECT name FROM pets", SCHEMA_ROW) == 0.0, answer
    assert list(tmp_path.iterdir()) == []
    # A recursive query that ends, and the metric's own reads, still work.
    assert execution_match("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
                           "SELECT name FROM pets WHERE id IN (SELECT x FROM c) AND kind = 'cat'",
                           "SELECT name FROM pets WHERE kind = 'cat'", SCHEMA_ROW) == 1.0
