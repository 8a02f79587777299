"""client.py without a terminal: pure helpers, `Session`, and the pipe-mode CLI.

A scripted `FakeServer` (real handshake, then whatever a test wants to send)
plays the misbehaving server; the real server (conftest's `run_server`) and
the independent `refpeer` play the other users. The terminal itself is tested
in test_client_pty.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refpeer import connect_and_join

import client
import crypto_utils
import protocol
from chat import Chat
from commands import parse_line
from display import Line, char_width, sanitize, text_width, wrap
from errors import ConnectionLost, NameRefused, TrustError
from known_hosts import KnownHosts, check_pin, host_key
from lineedit import KeyDecoder
from link import Pacer
from protocol import DirectMessage, Error, Joined, Left, Message, Users
from session import Session
from view import Style

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client.py"
T = 5.0  # the one timeout unit: nothing here should take near it
FP_A = "SHA256:" + "A" * 43
FP_B = "SHA256:" + "B" * 43


def no_pin(fp: str) -> None:
    """A `verify` callback that trusts anything (tests of other rules)."""


# --- a scripted server --------------------------------------------------------------------------


class FakeConn:
    """The server's end of one keyed connection, for scripts."""

    def __init__(self, sock: socket.socket, decoder: protocol.FrameDecoder, tx, rx):
        self.sock, self.decoder, self.tx, self.rx = sock, decoder, tx, rx
        self.name = ""
        self.join: dict[str, Any] = {}  # the client's first join
        self.transcript = b""  # what its identity proof signs (§5)
        self.sizes: list[int] = []  # the length of every record received

    def send(self, *msgs: dict[str, Any]) -> None:
        body = json.dumps(list(msgs), ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.sock.sendall(protocol.encode_frame(self.tx.seal(body)))

    def recv(self) -> list[dict[str, Any]] | None:
        """The next record's messages, or None once the client closed."""
        body = read_frame(self.sock, self.decoder)
        if body is None:
            return None
        self.sizes.append(len(body))
        return json.loads(self.rx.open(body))

    def wait_closed(self) -> bool:
        """Read until the client closes; True if it did within T."""
        try:
            while self.recv() is not None:
                pass
        except (OSError, crypto_utils.CryptoError):
            return False
        return True


def read_frame(sock: socket.socket, decoder: protocol.FrameDecoder) -> bytes | None:
    while (body := decoder.next_frame()) is None:
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)
    return body


class FakeServer:
    """A bcast/1 server on 127.0.0.1:0 that does the real handshake, then runs `script(conn)`.

    `hello` replaces the hello frame (raw bytes, then `script(None)`); `welcome`
    False leaves the join unanswered for the script.
    """

    def __init__(
        self,
        key: Any,
        script: Callable[[FakeConn | None], None] = lambda conn: None,
        hello: bytes | None = None,
        welcome: dict[str, Any] | bool = True,
        port: int = 0,
    ):
        self.key, self.script, self.hello, self.welcome = key, script, hello, welcome
        self.spki = crypto_utils.spki_der(key)
        self.fingerprint = crypto_utils.fingerprint(self.spki)
        self.first_chunks: list[bytes] = []
        self.errors: list[BaseException] = []
        self.listener = socket.create_server(("127.0.0.1", port))
        self.host, self.port = self.listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):  # wakes accept(), so the port is free at once
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        assert not self.errors, self.errors

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(T)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # records go out at once
        try:
            if self.hello is not None:
                sock.sendall(self.hello)
                self.script(None)
                self.first_chunks.append(sock.recv(65536))  # b"" if the client just closed
                return
            conn = self._handshake(sock)
            if self.welcome is not False:
                default = protocol.welcome(conn.name, [], 16384, 0)
                conn.send(default if self.welcome is True else self.welcome)
            self.script(conn)
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)
        finally:
            sock.close()

    def _handshake(self, sock: socket.socket) -> FakeConn:
        nonce, eph = os.urandom(32), crypto_utils.Ephemeral()
        hello = protocol.Hello(key=self.spki, nonce=nonce, eph=eph.public)
        sock.sendall(protocol.encode_frame(protocol.encode_hello(hello)))
        decoder = protocol.FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
        chunk = sock.recv(65536)
        self.first_chunks.append(chunk)
        decoder.feed(chunk)
        key = protocol.parse_key(read_frame(sock, decoder) or b"")
        c2s, s2c = crypto_utils.server_keys(
            self.key, self.spki, nonce, eph, key.nonce, key.secret, key.eph
        )
        decoder.max_len = protocol.MAX_RECORD_FRAME
        conn = FakeConn(
            sock, decoder, crypto_utils.RecordCipher(s2c), crypto_utils.RecordCipher(c2s)
        )
        conn.transcript = crypto_utils.identity_transcript(
            self.spki, nonce, key.nonce, eph.public, key.eph
        )
        first = conn.recv()
        assert first and first[0]["type"] == "join", first
        conn.name = first[0]["name"]
        conn.join = first[0]
        return conn


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCAST_") and k != "NO_COLOR"}
    paths = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    return {**env, **paths, **extra}


def pipe_client(
    tmp_path: Path,
    port: int,
    *args: str,
    stdin: str = "",
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run client.py with piped stdin/stdout to the end of `stdin`; `env` adds variables."""
    return subprocess.run(
        [sys.executable, str(CLIENT), "--host", host, "--port", str(port), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=4 * T,
        env=client_env(tmp_path, **(env or {})),
    )


def spawn_pipe_client(
    tmp_path: Path, port: int, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CLIENT), "--port", str(port), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(tmp_path, **(env or {})),
    )


def wait_open(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for the client to end with its stdin still open (unlike `communicate`)."""
    proc.wait(timeout=4 * T)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdin.close()
    return out, err


def event(msg: dict[str, Any]) -> tuple[str, ...]:
    """A joined or left as (type, name[, reason]): revision-2 fields (identity, by) aside."""
    if msg["type"] == "left":
        return (msg["type"], msg["name"], msg["reason"])
    return (msg["type"], msg.get("name", ""))


def read_until(stream: Any, needle: str) -> list[str]:
    """Lines of a subprocess stream up to the first that holds `needle` (AssertionError at
    the end of the stream)."""
    lines: list[str] = []
    while needle not in (lines[-1] if lines else ""):
        line = stream.readline()
        assert line, f"{needle!r} never came: {lines}"
        lines.append(line)
    return lines


def free_port() -> int:
    """A TCP port nobody listens on now (for a server that must come back on the same one)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def recv_type(session: Session, kind: type, timeout: float = T) -> Any:
    """Skip messages until one of `kind`."""
    deadline = time.monotonic() + timeout
    while True:
        msg = session.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, kind):
            return msg


# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain café 太郎", "plain café 太郎"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x9b2J", "\\x9b2J"),  # C1 CSI
        ("a\rb\x7f\x00", "a\\x0db\\x7f\\x00"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # bidi override (Trojan Source)
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \ud800", "lone \\ud800"),
        ("a\nb\tc", "a\\x0ab\\tc"),
    ],
)
def test_sanitize_escapes_controls(raw: str, shown: str) -> None:
    """Issue B: nothing received is printed raw; escapes are shown, never interpreted."""
    assert sanitize(raw) == shown


def test_newline_in_text_cannot_forge_a_message() -> None:
    """A newline in text cannot forge a line that looks like another message: on a terminal
    the rest hangs indented under the text, in a pipe it is escaped."""
    text = "hi\n[12:00:00] <bob> x\tz"
    assert sanitize(text, newlines="\n") == "hi\n[12:00:00] <bob> x    z"
    line = Style(colour=False, multiline=True).message(Message(1, "eve", text, 0))
    rows = wrap(line.text, 60, line.indent)
    assert rows[0].endswith("<eve> hi") and rows[1] == " " * 17 + "[12:00:00] <bob> x    z"
    assert (
        Style(colour=False)
        .message(Message(1, "eve", text, 0))
        .text.endswith("<eve> hi\\x0a[12:00:00] <bob> x\\tz")
    )


@pytest.mark.parametrize(
    ("text", "cols", "indent", "rows"),
    [
        ("[10:00:00] <ana> one two three", 40, 17, ["[10:00:00] <ana> one two three"]),
        (
            "[10:00:00] <ana> one two three",
            26,
            13,
            ["[10:00:00] <ana> one two", " " * 13 + "three"],
        ),
        ("[10:00:00] <ana> one two three", 24, 17, ["[10:00:00] <ana> one two", "  three"]),
        ("abcdefghij", 4, 0, ["abcd", "efgh", "ij"]),
        ("漢字漢字漢", 5, 0, ["漢字", "漢字", "漢"]),  # a wide character never splits
        ("a\nb", 10, 3, ["a", "   b"]),
        ("x" * 30, 20, 15, ["x" * 20, "  " + "x" * 10]),  # an indent past half: 2 columns
    ],
)
def test_wrap_hangs_under_the_text(text: str, cols: int, indent: int, rows: list[str]) -> None:
    """Issue 15: long messages wrap at spaces with a hanging indent, by display columns."""
    assert wrap(text, cols, indent) == rows
    assert all(text_width(row) <= cols for row in rows)


@pytest.mark.parametrize(
    ("ch", "width"),
    [
        ("a", 1),
        ("é", 1),
        ("漢", 2),
        ("Ａ", 2),
        ("\u0301", 0),
        ("\u200b", 0),
        ("\u200d", 0),
        ("😀", 2),
    ],
)
def test_char_width_counts_display_columns(ch: str, width: int) -> None:
    """Issue 15 bug 2: East Asian wide and fullwidth take 2 columns; marks and zero-width 0."""
    assert char_width(ch) == width


def test_style_colour_on_and_off() -> None:
    """Names in colour only when asked; dm, join and leave are marked; escapes stay escaped."""
    msg = Message(1, "\x1b[31mmallory", "hi \x1b[2J", 0)
    plain = Style(colour=False).format(msg).text
    assert "\x1b" not in plain
    assert "<\\x1b[31mmallory> hi \\x1b[2J" in plain
    coloured = Style(colour=True).format(msg).text
    assert "\x1b[" in coloured and "\\x1b[31mmallory" in coloured
    assert "\x1b[2J" not in coloured and "\x1b[31mmallory" not in coloured
    style = Style(colour=False, me="bob")
    assert "[dm] <alice> psst" in style.format(DirectMessage(2, "alice", "bob", "psst", 0)).text
    assert style.format(Joined("carol")).text.endswith("--> carol joined")
    assert style.format(Left("carol", "timeout")).text.endswith("<-- carol left (silent too long)")
    assert style.format(Users(["a", "b"])).text.endswith("here (2): a, b")
    refused = style.format(Error("unknown_user", "no user named zed"))
    assert (refused.text, refused.status) == ("* not delivered: no user named zed", True)
    assert style.format(protocol.Pong(None)) is None
    assert Style(colour=False).clock(10**30) == "[??:??:??]"  # absurd ts: no crash


@pytest.mark.parametrize(
    ("line", "meaning"),
    [
        ("hello", ("say", "hello")),
        ("  ", ("skip",)),
        ("exit", ("quit",)),
        ("/quit", ("quit",)),
        ("/who", ("who",)),
        ("/help", ("help",)),
        ("/msg bob hi there", ("dm", "bob", "hi there")),
        ("@bob hi there", ("say", "@bob hi there")),  # a mention is public
        ("@bob, hi", ("say", "@bob, hi")),
        ("/MSG bob hi", ("dm", "bob", "hi")),
        ("/Dm bob  two  spaces", ("dm", "bob", "two  spaces")),
        ("/query bob hi", ("dm", "bob", "hi")),
        ("/names", ("who",)),
        ("/Who", ("who",)),
        ("/q", ("quit",)),
        ("/QUIT", ("quit",)),
        ("/clear", ("clear",)),
        ("/bell OFF", ("bell", "off")),
        ("/bell all", ("bell", "all")),
        ("//etc/passwd", ("say", "/etc/passwd")),
        ("exit now", ("say", "exit now")),
    ],
)
def test_parse_line(line: str, meaning: tuple[str, ...]) -> None:
    """Issue A/B: commands; anything else is a `say`."""
    assert parse_line(line) == meaning


@pytest.mark.parametrize(
    "line", ["/nope", "/etc/passwd", "/msg bob", "/msg", "/bell loud", "/who is here"]
)
def test_unknown_or_incomplete_commands_give_a_hint(line: str) -> None:
    """Issue B: an unknown /command gets a hint instead of being sent to everyone."""
    kind, hint = parse_line(line)
    assert kind == "hint" and ("/help" in hint or "usage" in hint)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.integers(1, 60),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=80),
    jitter=st.lists(st.floats(0, 0.05), min_size=80, max_size=80),
    head_start=st.floats(0, 0.5),
)
def test_paced_sends_never_hit_the_servers_bucket(
    rate: int, gaps: list[float], jitter: list[float], head_start: float
) -> None:
    """§4 Rate limit: sends paced by `Pacer` pass the server's own `Bucket`, despite jitter.

    The server's bucket starts full at join, `head_start` before the client's;
    each message reaches it up to 50 ms late (in order, as over TCP).
    """
    try:
        from hub import Bucket  # where the server keeps it since the hub split
    except ImportError:
        from server import Bucket

    now = [100.0]
    pacer = Pacer(rate, clock=lambda: now[0])
    bucket = Bucket(rate, now[0] - head_start)
    arrived = 0.0
    for gap, late in zip(gaps, jitter):
        now[0] += gap  # the script produces the next line
        now[0] += pacer.take()  # ... and the client sleeps as told
        arrived = max(arrived, now[0] + late)
        assert bucket.take(arrived), (rate, now[0])


def test_pacer_bursts_then_spaces_and_rate_zero_is_free() -> None:
    now = [0.0]
    pacer = Pacer(10, clock=lambda: now[0])
    assert [pacer.take() for _ in range(5)] == [0.0] * 5  # half the server's burst
    assert pacer.take() == pytest.approx(1 / 9)
    assert Pacer(0).take() == 0.0


# --- known_hosts -------------------------------------------------------------------------------


def test_known_hosts_first_use_stores_then_same_key_passes(tmp_path: Path) -> None:
    """Issue B: trust on first use per host:port; the pin is appended, the file 0600."""
    path = tmp_path / "deep" / "known_hosts"
    said: list[str] = []
    check_pin(KnownHosts(path, create_dirs=True), "h:1", FP_A, None, said.append)
    assert path.read_text() == f"h:1 {FP_A}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert FP_A in said[0] and str(path) in said[0]
    check_pin(KnownHosts(path), "h:1", FP_A, None, said.append)
    check_pin(KnownHosts(path), "h:2", FP_B, None, said.append)  # another port, another pin
    assert path.read_text() == f"h:1 {FP_A}\nh:2 {FP_B}\n"
    assert len(said) == 2


def test_known_hosts_changed_key_refuses_loudly_and_leaves_file(tmp_path: Path) -> None:
    """Issue B: a changed fingerprint is refused (exit 2) showing both and the line to remove."""
    path = tmp_path / "known_hosts"
    path.write_text(f"# pins\n\nh:1 {FP_A}\n")
    before = path.read_bytes()
    with pytest.raises(TrustError) as info:
        check_pin(KnownHosts(path), "h:1", FP_B, None, print)
    text = str(info.value)
    assert FP_A in text and FP_B in text and f"line 3 of {path}" in text
    assert "WARNING" in text and info.value.exit_code == 2
    assert path.read_bytes() == before


def test_known_hosts_malformed_line_is_reported_not_skipped(tmp_path: Path) -> None:
    """STYLE.md: a bad line is an error naming the file and line, never silently skipped."""
    path = tmp_path / "known_hosts"
    path.write_text(f"h:1 {FP_A}\ngarbage here\n")
    with pytest.raises(TrustError, match=r"line 2 is malformed"):
        KnownHosts(path).lookup("other:2")
    path.write_text(f"h:1 {FP_A}\nH:1 {FP_B}\n")  # two different pins for one host
    with pytest.raises(TrustError, match="lines 1 and 2"):
        KnownHosts(path).lookup("h:1")


def test_known_hosts_appends_after_a_missing_newline(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(f"h:1 {FP_A}")
    check_pin(KnownHosts(path), "h:2", FP_B, None, lambda s: None)
    assert path.read_text() == f"h:1 {FP_A}\nh:2 {FP_B}\n"


def test_explicit_fingerprint_pins_and_replaces(tmp_path: Path) -> None:
    """Issue 15: --fingerprint wins over known_hosts and refuses a mismatch (exit 2); a match
    is pinned too, replacing an older pin of that host:port (saying so), atomically."""
    path = tmp_path / "known_hosts"
    path.write_text(f"# mine\nh:1 {FP_B}\nother:2 {FP_B}\n")
    said: list[str] = []
    check_pin(KnownHosts(path), "h:1", FP_A, FP_A, said.append)
    assert path.read_text() == f"# mine\nother:2 {FP_B}\nh:1 {FP_A}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert FP_A in said[0] and f"replacing the old pin {FP_B}" in said[0]
    check_pin(KnownHosts(path), "h:1", FP_A, FP_A, said.append)  # already pinned: quiet
    assert len(said) == 1
    with pytest.raises(TrustError, match="--fingerprint") as info:
        check_pin(KnownHosts(path), "h:1", FP_B, FP_A, print)
    assert info.value.exit_code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["known_hosts"]  # no temporary file left


def test_host_key_brackets_ipv6() -> None:
    assert host_key("::1", 5) == "[::1]:5"
    assert host_key("Example.ORG", 5) == "example.org:5"


# --- command line without a server -------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--name", "bob", "--port", "0"], "port"),
        (["--name", "bob", "--port", "x"], "port"),
        (["--name", "bob", "--fingerprint", "MD5:abc"], "--fingerprint"),
        (["--name", "not valid!"], "contains the character U+0020 SPACE"),
        (["--name", "аlice"], "mixes Cyrillic and Latin letters"),
        (["--name", "x" * 33], "(32 characters at most)"),
        ([], "--name"),  # stdin is not a terminal here: a name is required
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Issue B: bad usage exits 2 with one sentence (no connection is attempted)."""
    monkeypatch.delenv("BCAST_NAME", raising=False)
    assert client.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "0 left normally, 1 connection lost or refused" in out and "2 bad usage" in out
    assert "known_hosts" in out and "/msg NAME TEXT" in out


def test_connection_refused_exits_1(tmp_path: Path) -> None:
    """Issue A: no server: one sentence, exit 1."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    done = pipe_client(tmp_path, port, "--name", "bob")
    assert done.returncode == 1
    assert "cannot connect" in done.stderr and "Traceback" not in done.stderr


# --- Session against a scripted server ---------------------------------------------------------


def test_key_and_join_go_in_one_write(server_key, monkeypatch) -> None:
    """§2: the client sends `key` and its first record (`join`) at once, in one sendall."""
    writes: list[bytes] = []
    real = socket.create_connection

    class Recording:
        def __init__(self, sock: socket.socket):
            self._sock = sock

        def sendall(self, data: bytes) -> None:
            writes.append(bytes(data))
            self._sock.sendall(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Recording(real(*a, **k)))
    with FakeServer(server_key) as fake:
        session = Session.connect(fake.host, fake.port, "alice", no_pin)
        session.close()
    decoder = protocol.FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
    decoder.feed(writes[0])
    assert json.loads(decoder.next_frame())["type"] == "key"
    decoder.max_len = protocol.MAX_RECORD_FRAME
    assert decoder.next_frame() is not None and decoder.buffered == 0
    welcome = session.welcome
    assert (welcome.name, welcome.users, welcome.max_text, welcome.rate) == ("alice", [], 16384, 0)


def test_server_full_is_one_sentence_exit_1(server_key, tmp_path: Path) -> None:
    """§2: a plaintext `server_full` error instead of hello: say so, exit 1."""
    full = protocol.encode_frame(protocol.encode_server_full("1000 clients already"))
    with FakeServer(server_key, hello=full) as fake:
        with pytest.raises(ConnectionLost, match="the server is full: 1000 clients already"):
            Session.connect(fake.host, fake.port, "alice", no_pin)
        done = pipe_client(tmp_path, fake.port, "--name", "bob")
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1]
        == "client.py: the server is full: 1000 clients already"
    )


@pytest.mark.parametrize(
    "hello",
    [
        protocol.encode_frame(b'{"type":"hello","protocol":"bcast/2"}'),
        protocol.encode_frame(b"not json"),
        (8193).to_bytes(4, "big"),  # §1: a handshake frame over 8192 bytes
        (0).to_bytes(4, "big"),
    ],
)
def test_bad_hello_closes_without_a_key(server_key, hello: bytes) -> None:
    """§2: a client closes on a bad hello (wrong protocol, JSON or length), sending nothing."""
    with FakeServer(server_key, hello=hello) as fake:
        with pytest.raises(ConnectionLost):
            Session.connect(fake.host, fake.port, "alice", no_pin)
        deadline = time.monotonic() + T
        while not fake.first_chunks and time.monotonic() < deadline:
            time.sleep(0.01)
    assert fake.first_chunks == [b""]


def test_name_refusal_is_reported(server_key) -> None:
    """§4: invalid_name / name_taken answer the join; the client may try again."""

    def refuse(conn: FakeConn) -> None:
        conn.send(protocol.error("name_taken", "the name alice is taken"))
        assert conn.recv() == [{"type": "leave"}]

    with (
        FakeServer(server_key, refuse, welcome=False) as fake,
        pytest.raises(NameRefused, match="the name alice is taken"),
    ):
        Session.connect(fake.host, fake.port, "alice", no_pin)


def test_tampered_record_closes_and_says_so(server_key) -> None:
    """§3: a record that fails to open: close at once, tell the user, exit 1."""

    def tamper(conn: FakeConn) -> None:
        record = bytearray(conn.tx.seal(b'[{"type":"joined","name":"x"}]'))
        record[0] ^= 1
        conn.sock.sendall(protocol.encode_frame(bytes(record)))
        assert conn.wait_closed()

    with FakeServer(server_key, tamper) as fake:
        session = Session.connect(fake.host, fake.port, "alice", no_pin)
        session.start()
        with pytest.raises(ConnectionLost, match="failed to open"):
            session.recv(timeout=T)
        assert session.wait_closed(T)
        session.close()


def test_tampered_record_in_pipe_mode_exits_1(server_key, tmp_path: Path) -> None:
    def tamper(conn: FakeConn) -> None:
        conn.sock.sendall(protocol.encode_frame(b"\x00" * 40))
        conn.wait_closed()

    with FakeServer(server_key, tamper) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "bob")
        _, err = wait_open(proc)
    assert proc.returncode == 1
    assert "failed to open" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"message"}',  # not an array
        b"[]",
        b'[{"type":"message","id":"1","from":"a","text":"t","ts":0}]',  # id not an int
    ],
)
def test_malformed_record_closes(server_key, payload: bytes) -> None:
    """§3: a record that is not a non-empty array of valid messages ends the session."""

    def send_bad(conn: FakeConn) -> None:
        conn.sock.sendall(protocol.encode_frame(conn.tx.seal(payload)))
        conn.wait_closed()

    with FakeServer(server_key, send_bad) as fake:
        session = Session.connect(fake.host, fake.port, "alice", no_pin)
        session.start()
        with pytest.raises(ConnectionLost, match="malformed record"):
            session.recv(timeout=T)
        session.close()


def test_record_length_limits(server_key) -> None:
    """§1: clients accept records up to 1 MiB inclusive and close on a longer length."""
    text = "x" * (protocol.MAX_RECORD_PLAINTEXT - 80)

    def send_big(conn: FakeConn) -> None:
        body = json.dumps([protocol.message(1, "bob", text, 0)]).encode()
        body += b" " * (protocol.MAX_RECORD_PLAINTEXT - len(body))
        frame = protocol.encode_frame(conn.tx.seal(body))
        assert len(frame) == 4 + protocol.MAX_RECORD_FRAME
        conn.sock.sendall(frame)
        conn.sock.sendall((protocol.MAX_RECORD_FRAME + 1).to_bytes(4, "big") + b"x" * 100)
        conn.wait_closed()

    with FakeServer(server_key, send_big) as fake:
        session = Session.connect(fake.host, fake.port, "alice", no_pin)
        session.start()
        assert session.recv(timeout=T).text == text
        with pytest.raises(ConnectionLost, match="bad frame"):
            session.recv(timeout=T)
        session.close()


def test_idle_client_pings_and_notices_a_silent_server(server_key) -> None:
    """§4 Timeouts: an idle client sends `ping`; unanswered pings end the session."""
    got: queue.Queue[Any] = queue.Queue()

    def answer_once(conn: FakeConn) -> None:
        first = conn.recv()
        got.put(first)
        conn.send({"type": "pong", "id": first[0].get("id")})
        got.put(conn.recv())  # the next idle ping, left unanswered
        conn.wait_closed()

    with FakeServer(server_key, answer_once) as fake:
        session = Session.connect(fake.host, fake.port, "alice", no_pin)
        session.idle_ping_s, session.pong_wait_s = 0.2, 0.3
        session.start()
        assert got.get(timeout=T) == [{"type": "ping", "id": None}]
        assert got.get(timeout=T) == [{"type": "ping", "id": None}]
        assert isinstance(session.recv(timeout=T), protocol.Pong)
        with pytest.raises(ConnectionLost, match="stopped answering"):
            session.recv(timeout=T)
        session.close()


def test_hostile_text_is_escaped_in_pipe_output(server_key, tmp_path: Path) -> None:
    """Issue B: escapes in names, text, reasons and errors never reach stdout raw."""

    def hostile(conn: FakeConn) -> None:
        conn.send(
            protocol.joined("\x1b[2Jevil"),
            protocol.message(1, "\x1b]0;pwned\x07", "hi \x1b[31mred\r\nline2 \x9b6n", 1),
            protocol.left("\x1b[2Jevil", "\x1bc"),
            protocol.error("\x1b[5m", "bad \x07"),
        )
        conn.recv()  # leave
        conn.send({"type": "bye", "reason": "leave"})

    with FakeServer(server_key, hostile) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "bob")
        lines = [proc.stdout.readline().rstrip("\n") for _ in range(3)]
        proc.stdin.close()  # leave only once everything arrived
        assert proc.wait(timeout=T) == 0
        out, err = "\n".join(lines) + proc.stdout.read(), proc.stderr.read()
    assert "\x1b" not in out + err and "\x07" not in out + err and "\x9b" not in out
    assert lines[0].endswith("--> \\x1b[2Jevil joined")
    assert lines[1].endswith("<\\x1b]0;pwned\\x07> hi \\x1b[31mred\\x0d\\x0aline2 \\x9b6n")
    assert lines[2].endswith("<-- \\x1b[2Jevil left (\\x1bc)")
    assert "not delivered: bad \\x07" in err and "5m" not in err  # the code is not shown


# --- against the real server ---------------------------------------------------------------------


def test_session_end_to_end(run_server) -> None:
    """Issue A: join, say, dm, who, leave through `Session`, with refpeer as the other user."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        session = Session.connect(host, port, "Alice", no_pin)
        session.start()
        assert session.welcome.users == ["bob"]
        assert session.fingerprint == srv.fingerprint
        assert event(peer.recv(T)) == ("joined", "Alice")
        session.send(protocol.Say("hello"), protocol.Dm("BOB", "psst"), protocol.Who())
        assert peer.recv(T)["text"] == "hello"
        assert peer.recv(T)["text"] == "psst"
        assert recv_type(session, Users).names == ["Alice", "bob"]
        peer.send({"type": "say", "text": "hi alice"})
        msg = recv_type(session, Message)
        assert (msg.sender, msg.text) == ("bob", "hi alice")
        session.leave()
        assert event(peer.recv(T)) == ("left", "Alice", "leave")
        peer.close()


def test_pipe_mode_sends_lines_and_leaves_at_eof(run_server, tmp_path: Path) -> None:
    """Issue A/B: a scriptable client: each line sent, commands work, leave at end of input."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        done = pipe_client(
            tmp_path,
            port,
            "--name",
            "alice",
            stdin="one\r\n/msg bob two\n\n@bob three\n/who\n/bogus\nlast",
        )
        assert done.returncode == 1, done.stderr  # /bogus was not delivered
        assert event(peer.recv(T)) == ("joined", "alice")
        got = [peer.recv(T) for _ in range(4)]
        assert [(m["type"], m.get("text")) for m in got] == [
            ("message", "one"),
            ("dm", "two"),
            ("message", "@bob three"),  # a mention, public
            ("message", "last"),
        ]
        assert event(peer.recv(T)) == ("left", "alice", "leave")
        peer.close()
    assert done.stdout.splitlines()[-1].endswith("here (2): alice, bob")
    assert "unknown command /bogus" in done.stderr
    assert done.stderr.endswith("client.py: 1 of 6 lines were not delivered\n")
    assert "\x1b" not in done.stdout + done.stderr  # no colours in a pipe
    known = (tmp_path / "config" / "bcast" / "known_hosts").read_text()
    assert known == f"127.0.0.1:{port} {srv.fingerprint}\n"


def test_pipe_mode_exit_leaves_and_ignores_the_rest(run_server, tmp_path: Path) -> None:
    """Issue 3: typing `exit` (here: a piped line) leaves at once, exit status 0; the lines
    after it are not sent."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        done = pipe_client(tmp_path, port, "--name", "alice", stdin="before\nexit\nafter exit\n")
        assert done.returncode == 0, done.stderr
        assert event(peer.recv(T)) == ("joined", "alice")
        assert peer.recv(T)["text"] == "before"
        # left comes right after "before": "after exit" was never sent
        assert event(peer.recv(T)) == ("left", "alice", "leave")
        peer.close()


def test_pipe_mode_paces_to_the_announced_rate(run_server, tmp_path: Path) -> None:
    """Issue B: piped input is never refused as rate_limited (server rate 10, 25 lines)."""
    lines = [f"line {i}" for i in range(25)]
    with run_server(rate=10) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        done = pipe_client(tmp_path, port, "--name", "alice", stdin="\n".join(lines) + "\n")
        assert done.returncode == 0
        assert "rate_limited" not in done.stderr
        peer.recv(T)  # joined
        assert [peer.recv(T)["text"] for _ in lines] == lines
        peer.close()


def test_pipe_mode_prints_one_message_per_line(run_server, tmp_path: Path) -> None:
    """Issue B: one received message per line on stdout, status lines on stderr."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        proc = spawn_pipe_client(tmp_path, port, "--name", "bob")
        said = read_until(proc.stderr, "* joined as bob")
        assert said[-2].startswith("* first connection")
        peer, _ = connect_and_join(host, port, "alice")
        peer.send({"type": "say", "text": "two\nlines"}, {"type": "dm", "to": "bob", "text": "x"})
        peer.send({"type": "leave"})
        peer.wait_closed(T)
        lines = [proc.stdout.readline() for _ in range(4)]
        proc.stdin.close()  # end of input: leave
        assert proc.wait(timeout=T) == 0
    assert [line.split("] ", 1)[1] for line in lines] == [
        "--> alice joined\n",
        "<alice> two\\x0alines\n",
        "[dm] <alice> x\n",
        "<-- alice left\n",
    ]


def test_too_long_line_is_refused_locally(run_server, tmp_path: Path) -> None:
    """Issue A: lines over the server's max_text are not sent; a hint says why."""
    with run_server(rate=0, max_text=10) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        done = pipe_client(tmp_path, port, "--name", "alice", stdin="x" * 11 + "\nshort\n")
        assert peer.recv(T)["type"] == "joined"
        assert peer.recv(T)["text"] == "short"
        peer.close()
    assert done.returncode == 1
    assert "not sent: 11 bytes, the server takes at most 10" in done.stderr
    assert "(too_long)" not in done.stderr


def test_name_taken_in_pipe_mode_exits_1(run_server, tmp_path: Path) -> None:
    with run_server(rate=0) as srv:
        peer, _ = connect_and_join(*srv.address, "bob")
        done = pipe_client(tmp_path, srv.address[1], "--name", "BOB")
        peer.close()
    assert done.returncode == 1
    assert done.stderr.endswith("client.py: the name BOB is taken\n")


def test_pipe_mode_reconnects_after_the_server_comes_back(run_server, tmp_path: Path) -> None:
    """§6 Resume, issue 15: the server goes away (said in words, not `(bye: shutdown)`); a
    pipe reconnects by itself, resumes after the last id it saw (a message sent meanwhile
    is shown, once) and goes on sending; no traceback."""
    port, state = free_port(), tmp_path / "state.db"
    with run_server(rate=0, port=port, state=state) as srv:
        proc = spawn_pipe_client(tmp_path, port, "--name", "bob")
        read_until(proc.stderr, "joined as bob")
        peer, _ = connect_and_join("127.0.0.1", port, "ana")
        peer.send({"type": "say", "text": "seen live"})
        assert read_until(proc.stdout, "seen live")[-1].endswith("<ana> seen live\n")
        srv.shutdown()
        peer.close()
    said = read_until(proc.stderr, "reconnecting")
    assert said[-1] == "* the server is shutting down; reconnecting\n"
    with run_server(rate=0, port=port, state=state):
        peer, _ = connect_and_join("127.0.0.1", port, "ana")  # before bob is back
        peer.send({"type": "say", "text": "said while bob was away"})
        read_until(proc.stderr, "* reconnected as bob")
        assert proc.stdout.readline().endswith("<ana> said while bob was away\n")
        assert event(peer.recv(T)) == ("joined", "bob")
        proc.stdin.write("back again\n")
        proc.stdin.close()
        assert peer.recv(T)["text"] == "back again"
        assert proc.wait(timeout=T) == 0
        peer.close()
    assert "Traceback" not in proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def test_kicked_is_final_one_sentence_exit_1(server_key, tmp_path: Path) -> None:
    """§5, §6: after `bye` kicked (with by and message) the client does not reconnect: one
    sentence in words, exit 1."""

    def kick(conn: FakeConn) -> None:
        conn.send(protocol.bye("kicked", by="ana", message="spamming"))

    with FakeServer(server_key, kick) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "bob")
        _, err = wait_open(proc)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == "client.py: you were kicked by ana: spamming"
    assert len(fake.first_chunks) == 1  # one connection: no second try


def test_pins_through_the_cli(run_server, tmp_path: Path) -> None:
    """Issue B: first use stores, same key passes, changed key exits 2 with the file untouched,
    `--fingerprint` mismatch exits 2, `--known-hosts` points elsewhere."""
    kh = tmp_path / "pins"
    with run_server(rate=0) as srv:
        port = srv.address[1]
        args = ("--name", "alice", "--known-hosts", str(kh))
        first = pipe_client(tmp_path, port, *args)
        assert first.returncode == 0 and srv.fingerprint in first.stderr
        assert kh.read_text() == f"127.0.0.1:{port} {srv.fingerprint}\n"
        again = pipe_client(tmp_path, port, *args)
        assert again.returncode == 0 and "first connection" not in again.stderr
        kh.write_text(f"127.0.0.1:{port} {FP_A}\n")
        changed = pipe_client(tmp_path, port, *args)
        assert changed.returncode == 2
        assert FP_A in changed.stderr and srv.fingerprint in changed.stderr
        assert f"line 1 of {kh}" in changed.stderr
        assert kh.read_text() == f"127.0.0.1:{port} {FP_A}\n"
        wrong = pipe_client(tmp_path, port, *args, "--fingerprint", FP_B)
        assert wrong.returncode == 2 and "--fingerprint" in wrong.stderr
        right = pipe_client(tmp_path, port, *args, "--fingerprint", srv.fingerprint)
        assert right.returncode == 0
        assert f"replacing the old pin {FP_A}" in right.stderr  # a matching --fingerprint pins
        assert kh.read_text() == f"127.0.0.1:{port} {srv.fingerprint}\n"
    assert not (tmp_path / "config").exists()  # --known-hosts: the default file is untouched


def test_forget_removes_a_pin(tmp_path: Path) -> None:
    """Issue 15: `client.py --forget HOST:PORT` removes that pin (and only it), exit 0."""
    kh = tmp_path / "pins"
    kh.write_text(f"# kept\n127.0.0.1:4000 {FP_A}\n[::1]:4000 {FP_B}\n")
    done = subprocess.run(
        [sys.executable, str(CLIENT), "--known-hosts", str(kh), "--forget", "127.0.0.1:4000"],
        capture_output=True,
        text=True,
        timeout=T,
        env=client_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"removed the pin of 127.0.0.1:4000 ({FP_A}) from {kh}\n"
    assert kh.read_text() == f"# kept\n[::1]:4000 {FP_B}\n"
    assert client.main(["--known-hosts", str(kh), "--forget", "[::1]:4000"]) == 0
    assert kh.read_text() == "# kept\n"
    assert client.main(["--known-hosts", str(kh), "--forget", "[::1]:4000"]) == 0  # nothing left
    assert client.main(["--known-hosts", str(kh), "--forget", "no-port"]) == 2


def test_env_fingerprint_and_known_hosts_are_used(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 1: BCAST_FINGERPRINT and BCAST_KNOWN_HOSTS are the fallbacks of their flags."""
    pins = tmp_path / "env_pins"
    with run_server(rate=0) as srv:
        port = srv.address[1]
        wrong = pipe_client(tmp_path, port, "--name", "ana", env={"BCAST_FINGERPRINT": FP_A})
        assert wrong.returncode == 2, wrong.stderr
        assert FP_A in wrong.stderr and srv.fingerprint in wrong.stderr
        right = pipe_client(tmp_path, port, "--name", "ana", env={"BCAST_KNOWN_HOSTS": str(pins)})
        assert right.returncode == 0, right.stderr
    assert pins.read_text() == f"127.0.0.1:{port} {srv.fingerprint}\n"
    assert not (tmp_path / "config").exists()


def test_every_setting_flag_has_an_env_fallback() -> None:
    """Issue 15 bug 1: every client flag that takes a value or sets a mode reads BCAST_<FLAG>,
    and its --help says so; only the one-shot actions (--help, --forget, ...) have none."""
    parser = client.build_parser({})
    for action in parser._actions:
        flag = max(action.option_strings, key=len, default="")
        if not flag or action.dest in client.ACTION_FLAGS or flag == "--help":
            continue
        var = "BCAST_" + flag[2:].upper().replace("-", "_")
        assert var in (action.help or ""), f"{flag}: --help does not name {var}"
        value = "1" if action.nargs == 0 else "7"
        parsed = client.build_parser({var: value}).parse_args([])
        default = client.build_parser({}).parse_args([])
        got, plain = getattr(parsed, action.dest), getattr(default, action.dest)
        assert got != plain, f"{var}={value} does not change {flag}"


def test_known_hosts_in_a_missing_directory_is_a_usage_error(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 5: only the default pin file's folders are created; a --known-hosts whose
    folder is missing is an error (exit 2) before anything is connected or created."""
    with run_server(rate=0) as srv:
        given = tmp_path / "no" / "such" / "dir" / "kh"
        done = pipe_client(tmp_path, srv.address[1], "--name", "ana", "--known-hosts", str(given))
    assert done.returncode == 2, done.stderr
    assert str(given.parent) in done.stderr and "does not exist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_default_known_hosts_folders_are_created(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 5: the default location's folders are created (0700) on first use."""
    with run_server(rate=0) as srv:
        done = pipe_client(tmp_path, srv.address[1], "--name", "ana")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "config" / "bcast"
    assert (folder / "known_hosts").is_file() and folder.stat().st_mode & 0o777 == 0o700


def test_missing_pycryptodome_is_one_sentence_exit_2(tmp_path: Path) -> None:
    """Issue 15 bug 9: without the venv, no ModuleNotFoundError traceback: one sentence saying
    what to install and how, exit 2."""
    no_crypto = (
        "import runpy, sys; sys.modules['Crypto'] = None; "
        "sys.argv = ['client.py', '--name', 'ana']; "
        f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", no_crypto],
        capture_output=True,
        text=True,
        timeout=T,
        env=client_env(tmp_path),
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "pycryptodome" in done.stderr and "requirements.txt" in done.stderr
    assert ".venv/bin/python" in done.stderr


def test_pipe_mode_exits_1_when_lines_were_not_delivered(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 4: lines refused by the server (unknown user) or before sending (a control
    character, too long) make the run exit 1, with the count on standard error."""
    with run_server(rate=0, max_text=20) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        lines = ["fine", "/msg nobody hello", "bell \x07 here", "x" * 21, "also fine"]
        done = pipe_client(tmp_path, port, "--name", "ana", stdin="\n".join(lines) + "\n")
        assert event(peer.recv(T)) == ("joined", "ana")
        assert [peer.recv(T)["text"] for _ in range(2)] == ["fine", "also fine"]
        peer.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("client.py: 3 of 5 lines were not delivered")


def test_pipe_mode_exits_0_when_every_line_was_delivered(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 4: the other side of the rule: all delivered, exit 0, nothing counted."""
    with run_server(rate=0) as srv:
        peer, _ = connect_and_join(*srv.address, "bob")
        done = pipe_client(tmp_path, srv.address[1], "--name", "ana", stdin="a\n/msg bob b\n")
        peer.close()
    assert done.returncode == 0, done.stderr
    assert "not delivered" not in done.stderr


@pytest.mark.parametrize("more", [False, True])
def test_closed_stdout_leaves_and_exits(run_server, tmp_path: Path, more: bool) -> None:
    """Issue 15 bug 6: `client.py --name r | head -2`: once standard output is closed (EPIPE)
    the client leaves and exits, whether or not another message comes to be written."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        peer, _ = connect_and_join(host, port, "bob")
        proc = spawn_pipe_client(tmp_path, port, "--name", "r")
        try:
            assert event(peer.recv(T)) == ("joined", "r")
            peer.send({"type": "say", "text": "one"}, {"type": "say", "text": "two"})
            got = [proc.stdout.readline().split("> ")[-1] for _ in range(2)]
            assert got == ["one\n", "two\n"]
            proc.stdout.close()  # what `head -2` does after its second line
            if more:
                peer.send({"type": "say", "text": "three"})
            assert event(peer.recv(T)) == ("left", "r", "leave")
            assert proc.wait(timeout=T) == 0
            proc.stdin.close()
            assert "Traceback" not in proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
            peer.close()


# --- the chat without a terminal ---------------------------------------------------------------


class FakeIO:
    """Records what the chat shows; `interactive` as a terminal would be."""

    def __init__(self, interactive: bool = True):
        self.interactive = interactive
        self.shown: list[Line] = []

    def show(self, line: Line) -> None:
        self.shown.append(line)

    reason = None

    def wake(self, reason: str) -> None:
        pass


class FakeSession:
    def __init__(self, welcome: Any):
        self.welcome = welcome


def fake_chat(users: list[str], me: str = "ana", interactive: bool = True) -> Chat:
    welcome = protocol.parse_server_message(protocol.welcome(me, users, 100, 0))
    io = FakeIO(interactive)
    style = Style(colour=False, multiline=interactive)
    return Chat(io, style, None, FakeSession(welcome), "mentions")


@pytest.mark.parametrize(
    ("before", "done", "listed"),
    [
        ("c", "carol: ", []),  # the start of the line: addressing someone
        ("hi B", "hi Bob", ["Bob", "bobby"]),  # two fit: their common start, then a list
        ("hi bobb", "hi bobby ", []),
        ("hi @ca", "hi @carol ", []),  # a mention
        ("/msg c", "/msg carol ", []),
        ("/MSG c", "/MSG carol ", []),
        ("/cl", "/clear ", []),
        ("/bell m", "/bell mentions", []),
        ("x", "x", []),  # nothing fits: nothing changes (and no tab is inserted)
        ("a", "a", []),  # my own name is not offered
    ],
)
def test_tab_completion(before: str, done: str, listed: list[str]) -> None:
    """Issue 15: Tab completes names from the user list and commands (case-insensitively)."""
    chat = fake_chat(["Bob", "bobby", "carol"])
    assert chat.complete(before) == (done, listed)


def test_completion_follows_joins_and_leaves() -> None:
    """The names Tab offers are the ones here now: joined adds, left removes, users resets."""
    chat = fake_chat(["bob"])
    chat.feed.on_message(Joined("dave"))
    assert chat.complete("d") == ("dave: ", [])
    chat.feed.on_message(Left("dave", "leave"))
    assert chat.complete("d") == ("d", [])
    chat.feed.on_message(Users(["ana", "erin"]))
    assert chat.complete("b") == ("b", []) and chat.complete("e") == ("erin: ", [])


def test_date_rule_when_the_day_changes() -> None:
    """Issue 15: a `--- Saturday 5 December 2026 ---` line comes before the first line of
    another day than the last one shown (interactive only)."""
    chat = fake_chat([])
    noon = time.mktime((2026, 11, 28, 12, 0, 0, 0, 0, -1)) * 1000  # not today
    for ts in (noon, noon + 60_000, noon + 86_400_000):
        chat.feed.on_message(Message(1, "bob", "hi", int(ts)))
    texts = [line.text for line in chat.io.shown]
    assert texts[0] == "--- Saturday 28 November 2026 ---"
    assert texts[3] == "--- Sunday 29 November 2026 ---"
    assert len(texts) == 5
    piped = fake_chat([], interactive=False)
    piped.feed.on_message(Message(1, "bob", "hi", int(noon)))
    assert len(piped.io.shown) == 1


@pytest.mark.parametrize(
    ("text", "rings"),
    [("hi ana", True), ("ANA?", True), ("@ana, look", True), ("banana", False), ("ana_b", False)],
)
def test_mentions_ring_for_whole_words(text: str, rings: bool) -> None:
    """Issue 15: a message naming me as a whole word, in any case, is highlighted and rings."""
    chat = fake_chat(["bob"])
    chat.feed.on_message(Message(1, "bob", text, 0))
    assert chat.io.shown[-1].bell is rings
    chat.feed.bell = "off"
    chat.feed.on_message(Message(2, "bob", text, 0))
    assert chat.io.shown[-1].bell is False


def test_key_decoder_splits_anywhere() -> None:
    """Keys come out the same whatever the reads cut: UTF-8 and escape sequences whole."""
    data = "a漢\x1b[D\x1b[1;5C\x1bOH\x7f\r\x03\t\x1b[3~é".encode()
    want = ["a", "漢", "left", "word-right", "home", "backspace", "enter", "ctrl-c", "tab"]
    want += ["delete", "é"]
    assert KeyDecoder().feed(data) == want
    for cut in range(1, len(data)):
        keys = KeyDecoder()
        assert keys.feed(data[:cut]) + keys.feed(data[cut:]) == want, cut
    lone = KeyDecoder()
    assert lone.feed(b"\x1b") == [] and lone.pending and lone.flush() == ["esc"]
