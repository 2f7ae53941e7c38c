"""Segments -> input_ids + labels, masks placed with the fast tokenizer's offset mapping.

The whole training string is tokenized at once (add_special_tokens=False: BOS/EOS come from the
template text), so the ids are exactly what the model sees and what the inference prompt tokenizes
to (`encode_prompt`, the one way prompts are tokenized). A token is trainable when it *starts* inside
a trainable segment; for Llama's SentencePiece the token `▁answer` starts at the space after
`[/INST]`, which belongs to the response segment. Message text is tokenized as text even where it
holds a control token such as `</s>` (data/control_tokens.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional, Union

from loraforge.data.control_tokens import encode_text, forged
from loraforge.data.templates import ChatTemplate, Rendered, Segment

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    response: list[bool]  # per token: inside a response segment (independent of train_on)
    text: Optional[str] = None
    offsets: list[tuple[int, int]] = field(default_factory=list)
    straddles: int = 0  # tokens that cross a prompt/response boundary
    estimate: Optional[tuple[int, int]] = None  # cut before tokenizing (encode_rows): (total, response) tokens, estimated


def _spans(segments: list[Segment]) -> tuple[str, list[int], list[bool]]:
    text, bounds, flags, pos = [], [], [], 0
    for s in segments:
        bounds.append(pos)
        flags.append(s.trainable)
        text.append(s.text)
        pos += len(s.text)
    return "".join(text), bounds, flags


def encode_prompt(template: ChatTemplate, messages: list[dict]) -> list[int]:
    """The token ids of the prompt for the next assistant turn, exactly as training tokenized that prefix:
    message text as text, the template's markers as its tokens. Everything that generates uses this."""
    rendered = template.rendered_prompt(messages)
    return encode_text(rendered.text, rendered.content, template.tokenizer, template.control_tokens)[0]


def encode_batch(items: list[Union[Rendered, list[Segment]]], tokenizer, train_all: bool,
                 controls: tuple[str, ...] = ()) -> list[Encoded]:
    """Tokenize many rendered rows at once. A `Rendered` row's message text stays text (`controls`: the
    template's control tokens); a bare segment list is all markup (a ready-formatted `text` row)."""
    if not items:
        return []
    items = [r if isinstance(r, Rendered) else Rendered(list(r)) for r in items]
    prepared = [_spans(r.segments) for r in items]
    texts = [p[0] for p in prepared]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        all_ids, all_offsets = enc["input_ids"], enc["offset_mapping"]
        for k, (text, r) in enumerate(zip(texts, items)):
            if forged(text, r.content, controls):  # the rare row whose message text holds a control token
                all_ids[k], all_offsets[k] = encode_text(text, r.content, tokenizer, controls)
    else:
        all_ids, all_offsets = [], []
        for (text, bounds, _), r in zip(prepared, items):
            ids, offs = _encode_slow(text, bounds, lambda s, c=r.content: encode_text(
                s, _clip(c, len(s)), tokenizer, controls)[0])
            all_ids.append(ids)
            all_offsets.append(offs)
    out = []
    for (text, bounds, flags), ids, offsets in zip(prepared, all_ids, all_offsets):
        response, straddles = [], 0
        for start, end in offsets:
            k = bisect.bisect_right(bounds, start) - 1
            response.append(bool(flags[max(k, 0)]))
            nxt = bounds[k + 1] if k + 1 < len(bounds) else None
            if nxt is not None and start < nxt < end and flags[k] != flags[k + 1]:
                straddles += 1
        labels = [t if (train_all or r) else IGNORE for t, r in zip(ids, response)]
        out.append(Encoded(list(ids), labels, response, text, [tuple(o) for o in offsets], straddles))
    return out


def _clip(spans, length: int):
    return tuple((a, min(b, length)) for a, b in spans if a < length)


def _encode_slow(text: str, bounds: list[int], encode):
    """No offsets: tokenize the prefix up to each boundary and use the token counts."""
    ids = encode(text)
    offsets, prev_n = [], 0
    cuts = bounds[1:] + [len(text)]
    for start, cut in zip(bounds, cuts):
        n = len(encode(text[:cut])) if cut < len(text) else len(ids)
        offsets.extend([(start, cut)] * max(n - prev_n, 0))
        prev_n = max(n, prev_n)
    return ids, offsets[: len(ids)] + [(len(text), len(text))] * (len(ids) - len(offsets))


def encode_tokens(input_ids: list[int], labels: Optional[list[int]], train_all: bool) -> Encoded:
    """The tokens shape: given labels are kept (train_on: all trains every token)."""
    if labels is None or train_all:
        labels = list(input_ids)
    response = [lab != IGNORE for lab in labels]
    return Encoded(list(input_ids), list(labels), response)


def truncate(enc: Encoded, max_length: int) -> Encoded:
    """Keep the first max_length tokens."""
    return Encoded(enc.input_ids[:max_length], enc.labels[:max_length], enc.response[:max_length], enc.text,
                   enc.offsets[:max_length], enc.straddles, enc.estimate)


# --- long rows: tokenized only as far as max_length needs -------------------------------------------------
# Tokenizing a 20 MB row whole holds gigabytes (ids, offsets and the tokenizer's own per-token strings), to
# keep max_length tokens of it. A prefix decides it: when two prefixes, one twice the other, give the same
# first max_length + 1 tokens, the cut at the prefix's end no longer reaches them, and they are the full
# text's (tests/data/test_long_rows.py checks this against whole tokenization on real tokenizers).

HEAD_CHARS_PER_TOKEN = 8  # first prefix: this many characters per wanted token (text runs 1-5 per token)


def head_chars(max_length: int) -> int:
    """Rows up to twice this many characters are tokenized whole; longer ones from a prefix."""
    return HEAD_CHARS_PER_TOKEN * (max_length + 1)


def encode_rows(items: list[Union[Rendered, list[Segment]]], tokenizer, train_all: bool, max_length: int,
                controls: tuple[str, ...] = ()) -> list[Encoded]:
    """`encode_batch`, except that a row too long to matter whole keeps only its first max_length + 1
    tokens (exactly those whole tokenization gives; one more than max_length says it is longer) and an
    estimate of its full length (`Encoded.estimate`). Memory then follows max_length, not the row."""
    items = [r if isinstance(r, Rendered) else Rendered(list(r)) for r in items]
    limit = 2 * head_chars(max_length)
    whole = [k for k, r in enumerate(items) if sum(len(s.text) for s in r.segments) <= limit]
    out: list[Optional[Encoded]] = [None] * len(items)
    for k, enc in zip(whole, encode_batch([items[k] for k in whole], tokenizer, train_all, controls)):
        out[k] = enc
    for k, r in enumerate(items):
        if out[k] is None:
            out[k] = encode_head(r, tokenizer, train_all, max_length, controls)
    return out


def _prefix(rendered: Rendered, chars: int) -> Rendered:
    out, pos = [], 0
    for s in rendered.segments:
        if pos >= chars:
            break
        out.append(s if pos + len(s.text) <= chars else Segment(s.text[:chars - pos], s.trainable))
        pos += len(s.text)
    return Rendered(out, _clip(rendered.content, chars))


def encode_head(rendered: Rendered, tokenizer, train_all: bool, max_length: int,
                controls: tuple[str, ...] = ()) -> Encoded:
    """The first max_length + 1 tokens of the row, from prefixes that double until two agree on them."""
    segments = rendered.segments
    total = sum(len(s.text) for s in segments)
    want = max_length + 1
    chars = head_chars(max_length)
    (enc,) = encode_batch([_prefix(rendered, chars)], tokenizer, train_all, controls)
    while chars < total:
        longer = min(2 * chars, total)
        (nxt,) = encode_batch([_prefix(rendered, longer)], tokenizer, train_all, controls)
        if (len(enc.input_ids) >= want and enc.input_ids[:want] == nxt.input_ids[:want]
                and enc.labels[:want] == nxt.labels[:want] and enc.offsets[:want] == nxt.offsets[:want]):
            break
        enc, chars = nxt, longer
    if chars >= total:  # the prefixes never settled (or it is short after all): this is whole tokenization
        return enc
    head = truncate(enc, want)
    end = head.offsets[-1][1]
    per_char = len(enc.input_ids) / chars
    response_chars = sum(len(s.text) for s in segments if s.trainable)
    head.text = head.text[:end]
    head.estimate = (max(want, round(total * per_char)), round(response_chars * per_char))
    return head
