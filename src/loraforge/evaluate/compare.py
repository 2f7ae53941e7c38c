"""`loraforge eval`: the base model and the fine-tuned model on the same rows, side by side.

- loss and perplexity on the response tokens (the labels training used) and on all tokens;
- task metrics on greedy answers where the rows have a reference reply;
- answers of both models to the first few prompts.

The base is the very same quantized model with the adapter turned off (`disable_adapter()`), so
the comparison isolates what the adapter learned.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from loraforge.atomic import write_text_whole
from loraforge.errors import UserError
from loraforge.evaluate.metrics import Metric, mean_scores, resolve_metrics
from loraforge.rundir import CONFIG_FILE, EVAL_FILE, find_adapter, load_run_config

DEFAULT_TRAIN_ROWS = 64  # rows sampled from the training set when evaluating on it
SAMPLE_SEED = 0


# --- rows -----------------------------------------------------------------------------------

@dataclass
class Selection:
    rows: list[dict]
    indices: list[int]
    split: str  # "eval" or "train"
    note: str


def select_rows(data, split: str = "eval", limit: Optional[int] = None) -> Selection:
    """Which prepared rows to evaluate. Training rows are a fixed-seed sample, so reruns agree."""
    if split not in ("eval", "train"):
        raise UserError(f"--split {split}: choose 'eval' (held-out rows) or 'train'")
    if limit is not None and limit <= 0:
        raise UserError(f"--rows {limit}: give a positive number of rows")
    note = ""
    if split == "eval":
        if data.eval:
            n = len(data.eval) if limit is None else min(limit, len(data.eval))
            return Selection(data.eval[:n], list(range(n)), "eval",
                             f"{n} held-out rows (the run's eval split"
                             + (f", first {n} of {len(data.eval)})." if n < len(data.eval) else ")."))
        note = ("This run has no eval split (set data.eval_fraction, eval_size or eval_split to hold rows out); "
                "using training rows instead. ")
    k = min(len(data.train), limit or DEFAULT_TRAIN_ROWS)
    indices = sorted(random.Random(SAMPLE_SEED).sample(range(len(data.train)), k))
    return Selection([data.train[i] for i in indices], indices, "train",
                     note + f"{k} training rows (a fixed sample, seed {SAMPLE_SEED}, of {len(data.train)}): "
                     "the training distribution, not held out.")


def _last_response_span(labels: list[int]) -> Optional[tuple[int, int]]:
    end = max((i for i, t in enumerate(labels) if t != -100), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return start, end + 1


def prompt_and_reference(row: dict, tokenizer, template) -> Optional[dict]:
    """The conversation up to the last reply, the prompt (string and token ids), and the reply, recovered
    from a row.

    The row's text is parsed back with the template (giving the exact training prompt), reading a marker
    that came from text tokens as message text; failing that, the last run of trained labels is the reply,
    and the tokens before it are the prompt as they are. None when neither works (e.g. `tokens` rows
    trained on every token).
    """
    from loraforge.data.control_tokens import decode_with_literals
    from loraforge.data.tokenize import encode_prompt
    from loraforge.infer.generate import text_stops

    ids = list(row["input_ids"])
    span = _last_response_span(row["labels"])
    text, literal = decode_with_literals(ids, tokenizer, template.control_tokens)
    messages = template.parse(text, literal)
    if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
        context = messages[:-1]
        try:
            p_ids = encode_prompt(template, context)
        except ValueError:
            p_ids = None
        # The canonical prompt is what training saw, up to where the trained reply starts (a marker written
        # in a question can make a parse end the question early: the labels know better).
        if p_ids is not None and ids[:len(p_ids)] == p_ids and (span is None or span[0] in (0, len(p_ids))):
            return {"messages": context, "prompt": template.prompt(context), "prompt_ids": p_ids,
                    "reference": messages[-1]["content"].strip()}
    if span is None or span[0] == 0:
        return None
    prompt = tokenizer.decode(ids[:span[0]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    reference = tokenizer.decode(ids[span[0]:span[1]], skip_special_tokens=True)
    for stop in text_stops(tokenizer, template.stop_strings):  # a control token was skipped in the decoding
        if stop in reference:
            reference = reference[:reference.index(stop)]
    reference = reference.strip()
    if not reference:
        return None
    prompt_text, prompt_literal = decode_with_literals(ids[:span[0]], tokenizer, template.control_tokens)
    parsed = template.parse(prompt_text, prompt_literal)
    context = parsed if parsed and parsed[-1]["role"] == "user" else [{"role": "user", "content": prompt}]
    return {"messages": context, "prompt": prompt, "prompt_ids": ids[:span[0]], "reference": reference}


def _question(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# --- evaluation -----------------------------------------------------------------------------

def loss_side_by_side(model, rows: list[dict], batch_size: int, pad_id: int, device) -> dict:
    """{responses|all: {base|tuned: {loss, perplexity, tokens}}} on the same rows."""
    from loraforge.train.loss import perplexity, response_and_all_token_loss

    with model.disable_adapter():
        base = response_and_all_token_loss(model, rows, batch_size, pad_id, device)
    tuned = response_and_all_token_loss(model, rows, batch_size, pad_id, device)
    return {name: {who: {"loss": loss, "perplexity": perplexity(loss), "tokens": n}
                   for who, (loss, n) in (("base", base[name]), ("tuned", tuned[name]))}
            for name in ("responses", "all")}


def generate_both(model, tokenizer, examples: list[dict], template, max_new_tokens: int,
                  progress: Optional[Callable[[int, int], None]] = None, batch_size: int = 8) -> list[tuple[str, str]]:
    """Greedy answers of the base (adapter off) and the fine-tuned model to each example's prompt,
    `batch_size` prompts at a time."""
    from loraforge.infer.generate import generate_replies, reply_stop_strings

    kw = dict(max_new_tokens=max_new_tokens, stop_strings=reply_stop_strings(template),  # as `loraforge generate`
              batch_size=batch_size)
    out: list[tuple[str, str]] = []
    for start in range(0, len(examples), batch_size):
        prompts = [ex.get("prompt_ids", ex["prompt"]) for ex in examples[start:start + batch_size]]
        with model.disable_adapter():
            base = generate_replies(model, tokenizer, prompts, **kw)
        out += zip(base, generate_replies(model, tokenizer, prompts, **kw))
        if progress:
            progress(len(out), len(examples))
    return out


@dataclass
class EvalOptions:
    split: str = "eval"
    rows: Optional[int] = None
    metrics: list[str] = field(default_factory=list)  # empty: the defaults; ["none"]: loss only
    samples: int = 5
    max_new_tokens: int = 128
    batch_size: Optional[int] = None
    adapter: Optional[str] = None
    trust_remote_code: bool = False  # this command line's --trust-remote-code
    allow_metric_code: bool = False  # this command line's --allow-metric-code: the config's eval.metrics may run code


def evaluate_run(run_dir: Path, opts: EvalOptions = EvalOptions(), log: Callable[[str], None] = print,
                 progress: Optional[Callable[[int, int], None]] = None, model=None) -> dict:
    """Evaluate a run, write RUN_DIR/eval.json, and return what was written.

    `model`: the run's base with its final adapter already in memory (what training just produced, the
    same weights `adapter/` reloads to); by default they are loaded as `chat` and `generate` load them.
    """
    from loraforge.data import prepare
    from loraforge.infer.session import load_run_model
    from loraforge.model.load import load_tokenizer, resolve_base

    run_dir = Path(run_dir)
    started = time.time()
    cfg = load_run_config(run_dir)  # the run may be unfinished: --adapter can name a checkpoint
    cfg.allow_remote_code(opts.trust_remote_code, str(run_dir / CONFIG_FILE))
    # Named on this command line, or the run's own (whose code runs only with --allow-metric-code); a bad
    # --metric fails before any loading.
    metrics: list[Metric] = resolve_metrics(opts.metrics) if opts.metrics else \
        resolve_metrics(cfg.eval.metrics, from_config=str(run_dir / CONFIG_FILE), allow_code=opts.allow_metric_code)
    if opts.samples < 0 or opts.max_new_tokens <= 0 or (opts.batch_size is not None and opts.batch_size <= 0):
        raise UserError("--samples must be >= 0, --max-new-tokens and --batch-size > 0")
    if opts.rows is not None and opts.rows <= 0:
        raise UserError(f"--rows {opts.rows}: give a positive number of rows")
    adapter_dir, adapter_note = find_adapter(run_dir, opts.adapter)
    base = resolve_base(cfg.model)
    tokenizer = load_tokenizer(cfg.model, base)
    data = prepare(cfg.data, tokenizer, log=lambda *_: None)
    sel = select_rows(data, opts.split, opts.rows)
    log(f"eval: {sel.note} {adapter_note}.")

    if model is None:
        model, _, device = load_run_model(cfg, adapter_dir)
    else:
        device = str(next(model.parameters()).device)
    batch_size = opts.batch_size or cfg.eval.batch_size or cfg.train.micro_batch_size
    loss = loss_side_by_side(model, sel.rows, batch_size, tokenizer.pad_token_id, device)

    # Prompts and references for generation: every row when scoring, else just the samples shown.
    wanted = len(sel.rows) if metrics else opts.samples
    examples, skipped = [], 0
    for pos, row in enumerate(sel.rows):
        if len(examples) >= wanted:
            break
        ex = prompt_and_reference(row, tokenizer, data.template)
        if ex is None:
            skipped += 1
            continue
        truncated = len(row["input_ids"]) >= cfg.data.max_length
        examples.append({"index": sel.indices[pos], "split": sel.split, "truncated": truncated, **ex})
    answers = generate_both(model, tokenizer, examples, data.template, opts.max_new_tokens, progress,
                            batch_size) if examples else []

    per_row = []
    scored = [ex for ex in examples if not ex["truncated"]]  # a cut-off reference is not a fair target
    for ex, (base_answer, tuned_answer) in zip(examples, answers):
        record = {"index": ex["index"], "question": _question(ex["messages"]), "prompt": ex["prompt"],
                  "reference": ex["reference"], "base": base_answer, "tuned": tuned_answer}
        if metrics and not ex["truncated"]:
            row = {k: ex[k] for k in ("index", "split", "messages", "prompt", "reference")}
            record["scores"] = {"base": {m.name: m.score(base_answer, ex["reference"], row) for m in metrics},
                                "tuned": {m.name: m.score(tuned_answer, ex["reference"], row) for m in metrics}}
        per_row.append(record)

    result_metrics, metric_note = {}, None
    if metrics:
        with_scores = [r for r in per_row if "scores" in r]
        base_means = mean_scores([r["scores"]["base"] for r in with_scores], metrics)
        tuned_means = mean_scores([r["scores"]["tuned"] for r in with_scores], metrics)
        result_metrics = {m.name: {"base": base_means[m.name]["mean"], "tuned": tuned_means[m.name]["mean"],
                                   "rows": tuned_means[m.name]["rows"]} for m in metrics}
        if not with_scores:
            metric_note = "No task metrics: none of the rows has a reference reply that could be recovered."
        elif skipped or len(with_scores) < len(sel.rows):
            metric_note = (f"Task metrics on {len(with_scores)} of {len(sel.rows)} rows "
                           f"({skipped} without a recoverable reference, "
                           f"{len(examples) - len(scored)} truncated at max_length).")
    else:
        metric_note = "Task metrics were turned off (--metric none)."

    result = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": str(run_dir),
        "adapter": str(adapter_dir),
        "adapter_note": adapter_note,
        "base_model": base,
        "device": device,
        "split": sel.split,
        "split_note": sel.note,
        "rows": len(sel.rows),
        "row_indices": sel.indices,
        "loss": loss,
        "loss_note": ("This run trained on all tokens (data.train_on: all), so its labels cover the prompts too: "
                      "the response-token rows equal the all-token rows." if cfg.data.train_on == "all" else None),
        "metrics": result_metrics,
        "metric_rows": sum(1 for r in per_row if "scores" in r),
        "metric_note": metric_note,
        "samples": per_row[:opts.samples],
        "answers": per_row,
        "settings": {"max_new_tokens": opts.max_new_tokens, "batch_size": batch_size, "decoding": "greedy",
                     "metrics": [m.name for m in metrics]},
        "seconds": round(time.time() - started, 1),
    }
    write_text_whole(run_dir / EVAL_FILE, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result
