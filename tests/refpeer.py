"""An independent bcast/1 client, written only from PROTOCOL.md.

It shares no code with the project (no `protocol.py`, no `crypto_utils.py`,
no pycryptodome): only the standard library and `cryptography`. Tests use it
to show that the server interoperates with a client written from the spec
alone and to cross-check the project's crypto parameters; benchmarks use it
as a load generator.

Layout: pure helpers (framing §1, handshake math §2, records §3), then
`RefPeer`, a blocking-socket client. A `RefPeer` may be driven by two threads
at once, one sending and one receiving: the send side (c2s counter + socket
writes) is under `_send_lock`, the receive side (buffer + s2c counter) belongs
to the single reading thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import select
import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = "bcast/1"
# §1: handshake frames (hello, server_full, key) are 1..8192 bytes.
MAX_HANDSHAKE_FRAME_BYTES = 8192
# §1: clients accept records of 1..1_048_576 bytes.
MAX_RECORD_BYTES = 1_048_576
LENGTH_BYTES = 4  # §1: u32be length prefix
NONCE_BYTES = 32  # §2: hello.nonce and key.nonce
SECRET_BYTES = 32  # §2: the RSA-wrapped secret
X25519_BYTES = 32  # §2: raw X25519 public keys
SESSION_KEY_BYTES = 32  # §2: k_c2s and k_s2c (AES-256)
TAG_BYTES = 16  # §3: GCM tag appended to each record
MIN_RSA_BITS = 2048  # §2: "The server's RSA key is at least 2048 bits"
# §3: "A side closes the connection before its send counter would reach 2^32":
# sealing the record numbered 2**32 - 1 would take the counter to 2**32, so the
# last record a side may send is numbered 2**32 - 2.
SEQ_LIMIT = 2**32
HKDF_INFO_LABEL = b"bcast/1 keys"
DEFAULT_TIMEOUT_S = 5.0
RECV_CHUNK_BYTES = 65536


class RefError(Exception):
    """Any protocol or crypto failure seen by the reference peer."""


class PeerClosed(RefError):
    """The server closed (or reset) the connection."""


class ServerFull(RefError):
    """The server answered the TCP connection with `server_full` instead of `hello` (§2)."""

    def __init__(self, message: dict[str, Any]):
        super().__init__(f"server_full: {message.get('message')!r}")
        self.message = message


# --- §1 framing ---------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """One frame: u32be length || body (§1)."""
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def check_length(length: int, max_len: int) -> None:
    """Refuse a frame length outside 1..max_len (§1), before any body is read."""
    if not 1 <= length <= max_len:
        raise RefError(f"frame of {length} bytes is outside the range 1..{max_len}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise PeerClosed on EOF / reset."""
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            raise PeerClosed(f"connection reset after {len(chunks)} of {n} bytes") from exc
        if not chunk:
            raise PeerClosed(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)


def read_plain_frame(sock: socket.socket, max_len: int = MAX_HANDSHAKE_FRAME_BYTES) -> bytes:
    """Read one frame body from a raw socket, checking the length first (§1).

    Reads no byte beyond the frame, so the socket can be handed on afterwards.
    """
    length = int.from_bytes(_recv_exact(sock, LENGTH_BYTES), "big")
    check_length(length, max_len)
    return _recv_exact(sock, length)


# --- strict decoding helpers ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    """Standard base64 with padding (§ Notation)."""
    return base64.b64encode(data).decode("ascii")


def strict_b64decode(value: object, field: str) -> bytes:
    """Decode strict b64: a str of the standard alphabet with padding and nothing else.

    Also refuses non-canonical encodings (stray bits in the last character), so
    that exactly one string encodes each byte string.
    """
    if not isinstance(value, str):
        raise RefError(f"field {field!r} is not a string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise RefError(f"field {field!r} is not strict base64") from None
    if b64(raw) != value:
        raise RefError(f"field {field!r} is not canonical base64")
    return raw


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_no_surrogates(value: Any) -> None:
    """§ Notation: a JSON string that decodes to a lone surrogate is invalid."""
    if isinstance(value, str):
        value.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
    elif isinstance(value, list):
        for item in value:
            _check_no_surrogates(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_no_surrogates(key)
            _check_no_surrogates(item)


def parse_json(body: bytes) -> Any:
    """Strict UTF-8 JSON (no NaN/Infinity, no lone surrogates); RefError otherwise."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        _check_no_surrogates(value)
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise RefError(f"invalid UTF-8 JSON: {exc}") from None
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A handshake frame: one UTF-8 JSON object (§2)."""
    value = parse_json(body)
    if not isinstance(value, dict):
        raise RefError(f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_record_plaintext(plaintext: bytes) -> list[dict[str, Any]]:
    """A record's plaintext: a non-empty JSON array of objects with a string `type` (§3)."""
    value = parse_json(plaintext)
    if not isinstance(value, list) or not value:
        raise RefError("a record must hold a non-empty JSON array")
    for msg in value:
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise RefError(f"a record holds a non-message: {msg!r:.80}")
    return value


def encode_messages(msgs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> bytes:
    """Compact UTF-8 JSON array, as a record's plaintext (§3)."""
    return json.dumps(list(msgs), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_json(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON object, as a handshake frame body (§2)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- §2 handshake math ---------------------------------------------------------------------------


def fingerprint_of(spki_der: bytes) -> str:
    """Server fingerprint: "SHA256:" + unpadded b64 of SHA256(SPKI DER) (§2 Server identity)."""
    digest = hashlib.sha256(spki_der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def derive_keys(
    secret: bytes,
    dh: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    server_spki: bytes,
    server_eph: bytes,
    client_eph: bytes,
) -> tuple[bytes, bytes]:
    """(k_c2s, k_s2c) from HKDF-SHA256 exactly as §2 "Session keys"."""
    info = HKDF_INFO_LABEL + hashlib.sha256(server_spki).digest() + server_eph + client_eph
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * SESSION_KEY_BYTES,
        salt=server_nonce + client_nonce,
        info=info,
    ).derive(secret + dh)
    return okm[:SESSION_KEY_BYTES], okm[SESSION_KEY_BYTES:]


def _oaep() -> padding.OAEP:
    # §2: SHA-256 as the hash and as MGF1's hash, empty label.
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 (RFC 7748); RefError on a low-order peer key (all-zero result, §2)."""
    try:
        dh = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # cryptography refuses an all-zero shared secret
        raise RefError("X25519 result is all zeros (low-order point)") from None
    if not any(dh):
        raise RefError("X25519 result is all zeros (low-order point)")
    return dh


def parse_hello(hello: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    """Validate a `hello` (§2); return (server SPKI DER, server nonce, server eph)."""
    if hello.get("type") != "hello":
        raise RefError(f"expected a hello, got type {hello.get('type')!r}")
    if hello.get("protocol") != PROTOCOL:
        raise RefError(f"unsupported protocol {hello.get('protocol')!r}, expected {PROTOCOL!r}")
    spki = strict_b64decode(hello.get("key"), "key")
    nonce = strict_b64decode(hello.get("nonce"), "nonce")
    eph = strict_b64decode(hello.get("eph"), "eph")
    if len(nonce) != NONCE_BYTES:
        raise RefError(f"hello nonce is {len(nonce)} bytes, expected {NONCE_BYTES}")
    if len(eph) != X25519_BYTES:
        raise RefError(f"hello eph is {len(eph)} bytes, expected {X25519_BYTES}")
    _load_rsa_spki(spki)
    return spki, nonce, eph


def _load_rsa_spki(spki: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError):
        raise RefError("hello key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise RefError(f"hello key is not RSA but {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise RefError(f"hello key has {key.key_size} bits, under {MIN_RSA_BITS}")
    return key


def make_key_message(
    hello: dict[str, Any],
    *,
    secret: bytes | None = None,
    client_nonce: bytes | None = None,
    eph_private: bytes | None = None,
) -> tuple[dict[str, Any], bytes, bytes]:
    """Client side of §2: validate `hello`, build `key`; return (key, k_c2s, k_s2c).

    `secret`, `client_nonce` and `eph_private` default to fresh random values;
    tests pass them to get reproducible keys.
    """
    spki, server_nonce, server_eph = parse_hello(hello)
    secret = secret if secret is not None else os.urandom(SECRET_BYTES)
    client_nonce = client_nonce if client_nonce is not None else os.urandom(NONCE_BYTES)
    if eph_private is None:
        eph = X25519PrivateKey.generate()
    else:
        eph = X25519PrivateKey.from_private_bytes(eph_private)
    client_eph = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    dh = _x25519(eph, server_eph)
    del eph  # §2: forget the private half once the keys are derived
    wrapped = _load_rsa_spki(spki).encrypt(secret, _oaep())
    k_c2s, k_s2c = derive_keys(secret, dh, server_nonce, client_nonce, spki, server_eph, client_eph)
    key_msg = {
        "type": "key",
        "nonce": b64(client_nonce),
        "secret": b64(wrapped),
        "eph": b64(client_eph),
    }
    return key_msg, k_c2s, k_s2c


def server_accept_key(
    rsa_private_key_pem: bytes,
    server_nonce: bytes,
    server_eph_private: bytes,
    key_msg: dict[str, Any],
) -> tuple[bytes, bytes, bytes]:
    """Server side of §2 for cross-checks: validate `key`; return (secret, k_c2s, k_s2c).

    Raises RefError on every `key` the server MUST close on.
    """
    private_key = serialization.load_pem_private_key(rsa_private_key_pem, password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise TypeError("the server key must be an RSA private key")
    server_spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if key_msg.get("type") != "key":
        raise RefError(f"expected a key message, got type {key_msg.get('type')!r}")
    client_nonce = strict_b64decode(key_msg.get("nonce"), "nonce")
    wrapped = strict_b64decode(key_msg.get("secret"), "secret")
    client_eph = strict_b64decode(key_msg.get("eph"), "eph")
    if len(client_nonce) != NONCE_BYTES:
        raise RefError(f"key nonce is {len(client_nonce)} bytes, expected {NONCE_BYTES}")
    if len(client_eph) != X25519_BYTES:
        raise RefError(f"key eph is {len(client_eph)} bytes, expected {X25519_BYTES}")
    try:
        secret = private_key.decrypt(wrapped, _oaep())
    except ValueError:
        raise RefError("the secret does not decrypt under the server key") from None
    if len(secret) != SECRET_BYTES:
        raise RefError(f"the secret decrypts to {len(secret)} bytes, expected {SECRET_BYTES}")
    eph = X25519PrivateKey.from_private_bytes(server_eph_private)
    server_eph = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    dh = _x25519(eph, client_eph)
    k_c2s, k_s2c = derive_keys(
        secret, dh, server_nonce, client_nonce, server_spki, server_eph, client_eph
    )
    return secret, k_c2s, k_s2c


# --- §3 records ----------------------------------------------------------------------------------


class RefRecordCipher:
    """AES-256-GCM for one direction; nonce = 4 zero bytes || u64be(seq), no AAD (§3).

    The counter advances only on success: a record that fails to open leaves
    `seq` where it was (§3 "without advancing its counter").
    """

    def __init__(self, key: bytes, seq: int = 0):
        if len(key) != SESSION_KEY_BYTES:
            raise RefError(f"a record key is {SESSION_KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.seq = seq

    def _nonce(self) -> bytes:
        return b"\x00\x00\x00\x00" + self.seq.to_bytes(8, "big")

    def seal(self, plaintext: bytes) -> bytes:
        """ciphertext || 16-byte tag under the next nonce; advances `seq`."""
        if self.seq + 1 >= SEQ_LIMIT:
            raise RefError(f"send counter at {self.seq}: sealing would take it to 2**32 (§3)")
        record = self._aead.encrypt(self._nonce(), plaintext, None)
        self.seq += 1
        return record

    def open(self, record: bytes) -> bytes:
        """Authenticate and decrypt the record numbered `seq`; RefError otherwise."""
        if len(record) < TAG_BYTES:
            raise RefError(f"a record of {len(record)} bytes is shorter than its tag")
        try:
            plaintext = self._aead.decrypt(self._nonce(), record, None)
        except InvalidTag:
            raise RefError(f"record {self.seq} failed to open") from None
        self.seq += 1
        return plaintext


# --- the blocking-socket client ------------------------------------------------------------------


class RefPeer:
    """A bcast/1 client over a blocking socket, for tests and benchmarks."""

    def __init__(
        self,
        sock: socket.socket,
        hello: dict[str, Any],
        k_c2s: bytes,
        k_s2c: bytes,
        timeout: float,
    ):
        self.sock = sock
        self.hello = hello
        self.server_spki = strict_b64decode(hello["key"], "key")
        self.fingerprint = fingerprint_of(self.server_spki)
        self.timeout = timeout
        self.skipped: list[dict[str, Any]] = []  # messages `join` passed over
        self.closed = False
        # Guards the c2s cipher and socket writes, so counter order is wire order.
        self._send_lock = threading.Lock()
        self._c2s = RefRecordCipher(k_c2s)
        # Receive state: owned by the one thread that reads.
        self._s2c = RefRecordCipher(k_s2c)
        self._buf = bytearray()
        self._pending: deque[dict[str, Any]] = deque()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    # -- connecting --

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        first: list[dict[str, Any]] | None = None,
        expected_fingerprint: str | None = None,
    ) -> RefPeer:
        """Connect, check `hello`, send `key` (and `first` as one record, same write) (§2)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = parse_json_object(read_plain_frame(sock, MAX_HANDSHAKE_FRAME_BYTES))
            if hello.get("type") == "error" and hello.get("code") == "server_full":
                raise ServerFull(hello)
            key_msg, k_c2s, k_s2c = make_key_message(hello)
            peer = cls(sock, hello, k_c2s, k_s2c, timeout)
            if expected_fingerprint is not None and peer.fingerprint != expected_fingerprint:
                raise RefError(
                    f"server fingerprint {peer.fingerprint} differs from the expected "
                    f"{expected_fingerprint}"
                )
            data = frame(encode_json(key_msg))
            if first is not None:
                data += frame(peer._c2s.seal(encode_messages(first)))
            peer._sendall(data)
        except BaseException:
            sock.close()
            raise
        return peer

    # -- sending --

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise PeerClosed(f"connection closed while sending: {exc}") from exc

    def send_plaintext(self, pt: bytes) -> None:
        """Seal arbitrary bytes as one record (for tests of bad records, §3)."""
        with self._send_lock:
            self._sendall(frame(self._c2s.seal(pt)))

    def send(self, *msgs: dict[str, Any]) -> None:
        """Send these messages as one record: a compact UTF-8 JSON array (§3)."""
        if not msgs:
            raise ValueError("a record holds one or more messages; use send_plaintext for []")
        self.send_plaintext(encode_messages(msgs))

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for tests of bad frames)."""
        with self._send_lock:
            self._sendall(data)

    @property
    def send_seq(self) -> int:
        """Number of records sent so far (the next c2s nonce counter)."""
        return self._c2s.seq

    @property
    def recv_seq(self) -> int:
        """Number of records opened so far (the next s2c nonce counter)."""
        return self._s2c.seq

    # -- receiving --

    def _fill(self, deadline: float) -> None:
        """Append at least one byte to the buffer, or raise TimeoutError / PeerClosed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
            raise TimeoutError(f"timed out with {len(self._buf)} bytes of a frame buffered")
        try:
            chunk = self.sock.recv(RECV_CHUNK_BYTES)
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            self.close()
            raise PeerClosed("connection reset by the server") from exc
        if not chunk:
            self.close()
            raise PeerClosed(f"connection closed by the server ({len(self._buf)} bytes unread)")
        self._buf += chunk

    def _next_frame(self, deadline: float) -> bytes:
        """One record frame body; a bad length closes before the body is read (§1)."""
        while len(self._buf) < LENGTH_BYTES:
            self._fill(deadline)
        length = int.from_bytes(self._buf[:LENGTH_BYTES], "big")
        try:
            check_length(length, MAX_RECORD_BYTES)
        except RefError:
            self.close()
            raise
        end = LENGTH_BYTES + length
        while len(self._buf) < end:
            self._fill(deadline)
        body = bytes(self._buf[LENGTH_BYTES:end])
        del self._buf[:end]
        return body

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _recv_record(self, deadline: float) -> list[dict[str, Any]]:
        if self.closed:
            raise PeerClosed("the connection is closed")
        body = self._next_frame(deadline)
        try:
            return parse_record_plaintext(self._s2c.open(body))
        except RefError:
            self.close()  # §3: close at once on a record that fails
            raise

    def recv_record(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The next record, opened and parsed; `timeout` defaults to the connect timeout.

        If `recv` left part of a record buffered, that remainder comes first.
        """
        if self._pending:
            rest = list(self._pending)
            self._pending.clear()
            return rest
        return self._recv_record(self._deadline(timeout))

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next single message, buffering the rest of its record."""
        if not self._pending:
            self._pending.extend(self._recv_record(self._deadline(timeout)))
        return self._pending.popleft()

    def recv_until(
        self, type_: str, timeout: float | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Skip messages until one of `type_`; return it and the skipped ones, in order."""
        deadline = self._deadline(timeout)
        skipped: list[dict[str, Any]] = []
        while True:
            if not self._pending:
                self._pending.extend(self._recv_record(deadline))
            msg = self._pending.popleft()
            if msg.get("type") == type_:
                return msg, skipped
            skipped.append(msg)

    def _join_reply(self, timeout: float | None) -> dict[str, Any]:
        deadline = self._deadline(timeout)
        while True:
            if not self._pending:
                self._pending.extend(self._recv_record(deadline))
            msg = self._pending.popleft()
            if msg.get("type") in ("welcome", "error", "bye"):
                return msg
            self.skipped.append(msg)

    def join(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Send `join`; return the reply: `welcome` or `error` (or a `bye`).

        Anything else that arrives first is kept in `self.skipped`.
        """
        self.send({"type": "join", "name": name})
        return self._join_reply(timeout)

    def wait_closed(self, timeout: float) -> list[dict[str, Any]]:
        """Read until the server closes; return the messages received meanwhile.

        Raises TimeoutError if the connection is still open after `timeout`.
        """
        deadline = time.monotonic() + timeout
        msgs = list(self._pending)
        self._pending.clear()
        if self.closed:
            return msgs
        while True:
            try:
                msgs.extend(self._recv_record(deadline))
            except PeerClosed:
                return msgs

    # -- closing --

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self._poll.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()

    def __enter__(self) -> RefPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_and_join(host: str, port: int, name: str, **kw: Any) -> tuple[RefPeer, dict[str, Any]]:
    """Connect with `join` in the first record (§2); return the peer and its `welcome`.

    Raises RefError (closing the connection) if the reply is not a `welcome`.
    """
    peer = RefPeer.connect(host, port, first=[{"type": "join", "name": name}], **kw)
    try:
        reply = peer._join_reply(None)
        if reply.get("type") != "welcome":
            raise RefError(f"join as {name!r} refused: {reply!r}")
    except BaseException:
        peer.close()
        raise
    return peer, reply
