"""The run report: one self-contained `report.html` (inline CSS, base64 PNG charts, no JavaScript).

Built only from the files in the run directory (config.yaml, summary.json, metrics.jsonl,
data_report.json, template.json, eval.json), so it can be regenerated at any time, also for a run
that is still going or was stopped: `loraforge report RUN_DIR`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from loraforge.atomic import write_text_whole
from loraforge.errors import UserError

REPORT_FILE = "report.html"

CSS = """
:root { --fg:#1d232b; --muted:#5b6573; --line:#dde2e8; --accent:#2f6fde; --good:#137a3a; --bad:#b3261e; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 64px; }
header { border-bottom: 1px solid var(--line); margin-bottom: 8px; }
h1 { font-size: 26px; margin: 8px 0 2px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); gap: 10px; margin: 16px 0; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; margin-top: 2px; word-break: break-word; }
.card .n { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
th[scope="row"] { font-weight: 500; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.wide { width: 100%; table-layout: fixed; }
table.wide td { white-space: pre-wrap; word-break: break-word; }
.better { color: var(--good); font-weight: 600; }
.worse { color: var(--bad); font-weight: 600; }
.note { color: var(--muted); font-size: 13px; }
.warn { background: #fff6e0; border: 1px solid #f0d48a; border-radius: 6px; padding: 8px 12px; }
figure { margin: 8px 0 18px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      font-size: 13px; line-height: 1.4; }
pre.wrap { white-space: pre-wrap; word-break: break-word; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
"""


# --- reading the run directory --------------------------------------------------------------

def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); delete or fix it and rerun `loraforge report`") from None


def read_run(run_dir: Path) -> dict:
    from loraforge.evaluate.compare import EVAL_FILE
    from loraforge.infer.session import check_run_dir
    from loraforge.train.metrics import read_metrics

    run_dir = check_run_dir(run_dir)
    return {
        "run_dir": run_dir,
        "config_text": (run_dir / "config.yaml").read_text(),
        "summary": _read_json(run_dir / "summary.json"),
        "metrics": read_metrics(run_dir),
        "data_report": _read_json(run_dir / "data_report.json"),
        "template": _read_json(run_dir / "template.json"),
        "eval": _read_json(run_dir / EVAL_FILE),
    }


# --- charts ---------------------------------------------------------------------------------

def _figure(width=9.6, height=3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{b64}" alt="{_e(alt)}">{cap}</figure>'


def _finite(records, key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [(s, v) for s, v in pts if math.isfinite(v)]


def loss_chart(metrics: list[dict]) -> Optional[str]:
    """Training loss per step, eval loss at its steps, learning rate on the right axis."""
    train, evals, lr = _finite(metrics, "loss"), _finite(metrics, "eval/loss"), _finite(metrics, "lr")
    if not train and not evals:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color="#2f6fde", linewidth=1.2, label="train loss")
    if evals:
        ax.plot(*zip(*evals), color="#d9480f", marker="o", linewidth=1.5, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="#868e96", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=9)
    return _png(fig)


def throughput_chart(metrics: list[dict]) -> Optional[str]:
    """Tokens/s per step; peak GPU memory on the right axis where it was recorded."""
    tps, mem = _finite(metrics, "tokens_per_s"), _finite(metrics, "peak_mem_gib")
    if not tps:
        return None
    fig = _figure(height=3.0)
    ax = fig.add_subplot()
    ax.plot(*zip(*tps), color="#2b8a3e", linewidth=1.2, label="tokens/s")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if mem:
        ax2 = ax.twinx()
        ax2.plot(*zip(*mem), color="#ae3ec9", linewidth=1.2, label="peak GPU memory (GiB)")
        ax2.set_ylabel("peak memory (GiB)")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=9)
    return _png(fig)


# --- HTML helpers ---------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _table(rows: list[list[Any]], header: Optional[list[str]], table_id: str = "", cls: str = "",
           numeric: bool = True) -> str:
    """A table; `header` None for key/value tables, whose first column is then a row heading."""
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{cls}"' if cls else "")
    out = [f"<table{attrs}>"]
    if header is not None:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if header is None and i == 0:
                cells.append(f'<th scope="row">{_e(cell)}</th>')
                continue
            if isinstance(cell, _Raw):
                cells.append(f"<td>{cell.html}</td>")
            elif numeric and isinstance(cell, (int, float)) and not isinstance(cell, bool):
                cells.append(f'<td class="num">{_e(_fmt(cell))}</td>')
            else:
                cells.append(f"<td>{_e(cell if isinstance(cell, str) else _fmt(cell))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


class _Raw:
    def __init__(self, html_text: str):
        self.html = html_text


def _card(key: str, value: str, note: str = "") -> str:
    n = f'<div class="n">{_e(note)}</div>' if note else ""
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>{n}</div>'


def _delta(base: Optional[float], tuned: Optional[float], lower_is_better: bool) -> _Raw:
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)):
        return _Raw("–")
    d = tuned - base
    if d == 0:
        return _Raw('<span>0</span>')
    good = (d < 0) == lower_is_better
    sign = "+" if d > 0 else "−"
    return _Raw(f'<span class="{"better" if good else "worse"}">{sign}{_e(_fmt(abs(d)))}</span>')


# --- sections -------------------------------------------------------------------------------

def _overview(run: dict) -> str:
    s, metrics = run["summary"] or {}, run["metrics"]
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval/loss" in r]
    cards = []
    if s:
        cards.append(_card("steps", _fmt(s.get("steps")), s.get("stopped_early") or "completed"))
        cards.append(_card("train loss", f"{_fmt(s.get('first_losses'))} → {_fmt(s.get('last_losses'))}",
                           "first 10% → last 10% of steps"))
    elif steps:
        cards.append(_card("steps so far", _fmt(steps[-1]["step"]), "no summary.json: running or stopped"))
        cards.append(_card("last train loss", _fmt(steps[-1]["loss"])))
    best = (s or {}).get("best_eval")
    if best and best.get("loss") is not None:
        cards.append(_card("best eval loss", _fmt(best["loss"]), f"step {best.get('step')}"))
    elif evals:
        cards.append(_card("last eval loss", _fmt(evals[-1]["eval/loss"]), f"step {evals[-1]['step']}"))
    ev = run["eval"]
    if ev and (ev.get("loss") or {}).get("responses"):
        r = ev["loss"]["responses"]
        cards.append(_card("eval loss base → tuned", f"{_fmt(r['base']['loss'], 3)} → {_fmt(r['tuned']['loss'], 3)}",
                           f"{ev.get('rows')} rows, {ev.get('split')} split"))
    if s.get("tokens_per_s"):
        cards.append(_card("tokens / s", _fmt(round(s["tokens_per_s"])), "mean over training"))
    elif steps:
        cards.append(_card("tokens / s", _fmt(round(sum(r["tokens_per_s"] for r in steps) / len(steps))),
                           "mean over logged steps"))
    if s.get("trainable_parameters"):
        t, total = s["trainable_parameters"], s.get("total_parameters") or 0
        cards.append(_card("trainable parameters", f"{t:,}", f"{100 * t / total:.2f}% of {total:,}" if total else ""))
    env = s.get("environment") or {}
    peak = env.get("peak_gpu_memory_gib") or env.get("peak_host_memory_gib")
    if peak:
        cards.append(_card("peak memory", f"{peak:.2f} GiB", "GPU, allocated" if env.get("peak_gpu_memory_gib")
                           else "host RAM (resident), whole process"))
    if s.get("base_model"):
        cards.append(_card("base model", Path(str(s["base_model"])).name, s.get("device", "")))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _eval_section(ev: Optional[dict], run_dir: Path) -> str:
    if not ev:
        return ("<h2 id=\"eval\">Evaluation: base vs fine-tuned</h2>"
                f'<p class="note">No eval.json yet. Run <code>loraforge eval {_e(run_dir)}</code> for held-out loss, '
                "perplexity, task metrics and side-by-side answers of the base and the fine-tuned model; "
                "it updates this report.</p>")
    parts = ['<h2 id="eval">Evaluation: base vs fine-tuned</h2>',
             f'<p class="sub">{_e(ev.get("split_note", ""))} '
             f'The base is the same quantized model with the adapter turned off.</p>']
    if ev.get("split") != "eval":
        parts.append('<p class="warn">These rows are training rows, not held out: they show fit, not '
                     'generalisation.</p>')
    loss = ev.get("loss") or {}
    rows = []
    for key, label in (("responses", "response tokens"), ("all", "all tokens")):
        if key not in loss:
            continue
        b, t = loss[key]["base"], loss[key]["tuned"]
        rows.append([f"loss ({label})", b["loss"], t["loss"], _delta(b["loss"], t["loss"], True), t.get("tokens")])
        rows.append([f"perplexity ({label})", b["perplexity"], t["perplexity"],
                     _delta(b["perplexity"], t["perplexity"], True), t.get("tokens")])
    parts.append(_table(rows, ["", "base", "fine-tuned", "change", "tokens"], "eval-loss"))
    if ev.get("loss_note"):
        parts.append(f'<p class="note">{_e(ev["loss_note"])}</p>')
    metrics = ev.get("metrics") or {}
    if metrics:
        mrows = [[name, v.get("base"), v.get("tuned"), _delta(v.get("base"), v.get("tuned"), False), v.get("rows")]
                 for name, v in metrics.items()]
        parts.append(f'<h3>Task metrics on generated answers ({ev.get("metric_rows")} rows with references, '
                     f'greedy, up to {(ev.get("settings") or {}).get("max_new_tokens")} new tokens)</h3>')
        parts.append(_table(mrows, ["metric", "base", "fine-tuned", "change", "rows"], "eval-metrics"))
        if ev.get("metric_note"):
            parts.append(f'<p class="note">{_e(ev["metric_note"])}</p>')
    elif ev.get("metric_note"):
        parts.append(f'<p class="note">{_e(ev["metric_note"])}</p>')
    samples = ev.get("samples") or []
    if samples:
        parts.append("<h3>Answers side by side</h3>")
        srows = [[s.get("question", ""), s.get("base") or "(empty)", s.get("tuned") or "(empty)",
                  s.get("reference") or ""] for s in samples]
        parts.append(_table(srows, ["prompt", "base", "fine-tuned", "reference"], "eval-samples", "wide",
                            numeric=False))
    return "\n".join(parts)


def _curves_section(metrics: list[dict]) -> str:
    parts = ['<h2 id="training">Training</h2>']
    loss = loss_chart(metrics)
    if loss:
        parts.append(_img(loss, "loss curve", "Training loss per optimizer step, eval loss at evaluation steps "
                          "(mean per trained token), learning rate dashed on the right axis."))
    else:
        parts.append('<p class="note">No training steps logged yet (metrics.jsonl is empty).</p>')
    tput = throughput_chart(metrics)
    if tput:
        has_mem = any("peak_mem_gib" in r for r in metrics)
        parts.append(_img(tput, "throughput and memory",
                          "Tokens per second per step" + (", peak GPU memory allocated on the right axis."
                                                          if has_mem else " (peak memory over time is recorded on "
                                                          "GPUs only; see the peak memory figure above).")))
    evals = [r for r in metrics if "eval/loss" in r]
    if evals:
        parts.append(_table([[r["step"], r["eval/loss"], r.get("eval/perplexity")] for r in evals],
                            ["step", "eval loss", "eval perplexity"], "eval-history"))
    return "\n".join(parts)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def histogram_chart(hist: dict, max_length: Optional[int]) -> Optional[str]:
    """A length histogram from data_report.json's {bin_edges, counts}."""
    edges, counts = hist.get("bin_edges") or [], hist.get("counts") or []
    if len(edges) != len(counts) + 1 or not any(counts):
        return None
    fig = _figure(height=3.0)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, alpha=0.6, color="#2f6fde", label="rows")
    if max_length:
        ax.axvline(max_length, color="#b3261e", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)


DATA_KEYS = (("rows.train", "training rows"), ("rows.eval", "eval rows"), ("rows.eval_from", "eval rows from"),
             ("template.name", "template"), ("train_on", "loss on"), ("max_length", "max_length"),
             ("truncation", "truncation"), ("over_max_length", "rows over max_length"), ("truncated", "truncated"),
             ("dropped_too_long", "dropped (too long)"), ("dropped_no_trainable", "dropped (nothing to train)"),
             ("train_tokens", "training tokens"), ("trained_tokens", "trained tokens"),
             ("trainable_share", "trained share of tokens"), ("boundary_straddles", "boundary-straddling tokens"))


def _data_section(report: Optional[dict], run_dir: Path, max_length: Optional[int]) -> str:
    parts = ['<h2 id="data">Data</h2>']
    if not report:
        parts.append('<p class="note">No data_report.json in this run.</p>')
        return "\n".join(parts)
    flat = dict(_flatten(report))
    png = run_dir / "data_report.png"
    chart = None if png.is_file() else histogram_chart(report.get("histogram") or {}, report.get("max_length")
                                                           or max_length)
    if png.is_file():
        chart = base64.b64encode(png.read_bytes()).decode("ascii")
    if chart:
        parts.append(_img(chart, "token length histogram", "Token lengths per row after the chat template, "
                          "before truncation; the dashed line is data.max_length."))
    rows = [[label, flat[key]] for key, label in DATA_KEYS if key in flat]
    parts.append(_table(rows, None, "data-report"))
    tokens = report.get("tokens") or {}
    if tokens:
        cols = ["min", "median", "p95", "max", "mean"]
        parts.append(_table([[name] + [d.get(c) for c in cols] for name, d in tokens.items()],
                            ["tokens per row"] + cols, "token-lengths"))
    sources = report.get("sources") or []
    if sources:
        parts.append(_table([[s.get("label") or s.get("path"), s.get("shape"), s.get("rows"), s.get("train_rows")]
                             for s in sources], ["source", "shape", "rows", "used for training"], "data-sources"))
    for w in report.get("warnings") or []:
        parts.append(f'<p class="warn">{_e(w)}</p>')
    examples = report.get("examples") or []
    if examples:
        parts.append(f'<h3>Rows as trained</h3><p class="note">{_e(report.get("legend", ""))}</p>')
        for ex in examples[:2]:
            parts.append(f'<p class="note">{_e(ex.get("where"))}: {_e(ex.get("tokens"))} tokens, '
                         f'{_e(ex.get("trained_tokens"))} trained</p><pre class="wrap">{_e(ex.get("marked"))}</pre>')
    return "\n".join(parts)


def _train_samples_section(summary: Optional[dict]) -> str:
    samples = (summary or {}).get("samples") or []
    if not samples:
        return ""
    rows = [[s.get("question", ""), s.get("before") or "(empty)", s.get("after") or "(empty)",
             s.get("reference") or ""] for s in samples]
    return ('<h2 id="samples">Sample answers at the end of training</h2>'
            '<p class="sub">Greedy answers to held-out prompts, adapter off (before) and on (after).</p>'
            + _table(rows, ["question", "before", "after", "reference"], "train-samples", "wide", numeric=False))


def _environment_section(summary: Optional[dict]) -> str:
    from loraforge.evaluate.environment import environment_info

    env = (summary or {}).get("environment")
    note = "recorded at the end of training"
    if not env:
        env, note = environment_info(None), "not recorded with the run: this machine, now, when the report was made"
    s = summary or {}
    rows = [["device", s.get("device") or env.get("device") or "–"],
            ["compute dtype", s.get("compute_dtype") or "–"],
            *_fast_path_rows(s.get("fast_paths")),
            ["CPU", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"],
            ["GPUs", ", ".join(env.get("gpus") or []) or "none"],
            ["CUDA", env.get("cuda") or "–"],
            ["Python", env.get("python")], ["platform", env.get("platform")]]
    if env.get("peak_gpu_memory_gib") is not None:
        rows.append(["peak GPU memory (allocated)", f"{env['peak_gpu_memory_gib']:.3f} GiB"])
    if env.get("peak_host_memory_gib") is not None:
        rows.append(["peak host memory (resident)", f"{env['peak_host_memory_gib']:.3f} GiB"])
    rows += [[name, version or "not installed"] for name, version in (env.get("versions") or {}).items()]
    return (f'<h2 id="environment">Hardware and libraries</h2><p class="sub">{_e(note)}.</p>'
            + _table(rows, None, "environment", numeric=False))


def _fast_path_rows(fast: Optional[dict]) -> list[list[str]]:
    """What train.fused_layers / liger_kernels / offload_activations became, and why any is off."""
    if not fast:
        return []
    return ([["fast paths on", ", ".join(fast.get("on") or []) or "none"]]
            + [[f"fast path off: {name}", why] for name, why in (fast.get("off") or {}).items()])


def _config_section(run: dict) -> str:
    parts = ['<h2 id="config">Resolved config</h2>',
             '<p class="sub">config.yaml as training used it (secrets removed).</p>',
             f'<pre id="config-yaml">{_e(run["config_text"])}</pre>']
    tpl = run["template"]
    if tpl:
        parts.append(f'<h3>Chat template: {_e(tpl.get("name"))}</h3>')
        if tpl.get("format"):
            parts.append(f'<pre id="template-format">{_e(tpl["format"])}</pre>')
    return "\n".join(parts)


def build_report(run_dir: Path) -> str:
    """The report's HTML for `run_dir`."""
    import yaml

    run = read_run(run_dir)
    run_dir = run["run_dir"]
    try:
        cfg = yaml.safe_load(run["config_text"]) or {}
    except yaml.YAMLError:
        cfg = {}
    title = f"loraforge run {run_dir.resolve().name}"
    description = str(cfg.get("description") or "").strip()
    state = "finished" if run["summary"] else "in progress or stopped (no summary.json yet)"
    body = [
        "<header>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(description) + " · " if description else ""}{_e(run_dir.resolve())} · {state} · '
        f'report written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>',
        '<nav><a href="#eval">evaluation</a><a href="#training">training</a><a href="#data">data</a>'
        '<a href="#samples">samples</a><a href="#environment">hardware</a><a href="#config">config</a></nav>',
        "</header>",
        _overview(run),
        _eval_section(run["eval"], run_dir),
        _curves_section(run["metrics"]),
        _data_section(run["data_report"], run_dir, (cfg.get("data") or {}).get("max_length")),
        _train_samples_section(run["summary"]),
        _environment_section(run["summary"]),
        _config_section(run),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(p for p in body if p) + "\n</main></body></html>\n")


def write_report(run_dir: Path) -> Path:
    """Write `report.html` into the run directory, whole (never half a page); return its path."""
    run_dir = Path(run_dir)
    return write_text_whole(run_dir / REPORT_FILE, build_report(run_dir))


def write_report_safely(run_dir: Path, say=print) -> Optional[Path]:
    """write_report for the end of training: a failure is a warning, never the run's failure."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return None  # training failed before it wrote anything worth reporting
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the adapter is saved; the report is a convenience
        say(f"warning: could not write {Path(run_dir) / REPORT_FILE}: {type(e).__name__}: {e}. "
            f"Regenerate it with: loraforge report {run_dir}")
        return None
