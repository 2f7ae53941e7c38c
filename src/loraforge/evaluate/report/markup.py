"""HTML pieces of the report: escaping, number formatting, tables, cards, figures."""
from __future__ import annotations

import html
import math
from typing import Any, Optional


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def number(value: Any) -> Optional[float]:
    """`value` if it is a finite number, else None: a run folder's files may hold anything where a number belongs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def table(rows: list[list[Any]], header: Optional[list[str]], table_id: str = "", cls: str = "",
           numeric: bool = True) -> str:
    """A table; `header` None for key/value tables, whose first column is then a row heading."""
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{cls}"' if cls else "")
    out = [f"<table{attrs}>"]
    if header is not None:
        out.append("<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if header is None and i == 0:
                cells.append(f'<th scope="row">{escape(cell)}</th>')
                continue
            if isinstance(cell, Raw):
                cells.append(f"<td>{cell.html}</td>")
            elif numeric and isinstance(cell, (int, float)) and not isinstance(cell, bool):
                cells.append(f'<td class="num">{escape(fmt(cell))}</td>')
            else:
                cells.append(f"<td>{escape(cell if isinstance(cell, str) else fmt(cell))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


class Raw:
    def __init__(self, html_text: str):
        self.html = html_text


def card(key: str, value: str, note: str = "") -> str:
    n = f'<div class="n">{escape(note)}</div>' if note else ""
    return f'<div class="card"><div class="k">{escape(key)}</div><div class="v">{escape(value)}</div>{n}</div>'


def delta(base: Any, tuned: Any, lower_is_better: bool) -> Raw:
    base, tuned = number(base), number(tuned)
    if base is None or tuned is None:
        return Raw("–")
    d = tuned - base
    if d == 0:
        return Raw('<span>0</span>')
    good = (d < 0) == lower_is_better
    sign = "+" if d > 0 else "−"
    return Raw(f'<span class="{"better" if good else "worse"}">{sign}{escape(fmt(abs(d)))}</span>')


def figure(b64: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{b64}" alt="{escape(alt)}">{cap}</figure>'
