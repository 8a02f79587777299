"""Fuzz of the live server: whatever a peer sends, the server refuses it or answers it
(PROTOCOL.md §1-§3), never crashes, and keeps serving honest clients afterwards.

The invariant is h11's: "parse it or raise a protocol error, nothing else".
Before `key` any flaw is a silent close; after it a record that fails to open is
a silent close, a plaintext that is not a record is bye(protocol), anything
else is answered on a connection that stays open.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netutil import PROMPT_S, read_until_closed
from refpeer import (
    RefError,
    RefPeer,
    RefRecordCipher,
    connect_and_join,
    encode_json,
    encode_messages,
    frame,
    make_key_message,
    parse_record_plaintext,
    read_plain_frame,
)

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
NAMES = (f"fz{i}" for i in itertools.count())  # unique join names across examples


def server_threads() -> list[threading.Thread]:
    """Per-connection threads of any in-process server (named `reader ...` / `writer ...`)."""
    return [t for t in threading.enumerate() if t.name.startswith(("reader ", "writer "))]


def wait_settled(srv: Any, timeout: float = 5.0) -> None:
    """Wait until the server holds no connection and runs no per-connection thread."""
    deadline = time.monotonic() + timeout
    while True:
        conns = srv.hub.open_connections()
        threads = server_threads()
        if conns == 0 and not threads:
            return
        assert time.monotonic() < deadline, f"{conns} connections, threads {threads}"
        time.sleep(0.01)


def assert_honest_pair_chats(addr: tuple[str, int]) -> None:
    """Two honest clients: say is delivered, who is answered, leave is announced."""
    alice, _ = connect_and_join(*addr, "alice")
    bob, _ = connect_and_join(*addr, "bob")
    with alice, bob:
        assert alice.recv(5) == {"type": "joined", "name": "bob", "identity": None}
        alice.send({"type": "say", "text": "still works"})
        got = bob.recv(5)
        assert (got["type"], got["from"], got["text"]) == ("message", "alice", "still works")
        bob.send({"type": "who"})
        assert bob.recv(5) == {"type": "users", "names": ["alice", "bob"]}
        bob.send({"type": "leave"})
        assert bob.wait_closed(PROMPT_S) == [{"type": "bye", "reason": "leave"}]
        assert alice.recv(5) == {"type": "left", "name": "bob", "reason": "leave"}


@pytest.fixture
def fuzz_server(run_server) -> Iterator[Any]:
    """One server for a whole fuzz run; afterwards honest clients chat and threads settle."""
    with run_server(rate=0, handshake_timeout=5.0, idle_timeout=30.0) as srv:
        wait_settled(srv)
        yield srv
        wait_settled(srv)
        assert_honest_pair_chats(srv.address)
        wait_settled(srv)


# --- before the channel is up ---------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
b64ish = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/=\n -_", max_size=60)
key_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["key", "hello", "Key", ""]) | st.text(max_size=5),
        "nonce": b64ish | json_values,
        "secret": b64ish | json_values,
        "eph": b64ish | json_values,
    },
)


@st.composite
def first_bytes(draw: st.DrawFn) -> bytes:
    """What a misbehaving client might send first: noise, frames of noise, key-like JSON."""
    kind = draw(st.sampled_from(["noise", "frame", "key-like", "length"]))
    if kind == "noise":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "frame":
        return frame(draw(st.binary(min_size=1, max_size=300)))
    if kind == "key-like":
        return frame(json.dumps(draw(key_like)).encode())
    return draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") + draw(st.binary(max_size=20))


def test_fuzz_first_bytes_are_refused_silently(fuzz_server) -> None:
    """§1/§2: random first bytes never get a reply after `hello`; the connection just ends."""
    addr = fuzz_server.address

    @FUZZ
    @given(data=first_bytes())
    def check(data: bytes) -> None:
        sock = socket.create_connection(addr, timeout=5.0)
        with sock:
            assert json.loads(read_plain_frame(sock))["type"] == "hello"
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # an incomplete frame then ends at EOF
            except OSError:
                pass  # already closed by the server: fine
            assert read_until_closed(sock, PROMPT_S) == b""

    check()


# --- after the channel is up ----------------------------------------------------------------------

message_types = st.sampled_from(["join", "say", "dm", "who", "ping", "leave", "nope", ""])
messages = st.builds(
    lambda kind, extra: {**extra, "type": kind},
    message_types | st.text(max_size=6),
    st.dictionaries(st.sampled_from(["name", "text", "to", "id", "x"]), json_values, max_size=3),
)
plaintexts = st.one_of(
    st.lists(messages, min_size=1, max_size=4).map(encode_messages),  # valid records
    json_values.map(lambda v: json.dumps(v).encode()),  # JSON, rarely a record
    st.binary(max_size=200),  # noise
)


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[str, Any]:
    """A bit flip, a truncation, or a plaintext sealed correctly."""
    kind = draw(st.sampled_from(["flip", "truncate", "plaintext"]))
    if kind == "flip":
        return kind, (draw(st.integers(0, 10_000)), draw(st.integers(0, 7)))
    if kind == "truncate":
        return kind, draw(st.integers(1, 10_000))
    return kind, draw(plaintexts)


def _expected_close(plaintext: bytes) -> str | None:
    """How the server must end after this plaintext: "protocol", "leave" or None (stays)."""
    try:
        msgs = parse_record_plaintext(plaintext)
    except RefError:
        return "protocol"
    if any(m["type"] == "leave" for m in msgs):
        return "leave"
    return None


PRESENCE = ("joined", "left")


def without_presence(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop news of other clients coming and going: the fuzz clients of earlier examples
    leave while later ones run, and their `left` may reach whoever has joined by then."""
    return [m for m in msgs if m.get("type") not in PRESENCE]


def recv_not_presence(peer: RefPeer, timeout: float) -> dict[str, Any]:
    """The next message that is not presence news (see `without_presence`)."""
    while True:
        msg = peer.recv(timeout)
        if msg.get("type") not in PRESENCE:
            return msg


def test_fuzz_records_after_handshake(fuzz_server) -> None:
    """§3: corrupted records close silently; bad plaintexts get bye(protocol); others answered."""
    addr = fuzz_server.address

    @FUZZ
    @given(valid_before=st.integers(0, 2), corruption=corruptions())
    def check(valid_before: int, corruption: tuple[str, Any]) -> None:
        sock = socket.create_connection(addr, timeout=5.0)
        hello = json.loads(read_plain_frame(sock))
        key_msg, k_c2s, k_s2c = make_key_message(hello)
        with RefPeer(sock, hello, k_c2s, k_s2c, 5.0) as peer:
            peer.send_raw(frame(encode_json(key_msg)))
            peer.send({"type": "join", "name": next(NAMES)})
            assert peer.recv(5)["type"] == "welcome"
            for i in range(valid_before):
                peer.send({"type": "ping", "id": i})
                assert recv_not_presence(peer, 5) == {"type": "pong", "id": i}
            kind, arg = corruption
            if kind == "plaintext":
                peer.send_plaintext(arg)
                ending = _expected_close(arg)
                if ending is None:
                    peer.send({"type": "ping", "id": "after"})
                    got = []
                    while {"type": "pong", "id": "after"} not in got:
                        got.append(peer.recv(5))
                    assert all(m["type"] != "bye" for m in got), got
                else:
                    got = without_presence(peer.wait_closed(PROMPT_S))
                    assert got[-1] == {"type": "bye", "reason": ending}, got
                    if ending == "protocol":
                        assert got == [{"type": "bye", "reason": "protocol"}]  # nothing ran
                return
            record = RefRecordCipher(k_c2s, seq=peer.send_seq).seal(
                encode_messages([{"type": "ping", "id": "corrupted"}])
            )
            if kind == "flip":
                offset, bit = arg
                offset %= len(record)
                record = (
                    record[:offset] + bytes([record[offset] ^ (1 << bit)]) + record[offset + 1 :]
                )
            else:
                record = record[: arg % len(record) or 1]
            peer.send_raw(frame(record))
            # §3: no bye after a record that fails
            assert without_presence(peer.wait_closed(PROMPT_S)) == []

    check()


def test_fuzz_split_writes_of_a_good_session(fuzz_server) -> None:
    """§1: frames split across any TCP reads (or merged into one) are read the same."""
    addr = fuzz_server.address

    @FUZZ
    @given(cuts=st.lists(st.integers(1, 600), max_size=12))
    def check(cuts: list[int]) -> None:
        sock = socket.create_connection(addr, timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = json.loads(read_plain_frame(sock))
        key_msg, k_c2s, k_s2c = make_key_message(hello)
        c2s = RefRecordCipher(k_c2s)
        name = next(NAMES)
        data = frame(encode_json(key_msg))
        data += frame(c2s.seal(encode_messages([{"type": "join", "name": name}])))
        data += frame(c2s.seal(encode_messages([{"type": "ping", "id": name}])))
        with RefPeer(sock, hello, k_c2s, k_s2c, 5.0) as peer:
            at = 0
            for cut in cuts:
                sock.sendall(data[at : at + cut])
                at += cut
            sock.sendall(data[at:])
            assert peer.recv(5)["type"] == "welcome"
            assert peer.recv_until("pong", 5)[0] == {"type": "pong", "id": name}

    check()


def test_fuzz_server_survives_noise_then_serves(fuzz_server) -> None:
    """§1-§3: after a burst of random connections in parallel, the server is still whole."""
    addr = fuzz_server.address

    def noisy(seed: int) -> None:
        rnd = os.urandom(64 + seed)
        try:
            sock = socket.create_connection(addr, timeout=5.0)
            with sock:
                sock.sendall(rnd)
                read_until_closed(sock, PROMPT_S)
        except OSError:
            pass

    threads = [threading.Thread(target=noisy, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)
