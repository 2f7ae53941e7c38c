"""Where a row is in its file, and what is wrong with a file the loader rejected, read in bounded pieces.

A data file can be gigabytes, or one line of it can be: these read blocks of `BLOCK` bytes, hold one
line at a time (lines over `MAX_LINE` are skipped, not held), and keep a mark every `MARK_EVERY` rows so
naming a row again does not read the file again from its start.
"""
from __future__ import annotations

import bisect
import json
from typing import Iterator, Optional

from loraforge.errors import UserError

BLOCK = 1 << 20
MARK_EVERY = 4096
MAX_LINE = 64 << 20  # a JSON line or array element this long is not parsed to explain an error


def row_lines(f, start: int = 0, line: int = 1) -> Iterator[tuple[int, int]]:
    """(line number, byte offset where the line starts) of every non-blank line of a binary file from
    `start` (which is the start of line `line`). datasets' JSON loader skips blank lines, so the n-th of
    these is the n-th row."""
    f.seek(start)
    pos = line_start = start
    filled = False
    while block := f.read(BLOCK):
        at = 0
        while True:
            newline = block.find(b"\n", at)
            end = newline if newline >= 0 else len(block)
            filled = filled or bool(block[at:end].strip())
            if newline < 0:
                break
            if filled:
                yield line, line_start
            line, line_start, filled, at = line + 1, pos + newline + 1, False, newline + 1
        pos += len(block)
    if filled:
        yield line, line_start


class LineIndex:
    """The line number of a JSONL file's n-th row, found by reading forward from the nearest mark."""

    def __init__(self, path: str):
        self.path = path
        self.marks = [(0, 1, 0)]  # (row, line, byte offset), one per MARK_EVERY rows read so far

    def line_of(self, row: int) -> Optional[int]:
        k = bisect.bisect_right(self.marks, (row, float("inf"))) - 1
        at, line, offset = self.marks[k]
        with open(self.path, "rb") as f:
            for number, start in row_lines(f, offset, line):
                if at % MARK_EVERY == 0 and at > self.marks[-1][0]:
                    self.marks.append((at, number, start))
                if at == row:
                    return number
                at += 1
        return None


def _lines(f) -> Iterator[tuple[int, Optional[bytes]]]:
    """(line number, the line's bytes, or None when it is longer than MAX_LINE) of every line."""
    number = 0
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := f.readline(BLOCK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        else:
            yield number, raw


def explain_jsonl(path: str) -> None:
    """Raise a UserError naming the first line of a JSONL file that is not one JSON object; else return."""
    with open(path, "rb") as f:
        for n, raw in _lines(f):
            if raw is None or not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                                "Each line must be one JSON object; fix or remove the line.") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object with named fields, got "
                                f"{type(row).__name__}. Each line must look like {{\"text\": \"...\"}}.")


def explain_json_array(path: str) -> None:
    """Raise a UserError naming the first element of a JSON array file that is not valid JSON or not an
    object; else return. Reads one element at a time (up to MAX_LINE characters each)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        text, pos, line, done = "", 0, 1, False  # `line`: the line number at text[0]

        def more() -> bool:
            nonlocal text, pos, line, done
            chunk = f.read(BLOCK)
            line += text.count("\n", 0, pos)
            text, pos = text[pos:] + chunk, 0
            done = not chunk
            return bool(chunk)

        def skip_space() -> Optional[str]:
            nonlocal pos
            while True:
                while pos < len(text) and text[pos] in " \t\r\n":
                    pos += 1
                if pos < len(text):
                    return text[pos]
                if not more():
                    return None

        def fail(message: str):
            where = line + text.count("\n", 0, pos)
            raise UserError(f"{path}: line {where}: {message}. Fix the file.")

        if skip_space() != "[":
            fail("not valid JSON (expected a JSON array [ {...}, ... ])")
        pos += 1
        row = 0
        while True:
            c = skip_space()
            if c == "]" and row == 0:
                return
            if c is None:
                fail("not valid JSON (the array is not closed with ])")
            row += 1
            while True:  # an error may only mean the row goes on past what was read: read on and retry
                try:
                    value, end = decoder.raw_decode(text, pos)
                    break
                except json.JSONDecodeError as e:
                    if done or len(text) - pos > MAX_LINE:
                        pos = e.pos
                        fail(f"not valid JSON ({e.msg}, in row {row})")
                    more()
            if not isinstance(value, dict):
                fail(f"row {row}: expected an object with named fields, got {type(value).__name__}")
            pos = end
            c = skip_space()
            if c == "]":
                return
            if c != ",":
                fail(f"not valid JSON (expected , or ] after row {row})")
            pos += 1
