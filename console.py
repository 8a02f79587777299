"""The two ways to talk to the user: `Console` (a terminal) and `Pipe` (lines in and out).

Both offer the chat the same calls: `show(line)` from any thread, `read_line` on
the main thread, and `wake(reason)`, which any thread or a signal handler may call to
interrupt a blocking `read_line` (a self-pipe its select() watches).

`Console` owns the terminal: raw mode, the input line (a `lineedit.LineEditor`)
and the screen. Every write to the terminal happens under `Console._lock`, with the
input area erased first and drawn again after, so a message never lands on the
prompt. `Pipe._lock` guards its two streams (messages to stdout, status to stderr).
Lock order: `Console._lock` may be held while Tab's completer takes the chat's locks
(the user list, the welcome), never the other way round.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import threading
import unicodedata
from collections import deque
from collections.abc import Iterator
from typing import Any, TextIO

from display import Line, advance, char_width, input_char, sanitize, wrap
from lineedit import Completer, KeyDecoder, LineEditor

PROMPT = "> "
ESC_WAIT_S = 0.05  # an ESC with nothing after it for this long is the Escape key itself
_LEAVE = object()  # what a key returns to end read_line with None


class Woken(Exception):
    """`read_line` was interrupted by `wake(reason)`: "end" (the chat is over), "leave"
    (a signal asks to leave now), "stdout" (standard output is gone) or "eof"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Waker:
    """A self-pipe that `read_line`'s select() also watches, so any thread (or a signal
    handler: it takes no lock) can interrupt a blocking read."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        """Why `wake` was called, if it was."""
        return self._reason

    def wake(self, reason: str) -> None:
        self._reason = self._reason or reason
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def close_waker(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Pipe(_Waker):
    """Pipe mode: input lines from a file descriptor; messages to stdout, status to stderr."""

    interactive = False

    def __init__(self, fd: int, out: TextIO, err: TextIO):
        super().__init__()
        self.fd, self.out, self.err = fd, out, err
        self._lock = threading.Lock()  # guards the two streams
        self._buf = b""
        self._eof = False

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_waker()

    def show(self, line: Line) -> None:
        with self._lock:
            stream = self.err if line.status else self.out
            try:
                stream.write(line.text + "\n")
                stream.flush()
            except BrokenPipeError:  # stdout closed (`| head`): leave, exit cleanly
                self._stdout_gone()
            except (OSError, ValueError):
                pass  # a broken stream must not take the session down

    def wait_woken(self) -> str:
        """Block until `wake`; its reason."""
        while self._reason is None:
            select.select([self._wake_r], [], [])
            self._drain_wake()
        return self._reason

    def read_line(self, prompt: str | None = None, completer: Any = None) -> str | None:
        """The next input line without its end; None at end of input."""
        while b"\n" not in self._buf and not self._eof:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:
                self._drain_wake()
                if self._reason:
                    raise Woken(self._reason)
            if self.fd in ready:
                data = os.read(self.fd, 65536)
                self._buf += data
                self._eof = not data
        if not self._buf:
            return None
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "surrogateescape").removesuffix("\r")

    def watch_stdout(self) -> None:
        """Notice a closed pipe at once, even when nothing more is to be written (poll's
        POLLERR on a pipe whose reader is gone; POLLHUP on a socket)."""
        try:
            mode = os.fstat(self.out.fileno()).st_mode
        except (OSError, ValueError):
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return

        def watch() -> None:
            poller = select.poll()
            poller.register(self.out.fileno(), select.POLLERR | select.POLLHUP)
            with contextlib.suppress(OSError, ValueError):
                if poller.poll():
                    with self._lock:
                        self._stdout_gone()

        threading.Thread(target=watch, name="bcast-stdout-watch", daemon=True).start()

    def _stdout_gone(self) -> None:
        """Point stdout at /dev/null (so exiting prints no EPIPE noise), then leave."""
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
        self.wake("stdout")


class Console(_Waker):
    """The terminal: a raw-mode line editor that owns the input line, and `show`, which
    prints above it. Every write to the terminal happens under `_lock`, with the input
    area erased first and drawn again after, so nothing can land on the prompt.

    Positions are counted in display columns (`char_width`), as the terminal wraps.
    """

    interactive = True

    def __init__(self, fd: int, out: TextIO):
        super().__init__()
        self.fd, self.out = fd, out
        self._lock = threading.Lock()  # guards the screen and every field below
        self._prompt = PROMPT
        self._line = LineEditor()  # the line being typed, and the lines typed before
        self._active = False  # a line is being edited: show() draws it again after printing
        self._drawn = False  # the prompt and the line are on the screen
        self._cursor_row = 0  # rows from the top of the input area down to the cursor
        self._end = (0, 0)  # (row, column) just after the input area, once drawn
        self._completer: Completer | None = None
        self._tabbed = False  # the last key was Tab (a second Tab lists the candidates)
        self._keys = KeyDecoder()
        self._typed: deque[str] = deque()  # keys read but not handled yet (after Enter)
        self._resized = False
        self._saved: Any = None
        self._old_winch: Any = None

    # -- the terminal mode --

    def __enter__(self) -> Console:
        import termios

        self._saved = termios.tcgetattr(self.fd)
        raw = termios.tcgetattr(self.fd)
        raw[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON)
        raw[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSADRAIN, raw)  # output processing stays on
        if threading.current_thread() is threading.main_thread():
            self._old_winch = signal.signal(signal.SIGWINCH, self._on_winch)
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        self.finish(keep=True)
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
        with contextlib.suppress(OSError):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        self.close_waker()

    def _on_winch(self, signum: int, frame: Any) -> None:
        self._resized = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    # -- output --

    def show(self, line: Line) -> None:
        """Print `line` (wrapped to the width) above the input line, which stays as it was."""
        with self._redrawn():
            text = "\n".join(wrap(line.text, self._cols(), line.indent))
            self._write(text + "\n" + ("\a" if line.bell else ""))

    def clear(self) -> None:
        """Clear the screen; the input line is drawn again at the top."""
        with self._redrawn():
            self._write("\x1b[H\x1b[2J")

    def put_back(self, text: str) -> None:
        """Make `text` the line being typed again (a line that could not be sent)."""
        with self._redrawn():
            self._line.set_text(text)

    def set_prompt(self, prompt: str) -> None:
        with self._redrawn():
            self._prompt = prompt

    @contextlib.contextmanager
    def _redrawn(self) -> Iterator[None]:
        """Under the lock: the input area off the screen, then (while a line is being
        edited) drawn again after the change, so output never lands on the prompt."""
        with self._lock:
            self._erase()
            yield
            if self._active:
                self._draw()
            self._flush()

    def finish(self, keep: bool) -> None:
        """Stop editing: leave the line on the screen (`keep`) with the cursor below it,
        or erase it."""
        with self._lock:
            if self._drawn and keep:
                down = self._end[0] - self._cursor_row
                self._write((f"\x1b[{down}B" if down else "") + ("\r\n" if self._end[1] else "\r"))
                self._drawn = False
            self._erase()
            self._active = False
            self._flush()

    def _cols(self) -> int:
        try:
            return max(8, os.get_terminal_size(self.out.fileno()).columns)
        except (OSError, ValueError):
            return 80

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.write(text)

    def _flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.flush()

    def _erase(self) -> None:
        """Remove the input area from the screen; the cursor ends where it began."""
        if self._drawn:
            up = self._cursor_row
            self._write((f"\x1b[{up}A" if up else "") + "\r\x1b[J")
            self._drawn = False

    def _draw(self) -> None:
        """Draw the prompt and the line, counting columns as the terminal wraps them, and put
        the cursor where it belongs."""
        cols = self._cols()
        row = col = 0
        for ch in self._prompt:
            row, col = advance(row, col, char_width(ch), cols)
        parts, cursor = [self._prompt], (row, col)
        buf, pos = self._line.buf, self._line.pos
        for i, ch in enumerate(buf):
            shown = input_char(ch)
            if i == pos:
                cursor = (row, col)
            parts.append(shown)
            for c in shown:
                row, col = advance(row, col, char_width(c), cols)
        if pos >= len(buf):
            cursor = (row, col)
        if col == cols:  # the wrap is pending: a space makes the terminal take it
            parts.append(" \r")
            row, col = row + 1, 0
        cursor = self._cursor_at(cursor, cols)
        up = row - cursor[0]
        parts.append((f"\x1b[{up}A" if up else "") + "\r")
        if cursor[1]:
            parts.append(f"\x1b[{cursor[1]}C")
        self._write("".join(parts))
        self._drawn, self._cursor_row, self._end = True, cursor[0], (row, col)

    def _cursor_at(self, at: tuple[int, int], cols: int) -> tuple[int, int]:
        """The cursor's cell: at the start of the next row when the row is full or the
        character under the cursor will not fit on it (a wide one in the last column)."""
        row, col = at
        buf, pos = self._line.buf, self._line.pos
        nxt = char_width(buf[pos]) if pos < len(buf) else 1
        if col == cols or col + nxt > cols:
            return row + 1, 0
        return row, col

    # -- input --

    def read_line(
        self, prompt: str | None = PROMPT, completer: Completer | None = None
    ) -> str | None:
        """One line as typed (Enter); None to leave (Ctrl-D, or Ctrl-C on an empty line).

        `prompt` None keeps the current one (set_prompt may change it meanwhile).
        Raises Woken when another thread or a signal interrupts it.
        """
        with self._lock:
            if prompt is not None and prompt != self._prompt:
                self._erase()
                self._prompt = prompt
            self._completer, self._active = completer, True
            if not self._drawn:
                self._draw()
            self._flush()
        while True:
            while not self._typed:
                self._typed.extend(self._next_keys())
            key = self._typed.popleft()
            with self._lock:
                done = self._on_key(key)
                self._flush()
            if done is _LEAVE:
                return None
            if done is not None:
                return done

    def _next_keys(self) -> list[str]:
        wait = ESC_WAIT_S if self._keys.pending else None
        ready, _, _ = select.select([self.fd, self._wake_r], [], [], wait)
        if not ready:
            return self._keys.flush()
        if self._wake_r in ready:
            self._drain_wake()
            if self._resized:
                self._resized = False
                with self._lock:
                    self._erase()
                    self._draw()
                    self._flush()
            if self._reason:
                raise Woken(self._reason)
        if self.fd in ready:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                data = b""
            if not data:
                raise Woken("eof")
            return self._keys.feed(data)
        return []

    def _on_key(self, key: str) -> Any:
        """Apply one key under the lock; the finished line, _LEAVE, or None to go on."""
        tabbed, self._tabbed = self._tabbed, key == "tab"
        line = self._line
        if len(key) == 1:
            if unicodedata.category(key) != "Cc":
                line.insert(key)
        elif key == "enter":
            self._erase()
            return line.submit()
        elif key in ("ctrl-c", "ctrl-d") and not line.buf:
            return _LEAVE
        elif key == "ctrl-c":  # like a shell: drop the draft
            line.set_text("")
        elif key == "tab":
            self._complete(list_all=tabbed)
        elif key == "redraw":
            self._write("\x1b[H\x1b[2J")
            self._drawn = False
        else:
            line.edit(key)
        self._erase()
        self._draw()
        return None

    def _complete(self, list_all: bool) -> None:
        """Tab: complete the word before the cursor; a second Tab lists the candidates."""
        if self._completer is None:
            return
        candidates = self._line.complete(self._completer)
        if candidates and list_all:
            self._erase()
            listed = "  ".join(sanitize(c) for c in candidates)
            self._write("\n".join(wrap(listed, self._cols(), 0)) + "\n")


@contextlib.contextmanager
def signals_handled(signums: tuple[int, ...], handler: Any) -> Iterator[None]:
    """While inside, `handler` handles `signums`. Only the main thread may set handlers;
    on another (a test's) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = [signal.signal(signum, handler) for signum in signums]
    try:
        yield
    finally:
        for signum, was in zip(signums, old):
            signal.signal(signum, was)
