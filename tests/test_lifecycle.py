"""Lifecycle: signals, peers that vanish, resources that must come back, what gets logged.

Each test names the PROTOCOL.md rule (or issue rule) it checks. Subprocess
servers are used where the process itself is under test (exit status, stderr).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netutil import LONG_S, PROMPT_S, read_until_closed, wait_until
from refpeer import (
    RefPeer,
    connect_and_join,
    encode_json,
    frame,
    make_key_message,
    read_plain_frame,
)

ROOT = Path(__file__).resolve().parent.parent
SHUTDOWN_S = 2.0  # §4 / issue: exit within 2 s of SIGINT or SIGTERM
LONG = str(LONG_S)  # as a flag: a timeout that must not be what ends a test's connection
# The connect and join lines of a peer; the others about it are counted (one per departure).
CONNECT_OR_JOIN = r"\bconnect(ed|ion)? from\b|\bjoin"


# --- helpers ------------------------------------------------------------------------------------


def open_raw(addr: tuple[str, int]) -> tuple[socket.socket, dict[str, Any]]:
    """A TCP connection that has read the plaintext `hello` and nothing more."""
    sock = socket.create_connection(addr, timeout=5.0)
    return sock, json.loads(read_plain_frame(sock))


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def server_threads() -> list[threading.Thread]:
    """Reader and flusher threads of any in-process server (`reader <peer>`, `flusher <n>`)."""
    return [t for t in threading.enumerate() if t.name.startswith(("reader ", "flusher "))]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class StderrTail:
    """Collects a subprocess's stderr lines in a thread, so tests can wait for a line."""

    def __init__(self, stream: Any):
        self.lines: list[str] = []
        self._cond = threading.Condition()  # guards lines
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.lines), timeout)
        assert ok, f"{what} not logged within {timeout} s; stderr:\n" + "\n".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@contextlib.contextmanager
def server_process(key_file: Path, *args: str) -> Iterator[tuple[subprocess.Popen, Any, int]]:
    """`python3 server.py` on port 0; yields (proc, stderr tail, port). Terminated afterwards."""
    cmd = [sys.executable, str(ROOT / "server.py"), "--port", "0", "--key-file", str(key_file)]
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tail = StderrTail(proc.stderr)
    try:
        port = None
        for line in proc.stdout:
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port is not None, "server did not start:\n" + "\n".join(tail.snapshot())
        yield proc, tail, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tail.join(5)
        proc.stdout.close()
        proc.stderr.close()


def lines_naming(lines: list[str], who: str) -> list[str]:
    """Log lines about `who` (an address or a name), other than its connect and join lines."""
    pattern = re.compile(re.escape(who) + r"(?!\d)")
    return [
        line
        for line in lines
        if pattern.search(line) and not re.search(CONNECT_OR_JOIN, line, re.IGNORECASE)
    ]


# --- SIGINT / SIGTERM ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_byes_keyed_closes_others_exits_zero(spawn_server, sig: signal.Signals) -> None:
    """§4: on a signal: stop accepting, bye(shutdown) to keyed clients, no `left`, exit 0 in 2 s."""
    with spawn_server("--handshake-timeout", LONG, "--idle-timeout", LONG) as (proc, host, port, _):
        alice, _ = connect_and_join(host, port, "alice")
        bob, _ = connect_and_join(host, port, "bob")
        assert alice.recv(5) == {"type": "joined", "name": "bob", "identity": None}
        keyed_only = RefPeer.connect(host, port)  # sent `key`, never joined
        keyed_only.send({"type": "ping", "id": "keyed"})
        assert keyed_only.recv(5) == {"type": "pong", "id": "keyed"}
        raw, hello = open_raw((host, port))  # never sent `key`
        assert hello["type"] == "hello"
        start = time.monotonic()
        proc.send_signal(sig)
        for peer in (alice, bob, keyed_only):
            with peer:
                assert peer.wait_closed(SHUTDOWN_S) == [{"type": "bye", "reason": "shutdown"}]
        with raw:
            assert read_until_closed(raw, SHUTDOWN_S) == b""
        # no longer accepting: refused, or closed without a hello
        try:
            late = socket.create_connection((host, port), timeout=1.0)
        except ConnectionRefusedError:
            pass
        else:
            with late:
                assert read_until_closed(late, SHUTDOWN_S) == b""
        remaining = SHUTDOWN_S - (time.monotonic() - start)
        try:
            code = proc.wait(max(0.0, remaining))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SHUTDOWN_S} s after {sig.name}")
        assert code == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr, stderr


def test_second_sigint_exits_at_once(key_file: Path) -> None:
    """§4 (issue): a second SIGINT during a slow shutdown exits at once."""
    args = ("--send-timeout", LONG, "--max-pending", str(64 * 1024 * 1024))
    with server_process(key_file, *args) as (proc, tail, port):
        # a client that asks for megabytes of pongs and never reads them: its writer blocks,
        # so the first SIGINT's shutdown waits (its grace period) for that connection
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(10)
        stuck.connect(("127.0.0.1", port))
        hello = json.loads(read_plain_frame(stuck))
        key_msg, k_c2s, k_s2c = make_key_message(hello)
        with RefPeer(stuck, hello, k_c2s, k_s2c, 10.0) as peer:
            peer.send_raw(frame(encode_json(key_msg)))
            big = "z" * 60_000
            for i in range(200):  # 12 MB of pongs: more than the kernel buffers hold
                peer.send({"type": "ping", "id": f"{i} {big}"})
            time.sleep(0.5)  # let the server turn the pings into pongs (no signal to wait on)
            proc.send_signal(signal.SIGINT)
            tail.wait_for(
                lambda lines: any("SIGINT" in line for line in lines), PROMPT_S, "the SIGINT"
            )
            time.sleep(0.2)
            assert proc.poll() is None, "the first shutdown was not slow: the test proves nothing"
            second = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pytest.fail("a second SIGINT did not exit at once")
            assert time.monotonic() - second < 0.5


# --- peers that vanish --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vanish_server(key_file: Path) -> Iterator[tuple[int, StderrTail, RefPeer]]:
    """One subprocess server (log level DEBUG) and an observer `alice` for the vanishing tests."""
    args = ("--log-level", "DEBUG", "--handshake-timeout", LONG, "--idle-timeout", LONG)
    # rate 0: alice's `who` after every case takes a token (revision 2)
    with server_process(key_file, *args, "--rate", "0") as (proc, tail, port):
        alice, _ = connect_and_join("127.0.0.1", port, "alice", timeout=5.0)
        with alice:
            yield port, tail, alice
        proc.terminate()
        assert proc.wait(5) == 0
        tail.join(5)
        assert not any("Traceback" in line for line in tail.lines), "\n".join(tail.lines)


def _hello_then_close(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    sock, _ = open_raw(addr)
    return sock, False


def _half_key(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    sock, hello = open_raw(addr)
    data = frame(encode_json(make_key_message(hello)[0]))
    sock.sendall(data[: len(data) // 2])
    return sock, False


def _half_length(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    sock, _ = open_raw(addr)
    sock.sendall(b"\x00\x00")
    return sock, False


def _keyed(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    peer = RefPeer.connect(*addr)
    peer.send({"type": "ping"})
    assert peer.recv(5)["type"] == "pong"
    return peer.sock, False


def _joined(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    peer, _ = connect_and_join(*addr, name)
    return peer.sock, True


def _joined_half_record(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    peer, _ = connect_and_join(*addr, name)
    peer.send_raw((100).to_bytes(4, "big") + os.urandom(40))
    return peer.sock, True


def _joined_unread(addr: tuple[str, int], name: str) -> tuple[socket.socket, bool]:
    """Joined, then something arrives that it never reads (closing then sends a RST)."""
    peer, _ = connect_and_join(*addr, name)
    peer.send({"type": "ping", "id": "x" * 1000})
    select.select([peer.sock], [], [], 5)
    return peer.sock, True


SETUPS: dict[str, Callable[[tuple[str, int], str], tuple[socket.socket, bool]]] = {
    "after hello": _hello_then_close,
    "half a length prefix": _half_length,
    "half a key frame": _half_key,
    "keyed, not joined": _keyed,
    "joined": _joined,
    "joined, half a record": _joined_half_record,
    "joined, unread data": _joined_unread,
}
ENDINGS: dict[str, Callable[[socket.socket], None]] = {
    "close": lambda sock: sock.close(),
    "reset": reset,
    "half-close": lambda sock: sock.shutdown(socket.SHUT_WR),
}
VANISH_CASES = [(setup, ending) for setup in SETUPS for ending in ENDINGS]


@pytest.mark.parametrize(
    ("setup", "ending"), VANISH_CASES, ids=[f"{s}-{e}" for s, e in VANISH_CASES]
)
def test_vanishing_peer_removed_once_logged_once(vanish_server, setup: str, ending: str) -> None:
    """Issue lifecycle: a vanished peer is removed once, `left` once, one log line, no traceback."""
    port, tail, alice = vanish_server
    name = "v" + re.sub(r"\W", "", f"{setup}{ending}")[:30]
    sock, joined = SETUPS[setup](("127.0.0.1", port), name)
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    if joined:
        assert alice.recv(5) == {"type": "joined", "name": name, "identity": None}
    ENDINGS[ending](sock)
    try:
        if joined:
            assert alice.recv(5) == {"type": "left", "name": name, "reason": "disconnect"}
            # something for the dead socket's writer to fail on (broken pipe)
            alice.send({"type": "say", "text": "anyone there?"})
        tail.wait_for(lambda lines: lines_naming(lines, address), PROMPT_S, f"{address} gone")
        alice.send({"type": "who"}, {"type": "ping", "id": name})
        assert alice.recv(5) == {"type": "users", "names": ["alice"]}  # no second `left`
        assert alice.recv(5) == {"type": "pong", "id": name}
    finally:
        sock.close()
    lines = tail.snapshot()
    assert len(lines_naming(lines, address)) == 1, lines_naming(lines, address)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


# --- resources ----------------------------------------------------------------------------------


def _churn_one(addr: tuple[str, int], i: int) -> None:
    """Connect and go away in one of several ways, chosen by `i`."""
    way = i % 6
    if way == 0:  # a polite leave
        peer, _ = connect_and_join(*addr, f"c{i}")
        peer.send({"type": "leave"})
        got = peer.wait_closed(PROMPT_S)  # others' joined/left may come first
        assert got[-1] == {"type": "bye", "reason": "leave"}, got
    elif way == 1:  # joined, then closed
        peer, _ = connect_and_join(*addr, f"c{i}")
        peer.close()
    elif way == 2:  # joined, then reset
        peer, _ = connect_and_join(*addr, f"c{i}")
        reset(peer.sock)
    elif way == 3:  # mid-handshake
        sock, _ = open_raw(addr)
        sock.close()
    elif way == 4:  # keyed, then a record that fails to open
        peer = RefPeer.connect(*addr)
        peer.send_raw(frame(os.urandom(40)))
        assert peer.wait_closed(PROMPT_S) == []
    else:  # half a frame, then reset
        sock, _ = open_raw(addr)
        sock.sendall(b"\x00\x00\x01")
        reset(sock)


def _churn_batch(addr: tuple[str, int], numbers: range, errors: list[BaseException]) -> None:
    try:
        for i in numbers:
            _churn_one(addr, i)
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_threads_and_fds_return_after_churn(run_server) -> None:
    """Issue lifecycle: after 100 clients come and go, threads and open fds return to baseline."""
    wait_until(lambda: not server_threads(), 5, "earlier servers' threads ending")
    with run_server() as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            threads, fds = threading.active_count(), open_fds()
            errors: list[BaseException] = []
            workers = [
                threading.Thread(target=_churn_batch, args=(srv.address, range(k, 100, 10), errors))
                for k in range(10)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            assert not any(w.is_alive() for w in workers)
            assert not errors, errors
            wait_until(lambda: threading.active_count() <= threads, 5, f"{threads} threads")
            wait_until(lambda: open_fds() <= fds, 5, f"{fds} open fds")
            alice.send({"type": "who"})
            assert alice.recv_until("users", 5)[0]["names"] == ["alice"]
            assert srv.hub.open_connections() == 1


# --- logging ------------------------------------------------------------------------------------


def test_logging_events_at_info_never_text_or_keys(run_server, caplog) -> None:
    """Issue logging: connects, joins, leaves, evictions, refusals at INFO; no text, no keys."""
    caplog.set_level(logging.DEBUG, logger="bcast.server")
    marker, dm_marker = "M4rker-say-1f3a9c", "M4rker-dm-77b2e0"
    secret = os.urandom(32)
    with run_server(max_clients=3, rate=0) as srv:
        sock, hello = open_raw(srv.address)
        key_msg, k_c2s, k_s2c = make_key_message(hello, secret=secret)
        alice_addr = f"127.0.0.1:{sock.getsockname()[1]}"
        with RefPeer(sock, hello, k_c2s, k_s2c, 5.0) as alice:
            alice.send_raw(frame(encode_json(key_msg)))
            assert alice.join("alice")["type"] == "welcome"
            bob, _ = connect_and_join(*srv.address, "bob")
            with bob:
                assert alice.recv(5) == {"type": "joined", "name": "bob", "identity": None}
                alice.send(
                    {"type": "say", "text": marker}, {"type": "dm", "to": "bob", "text": dm_marker}
                )
                assert bob.recv(5)["text"] == marker
                assert bob.recv(5)["text"] == dm_marker
                # an eviction: carol's record fails to open
                carol, _ = connect_and_join(*srv.address, "carol")
                with carol:
                    carol.send_raw(frame(os.urandom(64)))
                    assert carol.wait_closed(PROMPT_S) == []
                assert alice.recv_until("left", 5)[0]["name"] == "carol"
                # a refusal: a third connection fills the server, a fourth is refused
                wait_until(lambda: srv.hub.open_connections() == 2, PROMPT_S, "carol's slot freed")
                filler, _ = open_raw(srv.address)
                with filler:
                    extra, refusal = open_raw(srv.address)
                    extra_addr = f"127.0.0.1:{extra.getsockname()[1]}"
                    extra.close()
                    assert refusal["code"] == "server_full"
                bob.send({"type": "leave"})
                assert bob.wait_closed(PROMPT_S)[-1] == {"type": "bye", "reason": "leave"}
            assert alice.recv_until("left", 5)[0]["name"] == "bob"

        def info(*needles: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.INFO and all(n in r.getMessage() for n in needles)
            ]

        def eventually(*needles: str) -> None:
            wait_until(lambda: info(*needles), PROMPT_S, f"an INFO line with {needles}")

        eventually(alice_addr)  # connect, with the address
        eventually("alice")  # join
        wait_until(lambda: lines_naming(info("bob"), "bob"), PROMPT_S, "bob's leave at INFO")
        wait_until(lambda: lines_naming(info("carol"), "carol"), PROMPT_S, "carol's eviction")
        eventually(extra_addr)  # the refusal
    secrets = [secret, k_c2s, k_s2c, base64.b64decode(key_msg["secret"])]
    forbidden = [marker, dm_marker, key_msg["secret"]]
    for value in secrets:
        forbidden += [value.hex(), base64.b64encode(value).decode(), repr(value)[2:-1]]
    for record in caplog.records:
        if record.levelno < logging.INFO:
            continue
        text = record.getMessage() + (record.exc_text or "")
        for needle in forbidden:
            assert needle not in text, f"{needle[:20]}... logged at {record.levelname}: {text}"


def test_log_lines_name_refused_joins_and_say_reasons_in_words(run_server, caplog) -> None:
    """Issue 15 bug 8: a refused name is logged at INFO with why; a closed connection is
    named by its name and address with its reason in words, never an internal repr."""
    caplog.set_level(logging.INFO, logger="bcast.server")
    with run_server(rate=0, send_timeout=0.3, max_pending=65536) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            late = RefPeer.connect(*srv.address, timeout=5.0)
            with late:
                assert late.join("alice")["code"] == "name_taken"
                assert late.join("bad name!")["code"] == "invalid_name"
            bob, _ = connect_and_join(*srv.address, "bob")
            bob.sock.close()  # vanishes without leave
            assert alice.recv_until("left", 5)[0]["name"] == "bob"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    refused = [line for line in lines if "join" in line and "refused" in line]
    assert any("'alice' is taken" in line or "alice is taken" in line for line in refused), lines
    assert any("invalid" in line or "the name" in line for line in refused[1:]), refused
    assert not any("<Conn" in line for line in lines), lines
    closed = [line for line in lines if line.startswith("bob (127.0.0.1:")]
    assert closed and "disconnected" in closed[0], lines


def test_internal_error_costs_one_connection_and_logs_one_clean_line(
    run_server, caplog, monkeypatch
) -> None:
    """A bug on one connection (here: its say raises) ends that connection alone, and is
    one ERROR line naming the exception, the peer's text in it cut and escaped; the
    traceback goes to DEBUG only. The others keep chatting."""
    import reader

    marker = "M4rker\x1b[2J" + "x" * 500

    def broken_say(self, msg) -> None:
        if msg.text.startswith("boom"):
            raise ValueError(marker)
        return real_say(self, msg)

    real_say = reader.Reader._say
    monkeypatch.setattr(reader.Reader, "_say", broken_say)
    caplog.set_level(logging.DEBUG, logger="bcast.server")
    with run_server(rate=0) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        bob, _ = connect_and_join(*srv.address, "bob")
        with alice, bob:
            assert alice.recv(5)["type"] == "joined"
            bob.send({"type": "say", "text": "boom"})
            bob.wait_closed(PROMPT_S)
            assert alice.recv_until("left", 5)[0]["name"] == "bob"
            alice.send({"type": "ping", "id": 1})
            assert alice.recv_until("pong", 5)[0] == {"type": "pong", "id": 1}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "internal error on 127.0.0.1:" in line and "ValueError" in line, line
    assert "\x1b" not in line and "\\x1b" in line and "characters)" in line, line
    assert errors[0].exc_info is None
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
