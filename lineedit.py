"""The line editor without a terminal: typed bytes to keys, keys to the line being edited.

`KeyDecoder` turns the bytes of a raw terminal into keys (characters, or names such
as "left" and "ctrl-c"), whatever the reads cut. `LineEditor` is the line being typed
and the lines typed before: one key at a time changes its text and cursor, Up and
Down browse the history, Tab asks a completer. Pure: `console.Console` reads the keys,
calls these under its lock and draws the result.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable

HISTORY_LINES = 500  # lines Up and Down recall
Completer = Callable[[str], tuple[str, list[str]]]

# Keys of a raw terminal: a typed character is itself, other keys have names.
CONTROL_KEYS = {
    "\r": "enter",
    "\n": "enter",
    "\x7f": "backspace",
    "\x08": "backspace",
    "\t": "tab",
    "\x01": "home",
    "\x05": "end",
    "\x02": "left",
    "\x06": "right",
    "\x10": "up",
    "\x0e": "down",
    "\x03": "ctrl-c",
    "\x04": "ctrl-d",
    "\x15": "kill-start",
    "\x0b": "kill-end",
    "\x17": "kill-word",
    "\x0c": "redraw",
}
CSI_KEYS = {
    "A": "up",
    "B": "down",
    "C": "right",
    "D": "left",
    "H": "home",
    "F": "end",
    "1~": "home",
    "7~": "home",
    "4~": "end",
    "8~": "end",
    "3~": "delete",
    "1;5C": "word-right",
    "1;3C": "word-right",
    "1;5D": "word-left",
    "1;3D": "word-left",
}
SS3_KEYS = {"A": "up", "B": "down", "C": "right", "D": "left", "H": "home", "F": "end"}
ALT_KEYS = {"b": "word-left", "f": "word-right", "\x7f": "kill-word"}
_CSI = re.compile(r"\x1b\[([0-?]*[ -/]*)([@-~])")
_CSI_PARTIAL = re.compile(r"\x1b\[[0-?]*[ -/]*")


class KeyDecoder:
    """Bytes typed on a raw terminal to keys: characters, or names for the other keys."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""

    @property
    def pending(self) -> bool:
        """An escape sequence may be incomplete: wait a little for the rest."""
        return bool(self._text)

    def feed(self, data: bytes) -> list[str]:
        self._text += self._utf8.decode(data)
        return self._parse(final=False)

    def flush(self) -> list[str]:
        return self._parse(final=True)

    def _parse(self, final: bool) -> list[str]:
        keys, text, i = [], self._text, 0
        while i < len(text):
            ch = text[i]
            if ch != "\x1b":
                keys.append(CONTROL_KEYS.get(ch, ch))
                i += 1
                continue
            key, end = self._escape(text, i)
            if key is None:  # incomplete: wait for more, unless nothing more is coming
                if not final:
                    break
                key, end = "esc", i + 1
            keys.append(key)
            i = end
        self._text = text[i:]
        return keys

    @staticmethod
    def _escape(text: str, i: int) -> tuple[str | None, int]:
        if i + 1 >= len(text):
            return None, i
        nxt = text[i + 1]
        if nxt == "[":
            m = _CSI.match(text, i)
            if m:
                return CSI_KEYS.get(m.group(1) + m.group(2), "unknown"), m.end()
            if _CSI_PARTIAL.fullmatch(text, i):
                return None, i
            return "esc", i + 1
        if nxt == "O":
            if i + 2 >= len(text):
                return None, i
            return SS3_KEYS.get(text[i + 2], "unknown"), i + 3
        return ALT_KEYS.get(nxt, "unknown"), i + 2


class LineEditor:
    """The line being typed (`buf`, the cursor at `pos`) and the lines typed before.

    No I/O: the console draws `buf` after each key. The caller serialises the calls
    (the console holds its lock).
    """

    def __init__(self, history_lines: int = HISTORY_LINES) -> None:
        self.buf: list[str] = []
        self.pos = 0
        self._history_lines = history_lines
        self._history: list[str] = []
        self._recall = 0  # index into _history while Up/Down browse it
        self._draft = ""  # the line being typed before Up was pressed

    @property
    def text(self) -> str:
        return "".join(self.buf)

    def set_text(self, text: str) -> None:
        """Make `text` the line, the cursor at its end."""
        self.buf, self.pos = list(text), len(text)

    def insert(self, ch: str) -> None:
        self.buf.insert(self.pos, ch)
        self.pos += 1

    def submit(self) -> str:
        """The finished line (Enter), kept in the history unless blank or a repeat; the
        line is empty again."""
        line = self.text
        self.set_text("")
        if line.strip() and (not self._history or self._history[-1] != line):
            self._history = [*self._history, line][-self._history_lines :]
        self._recall = len(self._history)
        return line

    def complete(self, completer: Completer) -> list[str]:
        """Tab: complete the word before the cursor; the candidates when nothing changed."""
        before = "".join(self.buf[: self.pos])
        done, candidates = completer(before)
        if done != before:
            self.buf[: self.pos] = list(done)
            self.pos = len(done)
            return []
        return candidates

    def edit(self, key: str) -> None:
        """Apply an editing key: moves, deletions, Up and Down."""
        buf, pos = self.buf, self.pos
        if key == "backspace" and pos:
            del buf[pos - 1]
            pos -= 1
        elif key in ("delete", "ctrl-d") and pos < len(buf):
            del buf[pos]
        elif key == "left":
            pos = max(0, pos - 1)
        elif key == "right":
            pos = min(len(buf), pos + 1)
        elif key == "home":
            pos = 0
        elif key == "end":
            pos = len(buf)
        elif key in ("word-left", "kill-word"):
            start = pos
            while start and buf[start - 1] == " ":
                start -= 1
            while start and buf[start - 1] != " ":
                start -= 1
            if key == "kill-word":
                del buf[start:pos]
            pos = start
        elif key == "word-right":
            while pos < len(buf) and buf[pos] == " ":
                pos += 1
            while pos < len(buf) and buf[pos] != " ":
                pos += 1
        elif key == "kill-start":
            del buf[:pos]
            pos = 0
        elif key == "kill-end":
            del buf[pos:]
        elif key in ("up", "down"):
            self._browse(-1 if key == "up" else 1)
            return
        self.pos = pos

    def _browse(self, step: int) -> None:
        """Up and Down: earlier lines; past the newest, the line that was being typed."""
        at = self._recall + step
        if not 0 <= at <= len(self._history):
            return
        if self._recall == len(self._history):
            self._draft = self.text
        self._recall = at
        text = self._history[at] if at < len(self._history) else self._draft
        self.set_text(text)
