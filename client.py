"""bcast/1 chat client: a network `Session` apart from a thin terminal UI (PROTOCOL.md).

`Session` does the handshake (§2), checks the server's pinned fingerprint,
seals and sends records (§3) and reads them in its own thread; tests drive it
without a terminal. `ChatUI` reads lines (readline when there is a terminal,
plain lines from a pipe) and shows what arrives through `Output.show`, the
one function that writes to the terminal, behind one lock.

Threads: the main thread reads input and sends; the session's reader thread
turns records into messages in a queue; its keepalive thread pings when idle;
the UI's display thread shows messages. Locks: `Session._send_lock` guards the
send counter and the socket's writes (seal and send together, so counter order
is wire order); `Output._lock` guards the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import select
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from protocol import (
    MAX_HANDSHAKE_FRAME,
    MAX_RECORD_FRAME,
    Bye,
    ClientMessage,
    DirectMessage,
    Dm,
    Error,
    FrameDecoder,
    Join,
    Joined,
    KeyExchange,
    Leave,
    Left,
    Message,
    Ping,
    ProtocolError,
    Say,
    ServerMessage,
    Users,
    Welcome,
    Who,
    decode_record,
    encode_client_message,
    encode_frame,
    encode_key,
    has_lone_surrogate,
    join_record,
    parse_handshake_error,
    parse_hello,
    parse_server_message,
    text_problem,
    utf8_size,
    valid_name,
)

# The one third-party package (pycryptodome, imported by crypto_utils): a terminal without
# the venv gets one sentence saying what to do instead of a ModuleNotFoundError traceback.
MISSING_CRYPTO = (
    "client.py: the Python package pycryptodome is missing ({why}); install it with "
    "`python3 -m pip install -r requirements.txt`, or use the project's venv: "
    "`. .venv/bin/activate` in each new terminal, or run `.venv/bin/python client.py`\n"
)
try:
    from crypto_utils import CryptoError, RecordCipher, client_keys, fingerprint
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "Crypto":
        raise
    sys.stderr.write(MISSING_CRYPTO.format(why=f"no module named {exc.name!r}"))
    sys.exit(2)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
CONNECT_TIMEOUT_S = 10.0  # the server's own handshake timeout is 10 s (§4)
IDLE_PING_S = 30.0  # §4 Timeouts: "a client idle for 30 s sends a ping"
PONG_WAIT_S = 30.0  # nothing heard this long after a ping: the server is gone
BYE_WAIT_S = 2.0  # how long `leave` waits for the server's `bye` before closing
EXIT_OK, EXIT_LOST, EXIT_USAGE = 0, 1, 2
FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")  # 32 bytes, unpadded base64
NAME_RULE = "a name is 1-32 letters or digits (and _-.), starting with a letter or digit"
PROMPT = "> "


class ClientError(Exception):
    """A failure told to the user in one sentence; `exit_code` is what main returns."""

    exit_code = EXIT_LOST


class ConnectionLost(ClientError):
    """The connection is gone or unusable: refused, closed, tampered or malformed."""


class NameRefused(ClientError):
    """The server answered `join` with `invalid_name` or `name_taken` (§4)."""


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class TrustError(ClientError):
    """The server's fingerprint does not match its pin, or the pins cannot be read."""

    exit_code = EXIT_USAGE


# --- trusting the server (§2 Server identity) ---


def host_key(host: str, port: int) -> str:
    """The known_hosts key: `host:port`, with IPv6 addresses in brackets."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_known_hosts() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "bcast" / "known_hosts"


class KnownHosts:
    """Pins as lines `host:port SHA256:...`; appended, never rewritten, never skipped.

    Only the default file's folders are created (`create_dirs`): a path the user
    gave whose folder is missing is a typo to report, not a tree to make.
    """

    def __init__(self, path: Path, create_dirs: bool = False):
        self.path = path
        self.create_dirs = create_dirs

    def lookup(self, key: str) -> tuple[str, int] | None:
        """(fingerprint, line number) pinned for `key`; a malformed line is a TrustError."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustError(f"cannot read {self.path}: {exc}") from None
        found: tuple[str, int] | None = None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not FINGERPRINT_RE.match(fields[1]) or ":" not in fields[0]:
                raise TrustError(
                    f"{self.path} line {number} is malformed (expected 'host:port SHA256:...'): "
                    f"{sanitize(line)!r}; fix or remove that line"
                )
            if fields[0].lower() != key:
                continue
            if found and found[0] != fields[1]:
                raise TrustError(
                    f"{self.path} pins two different fingerprints for {key} (lines {found[1]} "
                    f"and {number}); remove the wrong one"
                )
            found = found or (fields[1], number)
        return found

    def add(self, key: str, fp: str) -> None:
        """Append one pin (O_APPEND, one write), creating the file 0600 (and the default
        file's folders 0700)."""
        if self.create_dirs:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            lead = b""
            if size:  # a hand-edited file may lack its final newline
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    lead = b"" if f.read(1) == b"\n" else b"\n"
            os.write(fd, lead + f"{key} {fp}\n".encode())
        finally:
            os.close(fd)


def check_pin(
    known: KnownHosts, key: str, fp: str, explicit: str | None, status: Callable[[str], None]
) -> None:
    """Trust on first use per `host:port`, or the `--fingerprint` the user gave (§2)."""
    if explicit:
        if fp != explicit:
            raise TrustError(
                f"the server at {key} presents the fingerprint {fp}, not {explicit} as given "
                "with --fingerprint; not connecting"
            )
        return
    pinned = known.lookup(key)
    if pinned is None:
        try:
            known.add(key, fp)
            where = f"pinned in {known.path}"
        except OSError as exc:
            where = f"NOT pinned: cannot write {known.path}: {exc.strerror or exc}"
        status(f"first connection to {key}: server fingerprint {fp} ({where})")
    elif pinned[0] != fp:
        bar = "@" * 66
        raise TrustError(
            f"{bar}\n@  WARNING: THE FINGERPRINT OF THE SERVER AT {key} HAS CHANGED!\n{bar}\n"
            f"The server now presents  {fp}\nbut you pinned           {pinned[0]}\n"
            f"in {known.path} line {pinned[1]}.\n"
            "Someone may be intercepting the connection, or the server's key was replaced.\n"
            f"If you know the key was replaced on purpose, remove line {pinned[1]} of "
            f"{known.path} and connect again. Not connecting."
        )


# --- showing untrusted text ---

# Bidi controls reorder what is shown (Trojan Source); line separators break lines.
_INVISIBLE = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def sanitize(text: str, newlines: str | None = None) -> str:
    """`text` with control characters and terminal escapes shown escaped, never interpreted.

    `newlines`, if given, replaces each \\n (a continuation marker on a terminal).
    """
    out = []
    for ch in text:
        if ch == "\n" and newlines is not None:
            out.append(newlines)
        elif ch == "\t":
            out.append(ch if newlines is not None else "\\t")
        elif ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


_NAME_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


class Style:
    """Formats server messages as one screen line each; colour codes only when asked."""

    def __init__(self, colour: bool, me: str = "", multiline: bool = False):
        self.colour = colour
        self.me = me
        self.newlines = "\n    | " if multiline else None  # pipes: one message per line

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def name(self, raw: str) -> str:
        code = _NAME_COLOURS[zlib.crc32(raw.casefold().encode("utf-8", "replace")) % 12]
        return self.paint(sanitize(raw), f"1;{code}" if raw == self.me else str(code))

    def clock(self, ts_ms: int | None = None) -> str:
        try:
            when = time.localtime(None if ts_ms is None else ts_ms / 1000)
        except (OverflowError, OSError, ValueError):
            return "[??:??:??]"
        return "[" + time.strftime("%H:%M:%S", when) + "]"

    def event(self, arrow: str, name: str, what: str) -> str:
        """A join or leave: dimmed, with an arrow, unlike a message."""
        return (
            self.paint(f"{self.clock()} {arrow} ", "2")
            + self.name(name)
            + self.paint(f" {what}", "2")
        )

    def text(self, raw: str) -> str:
        return sanitize(raw, self.newlines)

    def format(self, msg: ServerMessage) -> tuple[str, bool] | None:
        """(line, is_status) for a message worth showing, else None."""
        if isinstance(msg, Message):
            return f"{self.clock(msg.ts)} <{self.name(msg.sender)}> {self.text(msg.text)}", False
        if isinstance(msg, DirectMessage):
            tag = self.paint("[dm]", "1;35")
            return (
                f"{self.clock(msg.ts)} {tag} <{self.name(msg.sender)}> {self.text(msg.text)}",
                False,
            )
        if isinstance(msg, Joined):
            return self.event("-->", msg.name, "joined"), False
        if isinstance(msg, Left):
            why = "" if msg.reason == "leave" else f" ({sanitize(msg.reason)})"
            return self.event("<--", msg.name, f"left{why}"), False
        if isinstance(msg, Users):
            names = ", ".join(self.name(n) for n in msg.names)
            return f"{self.clock()} here ({len(msg.names)}): {names}", False
        if isinstance(msg, Error):
            line = f"not delivered: {sanitize(msg.message)} ({sanitize(msg.code)})"
            return self.paint(line, "31"), True
        return None  # pong, bye and unknown types are handled elsewhere or ignored


# --- pacing (§4 Rate limit) ---


class Pacer:
    """A token bucket a little stricter than the server's, so paced sends are never refused.

    Half the burst and 90 % of the refill leave room for network jitter: the
    server's bucket (capacity `rate`, refill `rate`/s, full at join) always holds
    at least as many tokens as this one when a paced message arrives.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = max(1, rate // 2)
        self.refill = rate * 0.9
        self.tokens = float(self.capacity)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> float:
        """Take one token; returns how long to sleep first (0 when one is there)."""
        if self.refill == 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        wait = max(0.0, (1.0 - self.tokens) / self.refill)
        self.tokens += wait * self.refill - 1.0
        self.stamp = now + wait
        return wait


# --- the network session ---

_END = object()  # queued by the reader after the last message


class Session:
    """One joined connection: sealed sends, a reader thread, keepalive pings. No terminal."""

    def __init__(
        self,
        sock: socket.socket,
        decoder: FrameDecoder,
        tx: RecordCipher,
        rx: RecordCipher,
        fp: str,
    ):
        self.fingerprint = fp
        self.welcome: Welcome | None = None
        self._sock = sock
        self._decoder = decoder
        self._tx = tx  # guarded by _send_lock
        self._rx = rx  # the reader thread's alone once started
        self._send_lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._closed = threading.Event()
        self._end: ConnectionLost | None = None  # why the connection ended, first cause wins
        self._bye: str | None = None
        self._pacer: Pacer | None = None  # guarded by _send_lock
        self._last_sent = self._last_heard = time.monotonic()
        self.idle_ping_s = IDLE_PING_S  # attributes, so tests can shorten them before start()
        self.pong_wait_s = PONG_WAIT_S

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        name: str,
        verify: Callable[[str], None],
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> Session:
        """Connect, check the pin, send `key` and `join` at once, wait for `welcome` (§2)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionLost(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        try:
            return cls._handshake(sock, name, verify)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _handshake(cls, sock: socket.socket, name: str, verify: Callable[[str], None]) -> Session:
        decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
        body = _read_frame(sock, decoder, None)
        refusal = parse_handshake_error(body)
        if refusal is not None:
            why = "the server is full" if refusal.code == "server_full" else "the server refused us"
            raise ConnectionLost(f"{why}: {sanitize(refusal.message)}")
        try:
            hello = parse_hello(body)
        except ProtocolError as exc:
            raise ConnectionLost(f"the server's hello is invalid ({exc}); closed") from None
        fp = fingerprint(hello.key)
        verify(fp)
        try:
            nonce, wrapped, eph, k_c2s, k_s2c = client_keys(hello.key, hello.nonce, hello.eph)
        except CryptoError as exc:
            raise ConnectionLost(f"cannot use the server's keys: {exc}") from None
        self = cls(sock, decoder, RecordCipher(k_c2s), RecordCipher(k_s2c), fp)
        key = encode_frame(encode_key(KeyExchange(nonce, wrapped, eph)))
        self._sendall(key + self._seal([Join(name)]))  # §2: key and first record in one write
        decoder.max_len = MAX_RECORD_FRAME
        while True:
            msgs = self._read_messages()
            for i, msg in enumerate(msgs):
                if isinstance(msg, Welcome):
                    self.welcome = msg
                    for rest in msgs[i + 1 :]:
                        self._inbox.put(rest)
                    sock.settimeout(None)
                    return self
                if isinstance(msg, Error):
                    with contextlib.suppress(ClientError):
                        self._sendall(self._seal([Leave()]))  # still single-threaded here
                    text = f"{sanitize(msg.message)} ({sanitize(msg.code)})"
                    if msg.code in ("invalid_name", "name_taken"):
                        raise NameRefused(text)
                    raise ConnectionLost(f"the server refused to let us join: {text}")

    def start(self, pace: bool = True) -> None:
        """Start the reader and keepalive threads; pace say/dm to `welcome.rate` if asked."""
        if pace and self.welcome and self.welcome.rate:
            self._pacer = Pacer(self.welcome.rate)
        threading.Thread(target=self._read_loop, name="bcast-reader", daemon=True).start()
        threading.Thread(target=self._keepalive, name="bcast-keepalive", daemon=True).start()

    def send(self, *msgs: ClientMessage) -> None:
        """Seal the messages as one record and send it; say/dm wait for a token first."""
        if self._pacer and any(isinstance(m, (Say, Dm)) for m in msgs):
            with self._send_lock:  # the pacer's state; the token is booked before the sleep
                wait = self._pacer.take()
            time.sleep(wait)
        with self._send_lock:  # seal and send together: counter order is wire order (§3)
            self._sendall(self._seal(list(msgs)))

    def recv(self, timeout: float | None = None) -> ServerMessage:
        """The next message; ConnectionLost once the connection is over; queue.Empty on timeout."""
        item = self._inbox.get(timeout=timeout)
        if item is _END:
            self._inbox.put(_END)
            raise self._end or ConnectionLost("the connection is closed")
        return item

    def leave(self, timeout: float = BYE_WAIT_S) -> None:
        """Send `leave`, wait a little for the server to close (after `bye`), close."""
        with contextlib.suppress(ClientError):
            self.send(Leave())
            self._closed.wait(timeout)
        self.close()

    @property
    def end(self) -> ConnectionLost | None:
        """Why the connection ended (first cause), once it has."""
        return self._end

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    def close(self) -> None:
        self._shutdown()
        self._sock.close()

    def _shutdown(self) -> None:
        """Wake the reader (recv returns) without freeing the fd under another thread."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _seal(self, msgs: list[ClientMessage]) -> bytes:
        """One framed record; the caller holds `_send_lock` (or is still in the handshake)."""
        if self._tx.exhausted:  # §3: close before the counter would reach 2**32
            self._shutdown()
            raise ConnectionLost("the record counter is used up; reconnect")
        return encode_frame(self._tx.seal(join_record([encode_client_message(m) for m in msgs])))

    def _sendall(self, frame: bytes) -> None:
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            raise ConnectionLost(f"connection lost while sending: {exc.strerror or exc}") from None
        self._last_sent = time.monotonic()

    def _read_messages(self) -> list[ServerMessage]:
        body = _read_frame(self._sock, self._decoder, self._bye_note)
        self._last_heard = time.monotonic()
        try:
            plain = self._rx.open(body)
        except CryptoError as exc:  # §3: close at once, no bye, do not try the next one
            self._shutdown()
            raise ConnectionLost(
                f"a record from the server failed to open ({exc}); closed"
            ) from None
        try:
            msgs = [parse_server_message(obj) for obj in decode_record(plain, None)]
        except ProtocolError as exc:
            self._shutdown()
            raise ConnectionLost(f"the server sent a malformed record ({exc}); closed") from None
        for msg in msgs:
            if isinstance(msg, Bye):
                self._bye = msg.reason
        return msgs

    def _bye_note(self) -> str:
        return f" (bye: {sanitize(self._bye)})" if self._bye else ""

    def _read_loop(self) -> None:
        try:
            while True:
                for msg in self._read_messages():
                    self._inbox.put(msg)
        except ConnectionLost as exc:
            self._end = self._end or exc
        finally:
            self._shutdown()
            self._closed.set()
            self._inbox.put(_END)

    def _keepalive(self) -> None:
        """§4 Timeouts: ping after `idle_ping_s` without sending; give up if pings go unanswered."""
        ping_at: float | None = None
        wait = self.idle_ping_s
        while not self._closed.wait(wait):
            now = time.monotonic()
            if ping_at is not None and self._last_heard < ping_at:
                if now - ping_at >= self.pong_wait_s:
                    self._end = ConnectionLost("the server stopped answering; connection lost")
                    self._shutdown()
                    return
            else:
                ping_at = None
            if now - self._last_sent >= self.idle_ping_s:
                with contextlib.suppress(ClientError):
                    self.send(Ping(None))
                ping_at = ping_at or time.monotonic()
            wakes = [self._last_sent + self.idle_ping_s]
            if ping_at is not None:
                wakes.append(ping_at + self.pong_wait_s)
            wait = max(0.01, min(wakes) - time.monotonic())


def _read_frame(
    sock: socket.socket, decoder: FrameDecoder, note: Callable[[], str] | None
) -> bytes:
    """One frame body; reads at most what the frame needs, so a bad length stops at 4 bytes."""
    while True:
        try:
            body = decoder.next_frame()
        except ProtocolError as exc:
            raise ConnectionLost(f"the server sent a bad frame ({exc}); closed") from None
        if body is not None:
            return body
        try:
            data = sock.recv(decoder.wants())
        except socket.timeout:
            raise ConnectionLost("the server did not answer in time") from None
        except OSError as exc:
            raise ConnectionLost(f"connection lost: {exc.strerror or exc}") from None
        if not data:
            raise ConnectionLost("the server closed the connection" + (note() if note else ""))
        decoder.feed(data)


# --- the terminal ---


class LineEditor:
    """readline (editing, history) where it loads; plain `input()` where not.

    Without readline the partly typed line lives in the kernel's tty buffer: it is
    still sent whole, but after a message arrives only the prompt is redrawn.
    """

    def __init__(self, output: Output):
        self.prompt = PROMPT
        self.rl: Any = None
        self._redraw: Any = None
        self._point: Any = None
        try:
            import readline

            self.rl = readline
            readline.set_pre_input_hook(lambda: output.set_prompting(True))
            import ctypes  # rl_forced_update_display and rl_point are not in the module

            lib = ctypes.CDLL(readline.__file__)
            self._redraw = lib.rl_forced_update_display
            self._point = ctypes.c_int.in_dll(lib, "rl_point")
        except (ImportError, OSError, AttributeError, ValueError):
            pass
        self._output = output

    def read(self, prompt: str = PROMPT) -> str:
        """One line; with readline, `show` may redraw it while it is being typed."""
        self.prompt = prompt
        if not self.rl:
            self._output.set_prompting(True)
        try:
            return input(prompt)
        finally:
            self._output.set_prompting(False)

    def erase(self, out: Any) -> None:
        """Move to the start of the prompt line(s) and clear below."""
        buf = self.rl.get_line_buffer() if self.rl else ""
        point = len(buf)
        if self._point is not None:
            point = len(buf.encode()[: self._point.value].decode("utf-8", "ignore"))
        rows = (len(self.prompt) + point) // max(1, shutil.get_terminal_size().columns)
        out.write((f"\x1b[{rows}A" if rows else "") + "\r\x1b[J")

    def restore(self, out: Any) -> None:
        """Redraw the prompt and the partly typed line, cursor where it was."""
        if self._redraw is not None:
            out.flush()
            self._redraw()
        else:
            out.write(self.prompt + (self.rl.get_line_buffer() if self.rl else ""))


class Output:
    """All terminal output: one lock, one function (`show`) that keeps the input line intact."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.editor: LineEditor | None = None
        self.on_closed: Callable[[], None] = lambda: None  # stdout gone: the UI leaves
        self._lock = threading.Lock()  # guards the terminal and `_prompting`
        self._prompting = False

    def stdout_closed(self) -> None:
        """Standard output is gone (`| head` exited): point it at /dev/null, then leave."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        self.on_closed()

    def watch_stdout(self) -> None:
        """Notice a closed pipe at once, even when nothing more is to be written (poll's
        POLLERR on a pipe whose reader is gone; POLLHUP on a socket)."""
        try:
            mode = os.fstat(sys.stdout.fileno()).st_mode
        except (OSError, ValueError):
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return

        def watch() -> None:
            poller = select.poll()
            poller.register(sys.stdout.fileno(), select.POLLERR | select.POLLHUP)
            with contextlib.suppress(OSError, ValueError):
                if poller.poll():
                    self.stdout_closed()

        threading.Thread(target=watch, name="bcast-stdout-watch", daemon=True).start()

    def set_prompting(self, value: bool) -> None:
        with self._lock:
            self._prompting = value

    def show(self, line: str, status: bool = False) -> None:
        """Print one line above the input line; pipes get status lines on stderr."""
        closed = False
        with self._lock:
            stream = sys.stderr if status and not self.interactive else sys.stdout
            try:
                if self._prompting and self.editor:
                    self.editor.erase(stream)
                    stream.write(line + "\n")
                    self.editor.restore(stream)
                else:
                    stream.write(line + "\n")
                stream.flush()
            except BrokenPipeError:  # stdout closed (`| head`): leave, exit cleanly
                closed = True
            except (OSError, ValueError):
                pass  # a broken terminal must not take the session down
        if closed:
            threading.Thread(target=self.stdout_closed, daemon=True).start()


# --- commands ---

HELP = """commands:
  TEXT               send TEXT to everyone
  /msg NAME TEXT     send TEXT to NAME only (also: @NAME TEXT)
  /who               list who is here
  /help              this list
  exit, /quit        leave (also Ctrl-D, Ctrl-C)
  //TEXT             send TEXT that starts with a slash"""


def parse_line(line: str) -> tuple[str, ...]:
    """What a typed line means: ("say", text), ("dm", to, text), ("who",), ("help",),
    ("quit",), ("hint", why) or ("skip",)."""
    word, _, rest = line.strip().partition(" ")
    if not line.strip():
        return ("skip",)
    if line.strip() in ("exit", "/quit", "/exit"):
        return ("quit",)
    if line.startswith("//"):
        return ("say", line[1:])
    if word in ("/msg", "/dm") or (word.startswith("@") and not line.startswith("@ ")):
        to, _, text = (rest if word in ("/msg", "/dm") else line.strip()[1:]).partition(" ")
        if not to or not text.strip():
            return ("hint", "usage: /msg NAME TEXT (or @NAME TEXT)")
        return ("dm", to, text)
    if word == "/who":
        return ("who",)
    if word in ("/help", "/?"):
        return ("help",)
    if word.startswith("/"):
        return ("hint", f"unknown command {word}: /help lists the commands; //TEXT sends TEXT")
    return ("say", line)


class Interrupted(Exception):
    """Raised by our SIGINT handler in the main thread while it waits for input."""


class ChatUI:
    """Reads lines and sends them; a display thread shows what arrives."""

    def __init__(self, session: Session, output: Output, style: Style, editor: Any):
        self.session = session
        self.out = output
        self.style = style
        self.read: Callable[[], str] = editor
        self.lost: ConnectionLost | None = None
        self.lines = 0  # non-empty lines read (pipe mode counts what was not delivered)
        self.undelivered = 0  # refused here, or answered by an error (display thread)
        self._lock = threading.Lock()  # guards `lost` and `_leaving` (main vs display thread)
        self._leaving = False  # set once main leaves or ends: no more wake-ups
        self._waiting = False  # main thread blocked in read(); only main touches it
        self._interrupted = False
        self._display = threading.Thread(target=self._show_loop, name="bcast-display", daemon=True)

    def run(self) -> int:
        welcome = self.session.welcome
        assert welcome is not None
        self.max_text = welcome.max_text
        others = ", ".join(self.style.name(n) for n in welcome.users) or "nobody else yet"
        self.status(f"joined as {self.style.name(welcome.name)}; here: {others}")
        if self.out.interactive:
            self.status("type /help for commands, exit to leave")
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.out.on_closed = lambda: self._wake_main(None)
            if not self.out.interactive:
                self.out.watch_stdout()
            self.session.start()
            self._display.start()
            while not self._interrupted and self.lost is None:
                try:
                    self._waiting = True
                    if self._interrupted:
                        raise Interrupted
                    line = self.read()
                except (EOFError, Interrupted):
                    if self.out.interactive:
                        self.out.show("")  # end the prompt line that Ctrl-D or Ctrl-C left
                    break
                finally:
                    self._waiting = False
                if not line and not self.out.interactive:
                    break  # end of piped input
                try:
                    if not self.handle(line.rstrip("\r\n")):
                        break
                except ConnectionLost as exc:  # a failed send: prefer the reader's reason
                    self.session.wait_closed(BYE_WAIT_S)
                    raise self.session.end or exc from None
            with self._lock:
                self._leaving = True
            if self.lost is not None:
                raise self.lost
            self.session.leave()
            self._display.join(BYE_WAIT_S)  # every error comes before the server's bye
            if self.out.interactive:
                self.status("left")
            elif min(self.undelivered, self.lines):  # errors answer lines: a stray one is not
                failed = min(self.undelivered, self.lines)
                raise ClientError(f"{failed} of {self.lines} lines were not delivered")
            return EXIT_OK
        finally:
            with self._lock:
                self._leaving = True
            self.session.close()
            signal.signal(signal.SIGINT, previous)

    def _wake_main(self, exc: ConnectionLost | None) -> None:
        """Interrupt the main thread's input() (readline then restores the terminal): to end
        with `exc`, or (None) to leave because standard output is gone.

        Repeated until main leaves: a signal landing just before input() blocks is missed.
        """
        main_id = threading.main_thread().ident or 0
        while True:
            with self._lock:
                if self._leaving:
                    return
                self.lost = self.lost or exc
                signal.pthread_kill(main_id, signal.SIGINT)
            time.sleep(0.5)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True
        if self._waiting:
            raise Interrupted

    def status(self, text: str) -> None:
        self.out.show(self.style.paint(f"* {text}", "2"), status=True)

    def handle(self, line: str) -> bool:
        """Act on one line; False when it asks to leave."""
        cmd = parse_line(line)
        kind = cmd[0]
        if kind == "quit":
            return False
        if kind != "skip":
            self.lines += 1
        if kind == "hint":
            self.undelivered += 1
            self.status(cmd[1])
        elif kind == "help":
            for row in HELP.splitlines():
                self.out.show(row, status=True)
        elif kind == "who":
            self.session.send(Who())
        elif kind in ("say", "dm"):
            text = cmd[-1]
            size = utf8_size(text)
            problem = text_problem(text)
            if size > self.max_text or problem:
                self.undelivered += 1
            if size > self.max_text:
                self.status(
                    f"not sent: {size} bytes, the server takes at most {self.max_text}; "
                    "split the line"
                )
            elif problem:
                self.status(f"not sent: {problem}")
            else:
                self.session.send(Say(text) if kind == "say" else Dm(cmd[1], text))
        return True

    def _show_loop(self) -> None:
        while True:
            try:
                msg = self.session.recv()
            except ConnectionLost as exc:
                self._wake_main(exc)
                return
            if isinstance(msg, Error):
                self.undelivered += 1
            shown = self.style.format(msg)
            if shown:
                self.out.show(*shown)


# --- command line ---

EPILOG = (
    """\
exit status: 0 left normally, 1 connection lost or refused, 2 bad usage or server
fingerprint mismatch.

The server's fingerprint is pinned per host:port in $XDG_CONFIG_HOME/bcast/known_hosts
(default ~/.config/bcast/known_hosts) on first use; a changed fingerprint is refused.
With stdin or stdout not a terminal the client is a pipe tool: it sends each input
line (paced to the server's rate), prints one received message per line on stdout
and status lines on stderr, and leaves at end of input.

"""
    + HELP
)


# One-shot actions: they do something and exit, so they take no BCAST_ fallback (an
# exported BCAST_FORGET would forget a pin on every run).
ACTION_FLAGS = frozenset({"help"})


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; every setting flag falls back to BCAST_<FLAG> in `environ`."""
    env = (os.environ if environ is None else environ).get
    p = argparse.ArgumentParser(
        prog="client.py",
        description="bcast/1 encrypted group-chat client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default=env("BCAST_HOST", DEFAULT_HOST),
        help=f"server address; BCAST_HOST (default {DEFAULT_HOST})",
    )
    p.add_argument(
        "--port",
        default=env("BCAST_PORT", str(DEFAULT_PORT)),
        help=f"server port; BCAST_PORT (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--name", default=env("BCAST_NAME"), help="your name; BCAST_NAME (asked when missing)"
    )
    p.add_argument(
        "--fingerprint",
        default=env("BCAST_FINGERPRINT") or None,
        help="the server fingerprint SHA256:... to require instead of trusting on first use; "
        "BCAST_FINGERPRINT",
    )
    p.add_argument(
        "--known-hosts",
        type=Path,
        default=env("BCAST_KNOWN_HOSTS") or None,
        help="the pin file; BCAST_KNOWN_HOSTS (default $XDG_CONFIG_HOME/bcast/known_hosts)",
    )
    return p


def ask_name(output: Output, editor: LineEditor) -> str | None:
    """Prompt for a name; None when the user gives up (Ctrl-D, Ctrl-C)."""
    try:
        return editor.read("your name: ").strip()
    except (EOFError, KeyboardInterrupt):
        output.show("")
        return None


def join(
    args: argparse.Namespace,
    port: int,
    output: Output,
    editor: LineEditor | None,
    verify: Callable[[str], None],
    status: Callable[[str], None],
) -> Session | None:
    """Connect with a valid name; interactively, ask again after a refusal (§4 join)."""
    name: str | None = args.name
    while True:
        if name is None:
            if editor is None:
                raise UsageError(
                    "--name (or BCAST_NAME) is required when input or output is not a terminal"
                )
            name = ask_name(output, editor)
            if name is None:
                return None
        checked = None if has_lone_surrogate(name) else valid_name(name)
        if checked is None:
            if editor is None:
                raise UsageError(f"{sanitize(name)!r} is not a valid name: {NAME_RULE}")
            status(f"{sanitize(name)!r} is not a valid name: {NAME_RULE}")
            name = None
            continue
        try:
            return Session.connect(args.host, port, checked, verify)
        except NameRefused as exc:
            if editor is None:
                raise ConnectionLost(f"the server refused the name {checked}: {exc}") from None
            status(f"the server refused the name {checked}: {exc}; try another")
            name = None


def run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    if not str(args.port).isdigit() or not 0 < int(args.port) < 65536:
        raise UsageError(f"the port must be 1..65535, not {args.port!r}")
    if args.fingerprint and not FINGERPRINT_RE.match(args.fingerprint):
        raise UsageError("--fingerprint takes the form SHA256: followed by 43 base64 characters")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    colour = interactive and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    output = Output(interactive)
    editor = LineEditor(output) if interactive else None
    output.editor = editor
    style = Style(colour, multiline=interactive)

    def status(text: str) -> None:
        output.show(style.paint(f"* {text}", "2"), status=True)

    if args.known_hosts is not None and not args.known_hosts.parent.is_dir():
        raise UsageError(
            f"the folder of the pin file {args.known_hosts} does not exist "
            f"({args.known_hosts.parent}); create it or give another --known-hosts"
        )
    known = KnownHosts(args.known_hosts or default_known_hosts(), args.known_hosts is None)
    key = host_key(args.host, int(args.port))

    def verify(fp: str) -> None:
        check_pin(known, key, fp, args.fingerprint, status)

    session = join(args, int(args.port), output, editor, verify, status)
    if session is None:
        return EXIT_OK
    style.me = session.welcome.name if session.welcome else ""
    read = editor.read if editor else sys.stdin.readline
    return ChatUI(session, output, style, read).run()


def main(argv: list[str] | None = None) -> int:
    """Run the client; every failure becomes one sentence on stderr and an exit status."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    try:
        return run(argv)
    except ClientError as exc:
        message, code = str(exc), exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # no traceback, ever: one sentence
        message, code = f"unexpected error: {type(exc).__name__}: {exc}", EXIT_LOST
    with contextlib.suppress(OSError, ValueError):  # a loud warning keeps its own layout
        print(message if "\n" in message else f"client.py: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
