"""`generate --input prompts.jsonl`: rows checked before the model loads, answered one by one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from loraforge.data.templates import check_messages
from loraforge.data.tokenize import encode_prompt
from loraforge.errors import UserError
from loraforge.infer.generate import Sampling, check_fits, generate_reply, reply_stop_strings

MAX_LISTED = 10


def read_prompts(path) -> list[dict]:
    """The rows of a JSONL file, each `{"prompt": str}` or `{"messages": [... ending with a user turn]}`;
    every bad row is reported at once, by line number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--input {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {path}: cannot read it as UTF-8 text ({e})") from None
    rows, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(_checked(json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"  line {number}: not valid JSON ({e.msg} at column {e.colno})")
        except ValueError as e:
            problems.append(f"  line {number}: {e}")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"  ... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise UserError(f"--input {path}: {len(problems)} bad row(s); each line must be a JSON object with "
                        '"prompt": "text" or "messages": [{"role": "user", "content": "text"}, ...]:\n' + "\n".join(shown))
    if not rows:
        raise UserError(f"--input {path} has no rows; write one JSON object per line, e.g. {{\"prompt\": \"Hello\"}}")
    return rows


def _checked(row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("prompt"), str):
        if not row["prompt"].strip():
            raise ValueError('"prompt" is empty')
        return row
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} turns')
        check_messages(messages)
        if messages[-1]["role"] != "user":
            raise ValueError('"messages" must end with a user turn, the one to answer')
        return row
    raise ValueError(f'no "prompt" (text) or "messages" field; the row has {sorted(row)}')


def conversation(row: dict) -> list[dict]:
    if "messages" in row:
        return list(row["messages"])
    return [{"role": "user", "content": row["prompt"]}]


def answer_rows(session, rows: list[dict], sampling: Sampling) -> Iterator[dict]:
    """Each input row with "answer" added (and "prompt": the question, for "messages" rows).

    Every prompt is checked to fit the context first, so a long row fails the batch before any work."""
    stops = reply_stop_strings(session.template)
    prompts = [encode_prompt(session.template, conversation(row)) for row in rows]
    for number, prompt in enumerate(prompts, 1):
        check_fits(session.model, session.tokenizer, prompt, sampling.max_new_tokens, f"prompt {number} of {len(rows)}")
    for row, prompt in zip(rows, prompts):
        answer = generate_reply(session.model, session.tokenizer, prompt, stop_strings=stops, **sampling.as_kwargs())
        question = row["prompt"] if "prompt" in row else row["messages"][-1]["content"]
        yield {**row, "prompt": question, "answer": answer}
