"""Self-checks of the independent reference peer (tests/refpeer.py) against PROTOCOL.md.

Crypto parts are checked against known answers or hand computations with the
standard library; the socket client against a scripted fake server on port 0.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import refpeer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from refpeer import (
    PeerClosed,
    RefError,
    RefPeer,
    RefRecordCipher,
    ServerFull,
    connect_and_join,
    derive_keys,
    fingerprint_of,
    frame,
    make_key_message,
    server_accept_key,
)

LOW_ORDER_POINTS = [bytes(32), (1).to_bytes(32, "little")]
UNIT_S = 0.05  # one unit of waiting in the socket tests


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def server_pem(ref_key: rsa.RSAPrivateKey) -> bytes:
    return ref_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def server_spki(ref_key: rsa.RSAPrivateKey) -> bytes:
    return ref_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def raw_public(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_hello(spki: bytes, nonce: bytes, eph_private: bytes) -> dict:
    return {
        "type": "hello",
        "protocol": "bcast/1",
        "key": b64(spki),
        "nonce": b64(nonce),
        "eph": b64(raw_public(eph_private)),
    }


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 by hand with hmac, independent of `cryptography`."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


class FakeServer:
    """Accepts one connection on port 0, sends `hello_body`, then is scripted by the test."""

    def __init__(self, pem: bytes, spki: bytes, hello_body: bytes | None = None):
        self.pem = pem
        self.spki = spki
        self.key_msg: dict = {}
        self.peer_addr: tuple = ()
        self.nonce = os.urandom(32)
        self.eph_private = os.urandom(32)
        hello = make_hello(spki, self.nonce, self.eph_private)
        self.hello_body = hello_body if hello_body is not None else refpeer.encode_json(hello)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns: queue.Queue[socket.socket] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, self.peer_addr = self.listener.accept()
        conn.sendall(frame(self.hello_body))
        self._conns.put(conn)

    def conn(self) -> socket.socket:
        conn = self._conns.get(timeout=5)
        conn.settimeout(5)
        return conn

    def session(self) -> tuple[socket.socket, RefRecordCipher, RefRecordCipher]:
        """Read `key`; return (conn, c2s cipher to open, s2c cipher to seal)."""
        conn = self.conn()
        key_msg = refpeer.parse_json_object(refpeer.read_plain_frame(conn))
        _, k_c2s, k_s2c = server_accept_key(self.pem, self.nonce, self.eph_private, key_msg)
        self.key_msg = key_msg
        return conn, RefRecordCipher(k_c2s), RefRecordCipher(k_s2c)

    def transcript(self) -> bytes:
        """§5 by hand: label || SHA256(SPKI) || server nonce || client nonce || both ephs."""
        return (
            b"bcast/1 identity"
            + hashlib.sha256(self.spki).digest()
            + self.nonce
            + base64.b64decode(self.key_msg["nonce"])
            + raw_public(self.eph_private)
            + base64.b64decode(self.key_msg["eph"])
        )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake(server_pem: bytes, server_spki: bytes) -> Iterator[FakeServer]:
    server = FakeServer(server_pem, server_spki)
    yield server
    server.close()


def sealed(s2c: RefRecordCipher, *msgs: dict) -> bytes:
    return frame(s2c.seal(json.dumps(list(msgs), separators=(",", ":")).encode()))


# --- §1 framing and §2 identity -----------------------------------------------------------------


def test_frame_is_u32be_length_prefix() -> None:
    """§1: a frame is u32be length L || L bytes of body."""
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"x" * 70000)[:4] == (70000).to_bytes(4, "big")


def test_fingerprint_known_answer() -> None:
    """§2 Server identity: "SHA256:" + base64-without-padding(SHA256(SPKI DER))."""
    # SHA256 of the empty string, in the OpenSSH form.
    assert fingerprint_of(b"") == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"


def test_fingerprint_matches_hand_computation(server_spki: bytes) -> None:
    """§2 Server identity: fingerprint of a real SPKI, computed with hashlib/base64."""
    digest = hashlib.sha256(server_spki).digest()
    expected = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert fingerprint_of(server_spki) == expected
    assert "=" not in fingerprint_of(server_spki) and len(fingerprint_of(server_spki)) == 50


# --- §2 session keys ----------------------------------------------------------------------------


def test_key_message_and_server_side_agree(server_pem: bytes, server_spki: bytes) -> None:
    """§2 Session keys: client and server derive the same (k_c2s, k_s2c)."""
    server_nonce, server_eph_private = os.urandom(32), os.urandom(32)
    hello = make_hello(server_spki, server_nonce, server_eph_private)
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    assert set(key_msg) == {"type", "nonce", "secret", "eph"} and key_msg["type"] == "key"
    secret, s_c2s, s_s2c = server_accept_key(server_pem, server_nonce, server_eph_private, key_msg)
    assert len(secret) == 32
    assert (s_c2s, s_s2c) == (k_c2s, k_s2c)
    assert k_c2s != k_s2c and len(k_c2s) == len(k_s2c) == 32


def test_injected_values_are_used(server_pem: bytes, server_spki: bytes) -> None:
    """§2 key: nonce, secret and eph carry the client's values; keys follow from them."""
    server_nonce, server_eph_private = os.urandom(32), os.urandom(32)
    secret, client_nonce, eph_private = os.urandom(32), os.urandom(32), os.urandom(32)
    hello = make_hello(server_spki, server_nonce, server_eph_private)
    key_msg, k_c2s, k_s2c = make_key_message(
        hello, secret=secret, client_nonce=client_nonce, eph_private=eph_private
    )
    assert base64.b64decode(key_msg["nonce"]) == client_nonce
    assert base64.b64decode(key_msg["eph"]) == raw_public(eph_private)
    got = server_accept_key(server_pem, server_nonce, server_eph_private, key_msg)
    assert got == (secret, k_c2s, k_s2c)
    # Same inputs, fresh OAEP randomness: same keys.
    again = make_key_message(
        hello, secret=secret, client_nonce=client_nonce, eph_private=eph_private
    )
    assert again[0]["secret"] != key_msg["secret"] and again[1:] == (k_c2s, k_s2c)


def test_derive_keys_matches_hand_hkdf(server_spki: bytes) -> None:
    """§2 Session keys: ikm = secret||dh, salt = nonces, info = label||SHA256(SPKI)||ephs."""
    secret, dh, sn, cn, se, ce = (bytes([i]) * 32 for i in range(1, 7))
    info = b"bcast/1 keys" + hashlib.sha256(server_spki).digest() + se + ce
    okm = hkdf_sha256(secret + dh, sn + cn, info, 64)
    assert derive_keys(secret, dh, sn, cn, server_spki, se, ce) == (okm[:32], okm[32:])


def test_replayed_key_gives_new_keys(server_pem: bytes, server_spki: bytes) -> None:
    """§2: a recorded key frame replayed to another connection (fresh server nonce) fails."""
    server_eph_private = os.urandom(32)
    hello = make_hello(server_spki, os.urandom(32), server_eph_private)
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    _, r_c2s, r_s2c = server_accept_key(server_pem, os.urandom(32), server_eph_private, key_msg)
    assert r_c2s != k_c2s and r_s2c != k_s2c


def test_server_side_is_what_the_client_sent(server_pem: bytes, server_spki: bytes) -> None:
    """§2 key: RSA-OAEP with SHA-256 and MGF1-SHA-256, empty label, 32-byte secret."""
    server_nonce, server_eph_private = os.urandom(32), os.urandom(32)
    hello = make_hello(server_spki, server_nonce, server_eph_private)
    key_msg, _, _ = make_key_message(hello, secret=b"S" * 32)
    private = serialization.load_pem_private_key(server_pem, None)
    oaep = padding.OAEP(padding.MGF1(refpeer.hashes.SHA256()), refpeer.hashes.SHA256(), None)
    assert private.decrypt(base64.b64decode(key_msg["secret"]), oaep) == b"S" * 32


def _bad_hellos(spki: bytes) -> list[tuple[str, dict]]:
    good = make_hello(spki, os.urandom(32), os.urandom(32))
    ec_spki = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    small = (
        rsa.generate_private_key(65537, 1024)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cases = [
        ("type", {"type": "welcome"}),
        ("protocol", {"protocol": "bcast/2"}),
        ("missing protocol", {"protocol": None}),
        ("nonce 31 bytes", {"nonce": b64(b"n" * 31)}),
        ("eph 33 bytes", {"eph": b64(b"e" * 33)}),
        ("nonce not a string", {"nonce": 5}),
        ("nonce unpadded", {"nonce": b64(b"n" * 32).rstrip("=")}),
        ("nonce with newline", {"nonce": b64(b"n" * 32)[:20] + "\n" + b64(b"n" * 32)[20:]}),
        ("nonce url-safe", {"nonce": base64.urlsafe_b64encode(b"\xff" * 32).decode()}),
        ("key not DER", {"key": b64(b"not a key")}),
        ("key not RSA", {"key": b64(ec_spki)}),
        ("key under 2048 bits", {"key": b64(small)}),
        ("eph all zeros", {"eph": b64(LOW_ORDER_POINTS[0])}),
        ("eph low order", {"eph": b64(LOW_ORDER_POINTS[1])}),
    ]
    return [(name, {**good, **change}) for name, change in cases]


def test_bad_hello_is_refused(server_spki: bytes) -> None:
    """§2: a client closes on a bad hello (protocol, b64, sizes, RSA key, low-order eph)."""
    for name, hello in _bad_hellos(server_spki):
        with pytest.raises(RefError):
            make_key_message(hello)
            pytest.fail(f"accepted a hello with {name}")


def test_bad_key_is_refused(server_pem: bytes, server_spki: bytes) -> None:
    """§2: the server closes on a bad key (b64, sizes, secret not 32 bytes, low-order eph)."""
    server_nonce, server_eph_private = os.urandom(32), os.urandom(32)
    hello = make_hello(server_spki, server_nonce, server_eph_private)
    good, _, _ = make_key_message(hello)
    public = serialization.load_der_public_key(server_spki)
    oaep = padding.OAEP(padding.MGF1(refpeer.hashes.SHA256()), refpeer.hashes.SHA256(), None)
    sha1_oaep = padding.OAEP(padding.MGF1(refpeer.hashes.SHA1()), refpeer.hashes.SHA1(), None)
    cases = [
        {"type": "Key"},
        {"nonce": b64(b"n" * 33)},
        {"eph": b64(b"e" * 31)},
        {"secret": good["secret"] + "\n"},
        {"secret": b64(public.encrypt(b"s" * 31, oaep))},
        {"secret": b64(public.encrypt(b"s" * 33, oaep))},
        {"secret": b64(public.encrypt(b"s" * 32, sha1_oaep))},
        {"secret": b64(b"\x00" * 256)},
        {"eph": b64(LOW_ORDER_POINTS[0])},
        {"eph": b64(LOW_ORDER_POINTS[1])},
        {"eph": None},
    ]
    for change in cases:
        with pytest.raises(RefError):
            server_accept_key(server_pem, server_nonce, server_eph_private, {**good, **change})
            pytest.fail(f"accepted a key with {change}")
    # §2: unknown extra fields are ignored.
    server_accept_key(server_pem, server_nonce, server_eph_private, {**good, "extra": [1]})


# --- §3 records ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 2**32 - 2])
def test_seal_open_round_trip(seq: int) -> None:
    """§3: a record sealed at seq opens at seq, and both counters advance by one."""
    key = os.urandom(32)
    sender, receiver = RefRecordCipher(key, seq), RefRecordCipher(key, seq)
    record = sender.seal(b'[{"type":"ping"}]')
    assert len(record) == len(b'[{"type":"ping"}]') + 16
    assert receiver.open(record) == b'[{"type":"ping"}]'
    assert sender.seq == receiver.seq == seq + 1


@pytest.mark.parametrize("seq", [0, 1, 255, 2**32 - 2])
def test_nonce_layout_known_answer(seq: int) -> None:
    """§3: nonce = 0x00000000 || u64be(seq), no AAD, record = ciphertext || tag."""
    key = bytes(range(32))
    expected = AESGCM(key).encrypt(b"\0" * 4 + seq.to_bytes(8, "big"), b"hello", None)
    assert RefRecordCipher(key, seq).seal(b"hello") == expected


def test_first_records_known_answer() -> None:
    """§3: seq counts from 0, one per record, in each direction."""
    key = b"\x42" * 32
    cipher = RefRecordCipher(key)
    for seq in range(3):
        nonce = bytes(4) + seq.to_bytes(8, "big")
        assert cipher.seal(b"x") == AESGCM(key).encrypt(nonce, b"x", None)


def test_send_counter_stops_before_2_pow_32() -> None:
    """§3: a side closes before its send counter would reach 2^32."""
    cipher = RefRecordCipher(os.urandom(32), 2**32 - 1)
    with pytest.raises(RefError):
        cipher.seal(b"x")
    assert cipher.seq == 2**32 - 1


def _assert_refused_without_advancing(receiver: RefRecordCipher, record: bytes) -> None:
    before = receiver.seq
    with pytest.raises(RefError):
        receiver.open(record)
    assert receiver.seq == before


def test_tampered_record_is_refused() -> None:
    """§3: a tampered record fails to open and the counter does not advance."""
    key = os.urandom(32)
    record = RefRecordCipher(key).seal(b'[{"type":"who"}]')
    receiver = RefRecordCipher(key)
    for i in range(len(record)):  # every byte of ciphertext and tag
        bad = bytearray(record)
        bad[i] ^= 0x01
        _assert_refused_without_advancing(receiver, bytes(bad))
    _assert_refused_without_advancing(receiver, record[:-1])
    _assert_refused_without_advancing(receiver, record + b"\0")
    _assert_refused_without_advancing(receiver, record[:15])
    _assert_refused_without_advancing(RefRecordCipher(os.urandom(32)), record)  # wrong key
    assert receiver.open(record) == b'[{"type":"who"}]'  # the genuine one still opens


def test_replayed_record_is_refused() -> None:
    """§3: a replayed record fails to open and the counter does not advance."""
    key = os.urandom(32)
    sender, receiver = RefRecordCipher(key), RefRecordCipher(key)
    first, second = sender.seal(b"1"), sender.seal(b"2")
    assert receiver.open(first) == b"1"
    _assert_refused_without_advancing(receiver, first)
    assert receiver.open(second) == b"2"


def test_reordered_or_dropped_record_is_refused() -> None:
    """§3: a reordered (or dropped) record fails to open and the counter does not advance."""
    key = os.urandom(32)
    sender, receiver = RefRecordCipher(key), RefRecordCipher(key)
    first, second = sender.seal(b"1"), sender.seal(b"2")
    _assert_refused_without_advancing(receiver, second)
    assert receiver.open(first) == b"1"
    assert receiver.open(second) == b"2"


def test_directions_use_separate_keys(server_pem: bytes, server_spki: bytes) -> None:
    """§3: key k_c2s or k_s2c by direction; a record never opens in the other direction."""
    hello = make_hello(server_spki, os.urandom(32), os.urandom(32))
    _, k_c2s, k_s2c = make_key_message(hello)
    _assert_refused_without_advancing(RefRecordCipher(k_s2c), RefRecordCipher(k_c2s).seal(b"x"))


@pytest.mark.parametrize(
    "plaintext",
    [
        b"[]",
        b"{}",
        b'[{"text":"no type"}]',
        b'[{"type":1}]',
        b"[1]",
        b"\xff[]",
        b"[NaN]",
        b'[{"type":"say","text":"\\ud800"}]',
        b"[{",
    ],
)
def test_bad_record_plaintext_is_refused(plaintext: bytes) -> None:
    """§3: a record is a UTF-8 JSON non-empty array of objects with a string type."""
    with pytest.raises(RefError):
        refpeer.parse_record_plaintext(plaintext)


# --- the socket client against a scripted fake server ------------------------------------------


def test_connect_sends_key_and_first_record_in_one_write(fake: FakeServer) -> None:
    """§1/§2: the client sends key and its first record at once, each framed."""
    peer = RefPeer.connect("127.0.0.1", fake.port, first=[{"type": "join", "name": "ann"}])
    conn = fake.conn()
    time.sleep(UNIT_S)
    data = conn.recv(1 << 20)
    key_len = int.from_bytes(data[:4], "big")
    key_msg = json.loads(data[4 : 4 + key_len])
    rest = data[4 + key_len :]
    assert int.from_bytes(rest[:4], "big") == len(rest) - 4  # the whole record came too
    _, k_c2s, _ = server_accept_key(fake.pem, fake.nonce, fake.eph_private, key_msg)
    assert json.loads(RefRecordCipher(k_c2s).open(rest[4:])) == [{"type": "join", "name": "ann"}]
    assert peer.fingerprint == fingerprint_of(peer.server_spki) and peer.hello["type"] == "hello"
    peer.close()
    conn.close()


def test_frames_split_across_reads_and_batched(fake: FakeServer) -> None:
    """§1: frames may arrive split across any number of reads, or several in one read."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        data = sealed(s2c, {"type": "pong", "id": 1}) + sealed(s2c, {"type": "pong", "id": 2})
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            if i % 7 == 0:
                time.sleep(0.001)
        assert peer.recv_record() == [{"type": "pong", "id": 1}]
        assert peer.recv_record() == [{"type": "pong", "id": 2}]
        batch = sealed(s2c, {"type": "joined", "name": "a"}, {"type": "joined", "name": "b"})
        conn.sendall(batch + sealed(s2c, {"type": "users", "names": ["a", "b"]}))
        assert peer.recv()["name"] == "a"
        assert peer.recv()["name"] == "b"
        assert peer.recv() == {"type": "users", "names": ["a", "b"]}
        conn.close()


def test_record_length_limits(fake: FakeServer) -> None:
    """§1: clients accept 1 <= L <= 1_048_576 inclusive and close on any other L at once."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        pad = 1_048_576 - 16 - len(b'[{"type":"x","p":""}]')
        big = sealed(s2c, {"type": "x", "p": "a" * pad})
        assert len(big) == 4 + 1_048_576
        conn.sendall(big)
        assert peer.recv(timeout=5)["p"] == "a" * pad
        conn.sendall((1_048_577).to_bytes(4, "big"))  # no body follows
        start = time.monotonic()
        with pytest.raises(RefError) as info:
            peer.recv(timeout=5)
        assert not isinstance(info.value, PeerClosed) and time.monotonic() - start < 1
        assert peer.closed
        conn.close()


def test_zero_length_record_is_refused(fake: FakeServer) -> None:
    """§1: L = 0 is outside every range; the receiver closes after the 4 length bytes."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, _ = fake.session()
        conn.sendall(bytes(4))
        with pytest.raises(RefError):
            peer.recv_record(timeout=5)
        assert peer.closed
        conn.close()


def test_timeout_keeps_partial_frame(fake: FakeServer) -> None:
    """§1: a frame split across reads survives a receive timeout in the middle."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        data = sealed(s2c, {"type": "pong", "id": None})
        conn.sendall(data[:10])
        with pytest.raises(TimeoutError):
            peer.recv_record(timeout=2 * UNIT_S)
        conn.sendall(data[10:])
        assert peer.recv_record() == [{"type": "pong", "id": None}]
        conn.close()


def test_failed_record_closes(fake: FakeServer) -> None:
    """§3: a receiver that fails to open a record closes the connection at once."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        record = bytearray(sealed(s2c, {"type": "pong", "id": 1}))
        record[-1] ^= 0x80
        conn.sendall(bytes(record))
        with pytest.raises(RefError):
            peer.recv_record()
        assert peer.closed and peer.recv_seq == 0
        conn.close()


def test_eof_is_peer_closed(fake: FakeServer) -> None:
    """§1: the server closing mid-frame or between frames is reported as PeerClosed."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        conn.sendall(sealed(s2c, {"type": "pong", "id": 1})[:-3])
        conn.close()
        with pytest.raises(PeerClosed):
            peer.recv_record()


def test_join_and_wait_closed(fake: FakeServer) -> None:
    """§2/§4: join is answered by welcome; bye precedes the server's close."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, c2s, s2c = fake.session()
        welcome = {"type": "welcome", "name": "ann", "users": [], "max_text": 16384, "rate": 10}

        def reply() -> None:
            body = refpeer.read_plain_frame(conn, refpeer.MAX_RECORD_BYTES)
            assert json.loads(c2s.open(body)) == [{"type": "join", "name": "ann"}]
            conn.sendall(sealed(s2c, welcome))

        thread = threading.Thread(target=reply)
        thread.start()
        assert peer.join("ann") == welcome
        thread.join()
        with pytest.raises(TimeoutError):
            peer.wait_closed(2 * UNIT_S)
        conn.sendall(
            sealed(s2c, {"type": "joined", "name": "bob"}, {"type": "bye", "reason": "leave"})
        )
        conn.close()
        assert peer.wait_closed(5) == [
            {"type": "joined", "name": "bob"},
            {"type": "bye", "reason": "leave"},
        ]


def test_recv_until_returns_skipped(fake: FakeServer) -> None:
    """§4: messages arrive in order; recv_until keeps the ones it passes over."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, _, s2c = fake.session()
        conn.sendall(
            sealed(s2c, {"type": "joined", "name": "a"})
            + sealed(
                s2c, {"type": "left", "name": "a", "reason": "leave"}, {"type": "pong", "id": 7}
            )
        )
        msg, skipped = peer.recv_until("pong")
        assert msg == {"type": "pong", "id": 7}
        assert [m["type"] for m in skipped] == ["joined", "left"]
        conn.close()


def test_connect_and_join_refused(fake: FakeServer) -> None:
    """§4: a join answered by an error is reported, not mistaken for a welcome."""
    result: list[BaseException] = []

    def client() -> None:
        try:
            connect_and_join("127.0.0.1", fake.port, "ann")
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    conn, c2s, s2c = fake.session()
    assert json.loads(c2s.open(refpeer.read_plain_frame(conn, 1 << 20)))[0]["type"] == "join"
    conn.sendall(sealed(s2c, {"type": "error", "code": "name_taken", "message": "taken"}))
    thread.join(5)
    assert len(result) == 1 and isinstance(result[0], RefError)
    assert "name_taken" in str(result[0])
    conn.close()


def test_expected_fingerprint_is_enforced(fake: FakeServer, server_spki: bytes) -> None:
    """§2 Server identity: a pinned fingerprint that differs refuses the connection."""
    with pytest.raises(RefError, match="fingerprint"):
        RefPeer.connect("127.0.0.1", fake.port, expected_fingerprint=fingerprint_of(b"other"))
    conn = fake.conn()
    conn.settimeout(5)
    assert conn.recv(1) == b""  # closed without sending key
    conn.close()


def test_expected_fingerprint_accepted(fake: FakeServer, server_spki: bytes) -> None:
    """§2 Server identity: the right pinned fingerprint connects."""
    fp = fingerprint_of(server_spki)
    with RefPeer.connect("127.0.0.1", fake.port, expected_fingerprint=fp) as peer:
        assert peer.fingerprint == fp
        fake.session()[0].close()


def test_server_full_is_reported(server_pem: bytes, server_spki: bytes) -> None:
    """§2: server_full arrives instead of hello, as a plaintext frame."""
    body = b'{"type":"error","code":"server_full","message":"full"}'
    server = FakeServer(server_pem, server_spki, hello_body=body)
    try:
        with pytest.raises(ServerFull) as info:
            RefPeer.connect("127.0.0.1", server.port)
        assert info.value.message["code"] == "server_full"
    finally:
        server.conn().close()
        server.close()


def test_bad_protocol_in_hello_closes(server_pem: bytes, server_spki: bytes) -> None:
    """§2: a client MUST close on a protocol other than bcast/1."""
    hello = make_hello(server_spki, os.urandom(32), os.urandom(32))
    server = FakeServer(
        server_pem, server_spki, hello_body=json.dumps({**hello, "protocol": "x"}).encode()
    )
    try:
        with pytest.raises(RefError, match="protocol"):
            RefPeer.connect("127.0.0.1", server.port)
        conn = server.conn()
        assert conn.recv(1) == b""
        conn.close()
    finally:
        server.close()


def test_read_plain_frame_refuses_oversize_before_body() -> None:
    """§1: handshake frames are 1..8192 bytes; a bad length is refused before the body."""
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(frame(b"x" * 8192))
        assert refpeer.read_plain_frame(b) == b"x" * 8192
        a.sendall((8193).to_bytes(4, "big"))
        with pytest.raises(RefError):
            refpeer.read_plain_frame(b)
        a.close()
        with pytest.raises(PeerClosed):
            refpeer.read_plain_frame(b)


# --- §5 client identity --------------------------------------------------------------------------

# RFC 8032 §7.1, TEST 1: secret key, public key, and the signature of the empty message.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
# The 8 points of small order, as libsodium's blocklist lists them (canonical encodings).
SMALL_ORDER_HEX = {
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
}
P = refpeer.ED_P


def y_encoding(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


def test_identity_transcript_layout() -> None:
    """§5 Proof: b"bcast/1 identity" || SHA256(SPKI) || server_nonce || client_nonce
    || server_eph || client_eph."""
    spki, sn, cn, se, ce = (os.urandom(n) for n in (300, 32, 32, 32, 32))
    expected = b"bcast/1 identity" + hashlib.sha256(spki).digest() + sn + cn + se + ce
    assert refpeer.identity_transcript(spki, sn, cn, se, ce) == expected
    assert len(expected) == 16 + 32 * 5


def test_rfc8032_test_vector() -> None:
    """§5: pure Ed25519 as RFC 8032 (§7.1 TEST 1): same key, same signature, it verifies."""
    identity = refpeer.RefIdentity.from_seed(RFC8032_SEED)
    assert identity.public == RFC8032_PUBLIC
    assert identity.sign(b"") == RFC8032_SIGNATURE
    assert refpeer.verify_identity(RFC8032_PUBLIC, RFC8032_SIGNATURE, b"")
    assert refpeer.lax_verify(RFC8032_PUBLIC, RFC8032_SIGNATURE, b"")
    assert not refpeer.verify_identity(RFC8032_PUBLIC, RFC8032_SIGNATURE, b"x")
    assert not refpeer.lax_verify(RFC8032_PUBLIC, RFC8032_SIGNATURE, b"x")


def test_identity_fingerprint_form() -> None:
    """§5: "SHA256:" + base64-without-padding(SHA256(public key))."""
    digest = hashlib.sha256(RFC8032_PUBLIC).digest()
    expected = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert refpeer.identity_fingerprint(RFC8032_PUBLIC) == expected
    assert refpeer.RefIdentity.from_seed(RFC8032_SEED).fingerprint == expected
    assert len(expected) == 50 and "=" not in expected


def test_small_order_points_known_answer() -> None:
    """§5: the small-order keys refused are exactly the 8 torsion points (libsodium's list)."""
    points = refpeer.small_order_points()
    assert {p.hex() for p in points} == SMALL_ORDER_HEX
    for enc in points:
        point = refpeer.ed_decode(enc)
        assert point is not None and refpeer.ed_encode(point) == enc
        assert refpeer.ed_equal(refpeer.ed_mul(8, point), refpeer.ED_NEUTRAL)
    assert refpeer.ed_encode(refpeer.ED_BASE).hex() == "58" + "66" * 31  # RFC 8032 B


def test_identity_key_problems() -> None:
    """§5: refused keys: small order, non-canonical encodings, off the curve, wrong size."""
    for enc in refpeer.small_order_points():
        assert refpeer.identity_key_problem(enc) == "a point of small order"
    # y >= p, and x = 0 with its sign bit set: encodings a lax decoder takes mod p.
    for enc in (y_encoding(P), y_encoding(P + 1), y_encoding(1, 1), y_encoding(P + 3)):
        assert refpeer.identity_key_problem(enc) == "not a canonical encoding"
    assert refpeer.identity_key_problem(y_encoding(2)) == "not a point of the curve"
    assert "bytes" in (refpeer.identity_key_problem(b"\1" * 31) or "")
    assert refpeer.identity_key_problem(RFC8032_PUBLIC) is None
    assert refpeer.identity_key_problem(refpeer.RefIdentity().public) is None


@pytest.mark.parametrize(
    "key", [*refpeer.small_order_points(), y_encoding(P + 1), y_encoding(1, 1)]
)
def test_degenerate_proof_fools_only_a_lax_verifier(key: bytes) -> None:
    """Issue 13: R = B, S = 1 "verifies" under a small-order key for every message when the
    key is not checked; the §5 check refuses it."""
    for message in (b"", b"any transcript", os.urandom(176)):
        assert refpeer.lax_verify(key, refpeer.degenerate_proof(), message)
        assert not refpeer.verify_identity(key, refpeer.degenerate_proof(), message)


def test_s_at_least_l_is_refused() -> None:
    """§5: S >= L is refused, though [S + L]B = [S]B makes it pass a lax verifier."""
    identity = refpeer.RefIdentity()
    signature = identity.sign(b"t")
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + refpeer.ED_L).to_bytes(32, "little")
    assert refpeer.lax_verify(identity.public, malleated, b"t")
    assert not refpeer.verify_identity(identity.public, malleated, b"t")
    assert refpeer.verify_identity(identity.public, signature, b"t")
    short = signature[:63]
    assert not refpeer.verify_identity(identity.public, short, b"t")


def test_join_message_fields() -> None:
    """§5/§6 join: identity/proof (b64 of 32/64 bytes), history, since only when given."""
    assert refpeer.join_message("ann") == {"type": "join", "name": "ann"}
    identity = refpeer.RefIdentity()
    msg = refpeer.join_message("ann", identity=identity, transcript=b"T", history=0, since=7)
    assert set(msg) == {"type", "name", "identity", "proof", "history", "since"}
    assert (msg["history"], msg["since"]) == (0, 7)
    public = base64.b64decode(msg["identity"], validate=True)
    proof = base64.b64decode(msg["proof"], validate=True)
    assert public == identity.public and len(proof) == 64
    assert refpeer.verify_identity(public, proof, b"T")
    assert refpeer.join_message("a", proof="x")["proof"] == "x"  # extra fields for bad input


def test_connect_signs_this_connections_transcript(fake: FakeServer) -> None:
    """§5: the proof in the first join signs this connection's handshake values."""
    identity = refpeer.RefIdentity()
    result: list = []

    def client() -> None:
        result.append(connect_and_join("127.0.0.1", fake.port, "ann", identity=identity, since=3))

    thread = threading.Thread(target=client)
    thread.start()
    conn, c2s, s2c = fake.session()
    join = json.loads(c2s.open(refpeer.read_plain_frame(conn, 1 << 20)))[0]
    assert join["since"] == 3 and "history" not in join
    proof = base64.b64decode(join["proof"])
    assert refpeer.verify_identity(identity.public, proof, fake.transcript())
    assert not refpeer.verify_identity(identity.public, proof, fake.transcript()[:-1] + b"\0")
    conn.sendall(sealed(s2c, {"type": "welcome", "name": "ann"}, {"type": "message", "id": 9}))
    thread.join(5)
    peer, welcome = result[0]
    assert welcome["name"] == "ann" and peer.transcript == fake.transcript()
    assert peer.recv()["id"] == 9 and peer.max_id_seen == 9  # history stays queued
    peer.close()
    conn.close()


def test_source_address_is_bound(fake: FakeServer) -> None:
    """Tests act as other addresses (§5 bans by IP): the socket is bound to 127.0.0.2."""
    with RefPeer.connect("127.0.0.1", fake.port, source_address=("127.0.0.2", 0)):
        fake.session()[0].close()
    assert fake.peer_addr[0] == "127.0.0.2"


def test_sync_and_request(fake: FakeServer) -> None:
    """§4 ping/pong as a barrier; a request returns the first reply meant for us alone."""
    with RefPeer.connect("127.0.0.1", fake.port) as peer:
        conn, c2s, s2c = fake.session()

        def serve() -> None:
            ping = json.loads(c2s.open(refpeer.read_plain_frame(conn, 1 << 20)))[0]
            conn.sendall(
                sealed(s2c, {"type": "pong", "id": "other"}, {"type": "joined", "name": "x"})
                + sealed(s2c, {"type": "pong", "id": ping["id"]})
            )
            json.loads(c2s.open(refpeer.read_plain_frame(conn, 1 << 20)))
            conn.sendall(sealed(s2c, {"type": "left", "name": "x"}, {"type": "bans", "bans": []}))

        thread = threading.Thread(target=serve)
        thread.start()
        before = peer.sync()
        assert [m["type"] for m in before] == ["pong", "joined"]
        reply, skipped = peer.request({"type": "bans"})
        assert reply == {"type": "bans", "bans": []} and skipped == [{"type": "left", "name": "x"}]
        thread.join(5)
        conn.close()


WELCOME2 = {
    "type": "welcome",
    "name": "ann",
    "users": ["bob"],
    "max_text": 16384,
    "rate": 10,
    "access": "open",
    "identity": None,
    "op": False,
    "features": ["identity", "moderation", "history", "action"],
    "max_record": 1_048_576,
    "last_id": 0,
    "gap": False,
}


@pytest.mark.parametrize(
    ("msg", "ok"),
    [
        (WELCOME2, True),
        ({**WELCOME2, "access": "closed"}, False),
        ({**WELCOME2, "max_record": 1000}, False),
        ({k: v for k, v in WELCOME2.items() if k != "gap"}, False),
        ({**WELCOME2, "users": ["b", "a"]}, False),
        ({"type": "message", "id": 1, "from": "a", "text": "t", "ts": 5, "history": True}, True),
        ({"type": "message", "id": 1, "from": "a", "text": "t", "ts": 5, "action": False}, False),
        ({"type": "bans", "bans": [{"who": "b", "until": None, "by": "x", "reason": None}]}, True),
        ({"type": "bans", "bans": [{"who": "b", "until": None, "by": "x"}]}, False),
        (
            {
                "type": "bans",
                "bans": [
                    {"who": "b", "until": None, "by": "x", "reason": None},
                    {"who": "a", "until": 5, "by": "x", "reason": "r"},
                ],
            },
            False,
        ),
        ({"type": "muted", "by": "op", "until": None}, True),
        ({"type": "muted", "by": "op", "until": "soon"}, False),
        ({"type": "whois", "name": "a", "identity": None, "op": False, "since": 1}, True),
        ({"type": "whois", "name": "a", "identity": None, "op": 0, "since": 1}, False),
        ({"type": "bye", "reason": "kicked", "by": "op", "message": "m"}, True),
        ({"type": "left", "name": "a", "reason": "kicked", "by": None}, False),
        ({"type": "something new"}, True),
    ],
)
def test_server_message_shapes(msg: dict, ok: bool) -> None:
    """§4-§6 server messages: the fields each type must carry, and their types."""
    assert (refpeer.server_message_problem(msg) is None) == ok
