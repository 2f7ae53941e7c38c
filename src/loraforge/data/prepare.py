"""`prepare`: sources -> checked examples -> held-out split -> tokens + masks -> mix -> report.

One pass over each source's rows (datasets' memory-mapped Arrow files): each row is converted, tokenized
(a long row only as far as max_length needs, `tokenize.encode_rows`), counted, and kept in a compact store
(`rows.TokenStore`); nothing else per row is held. The held-out rows are chosen from the row counts before
the pass. The few rows the report shows are read again by position.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Callable, Optional

from loraforge.config import DatasetSource, DataSettings
from loraforge.data import report as rep
from loraforge.data.control_tokens import control_pattern
from loraforge.data.mixing import held_out, mix
from loraforge.data.rows import TokenRows, TokenStore
from loraforge.data.shapes import Example, RowConverter, RowError, detect_shape, resolve_columns
from loraforge.data.sources import LoadedSource, bundled_path, load_source, release_unused_memory
from loraforge.data.templates import ChatTemplate, Segment, get_template
from loraforge.data.tokenize import IGNORE, Encoded, encode_prompt, encode_rows, encode_tokens, truncate
from loraforge.errors import UserError

MAX_LISTED = 10  # bad rows listed in one error message
MAX_DROPPED = 20  # dropped rows named in the report
N_SAMPLES = 5
N_EXAMPLES = 3
READ_BATCH = 1000  # rows read from Arrow at a time
ENCODE_BATCH = 256  # rows tokenized in one call
N_MARKED_SHOWN = 5  # rows with a template marker in their message text, listed in the report


@dataclass
class PreparedData:
    train: TokenRows  # a sequence of {"input_ids": [...], "labels": [...]}
    eval: TokenRows
    samples: list[dict]
    report: dict
    template: ChatTemplate
    lengths: dict = field(default_factory=dict)  # per row before truncation: total / prompt / response (int arrays)

    def template_record(self) -> dict:
        """What the trainer writes to template.json so generation uses exactly this template."""
        return self.template.record()


def prepare(data_cfg: DataSettings, tokenizer, *, log: Callable[[str], None] = print,
            keep_tokens: bool = True) -> PreparedData:
    """`keep_tokens=False` (`data inspect`): count and report, without keeping the token rows (then
    `.train[i]` raises; lengths and counts are there)."""
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
    settings = (template, data_cfg, text_template, len(tokenizer))

    readers = [_Reader(load_source(src), src, i, *settings) for i, src in enumerate(sources)]
    if data_cfg.eval_split:
        eval_reader = _Reader(load_source(sources[0], split=data_cfg.eval_split), sources[0], len(sources), *settings)
        held, eval_from = set(), f"split '{data_cfg.eval_split}' of {sources[0].path}"
    else:
        eval_reader = None
        held = held_out([len(r) for r in readers], data_cfg.eval_fraction, data_cfg.eval_size, data_cfg.seed)
        eval_from = ("eval_size" if data_cfg.eval_size else "eval_fraction") if held else None

    encoder = _Encoder(template, tokenizer, data_cfg)
    store, stats = TokenStore(keep_tokens), _Stats()
    pools, eval_picks, first = [], array("q"), 0
    for reader in readers:
        pool = array("q")
        _stream(reader, encoder, store, stats, pool, eval_picks, lambda k, at=first: at + k in held)
        pools.append(pool)
        first += len(reader)
        how = "detected" if reader.src.format == "auto" else "as configured"
        log(f"data: {reader.loaded.label}: {len(reader)} rows, shape {reader.shape} ({how})")
    if eval_reader is not None:
        _stream(eval_reader, encoder, store, stats, eval_picks, eval_picks, lambda k: True)
    all_readers = readers + ([eval_reader] if eval_reader else [])

    if data_cfg.mix == "concat" and (data_cfg.mix_size or (len(sources) > 1 and any(s.weight for s in sources))):
        log("data: note: source weights and mix_size are ignored with data.mix: concat (set mix: weighted)")
    mixed, taken = mix(pools, [s.weight for s in sources], data_cfg.mix, data_cfg.seed, data_cfg.mix_size)
    if not mixed:
        raise UserError(_all_dropped_message(stats, data_cfg))
    train, evals = TokenRows(store, mixed), TokenRows(store, eval_picks)
    infos = [r.info() for r in readers]
    for info, n in zip(infos, taken):
        info["train_rows"] = n

    samples = _samples(stats.eval_chats) or _samples(_chats(store, mixed, all_readers))
    report = _report(data_cfg, template, infos, train, evals, eval_from, stats, store, all_readers, encoder)
    for line in rep.summary_lines(report):
        log(line)
    release_unused_memory()
    return PreparedData(train=train, eval=evals, samples=samples, report=report, template=template,
                        lengths=stats.lengths)


def _check_settings(cfg: DataSettings) -> None:
    if cfg.eval_split and (cfg.eval_fraction or cfg.eval_size):
        raise UserError("data.eval_split takes an existing split; leave eval_fraction and eval_size out with it.")
    if cfg.eval_fraction and cfg.eval_size:
        raise UserError("set either data.eval_fraction or data.eval_size, not both.")


class _Reader:
    """One loaded source: its columns and shape checked, its rows converted to Examples one by one."""

    def __init__(self, loaded: LoadedSource, src: DatasetSource, key: int, template, cfg, text_template, vocab):
        columns = loaded.columns
        fields = resolve_columns(columns, src.columns, loaded.label)
        self.shape = detect_shape(fields, columns, loaded.label, src.format)
        self.convert = RowConverter(self.shape, fields, template, train_on=cfg.train_on,
                                    system_prompt=src.system_prompt, text_template=text_template, vocab_size=vocab)
        needed = sorted(set(fields.values()))
        self.ds = loaded.dataset.select_columns(needed) if needed else loaded.dataset
        self.loaded, self.src, self.key, self.fields = loaded, src, key, fields
        if not len(self.ds):
            raise UserError(f"{loaded.label}: no rows (split '{src.split}'). Check the file or the split.")

    def __len__(self) -> int:
        return len(self.ds)

    def examples(self):
        """Every row as an Example, in order; bad rows are listed together at the end (UserError)."""
        problems, n_bad, index = [], 0, 0
        for batch in self.ds.iter(batch_size=READ_BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for k in range(n):
                try:
                    ex = self.convert({c: batch[c][k] for c in batch}, self.key, index)
                except RowError as e:
                    n_bad += 1
                    if len(problems) < MAX_LISTED:
                        problems.append(f"  {self.loaded.where(index)}: {e}")
                else:
                    if not n_bad:  # after a bad row the rest are only checked
                        yield ex
                index += 1
        if n_bad:
            more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
            raise UserError(f"{self.loaded.label}: {n_bad} bad row(s) (shape {self.shape}):\n" + "\n".join(problems)
                            + more)

    def example_at(self, index: int) -> Example:
        return self.convert(self.ds[index], self.key, index)

    def where(self, index: int) -> str:
        src = self.loaded
        return f"{src.label} {src.where(index)}" if src.kind != "glob" else src.where(index)

    def info(self) -> dict:
        src = self.src
        return {"path": src.path, "label": self.loaded.label, "kind": self.loaded.kind, "split": src.split,
                "shape": self.shape, "shape_detected": src.format == "auto", "columns": self.fields,
                "rows": len(self), "weight": src.weight}


class _Encoder:
    """Examples -> Encoded rows (template, tokens and masks), a long row only as far as max_length needs."""

    def __init__(self, template, tokenizer, cfg: DataSettings):
        self.template, self.tokenizer, self.cfg = template, tokenizer, cfg
        self.train_all = cfg.train_on == "all"

    def encode(self, examples: list[Example], where: Callable[[Example], str], stats: Optional["_Stats"] = None
               ) -> list[Encoded]:
        """`where(example)` names a row in an error; `stats` (when given) counts rows with markers in their text."""
        items, picked, out = [], [], [None] * len(examples)
        for k, ex in enumerate(examples):
            if ex.messages is not None:
                if stats is not None:
                    stats.count_markers(ex, self.template, where)
                try:
                    items.append(self.template.rendered(ex.messages))
                except UserError as e:  # a Jinja template that rewrites this row's text
                    raise UserError(f"{where(ex)}: {e}") from None
                picked.append(k)
            elif ex.text is not None:
                items.append([Segment(ex.text, True)])
                picked.append(k)
            else:
                out[k] = encode_tokens(ex.input_ids, ex.labels, self.train_all)
        encs = encode_rows(items, self.tokenizer, self.train_all, self.cfg.max_length, self.template.control_tokens)
        for k, enc in zip(picked, encs):
            out[k] = enc
        return out

    def kept(self, enc: Encoded) -> Encoded:
        """The row as trained (cut to max_length), for the report's examples."""
        return truncate(enc, self.cfg.max_length) if len(enc.input_ids) > self.cfg.max_length else enc


class _Stats:
    def __init__(self):
        self.lengths = {"total": array("i"), "prompt": array("i"), "response": array("i")}
        self.over = self.truncated = self.dropped_long = self.dropped_empty = self.straddles = self.estimated = 0
        self.prompts_checked = self.prompt_mismatches = self.unlabelled = 0
        self.dropped: list[tuple] = []  # (source key, row index, reason), the first MAX_DROPPED
        self.eval_chats: list[Example] = []  # the first kept held-out conversations, for samples
        self.marked = 0  # rows whose message text holds one of the template's markers
        self.marked_shown: list[dict] = []  # the first few: where, and the marker

    def count_markers(self, ex: Example, template, where: Callable[[Example], str]) -> None:
        """Count a row whose message text holds one of the template's markers; keep the first few to show."""
        pattern = control_pattern(template.markers)
        found = next((m for m in (pattern.search(msg["content"]) for msg in ex.messages) if m), None)
        if found is None:
            return
        self.marked += 1
        if len(self.marked_shown) < N_MARKED_SHOWN:
            self.marked_shown.append({"where": where(ex), "marker": found.group(0)})

    def drop(self, ex: Example, reason: str) -> None:
        if len(self.dropped) < MAX_DROPPED:
            self.dropped.append((ex.source, ex.index, reason))


def _stream(reader: _Reader, encoder: _Encoder, store: TokenStore, stats: _Stats, pool: array, eval_picks: array,
            is_held: Callable[[int], bool]) -> None:
    """Read, encode and count every row of `reader`; a kept row goes to the store, and its number to
    `eval_picks` if `is_held(row index)`, else to `pool` (the source's training rows)."""
    batch, checked = [], 0
    for ex in reader.examples():
        batch.append(ex)
        if len(batch) == ENCODE_BATCH:
            checked = _keep(batch, encoder, store, stats, pool, eval_picks, is_held, checked, reader.where)
            batch = []
    if batch:
        _keep(batch, encoder, store, stats, pool, eval_picks, is_held, checked, reader.where)


def _keep(examples: list[Example], encoder: _Encoder, store: TokenStore, stats: _Stats, pool: array,
          eval_picks: array, is_held: Callable[[int], bool], checked: int, where: Callable[[int], str]) -> int:
    """One batch of `_stream`; returns how many of the source's conversations had their prompt tokens checked."""
    cfg, train_all = encoder.cfg, encoder.train_all
    encs = encoder.encode(examples, lambda ex: where(ex.index), stats)
    checked = _check_prompt_tokens(examples, encs, encoder.template, encoder.tokenizer, stats, checked)
    for ex, enc in zip(examples, encs):
        if ex.input_ids is not None:
            stats.unlabelled += ex.labels is None and not train_all
        if enc.estimate is not None:
            total, n_resp = enc.estimate
            stats.estimated += 1
        else:
            total, n_resp = len(enc.input_ids), sum(enc.response)
        stats.lengths["total"].append(total)
        stats.lengths["response"].append(n_resp)
        stats.lengths["prompt"].append(max(total - n_resp, 0))
        stats.straddles += enc.straddles
        if len(enc.input_ids) > cfg.max_length:
            stats.over += 1
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                stats.drop(ex, f"{'about ' if enc.estimate else ''}{total} tokens > max_length {cfg.max_length}")
                continue
            enc = truncate(enc, cfg.max_length)
            stats.truncated += 1
        if not any(lab != IGNORE for lab in enc.labels):
            stats.dropped_empty += 1
            stats.drop(ex, "no trainable token left after truncation")
            continue
        k = store.add(enc.input_ids, enc.labels, ex.source, ex.index, ex.messages is not None)
        if is_held(ex.index):
            eval_picks.append(k)
            if ex.messages is not None and len(stats.eval_chats) < N_SAMPLES:
                stats.eval_chats.append(ex)
        else:
            pool.append(k)
    return checked


def _check_prompt_tokens(examples, encs, template, tokenizer, stats: _Stats, checked: int, limit: int = 8) -> int:
    """For the first few conversations of a source: does the inference prompt of each reply tokenize to
    the training prefix? Returns how many were checked so far.

    The strings always match byte for byte; the tokens can differ where a tokenizer merges text
    across the prompt/response boundary (e.g. GPT-2's whitespace split). Counted for the report.
    """
    for ex, enc in zip(examples, encs):
        if ex.messages is None or enc.estimate is not None or checked >= limit:  # not a row cut before tokenizing
            continue
        checked += 1
        turns = [k for k, m in enumerate(ex.messages) if m["role"] == "assistant"]
        starts = [i for i, r in enumerate(enc.response) if r and (i == 0 or not enc.response[i - 1])]
        for k, start in zip(turns, starts):
            stats.prompts_checked += 1
            if encode_prompt(template, ex.messages[:k]) != enc.input_ids[:start]:
                stats.prompt_mismatches += 1
    return checked


def _all_dropped_message(stats: _Stats, cfg) -> str:
    return (
        f"every training row was dropped: {stats.dropped_long} longer than max_length={cfg.max_length} "
        f"(truncation: {cfg.truncation}), {stats.dropped_empty} with no response token left within max_length. "
        "Raise data.max_length" + (", or use truncation: truncate" if cfg.truncation != "truncate" else "")
        + ", or shorten the prompts."
    )


def _chats(store: TokenStore, picks: array, readers: list[_Reader]):
    """The conversations among the picked rows, in order, each once, read again from its source."""
    seen = set()
    for k in picks:
        if store.chat[k] and k not in seen:
            seen.add(k)
            yield readers[store.source[k]].example_at(store.index[k])


def _samples(examples) -> list[dict]:
    out = []
    for ex in examples:
        msgs = ex.messages
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"messages": [dict(m) for m in msgs[:last]], "reference": msgs[last]["content"].strip()})
        if len(out) == N_SAMPLES:
            break
    return out


def _examples(store: TokenStore, mixed: array, readers: list[_Reader], encoder: _Encoder) -> list[dict]:
    """The first training rows as trained, with the masked part marked: one per source first, then in order."""
    picked: list[int] = []
    for pick_new_source in (True, False):  # one example per source first, then fill up
        used = {store.source[k] for k in picked}
        for k in mixed:
            if len(picked) == N_EXAMPLES:
                break
            if k in picked or (pick_new_source and store.source[k] in used):
                continue
            picked.append(k)
            used.add(store.source[k])
    examples = []
    for k in picked:
        reader = readers[store.source[k]]
        (enc,) = encoder.encode([reader.example_at(store.index[k])], lambda ex, r=reader: r.where(ex.index))
        enc = encoder.kept(enc)
        runs = rep.marked_segments(enc, encoder.tokenizer)
        examples.append({"where": reader.where(store.index[k]), "tokens": len(enc.input_ids),
                         "trained_tokens": sum(1 for lab in enc.labels if lab != IGNORE),
                         "marked": rep.marked_text(runs), "segments": runs})
    return examples


def _report(cfg, template, infos, train: TokenRows, evals: TokenRows, eval_from, stats: _Stats, store: TokenStore,
            readers: list[_Reader], encoder: _Encoder) -> dict:
    tokens, trained = train.token_count(), train.trained_count()
    examples = _examples(store, train.picks, readers, encoder)
    warnings = rep.warnings(stats, cfg)
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
        "dropped_rows": [{"where": readers[key].where(index), "reason": why} for key, index, why in stats.dropped],
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
