"""Text from the data, the model and the user's paths reaches the console as it is: rich markup in a row
(`[/b]` once ended `eval` and the end of `train` in a MarkupError) prints literally."""
import json

import pytest

from cli_runner import run_cli

MARKUP = ("[/b]", "[bold red]x[/]", "[link=file:///etc/passwd]y[/link]")
WIDE = {"COLUMNS": "400"}  # rich folds table cells to the width; one line per cell keeps the strings whole


def DATA(path):  # noqa: N802 - the dataset flags, as a constant would read
    return ["--dataset", str(path), "--column", "input=[bold]q", "--column", "output=a[/]"]


@pytest.fixture(scope="module")
def markup_run(tiny_model_dir, tmp_path_factory):
    """A short tiny-model run on rows whose questions and answers are full of markup, from columns whose names
    are markup, into a folder whose name is."""
    work = tmp_path_factory.mktemp("markup")
    data = work / "rows.jsonl"
    rows = [{"[bold]q": f"q{i} {' '.join(MARKUP)}?", "a[/]": f"a{i} {' '.join(MARKUP)}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = work / "run[bold]"
    result = run_cli("train", "tiny", *DATA(data), "--set", "train.max_steps=2", "--set",
                     "train.micro_batch_size=2", "--set", "data.max_length=96", "--set", "data.eval_fraction=0",
                     "--set", "data.eval_size=2", "--set", "samples=2", "--set", "eval.max_new_tokens=4",
                     "--set", "train.eval_steps=null", "--set", "train.tensorboard=false", "--output-dir", str(run),
                     env=WIDE)
    return work, data, run, result


def assert_literal(result, *texts: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MarkupError" not in result.stderr and "internal error" not in result.stderr, result.stderr
    for text in texts:
        assert text in result.stdout, (text, result.stdout[-3000:])


def test_train_prints_questions_answers_and_paths_literally(markup_run):
    _, _, run, result = markup_run
    # The answers side by side at the end: each held-out question and its reference, markup and all.
    assert_literal(result, f"a0 {' '.join(MARKUP)}"[3:], f"adapter (PEFT format):  {run / 'adapter'}",
                   "before and after fine-tuning")
    held_out = [s for s in json.loads((run / "summary.json").read_text())["samples"]]
    for sample in held_out:
        assert sample["question"] in result.stdout and sample["reference"] in result.stdout


def test_eval_and_data_inspect_print_markup_as_text(markup_run):
    work, data, run, _ = markup_run
    evaluated = run_cli("eval", str(run), "--rows", "2", "--samples", "2", "--max-new-tokens", "4",
                        "--metric", "exact_match", env=WIDE)
    ev = json.loads((run / "eval.json").read_text())
    assert_literal(evaluated, *(s["question"] for s in ev["samples"]), *(s["reference"] for s in ev["samples"]),
                   f"eval results: {run / 'eval.json'}")
    inspected = run_cli("data", "inspect", "tiny", *DATA(data), "--set", "data.max_length=96", env=WIDE)
    assert_literal(inspected, "input<-[bold]q, output<-a[/]", *MARKUP)  # the Sources table and the examples
