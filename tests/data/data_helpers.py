"""Helpers shared by the data tests (a module, not conftest, so it can be imported by name)."""


def pieces(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def trained_pieces(tokenizer, row):
    return [p for p, lab in zip(tokenizer.convert_ids_to_tokens(row["input_ids"]), row["labels"]) if lab != -100]


def spans(labels):
    """[(start, end)] index ranges of consecutive trained positions."""
    out, start = [], None
    for i, lab in enumerate(list(labels) + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            out.append((start, i))
            start = None
    return out
