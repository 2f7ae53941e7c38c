"""Dataset shapes: map columns, detect the shape, and turn each row into a checked `Example`.

Shapes: text (ready-formatted strings), instruction (+ optional input), input_output, messages
(role/content or ShareGPT from/value), tokens (pre-tokenized input_ids, optional labels).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Optional

from loraforge.data.templates import ChatTemplate, guess_template, misplaced_turn
from loraforge.errors import UserError

REQUIRED = {
    "text": ("text",),
    "instruction": ("instruction", "output"),
    "input_output": ("input", "output"),
    "messages": ("messages",),
    "tokens": ("input_ids",),
}
OPTIONAL = {"instruction": ("input", "system"), "input_output": ("system",), "tokens": ("labels",)}
FIELDS = ("text", "instruction", "input", "output", "messages", "system", "input_ids", "labels")
ALIASES = {  # other libraries' spellings, used when our own column is absent
    "messages": ("conversations", "conversation"),  # ShareGPT
    "input": ("prompt", "question"),  # TRL's prompt/completion; question/answer sets
    "output": ("completion", "answer"),
}
ROLE_NAMES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}
MARKERS = {
    "llama2": "<s>[INST] ... [/INST] ... </s>",
    "human_response": "### HUMAN: / ### RESPONSE:",
    "alpaca": "### Instruction: / ### Response:",
    "chatml": "<|im_start|>role ... <|im_end|>",
    "llama3": "<|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
    "tokenizer": "the tokenizer's chat template (cannot be parsed back)",
}


class RowError(Exception):
    """One bad row: the message says what is wrong and what to do; the caller adds file and row."""


@dataclass
class Example:
    source: int  # index of the configured source
    index: int  # 0-based row index inside that source
    messages: Optional[list] = None  # conversation (shapes text/instruction/input_output/messages)
    text: Optional[str] = None  # unparsed text trained as-is (train_on: all)
    input_ids: Optional[list] = None  # tokens shape
    labels: Optional[list] = None


def resolve_columns(columns: list[str], mapping: dict[str, str], label: str) -> dict[str, str]:
    """Our field name -> the dataset's column, from the identity plus `columns:` in the config."""
    for ours, theirs in mapping.items():
        if ours not in FIELDS:
            close = difflib.get_close_matches(ours, FIELDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{label}: columns: '{ours}' is not a field loraforge knows.{hint} "
                            f"Keys are our names ({', '.join(FIELDS)}), values the dataset's columns.")
        if theirs not in columns:
            raise UserError(f"{label}: columns: {ours} -> '{theirs}', but the dataset has no column '{theirs}'. "
                            f"Its columns: {', '.join(columns)}.")
    fields = {f: f for f in FIELDS if f in columns}
    for ours, aliases in ALIASES.items():
        if ours not in fields and ours not in mapping:
            for alias in aliases:
                if alias in columns:
                    fields[ours] = alias
                    break
    mapped_cols = set(mapping.values())
    fields = {f: c for f, c in fields.items() if c not in mapped_cols}  # a column serves one field
    fields.update(mapping)
    return fields


def detect_shape(fields: dict[str, str], columns: list[str], label: str, given: str = "auto") -> str:
    if given != "auto":
        missing = [f for f in REQUIRED[given] if f not in fields]
        if missing:
            raise UserError(
                f"{label}: format '{given}' needs the field(s) {', '.join(missing)}, but the dataset's columns are "
                f"{', '.join(columns)}. Map them, e.g. columns: {{{missing[0]}: <your column>}}."
            )
        return given
    found = [s for s, need in REQUIRED.items() if all(f in fields for f in need)]
    if "instruction" in found and "input_output" in found:
        found.remove("input_output")  # instruction + input + output is Alpaca
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(
            f"{label}: cannot tell the dataset's shape from its columns ({', '.join(columns)}). Expected one of: "
            "text | instruction + output | input + output (or prompt + completion, question + answer) | "
            "messages | input_ids. Map your columns in the config, e.g. columns: {input: q, output: a}, or on "
            "the command line with --dataset PATH --column input=q --column output=a; or set format:."
        )
    raise UserError(
        f"{label}: ambiguous shape: the columns ({', '.join(columns)}) fit {' and '.join(found)}. "
        f"Set format: to one of {', '.join(found)} for this dataset."
    )


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return "text"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _text(row: dict, fields: dict, name: str, *, required=True, response=False) -> Optional[str]:
    col = fields.get(name)
    v = row.get(col) if col else None
    if v is None:
        if required:
            raise RowError(f"'{col or name}' is missing or null. Fill it in or remove the row.")
        return None
    if not isinstance(v, str):
        raise RowError(f"'{col}' should be text, got {_kind(v)}. Quote it as a string.")
    if required and not v.strip():
        what = "the response is empty; there is nothing to learn" if response else "it is empty"
        raise RowError(f"'{col}': {what}. Fill it in or remove the row.")
    return v


def check_conversation(msgs: list[dict], col: str = "messages") -> None:
    """Order and content checks; RowError names the turn (the first problem in turn order)."""
    misplaced = misplaced_turn([m["role"] for m in msgs])
    for i, m in enumerate(msgs, 1):
        role, content = m["role"], m["content"]
        if misplaced is not None and misplaced[0] == i:
            expected = misplaced[1]
            if expected is None:
                raise RowError(f"'{col}' turn {i} is a system turn; only the first turn may be. Move or remove it.")
            raise RowError(f"'{col}' turn {i} is from the {role} but the {expected} should speak next: turns must "
                           "alternate user/assistant, starting with user (a system turn may come first).")
        if role == "assistant" and not content.strip():
            raise RowError(f"'{col}' turn {i} (assistant) is empty; there is nothing to learn. "
                           "Fill it in or remove the row.")
        if role == "user" and not content.strip():
            raise RowError(f"'{col}' turn {i} (user) is empty. Fill it in or remove the row.")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError(f"'{col}' has no assistant turn; there is nothing to learn. Add the reply or remove the row.")
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"'{col}' ends with a user turn that has no reply. End it with an assistant turn.")


def _messages(row: dict, fields: dict) -> list[dict]:
    col = fields["messages"]
    v = row.get(col)
    if isinstance(v, str):  # e.g. a JSON string in a CSV cell
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise RowError(f"'{col}' should be a list of {{role, content}} turns, got text that is not JSON.") from None
    if v is None:
        raise RowError(f"'{col}' is missing or null. Fill it in or remove the row.")
    if not isinstance(v, list) or not v:
        raise RowError(f"'{col}' should be a non-empty list of {{role, content}} turns, got {_kind(v)}.")
    out = []
    for i, turn in enumerate(v, 1):
        if not isinstance(turn, dict):
            raise RowError(f"'{col}' turn {i} should be an object with role and content, got {_kind(turn)}.")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise RowError(f"'{col}' turn {i} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                           f"it has: {', '.join(turn) or 'nothing'}.")
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
            raise RowError(f"'{col}' turn {i} has role {role!r}; use system, user or assistant (or human/gpt).")
        if not isinstance(content, str):
            raise RowError(f"'{col}' turn {i} content should be text, got {_kind(content)}.")
        out.append({"role": ROLE_NAMES[role.lower()], "content": content})
    check_conversation(out, col)
    return out


def _with_system(msgs: list[dict], system: Optional[str]) -> list[dict]:
    if system and system.strip() and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + msgs
    return msgs


def _int_list(v, col: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or not v:
        raise RowError(f"'{col}' should be a non-empty list of token ids, got {_kind(v)}.")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise RowError(f"'{col}' should contain only integers.")
    return list(v)


class RowConverter:
    """Turns rows of one source into Examples; raises RowError for a bad row."""

    def __init__(self, shape: str, fields: dict, template: ChatTemplate, *, train_on: str,
                 system_prompt: Optional[str] = None, text_template: Optional[ChatTemplate] = None,
                 vocab_size: Optional[int] = None):
        self.shape, self.fields, self.template = shape, fields, template
        self.text_template = text_template or template
        self.train_on, self.system_prompt, self.vocab_size = train_on, system_prompt, vocab_size

    def __call__(self, row: dict, source: int, index: int) -> Example:
        f = self.fields
        ex = Example(source=source, index=index)
        system = _text(row, f, "system", required=False) if "system" in f else None
        if self.shape == "text":
            ex.messages, ex.text = self._text_row(row)
        elif self.shape == "instruction":
            instr = _text(row, f, "instruction")
            inp = _text(row, f, "input", required=False) if "input" in f else None
            user = instr.strip() + (f"\n\n{inp.strip()}" if inp and inp.strip() else "")
            ex.messages = [{"role": "user", "content": user},
                           {"role": "assistant", "content": _text(row, f, "output", response=True)}]
        elif self.shape == "input_output":
            ex.messages = [{"role": "user", "content": _text(row, f, "input")},
                           {"role": "assistant", "content": _text(row, f, "output", response=True)}]
        elif self.shape == "messages":
            ex.messages = _messages(row, f)
        else:
            ex.input_ids = _int_list(row.get(f["input_ids"]), f["input_ids"])
            if self.vocab_size and max(ex.input_ids) >= self.vocab_size or min(ex.input_ids) < 0:
                raise RowError(f"'{f['input_ids']}' has token ids outside this tokenizer's vocabulary "
                               f"(0..{self.vocab_size - 1 if self.vocab_size else '?'}). Tokenize with the same tokenizer.")
            if "labels" in f and row.get(f["labels"]) is not None:
                ex.labels = _int_list(row.get(f["labels"]), f["labels"])
                if len(ex.labels) != len(ex.input_ids):
                    raise RowError(f"'{f['labels']}' has {len(ex.labels)} entries but input_ids has "
                                   f"{len(ex.input_ids)}; they must be the same length.")
                if any(lab != -100 and not 0 <= lab < (self.vocab_size or 2**31) for lab in ex.labels):
                    raise RowError(f"'{f['labels']}' holds values that are neither -100 (not trained) nor token ids "
                                   "of this tokenizer's vocabulary.")
        if ex.messages is not None:
            ex.messages = _with_system(ex.messages, system or self.system_prompt)
        return ex

    def _text_row(self, row):
        col = self.fields["text"]
        text = _text(row, self.fields, "text")
        msgs = self.text_template.parse(text)
        if msgs:
            check_conversation(msgs, col)
            return msgs, None
        if self.train_on == "all":
            return None, text
        name = self.text_template.name
        self._guesses = getattr(self, "_guesses", 0) + 1  # only the first few are listed: guess for those
        guess = guess_template(text, self.template.tokenizer) if self._guesses <= 20 else None
        hint = f"It looks like {guess}: set data.template: {guess}." if guess and guess != name else (
            "Set data.template to the format the text is written in.")
        raise RowError(
            f"'{col}' does not match the {name} template ({MARKERS[name]}), so the response cannot be found "
            f"for loss on responses only. {hint} Or set data.train_on: all to train on the whole text."
        )
