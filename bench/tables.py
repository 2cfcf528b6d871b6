"""The one table printer of bench/: fixed-width console tables and Markdown tables.

Every bench command prints its figures through this, so a column is declared once (title,
width, format) and the header always lines up with the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """`spec` formats each value (e.g. ".2f"); `width` pads it (console tables only)."""

    title: str
    width: int = 0
    spec: str = ""
    left: bool = False


class Table:
    """Columns printed side by side, `sep` between them; or a Markdown table."""

    def __init__(self, *columns: Column, sep: str = "", markdown: bool = False) -> None:
        self.columns = columns
        self.sep = sep
        self.markdown = markdown

    def header(self) -> list[str]:
        """The title line (and, for Markdown, the alignment line)."""
        if self.markdown:
            return [
                "| " + " | ".join(c.title for c in self.columns) + " |",
                "|" + "|".join("---" if c.left else "---:" for c in self.columns) + "|",
            ]
        return [
            self.sep.join(format(c.title, f"{self._align(c)}{c.width or ''}") for c in self.columns)
        ]

    def row(self, *values: object) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} values for {len(self.columns)} columns")
        if self.markdown:
            return (
                "| "
                + " | ".join(format(v, c.spec) for c, v in zip(self.columns, values, strict=True))
                + " |"
            )
        return self.sep.join(
            format(v, f"{self._align(c)}{c.width or ''}{c.spec}")
            for c, v in zip(self.columns, values, strict=True)
        )

    def lines(self, rows: Sequence[Sequence[object]]) -> list[str]:
        """The header, then one line per row."""
        return [*self.header(), *(self.row(*r) for r in rows)]

    @staticmethod
    def _align(column: Column) -> str:
        return "<" if column.left else ">"
