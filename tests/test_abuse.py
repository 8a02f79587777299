"""Abuse resistance (issue 12): each attack of the issue against a live server.

Other sources are other loopback addresses (127.0.0.2, 127.0.0.3, ...): a client
socket bound to one before it connects. Every test fails on the server before
issue 12; to see that, run this file against another server.py:

    BCAST_ABUSE_SERVER=/work/base/server.py python3 -m pytest tests/test_abuse.py

Then each server runs as a subprocess with its settings given as BCAST_*
variables (an older server ignores the ones it does not know); the checks that
need this server's internals run only in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netutil import LONG_S, PROMPT_S, RECV_S, UNIT_S, read_until_closed, wait_until
from refpeer import (
    RefPeer,
    connect_and_join,
    encode_json,
    frame,
    make_key_message,
    read_plain_frame,
)

import server

ALT_SERVER = os.environ.get("BCAST_ABUSE_SERVER")  # another server.py to run these against
LOGGER = "bcast.server"
MIB = 1024 * 1024


@dataclasses.dataclass
class Live:
    """A server under test: its address, the in-process Server (None for a subprocess),
    and its log lines (a subprocess's arrive when it has stopped)."""

    address: tuple[str, int]
    srv: server.Server | None
    lines: list[str]


@pytest.fixture
def live(run_server, key_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Factory: `with live(idle_timeout=...) as s:` a server in this process, or
    BCAST_ABUSE_SERVER as a subprocess with the same settings."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    @contextlib.contextmanager
    def factory(**settings: Any) -> Iterator[Live]:
        if ALT_SERVER is None:
            lines: list[str] = []
            with run_server(**settings) as srv:
                yield Live(srv.address, srv, lines)
                lines += [r.getMessage() for r in caplog.records if r.name == LOGGER]
            return
        env = {f"BCAST_{k.upper()}": str(v) for k, v in settings.items()}
        env["BCAST_STATE"] = str(tmp_path / "state.db")
        cmd = [sys.executable, ALT_SERVER, "--port", "0", "--key-file", str(key_file)]
        pipe = subprocess.PIPE
        env = {**os.environ, **env}
        proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env)
        try:
            address = None
            for line in proc.stdout:
                if "listening on" in line:
                    host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
                    address = (host, int(port))
                    break
            assert address is not None, proc.stderr.read()
            lines = []
            yield Live(address, None, lines)
        finally:
            proc.terminate()
            _, err = proc.communicate(10)
        lines += err.splitlines()

    return factory


# --- helpers: peers from other addresses ------------------------------------------------------


def open_from(address: tuple[str, int], source: str) -> tuple[socket.socket, dict[str, Any]]:
    """A TCP connection from `source` that has read its first frame (`hello` or the refusal)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(RECV_S)
    sock.connect(address)
    try:
        return sock, json.loads(read_plain_frame(sock))
    except BaseException:
        sock.close()
        raise


def key_and_join(sock: socket.socket, hello: dict[str, Any], name: str) -> RefPeer:
    """Finish the handshake of a raw connection: `key`, then `join` (§2)."""
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    peer = RefPeer(sock, hello, k_c2s, k_s2c, RECV_S)
    peer.send_raw(frame(encode_json(key_msg)))
    assert peer.join(name)["type"] == "welcome"
    return peer


def keyed(address: tuple[str, int], rcvbuf: int | None = None) -> RefPeer:
    """A connection that has sent `key` and nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(RECV_S)
    sock.connect(address)
    hello = json.loads(read_plain_frame(sock))
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    peer = RefPeer(sock, hello, k_c2s, k_s2c, RECV_S)
    peer.send_raw(frame(encode_json(key_msg)))
    return peer


def is_refusal(first: dict[str, Any]) -> bool:
    return first.get("type") == "error" and first.get("code") == "server_full"


def closed_by_server(sock: socket.socket) -> bool:
    """Without blocking: has the server closed (EOF or reset) this raw connection?"""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


# --- a dropped connection's record stops ------------------------------------------------------


def test_no_ghost_after_a_record_that_got_its_sender_dropped(live, monkeypatch) -> None:
    """Issue 12: nothing more of a record runs once its connection is dropped (here as slow,
    by the pongs of its own pings); a join later in that record leaves no ghost user."""
    late: list[str] = []
    if ALT_SERVER is None:  # no message is applied to a connection that has ended
        apply = server.Reader._apply

        def watched(reader: server.Reader, obj: dict[str, Any]) -> bool:
            if reader.conn.ended:
                late.append(obj.get("type"))
            return apply(reader, obj)

        monkeypatch.setattr(server.Reader, "_apply", watched)
    with live(max_pending=65536, send_timeout=LONG_S, rate=0, idle_timeout=LONG_S) as s:
        alice, _ = connect_and_join(*s.address, "alice")
        with alice:
            attacker = keyed(s.address, rcvbuf=4096)  # and it never reads
            with attacker:
                # §3: 63 pings whose pongs (~120 KB) far exceed max_pending, then a join
                pings = [{"type": "ping", "id": f"{i:02d}{'p' * 1900}"} for i in range(63)]
                attacker.send(*pings, {"type": "join", "name": "ghost"})
                if s.srv is not None:
                    wait_until(lambda: s.srv.hub.open_connections() == 1, PROMPT_S, "the drop")
                else:  # a subprocess: no event to wait for but the ghost's `joined`
                    with contextlib.suppress(TimeoutError):
                        assert alice.recv(PROMPT_S)["type"] != "joined"
            alice.send({"type": "who"})
            assert alice.recv(RECV_S) == {"type": "users", "names": ["alice"]}
    assert late == []


# --- per-source limits ---------------------------------------------------------------------------


def test_unjoined_connections_per_address_are_limited(live) -> None:
    """--max-unjoined-per-ip (16 by default): one more unjoined connection from that address
    gets the plaintext server_full and is closed; other addresses are not affected; the count
    drops when one of them joins or closes."""
    with (
        live(max_unjoined_per_ip=16, handshake_timeout=LONG_S) as s,
        contextlib.ExitStack() as stack,
    ):
        held = []
        for _ in range(16):
            sock, hello = open_from(s.address, "127.0.0.2")
            stack.callback(sock.close)
            assert hello["type"] == "hello"
            held.append((sock, hello))
        extra, refusal = open_from(s.address, "127.0.0.2")
        with extra:
            assert is_refusal(refusal), refusal
            assert read_until_closed(extra, PROMPT_S) == b""
        other, hello = open_from(s.address, "127.0.0.3")
        stack.callback(other.close)
        assert hello["type"] == "hello"
        joined = key_and_join(*held[0], "joiner")  # joined: no longer counts
        stack.callback(joined.close)
        again, hello = open_from(s.address, "127.0.0.2")
        stack.callback(again.close)
        assert hello["type"] == "hello"
        held[1][0].close()  # closed: no longer counts, once the server has noticed

        def one_more() -> bool:
            sock, first = open_from(s.address, "127.0.0.2")
            stack.callback(sock.close)
            return first["type"] == "hello"

        wait_until(one_more, PROMPT_S, "a place freed by a close")
        real, _ = connect_and_join(*s.address, "real")
        real.close()


def test_connect_rate_per_address_and_one_log_line(live) -> None:
    """--connect-rate-per-ip R: a burst of 2R new connections, then server_full; another
    address is not affected; the refusals make one INFO line per address, not one each."""
    with live(connect_rate_per_ip=1, max_unjoined_per_ip=0) as s:
        for _ in range(2):
            sock, hello = open_from(s.address, "127.0.0.2")
            sock.close()
            assert hello["type"] == "hello"
        refused = 0
        for _ in range(10):
            sock, first = open_from(s.address, "127.0.0.2")
            sock.close()
            refused += is_refusal(first)
        assert refused == 10
        sock, hello = open_from(s.address, "127.0.0.3")
        sock.close()
        assert hello["type"] == "hello"
    lines = [line for line in s.lines if "refused 127.0.0.2" in line]
    assert len(lines) == 1, lines


def test_half_open_flood_from_other_addresses_cannot_lock_newcomers_out(live) -> None:
    """Limits: unjoined connections never hold the reserve of max_clients, and when they hold
    the rest a newcomer takes the place of the oldest: joins succeed during a flood of
    half-open connections from many addresses (each within its own limits)."""
    max_clients = 20  # a reserve of 2: unjoined connections hold at most 18
    limits = dict(max_unjoined_per_ip=16, connect_rate_per_ip=20)  # the flags' defaults
    with (
        live(max_clients=max_clients, handshake_timeout=LONG_S, **limits) as s,
        contextlib.ExitStack() as st,
    ):
        flood = []
        for n in range(4 * 16):  # 4 addresses x 16 unjoined each: over the whole server
            sock, first = open_from(s.address, f"127.0.0.{2 + n % 4}")
            st.callback(sock.close)
            if first["type"] == "hello":
                flood.append(sock)
        for i in range(5):
            peer, welcome = connect_and_join(*s.address, f"real{i}")
            with peer:
                assert welcome["type"] == "welcome"
                peer.send({"type": "leave"})
                peer.wait_closed(RECV_S)

        def held() -> int:
            return sum(not closed_by_server(sock) for sock in flood)

        wait_until(lambda: held() <= max_clients - 2, PROMPT_S, "the flood held to its share")


# --- frames ---------------------------------------------------------------------------------


def test_partial_frame_does_not_keep_a_client_alive(live) -> None:
    """§4 idle: only whole records count; a joined client trickling one byte of a frame at a
    time (the header said more) is closed after idle_timeout, while one that sends whole
    pings stays."""
    idle = 2 * UNIT_S
    with live(idle_timeout=idle, handshake_timeout=LONG_S) as s:
        trickler, _ = connect_and_join(*s.address, "trickler")
        pinger, _ = connect_and_join(*s.address, "pinger")
        with trickler, pinger:
            trickler.recv_until("joined", RECV_S)  # the pinger's
            trickler.send_raw(struct.pack(">I", 1000))
            start = time.monotonic()
            bye = None
            while bye is None and time.monotonic() - start < idle + 2 * PROMPT_S:
                trickler.send_raw(b"x")
                pinger.send({"type": "ping", "id": "alive"})
                with contextlib.suppress(TimeoutError):
                    bye = trickler.recv(idle / 8)
            elapsed = time.monotonic() - start
            assert bye is not None, f"a trickling client was still connected after {elapsed:.1f} s"
            assert bye == {"type": "bye", "reason": "timeout"}
            assert elapsed < idle + PROMPT_S
            assert trickler.wait_closed(PROMPT_S) == []
            pinger.recv_until("left", RECV_S)  # and it heard the trickler go; still here:
            pinger.send({"type": "ping", "id": "last"})
            assert pinger.recv_until("pong", RECV_S)[0] == {"type": "pong", "id": "last"}


def test_record_limit_is_announced_and_enforced(live) -> None:
    """§1: the server's R is announced as welcome.max_record, small enough that a parked
    partial record costs little (issue 12: at most 300 KiB each); a record of R bytes is
    read, one of R + 1 closes the connection after its 4 length bytes (bye protocol)."""
    with live() as s:
        peer, welcome = connect_and_join(*s.address, "alice")
        with peer:
            limit = welcome.get("max_record", 1_048_576)
            assert 65_536 <= limit <= 256 * 1024, f"R = {limit}"
            if s.srv is not None:
                assert limit == server.MAX_RECORD_BYTES
            head, tail = b'[{"type":"ping","id":"', b'"}]'
            plaintext = head + b"a" * (limit - 16 - len(head) - len(tail)) + tail
            peer.send_plaintext(plaintext)
            assert peer.recv(RECV_S)["type"] == "pong"
            peer.send_raw(struct.pack(">I", limit + 1))
            assert peer.wait_closed(PROMPT_S) == [{"type": "bye", "reason": "protocol"}]


@pytest.mark.skipif(ALT_SERVER is not None, reason="checks this server's constants")
def test_max_text_fits_the_record_limit() -> None:
    """Limits: --max-text is capped so that the longest say, JSON-escaped at 3 bytes per
    byte of text (\\uXXXX), still fits a record of R bytes; over it is a usage error."""
    cap = server.MAX_TEXT_LIMIT
    text = "é" * (cap // 2)  # 2 UTF-8 bytes, 6 escaped: the worst case
    say = json.dumps([{"type": "say", "text": text, "action": True}]).encode()
    assert len(say) + 16 <= server.MAX_RECORD_BYTES
    assert server.settings_from_args(["--max-text", str(cap)]).max_text == cap
    with pytest.raises(SystemExit):
        server.settings_from_args(["--max-text", str(cap + 1)])


# --- logs ---------------------------------------------------------------------------------------


def test_peer_strings_in_log_lines_are_cut(live) -> None:
    """Logs: a `key` frame whose type is 8,000 characters (with a newline to forge a line)
    writes a short, one-line note, not 8 KiB of log, before any authentication."""
    with live() as s:
        sock = socket.create_connection(s.address, timeout=RECV_S)
        with sock:
            read_plain_frame(sock)
            kind = "A" * 4000 + "\n2099-01-01 INFO forged line\n" + "B" * 4000
            sock.sendall(frame(json.dumps({"type": kind}).encode()))
            assert read_until_closed(sock, PROMPT_S) == b""
            port = str(sock.getsockname()[1])
    if s.srv is not None:
        wait_until(lambda: s.srv.hub.open_connections() == 0, PROMPT_S, "the close")
    about = [line for line in s.lines if port in line or "AAAA" in line]
    assert sum(len(line) for line in about) < 1024, f"{sum(map(len, about))} bytes of log"
    assert not any("forged line" in line and "\n" in line for line in about)
    assert not any(line.startswith("2099") for line in s.lines)


# --- sockets --------------------------------------------------------------------------------------


def test_stuck_reader_dropped_once_max_pending_is_full(live) -> None:
    """Limits: the kernel's send buffer counts in max_pending, so a client that stops reading
    is dropped after about max_pending bytes (not the kernel's ~4 MiB more, unseen)."""
    max_pending = 1 * MIB
    text = "s" * 16000
    settings = dict(max_pending=max_pending, send_timeout=LONG_S, rate=0, idle_timeout=LONG_S)
    with live(**settings) as s:
        if s.srv is not None:
            assert 0 < s.srv.send_buffer <= max_pending // 2
            assert s.srv.listener.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == (
                s.srv.send_buffer
            )
        stuck, _ = connect_and_join(*s.address, "stuck")  # and it never reads again
        alice, _ = connect_and_join(*s.address, "alice")
        bob, _ = connect_and_join(*s.address, "bob")
        with stuck, alice, bob:
            delivered = 0
            while True:
                assert delivered * len(text) < 16 * MIB, "the stuck reader was never dropped"
                alice.send(*[{"type": "say", "text": text}] * 4)
                got = [bob.recv(RECV_S) for _ in range(4)]
                if any(m["type"] == "left" for m in got):
                    assert {"type": "left", "name": "stuck", "reason": "slow"} in got
                    break
                delivered += 4
    queued = delivered * len(text)
    assert queued < max_pending + 512 * 1024, f"dropped after {queued} bytes were due to it"


def test_evicted_and_refused_connections_leave_no_books(live) -> None:
    """Limits (memory under churn): once connections from an address are gone, the server
    keeps nothing about that address (after the connect-rate bucket has refilled)."""
    if ALT_SERVER is not None:
        pytest.skip("reads this server's internals")
    with live(connect_rate_per_ip=50, max_unjoined_per_ip=16) as s:
        socks = [open_from(s.address, "127.0.0.4")[0] for _ in range(5)]
        for sock in socks:
            sock.close()
        hub = s.srv.hub
        wait_until(lambda: hub.open_connections() == 0, PROMPT_S, "the closes")
        admission = hub._admission
        wait_until(lambda: admission.sources == 0, RECV_S, "the address forgotten")
        assert admission.unjoined == 0


@pytest.mark.skipif(ALT_SERVER is not None, reason="checks this server's command line")
def test_per_source_flags_default_on_and_fall_back_to_the_environment(monkeypatch) -> None:
    """Limits: --max-unjoined-per-ip 16 and --connect-rate-per-ip 20 by default on the command
    line (loopback included), 0 turns each off, BCAST_* set them; negative is a usage error."""
    defaults = server.settings_from_args([])
    assert (defaults.max_unjoined_per_ip, defaults.connect_rate_per_ip) == (16, 20)
    assert defaults.send_buffer == server.DEFAULT_SEND_BUFFER_BYTES
    monkeypatch.setenv("BCAST_MAX_UNJOINED_PER_IP", "0")
    monkeypatch.setenv("BCAST_CONNECT_RATE_PER_IP", "2.5")
    from_env = server.settings_from_args([])
    assert (from_env.max_unjoined_per_ip, from_env.connect_rate_per_ip) == (0, 2.5)
    for flag in ("--max-unjoined-per-ip", "--connect-rate-per-ip", "--send-buffer"):
        with pytest.raises(SystemExit):
            server.settings_from_args([flag, "-1"])
