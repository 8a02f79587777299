"""Text as a terminal shows it: untrusted text escaped, display columns, wrapping. Pure.

Everything the server relays is untrusted: `sanitize` shows control characters and
escape sequences escaped, never interpreted. Widths are counted in display columns
(wide characters 2, combining marks 0), as the line editor and wrapping need.
`Line` is one thing to show; `console.Console` and `console.Pipe` print it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Bidi controls reorder what is shown (Trojan Source); line separators break lines.
_INVISIBLE = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def sanitize(text: str, newlines: str | None = None) -> str:
    """`text` with control characters and terminal escapes shown escaped, never interpreted.

    `newlines`, if given, replaces each \\n (and tabs are kept, as spaces).
    """
    out = []
    for ch in text:
        if ch == "\n" and newlines is not None:
            out.append(newlines)
        elif ch == "\t":
            out.append("    " if newlines is not None else "\\t")
        elif ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def char_width(ch: str) -> int:
    """Columns `ch` takes on a terminal: East Asian wide and fullwidth 2, combining marks
    and zero-width characters 0, others 1 (what the line editor and wrapping count)."""
    if " " <= ch < "\u0300":
        return 0 if ch == "\u00ad" else 1
    category = unicodedata.category(ch)
    if category in ("Mn", "Me", "Cf", "Cc") or "\u1160" <= ch <= "\u11ff":  # + Hangul jamo
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


_SGR = re.compile(r"\x1b\[[0-9;]*m")  # our own colour codes: no width
_CELL = re.compile(r"\x1b\[[0-9;]*m|.", re.DOTALL)


def text_width(text: str) -> int:
    """Columns `text` takes, not counting our colour codes."""
    return sum(char_width(ch) for ch in _SGR.sub("", text))


def advance(row: int, col: int, width: int, cols: int) -> tuple[int, int]:
    """Where the cursor is after a character of `width` drawn at (row, col), as a terminal
    wraps: a character that does not fit goes whole to the next row."""
    if width and col + width > cols:
        row, col = row + 1, 0
    return row, col + width


def wrap(text: str, cols: int, indent: int) -> list[str]:
    """`text` (which may hold newlines and our colour codes) as rows of at most `cols`
    columns, broken at spaces where possible; rows after the first start with `indent`
    spaces, so a long message hangs under its text, not under its timestamp."""
    if indent > cols // 2:  # a narrow terminal or a long name: a small indent, not none
        indent = min(2, indent)
    rows: list[str] = []
    for paragraph in text.split("\n"):
        width = cols if not rows else cols - indent
        for piece in _wrap_paragraph(paragraph, width, cols - indent):
            rows.append(piece if not rows else " " * indent + piece)
    return rows


def _wrap_paragraph(text: str, first: int, rest: int) -> list[str]:
    rows: list[str] = []
    row, used, width = "", 0, max(1, first)
    for token in re.findall(r" *[^ ]+| +", text) or [""]:
        size = text_width(token)
        if used + size > width and used:  # to the next row, without its leading spaces
            rows.append(row)
            row, used, width = "", 0, max(1, rest)
            token = token.lstrip(" ")
        for cell in _CELL.findall(token):  # longer than a row: break it anywhere
            size = 0 if cell.startswith("\x1b") else char_width(cell)
            if used + size > width and used:
                rows.append(row)
                row, used, width = "", 0, max(1, rest)
            row += cell
            used += size
    rows.append(row)
    return rows


@dataclass(frozen=True)
class Line:
    """One thing to show: `text` (our colour codes allowed) wraps with its continuation rows
    indented by `indent` columns. `status` lines go to stderr in a pipe; `bell` rings."""

    text: str
    indent: int = 0
    status: bool = False
    bell: bool = False
    ts: int | None = None  # ms since the epoch, for the date rule; None: not a timed line


def input_char(ch: str) -> str:
    """How the line editor draws a character of the input line (controls escaped)."""
    return sanitize(ch) if ch in _INVISIBLE or unicodedata.category(ch) in ("Cs", "Zl") else ch
