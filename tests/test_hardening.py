"""Limits and bad input: the live server against raw-socket peers that misbehave.

Each test names the PROTOCOL.md rule it checks. Timeouts are short overrides
(`UNIT`), never the 10 s / 120 s defaults; waits are deadlines, not sleeps.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from netutil import LONG_S, PROMPT_S, UNIT_S, read_until_closed
from refpeer import (
    PeerClosed,
    RefPeer,
    RefRecordCipher,
    connect_and_join,
    encode_json,
    encode_messages,
    frame,
    make_key_message,
    read_plain_frame,
)

import server

UNIT = UNIT_S
LONG = LONG_S
MAX_RECORD = server.MAX_RECORD_BYTES  # §1: R, the server's inclusive record limit (announced)
TAG = 16  # §3: GCM tag bytes
# The connect and join lines of a peer; the others about it are counted (one per departure).
CONNECT_OR_JOIN = r"\bconnect(ed|ion)? from\b|\bjoin"


# --- helpers: raw peers ---------------------------------------------------------------------------


def open_raw(
    addr: tuple[str, int], *, rcvbuf: int | None = None
) -> tuple[socket.socket, dict[str, Any]]:
    """A TCP connection that has read the plaintext `hello` (or `server_full`) and nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5.0)
    sock.connect(addr)
    return sock, json.loads(read_plain_frame(sock))


def keyed(
    addr: tuple[str, int], *, rcvbuf: int | None = None, timeout: float = 5.0
) -> tuple[RefPeer, bytes]:
    """A connection that sent a good `key`; returns the peer and k_c2s (for forging records)."""
    sock, hello = open_raw(addr, rcvbuf=rcvbuf)
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    peer = RefPeer(sock, hello, k_c2s, k_s2c, timeout)
    peer.send_raw(frame(encode_json(key_msg)))
    return peer, k_c2s


def join_keyed(addr: tuple[str, int], name: str, **kw: Any) -> tuple[RefPeer, bytes]:
    """`keyed`, then a successful `join`."""
    peer, k_c2s = keyed(addr, **kw)
    peer.send({"type": "join", "name": name})
    welcome = peer.recv()
    assert welcome["type"] == "welcome", welcome
    return peer, k_c2s


def assert_pong(peer: RefPeer, ping_id: Any = "alive") -> None:
    """The connection is open and answered in order: the next message is our pong."""
    peer.send({"type": "ping", "id": ping_id})
    assert peer.recv(5) == {"type": "pong", "id": ping_id}


def assert_server_healthy(addr: tuple[str, int], observer: RefPeer) -> None:
    """An existing client saw nothing and still gets answers; a newcomer can join and chat."""
    assert_pong(observer, "still here")
    newcomer, _ = connect_and_join(*addr, "newcomer")
    with newcomer:
        assert observer.recv(5) == {"type": "joined", "name": "newcomer", "identity": None}
        newcomer.send({"type": "say", "text": "after the bad peer"})
        got = observer.recv(5)
        assert (got["type"], got["text"]) == ("message", "after the bad peer")
        newcomer.send({"type": "leave"})
        assert observer.recv(5) == {"type": "left", "name": "newcomer", "reason": "leave"}


def server_public_key(hello: dict[str, Any]) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(base64.b64decode(hello["key"]))
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def oaep(hash_: hashes.HashAlgorithm) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def non_canonical(b64_text: str) -> str:
    """The same bytes with a stray bit set in the last character before the padding."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = b64_text.rstrip("=")
    pad = b64_text[len(body) :]
    assert pad, "needs padding to have stray bits"
    last = alphabet.index(body[-1])
    return body[:-1] + alphabet[last | 1] + pad


# --- §1/§2: bad input before the channel is up ----------------------------------------------------


def _key_body(hello: dict[str, Any], **changes: Any) -> bytes:
    """A correct `key` frame body with some fields replaced (None removes a field)."""
    key_msg, _, _ = make_key_message(hello)
    for field, value in changes.items():
        if value is None:
            key_msg.pop(field, None)
        else:
            key_msg[field] = value
    return encode_json(key_msg)


def _wrapped(hello: dict[str, Any], secret: bytes, hash_: Any = None) -> str:
    return b64(server_public_key(hello).encrypt(secret, oaep(hash_ or hashes.SHA256())))


def _other_key_secret(hello: dict[str, Any]) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return b64(other.public_key().encrypt(os.urandom(32), oaep(hashes.SHA256())))


# name -> builder(hello) -> bytes written after reading hello
BAD_FIRST_BYTES: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "length 0": lambda h: b"\x00\x00\x00\x00",
    "length 8193, header only": lambda h: (8193).to_bytes(4, "big"),
    "length 0xFFFFFFFF, header only": lambda h: b"\xff\xff\xff\xff",
    "not JSON": lambda h: frame(b"this is not json"),
    "not UTF-8": lambda h: frame(b'{"type":"key","nonce":"\xff\xfe"}'),
    "JSON array": lambda h: frame(b"[]"),
    "JSON NaN": lambda h: frame(_key_body(h, extra=1).replace(b'"extra":1', b'"extra":NaN')),
    "type hello": lambda h: frame(_key_body(h, type="hello")),
    "no type": lambda h: frame(_key_body(h, type=None)),
    "no eph": lambda h: frame(_key_body(h, eph=None)),
    "nonce not a string": lambda h: frame(_key_body(h, nonce=5)),
    "nonce bad base64 char": lambda h: frame(_key_body(h, nonce="!" + b64(bytes(32))[1:])),
    "nonce base64 without padding": lambda h: frame(_key_body(h, nonce=b64(bytes(32))[:-1])),
    "nonce base64 with newline": lambda h: frame(
        _key_body(h, nonce=b64(bytes(32))[:20] + "\n" + b64(bytes(32))[20:])
    ),
    "nonce base64 non-canonical": lambda h: frame(
        _key_body(h, nonce=non_canonical(b64(os.urandom(32))))
    ),
    "nonce 31 bytes": lambda h: frame(_key_body(h, nonce=b64(os.urandom(31)))),
    "nonce 33 bytes": lambda h: frame(_key_body(h, nonce=b64(os.urandom(33)))),
    "eph 31 bytes": lambda h: frame(_key_body(h, eph=b64(os.urandom(31)))),
    "eph empty": lambda h: frame(_key_body(h, eph="")),
    "secret empty": lambda h: frame(_key_body(h, secret="")),
    "secret 255 bytes": lambda h: frame(_key_body(h, secret=b64(os.urandom(255)))),
    "secret random 256 bytes": lambda h: frame(_key_body(h, secret=b64(os.urandom(256)))),
    "secret decrypts to 16 bytes": lambda h: frame(
        _key_body(h, secret=_wrapped(h, os.urandom(16)))
    ),
    "secret decrypts to 33 bytes": lambda h: frame(
        _key_body(h, secret=_wrapped(h, os.urandom(33)))
    ),
    "secret under OAEP-SHA1": lambda h: frame(
        _key_body(h, secret=_wrapped(h, os.urandom(32), hashes.SHA1()))
    ),
    "secret under another key": lambda h: frame(_key_body(h, secret=_other_key_secret(h))),
    "eph all zeros (low order)": lambda h: frame(_key_body(h, eph=b64(bytes(32)))),
    "eph u=1 (low order)": lambda h: frame(_key_body(h, eph=b64(b"\x01" + bytes(31)))),
}


@pytest.mark.parametrize("case", list(BAD_FIRST_BYTES))
def test_bad_key_frame_closed_silently(run_server, case: str) -> None:
    """§1/§2: a bad length or a bad `key` closes the connection promptly without a reply."""
    with run_server(handshake_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            sock, hello = open_raw(srv.address)
            with sock:
                assert hello["type"] == "hello"
                sock.sendall(BAD_FIRST_BYTES[case](hello))
                assert read_until_closed(sock, PROMPT_S) == b""
            assert_server_healthy(srv.address, alice)


def test_huge_length_prefix_costs_no_memory_and_no_wait(run_server) -> None:
    """§1: a 0xFFFFFFFF length is refused at its 4 bytes: no 4 GiB buffer, no wait for a body."""
    with run_server(handshake_timeout=LONG) as srv:
        sock, _ = open_raw(srv.address)
        with sock:
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                start = time.monotonic()
                sock.sendall(b"\xff\xff\xff\xff" + b"x" * 1000)
                read_until_closed(sock, PROMPT_S)
                elapsed = time.monotonic() - start
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert elapsed < 1.0
        assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated for a refused frame"


def test_key_frame_of_exactly_8192_bytes_accepted(run_server) -> None:
    """§1/§2: handshake bounds are inclusive and unknown `key` fields are ignored."""
    with run_server() as srv:
        sock, hello = open_raw(srv.address)
        key_msg, k_c2s, k_s2c = make_key_message(hello)
        key_msg["padding"] = ""
        key_msg["padding"] = "p" * (8192 - len(encode_json(key_msg)))
        body = encode_json(key_msg)
        assert len(body) == 8192
        with RefPeer(sock, hello, k_c2s, k_s2c, 5.0) as peer:
            peer.send_raw(frame(body))
            peer.send({"type": "join", "name": "padded"})
            assert peer.recv()["type"] == "welcome"


# --- §3: bad records after the channel is up ------------------------------------------------------


def _forge(k_c2s: bytes, seq: int, msgs: list[dict[str, Any]]) -> bytes:
    return RefRecordCipher(k_c2s, seq=seq).seal(encode_messages(msgs))


PING = [{"type": "ping", "id": 1}]

# name -> builder(k_c2s, next_seq) -> bytes to write; each must fail to open at the server
UNOPENABLE: dict[str, Callable[[bytes, int], bytes]] = {
    "tampered": lambda k, n: frame(bytes([_forge(k, n, PING)[0] ^ 1]) + _forge(k, n, PING)[1:]),
    "tampered tag": lambda k, n: frame(
        _forge(k, n, PING)[:-1] + bytes([_forge(k, n, PING)[-1] ^ 0x80])
    ),
    "replayed": lambda k, n: frame(_forge(k, n - 1, [{"type": "join", "name": "mallory"}])),
    "reordered": lambda k, n: frame(_forge(k, n + 1, PING)) + frame(_forge(k, n, PING)),
    "skipped": lambda k, n: frame(_forge(k, n + 1, PING)) + frame(_forge(k, n + 2, PING)),
    "wrong key": lambda k, n: frame(_forge(os.urandom(32), n, PING)),
    "shorter than a tag": lambda k, n: frame(os.urandom(TAG - 1)),
    "truncated": lambda k, n: frame(_forge(k, n, PING)[:-3]),
}


@pytest.mark.parametrize("case", list(UNOPENABLE))
def test_record_that_fails_to_open_closes_without_bye(run_server, case: str) -> None:
    """§3: a record that fails to open closes at once, no `bye`; others see left(protocol)."""
    with run_server(handshake_timeout=LONG, idle_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            mallory, k_c2s = join_keyed(srv.address, "mallory")
            with mallory:
                assert alice.recv(5) == {"type": "joined", "name": "mallory", "identity": None}
                mallory.send_raw(UNOPENABLE[case](k_c2s, mallory.send_seq))
                assert mallory.wait_closed(PROMPT_S) == []
            assert alice.recv(5) == {"type": "left", "name": "mallory", "reason": "protocol"}
            assert_server_healthy(srv.address, alice)


NOT_A_RECORD: dict[str, bytes] = {
    "empty plaintext": b"",
    "not UTF-8": b'[{"type":"ping","id":"\xff"}]',
    "not JSON": b"[{",
    "JSON NaN": b'[{"type":"ping","id":NaN}]',
    "object": b'{"type":"ping"}',
    "string": b'"ping"',
    "empty array": b"[]",
    "array of number": b"[1]",
    "object without type": b'[{"id":1}]',
    "type not a string": b'[{"type":1}]',
    "type null": b'[{"type":null}]',
    "good then bad element": b'[{"type":"say","text":"must not be delivered"},5]',
    "ping then bad element": b'[{"type":"ping","id":1},[]]',
}


@pytest.mark.parametrize("case", list(NOT_A_RECORD))
def test_record_not_an_array_of_messages_is_bye_protocol(run_server, case: str) -> None:
    """§3: a plaintext that is not a JSON array of typed objects: bye(protocol), nothing run."""
    with run_server(handshake_timeout=LONG, idle_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            mallory, _ = connect_and_join(*srv.address, "mallory")
            with mallory:
                assert alice.recv(5) == {"type": "joined", "name": "mallory", "identity": None}
                mallory.send_plaintext(NOT_A_RECORD[case])
                assert mallory.wait_closed(PROMPT_S) == [{"type": "bye", "reason": "protocol"}]
            # none of its messages ran: the next thing alice hears is the departure
            assert alice.recv(5) == {"type": "left", "name": "mallory", "reason": "protocol"}
            assert_server_healthy(srv.address, alice)


LONG_TEXT = "x" * 16385
BAD_FIELDS: list[tuple[str, bytes, str]] = [
    ("unknown type", b'{"type":"shout","text":"hi"}', "bad_message"),
    ("say without text", b'{"type":"say"}', "bad_message"),
    ("say text number", b'{"type":"say","text":5}', "bad_message"),
    ("say text null", b'{"type":"say","text":null}', "bad_message"),
    ("say text empty", b'{"type":"say","text":""}', "bad_message"),
    ("say text NUL", b'{"type":"say","text":"a\\u0000b"}', "bad_message"),
    ("say text ESC", b'{"type":"say","text":"a\\u001bb"}', "bad_message"),
    ("say text CR", b'{"type":"say","text":"a\\rb"}', "bad_message"),
    ("say text DEL", b'{"type":"say","text":"a\\u007fb"}', "bad_message"),
    ("say text C1", b'{"type":"say","text":"a\\u0085b"}', "bad_message"),
    ("say text lone surrogate", b'{"type":"say","text":"a\\ud800b"}', "bad_message"),
    ("say text too long", b'{"type":"say","text":"%s"}' % LONG_TEXT.encode(), "too_long"),
    (
        "say text too long in UTF-8",
        ('{"type":"say","text":"%s"}' % ("é" * 8193)).encode(),
        "too_long",
    ),
    ("dm without to", b'{"type":"dm","text":"hi"}', "bad_message"),
    ("dm to number", b'{"type":"dm","to":5,"text":"hi"}', "bad_message"),
    ("dm unknown user", b'{"type":"dm","to":"nobody","text":"hi"}', "unknown_user"),
    ("dm text empty", b'{"type":"dm","to":"bob","text":""}', "bad_message"),
    ("second join", b'{"type":"join","name":"other"}', "already_joined"),
]


@pytest.mark.parametrize(("case", "message", "code"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_is_error_and_connection_stays(
    run_server, case: str, message: bytes, code: str
) -> None:
    """§4: a refused message gets `error` with its code, reaches no one; the connection stays."""
    with run_server(handshake_timeout=LONG, idle_timeout=LONG, rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        with bob:
            alice, _ = connect_and_join(*srv.address, "alice")
            with alice:
                assert bob.recv(5) == {"type": "joined", "name": "alice", "identity": None}
                alice.send_plaintext(b"[" + message + b"]")
                reply = alice.recv(5)
                assert (reply["type"], reply["code"]) == ("error", code), reply
                assert isinstance(reply["message"], str)
                assert_pong(alice)
                alice.send({"type": "say", "text": "fine"})
                got = bob.recv(5)
                assert (got["type"], got["text"]) == ("message", "fine"), got


BAD_BEFORE_JOIN: list[tuple[str, dict[str, Any], str]] = [
    ("say before join", {"type": "say", "text": "hi"}, "not_joined"),
    ("dm before join", {"type": "dm", "to": "x", "text": "hi"}, "not_joined"),
    ("who before join", {"type": "who"}, "not_joined"),
    ("join without name", {"type": "join"}, "bad_message"),
    ("join name number", {"type": "join", "name": 7}, "bad_message"),
    ("join name empty", {"type": "join", "name": ""}, "invalid_name"),
    ("join name 33 chars", {"type": "join", "name": "a" * 33}, "invalid_name"),
    ("join name mixed scripts", {"type": "join", "name": "\u0430lice"}, "invalid_name"),
    ("join name with space", {"type": "join", "name": "a b"}, "invalid_name"),
    ("join name starting with _", {"type": "join", "name": "_a"}, "invalid_name"),
    ("join name taken", {"type": "join", "name": "BOB"}, "name_taken"),
]


@pytest.mark.parametrize(
    ("case", "message", "code"), BAD_BEFORE_JOIN, ids=[c[0] for c in BAD_BEFORE_JOIN]
)
def test_refused_before_join_then_join_works(
    run_server, case: str, message: dict[str, Any], code: str
) -> None:
    """§4: before `join`, refusals are `error`s and a later `join` on the same connection works."""
    with run_server(handshake_timeout=LONG) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        with bob:
            peer, _ = keyed(srv.address)
            with peer:
                peer.send(message)
                reply = peer.recv(5)
                assert (reply["type"], reply["code"]) == ("error", code), reply
                assert_pong(peer)
                peer.send({"type": "join", "name": "carol"})
                assert peer.recv(5)["type"] == "welcome"
                assert bob.recv(5) == {"type": "joined", "name": "carol", "identity": None}


@pytest.mark.parametrize("length", [0, MAX_RECORD + 1, 0xFFFFFFFF])
def test_bad_record_length_closes(run_server, length: int) -> None:
    """§1: after `key`, a length of 0 or over R closes (bye protocol optional); left(protocol)."""
    with run_server(handshake_timeout=LONG, idle_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            mallory, _ = connect_and_join(*srv.address, "mallory")
            with mallory:
                assert alice.recv(5) == {"type": "joined", "name": "mallory", "identity": None}
                mallory.send_raw(length.to_bytes(4, "big"))  # the header alone must suffice
                assert mallory.wait_closed(PROMPT_S) in (
                    [],
                    [{"type": "bye", "reason": "protocol"}],
                )
            assert alice.recv(5) == {"type": "left", "name": "mallory", "reason": "protocol"}
            assert_server_healthy(srv.address, alice)


def test_record_of_exactly_r_bytes_accepted(run_server) -> None:
    """§1: the record bound is inclusive: a record of exactly R bytes is read and answered."""
    with run_server(handshake_timeout=LONG, idle_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice", timeout=10.0)
        with alice:
            head, tail = b'[{"type":"ping","id":"', b'"}]'
            plaintext = head + b"a" * (MAX_RECORD - TAG - len(head) - len(tail)) + tail
            alice.send_plaintext(plaintext)
            assert alice.send_seq == 2
            reply = alice.recv(10)
            # the echo cannot fit in a record the client accepts: a pong or an error will do
            assert reply["type"] in ("pong", "error"), reply["type"]
            if reply["type"] == "pong":
                assert reply["id"] == plaintext[len(head) : -len(tail)].decode()
            assert_pong(alice, 2)


# --- §4 timeouts ----------------------------------------------------------------------------------


def test_handshake_timeout_closes_silent_connection(run_server) -> None:
    """§4: a connection that sends nothing is closed after handshake_timeout, without a reply."""
    with run_server(handshake_timeout=UNIT) as srv:
        sock, _ = open_raw(srv.address)
        start = time.monotonic()
        with sock:
            assert read_until_closed(sock, UNIT + PROMPT_S) == b""
        assert time.monotonic() - start >= UNIT * 0.8


def test_handshake_timeout_not_extended_by_slowloris(run_server) -> None:
    """§4: the handshake deadline counts from accept: one byte at a time does not extend it."""
    with run_server(handshake_timeout=UNIT) as srv:
        sock, hello = open_raw(srv.address)
        start = time.monotonic()
        data = frame(_key_body(hello))
        received = b""
        closed = False
        with sock:
            for i in range(len(data)):
                if time.monotonic() - start > UNIT + PROMPT_S:
                    break
                readable, _, _ = select.select([sock], [], [], UNIT / 10)
                if readable:
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    received += chunk
                    if not chunk:
                        closed = True
                        break
                try:
                    sock.send(data[i : i + 1])
                except OSError:
                    closed = True
                    break
        elapsed = time.monotonic() - start
        assert closed, f"a slowloris was still connected after {elapsed:.1f} s"
        assert received == b""
        assert UNIT * 0.8 <= elapsed <= UNIT + PROMPT_S


def test_handshake_timeout_after_key_sends_bye_timeout(run_server) -> None:
    """§4: a connection that sent `key` but never joined gets bye(timeout), then close."""
    with run_server(handshake_timeout=UNIT) as srv:
        peer, _ = keyed(srv.address)
        start = time.monotonic()
        with peer:
            assert peer.wait_closed(UNIT + PROMPT_S) == [{"type": "bye", "reason": "timeout"}]
        assert time.monotonic() - start >= UNIT * 0.8


def test_handshake_timeout_not_extended_by_pings(run_server) -> None:
    """§4: pings before `join` are answered but do not extend the handshake deadline."""
    with run_server(handshake_timeout=UNIT) as srv:
        peer, _ = keyed(srv.address)
        deadline = time.monotonic() + UNIT + PROMPT_S
        got: list[dict[str, Any]] = []
        with peer:
            while not got or got[-1]["type"] != "bye":
                assert time.monotonic() < deadline, f"not closed; got {got}"
                try:
                    peer.send({"type": "ping", "id": len(got)})
                    got.append(peer.recv(UNIT))
                except (TimeoutError, OSError):
                    break
            assert got[-1] == {"type": "bye", "reason": "timeout"}
            assert all(m["type"] == "pong" for m in got[:-1])
            assert peer.wait_closed(PROMPT_S) == []


def test_idle_timeout_drops_silent_joined_client(run_server) -> None:
    """§4: a joined client silent for idle_timeout gets bye(timeout); others see left(timeout)."""
    with run_server(idle_timeout=UNIT, handshake_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            bob, _ = connect_and_join(*srv.address, "bob")
            start = time.monotonic()
            with bob:
                # alice keeps talking (pings), so only bob is idle
                deadline = start + UNIT + PROMPT_S
                left = {"type": "left", "name": "bob", "reason": "timeout"}
                seen: list[dict[str, Any]] = []
                while left not in seen:
                    assert time.monotonic() < deadline, f"bob not dropped; alice saw {seen}"
                    alice.send({"type": "ping"})
                    seen.extend(alice.recv_until("pong", 5)[1])
                    select.select([alice.sock], [], [], UNIT / 5)  # pace, waking on news
                assert time.monotonic() - start >= UNIT * 0.8
                assert bob.wait_closed(PROMPT_S) == [{"type": "bye", "reason": "timeout"}]
            assert seen == [
                {"type": "joined", "name": "bob", "identity": None},
                {"type": "left", "name": "bob", "reason": "timeout"},
            ]
            assert_pong(alice)  # pinging kept alice alive


# --- §2 max_clients -------------------------------------------------------------------------------


def test_max_clients_refuses_one_more_with_server_full(run_server) -> None:
    """§2: past max_clients connections (joined or not) one more gets `server_full` and close."""
    with run_server(max_clients=2, handshake_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")  # joined: counts
        with alice:
            idle, hello = open_raw(srv.address)  # not even keyed: counts too
            assert hello["type"] == "hello"
            with idle:
                extra, refusal = open_raw(srv.address)
                with extra:
                    assert refusal["type"] == "error"
                    assert refusal["code"] == "server_full"
                    assert isinstance(refusal["message"], str)
                    assert read_until_closed(extra, PROMPT_S) == b""
                assert_pong(alice)
            # a freed slot is usable again (the server notices the close within a deadline)
            deadline = time.monotonic() + PROMPT_S
            while True:
                sock, hello = open_raw(srv.address)
                sock.close()
                if hello["type"] == "hello":
                    break
                assert time.monotonic() < deadline, "a closed connection still counts"


# --- §4 rate limit --------------------------------------------------------------------------------


def test_rate_limit_refuses_and_does_not_deliver(run_server) -> None:
    """§4: past `rate` say/dm/who the excess gets rate_limited and is delivered to no one."""
    with run_server(rate=3, handshake_timeout=LONG, idle_timeout=LONG) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        with bob:
            alice, welcome = connect_and_join(*srv.address, "alice")
            with alice:
                assert welcome["rate"] == 3
                assert bob.recv(5) == {"type": "joined", "name": "alice", "identity": None}
                alice.send(
                    {"type": "say", "text": "s0"},
                    {"type": "dm", "to": "bob", "text": "d1"},
                    {"type": "say", "text": "s2"},
                    {"type": "say", "text": "s3"},
                    {"type": "dm", "to": "bob", "text": "d4"},
                    {"type": "who"},  # counted since revision 2
                    {"type": "ping", "id": "p"},  # not counted
                )
                for _ in range(3):
                    reply = alice.recv(5)
                    assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply
                assert alice.recv(5) == {"type": "pong", "id": "p"}
                # alice's record is fully processed; bob's pong is ordered after it
                bob.send({"type": "ping", "id": "sync"})
                got = [bob.recv(5) for _ in range(4)]
                assert [m.get("text") for m in got[:3]] == ["s0", "d1", "s2"]
                assert got[3] == {"type": "pong", "id": "sync"}
                # the bucket refills at `rate` tokens per second
                time.sleep(0.4)
                alice.send({"type": "say", "text": "later"})
                got = bob.recv(5)
                assert (got["type"], got["text"]) == ("message", "later")


# --- §4 slow consumers ----------------------------------------------------------------------------


class Reader(threading.Thread):
    """Reads a peer's records in the background, noting when each one arrived."""

    def __init__(self, peer: RefPeer, until: Callable[[dict[str, Any]], bool], name: str):
        super().__init__(daemon=True, name=f"test reader {name}")
        self.peer = peer
        self.until = until
        self.msgs: list[dict[str, Any]] = []
        self.stamps: list[float] = []
        self.error: BaseException | None = None
        self.changed = threading.Condition()  # guards msgs, stamps, error

    def run(self) -> None:
        try:
            while True:
                batch = self.peer.recv_record(15)
                with self.changed:
                    self.stamps.append(time.monotonic())
                    self.msgs.extend(batch)
                    self.changed.notify_all()
                if any(self.until(m) for m in batch):
                    return
        except BaseException as exc:  # reported by the test
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: self.error is not None or predicate(self.msgs), timeout
            )
        assert self.error is None, f"{self.peer_name()} failed: {self.error!r}"
        assert ok, (
            f"{self.peer_name()} did not get what was expected within {timeout} s; "
            f"last: {[str(m)[:80] for m in self.msgs[-3:]]}, alive: {self.is_alive()}"
        )

    def peer_name(self) -> str:
        return self.name


LEFT_SLOW = {"type": "left", "name": "stalled", "reason": "slow"}
MAX_FLOOD_BYTES = 32 * 1024 * 1024  # give up: the server never dropped the stalled client
BATCH = 4  # messages alice sends before waiting for bob: bob's backlog stays under 64 KiB


def _count(msgs: list[dict[str, Any]], kind: str = "message") -> int:
    return sum(1 for m in msgs if m["type"] == kind)


def _flood(srv: Any, flood: str, *, text_bytes: int, timeout: float) -> tuple[Reader, Reader, int]:
    """alice and bob chat while `stalled` stops reading, until the server drops it.

    alice sends in batches and waits for bob to have each one: bob is an honest
    reader that keeps up, so only `stalled` may fall behind. Once bob sees
    left(slow), alice sends a few batches more. Returns both readers and the
    number of messages alice said (each numbered at the start of its text).
    """
    addr = srv.address
    alice, _ = connect_and_join(*addr, "alice", timeout=timeout)
    bob, _ = connect_and_join(*addr, "bob", timeout=timeout)
    assert alice.recv(5) == {"type": "joined", "name": "bob", "identity": None}
    stalled, _ = join_keyed(addr, "stalled", rcvbuf=4096)
    assert alice.recv(5) == {"type": "joined", "name": "stalled", "identity": None}
    assert bob.recv(5) == {"type": "joined", "name": "stalled", "identity": None}
    # from here on `stalled` never reads again

    def done(msg: dict[str, Any]) -> bool:
        return msg.get("type") == "message" and msg.get("text") == "the end"

    bob_reader = Reader(bob, done, "bob")
    alice_reader = Reader(alice, done, "alice")
    bob_reader.start()
    alice_reader.start()
    text = "y" * (text_bytes - 8)
    sent = 0
    extra = 2 * BATCH  # sent after the drop: the others go on as before
    try:
        while extra > 0:
            # the kernel buffers a few MiB for `stalled` before the server sees it lag
            assert sent < MAX_FLOOD_BYTES // text_bytes, f"stalled not dropped after {sent}"
            for _ in range(BATCH):
                if flood == "say":
                    alice.send({"type": "say", "text": f"{sent:07d} {text}"})
                elif flood == "dm":
                    alice.send({"type": "dm", "to": "stalled", "text": f"{sent:07d} {text}"})
                    alice.send({"type": "say", "text": f"{sent:07d} short"})
                else:  # the stalled client asks for its own pongs and never reads them
                    try:
                        stalled.send({"type": "ping", "id": f"{sent:07d} {text}"})
                    except (OSError, PeerClosed):
                        pass  # the server dropped it: what we wait for
                    alice.send({"type": "say", "text": f"{sent:07d} short"})
                sent += 1
            bob_reader.wait_for(lambda msgs, n=sent: _count(msgs) >= n, timeout)
            with bob_reader.changed:
                dropped = LEFT_SLOW in bob_reader.msgs
            if dropped:
                extra -= BATCH
        bob.send({"type": "say", "text": "the end"})
        alice.send({"type": "say", "text": "the end"})
        bob_reader.join(timeout)
        alice_reader.join(timeout)
    finally:
        for peer in (alice, bob, stalled):
            peer.close()
    assert bob_reader.error is None, bob_reader.error
    assert alice_reader.error is None, alice_reader.error
    return alice_reader, bob_reader, sent


def lines_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """INFO+ server log lines naming `name`, other than its connect and join lines."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bcast.server"
        and r.levelno >= logging.INFO
        and name in r.getMessage()
        and not re.search(CONNECT_OR_JOIN, r.getMessage(), re.IGNORECASE)
    ]


def _longest_gap(reader: Reader) -> float:
    """The longest wait between two records, from the first to the last."""
    stamps = reader.stamps
    return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)


@pytest.mark.parametrize("flood", ["say", "dm", "own pongs"])
def test_slow_consumer_dropped_others_keep_everything(run_server, flood: str) -> None:
    """§4: a client that stops reading is dropped as slow; the others lose and wait for nothing."""
    with run_server(max_pending=65536, send_timeout=UNIT, rate=0, idle_timeout=LONG) as srv:
        alice, bob, sent = _flood(srv, flood, text_bytes=8000, timeout=5.0)
    for reader in (alice, bob):
        assert reader.msgs.count(LEFT_SLOW) == 1, [m["type"] for m in reader.msgs]
    said = [m for m in bob.msgs if m["type"] == "message"]
    assert [m["text"][:7] for m in said] == [f"{i:07d}" for i in range(sent)] + ["the end"]
    ids = [m["id"] for m in said]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    if flood == "dm":
        refused = [m for m in alice.msgs if m["type"] == "error"]
        assert all(m["code"] == "unknown_user" for m in refused)  # after the drop, no one there
    assert _longest_gap(bob) < UNIT, "bob stalled longer than send_timeout"


@pytest.mark.parametrize("flood", ["say", "dm", "own pongs"])
def test_max_pending_alone_drops_slow_consumer(run_server, flood: str) -> None:
    """§4: past max_pending waiting bytes a client is dropped (slow) before any send times out."""
    with run_server(max_pending=65536, send_timeout=LONG, rate=0, idle_timeout=LONG) as srv:
        alice, bob, sent = _flood(srv, flood, text_bytes=8000, timeout=5.0)
    for reader in (alice, bob):
        assert reader.msgs.count(LEFT_SLOW) == 1, [m["type"] for m in reader.msgs]
    said = [m["text"][:7] for m in bob.msgs if m["type"] == "message"]
    assert said == [f"{i:07d}" for i in range(sent)] + ["the end"]


def test_send_timeout_drops_blocked_consumer(run_server) -> None:
    """§4: one send blocked past send_timeout drops that client (slow), even under max_pending."""
    send_timeout = 1.0
    with run_server(
        max_pending=64 * 1024 * 1024, send_timeout=send_timeout, rate=0, idle_timeout=LONG
    ) as srv:
        _, bob, sent = _flood(srv, "say", text_bytes=8000, timeout=5.0)
    assert bob.msgs.count(LEFT_SLOW) == 1
    said = [m["text"][:7] for m in bob.msgs if m["type"] == "message"]
    assert said == [f"{i:07d}" for i in range(sent)] + ["the end"]
    assert _longest_gap(bob) < send_timeout, "bob stalled as long as the slow one"


def test_slow_eviction_logged_once(run_server, caplog: pytest.LogCaptureFixture) -> None:
    """Issue logging: one eviction (slow) is one INFO line, however much the client still sends."""
    caplog.set_level(logging.INFO, logger="bcast.server")
    with run_server(max_pending=65536, send_timeout=LONG, rate=0, idle_timeout=LONG) as srv:
        alice, _ = connect_and_join(*srv.address, "alice")
        with alice:
            stalled, _ = join_keyed(srv.address, "stalled", rcvbuf=4096)
            with stalled:
                assert alice.recv(5) == {"type": "joined", "name": "stalled", "identity": None}
                # records of pings whose pongs it never reads (each record within R): once the
                # kernel buffers are full, a record takes it past max_pending with pings left
                pings = [{"type": "ping", "id": f"{i:03d} {'p' * 16000}"} for i in range(7)]
                for _ in range(MAX_FLOOD_BYTES // (7 * 16_000)):
                    try:
                        stalled.send(*pings)
                    except (OSError, PeerClosed):
                        break  # dropped
                    if select.select([alice.sock], [], [], 0)[0]:
                        break  # alice heard something: the `left`
                assert alice.recv(PROMPT_S) == LEFT_SLOW
            alice.send({"type": "who"})
            assert alice.recv(5) == {"type": "users", "names": ["alice"]}
    lines = lines_about(caplog, "stalled")
    assert len(lines) == 1, f"{len(lines)} lines for one eviction: {lines[:3]}"
