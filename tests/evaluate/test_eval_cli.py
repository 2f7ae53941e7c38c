"""`loraforge eval` on the shared short training run: base vs fine-tuned, metrics, the custom hook."""
import json
import math
import shutil
import textwrap

import pytest

from cli_runner import run_cli
from loraforge.evaluate.metrics import BUILTIN

CUSTOM_METRIC = textwrap.dedent("""
    def even_rows(prediction, reference, row):
        # The hook gets the generated text, the reference and the row it came from.
        assert isinstance(prediction, str)
        assert reference == row["reference"] and row["split"] == "train"
        assert row["prompt"].startswith("<s>[INST]") and row["prompt"].endswith("[/INST]")
        assert row["messages"][-1]["role"] == "user"
        return row["index"] % 2 == 0
""")


@pytest.fixture(scope="module")
def evaluated(short_run, tmp_path_factory):
    """A copy of the short run (the shared one stays untouched), evaluated on 8 training rows."""
    work = tmp_path_factory.mktemp("eval")
    run = work / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (work / "task_checks.py").write_text(CUSTOM_METRIC)
    result = run_cli("eval", str(run), "--split", "train", "--rows", "8", "--metric", "exact_match,contains,rouge_l",
                     "--metric", "task_checks:even_rows", "--max-new-tokens", "8", "--samples", "2", cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run, result, json.loads((run / "eval.json").read_text())


def test_fine_tuned_loss_is_below_the_base_on_training_rows(evaluated):
    _, _, ev = evaluated
    assert ev["split"] == "train" and ev["rows"] == 8 and len(ev["row_indices"]) == 8
    assert "training rows" in ev["split_note"] and "not held out" in ev["split_note"]
    for kind in ("responses", "all"):
        base, tuned = ev["loss"][kind]["base"], ev["loss"][kind]["tuned"]
        assert base["tokens"] == tuned["tokens"] > 0  # the same rows and tokens for both
        assert tuned["loss"] < base["loss"] - 0.1, (kind, base, tuned)
        assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]))
    # "All tokens" counts prompt tokens too: strictly more than the response tokens.
    assert ev["loss"]["all"]["tuned"]["tokens"] > ev["loss"]["responses"]["tuned"]["tokens"]


def test_task_metrics_match_the_answers_and_the_custom_hook_runs(evaluated):
    _, _, ev = evaluated
    answers = ev["answers"]
    assert len(answers) == 8 and ev["metric_rows"] == 8
    assert list(ev["metrics"]) == ["exact_match", "contains", "rouge_l", "task_checks:even_rows"]
    for name, fn in BUILTIN.items():
        for who in ("base", "tuned"):
            expected = sum(fn(a[who], a["reference"]) for a in answers) / len(answers)
            assert ev["metrics"][name][who] == pytest.approx(expected), (name, who)
    even = sum(1 for i in ev["row_indices"] if i % 2 == 0) / 8
    assert ev["metrics"]["task_checks:even_rows"] == {"base": even, "tuned": even, "rows": 8}
    assert [a["scores"]["tuned"]["task_checks:even_rows"] for a in answers] == \
        [float(i % 2 == 0) for i in ev["row_indices"]]
    assert len(ev["samples"]) == 2 and all(isinstance(s["base"], str) and s["reference"] for s in ev["samples"])


def test_prints_a_compact_table_and_updates_the_report(evaluated):
    run, result, ev = evaluated
    out = result.stdout
    for text in ("loss (response tokens)", "perplexity (all tokens)", "rouge_l (8 rows)", "task_checks:even_rows",
                 str(run / "eval.json"), str(run / "report.html")):
        assert text in out, text
    page = (run / "report.html").read_text()
    assert 'id="eval-loss"' in page and 'id="eval-metrics"' in page and "task_checks:even_rows" in page


def test_held_out_rows_by_default_and_the_loss_matches_training(short_run, tmp_path):
    """Loss only: the tuned loss on the eval split equals the one the training loop logged last."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    result = run_cli("eval", str(run), "--metric", "none", "--samples", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ev = json.loads((run / "eval.json").read_text())
    n_eval = json.loads((run / "data_report.json").read_text())["rows"]["eval"]
    assert ev["split"] == "eval" and ev["rows"] == n_eval > 0 and ev["metrics"] == {} and ev["samples"] == []
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert ev["loss"]["responses"]["tuned"]["loss"] == pytest.approx(logged[-1]["eval/loss"], abs=1e-3)
    assert ev["loss"]["responses"]["tuned"]["loss"] < ev["loss"]["responses"]["base"]["loss"]
    assert "Task metrics were turned off" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["eval", "{missing}"], "not found"),
    (["eval", "{run}", "--metric", "no_such_module_q:f"], "cannot import module 'no_such_module_q'"),
    (["eval", "{run}", "--metric", "bleu"], "unknown metric"),
    (["eval", "{run}", "--rows", "0"], "--rows 0"),
    (["report", "{missing}"], "not found"),
])
def test_bad_input_is_one_clear_message(short_run, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "nowhere", run=short_run) for a in args]
    eval_file = short_run / "eval.json"  # training's own base-vs-tuned evaluation wrote one
    before = eval_file.read_bytes() if eval_file.exists() else None
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert (eval_file.read_bytes() if eval_file.exists() else None) == before, "a refused eval changed eval.json"


def test_a_checkpoint_is_evaluated_with_adapter_and_a_wrong_path_is_refused(short_run, tmp_path):
    """`--adapter RUN/checkpoints/step-N` evaluates that checkpoint (e.g. the best eval one) of the run."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("tb"))
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[0]
    result = run_cli("eval", str(run), "--adapter", str(checkpoint), "--rows", "2", "--metric", "none",
                     "--samples", "0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["adapter"] == str(checkpoint / "adapter") and ev["rows"] == 2

    (run / "eval.json").unlink()
    wrong = run_cli("eval", str(run), "--adapter", str(tmp_path / "nowhere"))
    assert wrong.returncode == 2 and "no adapter_config.json" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (run / "eval.json").exists()
