"""Small tables that read well both in a notebook (HTML) and in a terminal (aligned text), and byte
counts as people read them (:func:`format_bytes`).

Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence


def format_bytes(n: int | float) -> str:
    """``8.5 GiB``-style text for a byte count (binary units, as accelerate's GiB), for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.2f}".rstrip("0").rstrip(".") + f" {unit}"
        value /= 1024
    return f"{value:.2f}".rstrip("0").rstrip(".") + " TiB"


class Table:
    """Rows of dicts shown as a table; ``formats`` maps a column to a function that renders it.

    Columns whose values are all numbers are right-aligned (also when a format renders them).
    """

    def __init__(
        self,
        rows: Sequence[dict],
        columns: Sequence[str] | None = None,
        formats: dict[str, Callable[[object], str]] | None = None,
        title: str = "",
    ) -> None:
        self.rows = list(rows)
        self.columns = list(columns) if columns else list(dict.fromkeys(k for r in self.rows for k in r))
        self.formats = formats or {}
        self.title = title

    def _text(self, value: object, col: str) -> str:
        fmt = self.formats.get(col)
        if fmt is not None and value is not None:
            return fmt(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return "" if value is None else str(value)

    def _right(self, col: str) -> bool:
        values = [r.get(col) for r in self.rows]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    def __str__(self) -> str:
        cells = [[self._text(r.get(c), c) for c in self.columns] for r in self.rows]
        right = [self._right(c) for c in self.columns]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]

        def line(values: list[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.columns), line(["-" * w for w in widths])]
        out += [line(row) for row in cells]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        align = ["right" if self._right(c) else "left" for c in self.columns]
        head = "".join(f'<th style="text-align:{a}">{html.escape(c)}</th>' for c, a in zip(self.columns, align))
        body = "".join(
            "<tr>"
            + "".join(
                f'<td style="text-align:{a}">{html.escape(self._text(r.get(c), c))}</td>'
                for c, a in zip(self.columns, align)
            )
            + "</tr>"
            for r in self.rows
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))
