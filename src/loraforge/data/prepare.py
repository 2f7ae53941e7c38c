"""`prepare`: sources -> checked examples -> held-out split -> tokens + masks -> mix -> report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from loraforge.config import DatasetSource, DataSettings
from loraforge.data import report as rep
from loraforge.data.control_tokens import control_pattern
from loraforge.data.mixing import carve_eval, mix
from loraforge.data.shapes import Example, RowConverter, RowError, detect_shape, resolve_columns
from loraforge.data.sources import LoadedSource, bundled_path, load_source
from loraforge.data.templates import ChatTemplate, Segment, get_template
from loraforge.data.tokenize import IGNORE, encode_batch, encode_prompt, encode_tokens, truncate
from loraforge.errors import UserError

MAX_LISTED = 10  # bad rows listed in one error message
N_SAMPLES = 5
N_EXAMPLES = 3
N_MARKED_SHOWN = 5  # rows with a template marker in their message text, listed in the report


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    samples: list[dict]
    report: dict
    template: ChatTemplate
    lengths: dict = field(default_factory=dict)  # per row before truncation: total / prompt / response

    def template_record(self) -> dict:
        """What the trainer writes to template.json so generation uses exactly this template."""
        return self.template.record()


def prepare(data_cfg: DataSettings, tokenizer, *, log: Callable[[str], None] = print) -> PreparedData:
    template = get_template(data_cfg.template, tokenizer, system_prompt=data_cfg.system_prompt)
    _check_settings(data_cfg)
    bundled = data_cfg.datasets is None
    if bundled:
        if not bundled_path().is_file():
            raise UserError(f"the bundled dataset {bundled_path()} is missing; reinstall loraforge or set data.datasets.")
        sources = [DatasetSource(path=str(bundled_path()), format="text")]
    else:
        sources = list(data_cfg.datasets)
    # The bundled rows are written in llama2 format whatever template the run uses.
    text_template = get_template("llama2", tokenizer) if bundled and template.name != "llama2" else None
    vocab = len(tokenizer)

    pools, infos, loaded_all = [], [], []
    for i, src in enumerate(sources):
        loaded = load_source(src)
        examples, info = _convert(loaded, src, i, template, data_cfg, text_template, vocab)
        pools.append(examples)
        infos.append(info)
        loaded_all.append(loaded)
        how = "detected" if src.format == "auto" else "as configured"
        log(f"data: {loaded.label}: {len(examples)} rows, shape {info['shape']} ({how})")

    if data_cfg.eval_split:
        ev_loaded = load_source(sources[0], split=data_cfg.eval_split)
        eval_examples, _ = _convert(ev_loaded, sources[0], len(sources), template, data_cfg, text_template, vocab)
        loaded_all.append(ev_loaded)
        eval_from = f"split '{data_cfg.eval_split}' of {sources[0].path}"
    else:
        pools, eval_examples = carve_eval(pools, data_cfg.eval_fraction, data_cfg.eval_size, data_cfg.seed)
        eval_from = ("eval_size" if data_cfg.eval_size else "eval_fraction") if eval_examples else None

    train_all = data_cfg.train_on == "all"
    stats = _Stats()
    enc_pools = [_encode(p, template, tokenizer, train_all, data_cfg, stats, loaded_all) for p in pools]
    enc_eval = _encode(eval_examples, template, tokenizer, train_all, data_cfg, stats, loaded_all)

    if data_cfg.mix == "concat" and (data_cfg.mix_size or (len(sources) > 1 and any(s.weight for s in sources))):
        log("data: note: source weights and mix_size are ignored with data.mix: concat (set mix: weighted)")
    mixed, taken = mix(enc_pools, [s.weight for s in sources], data_cfg.mix, data_cfg.seed, data_cfg.mix_size)
    if not mixed:
        raise UserError(_all_dropped_message(stats, data_cfg))
    train = [{"input_ids": e.input_ids, "labels": e.labels} for _, e in mixed]
    evals = [{"input_ids": e.input_ids, "labels": e.labels} for _, e in enc_eval]
    for info, n in zip(infos, taken):
        info["train_rows"] = n

    samples = _samples([ex for ex, _ in enc_eval]) or _samples([ex for ex, _ in mixed])
    report = _report(data_cfg, template, infos, train, evals, eval_from, stats, mixed, loaded_all, tokenizer)
    for line in _summary_lines(report):
        log(line)
    return PreparedData(train=train, eval=evals, samples=samples, report=report, template=template,
                        lengths=stats.lengths)


def _check_settings(cfg: DataSettings) -> None:
    if cfg.eval_split and (cfg.eval_fraction or cfg.eval_size):
        raise UserError("data.eval_split takes an existing split; leave eval_fraction and eval_size out with it.")
    if cfg.eval_fraction and cfg.eval_size:
        raise UserError("set either data.eval_fraction or data.eval_size, not both.")


def _convert(loaded: LoadedSource, src: DatasetSource, key: int, template, cfg, text_template, vocab):
    """Check and convert every row of one loaded source; `key` indexes `loaded` in the caller's list."""
    columns = loaded.columns
    fields = resolve_columns(columns, src.columns, loaded.label)
    shape = detect_shape(fields, columns, loaded.label, src.format)
    convert = RowConverter(shape, fields, template, train_on=cfg.train_on, system_prompt=src.system_prompt,
                           text_template=text_template, vocab_size=vocab)
    needed = sorted(set(fields.values()))
    ds = loaded.dataset.select_columns(needed) if needed else loaded.dataset
    examples, problems, n_bad, index = [], [], 0, 0
    for batch in ds.iter(batch_size=1000):
        n = len(next(iter(batch.values()))) if batch else 0
        for k in range(n):
            row = {c: batch[c][k] for c in batch}
            try:
                examples.append(convert(row, key, index))
            except RowError as e:
                n_bad += 1
                if len(problems) < MAX_LISTED:
                    problems.append(f"  {loaded.where(index)}: {e}")
            index += 1
    if n_bad:
        more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
        raise UserError(f"{loaded.label}: {n_bad} bad row(s) (shape {shape}):\n" + "\n".join(problems) + more)
    if not examples:
        raise UserError(f"{loaded.label}: no rows (split '{src.split}'). Check the file or the split.")
    info = {"path": src.path, "label": loaded.label, "kind": loaded.kind, "split": src.split, "shape": shape,
            "shape_detected": src.format == "auto", "columns": fields, "rows": len(examples),
            "weight": src.weight}
    return examples, info


class _Stats:
    def __init__(self):
        self.lengths = {"total": [], "prompt": [], "response": []}
        self.over = self.truncated = self.dropped_long = self.dropped_empty = self.straddles = 0
        self.prompts_checked = self.prompt_mismatches = self.unlabelled = 0
        self.dropped: list[tuple] = []  # (example, reason)
        self.marked = 0  # rows whose message text holds one of the template's markers
        self.marked_shown: list[dict] = []  # the first few: where, and the marker


def _encode(examples: list[Example], template, tokenizer, train_all, cfg, stats: _Stats, loaded):
    """Encode, count over-long rows, truncate or drop; returns [(example, Encoded)] of kept rows."""
    seg_items, seg_idx, encs = [], [], [None] * len(examples)
    for k, ex in enumerate(examples):
        if ex.messages is not None:
            _count_markers(ex, template, stats, loaded)
            try:
                seg_items.append(template.rendered(ex.messages))
            except UserError as e:  # a Jinja template that rewrites this row's text
                raise UserError(f"{_where(ex, loaded)}: {e}") from None
            seg_idx.append(k)
        elif ex.text is not None:
            seg_items.append([Segment(ex.text, True)])
            seg_idx.append(k)
        else:
            encs[k] = encode_tokens(ex.input_ids, ex.labels, train_all)
            stats.unlabelled += ex.labels is None and not train_all
    for k, enc in zip(seg_idx, encode_batch(seg_items, tokenizer, train_all, template.control_tokens)):
        encs[k] = enc
    _check_prompt_tokens(examples, encs, template, tokenizer, stats)
    kept = []
    for ex, enc in zip(examples, encs):
        n_resp = sum(enc.response)
        stats.lengths["total"].append(len(enc.input_ids))
        stats.lengths["response"].append(n_resp)
        stats.lengths["prompt"].append(len(enc.input_ids) - n_resp)
        stats.straddles += enc.straddles
        if len(enc.input_ids) > cfg.max_length:
            stats.over += 1
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                stats.dropped.append((ex, f"{len(enc.input_ids)} tokens > max_length {cfg.max_length}", loaded))
                continue
            enc = truncate(enc, cfg.max_length)
            stats.truncated += 1
        if not any(lab != IGNORE for lab in enc.labels):
            stats.dropped_empty += 1
            stats.dropped.append((ex, "no trainable token left after truncation", loaded))
            continue
        kept.append((ex, enc))
    return kept


def _check_prompt_tokens(examples, encs, template, tokenizer, stats: _Stats, limit: int = 8) -> None:
    """For a few rows: does the inference prompt of each reply tokenize to the training prefix?

    The strings always match byte for byte; the tokens can differ where a tokenizer merges text
    across the prompt/response boundary (e.g. GPT-2's whitespace split). Counted for the report.
    """
    checked = 0
    for ex, enc in zip(examples, encs):
        if ex.messages is None or checked >= limit:
            continue
        checked += 1
        turns = [k for k, m in enumerate(ex.messages) if m["role"] == "assistant"]
        starts = [i for i, r in enumerate(enc.response) if r and (i == 0 or not enc.response[i - 1])]
        for k, start in zip(turns, starts):
            stats.prompts_checked += 1
            if encode_prompt(template, ex.messages[:k]) != enc.input_ids[:start]:
                stats.prompt_mismatches += 1


def _count_markers(ex: Example, template, stats: _Stats, loaded) -> None:
    """Count a row whose message text holds one of the template's markers; keep the first few to show."""
    pattern = control_pattern(template.markers)
    found = next((m for m in (pattern.search(msg["content"]) for msg in ex.messages) if m), None)
    if found is None:
        return
    marker = found.group(0)
    stats.marked += 1
    if len(stats.marked_shown) < N_MARKED_SHOWN:
        stats.marked_shown.append({"where": _where(ex, loaded), "marker": marker})


def _all_dropped_message(stats: _Stats, cfg) -> str:
    return (
        f"every training row was dropped: {stats.dropped_long} longer than max_length={cfg.max_length} "
        f"(truncation: {cfg.truncation}), {stats.dropped_empty} with no response token left within max_length. "
        "Raise data.max_length" + (", or use truncation: truncate" if cfg.truncation != "truncate" else "")
        + ", or shorten the prompts."
    )


def _samples(examples: list[Example]) -> list[dict]:
    out, seen = [], set()
    for ex in examples:
        if ex.messages is None or id(ex) in seen:
            continue
        seen.add(id(ex))
        msgs = ex.messages
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"messages": [dict(m) for m in msgs[:last]], "reference": msgs[last]["content"].strip()})
        if len(out) == N_SAMPLES:
            break
    return out


def _where(ex: Example, loaded: list[LoadedSource]) -> str:
    src = loaded[ex.source]
    return f"{src.label} {src.where(ex.index)}" if src.kind != "glob" else src.where(ex.index)


def _report(cfg, template, infos, train, evals, eval_from, stats: _Stats, mixed, loaded, tokenizer) -> dict:
    tokens = sum(len(r["input_ids"]) for r in train)
    trained = sum(1 for r in train for lab in r["labels"] if lab != IGNORE)
    examples, used_sources, seen = [], set(), set()
    for pick_new_source in (True, False):  # one example per source first, then fill up
        for ex, enc in mixed:
            if len(examples) == N_EXAMPLES:
                break
            if id(ex) in seen or (pick_new_source and ex.source in used_sources):
                continue
            seen.add(id(ex))
            used_sources.add(ex.source)
            runs = rep.marked_segments(enc, tokenizer)
            examples.append({"where": _where(ex, loaded), "tokens": len(enc.input_ids),
                             "trained_tokens": sum(1 for lab in enc.labels if lab != IGNORE),
                             "marked": rep.marked_text(runs), "segments": runs})
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
    return {
        "template": {"name": template.name, "system_prompt": template.system_prompt},
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "train_on": cfg.train_on,
        "mix": cfg.mix,
        "seed": cfg.seed,
        "sources": infos,
        "rows": {"train": len(train), "eval": len(evals), "eval_from": eval_from},
        "tokens": {k: rep.distribution(v) for k, v in stats.lengths.items()},
        "over_max_length": stats.over,
        "truncated": stats.truncated,
        "dropped_too_long": stats.dropped_long,
        "dropped_no_trainable": stats.dropped_empty,
        "dropped_rows": [{"where": _where(ex, ld), "reason": why} for ex, why, ld in stats.dropped[:20]],
        "trainable_share": round(trained / tokens, 4) if tokens else 0.0,
        "train_tokens": tokens,
        "trained_tokens": trained,
        "boundary_straddles": stats.straddles,
        "prompt_token_check": {"checked": stats.prompts_checked, "mismatches": stats.prompt_mismatches},
        "markers_in_text": {"rows": stats.marked, "shown": stats.marked_shown},
        "histogram": rep.histogram(stats.lengths["total"], cfg.max_length),
        "lengths": rep.sample_lengths(stats.lengths),
        "legend": rep.LEGEND,
        "examples": examples,
        "warnings": warnings,
    }


def _summary_lines(report: dict) -> list[str]:
    t = report["tokens"]["total"]
    lines = [
        f"data: {report['rows']['train']} train / {report['rows']['eval']} eval rows; template {report['template']['name']}, "
        f"loss on {report['train_on']}; tokens per row min {t['min']} / median {t['median']} / p95 {t['p95']} / max {t['max']}; "
        f"{report['trainable_share']:.0%} of train tokens trained"
    ]
    lines += [f"data: warning: {w}" for w in report["warnings"]]
    return lines
