"""Chat templates: messages -> training string split into trainable / masked segments.

Every template is built so that `prompt(messages)` is *by construction* the training string's
prefix up to where the next assistant turn's trainable part starts: both come from `_segments`.
Contents are stripped of surrounding whitespace (as Meta's reference code does), so a parsed
ready-formatted row re-renders canonically. The tokenizer's real BOS/EOS strings are used and the
strings are meant to be tokenized with `add_special_tokens=False`.

Message text is data, never markup: `rendered`/`rendered_prompt` say where it lies in the string, so
that tokenization (data/tokenize.py) reads a `<|im_end|>` or `</s>` written in a message as text and
only the template's own markers as special tokens (docs/architecture.md, "Markers in message text").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from loraforge.config import TEMPLATE_NAMES
from loraforge.errors import UserError

ROLES = ("system", "user", "assistant")
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# The conversation used to show a template's format in template.json.
_FORMAT_EXAMPLE = [
    {"role": "system", "content": "{system}"},
    {"role": "user", "content": "{user_1}"},
    {"role": "assistant", "content": "{assistant_1}"},
    {"role": "user", "content": "{user_2}"},
    {"role": "assistant", "content": "{assistant_2}"},
]


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and where message text lies in it.

    `content` holds the character spans of message text (and system prompt) in the joined string; it is
    filled only when some message holds one of the tokenizer's control tokens (`ChatTemplate.control_tokens`),
    the one case where it changes how the string is tokenized.
    """

    segments: list[Segment]
    content: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def misplaced_turn(roles: list[str]) -> Optional[tuple[int, Optional[str]]]:
    """The first turn out of order as (its number from 1, the role expected there), or None. In order: an
    optional system turn first, then user and assistant alternating from user. A system turn after the
    first has no expected role (None): it is misplaced wherever it is."""
    expected = "user"
    for number, role in enumerate(roles, 1):
        if role == "system":
            if number != 1:
                return number, None
            continue
        if role != expected:
            return number, expected
        expected = "assistant" if role == "user" else "user"
    return None


def check_messages(messages: list[dict]) -> None:
    """Raise ValueError unless: optional system first, then user/assistant alternating from user."""
    malformed = next((i for i, m in enumerate(messages) if not isinstance(m, dict) or m.get("role") not in ROLES
                      or not isinstance(m.get("content"), str)), None)
    # Only the turns before a malformed one are checked for order: the earliest problem is reported.
    misplaced = misplaced_turn([m["role"] for m in messages[:malformed]])
    if misplaced is not None:
        number, expected = misplaced
        if expected is None:
            raise ValueError(f"turn {number}: a system turn is only allowed first")
        raise ValueError(f"turn {number}: expected a {expected} turn, got {messages[number - 1]['role']} "
                         "(turns must alternate user/assistant)")
    if malformed is not None:
        m = messages[malformed]
        raise ValueError(f"turn {malformed + 1}: expected {{'role': system|user|assistant, 'content': str}}, "
                         f"got {m!r:.80}")


def single_token_ids(tokenizer, strings) -> list[int]:
    """The ids of those `strings` that are a single token (generation can stop on them without decoding)."""
    ids = []
    for s in strings:
        enc = tokenizer.encode(s, add_special_tokens=False) if s else []
        if len(enc) == 1:
            ids.append(enc[0])
    return list(dict.fromkeys(ids))


class ChatTemplate:
    """Base class. Subclasses implement `_segments(system, turns)` and `parse`."""

    name = ""
    stop_markers: tuple[str, ...] = ()
    # Text that starts another turn: a generated reply is cut before it (a weakly trained model may
    # write "[INST]" instead of ending its turn with EOS).
    turn_markers: tuple[str, ...] = ()

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.bos = getattr(tokenizer, "bos_token", None) or ""
        self.eos = getattr(tokenizer, "eos_token", None) or ""
        self.system_prompt = system_prompt.strip() if system_prompt and system_prompt.strip() else None
        # Ready-formatted datasets (guanaco-llama2-1k) spell BOS/EOS as Llama-2's <s>/</s> whatever
        # tokenizer is used now: parse accepts both, render writes this tokenizer's.
        self._bos_forms = [b for b in dict.fromkeys((self.bos, "<s>")) if b]
        self._eos_forms = [e for e in dict.fromkeys((self.eos, "</s>")) if e]

    # --- public API ----------------------------------------------------------------------------
    def render(self, messages: list[dict]) -> list[Segment]:
        """The full training string as segments; assistant replies (+ end of turn) are trainable."""
        return self._render(messages, None)

    def text(self, messages: list[dict]) -> str:
        return "".join(s.text for s in self.render(messages))

    def prompt(self, messages: list[dict]) -> str:
        """The string to generate the next assistant turn from (messages must end with a user turn)."""
        return self._prompt(messages, None)

    def rendered(self, messages: list[dict]) -> Rendered:
        """`render`, with the spans of message text that tokenization must keep as text."""
        return self._locate_content(messages, lambda mark: self._render(messages, mark))

    def rendered_prompt(self, messages: list[dict]) -> Rendered:
        """`prompt` as one masked segment, with the spans of message text (see `rendered`)."""
        return self._locate_content(messages, lambda mark: [Segment(self._prompt(messages, mark), False)])

    def parse(self, text: str, literal: tuple[tuple[int, int], ...] = ()) -> Optional[list[dict]]:
        """Messages from a ready-formatted string in this template, or None if it does not match.

        `literal`: character spans known to be message text (decoded from text tokens, not control tokens):
        a marker inside them is text, never a turn boundary. Elsewhere markers are read by the template's
        rules (see each `_parse`).
        """
        if not literal:
            return self._parse(text)
        escaped, restore = _escape_spans(text, literal)
        messages = self._parse(escaped)
        if messages is None:
            return None
        return [{**m, "content": restore(m["content"])} for m in messages]

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokenizer's tokens that act as structure: its special tokens and any other added token the
        template writes (longest first). In message text they are tokenized as text."""
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        markup = self.text(_FORMAT_EXAMPLE)
        found = {t.content for t in added.values()
                 if t.content and (t.special or (t.content in markup and not t.content.isspace()))}
        return tuple(sorted(found, key=lambda t: (-len(t), t)))

    @cached_property
    def markers(self) -> tuple[str, ...]:
        """What counts as this template's markup when found in message text: its turn and end markers,
        BOS/EOS (both spellings) and the tokenizer's control tokens."""
        own = (*self.turn_markers, *self.stop_markers, *self._bos_forms, *self._eos_forms, *self.control_tokens)
        return tuple(m for m in dict.fromkeys(x.strip() for x in own) if m)

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a reply: the template's end-of-turn marker and the EOS."""
        return [s for s in dict.fromkeys((*self.stop_markers, self.eos)) if s]

    @property
    def stop_token_ids(self) -> list[int]:
        return single_token_ids(self.tokenizer, self.stop_strings)

    def record(self) -> dict:
        """What the run directory's template.json holds: enough to rebuild and verify this template."""
        return {
            "name": self.name,
            "system_prompt": self.system_prompt,
            "bos": self.bos,
            "eos": self.eos,
            "stop_strings": self.stop_strings,
            "format": self.text(_FORMAT_EXAMPLE),
            "prompt_format": self.prompt(_FORMAT_EXAMPLE[:2]),
            "format_no_system": self.text(_FORMAT_EXAMPLE[1:3]),
        }

    def template_record(self) -> dict:
        return self.record()

    # --- helpers -------------------------------------------------------------------------------
    def _render(self, messages: list[dict], mark: Optional[str]) -> list[Segment]:
        system, turns = self._prepare(messages, mark)
        return _merge([s for s in self._segments(system, turns) if s.text])

    def _prompt(self, messages: list[dict], mark: Optional[str]) -> str:
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("prompt() needs messages ending with a user turn")
        segs = self._render(list(messages) + [{"role": "assistant", "content": "x"}], mark)
        last = max(i for i, s in enumerate(segs) if s.trainable)
        return "".join(s.text for s in segs[:last])

    def _parse(self, text: str) -> Optional[list[dict]]:
        return None

    def _prepare(self, messages: list[dict], mark: Optional[str] = None):
        """(system, [(role, content)]) with contents stripped; `mark`, two characters (open, close), wraps every
        message text and the system prompt, so that `_locate_content` can find them in the rendered string."""
        check_messages(messages)
        wrap = (lambda text: f"{mark[0]}{text}{mark[1]}") if mark else (lambda text: text)
        system = None
        turns = []
        for m in messages:
            content = m["content"].strip()
            if m["role"] == "system":
                system = content or None
            else:
                turns.append((m["role"], wrap(content)))
        if system is None:
            system = self.system_prompt
        return (wrap(system) if system else system), turns

    def _locate_content(self, messages: list[dict], render) -> Rendered:
        """Render plainly and, where some message text holds a control token, once more with every text
        wrapped in two private-use characters it does not contain, to find the spans of message text.

        Templates that only concatenate (all but `tokenizer`) render the same string both ways; a Jinja
        template that rewrites message text may not, and then its markup cannot be told from the text."""
        plain = render(None)
        texts = [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]
        texts += [self.system_prompt] if self.system_prompt else []
        if not any(token in t for t in texts for token in self.control_tokens):
            return Rendered(plain)
        mark = _free_characters("".join(texts + [s.text for s in plain]), 2)
        located = _unmark(render(mark), mark)
        if located is None or "".join(s.text for s in located[0]) != "".join(s.text for s in plain):
            raise UserError(
                f"the '{self.name}' template changes message text as it renders it, so loraforge cannot tell "
                "its markers from a marker written in a message (one holds a special token such as "
                f"{next(t for t in self.control_tokens if any(t in x for x in texts))!r}). "
                "Pick an explicit data.template.")
        return Rendered(plain, located[1])

    def _segments(self, system, turns):  # pragma: no cover - abstract
        raise NotImplementedError

    def _end_of_turn(self, marker: str) -> str:
        """The marker, followed by EOS when the marker is not a single token the model can emit."""
        if not self.eos or marker == self.eos:
            return marker
        if len(self.tokenizer.encode(marker, add_special_tokens=False)) == 1:
            return marker
        return marker + self.eos

    def _strip_eos(self, text: str) -> str:
        text = text.strip()
        for marker in (*self.stop_markers, *self._eos_forms):
            if marker and text.endswith(marker):
                text = text[: -len(marker)].rstrip()
        return text

    def _starts_with_bos(self, text: str) -> str:
        text = text.lstrip()
        for bos in self._bos_forms:
            if text.startswith(bos):
                return text[len(bos):]
        return text

    def _alt(self, forms: list[str]) -> str:
        return "|".join(re.escape(f) for f in forms) or "(?!)"


def _merge(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if out and out[-1].trainable == s.trainable:
            out[-1] = Segment(out[-1].text + s.text, s.trainable)
        else:
            out.append(s)
    return out


def _free_characters(text: str, n: int, start: int = 0x10FF00) -> str:
    """`n` private-use characters (plane 16) that do not occur in `text`."""
    free = (chr(c) for c in range(start, 0x10FFFE) if chr(c) not in text)
    return "".join(next(free) for _ in range(n))


def _unmark(segments: list[Segment], mark: str):
    """Segments rendered with marked message texts -> (plain segments, spans of the texts), or None when the
    marks do not pair up."""
    opening, closing = mark
    out, spans, pos, start = [], [], 0, None
    for seg in segments:
        kept = []
        for piece in re.split(f"([{re.escape(mark)}])", seg.text):
            if piece == opening:
                if start is not None:
                    return None
                start = pos
            elif piece == closing:
                if start is None:
                    return None
                if pos > start:
                    spans.append((start, pos))
                start = None
            else:
                kept.append(piece)
                pos += len(piece)
        out.append(Segment("".join(kept), seg.trainable))
    if start is not None:
        return None
    return _merge([s for s in out if s.text]), tuple(spans)


def _escape_spans(text: str, spans):
    """Each span's text replaced by one private-use character (a marker there cannot match), and the
    function that puts the texts back."""
    spans = sorted(spans)
    keys = _free_characters(text, len(spans), start=0x100000)
    parts, originals, pos = [], {}, 0
    for key, (a, b) in zip(keys, spans):
        parts += [text[pos:a], key]
        originals[key] = text[a:b]
        pos = b
    parts.append(text[pos:])
    pattern = re.compile("|".join(map(re.escape, originals)) or "(?!)")
    return "".join(parts), lambda s: pattern.sub(lambda m: originals[m.group(0)], s)


def _msgs(system, pairs) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for u, a in pairs:
        out.append({"role": "user", "content": u})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


class Llama2Template(ChatTemplate):
    """Meta's format: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>` per
    exchange, the system block only inside the first one."""

    name = "llama2"
    turn_markers = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")

    def _segments(self, system, turns):
        first = True
        for role, content in turns:
            if role == "user":
                if first and system:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                first = False
                yield Segment(f"{self.bos}[INST] {content} [/INST]", False)
            else:
                yield Segment(f" {content} {self.eos}", True)

    def _parse(self, text):
        """Turns by Meta's markers, which are plain text here as in a message, read by one rule:

        - a question ends at the first `[/INST]` after its `[INST]` (a `[/INST]` written in a question
          cannot be told from the end of the question);
        - a reply ends at the first EOS that the next turn (`<s>`/`[INST]`) or the end of the text follows;
          an EOS followed by anything else is text of the reply. A reply without an EOS ends at the next
          `[INST]` that a `[/INST]` still follows, or at the end of the text.
        """
        bos, eos = self._alt(self._bos_forms), self._alt(self._eos_forms)
        turn_start = re.compile(rf"\s*(?:{bos})?\s*\[INST\]", re.S)
        ends = re.compile(rf"(?P<eos>{eos})|(?P<turn>(?:{bos})?\s*\[INST\])", re.S)
        blank_to_end = re.compile(r"\s*\Z")
        last_close = text.rfind("[/INST]")  # a turn start with no [/INST] after it starts no turn
        pos, pairs, system = 0, [], None
        while not blank_to_end.match(text, pos):
            m = turn_start.match(text, pos)
            close = text.find("[/INST]", m.end()) if m else -1
            if close < 0:
                return None
            user, body = text[m.end():close].strip(), close + len("[/INST]")
            if not pairs:
                sm = re.match(r"<<SYS>>(.*?)<</SYS>>(.*)", user, re.S)
                if sm:
                    system, user = sm.group(1).strip() or None, sm.group(2).strip()
            if "<<SYS>>" in user:
                return None
            reply_end = next_pos = None
            eos_in_reply = False
            for end in ends.finditer(text, body):
                if end.group("eos") is not None:
                    if blank_to_end.match(text, end.end()) or turn_start.match(text, end.end()):
                        reply_end, next_pos = end.start(), end.end()
                        break
                    eos_in_reply = True
                elif end.end() <= last_close and not eos_in_reply:
                    reply_end = next_pos = end.start()
                    break
            if reply_end is None:
                if eos_in_reply:
                    return None  # an EOS inside a reply that does not end with one: not this format
                reply_end = next_pos = len(text)
            pairs.append((user, text[body:reply_end].strip()))
            pos = next_pos
        if not pairs:
            return None
        if not pairs[-1][1]:  # a prompt without a reply: keep the user turn only
            pairs[-1] = (pairs[-1][0], None)
        return _msgs(system, pairs)


class _HeaderTemplate(ChatTemplate):
    """`{bos}[{system}\\n\\n]{U}{user}\\n\\n{A}{assistant}{eos}`, turns separated by a blank line."""

    user_header = ""
    assistant_header = ""
    default_system: Optional[str] = None

    @property
    def stop_strings(self):
        return [s for s in dict.fromkeys((self.eos, "\n" + self.user_header.strip())) if s]

    def _segments(self, system, turns):
        system = system or self.default_system
        prefix = self.bos + (f"{system}\n\n" if system else "")
        for i, (role, content) in enumerate(turns):
            if role == "user":
                sep = prefix if i == 0 else "\n\n"
                yield Segment(f"{sep}{self.user_header}{content}\n\n{self.assistant_header}", False)
            else:
                yield Segment(f"{content}{self.eos}", True)

    def _split_user(self, chunk: str) -> str:
        return chunk.strip()

    def _parse(self, text):
        """A question ends at the first assistant header after its user header (a later one is text of the
        reply); a reply runs to the next user header, which always starts a turn (the headers are plain
        text: one written in a reply cannot be told from the next turn)."""
        body = self._starts_with_bos(text)
        uh, ah = self.user_header.strip(), self.assistant_header.strip()
        if uh not in body:
            return None
        head, *chunks = body.split(uh)
        system = head.strip() or None
        if system and self.default_system and system.startswith(self.default_system[:45]):
            system = None  # the template's own preamble (Alpaca's has two variants)
        pairs = []
        for i, chunk in enumerate(chunks):
            if ah not in chunk:
                if i != len(chunks) - 1:
                    return None
                pairs.append((self._split_user(chunk), None))
                continue
            user, reply = chunk.split(ah, 1)
            reply = self._strip_eos(reply)
            pairs.append((self._split_user(user), reply if reply else None))
            if not reply and i != len(chunks) - 1:
                return None
        return _msgs(system, pairs)


class HumanResponseTemplate(_HeaderTemplate):
    name = "human_response"
    turn_markers = ("### HUMAN:", "### RESPONSE:")
    user_header = "### HUMAN:\n"
    assistant_header = "### RESPONSE:\n"


class AlpacaTemplate(_HeaderTemplate):
    name = "alpaca"
    turn_markers = ("### Instruction:", "### Input:", "### Response:")
    user_header = "### Instruction:\n"
    assistant_header = "### Response:\n"
    default_system = ALPACA_PREAMBLE

    def _split_user(self, chunk):
        if "### Input:" in chunk:
            instruction, inp = chunk.split("### Input:", 1)
            return f"{instruction.strip()}\n\n{inp.strip()}".strip()
        return chunk.strip()


class _HeaderTokenTemplate(ChatTemplate):
    """Templates whose turns are `{start(role)}{content}{end}` (ChatML, Llama 3)."""

    end_marker = ""

    def start(self, role: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    after_end = ""

    @property
    def stop_markers(self):
        return (self.end_marker,)

    def _segments(self, system, turns):
        eot = self._end_of_turn(self.end_marker)
        pending = "" if self._bos_starts_turns else self.bos
        if system:
            pending += f"{self.start('system')}{system}{self.end_marker}{self.after_end}"
        for role, content in turns:
            if role == "user":
                if pending == "":  # after an assistant turn
                    pending = self.after_end
                pending += f"{self.start('user')}{content}{self.end_marker}{self.after_end}{self.start('assistant')}"
            else:
                yield Segment(pending, False)
                yield Segment(f"{content}{eot}", True)
                pending = ""
        yield Segment(pending, False)

    @property
    def _bos_starts_turns(self) -> bool:
        """A tokenizer whose BOS is the turn start itself (SmolLM2's is `<|im_start|>`) gets no extra one."""
        return bool(self.bos) and self.start("user").startswith(self.bos)

    def _parse(self, text):
        """A turn's text ends at the first end marker (with the EOS that may follow it) after which the text
        ends or the next turn starts; an end marker followed by anything else is text of the turn."""
        body = text.lstrip() if self._bos_starts_turns else self._starts_with_bos(text)
        starts = {r: self.start(r) for r in ROLES}
        if starts["user"] not in body:
            return None
        start_pat = re.compile("|".join(re.escape(s) for s in starts.values()))
        next_turn_or_end = re.compile(rf"\s*(?:{start_pat.pattern}|\Z)")
        eos = "|".join(re.escape(e) for e in self._eos_forms if e != self.end_marker)
        end_pat = re.compile(re.escape(self.end_marker) + (f"(?:{eos})?" if eos else ""))
        out, pos = [], 0
        while True:
            m = start_pat.search(body, pos)
            if not m:
                break
            if body[pos:m.start()].strip():
                return None
            role = next(r for r, s in starts.items() if s == m.group(0))
            end = next((e for e in end_pat.finditer(body, m.end()) if next_turn_or_end.match(body, e.end())), None)
            content = body[m.end(): end.start() if end else len(body)]
            pos = end.end() if end else len(body)
            out.append({"role": role, "content": content.strip()})
        if body[pos:].strip():
            return None
        if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
            out.pop()  # a generation prompt with an empty reply
        return out or None


class ChatMLTemplate(_HeaderTokenTemplate):
    name = "chatml"
    turn_markers = ("<|im_start|>", "<|im_end|>")
    end_marker = "<|im_end|>"
    after_end = "\n"

    def start(self, role):
        return f"<|im_start|>{role}\n"


class Llama3Template(_HeaderTokenTemplate):
    name = "llama3"
    turn_markers = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    end_marker = "<|eot_id|>"

    def start(self, role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template; segments found by rendering conversation prefixes."""

    name = "tokenizer"

    def __init__(self, tokenizer, system_prompt=None):
        super().__init__(tokenizer, system_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "data.template is 'tokenizer' but this tokenizer has no chat template. "
                "Pick one explicitly: llama2, human_response, alpaca, chatml or llama3."
            )

    def _apply(self, msgs, gen: bool) -> str:
        try:
            out = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # Jinja errors: raise_exception(...) in templates, bad roles
            raise UserError(f"the tokenizer's chat template failed: {e}. Pick an explicit data.template.") from None
        return out if isinstance(out, str) else str(out)

    def _segments(self, system, turns):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": c} for r, c in turns
        ]
        full = self._apply(msgs, gen=False)
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            p = self._apply(msgs[:i], gen=True)
            q = self._apply(msgs[: i + 1], gen=False)
            if not (full.startswith(p) and full.startswith(q) and pos <= len(p) <= len(q)):
                raise UserError(
                    "the tokenizer's chat template renders earlier turns differently once later turns "
                    "are added, so responses cannot be located exactly. Pick an explicit data.template."
                )
            reply = full[len(p):len(q)]
            kept = reply.rstrip()
            yield Segment(full[pos:len(p)], False)
            yield Segment(kept, True)
            pos = len(p) + len(kept)
        if pos < len(full):
            yield Segment(full[pos:], False)

    def _prompt(self, messages, mark):
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("prompt() needs messages ending with a user turn")
        system, turns = self._prepare(messages, mark)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": c} for r, c in turns
        ]
        return self._apply(msgs, gen=True)

    def _parse(self, text):
        """Parsed as the explicit template that renders exactly like this one (ChatML for SmolLM2), if any."""
        mine = self._apply(_FORMAT_EXAMPLE, gen=False).rstrip()
        for name in ("chatml", "llama3", "llama2"):
            twin = _TEMPLATES[name](self.tokenizer, self.system_prompt)
            if twin.text(_FORMAT_EXAMPLE).rstrip() == mine:
                return twin._parse(text)
        return None

    @property
    def turn_markers(self) -> tuple[str, ...]:
        """The tokenizer's special tokens that its template writes between turns (`<|im_start|>`, ...)."""
        rendered = self._apply(_FORMAT_EXAMPLE, gen=False)
        specials = (*getattr(self.tokenizer, "all_special_tokens", ()),
                    *(getattr(self.tokenizer, "get_added_vocab", dict)() or {}))
        return tuple(t for t in dict.fromkeys(specials) if t and t in rendered)

    def record(self):
        rec = super().record()
        rec["chat_template"] = self.tokenizer.chat_template
        return rec


_TEMPLATES = {
    "llama2": Llama2Template,
    "human_response": HumanResponseTemplate,
    "alpaca": AlpacaTemplate,
    "chatml": ChatMLTemplate,
    "llama3": Llama3Template,
    "tokenizer": TokenizerTemplate,
}


def get_template(name: str, tokenizer, system_prompt: Optional[str] = None) -> ChatTemplate:
    try:
        cls = _TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown template '{name}'; choose one of: {', '.join(TEMPLATE_NAMES)}") from None
    return cls(tokenizer, system_prompt=system_prompt)


def template_from_record(record: dict, tokenizer) -> ChatTemplate:
    """Rebuild the template a run was trained with (template.json) and check it renders the same."""
    tpl = get_template(record.get("name", ""), tokenizer, system_prompt=record.get("system_prompt"))
    if record.get("format") is not None and tpl.record()["format"] != record["format"]:
        raise UserError(
            f"the '{tpl.name}' template renders differently now than when this run was trained "
            "(different tokenizer or chat template?). Use the tokenizer saved with the adapter."
        )
    return tpl


def guess_template(text: str, tokenizer) -> Optional[str]:
    """Name of the first explicit template whose markers parse this text, if any."""
    for name in ("llama2", "chatml", "llama3", "alpaca", "human_response"):
        if _TEMPLATES[name](tokenizer).parse(text):
            return name
    return None
