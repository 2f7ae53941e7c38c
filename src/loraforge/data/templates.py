"""Chat templates: messages -> training string split into trainable / masked segments.

Every template is built so that `prompt(messages)` is *by construction* the training string's
prefix up to where the next assistant turn's trainable part starts: both come from `_segments`.
Contents are stripped of surrounding whitespace (as Meta's reference code does), so a parsed
ready-formatted row re-renders canonically. The tokenizer's real BOS/EOS strings are used and the
strings are meant to be tokenized with `add_special_tokens=False`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
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
        system, turns = self._prepare(messages)
        return _merge([s for s in self._segments(system, turns) if s.text])

    def text(self, messages: list[dict]) -> str:
        return "".join(s.text for s in self.render(messages))

    def prompt(self, messages: list[dict]) -> str:
        """The string to generate the next assistant turn from (messages must end with a user turn)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("prompt() needs messages ending with a user turn")
        segs = self.render(list(messages) + [{"role": "assistant", "content": "x"}])
        last = max(i for i, s in enumerate(segs) if s.trainable)
        return "".join(s.text for s in segs[:last])

    def parse(self, text: str) -> Optional[list[dict]]:
        """Messages from a ready-formatted string in this template, or None if it does not match."""
        return None

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
    def _prepare(self, messages: list[dict]) -> tuple[Optional[str], list[tuple[str, str]]]:
        check_messages(messages)
        system = None
        turns = []
        for m in messages:
            content = m["content"].strip()
            if m["role"] == "system":
                system = content or None
            else:
                turns.append((m["role"], content))
        if system is None:
            system = self.system_prompt
        return system, turns

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

    def parse(self, text):
        bos, eos = self._alt(self._bos_forms), self._alt(self._eos_forms)
        pattern = re.compile(
            rf"\s*(?:{bos})?\s*\[INST\](?P<u>.*?)\[/INST\](?P<a>(?:(?!\[INST\]).)*?)"
            rf"\s*(?:{eos}|(?=(?:{bos})?\s*\[INST\])|\Z)",
            re.S,
        )
        pos, pairs, system = 0, [], None
        while pos < len(text):
            if not text[pos:].strip():
                break
            m = pattern.match(text, pos)
            if not m or m.end() == pos:
                return None
            user = m.group("u").strip()
            if not pairs:
                sm = re.match(r"<<SYS>>(.*?)<</SYS>>(.*)", user, re.S)
                if sm:
                    system, user = sm.group(1).strip() or None, sm.group(2).strip()
            if "<<SYS>>" in user:
                return None
            pairs.append((user, m.group("a").strip()))
            pos = m.end()
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

    def parse(self, text):
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
            if chunk.count(ah) > 1:
                return None
            if ah not in chunk:
                if i != len(chunks) - 1:
                    return None
                pairs.append((self._split_user(chunk), None))
                continue
            user, reply = chunk.split(ah)
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

    def parse(self, text):
        body = text.lstrip() if self._bos_starts_turns else self._starts_with_bos(text)
        starts = {r: self.start(r) for r in ROLES}
        if starts["user"] not in body:
            return None
        out, pos = [], 0
        pat = re.compile("|".join(re.escape(s) for s in starts.values()))
        while True:
            m = pat.search(body, pos)
            if not m:
                break
            if body[pos:m.start()].strip():
                return None
            role = next(r for r, s in starts.items() if s == m.group(0))
            end = body.find(self.end_marker, m.end())
            content = body[m.end(): end if end >= 0 else len(body)]
            pos = len(body) if end < 0 else end + len(self.end_marker)
            for eos in self._eos_forms:
                if eos != self.end_marker and body.startswith(eos, pos):
                    pos += len(eos)
                    break
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

    def prompt(self, messages):
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("prompt() needs messages ending with a user turn")
        system, turns = self._prepare(messages)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": r, "content": c} for r, c in turns
        ]
        return self._apply(msgs, gen=True)

    def parse(self, text):
        """Parsed as the explicit template that renders exactly like this one (ChatML for SmolLM2), if any."""
        mine = self._apply(_FORMAT_EXAMPLE, gen=False).rstrip()
        for name in ("chatml", "llama3", "llama2"):
            twin = _TEMPLATES[name](self.tokenizer, self.system_prompt)
            if twin.text(_FORMAT_EXAMPLE).rstrip() == mine:
                return twin.parse(text)
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
