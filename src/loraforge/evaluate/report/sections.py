"""The report's sections, each from the run directory's files (`loraforge.rundir.Run`) to HTML."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Optional

from loraforge.config import key_paths
from loraforge.evaluate.report.charts import histogram_chart, loss_chart, throughput_chart
from loraforge.evaluate.report.markup import card, delta, escape, figure, fmt, number, table
from loraforge.rundir import DATA_REPORT_CHART, Run


def overview(run: Run) -> str:
    s, metrics = run.summary or {}, run.metrics
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval/loss" in r]
    cards = []
    if s:
        cards.append(card("steps", fmt(s.get("steps")), s.get("stopped_early") or "completed"))
        cards.append(card("train loss", f"{fmt(s.get('first_losses'))} → {fmt(s.get('last_losses'))}",
                           "first 10% → last 10% of steps"))
    elif steps:
        cards.append(card("steps so far", fmt(steps[-1]["step"]), "no summary.json: running or stopped"))
        cards.append(card("last train loss", fmt(steps[-1]["loss"])))
    best = (s or {}).get("best_eval")
    if best and best.get("loss") is not None:
        cards.append(card("best eval loss", fmt(best["loss"]), f"step {best.get('step')}"))
    elif evals:
        cards.append(card("last eval loss", fmt(evals[-1]["eval/loss"]), f"step {evals[-1]['step']}"))
    ev = run.eval_result
    if ev and (ev.get("loss") or {}).get("responses"):
        r = ev["loss"]["responses"]
        cards.append(card("eval loss base → tuned", f"{fmt(r['base']['loss'], 3)} → {fmt(r['tuned']['loss'], 3)}",
                           f"{ev.get('rows')} rows, {ev.get('split')} split"))
    rates = [number(r.get("tokens_per_s")) for r in steps]
    if number(s.get("tokens_per_s")):
        cards.append(card("tokens / s", fmt(round(s["tokens_per_s"])), "mean over training"))
    elif steps and None not in rates:
        cards.append(card("tokens / s", fmt(round(sum(rates) / len(rates))), "mean over logged steps"))
    if number(s.get("trainable_parameters")):
        t, total = s["trainable_parameters"], number(s.get("total_parameters")) or 0
        cards.append(card("trainable parameters", f"{t:,}", f"{100 * t / total:.2f}% of {total:,}" if total else ""))
    env = s.get("environment") or {}
    peak = number(env.get("peak_gpu_memory_gib")) or number(env.get("peak_host_memory_gib"))
    if peak:
        cards.append(card("peak memory", f"{peak:.2f} GiB", "GPU, allocated" if env.get("peak_gpu_memory_gib")
                           else "host RAM (resident), whole process"))
    if s.get("base_model"):
        cards.append(card("base model", Path(str(s["base_model"])).name, s.get("device", "")))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def eval_section(ev: Optional[dict], run_dir: Path) -> str:
    if not ev:
        return ("<h2 id=\"eval\">Evaluation: base vs fine-tuned</h2>"
                f'<p class="note">No eval.json yet. Run <code>loraforge eval {escape(run_dir)}</code> for held-out loss, '
                "perplexity, task metrics and side-by-side answers of the base and the fine-tuned model; "
                "it updates this report.</p>")
    parts = ['<h2 id="eval">Evaluation: base vs fine-tuned</h2>',
             f'<p class="sub">{escape(ev.get("split_note", ""))} '
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
        rows.append([f"loss ({label})", b["loss"], t["loss"], delta(b["loss"], t["loss"], True), t.get("tokens")])
        rows.append([f"perplexity ({label})", b["perplexity"], t["perplexity"],
                     delta(b["perplexity"], t["perplexity"], True), t.get("tokens")])
    parts.append(table(rows, ["", "base", "fine-tuned", "change", "tokens"], "eval-loss"))
    if ev.get("loss_note"):
        parts.append(f'<p class="note">{escape(ev["loss_note"])}</p>')
    metrics = ev.get("metrics") or {}
    if metrics:
        mrows = [[name, v.get("base"), v.get("tuned"), delta(v.get("base"), v.get("tuned"), False), v.get("rows")]
                 for name, v in metrics.items()]
        parts.append(f'<h3>Task metrics on generated answers ({escape(ev.get("metric_rows"))} rows with references, '
                     f'greedy, up to {escape((ev.get("settings") or {}).get("max_new_tokens"))} new tokens)</h3>')
        parts.append(table(mrows, ["metric", "base", "fine-tuned", "change", "rows"], "eval-metrics"))
        if ev.get("metric_note"):
            parts.append(f'<p class="note">{escape(ev["metric_note"])}</p>')
    elif ev.get("metric_note"):
        parts.append(f'<p class="note">{escape(ev["metric_note"])}</p>')
    samples = ev.get("samples") or []
    if samples:
        parts.append("<h3>Answers side by side</h3>")
        srows = [[s.get("question", ""), s.get("base") or "(empty)", s.get("tuned") or "(empty)",
                  s.get("reference") or ""] for s in samples]
        parts.append(table(srows, ["prompt", "base", "fine-tuned", "reference"], "eval-samples", "wide",
                            numeric=False))
    return "\n".join(parts)


def curves_section(metrics: list[dict]) -> str:
    parts = ['<h2 id="training">Training</h2>']
    loss = loss_chart(metrics)
    if loss:
        parts.append(figure(loss, "loss curve", "Training loss per optimizer step, eval loss at evaluation steps "
                          "(mean per trained token), learning rate dashed on the right axis."))
    else:
        parts.append('<p class="note">No training steps logged yet (metrics.jsonl is empty).</p>')
    tput = throughput_chart(metrics)
    if tput:
        has_mem = any("peak_mem_gib" in r for r in metrics)
        parts.append(figure(tput, "throughput and memory",
                          "Tokens per second per step" + (", peak GPU memory allocated on the right axis."
                                                          if has_mem else " (peak memory over time is recorded on "
                                                          "GPUs only; see the peak memory figure above).")))
    evals = [r for r in metrics if "eval/loss" in r]
    if evals:
        parts.append(table([[r["step"], r["eval/loss"], r.get("eval/perplexity")] for r in evals],
                            ["step", "eval loss", "eval perplexity"], "eval-history"))
    return "\n".join(parts)


DATA_KEYS = (("rows.train", "training rows"), ("rows.eval", "eval rows"), ("rows.eval_from", "eval rows from"),
             ("template.name", "template"), ("train_on", "loss on"), ("max_length", "max_length"),
             ("truncation", "truncation"), ("over_max_length", "rows over max_length"), ("truncated", "truncated"),
             ("dropped_too_long", "dropped (too long)"), ("dropped_no_trainable", "dropped (nothing to train)"),
             ("train_tokens", "training tokens"), ("trained_tokens", "trained tokens"),
             ("trainable_share", "trained share of tokens"), ("boundary_straddles", "boundary-straddling tokens"),
             ("markers_in_text.rows", "rows with template markers in message text"))


def data_section(report: Optional[dict], run_dir: Path, max_length: Optional[int]) -> str:
    parts = ['<h2 id="data">Data</h2>']
    if not report:
        parts.append('<p class="note">No data_report.json in this run.</p>')
        return "\n".join(parts)
    flat = key_paths(report)
    png = run_dir / DATA_REPORT_CHART
    chart = None if png.is_file() else histogram_chart(report.get("histogram") or {}, report.get("max_length")
                                                           or max_length)
    if png.is_file():
        chart = base64.b64encode(png.read_bytes()).decode("ascii")
    if chart:
        parts.append(figure(chart, "token length histogram", "Token lengths per row after the chat template, "
                          "before truncation; the dashed line is data.max_length."))
    rows = [[label, flat[key]] for key, label in DATA_KEYS if key in flat]
    parts.append(table(rows, None, "data-report"))
    tokens = report.get("tokens") or {}
    if tokens:
        cols = ["min", "median", "p95", "max", "mean"]
        parts.append(table([[name] + [d.get(c) for c in cols] for name, d in tokens.items()],
                            ["tokens per row"] + cols, "token-lengths"))
    sources = report.get("sources") or []
    if sources:
        parts.append(table([[s.get("label") or s.get("path"), s.get("shape"), s.get("rows"), s.get("train_rows")]
                             for s in sources], ["source", "shape", "rows", "used for training"], "data-sources"))
    for w in report.get("warnings") or []:
        parts.append(f'<p class="warn">{escape(w)}</p>')
    examples = report.get("examples") or []
    if examples:
        parts.append(f'<h3>Rows as trained</h3><p class="note">{escape(report.get("legend", ""))}</p>')
        for ex in examples[:2]:
            parts.append(f'<p class="note">{escape(ex.get("where"))}: {escape(ex.get("tokens"))} tokens, '
                         f'{escape(ex.get("trained_tokens"))} trained</p><pre class="wrap">{escape(ex.get("marked"))}</pre>')
    return "\n".join(parts)


def train_samples_section(summary: Optional[dict]) -> str:
    samples = (summary or {}).get("samples") or []
    if not samples:
        return ""
    rows = [[s.get("question", ""), s.get("before") or "(empty)", s.get("after") or "(empty)",
             s.get("reference") or ""] for s in samples]
    return ('<h2 id="samples">Sample answers at the end of training</h2>'
            '<p class="sub">Greedy answers to held-out prompts, adapter off (before) and on (after).</p>'
            + table(rows, ["question", "before", "after", "reference"], "train-samples", "wide", numeric=False))


def environment_section(summary: Optional[dict]) -> str:
    from loraforge.environment import environment_info

    env = (summary or {}).get("environment")
    note = "recorded at the end of training"
    if not env:
        env, note = environment_info(None), "not recorded with the run: this machine, now, when the report was made"
    s = summary or {}
    rows = [["device", s.get("device") or env.get("device") or "–"],
            ["compute dtype", s.get("compute_dtype") or "–"],
            *fast_path_rows(s.get("fast_paths")),
            ["CPU", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"],
            ["GPUs", ", ".join(env.get("gpus") or []) or "none"],
            ["CUDA", env.get("cuda") or "–"],
            ["Python", env.get("python")], ["platform", env.get("platform")]]
    for key, label in (("peak_gpu_memory_gib", "peak GPU memory (allocated)"),
                       ("peak_host_memory_gib", "peak host memory (resident)")):
        if env.get(key) is not None:
            rows.append([label, f"{env[key]:.3f} GiB" if number(env[key]) is not None else env[key]])
    rows += [[name, version or "not installed"] for name, version in (env.get("versions") or {}).items()]
    return (f'<h2 id="environment">Hardware and libraries</h2><p class="sub">{escape(note)}.</p>'
            + table(rows, None, "environment", numeric=False))


def fast_path_rows(fast: Optional[dict]) -> list[list[str]]:
    """What train.fused_layers / liger_kernels / offload_activations became, and why any is off."""
    if not fast:
        return []
    return ([["fast paths on", ", ".join(fast.get("on") or []) or "none"]]
            + [[f"fast path off: {name}", why] for name, why in (fast.get("off") or {}).items()])


def config_section(run: Run) -> str:
    parts = ['<h2 id="config">Resolved config</h2>',
             '<p class="sub">config.yaml as training used it (secrets removed).</p>',
             f'<pre id="config-yaml">{escape(run.config_text)}</pre>']
    tpl = run.template_record
    if tpl:
        parts.append(f'<h3>Chat template: {escape(tpl.get("name"))}</h3>')
        if tpl.get("format"):
            parts.append(f'<pre id="template-format">{escape(tpl["format"])}</pre>')
    return "\n".join(parts)
