"""The run report: one self-contained `report.html` (inline CSS, base64 PNG charts, no JavaScript).

Built only from the files in the run directory (config.yaml, summary.json, metrics.jsonl,
data_report.json, template.json, eval.json; read through `loraforge.rundir`), so it can be
regenerated at any time, also for a run that is still going or was stopped: `loraforge report RUN_DIR`.

`charts` draws, `markup` has the HTML pieces, `sections` builds each part, `styles.css` is the style sheet.
"""
from __future__ import annotations

import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

from loraforge.atomic import write_text_whole
from loraforge.evaluate.report.markup import escape
from loraforge.evaluate.report.sections import (config_section, curves_section, data_section, environment_section,
                                                eval_section, overview, train_samples_section)
from loraforge.rundir import (CONFIG_FILE, DATA_REPORT_FILE, EVAL_FILE, METRICS_FILE, REPORT_FILE, SUMMARY_FILE,
                              TEMPLATE_FILE, read_run)


@lru_cache(maxsize=1)
def styles() -> str:
    """The style sheet inlined into every report (a packaged file, so it reads as CSS)."""
    return resources.files(__package__).joinpath("styles.css").read_text(encoding="utf-8")


def build_report(run_dir: Path) -> str:
    """The report's HTML for `run_dir`."""
    import yaml

    run = read_run(run_dir)
    run_dir = run.run_dir
    try:
        cfg = yaml.safe_load(run.config_text) or {}
    except yaml.YAMLError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    data_cfg = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    title = f"loraforge run {run_dir.resolve().name}"
    description = str(cfg.get("description") or "").strip()
    state = "finished" if run.summary else "in progress or stopped (no summary.json yet)"
    body = [
        "<header>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(description) + " · " if description else ""}{escape(run_dir.resolve())} · {state} · '
        f'report written {escape(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>',
        '<nav><a href="#eval">evaluation</a><a href="#training">training</a><a href="#data">data</a>'
        '<a href="#samples">samples</a><a href="#environment">hardware</a><a href="#config">config</a></nav>',
        "</header>",
        drawn(overview, "summary.json, eval.json", run),
        drawn(eval_section, EVAL_FILE, run.eval_result, run_dir),
        drawn(curves_section, METRICS_FILE, run.metrics),
        drawn(data_section, DATA_REPORT_FILE, run.data_report, run_dir, data_cfg.get("max_length")),
        drawn(train_samples_section, SUMMARY_FILE, run.summary),
        drawn(environment_section, SUMMARY_FILE, run.summary),
        drawn(config_section, TEMPLATE_FILE, run),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>\n{styles()}</style></head>\n<body><main>\n"
            + "\n".join(p for p in body if p) + "\n</main></body></html>\n")


def drawn(section, source: str, *inputs) -> str:
    """One section's HTML; a run folder's file of an unexpected shape (hand-edited, another version, or made to
    harm) leaves that section out with a note naming it, and the rest of the report still builds."""
    try:
        return section(*inputs)
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
        return (f'<p class="warn">{escape(source)}: unexpected content ({escape(type(e).__name__)}: '
                f'{escape(str(e)[:200])}); this part of the report is left out.</p>')


def write_report(run_dir: Path) -> Path:
    """Write `report.html` into the run directory, whole (never half a page); return its path."""
    run_dir = Path(run_dir)
    return write_text_whole(run_dir / REPORT_FILE, build_report(run_dir))


def write_report_safely(run_dir: Path, say=print) -> Optional[Path]:
    """write_report for the end of training: a failure is a warning, never the run's failure."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        return None  # training failed before it wrote anything worth reporting
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the adapter is saved; the report is a convenience
        say(f"warning: could not write {Path(run_dir) / REPORT_FILE}: {type(e).__name__}: {e}. "
            f"Regenerate it with: loraforge report {run_dir}")
        return None
