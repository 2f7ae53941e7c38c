"""Message text never becomes a control token.

A rendered conversation holds two kinds of text: the template's markup (`<|im_start|>user\\n`, `</s>`) and
message text. Tokenized as one string, a `<|im_end|>` or `</s>` written in a message would become the very
special token the template uses to end a turn, so a row could forge turns and an answer could end itself.
`encode_text` tokenizes only the template's own occurrences as control tokens and everything in message
text as text, through the tokenizer's `split_special_tokens` (tokenizers' `encode_special_tokens`).

Where no message holds a control token (nearly every row) the string is tokenized exactly as before. Where
one does, each of the template's own control tokens is swapped for a private-use stand-in of the same
length that a private copy of the tokenizer knows as an ordinary added token, and that copy tokenizes the
string with special tokens disabled. An added token cuts the text exactly where the real one does, so the
text between is tokenized as in the plain string; cutting the string into pieces and tokenizing them one by
one would not be: a SentencePiece pre-tokenizer (`prepend_scheme: first`, Llama 2, Mistral) adds `▁` to a
piece at the start of a string, not to one after `<s>` (tests/data/test_control_tokens.py measures it).
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

Spans = tuple[tuple[int, int], ...]
_STAND_IN_FIRST = 0x100000  # private-use plane 16: one first character per control token
_STAND_IN_FILL = "\U0010FFFD"


@lru_cache(maxsize=64)
def control_pattern(controls: tuple[str, ...]) -> re.Pattern:
    """Leftmost, longest first: how a tokenizer's added vocabulary finds its tokens in a string."""
    ordered = sorted(controls, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


def _overlaps(a: int, b: int, spans: Spans) -> bool:
    return any(s < b and a < e for s, e in spans)


def forged(text: str, content: Spans, controls: tuple[str, ...]) -> bool:
    """Would a plain tokenization read some of the message text as a control token?"""
    if not content or not controls:
        return False
    return any(_overlaps(m.start(), m.end(), content) for m in control_pattern(controls).finditer(text))


def template_markup(text: str, content: Spans, controls: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(start, end, token) of the control tokens the template wrote: those outside message text."""
    pattern, found, pos = control_pattern(controls), [], 0
    for start, end in sorted(content) + [(len(text), len(text))]:
        found += [(m.start(), m.end(), m.group(0)) for m in pattern.finditer(text, pos, start)]
        pos = max(pos, end)
    return found


def encode_text(text: str, content: Spans, tokenizer, controls: tuple[str, ...]):
    """Token ids and character offsets (None for a tokenizer without offsets) of a rendered string whose
    `content` spans are message text: a control token there is text, the template's own are tokens."""
    fast = getattr(tokenizer, "is_fast", False)
    if not forged(text, content, controls):
        if fast:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        return list(tokenizer.encode(text, add_special_tokens=False)), None
    return encode_literal(text, template_markup(text, content, controls), tokenizer, controls)


def encode_literal(text: str, markup: list[tuple[int, int, str]], tokenizer, controls: tuple[str, ...]):
    """Ids and offsets of `text` with control tokens only at `markup` (start, end, token); any other
    control-token string is tokenized as text."""
    shadow = _shadow(tokenizer, controls) if getattr(tokenizer, "is_fast", False) else None
    if shadow is not None and all(token in shadow.stand_ins for _, _, token in markup) \
            and not any(s in text for s in shadow.stand_ins.values()):
        encoded = shadow.encode(text, markup)
        if encoded is not None:
            return encoded
    return _encode_pieces(text, markup, tokenizer)  # slow tokenizer (or a text holding a stand-in)


@dataclass
class _Shadow:
    """A copy of a fast tokenizer's backend: the control tokens are special (so `encode_special_tokens` turns
    them off) and each has a stand-in, a non-special added token that cuts the text as the real one does."""

    backend: object
    stand_ins: dict[str, str]  # control token -> its stand-in (same length)
    real_ids: dict[int, int]  # stand-in id -> the control token's id

    def encode(self, text: str, markup: list[tuple[int, int, str]]):
        parts, pos = [], 0
        for start, end, token in markup:
            parts += [text[pos:start], self.stand_ins[token]]
            pos = end
        enc = self.backend.encode("".join(parts) + text[pos:], add_special_tokens=False)
        if sum(i in self.real_ids for i in enc.ids) != len(markup):
            return None  # a stand-in was not matched where its token is (single_word): not this way
        return [self.real_ids.get(i, i) for i in enc.ids], [tuple(o) for o in enc.offsets]


_SHADOWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shadow(tokenizer, controls: tuple[str, ...]) -> Optional[_Shadow]:
    per_tokenizer = _SHADOWS.setdefault(tokenizer, {})
    if controls not in per_tokenizer:
        per_tokenizer[controls] = _build_shadow(tokenizer, controls)
    return per_tokenizer[controls]


def _build_shadow(tokenizer, controls: tuple[str, ...]) -> Optional[_Shadow]:
    from tokenizers import AddedToken, Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(controls) > 0xFF00:  # one private-use first character each
        return None
    spec = json.loads(backend.to_str())
    flags = {}
    for token in spec.get("added_tokens") or []:
        if token["content"] in controls:
            token["special"] = True
            flags[token["content"]] = {k: token.get(k, False) for k in ("lstrip", "rstrip", "single_word")}
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.no_truncation()
    copy.no_padding()
    stand_ins, real_ids = {}, {}
    for k, token in enumerate(controls):
        if token not in flags:  # not an added token of this tokenizer: plain text anyway
            continue
        stand_in = chr(_STAND_IN_FIRST + k) + _STAND_IN_FILL * (len(token) - 1)
        copy.add_tokens([AddedToken(stand_in, special=False, normalized=False, **flags[token])])
        stand_ins[token] = stand_in
        real_ids[copy.token_to_id(stand_in)] = tokenizer.convert_tokens_to_ids(token)
    copy.encode_special_tokens = True
    return _Shadow(copy, stand_ins, real_ids)


def _encode_pieces(text: str, markup, tokenizer):
    """The text between the template's control tokens tokenized piece by piece with special tokens off: safe,
    but a piece after a control token may start differently than in the whole string (see the module doc)."""
    fast = getattr(tokenizer, "is_fast", False)
    ids, offsets, pos = [], [], 0
    for start, end, token in [*markup, (len(text), len(text), None)]:
        if start > pos:
            piece = text[pos:start]
            if fast:
                enc = tokenizer(piece, add_special_tokens=False, split_special_tokens=True,
                                return_offsets_mapping=True)
                ids += enc["input_ids"]
                offsets += [(pos + a, pos + b) for a, b in enc["offset_mapping"]]
            else:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
                ids += piece_ids
                offsets += [(pos, start)] * len(piece_ids)
        if token is not None:
            ids.append(tokenizer.convert_tokens_to_ids(token))
            offsets.append((start, end))
        pos = max(pos, end)
    return ids, (offsets if fast else None)


def decode_with_literals(ids: list[int], tokenizer, controls: tuple[str, ...]) -> tuple[str, Spans]:
    """The text of token ids (special tokens kept) and the spans of control-token strings in it that came
    from text tokens (message text), so that a parser reads them as text."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pattern = control_pattern(controls)
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in controls}
    at = [i for i, t in enumerate(ids) if t in control_ids]
    found = list(pattern.finditer(text))
    if len(found) == len(at):
        return text, ()  # every control string in the text is a control token
    token_spans = []
    for i in at:
        start = len(tokenizer.decode(ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        token = tokenizer.convert_ids_to_tokens(ids[i])
        if text[start:start + len(token)] != token:
            return text, ()  # this decoder does not decode prefixes as prefixes: nothing can be told apart
        token_spans.append((start, start + len(token)))
    return text, tuple((m.start(), m.end()) for m in found if (m.start(), m.end()) not in set(token_spans))
