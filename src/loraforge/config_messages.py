"""How a config that does not validate is told to the user: pydantic's errors as key paths the user wrote.

Kept apart from config.py so that file stays the schema; nothing here knows the schema except through
the `root` model passed in.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

CROSS_CHECK_MARK = "cross-checks:\n"  # a validator's message of several 'key.path: problem' lines
SECRET_KEYS = frozenset({"hub_token"})  # by name, in any section: never shown, saved or passed in argv


TRUST_FLAG = "--trust-remote-code"


def remote_code_refusal(source: str, keys: list[str]) -> str:
    """The one message for code a file asks to run that this command line did not allow."""
    return (f"refused to run code shipped with the model or data: {source} sets {', '.join(keys)}: true, and a "
            f"setting in a file never turns that on. If you have read that code and trust it, add {TRUST_FLAG} "
            "to this command")


def without_secrets(value: Any) -> Any:
    """`value` (a config, a section, a --set value) without any key named in SECRET_KEYS, at any depth."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if str(k) not in SECRET_KEYS}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def names_secret(text: str) -> bool:
    return any(name in text for name in SECRET_KEYS)


def redacted_override(text: str) -> Optional[str]:
    """A `--set KEY=VALUE` as it may be printed or passed to another process: None for a secret's own key (or
    text that names one and cannot be read); a section set whole (`model={base: x, hub_token: ...}`) without
    its secret keys; anything else as given."""
    key, sep, raw = text.partition("=")
    if any(part.strip() in SECRET_KEYS for part in key.split(".")):
        return None
    try:
        value = yaml.safe_load(raw) if sep and raw else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        return None if names_secret(text) else text
    cleaned = without_secrets(value)
    if cleaned == value:
        return text
    return f"{key.strip()}={json.dumps(cleaned, ensure_ascii=False, default=str)}"  # JSON is YAML: --set reads it


def leaf_types(ann) -> set:
    """The plain types inside an annotation: Optional[list[DatasetSource]] -> {NoneType, DatasetSource}."""
    args = get_args(ann)
    if not args:
        return {ann}
    if get_origin(ann) is Literal:
        return {type(a) for a in args}
    if get_origin(ann) is dict:
        return set()
    return set().union(*(leaf_types(a) for a in args))


def _section_of(ann) -> Optional[type[BaseModel]]:
    models = [t for t in leaf_types(ann) if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if models else None


def _clean_loc(loc, root: type[BaseModel]) -> tuple[list, type[BaseModel]]:
    """The user's key path of an error, without pydantic's union-member tags such as
    `literal['attention','all-linear']` or `list[str]`; and the section the last key belongs to."""
    model, section, out = root, root, []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif model is not None:  # a key of this section (or an unknown one: the message is about it)
            out.append(part)
            section = model
            field = model.model_fields.get(part)
            model = _section_of(field.annotation) if field else None
        elif not _PYDANTIC_TAG.match(part):  # e.g. a key of data.datasets[].columns
            out.append(part)
    return out, section


# How pydantic names the member of a union (or a validator) that failed: not a key the user wrote.
_PYDANTIC_TAG = re.compile(r"^(literal\[.*\]|[a-z]+\[.*\]|str|int|float|bool|none|function-[a-z]+\[.*\])$")


def format_errors(err: ValidationError, source: str, root: type[BaseModel], set_keys: dict[str, str] = {}) -> str:
    """One line per key path as the user wrote it (a union's alternatives joined), did-you-mean for unknown
    keys, the --set flag that set a bad value, the cross-checks' own lines; never a secret's value."""
    problems: dict[str, list[str]] = {}  # one entry per key path: a union's alternatives become one line
    from_set, cross = [], []
    for e in err.errors():
        if CROSS_CHECK_MARK in e["msg"]:  # the cross-checks: one line each, with their own key paths
            cross += e["msg"].split(CROSS_CHECK_MARK, 1)[1].splitlines()
            continue
        loc, section = _clean_loc(e["loc"], root)
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(str(loc[-1]), section or root)
        problems.setdefault(path, [])
        if msg not in problems[path]:
            problems[path].append(msg)
        if "input" in e and e["type"] not in ("missing", "extra_forbidden") \
                and not isinstance(e["input"], (dict, list)) and not names_secret(path) \
                and not names_secret(repr(e["input"])):  # never echo a secret
            problems[path].append(f"(got {e['input']!r})")
        from_set.append(_set_flag(path, set_keys))
    lines = []
    for path, msgs in problems.items():
        flag = _set_flag(path, set_keys)
        text = " ".join(_join_alternatives(msgs))
        lines.append(f"  - {path}: {text}" + (f" (from {flag})" if flag else ""))
    lines += [f"  - {problem}" for problem in cross]
    where = "--set" if from_set and all(from_set) and not cross else \
        source + (" and --set" if any(from_set) else "")
    return "\n".join([f"{where}: {len(lines)} problem(s) in the config:"] + lines)


def _join_alternatives(msgs: list[str]) -> list[str]:
    texts = [m for m in msgs if not m.startswith("(got")]
    got = [m for m in msgs if m.startswith("(got")][:1]
    joined = texts[0] + "".join(", or " + t[0].lower() + t[1:] for t in texts[1:]) if texts else ""
    return [joined] + got


def _set_flag(path: str, set_keys: dict[str, str]) -> Optional[str]:
    """The --set flag that produced the value at `path` (the key itself or a section above it)."""
    for key, text in set_keys.items():
        if path == key or path.startswith(key + "."):
            return f"--set {redacted_override(text) or key}"  # never echo a secret
    return None


def _suggest(name: str, section: type[BaseModel]) -> str:
    fields = list(section.model_fields)
    close = difflib.get_close_matches(name, fields, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(fields)}"
