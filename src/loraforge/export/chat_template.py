"""The training template as a Jinja chat template, for the merged tokenizer and the GGUF file.

Other tools (transformers' `apply_chat_template`, llama.cpp, Ollama) only know Jinja templates, so each
of loraforge's templates is written out here and checked to render byte-identically to it.
"""
from __future__ import annotations

import json
from typing import Optional

from loraforge.data.templates import AlpacaTemplate, ChatTemplate

# Sets `system` (the first message's content, else the run's default) and `loop_messages`.
_SYSTEM = (
    "{%- set default_system = DEFAULT -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = (messages[0]['content'] | trim) or default_system -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = default_system -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
)

_LLAMA2 = (
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{- bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + (message['content'] | trim) + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- bos_token + '[INST] ' + (message['content'] | trim) + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- ' ' + (message['content'] | trim) + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# `### HUMAN:` / Alpaca: the assistant header already ends each user turn, as in training.
_HEADERS = (
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (bos_token + (system + '\\n\\n' if system else '')) if loop.first else '\\n\\n' -}}"
    "{{- USER_HEADER + (message['content'] | trim) + '\\n\\n' + ASSISTANT_HEADER -}}"
    "{%- else -%}"
    "{{- (message['content'] | trim) + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# ChatML / Llama 3: `{start(role)}{content}{end}`; the assistant header is written with the user turn.
_HEADER_TOKENS = (
    "{%- set ns = namespace(pending=BOS) -%}"
    "{%- if system -%}{%- set ns.pending = ns.pending + START_SYSTEM + system + END + AFTER_END -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if ns.pending == '' -%}{%- set ns.pending = AFTER_END -%}{%- endif -%}"
    "{%- set ns.pending = ns.pending + START_USER + (message['content'] | trim) + END + AFTER_END + START_ASSISTANT -%}"
    "{%- else -%}"
    "{{- ns.pending + (message['content'] | trim) + END_OF_TURN -}}"
    "{%- set ns.pending = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.pending -}}"
)

# Conversations the Jinja rendering must reproduce exactly.
_CHECKS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\nthere "}],
    [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Three?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


def _literal(value: Optional[str]) -> str:
    """A Jinja literal for a string (Jinja string literals accept JSON's escapes) or `none`."""
    return "none" if value is None else json.dumps(value, ensure_ascii=False)


def jinja_template(template: ChatTemplate) -> Optional[str]:
    """The Jinja chat template rendering exactly as `template` does, or None if there is none."""
    if template.name == "tokenizer":
        return template.tokenizer.chat_template
    default = template.system_prompt
    if template.name == "llama2":
        body = _LLAMA2
    elif template.name in ("human_response", "alpaca"):
        if template.name == "alpaca" and default is None:
            default = AlpacaTemplate.default_system
        body = (_HEADERS.replace("USER_HEADER", _literal(template.user_header))
                .replace("ASSISTANT_HEADER", _literal(template.assistant_header)))
    elif template.name in ("chatml", "llama3"):
        # No BOS where the tokenizer's BOS is the turn start itself (SmolLM2), as in training.
        body = _HEADER_TOKENS.replace("BOS", "''" if template._bos_starts_turns else "bos_token")
        for name, value in (("START_SYSTEM", template.start("system")), ("START_USER", template.start("user")),
                            ("START_ASSISTANT", template.start("assistant")),
                            ("END_OF_TURN", template._end_of_turn(template.end_marker)),
                            ("AFTER_END", template.after_end), ("END", template.end_marker)):
            body = body.replace(name, _literal(value))
    else:
        return None
    return _SYSTEM.replace("DEFAULT", _literal(default)) + body


def verify_jinja(jinja: str, template: ChatTemplate) -> None:
    """Raise if the Jinja template does not render the training strings byte for byte."""
    tokenizer = template.tokenizer
    for messages in _CHECKS:
        if template.name == "tokenizer" and template.system_prompt and messages[0]["role"] != "system":
            continue  # the tokenizer's own template cannot know the run's default system prompt
        if template.name == "tokenizer":  # kept as the tokenizer wrote it: it need not trim contents as training does
            messages = [{**m, "content": m["content"].strip()} for m in messages]
        if messages[-1]["role"] == "user":
            expected = template.prompt(messages)
            got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        else:
            expected = template.text(messages)
            got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False)
        if got != expected:
            raise RuntimeError(f"the Jinja chat template for '{template.name}' renders {got!r} where training "
                               f"renders {expected!r}; this is a bug in loraforge")


def training_chat_template(template: ChatTemplate) -> Optional[str]:
    """The checked Jinja template for `template` (None when it has none)."""
    jinja = jinja_template(template)
    if jinja is not None:
        verify_jinja(jinja, template)
    return jinja
