"""An Ollama Modelfile next to an exported GGUF file: the training chat format as Ollama's Go template, the
template's end markers as stop parameters, the run's system prompt as SYSTEM, loraforge's sampling defaults.

The template is derived from the training template itself: a conversation of marked contents is rendered, and the
text between the contents is what each turn adds (the prefix with or without a system prompt, what ends a user turn
and opens the assistant's, what comes before and after an assistant's content). Ollama puts the contents between
them as sent; training strips surrounding whitespace. llama.cpp adds BOS itself where the model asks for it, so the
template leaves out a leading BOS then. Checked here against the training template on several conversations, and
in tests/export/test_modelfile.py through a Go-template renderer, byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.data.templates import ChatTemplate, get_template

MAX_CONTEXT = 8192  # Ollama allocates its cache for num_ctx up front
TEMPERATURE, TOP_P = 0.7, 0.9  # as `loraforge chat`; no repeat penalty (Ollama's default is 1.1)
_MARKS = {"system": "QSYSTEMQ", "user": "QUSERONEQ", "assistant": "QASSISTANTONEQ", "user2": "QUSERTWOQ"}
_CHECKS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."}, {"role": "user", "content": "3?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@dataclass(frozen=True)
class TurnPieces:
    """The template's text between contents."""

    system_prefix: str  # before the system prompt
    system_suffix: str  # after it, up to the first user content
    plain_prefix: str  # before the first user content when there is no system prompt
    user_suffix: str  # after a user content: its end and the assistant's header (the generation prompt's end)
    assistant_prefix: str  # before an assistant content, after that (Llama 2's space after [/INST])
    assistant_suffix: str  # after an assistant content: its end and the next user's header


def _split(text: str, marks: list[str]) -> Optional[list[str]]:
    """The text around each mark, in order (len(marks) + 1 pieces); None unless each appears once, in order."""
    pieces, rest = [], text
    for mark in marks:
        if text.count(mark) != 1 or mark not in rest:
            return None
        before, rest = rest.split(mark)
        pieces.append(before)
    return pieces + [rest]


def turn_pieces(template: ChatTemplate, drop_bos: bool) -> Optional[TurnPieces]:
    """The pieces of `template` (without its default system prompt: Ollama sends that as SYSTEM), or None when it
    is not built of fixed pieces between contents."""
    plain = get_template(template.name, template.tokenizer)
    m = _MARKS
    with_system = _split(plain.prompt([{"role": "system", "content": m["system"]}, {"role": "user", "content": m["user"]},
                                       {"role": "assistant", "content": m["assistant"]},
                                       {"role": "user", "content": m["user2"]}]),
                         [m["system"], m["user"], m["assistant"], m["user2"]])
    without = _split(plain.prompt([{"role": "user", "content": m["user"]},
                                   {"role": "assistant", "content": m["assistant"]},
                                   {"role": "user", "content": m["user2"]}]), [m["user"], m["assistant"], m["user2"]])
    if with_system is None or without is None:
        return None
    system_prefix, system_suffix, before_reply, assistant_suffix, user_suffix = with_system
    if without[1:] != [before_reply, assistant_suffix, user_suffix] or not before_reply.startswith(user_suffix):
        return None
    plain_prefix = without[0]
    if drop_bos and template.bos:
        if not (system_prefix.startswith(template.bos) and plain_prefix.startswith(template.bos)):
            return None
        system_prefix, plain_prefix = system_prefix[len(template.bos):], plain_prefix[len(template.bos):]
    pieces = TurnPieces(system_prefix, system_suffix, plain_prefix, user_suffix, before_reply[len(user_suffix):],
                        assistant_suffix)
    bos = template.bos if drop_bos else ""
    for messages in _CHECKS:  # the pieces rebuild the training prompt, default system prompt included
        if template.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": template.system_prompt}, *messages]
        if bos + render_pieces(pieces, messages) != template.prompt(messages):
            return None
    return pieces


def render_pieces(pieces: TurnPieces, messages: list[dict]) -> str:
    """What the Go template renders for `messages` (contents already stripped, as training strips them)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = pieces.system_prefix + system + pieces.system_suffix if system else pieces.plain_prefix
    for m in messages:
        if m["role"] == "user":
            out += m["content"] + pieces.user_suffix
        elif m["role"] == "assistant":
            out += pieces.assistant_prefix + m["content"] + pieces.assistant_suffix
    return out


def go_template(pieces: TurnPieces) -> Optional[str]:
    """Ollama's TEMPLATE: one line, no whitespace-trimming markers (they would eat the pieces' newlines)."""
    if any("{{" in p or '"""' in p for p in vars(pieces).values()):
        return None
    return (f"{{{{ if .System }}}}{pieces.system_prefix}{{{{ .System }}}}{pieces.system_suffix}"
            f"{{{{ else }}}}{pieces.plain_prefix}{{{{ end }}}}"
            f"{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{{{{ .Content }}}}{pieces.user_suffix}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{pieces.assistant_prefix}{{{{ .Content }}}}"
            f"{pieces.assistant_suffix}"
            f"{{{{ end }}}}{{{{ end }}}}")


def _quoted(text: str) -> Optional[str]:
    """A Modelfile argument in quotes, or None if it cannot be written as one."""
    return None if '"' in text or "\n" in text or "\\" in text else f'"{text}"'


def modelfile_text(gguf_name: str, template: Optional[ChatTemplate], add_bos: bool,
                   context: Optional[int]) -> tuple[str, Optional[str]]:
    """(the Modelfile, a note on what it could not carry or None)."""
    from loraforge.infer.generate import reply_stop_strings

    lines = [f"# Written by loraforge export gguf. Use it with: ollama create NAME -f {Path(gguf_name).stem}.Modelfile",
             f"FROM ./{gguf_name}"]
    note = None
    if template is None:
        note = "no training template is known, so the Modelfile has no TEMPLATE (Ollama reads the GGUF's own)"
    else:
        pieces = turn_pieces(template, drop_bos=add_bos)
        text = go_template(pieces) if pieces is not None else None
        if text is None:
            note = (f"the '{template.name}' chat template is not built of fixed pieces between turns, so the "
                    "Modelfile has no TEMPLATE (Ollama reads the GGUF's chat template instead)")
        else:
            lines.append(f'TEMPLATE """{text}"""')
        if template.system_prompt:
            if '"""' in template.system_prompt:
                note = "the run's system prompt contains \"\"\", which a Modelfile cannot hold: SYSTEM left out"
            else:
                lines.append(f'SYSTEM """{template.system_prompt}"""')
        stops = [q for q in (_quoted(s) for s in reply_stop_strings(template)) if q]
        lines += [f"PARAMETER stop {q}" for q in stops]
    if context:
        lines.append(f"PARAMETER num_ctx {min(context, MAX_CONTEXT)}")
    lines += [f"PARAMETER temperature {TEMPERATURE}", f"PARAMETER top_p {TOP_P}", "PARAMETER repeat_penalty 1.0"]
    return "\n".join(lines) + "\n", note


def modelfile_path(gguf_path) -> Path:
    """`model.gguf` -> `model.Modelfile`, beside it (several exports in one folder keep one each)."""
    path = Path(gguf_path)
    return path.with_name(path.stem + ".Modelfile")
