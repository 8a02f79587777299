"""bcast/1 without I/O, part 3: the server's messages to clients (PROTOCOL.md §4-§6).

Dict builders (the readable form), byte builders for the server's hot paths
(each pinned equal to its dict builder by tests/test_protocol.py), and the
client's parser. `protocol.py` re-exports everything here; import from `protocol`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Union

from wire import (
    ACCESS_MODES,
    FEATURES,
    LEAVE_REASONS,
    MAX_RECORD_FRAME,
    MIN_SERVER_RECORD_FRAME,
    ByeProtocol,
    Error,
    _shown_int,
    dumps_json,
)

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
