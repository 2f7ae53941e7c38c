"""Encoded rows kept compactly: a million short rows as a few flat int arrays, not a million lists.

A list of Python ints costs ~36 bytes a token (pointer + int object) and a dict per row; here a token
costs 8 bytes (int32 id and label). `TokenRows` is the read-only sequence the trainer and the
evaluation index (`rows[i]`, `rows[:n]`, `len`, iteration), each row built on access as
`{"input_ids": [...], "labels": [...]}`. With `keep_tokens=False` (`loraforge data inspect`) only the
per-row counts are kept: memory then grows by a few bytes a row.
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence

from loraforge.data.tokenize import IGNORE


class TokenStore:
    """Every kept row of a `prepare` call, in the order they were added; a row is its position."""

    def __init__(self, keep_tokens: bool = True):
        self.keep_tokens = keep_tokens
        self.ids, self.labels, self.starts = array("i"), array("i"), array("q", [0])
        self.length = array("i")  # tokens per row (kept, after truncation)
        self.trained = array("i")  # tokens with a label per row
        self.source = array("i")  # which source (the caller's key) and row inside it: to name or re-read it
        self.index = array("q")
        self.chat = bytearray()  # 1 where the row came from a conversation (it can give a sample)

    def add(self, input_ids, labels, source: int, index: int, chat: bool) -> int:
        if self.keep_tokens:
            self.ids.extend(input_ids)
            self.labels.extend(labels)
            self.starts.append(len(self.ids))
        self.length.append(len(input_ids))
        self.trained.append(sum(1 for lab in labels if lab != IGNORE))
        self.source.append(source)
        self.index.append(index)
        self.chat.append(1 if chat else 0)
        return len(self.length) - 1

    def row(self, k: int) -> dict:
        if not self.keep_tokens:
            raise RuntimeError("the token rows were not kept (prepare(keep_tokens=False))")
        a, b = self.starts[k], self.starts[k + 1]
        return {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}


class TokenRows(Sequence):
    """A selection of a store's rows (train or eval), in training order; rows may repeat (weighted mix)."""

    def __init__(self, store: TokenStore, picks: array):
        self.store, self.picks = store, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.store.row(k) for k in self.picks[i]]
        return self.store.row(self.picks[i])

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, TokenRows)) else NotImplemented

    def lengths(self) -> list[int]:
        """Tokens per row, without building the rows."""
        length = self.store.length
        return [length[k] for k in self.picks]

    def token_count(self) -> int:
        length = self.store.length
        return sum(length[k] for k in self.picks)

    def trained_count(self) -> int:
        trained = self.store.trained
        return sum(trained[k] for k in self.picks)

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows)"
