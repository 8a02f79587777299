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

import unicodedata
from dataclasses import dataclass
from typing import Any, Union

from messages import (  # re-exported: import everything from `protocol`
    BanEntry as BanEntry,
)
from messages import (
    BanList as BanList,
)
from messages import (
    Bye as Bye,
)
from messages import (
    DirectMessage as DirectMessage,
)
from messages import (
    Joined as Joined,
)
from messages import (
    Left as Left,
)
from messages import (
    Message as Message,
)
from messages import (
    Muted as Muted,
)
from messages import (
    Pong as Pong,
)
from messages import (
    ServerMessage as ServerMessage,
)
from messages import (
    Unknown as Unknown,
)
from messages import (
    Users as Users,
)
from messages import (
    Welcome as Welcome,
)
from messages import (
    WhoisInfo as WhoisInfo,
)
from messages import (
    ban_entry as ban_entry,
)
from messages import (
    bans as bans,
)
from messages import (
    bye as bye,
)
from messages import (
    direct as direct,
)
from messages import (
    encode_direct as encode_direct,
)
from messages import (
    encode_joined as encode_joined,
)
from messages import (
    encode_left as encode_left,
)
from messages import (
    encode_message_parts as encode_message_parts,
)
from messages import (
    encode_users as encode_users,
)
from messages import (
    encode_welcome as encode_welcome,
)
from messages import (
    error as error,
)
from messages import (
    joined as joined,
)
from messages import (
    json_string as json_string,
)
from messages import (
    left as left,
)
from messages import (
    mark_history as mark_history,
)
from messages import (
    message as message,
)
from messages import (
    muted as muted,
)
from messages import (
    parse_server_message as parse_server_message,
)
from messages import (
    pong as pong,
)
from messages import (
    users as users,
)
from messages import (
    welcome as welcome,
)
from messages import (
    whois as whois,
)
from wire import (
    _BEFORE_JOIN_TYPES,
    _json_has_lone_surrogate,
    _shown_int,
)
from wire import (  # re-exported: import everything from `protocol`
    ACCESS_MODES as ACCESS_MODES,
)
from wire import (
    BYE_REASONS as BYE_REASONS,
)
from wire import (
    CLIENT_TYPES as CLIENT_TYPES,
)
from wire import (
    DEFAULT_MAX_TEXT as DEFAULT_MAX_TEXT,
)
from wire import (
    EPH_BYTES as EPH_BYTES,
)
from wire import (
    ERROR_CODES as ERROR_CODES,
)
from wire import (
    FEATURES as FEATURES,
)
from wire import (
    IDENTITY_BYTES as IDENTITY_BYTES,
)
from wire import (
    LEAVE_REASONS as LEAVE_REASONS,
)
from wire import (
    LENGTH_BYTES as LENGTH_BYTES,
)
from wire import (
    MAX_CLIENT_RECORD_MESSAGES as MAX_CLIENT_RECORD_MESSAGES,
)
from wire import (
    MAX_HANDSHAKE_FRAME as MAX_HANDSHAKE_FRAME,
)
from wire import (
    MAX_MINUTES as MAX_MINUTES,
)
from wire import (
    MAX_NAME_CHARS as MAX_NAME_CHARS,
)
from wire import (
    MAX_REASON_BYTES as MAX_REASON_BYTES,
)
from wire import (
    MAX_RECORD_FRAME as MAX_RECORD_FRAME,
)
from wire import (
    MAX_RECORD_PLAINTEXT as MAX_RECORD_PLAINTEXT,
)
from wire import (
    MIN_SERVER_RECORD_FRAME as MIN_SERVER_RECORD_FRAME,
)
from wire import (
    NONCE_BYTES as NONCE_BYTES,
)
from wire import (
    OP_TYPES as OP_TYPES,
)
from wire import (
    PROOF_BYTES as PROOF_BYTES,
)
from wire import (
    PROTOCOL_NAME as PROTOCOL_NAME,
)
from wire import (
    TAG_BYTES as TAG_BYTES,
)
from wire import (
    ByeProtocol as ByeProtocol,
)
from wire import (
    CloseSilently as CloseSilently,
)
from wire import (
    Error as Error,
)
from wire import (
    FrameDecoder as FrameDecoder,
)
from wire import (
    Hello as Hello,
)
from wire import (
    KeyExchange as KeyExchange,
)
from wire import (
    ProtocolError as ProtocolError,
)
from wire import (
    Refused as Refused,
)
from wire import (
    b64encode as b64encode,
)
from wire import (
    decode_record as decode_record,
)
from wire import (
    dumps_json as dumps_json,
)
from wire import (
    encode_frame as encode_frame,
)
from wire import (
    encode_hello as encode_hello,
)
from wire import (
    encode_key as encode_key,
)
from wire import (
    encode_message as encode_message,
)
from wire import (
    encode_server_full as encode_server_full,
)
from wire import (
    has_lone_surrogate as has_lone_surrogate,
)
from wire import (
    join_record as join_record,
)
from wire import (
    loads_json as loads_json,
)
from wire import (
    pack_records as pack_records,
)
from wire import (
    parse_handshake_error as parse_handshake_error,
)
from wire import (
    parse_hello as parse_hello,
)
from wire import (
    parse_key as parse_key,
)
from wire import (
    strict_b64decode as strict_b64decode,
)

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


def parse_known(kind: str, obj: dict[str, Any], max_text: int = DEFAULT_MAX_TEXT) -> ClientMessage:
    """parse_client_message for a `kind` the caller has already had from message_type."""
    return _PARSERS[kind](obj, max_text)


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
