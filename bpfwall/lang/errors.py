"""Errors of the filter language: one line to log, and a rendering with a caret for people."""
from __future__ import annotations

from ..errors import Error

# Expressions longer than this are shown as a window around the column.
_WINDOW = 60


class LangError(Error):
    """A bad expression or value. `col` is 1-based; `text` is the expression it points into;
    `direction` says which of a unit's two expressions it is in, when that is known."""

    def __init__(self, message: str, col: int | None = None, text: str | None = None):
        super().__init__(message)
        self.message = message
        self.col = col
        self.text = text
        self.direction: str | None = None

    def __str__(self) -> str:
        return self.message if self.col is None else f"column {self.col}: {self.message}"

    def lines(self) -> list[str]:
        """The message (`--ingress: …` when the direction is known), then the expression with a
        caret under the column."""
        lines = self.render().splitlines() if self.text is not None else [str(self)]
        if self.direction:
            lines[0] = f"--{self.direction}: {lines[0]}"
        return lines

    def render(self) -> str:
        """The message, then the expression with a caret under the column."""
        if self.text is None or self.col is None:
            return str(self)
        # Whitespace that is not a space would shift the caret.
        text = "".join(" " if c.isspace() else c for c in self.text)
        at = min(max(self.col - 1, 0), len(text))
        start, end, before, after = 0, len(text), "", ""
        if len(text) > _WINDOW + _WINDOW // 5:
            start = max(0, min(at - _WINDOW // 2, len(text) - _WINDOW))
            end = min(len(text), start + _WINDOW)
            before = "…" if start > 0 else ""
            after = "…" if end < len(text) else ""
        line = before + text[start:end] + after
        caret = " " * (len(before) + at - start) + "^"
        return f"{self}\n  {line}\n  {caret}"


class PacketError(LangError):
    """Bytes that are not an IPv4 or IPv6 packet."""
