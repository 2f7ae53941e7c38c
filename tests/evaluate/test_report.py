"""The run report: self-contained HTML from the run directory, rendered by headless Chromium."""
import base64
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from cli_runner import run_cli
from loraforge.config import RunConfig, save_config
from loraforge.evaluate.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

EVAL = {
    "version": 1, "split": "eval", "split_note": "2 held-out rows (the run's eval split).", "rows": 2,
    "loss": {"responses": {"base": {"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 40},
                           "tuned": {"loss": 1.25, "perplexity": math.exp(1.25), "tokens": 40}},
             "all": {"base": {"loss": 3.0, "perplexity": math.exp(3.0), "tokens": 60},
                     "tuned": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 60}}},
    "metrics": {"exact_match": {"base": 0.0, "tuned": 0.5, "rows": 2},
                "rouge_l": {"base": 0.75, "tuned": 0.25, "rows": 2}},
    "metric_rows": 2, "settings": {"max_new_tokens": 16},
    "samples": [{"question": "Say hi & <b>bye</b>", "base": "<script>alert('x')</script>", "tuned": "hi",
                 "reference": "hi"}],
}


class Tables(HTMLParser):
    """Tables by id as rows of cell texts, images' alt texts, script tags."""

    def __init__(self, page):
        super().__init__()
        self.tables, self.alts, self.scripts, self.images = {}, [], 0, []
        self._table = self._row = self._cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"unnamed-{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.alts.append(a.get("alt"))
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report_run(short_run, tmp_path_factory):
    """A copy of the short run with a hand-written eval.json, and its report."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(short_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (run / "eval.json").write_text(json.dumps(EVAL))
    write_report(run)
    return run


def test_every_train_writes_a_report(short_run):
    page = (short_run / "report.html").read_text()
    t = Tables(page)
    assert "loss curve" in t.alts and "train-samples" in t.tables and "environment" in t.tables
    assert str(short_run / "report.html") in (short_run / "stdout.txt").read_text()


def test_report_is_self_contained_and_shows_the_numbers(report_run):
    page = (report_run / "report.html").read_text()
    t = Tables(page)
    assert t.scripts == 0 and "<script>alert" not in page  # no JavaScript, answers escaped
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing fetched from elsewhere
    for src in t.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"loss curve", "throughput and memory", "token length histogram"} <= set(t.alts)

    loss = t.tables["eval-loss"]
    assert loss[0] == ["", "base", "fine-tuned", "change", "tokens"]
    assert loss[1] == ["loss (response tokens)", "2.5", "1.25", "−1.25", "40"]
    assert loss[2] == ["perplexity (response tokens)", "12.18", "3.49", "−8.692", "40"]
    assert loss[3] == ["loss (all tokens)", "3", "2", "−1", "60"]
    metrics = t.tables["eval-metrics"]
    assert metrics[1] == ["exact_match", "0", "0.5", "+0.5", "2"]
    assert metrics[2] == ["rouge_l", "0.75", "0.25", "−0.5", "2"]
    assert re.search(r'class="better">−1\.25<', page) and re.search(r'class="worse">−0\.5<', page)
    assert t.tables["eval-samples"][1] == ["Say hi & <b>bye</b>", "<script>alert('x')</script>", "hi", "hi"]

    summary = json.loads((report_run / "summary.json").read_text())
    params = dict(t.tables["data-report"])
    assert params["training rows"] == f"{json.loads((report_run / 'data_report.json').read_text())['rows']['train']:,}"
    assert f"{summary['trainable_parameters']:,}" in page
    env = dict(t.tables["environment"])
    import torch
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and "bitsandbytes" in env
    assert env["fast path off: fused layers"] == "no CUDA GPU: the fused path is for CUDA"  # said, not silent
    assert summary["fast_paths"] == {"on": [], "off": {"fused layers": "no CUDA GPU: the fused path is for CUDA"}}
    assert "max_steps: 24" in page  # the resolved config


def _chromium(*args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_run, tmp_path, record_property):
    url = (report_run / "report.html").as_uri()
    dom = _chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    t = Tables(dom.stdout)
    assert "loss curve" in t.alts
    for table in ("eval-loss", "eval-metrics", "eval-samples", "data-report", "train-samples", "environment"):
        assert t.tables.get(table), f"table #{table} missing from the rendered page"
    assert t.tables["eval-loss"][1][:3] == ["loss (response tokens)", "2.5", "1.25"]
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr, dom.stderr[-2000:]

    shot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", url, tmp_path=tmp_path)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels[..., :3].std() > 0.05  # a page with text and charts, not a blank one
    record_property("screenshot", str(shot))
    print(f"report screenshot: {shot}")


def test_report_of_an_unfinished_run_and_the_report_command(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    save_config(RunConfig(), run / "config.yaml")
    records = [{"step": s, "loss": 3.0 - 0.5 * s, "lr": 1e-4, "tokens_per_s": 100.0 + s, "grad_norm": 1.0}
               for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {tmp_path / "opened.txt"}\n')
    browser.chmod(0o755)

    result = run_cli("report", str(run), "--open", env={"BROWSER": f"{browser} %s"})
    assert result.returncode == 0, result.stderr
    assert f"report: {run / 'report.html'}" in result.stdout
    assert (tmp_path / "opened.txt").read_text().strip() == (run / "report.html").resolve().as_uri()
    page = (run / "report.html").read_text()
    t = Tables(page)
    assert "in progress or stopped" in page and "No eval.json yet" in page and "loss curve" in t.alts
    assert "not recorded with the run" in page  # versions of this machine, said so
    assert not [p for p in os.listdir(run) if p.startswith((".tmp-", ".trash-"))]  # no temp file left behind


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "has no config.yaml" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_metrics_line_is_named(tmp_path):
    """A torn last line is a kill mid-write (left out, above); a bad line before it is damage: say where."""
    run = tmp_path / "damaged"
    run.mkdir()
    save_config(RunConfig(), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    result = run_cli("report", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{run / 'metrics.jsonl'}, line 2: not valid JSON" in result.stderr
    assert not (run / "report.html").exists()


def test_the_data_section_counts_rows_with_markers_in_their_text(tmp_path):
    from loraforge.evaluate.report.sections import data_section

    html = data_section({"markers_in_text": {"rows": 3, "shown": []},
                         "warnings": ["3 row(s) hold the template's markers (first: a.jsonl line 2: '<|im_end|>')"]},
                        tmp_path, 64)
    assert '<th scope="row">rows with template markers in message text</th><td class="num">3</td>' in html
    assert "a.jsonl line 2: &#x27;&lt;|im_end|&gt;&#x27;" in html  # the marker shows as text


# A value meant to break out of the HTML (text, attribute or tag) wherever the report puts it.
PAYLOAD = '<script>alert(1)</script>"><img src=x onerror=alert(2)>\'<b>'


class Markup(HTMLParser):
    """Every tag and attribute of a page, to find any the payload managed to add."""

    def __init__(self, page):
        super().__init__()
        self.tags = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def hostile(value):
    """`value` with every string and number in it (not the keys) replaced by the payload."""
    if isinstance(value, dict):
        return {k: hostile(v) for k, v in value.items()}
    if isinstance(value, list):
        return [hostile(v) for v in value]
    return value if value is None else PAYLOAD


def assert_nothing_injected(page: str) -> None:
    assert PAYLOAD not in page and "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    for tag, attrs in Markup(page).tags:
        assert tag not in ("script", "iframe", "object", "embed", "b"), tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs


def test_a_crafted_run_folder_cannot_inject_into_the_report(tmp_path):
    """Every field the report reads from a run folder's files holds the payload, strings where numbers belong
    included: the report builds (the CLI says where it is), and every value shows as text."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"description: {json.dumps(PAYLOAD)}\ndata:\n  max_length: {json.dumps(PAYLOAD)}\n")
    named = {PAYLOAD: PAYLOAD}  # dicts whose keys the report shows as names
    summary = hostile({
        "steps": 3, "stopped_early": "x", "first_losses": 2.0, "last_losses": 1.0, "best_eval": {"loss": 1.0, "step": 2},
        "tokens_per_s": 10.0, "trainable_parameters": 5, "total_parameters": 10, "base_model": "m", "device": "cpu",
        "compute_dtype": "float32", "samples": [{"question": "q", "before": "b", "after": "a", "reference": "r"}],
        "environment": {"peak_gpu_memory_gib": 1.0, "peak_host_memory_gib": 1.0, "cpu": "c", "cpu_count": 2,
                        "gpus": ["g"], "cuda": "12", "python": "3", "platform": "p"}})
    summary["fast_paths"] = {"on": [PAYLOAD], "off": named}
    summary["environment"]["versions"] = named
    ev = hostile(EVAL)
    ev["metrics"] = {PAYLOAD: hostile({"base": 0.5, "tuned": 0.7, "rows": 2})}
    ev["settings"]["max_new_tokens"] = PAYLOAD
    data_report = hostile({
        "rows": {"train": 8, "eval": 2, "eval_from": "x"}, "template": {"name": "llama2"}, "train_on": "responses",
        "max_length": 64, "truncation": "truncate", "over_max_length": 0, "truncated": 0, "dropped_too_long": 0,
        "dropped_no_trainable": 0, "train_tokens": 10, "trained_tokens": 5, "trainable_share": 0.5,
        "boundary_straddles": 0, "sources": [{"label": "l", "shape": "s", "rows": 8, "train_rows": 8}],
        "warnings": ["w"], "legend": "l", "histogram": {"bin_edges": [0, 1], "counts": [3]},
        "examples": [{"where": "w", "tokens": 3, "trained_tokens": 1, "marked": "m"}]})
    data_report["tokens"] = {PAYLOAD: hostile({"min": 1, "median": 2, "p95": 3, "max": 4, "mean": 2.5})}
    for name, content in (("summary.json", summary), ("eval.json", ev), ("data_report.json", data_report),
                          ("template.json", {"name": PAYLOAD, "format": PAYLOAD, "system_prompt": PAYLOAD})):
        (run / name).write_text(json.dumps(content))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, **hostile({"loss": 1.0, "lr": 1.0, "grad_norm": 1.0,
                                                                        "tokens_per_s": 1.0, "eval/loss": 1.0})}) + "\n")

    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "internal error" not in result.stderr and f"report: {run / 'report.html'}" in result.stdout
    page = (run / "report.html").read_text()
    assert_nothing_injected(page)
    t = Tables(page)
    # Shown as text, where the numbers would be: the sections are all there.
    assert t.tables["eval-metrics"][1][:3] == [PAYLOAD] * 3
    assert PAYLOAD in dict(t.tables["environment"]).values() and t.tables["train-samples"][1] == [PAYLOAD] * 4
    assert t.tables["data-sources"][1] == [PAYLOAD] * 4 and t.tables["token-lengths"][1][0] == PAYLOAD

    # A file of another shape altogether: its part is left out, named; the rest still builds.
    (run / "eval.json").write_text(json.dumps([PAYLOAD]))
    (run / "summary.json").write_text(json.dumps({"steps": {"x": PAYLOAD}, "environment": PAYLOAD}))
    page = write_report(run).read_text()
    assert_nothing_injected(page)
    assert "eval.json: unexpected content" in page and "summary.json: unexpected content" in page
    assert "data-sources" in Tables(page).tables
