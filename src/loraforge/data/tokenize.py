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
                   enc.offsets[:max_length], enc.straddles)
