"""The data report: length distribution, truncation, trainable share, marked examples; JSON + PNG."""
from __future__ import annotations

import json
import math
from pathlib import Path

from loraforge.rundir import DATA_REPORT_CHART, DATA_REPORT_FILE

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"  # marks text that is masked (no loss) in rendered examples
LEGEND = f"{MASK_OPEN}…{MASK_CLOSE} is masked (no loss); everything else is trained"


def _array(values):
    import numpy as np

    return np.asarray(values, dtype=np.int64)  # an int array (array('i')) converts without a list of ints


def distribution(values) -> dict:
    if not len(values):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0.0}
    v = _array(values)
    v.sort()

    def q(p):  # nearest-rank percentile
        return int(v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))])

    return {"min": int(v[0]), "median": q(0.5), "p95": q(0.95), "max": int(v[-1]),
            "mean": round(float(v.sum()) / len(v), 1)}


def histogram(values, max_length: int, bins: int = 30) -> dict:
    import numpy as np

    if not len(values):
        return {"bin_edges": [], "counts": []}
    v = _array(values)
    hi = max(int(v.max()), max_length) + 1
    width = max(1, math.ceil(hi / bins))
    edges = list(range(0, width * bins + 1, width))
    counts = np.bincount(np.minimum(v // width, bins - 1), minlength=bins)
    return {"bin_edges": edges, "counts": [int(c) for c in counts]}


def sample_lengths(lengths: dict, cap: int = 20000) -> dict:
    """Per-row lengths for the JSON report (for plots); evenly subsampled above `cap` rows."""
    n = len(lengths.get("total", []))
    if n <= cap:
        return {k: [int(x) for x in v] for k, v in lengths.items()}
    step = n / cap
    idx = [int(i * step) for i in range(cap)]
    return {k: [v[i] for i in idx] for k, v in lengths.items()}


def summary_lines(report: dict) -> list[str]:
    """What `prepare` logs: rows, template, the length distribution, the trained share, warnings."""
    t = report["tokens"]["total"]
    lines = [
        f"data: {report['rows']['train']} train / {report['rows']['eval']} eval rows; template {report['template']['name']}, "
        f"loss on {report['train_on']}; tokens per row min {t['min']} / median {t['median']} / p95 {t['p95']} / max {t['max']}; "
        f"{report['trainable_share']:.0%} of train tokens trained"
    ]
    lines += [f"data: warning: {w}" for w in report["warnings"]]
    return lines


def marked_segments(enc, tokenizer) -> list[dict]:
    """The kept text of an encoded row as [{text, trainable}] runs, following the real labels."""
    runs: list[dict] = []
    if enc.text is not None and enc.offsets:
        starts = [s for s, _ in enc.offsets]
        end = enc.offsets[-1][1]
        for k, (start, lab) in enumerate(zip(starts, enc.labels)):
            stop = starts[k + 1] if k + 1 < len(starts) else end
            _add(runs, enc.text[start:stop], lab != -100)
    else:  # tokens shape: decode runs of tokens
        group, flag = [], None
        for tok, lab in zip(enc.input_ids, enc.labels):
            if flag is not None and (lab != -100) != flag:
                _add(runs, tokenizer.decode(group), flag)
                group = []
            group.append(tok)
            flag = lab != -100
        if group:
            _add(runs, tokenizer.decode(group), flag)
    return runs


def _add(runs, text, trainable):
    if runs and runs[-1]["trainable"] == trainable:
        runs[-1]["text"] += text
    else:
        runs.append({"text": text, "trainable": trainable})


def marked_text(runs: list[dict]) -> str:
    return "".join(r["text"] if r["trainable"] else f"{MASK_OPEN}{r['text']}{MASK_CLOSE}" for r in runs)


def warnings(stats, cfg) -> list[str]:
    """What the data report warns about, from prepare's counts (`stats`) and the data settings."""
    warnings = []
    if stats.over:
        action = "dropped" if cfg.truncation == "drop" else "truncated (the start is kept)"
        warnings.append(f"{stats.over} row(s) are longer than max_length={cfg.max_length} and were {action}; "
                        "raise data.max_length to keep them whole.")
    if stats.dropped_empty:
        warnings.append(f"{stats.dropped_empty} row(s) had no response token within max_length and were dropped.")
    if stats.straddles:
        warnings.append(f"{stats.straddles} token(s) cross a prompt/response boundary; the template's markers "
                        "merge with the text for this tokenizer, so those tokens were assigned by where they start.")
    if stats.estimated:
        warnings.append(f"{stats.estimated} row(s) are so long that they were tokenized only as far as max_length "
                        "needs; their full lengths in these statistics are estimated from the part tokenized.")
    if stats.unlabelled:
        warnings.append(f"{stats.unlabelled} pre-tokenized row(s) have no labels: every token is trained. "
                        "Add a labels column (-100 for prompt tokens) for loss on responses only.")
    if stats.marked:
        first = stats.marked_shown[0]
        warnings.append(f"{stats.marked} row(s) hold the template's markers in their message text (first: "
                        f"{first['where']}: {first['marker']!r}). Message text is tokenized as text, so a special "
                        "token there (<|im_end|>, </s>) is not a turn boundary; a marker that is plain text "
                        "([INST], ### HUMAN:) reads the same as the template's own.")
    if stats.prompt_mismatches:
        warnings.append(f"for {stats.prompt_mismatches} of {stats.prompts_checked} checked replies the inference "
                        "prompt tokenizes differently from the training text before the reply (this tokenizer "
                        "merges whitespace across the boundary); the strings are identical, the tokens are not.")
    return warnings


def write_data_report(prepared, run_dir) -> tuple[Path, Path]:
    """Write data_report.json and data_report.png (lengths next to max_length) into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from loraforge.atomic import write_text_whole, written_whole

    json_path, png_path = run_dir / DATA_REPORT_FILE, run_dir / DATA_REPORT_CHART
    write_text_whole(json_path, json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n")
    with written_whole(png_path) as tmp:
        plot_lengths(prepared.lengths, prepared.report["max_length"], tmp)
    return json_path, png_path


def plot_lengths(lengths: dict, max_length: int, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    total = _array(lengths.get("total", []))
    fig = Figure(figsize=(7, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if len(total):
        hi = max(int(total.max()), max_length)
        bins = 40
        ax.hist([_array(lengths.get("prompt", [])), _array(lengths.get("response", []))], bins=bins, range=(0, hi),
                stacked=False, histtype="step", label=["prompt tokens", "response tokens"], color=["#888", "#2a7"])
        ax.hist(total, bins=bins, range=(0, hi), alpha=0.35, color="#36c", label="total tokens")
    ax.axvline(max_length, color="#c33", linestyle="--", label=f"max_length = {max_length}")
    over = int((total > max_length).sum())
    ax.set_title(f"Token lengths of {len(total)} rows ({over} over max_length)")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
