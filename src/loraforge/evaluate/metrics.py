"""Task metrics on generated answers: exact match, contains-reference, ROUGE-L, or your own callable.

A metric is `func(prediction: str, reference: str, row: dict) -> float` (bool counts as 0/1, None
leaves the row out of that metric's mean);
`row` has `index`, `messages` (the conversation up to the last user turn), `prompt` (the rendered
prompt string) and `reference`. Built-ins are named; a custom one is `module.path:function` or
`path/to/file.py:function`.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import string
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from loraforge.errors import UserError

MetricFn = Callable[[str, str, dict], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD-style answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, row: Optional[dict] = None) -> float:
    """1.0 when the normalized prediction equals the normalized reference."""
    return float(normalize(prediction) == normalize(reference))


def contains_reference(prediction: str, reference: str, row: Optional[dict] = None) -> float:
    """1.0 when the normalized reference appears in the normalized prediction (at word boundaries)."""
    ref = normalize(reference)
    if not ref:
        return float(not normalize(prediction))
    return float(f" {ref} " in f" {normalize(prediction)} ")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str, row: Optional[dict] = None) -> float:
    """ROUGE-L F1 (longest common subsequence of words), from Google's `rouge-score` package."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


BUILTIN: dict[str, MetricFn] = {
    "exact_match": exact_match,
    "contains": contains_reference,
    "rouge_l": rouge_l,
}
DEFAULT_METRICS = ("exact_match", "contains", "rouge_l")
ALIASES = {"em": "exact_match", "exact": "exact_match", "contains_reference": "contains",
           "rougeL": "rouge_l", "rouge-l": "rouge_l", "rouge": "rouge_l"}


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn

    def score(self, prediction: str, reference: str, row: dict) -> Optional[float]:
        try:
            value = self.fn(prediction, reference, row)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"metric {self.name} failed on row {row.get('index')}: {type(e).__name__}: {e}. "
                            "Fix the metric function (rerun with --debug for the traceback)") from e
        if value is None:
            return None  # not applicable to this row: left out of the mean
        try:
            number = float(value) if not isinstance(value, (str, bytes)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise UserError(f"metric {self.name} returned {value!r:.60} on row {row.get('index')}; "
                            "a metric must return a finite number, a bool, or None to leave the row out")
        return number


def load_callable(spec: str, cwd_importable: bool = True) -> MetricFn:
    """`package.module:function` or `path/to/file.py:function` -> the function; UserError if it cannot.
    `cwd_importable`: modules may come from the current folder (for a spec the user typed on this command line)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--metric {spec}: expected a built-in name ({', '.join(BUILTIN)}) or "
                        "module.path:function, e.g. mypkg.metrics:sql_match")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise UserError(f"--metric {spec}: file {path} not found")
        mod_id = f"loraforge_user_metric_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_id, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"--metric {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        cwd = str(Path.cwd())
        added = cwd_importable and cwd not in sys.path
        if added:  # the `loraforge` script does not put the working directory on the path
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--metric {spec}: cannot import module '{module_name}' ({e}). Check the name, and "
                            "that it is installed or importable from the current directory") from e
        except Exception as e:
            raise UserError(f"--metric {spec}: importing '{module_name}' failed: {type(e).__name__}: {e}") from e
        finally:
            if added:
                sys.path.remove(cwd)
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"--metric {spec}: '{module_name}' has no attribute '{attr}'"
                        + (f"; its functions: {', '.join(public[:10])}" if public else ""))
    if not callable(fn):
        raise UserError(f"--metric {spec}: '{attr}' is not callable")
    return fn


# loraforge's own metric functions, run from any config like the built-ins. Only these: other loraforge functions
# called as metric(prediction, reference, row) could do harm with a model's answer as their first argument.
PACKAGED = ("loraforge.evaluate.sql:execution_match",)
ALLOW_FLAG = "--allow-metric-code"


def _names(specs) -> list[str]:
    names: list[str] = []
    for spec in specs or DEFAULT_METRICS:
        names += [s.strip() for s in str(spec).split(",") if s.strip()]
    return list(dict.fromkeys(names))


def metric_code(specs) -> list[str]:
    """The specs that name code of their own (a file or a module), other than loraforge's PACKAGED metrics."""
    return [n for n in _names(specs) if ALIASES.get(n, n) not in BUILTIN and ":" in n and n not in PACKAGED]


def check_metric_code(specs, source: str, allowed: bool, alternative: str = "") -> None:
    """Refuse metric code named in a file (`source`: a run's or recipe's config) unless this command line allows
    it (`allowed`: --allow-metric-code); `alternative` adds another way to allow it."""
    named = metric_code(specs)
    if named and not allowed:
        raise UserError(f"refused to run metric code named in {source}: eval.metrics names {', '.join(named)}, "
                        "which is neither a built-in metric nor one of loraforge's, and code named in a file runs only "
                        f"when the command line asks. If you have read it and trust it, add {ALLOW_FLAG}{alternative}")


def resolve_metrics(specs, from_config: Optional[str] = None, allow_code: bool = False) -> list[Metric]:
    """Metric names/specs (comma-separated allowed) -> Metric objects; `none` -> no task metrics.

    `from_config`: the file the specs come from when the user did not type them on this command line; its
    metric code then runs only with `allow_code`, and never from the current folder."""
    names = _names(specs)
    if any(n.lower() == "none" for n in names):
        return []
    if from_config is not None:
        check_metric_code(names, from_config, allow_code, " (or name it yourself: --metric SPEC)")
    out: list[Metric] = []
    for name in names:
        key = ALIASES.get(name, name)
        if key in BUILTIN:
            out.append(Metric(key, BUILTIN[key]))
        elif ":" in name:
            out.append(Metric(name, load_callable(name, cwd_importable=from_config is None)))
        else:
            import difflib

            close = difflib.get_close_matches(name, [*BUILTIN, *ALIASES], n=1)
            hint = f" Did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
            raise UserError(f"--metric {name}: unknown metric.{hint} Built-in: {', '.join(BUILTIN)}; "
                            "or give module.path:function for your own")
    return out


def mean_scores(per_row: list[dict[str, Optional[float]]], metrics: list[Metric]) -> dict[str, dict]:
    """{metric: {"mean": mean over rows where it applied (None if none), "rows": how many}}."""
    out = {}
    for m in metrics:
        values = [r[m.name] for r in per_row if r.get(m.name) is not None]
        out[m.name] = {"mean": sum(values) / len(values) if values else None, "rows": len(values)}
    return out
