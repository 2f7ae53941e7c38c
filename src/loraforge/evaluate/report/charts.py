"""The report's charts: matplotlib figures (no pyplot, no global state) as base64 PNG."""
from __future__ import annotations

import base64
import io
import math
from typing import Optional


def new_figure(width=9.6, height=3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def png_base64(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def finite_points(records, key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [(s, v) for s, v in pts if math.isfinite(v)]


def loss_chart(metrics: list[dict]) -> Optional[str]:
    """Training loss per step, eval loss at its steps, learning rate on the right axis."""
    train, evals = finite_points(metrics, "loss"), finite_points(metrics, "eval/loss")
    lr = finite_points(metrics, "lr")
    if not train and not evals:
        return None
    fig = new_figure()
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
    return png_base64(fig)


def throughput_chart(metrics: list[dict]) -> Optional[str]:
    """Tokens/s per step; peak GPU memory on the right axis where it was recorded."""
    tps, mem = finite_points(metrics, "tokens_per_s"), finite_points(metrics, "peak_mem_gib")
    if not tps:
        return None
    fig = new_figure(height=3.0)
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
    return png_base64(fig)


def histogram_chart(hist: dict, max_length: Optional[int]) -> Optional[str]:
    """A length histogram from data_report.json's {bin_edges, counts}."""
    from loraforge.evaluate.report.markup import number

    edges, counts = hist.get("bin_edges") or [], hist.get("counts") or []
    if len(edges) != len(counts) + 1 or not any(counts) or None in map(number, [*edges, *counts]):
        return None  # also a hand-edited file: only numbers are drawn
    max_length = number(max_length)
    fig = new_figure(height=3.0)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, alpha=0.6, color="#2f6fde", label="rows")
    if max_length:
        ax.axvline(max_length, color="#b3261e", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return png_base64(fig)
