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
from collections.abc import Callable
from types import TracebackType
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
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


# --- §5 client identity --------------------------------------------------------------------------

IDENTITY_LABEL = b"bcast/1 identity"
IDENTITY_BYTES = 32  # §5: raw Ed25519 public key
PROOF_BYTES = 64  # §5: Ed25519 signature R || S
# RFC 8032 §5.1: the field, the curve constant d, the group order L and the base point.
ED_P = 2**255 - 19
ED_L = 2**252 + 27742317777372353535851937790883648493
ED_D = -121665 * pow(121666, ED_P - 2, ED_P) % ED_P
_SQRT_M1 = pow(2, (ED_P - 1) // 4, ED_P)
_BASE_Y = 4 * pow(5, ED_P - 2, ED_P) % ED_P
Point = tuple[int, int, int, int]  # extended homogeneous coordinates (X, Y, Z, T)


def identity_transcript(
    server_spki: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    server_eph: bytes,
    client_eph: bytes,
) -> bytes:
    """What a `join` proof signs (§5): this connection's handshake values, in this order."""
    return (
        IDENTITY_LABEL
        + hashlib.sha256(server_spki).digest()
        + server_nonce
        + client_nonce
        + server_eph
        + client_eph
    )


def identity_fingerprint(public: bytes) -> str:
    """§5: "SHA256:" + unpadded b64 of SHA256(raw public key), the server's form (§2)."""
    return fingerprint_of(public)


def _recover_x(y: int, sign: int, canonical: bool = True) -> int | None:
    """RFC 8032 §5.1.3 steps 2-4: x from y and its sign bit, or None if there is none."""
    xx = (y * y - 1) * pow(ED_D * y * y + 1, ED_P - 2, ED_P) % ED_P
    x = pow(xx, (ED_P + 3) // 8, ED_P)
    if (x * x - xx) % ED_P:
        x = x * _SQRT_M1 % ED_P
    if (x * x - xx) % ED_P:
        return None
    if x == 0:
        # x = 0 has no negative form: a set sign bit is a non-canonical encoding.
        return None if sign and canonical else 0
    return ED_P - x if x & 1 != sign else x


def ed_decode(data: bytes, *, canonical: bool = True) -> Point | None:
    """A 32-byte point encoding (RFC 8032 §5.1.3), or None if it is none.

    With `canonical`, y >= p and a negative x = 0 are refused (RFC 8032's rule);
    without, y is taken mod p and that sign bit ignored, as lax decoders do, so
    tests can build keys such decoders would accept.
    """
    if len(data) != IDENTITY_BYTES:
        return None
    value = int.from_bytes(data, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    if y >= ED_P:
        if canonical:
            return None
        y -= ED_P
    x = _recover_x(y, sign, canonical)
    if x is None:
        return None
    return (x, y, 1, x * y % ED_P)


def ed_encode(point: Point) -> bytes:
    x, y, z, _ = point
    zi = pow(z, ED_P - 2, ED_P)
    x, y = x * zi % ED_P, y * zi % ED_P
    return (y | ((x & 1) << 255)).to_bytes(IDENTITY_BYTES, "little")


def ed_add(p: Point, q: Point) -> Point:
    """Point addition on edwards25519 (RFC 8032 §5.1.4, extended coordinates)."""
    a = (p[1] - p[0]) * (q[1] - q[0]) % ED_P
    b = (p[1] + p[0]) * (q[1] + q[0]) % ED_P
    c = 2 * p[3] * q[3] * ED_D % ED_P
    d = 2 * p[2] * q[2] % ED_P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % ED_P, g * h % ED_P, f * g % ED_P, e * h % ED_P)


def ed_mul(k: int, p: Point) -> Point:
    """[k]P by double-and-add."""
    acc: Point = (0, 1, 1, 0)
    while k:
        if k & 1:
            acc = ed_add(acc, p)
        p = ed_add(p, p)
        k >>= 1
    return acc


def ed_equal(p: Point, q: Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % ED_P == 0 and (p[1] * q[2] - q[1] * p[2]) % ED_P == 0


ED_NEUTRAL: Point = (0, 1, 1, 0)
_BASE = ed_decode(_BASE_Y.to_bytes(IDENTITY_BYTES, "little"))
assert _BASE is not None
ED_BASE: Point = _BASE


def small_order_points() -> list[bytes]:
    """The canonical encodings of the 8 points of order 1, 2, 4 or 8 (the torsion group).

    Found without a table: [L]P of a point P of full order lies in the torsion
    group; one of order 8 generates all of it.
    """
    for y in range(2, 1000):
        p = ed_decode(y.to_bytes(IDENTITY_BYTES, "little"))
        if p is None:
            continue
        t = ed_mul(ED_L, p)
        if not ed_equal(ed_mul(4, t), ED_NEUTRAL):  # order 8: a generator
            points, q = [], ED_NEUTRAL
            for _ in range(8):
                points.append(ed_encode(q))
                q = ed_add(q, t)
            return sorted(points)
    raise AssertionError("no point of order 8 found")  # pragma: no cover


def identity_key_problem(public: bytes) -> str | None:
    """Why §5 refuses this public key (size, non-canonical, off the curve, small order)."""
    if len(public) != IDENTITY_BYTES:
        return f"the identity is {len(public)} bytes, not {IDENTITY_BYTES}"
    point = ed_decode(public)
    if point is None:
        lax = ed_decode(public, canonical=False)
        return "not a point of the curve" if lax is None else "not a canonical encoding"
    if ed_equal(ed_mul(8, point), ED_NEUTRAL):
        return "a point of small order"
    return None


def lax_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """RFC 8032 §5.1.7 with none of §5's extra checks (lax decoding, any S, any key),
    cofactored: [8][S]B = [8]R + [8][k]A. Tests use it to show a crafted proof would
    pass a verifier that does not check the key."""
    a, r = ed_decode(public, canonical=False), ed_decode(signature[:32], canonical=False)
    if a is None or r is None or len(signature) != PROOF_BYTES:
        return False
    s = int.from_bytes(signature[32:], "little")
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little")
    left = ed_mul(8 * s, ED_BASE)
    right = ed_mul(8, ed_add(r, ed_mul(k, a)))
    return ed_equal(left, right)


def verify_identity(public: bytes, signature: bytes, transcript: bytes) -> bool:
    """§5 proof check as the server must make it: sizes, key, S < L, then Ed25519."""
    if len(signature) != PROOF_BYTES or identity_key_problem(public) is not None:
        return False
    if int.from_bytes(signature[32:], "little") >= ED_L:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, transcript)
    except (InvalidSignature, ValueError):
        return False
    return True


def degenerate_proof() -> bytes:
    """R = the base point, S = 1: verifies for every message under the neutral key
    (01 00 .. 00) when a verifier does not refuse small-order keys (issue 13)."""
    return ed_encode(ED_BASE) + (1).to_bytes(32, "little")


class RefIdentity:
    """A client's Ed25519 key pair (§5), kept in memory (tests make fresh ones)."""

    def __init__(self, private: Ed25519PrivateKey | None = None):
        self.private = private if private is not None else Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.fingerprint = identity_fingerprint(self.public)

    @classmethod
    def from_seed(cls, seed: bytes) -> RefIdentity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, transcript: bytes) -> bytes:
        return self.private.sign(transcript)

    def join_fields(self, transcript: bytes) -> dict[str, str]:
        """`identity` and `proof` for a join on the connection with this transcript."""
        return {"identity": b64(self.public), "proof": b64(self.sign(transcript))}


def join_message(
    name: str,
    *,
    identity: RefIdentity | None = None,
    transcript: bytes = b"",
    history: int | None = None,
    since: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A §5/§6 `join`: optional fields only when given (`null` is never absent, §4)."""
    msg: dict[str, Any] = {"type": "join", "name": name}
    if identity is not None:
        msg.update(identity.join_fields(transcript))
    if history is not None:
        msg["history"] = history
    if since is not None:
        msg["since"] = since
    msg.update(extra)
    return msg


# --- server messages of revision 2, checked against §4-§6 ---------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nullable(kind: type) -> Callable[[Any], bool]:
    return lambda v: v is None or isinstance(v, kind)


_STR = lambda v: isinstance(v, str)  # noqa: E731
_BOOL = lambda v: isinstance(v, bool)  # noqa: E731
_MS = _is_int
_FEATURES = {"identity", "moderation", "history", "action"}
# type -> {field: predicate} for every field §4-§6 require.
SERVER_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "welcome": {
        "name": _STR,
        "users": lambda v: isinstance(v, list) and all(map(_STR, v)) and v == sorted(v),
        "max_text": _is_int,
        "rate": _is_int,
        "access": lambda v: v in ("open", "allowlist"),
        "identity": _nullable(str),
        "op": _BOOL,
        "features": lambda v: isinstance(v, list) and set(v) <= _FEATURES,
        "max_record": lambda v: _is_int(v) and 65536 <= v <= MAX_RECORD_BYTES,
        "last_id": lambda v: _is_int(v) and v >= 0,
        "gap": _BOOL,
    },
    "message": {"id": _is_int, "from": _STR, "text": _STR, "ts": _MS},
    "dm": {"id": _is_int, "from": _STR, "to": _STR, "text": _STR, "ts": _MS},
    "joined": {"name": _STR, "identity": _nullable(str)},
    "left": {"name": _STR, "reason": _STR},
    "users": {"names": lambda v: isinstance(v, list) and all(map(_STR, v)) and v == sorted(v)},
    "pong": {"id": lambda v: True},
    "error": {"code": _STR, "message": _STR},
    "bye": {"reason": _STR},
    "bans": {"bans": lambda v: isinstance(v, list)},
    "muted": {"by": _STR, "until": _nullable(int)},
    "whois": {"name": _STR, "identity": _nullable(str), "op": _BOOL, "since": _MS},
}
_BAN_FIELDS = {"who": _STR, "until": _nullable(int), "by": _STR, "reason": _nullable(str)}


def server_message_problem(msg: dict[str, Any]) -> str | None:
    """Why `msg` breaks §4-§6's shape for its type, or None (unknown types pass, §3)."""
    fields = SERVER_FIELDS.get(msg.get("type", ""))
    if fields is None:
        return None
    for name, ok in fields.items():
        if name not in msg:
            return f"{msg['type']} lacks {name!r}"
        if not ok(msg[name]):
            return f"{msg['type']}.{name} = {msg[name]!r:.80} breaks the protocol"
    for flag in ("action", "history"):  # §6: on the wire only when true
        if msg["type"] == "message" and flag in msg and msg[flag] is not True:
            return f"message.{flag} = {msg[flag]!r} (sent only as true)"
    if msg["type"] == "bans":
        whos = []
        for ban in msg["bans"]:
            if not isinstance(ban, dict) or any(
                k not in ban or not ok(ban[k]) for k, ok in _BAN_FIELDS.items()
            ):
                return f"bans entry {ban!r:.80} breaks the protocol"
            whos.append(ban["who"])
        if whos != sorted(whos):
            return f"bans are not sorted by who: {whos}"
    if msg["type"] in ("bye", "left") and "by" in msg and not isinstance(msg["by"], str):
        return f"{msg['type']}.by = {msg['by']!r:.80} is not a name"
    return None


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
        # §5: what an identity proof on this connection signs (set by `connect`).
        self.transcript = b""
        # §6 resume: the highest `id` of a message or dm received (0 if none).
        self.max_id_seen = 0
        # Check every received message against §4-§6's shapes (cross-checks turn it on).
        self.validate = False
        self._ping_count = 0
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
        first: list[dict[str, Any]] | Callable[[RefPeer], list[dict[str, Any]]] | None = None,
        expected_fingerprint: str | None = None,
        source_address: tuple[str, int] | None = None,
        validate: bool = False,
    ) -> RefPeer:
        """Connect, check `hello`, send `key` (and `first` as one record, same write) (§2).

        `first` may be a function of the peer, called once its transcript is
        known, to sign a §5 proof into the first `join`. `source_address` binds
        the client socket (tests act as other addresses: 127.0.0.2, ...). With
        `validate`, a received message that breaks §4-§6's shapes raises RefError.
        """
        sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=source_address
        )
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = parse_json_object(read_plain_frame(sock, MAX_HANDSHAKE_FRAME_BYTES))
            if hello.get("type") == "error" and hello.get("code") == "server_full":
                raise ServerFull(hello)
            key_msg, k_c2s, k_s2c = make_key_message(hello)
            peer = cls(sock, hello, k_c2s, k_s2c, timeout)
            peer.validate = validate
            peer.transcript = identity_transcript(
                peer.server_spki,
                strict_b64decode(hello["nonce"], "nonce"),
                strict_b64decode(key_msg["nonce"], "nonce"),
                strict_b64decode(hello["eph"], "eph"),
                strict_b64decode(key_msg["eph"], "eph"),
            )
            if expected_fingerprint is not None and peer.fingerprint != expected_fingerprint:
                raise RefError(
                    f"server fingerprint {peer.fingerprint} differs from the expected "
                    f"{expected_fingerprint}"
                )
            data = frame(encode_json(key_msg))
            if callable(first):
                first = first(peer)
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
            msgs = parse_record_plaintext(self._s2c.open(body))
        except RefError:
            self.close()  # §3: close at once on a record that fails
            raise
        for msg in msgs:
            if self.validate:
                problem = server_message_problem(msg)
                if problem is not None:
                    raise RefError(f"the server broke the protocol: {problem}")
            if msg["type"] in ("message", "dm") and _is_int(msg.get("id")):
                self.max_id_seen = max(self.max_id_seen, msg["id"])
        return msgs

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

    def join(
        self,
        name: str,
        timeout: float | None = None,
        *,
        identity: RefIdentity | None = None,
        history: int | None = None,
        since: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Send `join` (with a §5 proof over this connection if `identity`, §6 fields if
        given); return the reply: `welcome` or `error` (or a `bye`).

        Anything else that arrives first is kept in `self.skipped`; replayed
        history (§6) stays queued after the `welcome`.
        """
        self.send(
            join_message(
                name,
                identity=identity,
                transcript=self.transcript,
                history=history,
                since=since,
                **extra,
            )
        )
        return self._join_reply(timeout)

    def sync(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Send a `ping` and read up to its `pong`; return what came before it.

        §4: replies follow the log position they were queued at, so everything
        the server produced for us before the ping arrives first (a barrier).
        """
        self._ping_count += 1
        token = f"sync-{self._ping_count}"
        self.send({"type": "ping", "id": token})
        deadline = self._deadline(timeout)
        before: list[dict[str, Any]] = []
        while True:
            msg, skipped = self.recv_until("pong", max(0.0, deadline - time.monotonic()))
            before += skipped
            if msg.get("id") == token:
                return before
            before.append(msg)

    def request(
        self, msg: dict[str, Any], timeout: float | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send one message and return the first reply addressed to us alone: an
        `error`, `bans`, `muted`, `whois`, `users` or `bye`, and what came before it."""
        self.send(msg)
        deadline = self._deadline(timeout)
        skipped: list[dict[str, Any]] = []
        while True:
            if not self._pending:
                self._pending.extend(self._recv_record(deadline))
            reply = self._pending.popleft()
            if reply.get("type") in ("error", "bans", "muted", "whois", "users", "bye"):
                return reply, skipped
            skipped.append(reply)

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


def connect_and_join(
    host: str,
    port: int,
    name: str,
    *,
    identity: RefIdentity | None = None,
    history: int | None = None,
    since: int | None = None,
    **kw: Any,
) -> tuple[RefPeer, dict[str, Any]]:
    """Connect with `join` in the first record (§2); return the peer and its `welcome`.

    With `identity`, the join carries a proof over this connection (§5);
    `history` and `since` go in it when given (§6). Replayed messages stay
    queued after the `welcome`. Raises RefError (closing the connection) if the
    reply is not a `welcome`.
    """

    def first(peer: RefPeer) -> list[dict[str, Any]]:
        join = join_message(
            name, identity=identity, transcript=peer.transcript, history=history, since=since
        )
        return [join]

    peer = RefPeer.connect(host, port, first=first, **kw)
    try:
        reply = peer._join_reply(None)
        if reply.get("type") != "welcome":
            raise RefError(f"join as {name!r} refused: {reply!r}")
    except BaseException:
        peer.close()
        raise
    return peer, reply
