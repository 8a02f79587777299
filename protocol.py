"""bcast/1 without I/O: frames, handshake messages and record plaintexts (PROTOCOL.md, rev. 2).

Bytes go in, validated messages come out; nothing here touches a socket, a
thread, the clock or a cipher, so all of it can be unit-tested and fuzzed alone.

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
import functools
import json
import unicodedata
from dataclasses import dataclass
from typing import Any, Union

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


# --- §4 names and text ---


# §4: scripts that may share one name (kanji with kana, hanja with hangul).
JAPANESE = frozenset({"CJK", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"})
KOREAN = frozenset({"CJK", "IDEOGRAPHIC", "HANGUL"})
MAX_NAME_MARKS = 3  # §4: more combining marks in a row than this is a pile, refused


def _check_name(raw: str) -> tuple[str, str | None]:
    """The normative name predicate of §4, step by step: (NFKC name, why refused or None).

    One function serves `valid_name` and `name_problem`, so they cannot disagree.
    """
    name = unicodedata.normalize("NFKC", raw)
    if not name:
        return name, "is empty"
    if len(name) > MAX_NAME_CHARS:
        return name, f"has {len(name)} characters ({MAX_NAME_CHARS} characters at most)"
    if not (name[0].isalpha() or unicodedata.category(name[0]) == "Nd"):
        return name, "must start with a letter or digit"
    scripts: dict[str, None] = {}  # ordered: the problem names them as they appear
    marks = 0
    for ch in name:
        cat = unicodedata.category(ch)
        marks = marks + 1 if cat[0] == "M" else 0
        if marks > MAX_NAME_MARKS:
            return name, f"has more than {MAX_NAME_MARKS} combining marks in a row"
        if ch in "_-." or cat == "Nd" or cat[0] == "M":
            continue
        if cat[0] != "L":
            return name, f"contains the character {_shown_char(ch)}"
        words = unicodedata.name(ch, "").split(" ")
        if "FILLER" in words:
            return name, "contains a blank-looking Hangul filler"
        scripts[words[0]] = None
    if len(scripts) <= 1 or scripts.keys() <= JAPANESE or scripts.keys() <= KOREAN:
        return name, None
    return name, f"mixes {_and_list([_script_title(s) for s in scripts])} letters"


def _shown_char(ch: str) -> str:
    """'!' (U+0021) for a visible character; U+200B ZERO WIDTH SPACE for one that is not."""
    code = f"U+{ord(ch):04X}"
    if ch.isprintable() and not ch.isspace():
        return f"{ch!r} ({code})"
    label = unicodedata.name(ch, "")  # ASCII; controls and surrogates have none
    return f"{code} {label}" if label else code


def _script_title(word: str) -> str:
    return "CJK" if word == "CJK" else (word.title() or "unnamed")


def _and_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def valid_name(raw: str) -> str | None:
    """The normative name predicate of §4: the name to use (NFKC), or None."""
    name, problem = _check_name(raw)
    return None if problem else name


def name_problem(raw: str) -> str | None:
    """Why §4 refuses `raw` as a name, in plain English, or None when it is valid.

    The reason reads after "the name " ("the name mixes Latin and Cyrillic
    letters"); it never repeats an invisible character or a lone surrogate.
    """
    return _check_name(raw)[1]


def name_key(raw: str) -> str:
    """How names are compared (§4): NFKC, then casefold."""
    return unicodedata.normalize("NFKC", raw).casefold()


def is_forbidden_char(ch: str) -> bool:
    """C0 except \\n and \\t, DEL, C1, or a lone surrogate (§4 text)."""
    o = ord(ch)
    if o < 0x20:
        return ch not in "\n\t"
    return 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF


# Characters refused in text, for a fast str.translate-free scan: every forbidden code point.
_FORBIDDEN = frozenset(
    [chr(o) for o in range(0x20) if chr(o) not in "\n\t"] + [chr(o) for o in range(0x7F, 0xA0)]
)


def text_problem(text: str, what: str = "text") -> str | None:
    """Why `text` is not valid content (empty, control character, surrogate), or None.

    `what` names the field in the reason ("reason is empty" for a kick's reason).
    """
    if not text:
        return f"{what} is empty"
    if not _FORBIDDEN.isdisjoint(text):
        bad = next(ch for ch in text if ch in _FORBIDDEN)
        return f"{what} contains the control character U+{ord(bad):04X}"
    if has_lone_surrogate(text):
        return f"{what} contains a lone surrogate"
    return None


def utf8_size(text: str) -> int:
    """UTF-8 length, counting a lone surrogate as the 3 bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))


# --- §4, §5, §6 client -> server messages ---


@dataclass(frozen=True)
class Join:
    name: str  # normalised (NFKC) and valid
    identity: bytes | None = None  # §5: raw 32-byte Ed25519 public key
    proof: bytes | None = None  # §5: 64-byte signature, not verified here (the server does)
    history: int | None = None  # §6: at most this many kept messages
    since: int | None = None  # §6: only kept messages with a greater id


@dataclass(frozen=True)
class Say:
    text: str
    action: bool = False  # §6: /me


@dataclass(frozen=True)
class Dm:
    to: str
    text: str


@dataclass(frozen=True)
class Who:
    pass


@dataclass(frozen=True)
class Ping:
    id: Any = None


@dataclass(frozen=True)
class Leave:
    pass


@dataclass(frozen=True)
class Kick:
    name: str  # as sent; matched like dm.to
    reason: str | None = None


@dataclass(frozen=True)
class Ban:
    name: str
    minutes: int | None = None  # None: until unbanned
    reason: str | None = None


@dataclass(frozen=True)
class Unban:
    who: str  # a fingerprint or an address, as `bans` lists it


@dataclass(frozen=True)
class Mute:
    name: str
    minutes: int  # 0 lifts the mute


@dataclass(frozen=True)
class Bans:
    """The operator asks for the list of bans (answered by `bans`, i.e. BanList)."""


@dataclass(frozen=True)
class Whois:
    name: str


ClientMessage = Union[Join, Say, Dm, Who, Ping, Leave, Kick, Ban, Unban, Mute, Bans, Whois]


def message_type(obj: dict[str, Any]) -> str:
    """The first check of §4's order: a known type, else `bad_message`."""
    kind = obj["type"]
    if kind not in CLIENT_TYPES:
        shown = kind if not has_lone_surrogate(kind) else repr(kind)
        raise Refused("bad_message", f"unknown message type {shown[:40]!r}")
    return kind


def requires_join(kind: str) -> bool:
    """§4: every type but join, ping and leave is refused (`not_joined`) before a join."""
    return kind not in _BEFORE_JOIN_TYPES


def is_op_type(kind: str) -> bool:
    """§5: kick, ban, unban, mute and bans are for operators (`not_op` for the others)."""
    return kind in OP_TYPES


def check_state(kind: str, joined_as: str | None, op: bool) -> None:
    """The second and third checks of §4's order, for a known type: joined, then operator.

    `joined_as` is the connection's name (None before a join), `op` whether its
    identity is an operator's. Raises Refused (`not_joined`, `already_joined`,
    `not_op`); the field, size and content checks follow in parse_client_message.
    """
    if joined_as is None:
        if kind not in _BEFORE_JOIN_TYPES:
            raise Refused("not_joined", f"join before sending {kind}")
    elif kind == "join":
        raise Refused("already_joined", f"you already joined as {joined_as}")
    if not op and kind in OP_TYPES:
        raise Refused("not_op", f"only an operator may send {kind}")


def _string_field(obj: dict[str, Any], field: str, kind: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise Refused("bad_message", f"{kind} needs a string field {field!r}")
    return value


def _optional_string(obj: dict[str, Any], field: str, kind: str) -> str | None:
    """Absent is None; present it must be a string (`null` is not absent, §4)."""
    if field not in obj:
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise Refused("bad_message", f"{kind} field {field!r} must be a string when present")
    return value


def _is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _shown_int(value: int) -> str:
    """An integer for an error message: short enough to read."""
    return str(value) if -(10**12) < value < 10**12 else "a huge number"


def _optional_count(obj: dict[str, Any], field: str, kind: str) -> int | None:
    """§6 history/since: absent is None, else a non-negative integer."""
    if field not in obj:
        return None
    value = obj[field]
    if not _is_int(value) or value < 0:
        raise Refused("bad_message", f"{kind} field {field!r} must be a non-negative integer")
    return value


def _target_name(obj: dict[str, Any], field: str, kind: str) -> str:
    """A user named in a request (dm.to, kick.name, ...): a string without lone surrogate."""
    value = _string_field(obj, field, kind)
    if has_lone_surrogate(value):
        raise Refused("bad_message", f"{kind} field {field!r} holds a lone surrogate")
    return value


def _checked_text(text: str, max_text: int) -> str:
    size = utf8_size(text)
    if size > max_text:
        raise Refused("too_long", f"text of {size} bytes exceeds the limit of {max_text}")
    problem = text_problem(text)
    if problem:
        raise Refused("bad_message", problem)
    return text


def _identity_pair(identity: str | None, proof: str | None) -> tuple[bytes | None, bytes | None]:
    """§5 `bad_identity`: both or neither, strict b64, 32 and 64 bytes."""
    if identity is None and proof is None:
        return None, None
    if proof is None:
        raise Refused("bad_identity", "an identity needs a proof")
    if identity is None:
        raise Refused("bad_identity", "a proof needs an identity")
    return (
        _identity_bytes(identity, "identity", IDENTITY_BYTES),
        _identity_bytes(proof, "proof", PROOF_BYTES),
    )


def _identity_bytes(value: str, field: str, size: int) -> bytes:
    try:
        data = strict_b64decode(value, field)
    except CloseSilently:
        raise Refused("bad_identity", f"the {field} is not strict base64") from None
    if len(data) != size:
        raise Refused("bad_identity", f"the {field} is {len(data)} bytes, not {size}")
    return data


def _parse_join(obj: dict[str, Any], max_text: int) -> Join:
    """§5 join order: fields (bad_message), name (invalid_name), identity (bad_identity)."""
    raw = _string_field(obj, "name", "join")
    identity = _optional_string(obj, "identity", "join")
    proof = _optional_string(obj, "proof", "join")
    history = _optional_count(obj, "history", "join")
    since = _optional_count(obj, "since", "join")
    name, problem = _check_name(raw)
    if problem:
        raise Refused("invalid_name", f"the name {problem}")
    key, signature = _identity_pair(identity, proof)
    return Join(name, key, signature, history, since)


def _parse_say(obj: dict[str, Any], max_text: int) -> Say:
    text = _string_field(obj, "text", "say")
    action = obj.get("action", False)
    if action is not True and action is not False:  # checked with the fields, before size
        raise Refused("bad_message", "say field 'action' must be true or false when present")
    return Say(_checked_text(text, max_text), action)


def _parse_dm(obj: dict[str, Any], max_text: int) -> Dm:
    to = _string_field(obj, "to", "dm")
    text = _checked_text(_string_field(obj, "text", "dm"), max_text)
    if has_lone_surrogate(to):
        raise Refused("bad_message", "dm recipient holds a lone surrogate")
    return Dm(to=to, text=text)


def _parse_ping(obj: dict[str, Any], max_text: int) -> Ping:
    ping_id = obj.get("id")
    if _json_has_lone_surrogate(ping_id):
        raise Refused("bad_message", "ping id holds a lone surrogate")
    try:
        dumps_json(ping_id)
    except ValueError:  # e.g. 1e400 parses as inf, which JSON cannot carry back
        raise Refused("bad_message", "ping id cannot be echoed in JSON") from None
    return Ping(ping_id)


def _reason(obj: dict[str, Any], kind: str) -> str | None:
    """§5 reason: optional; non-empty, at most 200 bytes, text's characters; else bad_message."""
    reason = _optional_string(obj, "reason", kind)
    if reason is None:
        return None
    size = utf8_size(reason)
    if size > MAX_REASON_BYTES:  # bad_message, not too_long (§5)
        raise Refused(
            "bad_message", f"reason of {size} bytes exceeds the limit of {MAX_REASON_BYTES}"
        )
    problem = text_problem(reason, "reason")
    if problem:
        raise Refused("bad_message", problem)
    return reason


def _minutes(obj: dict[str, Any], kind: str, least: int, required: bool) -> int | None:
    """§5 minutes: an integer in least..525600 (1.. for ban, 0.. and required for mute)."""
    if "minutes" not in obj:
        if required:
            raise Refused("bad_message", f"{kind} needs an integer field 'minutes'")
        return None
    value = obj["minutes"]
    if not _is_int(value):
        raise Refused("bad_message", f"{kind} field 'minutes' must be an integer")
    if not least <= value <= MAX_MINUTES:
        raise Refused(
            "bad_message",
            f"{kind} minutes must be {least} to {MAX_MINUTES}, not {_shown_int(value)}",
        )
    return value


def _parse_kick(obj: dict[str, Any], max_text: int) -> Kick:
    return Kick(_target_name(obj, "name", "kick"), _reason(obj, "kick"))


def _parse_ban(obj: dict[str, Any], max_text: int) -> Ban:
    name = _target_name(obj, "name", "ban")
    return Ban(name, _minutes(obj, "ban", 1, required=False), _reason(obj, "ban"))


def _parse_mute(obj: dict[str, Any], max_text: int) -> Mute:
    name = _target_name(obj, "name", "mute")
    minutes = _minutes(obj, "mute", 0, required=True)
    assert minutes is not None
    return Mute(name, minutes)


_PARSERS = {
    "say": _parse_say,
    "dm": _parse_dm,
    "join": _parse_join,
    "ping": _parse_ping,
    "who": lambda obj, max_text: Who(),
    "leave": lambda obj, max_text: Leave(),
    "kick": _parse_kick,
    "ban": _parse_ban,
    "unban": lambda obj, max_text: Unban(_target_name(obj, "who", "unban")),
    "mute": _parse_mute,
    "bans": lambda obj, max_text: Bans(),
    "whois": lambda obj, max_text: Whois(_target_name(obj, "name", "whois")),
}


def parse_client_message(obj: dict[str, Any], max_text: int = DEFAULT_MAX_TEXT) -> ClientMessage:
    """Fields, size and content checks of §4-§6 for one message; Refused on the first failure.

    The caller has already checked the type (`message_type`), the joined state
    and the operator right (`check_state`), which come first in §4's order;
    name-free, target, muted and rate checks need server state and come after.
    Join follows its own order (§5); its proof is verified by the server.
    """
    return _PARSERS[message_type(obj)](obj, max_text)


def encode_client_message(msg: ClientMessage) -> bytes:
    """Client side: one message object for a record (optional fields only when set)."""
    return encode_message(client_message(msg))


def client_message(msg: ClientMessage) -> dict[str, Any]:
    """Client side: the message object of `msg`, as parse_client_message reads it back."""
    if isinstance(msg, Say):
        if msg.action:
            return {"type": "say", "text": msg.text, "action": True}
        return {"type": "say", "text": msg.text}
    if isinstance(msg, Join):
        obj: dict[str, Any] = {"type": "join", "name": msg.name}
        if msg.identity is not None:
            obj["identity"] = b64encode(msg.identity)
        if msg.proof is not None:
            obj["proof"] = b64encode(msg.proof)
        if msg.history is not None:
            obj["history"] = msg.history
        if msg.since is not None:
            obj["since"] = msg.since
        return obj
    if isinstance(msg, Dm):
        return {"type": "dm", "to": msg.to, "text": msg.text}
    if isinstance(msg, Ping):
        return {"type": "ping", "id": msg.id}
    if isinstance(msg, (Kick, Ban)):
        obj = {"type": "kick" if isinstance(msg, Kick) else "ban", "name": msg.name}
        if isinstance(msg, Ban) and msg.minutes is not None:
            obj["minutes"] = msg.minutes
        if msg.reason is not None:
            obj["reason"] = msg.reason
        return obj
    if isinstance(msg, Mute):
        return {"type": "mute", "name": msg.name, "minutes": msg.minutes}
    if isinstance(msg, Unban):
        return {"type": "unban", "who": msg.who}
    if isinstance(msg, Whois):
        return {"type": "whois", "name": msg.name}
    return {"type": _BARE_TYPES[type(msg)]}


_BARE_TYPES: dict[type, str] = {Who: "who", Leave: "leave", Bans: "bans"}


# --- §4, §5, §6 server -> client messages ---


@dataclass(frozen=True)
class Welcome:
    name: str
    users: list[str]
    max_text: int
    rate: int
    # Revision 2 (§5, §6); a revision-1 server omits them and these defaults hold.
    access: str = "open"
    identity: str | None = None  # this client's fingerprint, if it proved one
    op: bool = False
    features: tuple[str, ...] = ()
    max_record: int = MAX_RECORD_FRAME  # the server's R (§1): keep each record within it
    last_id: int = 0
    gap: bool = False


@dataclass(frozen=True)
class Message:
    id: int
    sender: str
    text: str
    ts: int
    action: bool = False  # §6: /me
    history: bool = False  # §6: replayed after welcome, not live


@dataclass(frozen=True)
class DirectMessage:
    id: int
    sender: str
    to: str
    text: str
    ts: int


@dataclass(frozen=True)
class Joined:
    name: str
    identity: str | None = None  # §5: the joiner's fingerprint


@dataclass(frozen=True)
class Left:
    name: str
    reason: str
    by: str | None = None  # §5: the operator, for kicked and banned


@dataclass(frozen=True)
class Users:
    names: list[str]


@dataclass(frozen=True)
class Pong:
    id: Any


@dataclass(frozen=True)
class Error:
    code: str
    message: str


@dataclass(frozen=True)
class Bye:
    reason: str
    by: str | None = None  # §5: the operator who kicked or banned this client
    message: str | None = None  # §5: the operator's reason, when one was given


@dataclass(frozen=True)
class BanEntry:
    who: str  # a fingerprint or an address
    until: int | None  # ms since the epoch; None: until unbanned
    by: str
    reason: str | None


@dataclass(frozen=True)
class BanList:
    """The `bans` message (§5): the bans in force, sorted by `who`."""

    bans: list[BanEntry]


@dataclass(frozen=True)
class Muted:
    by: str
    until: int | None  # ms since the epoch; None: the mute was lifted
    name: str | None = None  # set in the operator's acknowledgement


@dataclass(frozen=True)
class WhoisInfo:
    """The `whois` answer (§5)."""

    name: str
    identity: str | None
    op: bool
    since: int  # ms since the epoch: the join that took the name
    address: str | None = None  # sent to operators only


@dataclass(frozen=True)
class Unknown:
    """A server message of a type this client does not know; ignored, not fatal."""

    type: str


ServerMessage = Union[
    Welcome,
    Message,
    DirectMessage,
    Joined,
    Left,
    Users,
    Pong,
    Error,
    Bye,
    BanList,
    Muted,
    WhoisInfo,
    Unknown,
]


def welcome(
    name: str,
    users: list[str],
    max_text: int,
    rate: int,
    *,
    access: str = "open",
    identity: str | None = None,
    op: bool = False,
    features: tuple[str, ...] = FEATURES,
    max_record: int = MAX_RECORD_FRAME,
    last_id: int = 0,
    gap: bool = False,
) -> dict[str, Any]:
    """`welcome`; the keyword fields of revision 2 default to an open server's values."""
    return {
        "type": "welcome",
        "name": name,
        "users": sorted(users),
        "max_text": max_text,
        "rate": rate,
        "access": access,
        "identity": identity,
        "op": op,
        "features": list(features),
        "max_record": max_record,
        "last_id": last_id,
        "gap": gap,
    }


def message(
    msg_id: int, sender: str, text: str, ts: int, action: bool = False, history: bool = False
) -> dict[str, Any]:
    """`message`; `action` and `history` go on the wire only when true (§6)."""
    obj = {"type": "message", "id": msg_id, "from": sender, "text": text, "ts": ts}
    if action:
        obj["action"] = True
    if history:
        obj["history"] = True
    return obj


def direct(msg_id: int, sender: str, to: str, text: str, ts: int) -> dict[str, Any]:
    return {"type": "dm", "id": msg_id, "from": sender, "to": to, "text": text, "ts": ts}


def joined(name: str, identity: str | None = None) -> dict[str, Any]:
    return {"type": "joined", "name": name, "identity": identity}


def left(name: str, reason: str, by: str | None = None) -> dict[str, Any]:
    """`left`; `by` (the operator) only when given (§5)."""
    obj = {"type": "left", "name": name, "reason": reason}
    if by is not None:
        obj["by"] = by
    return obj


def users(names: list[str]) -> dict[str, Any]:
    return {"type": "users", "names": sorted(names)}


def pong(ping_id: Any) -> dict[str, Any]:
    return {"type": "pong", "id": ping_id}


def error(code: str, text: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": text}


def bye(reason: str, by: str | None = None, message: str | None = None) -> dict[str, Any]:
    """`bye`; `by` and `message` only when given (§5: kicked or banned)."""
    obj = {"type": "bye", "reason": reason}
    if by is not None:
        obj["by"] = by
    if message is not None:
        obj["message"] = message
    return obj


def ban_entry(who: str, until: int | None, by: str, reason: str | None) -> dict[str, Any]:
    """One element of `bans.bans` (§5)."""
    return {"who": who, "until": until, "by": by, "reason": reason}


def bans(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """`bans`: the entries (see ban_entry) sorted by `who`, by code point (§5)."""
    return {"type": "bans", "bans": sorted(entries, key=lambda entry: entry["who"])}


def muted(by: str, until: int | None, name: str | None = None) -> dict[str, Any]:
    """`muted`: to the target without `name`, to the operator with it (§5)."""
    obj = {"type": "muted", "by": by, "until": until}
    if name is not None:
        obj["name"] = name
    return obj


def whois(
    name: str, identity: str | None, op: bool, since: int, address: str | None = None
) -> dict[str, Any]:
    """`whois`; `address` only when given: the server gives it to operators alone (§5)."""
    obj = {"type": "whois", "name": name, "identity": identity, "op": op, "since": since}
    if address is not None:
        obj["address"] = address
    return obj


# The same server messages as bytes, for the server's hot paths: it builds them
# under its lock, or once per message for every recipient, so they skip the dict
# and the JSON encoder, and take names and texts already encoded (`json_string`).
# Each equals `encode_message` of its builder above (tests/test_protocol.py).


def json_string(text: str) -> bytes:
    """A string as `encode_message` writes it: JSON, UTF-8, non-ASCII kept as is."""
    return json.dumps(text, ensure_ascii=False).encode("utf-8")


_ACCESS_JSON = {mode: b'"%s"' % mode.encode("ascii") for mode in ACCESS_MODES}
_REASON_JSON = {reason: b'"%s"' % reason.encode("ascii") for reason in LEAVE_REASONS}


@functools.lru_cache(maxsize=16)
def _strings_json(items: tuple[str, ...]) -> bytes:
    """A list of strings as encode_message writes it; the server passes one tuple each time."""
    return dumps_json(list(items))


def encode_welcome(
    name: bytes,
    users: list[bytes],
    max_text: int,
    rate: int,
    *,
    access: str = "open",
    identity: bytes = b"null",
    op: bool = False,
    features: tuple[str, ...] = FEATURES,
    max_record: int = MAX_RECORD_FRAME,
    last_id: int = 0,
    gap: bool = False,
) -> bytes:
    """`welcome`; `users` already in JSON and in order (the builder sorts, this does not).

    `identity` is JSON too: json_string(fingerprint), or b"null".
    """
    return (
        b'{"type":"welcome","name":%s,"users":[%s],"max_text":%d,"rate":%d,"access":%s,'
        b'"identity":%s,"op":%s,"features":%s,"max_record":%d,"last_id":%d,"gap":%s}'
        % (
            name,
            b",".join(users),
            max_text,
            rate,
            _ACCESS_JSON[access],
            identity,
            b"true" if op else b"false",
            _strings_json(tuple(features)),
            max_record,
            last_id,
            b"true" if gap else b"false",
        )
    )


def encode_message_parts(
    sender: bytes, text: bytes, ts: int, action: bool = False
) -> tuple[bytes, bytes]:
    """`message` around its id: the id is given under the server's lock, the rest is not."""
    tail = _MESSAGE_TAIL_ACTION if action else _MESSAGE_TAIL
    return b'{"type":"message","id":', tail % (sender, text, ts)


_MESSAGE_TAIL = b',"from":%s,"text":%s,"ts":%d}'
_MESSAGE_TAIL_ACTION = b',"from":%s,"text":%s,"ts":%d,"action":true}'


def mark_history(entry: bytes) -> bytes:
    """A kept `message` object as replayed after `welcome`: with "history": true (§6).

    `entry` is one object as encode_message_parts built it (no trailing comma).
    """
    if not entry.endswith(b"}"):
        raise ValueError("mark_history takes one encoded message object ending in '}'")
    return entry[:-1] + b',"history":true}'


def encode_direct(msg_id: int, sender: bytes, to: bytes, text: bytes, ts: int) -> bytes:
    return b'{"type":"dm","id":%d,"from":%s,"to":%s,"text":%s,"ts":%d}' % (
        msg_id,
        sender,
        to,
        text,
        ts,
    )


def encode_joined(name: bytes, identity_json: bytes = b"null") -> bytes:
    """`joined`; `identity_json` is json_string(fingerprint) or b"null" (§5)."""
    return b'{"type":"joined","name":%s,"identity":%s}' % (name, identity_json)


def encode_left(name: bytes, reason: str, by: bytes | None = None) -> bytes:
    """`left`; `by` is the operator's name in JSON (its name_json), only for kicks and bans."""
    reason_json = _REASON_JSON.get(reason) or json_string(reason)
    if by is None:
        return b'{"type":"left","name":%s,"reason":%s}' % (name, reason_json)
    return b'{"type":"left","name":%s,"reason":%s,"by":%s}' % (name, reason_json, by)


def encode_users(names: list[bytes]) -> bytes:
    """`users`; `names` already in JSON and in order (the builder sorts, this does not)."""
    return b'{"type":"users","names":[%s]}' % b",".join(names)


class _Fields:
    """Typed access to a server message's fields; a wrong one is ByeProtocol."""

    def __init__(self, obj: dict[str, Any]):
        self.obj = obj
        self.kind = obj["type"]

    def get(self, field: str, kind: type | tuple[type, ...]) -> Any:
        value = self.obj.get(field)
        # bool is an int in Python; JSON true/false must not pass as an id or a count.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ByeProtocol(f"server {self.kind} has a bad field {field!r}")
        return value

    def optional(self, field: str, kind: type, default: Any) -> Any:
        """A field a revision-1 server omits: absent is `default`; null is not absent."""
        return self.get(field, kind) if field in self.obj else default

    def nullable(self, field: str, kind: type) -> Any:
        """A field that is present and either null or of `kind`."""
        if self.obj.get(field, ...) is None:
            return None
        return self.get(field, kind)

    def strings(self, field: str) -> list[str]:
        values = self.get(field, list)
        if not all(isinstance(v, str) for v in values):
            raise ByeProtocol(f"server {self.kind} field {field!r} is not a list of strings")
        return values


def _parse_welcome(f: _Fields) -> Welcome:
    max_record = f.optional("max_record", int, MAX_RECORD_FRAME)
    if not MIN_SERVER_RECORD_FRAME <= max_record <= MAX_RECORD_FRAME:  # §1
        raise ByeProtocol(
            f"server welcome max_record of {_shown_int(max_record)} is outside "
            f"{MIN_SERVER_RECORD_FRAME}..{MAX_RECORD_FRAME}"
        )
    features = tuple(f.strings("features")) if "features" in f.obj else ()
    return Welcome(
        f.get("name", str),
        f.strings("users"),
        f.get("max_text", int),
        f.get("rate", int),
        access=f.optional("access", str, "open"),
        identity=f.nullable("identity", str) if "identity" in f.obj else None,
        op=f.optional("op", bool, False),
        features=features,
        max_record=max_record,
        last_id=f.optional("last_id", int, 0),
        gap=f.optional("gap", bool, False),
    )


def _parse_bans(f: _Fields) -> BanList:
    entries = []
    for item in f.get("bans", list):
        if not isinstance(item, dict):
            raise ByeProtocol("server bans holds an element that is not an object")
        entry = _Fields({"type": "bans entry", **item})
        entries.append(
            BanEntry(
                entry.get("who", str),
                entry.nullable("until", int),
                entry.get("by", str),
                entry.nullable("reason", str),
            )
        )
    return BanList(entries)


def parse_server_message(obj: dict[str, Any]) -> ServerMessage:
    """Client side: validate one server message object; malformed is ByeProtocol."""
    f = _Fields(obj)
    kind = f.kind
    if kind == "message":
        return Message(
            f.get("id", int),
            f.get("from", str),
            f.get("text", str),
            f.get("ts", int),
            f.optional("action", bool, False),
            f.optional("history", bool, False),
        )
    if kind == "dm":
        return DirectMessage(
            f.get("id", int),
            f.get("from", str),
            f.get("to", str),
            f.get("text", str),
            f.get("ts", int),
        )
    if kind == "welcome":
        return _parse_welcome(f)
    if kind == "joined":
        identity = f.nullable("identity", str) if "identity" in obj else None
        return Joined(f.get("name", str), identity)
    if kind == "left":
        return Left(f.get("name", str), f.get("reason", str), f.optional("by", str, None))
    if kind == "users":
        return Users(f.strings("names"))
    if kind == "pong":
        return Pong(obj.get("id"))
    if kind == "error":
        return Error(f.get("code", str), f.get("message", str))
    if kind == "bye":
        return Bye(
            f.get("reason", str), f.optional("by", str, None), f.optional("message", str, None)
        )
    if kind == "bans":
        return _parse_bans(f)
    if kind == "muted":
        return Muted(f.get("by", str), f.nullable("until", int), f.optional("name", str, None))
    if kind == "whois":
        return WhoisInfo(
            f.get("name", str),
            f.nullable("identity", str),
            f.get("op", bool),
            f.get("since", int),
            f.optional("address", str, None),
        )
    return Unknown(kind)
