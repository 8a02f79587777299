"""bcast/1 without I/O, part 1: constants, errors, frames, the handshake and record plaintexts.

PROTOCOL.md §1-§3. Pure like the rest of the protocol: no socket, thread, clock or
cipher. `protocol.py` re-exports everything here; import from `protocol`.

Errors are named after what the server does about them (STYLE.md):
  * `CloseSilently`  — close the connection at once, no reply (bad frame
    length before the channel is up, bad `hello`/`key`).
  * `ByeProtocol`    — send `bye` (reason `protocol`), close (bad record body,
    bad length after `key`).
  * `Refused`        — answer `error` with `code`, keep the connection.
All three derive from `ProtocolError`: decoders raise nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_NAME = "bcast/1"
LENGTH_BYTES = 4
# §1: handshake frames (hello, plaintext server_full error, key) are 1..8192 bytes.
MAX_HANDSHAKE_FRAME = 8192
# §1: records are 1..1 MiB; clients must accept all of it, the server may say less.
MAX_RECORD_FRAME = 1_048_576
MIN_SERVER_RECORD_FRAME = 65_536
TAG_BYTES = 16  # the GCM tag that ends every record (§3)
MAX_RECORD_PLAINTEXT = MAX_RECORD_FRAME - TAG_BYTES
NONCE_BYTES = 32
EPH_BYTES = 32
DEFAULT_MAX_TEXT = 16_384  # §4 text: UTF-8 bytes
MAX_NAME_CHARS = 32
# §3 (revision 2): a record from a client holds at most 64 messages; the server's are unlimited.
MAX_CLIENT_RECORD_MESSAGES = 64

# §4 and §5: every client message type; operators alone may send OP_TYPES.
CLIENT_TYPES = (
    "join",
    "say",
    "dm",
    "who",
    "ping",
    "leave",
    "kick",
    "ban",
    "unban",
    "mute",
    "bans",
    "whois",
)
OP_TYPES = ("kick", "ban", "unban", "mute", "bans")
_BEFORE_JOIN_TYPES = frozenset(("join", "ping", "leave"))  # §4: all the others need a join
LEAVE_REASONS = (
    "leave",
    "disconnect",
    "timeout",
    "slow",
    "protocol",
    "kicked",
    "banned",
    "not_allowed",
    "replaced",
)
BYE_REASONS = (
    "leave",
    "timeout",
    "protocol",
    "shutdown",
    "kicked",
    "banned",
    "not_allowed",
    "replaced",
)
ERROR_CODES = (
    "bad_message",
    "not_joined",
    "already_joined",
    "invalid_name",
    "name_taken",
    "too_long",
    "rate_limited",
    "unknown_user",
    "server_full",
    "bad_identity",
    "name_reserved",
    "not_allowed",
    "banned",
    "not_op",
    "muted",
)
# §5: identity = raw Ed25519 public key, proof = Ed25519 signature.
IDENTITY_BYTES = 32
PROOF_BYTES = 64
MAX_REASON_BYTES = 200  # §5: kick/ban reason, UTF-8 bytes
MAX_MINUTES = 525_600  # §5: a year, the longest ban or mute
ACCESS_MODES = ("open", "allowlist")  # §5 welcome.access
FEATURES = ("identity", "moderation", "history", "action")  # §5 welcome.features


class ProtocolError(Exception):
    """Base of every error this module raises for bad input."""


class CloseSilently(ProtocolError):
    """The peer broke the framing or handshake: close without a reply (§1, §2)."""


class ByeProtocol(ProtocolError):
    """A record that is not a non-empty JSON array of typed objects (§3)."""


class Refused(ProtocolError):
    """A message refused with an `error` reply; the connection stays (§4)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Error:
    code: str
    message: str


# --- §1 framing ---


def encode_frame(body: bytes) -> bytes:
    """Prefix `body` with its u32be length."""
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


class FrameDecoder:
    """Incremental frame splitter: `feed` buffers, `next_frame` returns one body or None.

    `max_len` may be changed between two frames: a client's `key` (8192) and
    its first record (1 MiB) can arrive in the same read (§1). A bad length is
    refused as soon as its 4 bytes are buffered, before any body is kept.
    """

    def __init__(self, max_len: int = MAX_HANDSHAKE_FRAME):
        self.max_len = max_len
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame in progress

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    def wants(self) -> int:
        """How many more bytes would complete the next frame header or body (at least 1)."""
        if self._need is None:
            return max(1, LENGTH_BYTES - len(self._buf))
        return max(1, LENGTH_BYTES + self._need - len(self._buf))

    def next_frame(self) -> bytes | None:
        """One complete frame body, or None if more bytes are needed."""
        if self._need is None:
            if len(self._buf) < LENGTH_BYTES:
                return None
            length = int.from_bytes(self._buf[:LENGTH_BYTES], "big")
            if not 1 <= length <= self.max_len:
                raise CloseSilently(
                    f"frame of {length} bytes is outside the limit of 1..{self.max_len}"
                )
            self._need = length
        end = LENGTH_BYTES + self._need
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[LENGTH_BYTES:end])
        del self._buf[:end]
        self._need = None
        return body


# --- helpers for strict fields ---


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def strict_b64decode(value: Any, field: str) -> bytes:
    """Standard base64 with padding and no other characters (the page's `b64`)."""
    if not isinstance(value, str):
        raise CloseSilently(f"field {field!r} is not a string")
    try:
        raw = value.encode("ascii")
        data = base64.b64decode(raw, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise CloseSilently(f"field {field!r} is not strict base64") from None
    if base64.b64encode(data) != raw:  # non-canonical: stray bits in the last character
        raise CloseSilently(f"field {field!r} is not canonical base64")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_json(body: bytes) -> Any:
    """Strict UTF-8 JSON; raises ValueError (or RecursionError) on anything else."""
    text = body.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, parse_constant=_reject_constant)


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON. Raises ValueError for what JSON cannot carry."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_has_lone_surrogate(value: Any) -> bool:
    """True if any string inside a JSON value (keys included) holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


def _shown_int(value: int) -> str:
    """An integer for an error message: short enough to read."""
    return str(value) if -(10**12) < value < 10**12 else "a huge number"


# --- §2 handshake ---


@dataclass(frozen=True)
class Hello:
    key: bytes  # DER SubjectPublicKeyInfo
    nonce: bytes
    eph: bytes
    protocol: str = PROTOCOL_NAME


@dataclass(frozen=True)
class KeyExchange:
    nonce: bytes
    secret: bytes  # RSA-OAEP ciphertext
    eph: bytes


def _handshake_object(body: bytes, expected_type: str) -> dict[str, Any]:
    try:
        obj = loads_json(body)
    except (ValueError, RecursionError):
        raise CloseSilently(f"{expected_type} frame is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise CloseSilently(f"{expected_type} frame is not a JSON object")
    if obj.get("type") != expected_type:
        raise CloseSilently(f"expected a {expected_type!r} frame, got type {obj.get('type')!r}")
    return obj


def _sized(obj: dict[str, Any], field: str, size: int) -> bytes:
    value = strict_b64decode(obj.get(field), field)
    if len(value) != size:
        raise CloseSilently(f"field {field!r} is {len(value)} bytes, not {size}")
    return value


def encode_hello(hello: Hello) -> bytes:
    return dumps_json(
        {
            "type": "hello",
            "protocol": hello.protocol,
            "key": b64encode(hello.key),
            "nonce": b64encode(hello.nonce),
            "eph": b64encode(hello.eph),
        }
    )


def parse_hello(body: bytes) -> Hello:
    """Validate a `hello` frame (client side); any flaw is CloseSilently (§2)."""
    obj = _handshake_object(body, "hello")
    if obj.get("protocol") != PROTOCOL_NAME:
        raise CloseSilently(f"server speaks protocol {obj.get('protocol')!r}, not {PROTOCOL_NAME}")
    key = strict_b64decode(obj.get("key"), "key")
    if not key:
        raise CloseSilently("field 'key' is empty")
    return Hello(
        key=key, nonce=_sized(obj, "nonce", NONCE_BYTES), eph=_sized(obj, "eph", EPH_BYTES)
    )


def encode_key(msg: KeyExchange) -> bytes:
    return dumps_json(
        {
            "type": "key",
            "nonce": b64encode(msg.nonce),
            "secret": b64encode(msg.secret),
            "eph": b64encode(msg.eph),
        }
    )


def parse_key(body: bytes) -> KeyExchange:
    """Validate a `key` frame (server side); any flaw is CloseSilently (§2)."""
    obj = _handshake_object(body, "key")
    return KeyExchange(
        nonce=_sized(obj, "nonce", NONCE_BYTES),
        secret=strict_b64decode(obj.get("secret"), "secret"),
        eph=_sized(obj, "eph", EPH_BYTES),
    )


def encode_server_full(message: str) -> bytes:
    """The plaintext refusal sent instead of `hello` when the server is full (§2)."""
    return dumps_json({"type": "error", "code": "server_full", "message": message})


def parse_handshake_error(body: bytes) -> Error | None:
    """If a pre-key frame is the plaintext `server_full` error, return it."""
    try:
        obj = loads_json(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and obj.get("type") == "error":
        code, message = obj.get("code"), obj.get("message")
        if isinstance(code, str) and isinstance(message, str):
            return Error(code=code, message=message)
    return None


# --- §3 record plaintexts ---


def decode_record(
    plaintext: bytes, max_messages: int | None = MAX_CLIENT_RECORD_MESSAGES
) -> list[dict[str, Any]]:
    """A record's plaintext as its list of message objects, or ByeProtocol (§3).

    The default is the server's use: a client record holds at most 64
    messages. The client reads the server's batches with `max_messages=None`
    (they are not limited).
    """
    try:
        items = loads_json(plaintext)
    except (ValueError, RecursionError):
        raise ByeProtocol("record is not UTF-8 JSON") from None
    if not isinstance(items, list) or not items:
        raise ByeProtocol("record is not a non-empty JSON array")
    if max_messages is not None and len(items) > max_messages:
        raise ByeProtocol(f"record of {len(items)} messages exceeds the limit of {max_messages}")
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ByeProtocol("record holds an element that is not an object with a string type")
    return items


def encode_message(obj: dict[str, Any]) -> bytes:
    """One message object as compact UTF-8 JSON, ready to be reused in many records."""
    return dumps_json(obj)


def join_record(encoded: list[bytes]) -> bytes:
    """Several encoded messages as one record plaintext (a JSON array)."""
    return b"[" + b",".join(encoded) + b"]"


def pack_records(
    encoded: list[bytes],
    max_plaintext: int,
    max_messages: int = MAX_CLIENT_RECORD_MESSAGES,
) -> list[bytes]:
    """Client side: encoded messages as few record plaintexts as fit, in order (§1, §3).

    Each holds at most `max_messages` messages and `max_plaintext` bytes
    (welcome.max_record - TAG_BYTES). A message that cannot fit alone is a
    ValueError: the caller must not send it.
    """
    records: list[bytes] = []
    batch: list[bytes] = []
    size = 1  # the closing bracket; each message adds its length and one '[' or ','
    for item in encoded:
        if len(item) + 2 > max_plaintext:
            raise ValueError(
                f"a message of {len(item)} bytes does not fit a record of {max_plaintext}"
            )
        if batch and (len(batch) == max_messages or size + len(item) + 1 > max_plaintext):
            records.append(join_record(batch))
            batch, size = [], 1
        batch.append(item)
        size += len(item) + 1
    if batch:
        records.append(join_record(batch))
    return records
