"""One client connection and its stage of life.

Who owns what: a `Conn`'s fields are grouped by owner: fixed at accept; its
reader thread's; its flusher thread's; and those guarded by the hub lock,
which only hub (and delivery) methods write. Its stage of life is one `Phase`,
changed only through `Conn._enter` against the `TRANSITIONS` table.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections import deque
from typing import Any

import limits


def address_text(host: str) -> str:
    """§5: an IPv4 dotted quad, or RFC 5952 IPv6; an IPv4-mapped address as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Phase(enum.Enum):
    """A connection's stage of life (see TRANSITIONS)."""

    ACCEPTED = "accepted"  # hello sent or being sent; waiting for `key`
    KEY_READ = "key read"  # `key` read, keys being derived: shutdown owes it a bye (§4)
    KEYED = "keyed"  # secure channel up, a flusher serves it
    JOINED = "joined"  # has a name, receives the log
    CLOSING = "closing"  # unregistered; its flusher sends what is due (and a bye) or halts
    CLOSED = "closed"  # the socket is closed


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.ACCEPTED: frozenset({Phase.KEY_READ, Phase.CLOSING}),
    Phase.KEY_READ: frozenset({Phase.KEYED, Phase.CLOSING}),
    Phase.KEYED: frozenset({Phase.JOINED, Phase.CLOSING}),
    Phase.JOINED: frozenset({Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

ENDED = frozenset({Phase.CLOSING, Phase.CLOSED})
CHANNEL_UP = frozenset({Phase.KEYED, Phase.JOINED})


class Bucket:
    """§4 rate limit: capacity `rate`, refilled at `rate` tokens/s, full at join."""

    def __init__(self, rate: int, now: float):
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        if self.rate == 0:
            return True
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Conn:
    """One client connection; see the module docstring for who writes which field."""

    def __init__(self, sock: socket.socket, addr: tuple[Any, ...], now: float):
        # fixed at accept
        self.sock = sock
        self.ip = address_text(addr[0])
        self.peer = f"{addr[0]}:{addr[1]}"
        self.accepted_at = now
        # reader only (last_seen is read racily by the reaper: a float, stale is fine)
        self.last_seen = now
        self.rx: Any = None  # crypto_utils.RecordCipher, once keyed
        # its flusher only
        self.tx: Any = None  # crypto_utils.RecordCipher; set by the reader before it is keyed
        self.outbuf: memoryview | None = None  # the unsent rest of the current record
        self.close_after_send = False
        self.bye_sent = False
        # (lock) lifecycle
        self.phase = Phase.ACCEPTED
        self.ended = False  # closing or closed (read on every message: kept, not derived)
        self.slot: Any = None  # delivery.FlushSlot  # its flusher, from keyed until that lets go
        self.holds = 1  # reader, plus the flusher once keyed; the last one closes the socket
        self.reason: str | None = None  # why it ended (first cause wins)
        self.bye: str | None = None  # a bye to send after what is due, then close
        self.halted = False  # send nothing more (slow, broken record, flusher let go)
        # counts it as unjoined for its source (limits.py) until it joins or ends
        self.admission: limits.Admission | None = None
        self.bye_entry: bytes | None = None  # that bye with `by`/`message` (§5), if any
        # (lock) identity, rights and rate
        self.name: str | None = None
        self.name_json: bytes = b""
        self.identity: str | None = None  # proven fingerprint (§5), set at join
        self.op = False
        self.since_ms = 0  # when its join took the name
        self.muted_until: int | None = None  # ms since the epoch (§5 mute)
        self.bucket: Bucket | None = None
        # (lock) delivery
        self.cursor: int | None = None  # absolute log position; None until joined
        self.final_end: int | None = None  # once closing: deliver the log up to here
        self.private: deque[tuple[int, bytes]] = deque()  # (log position, entry)
        self.private_bytes = 0
        self.own: deque[tuple[int, int]] = deque()  # log spans of its own says, skipped
        self.own_bytes = 0

    def __repr__(self) -> str:
        return f"<Conn {self.peer} {self.name or '-'} {self.phase.value}>"

    def describe(self) -> str:
        """How log lines name this connection: its name and address, or the address."""
        return f"{self.name} ({self.peer})" if self.name else self.peer

    def _enter(self, phase: Phase) -> None:
        """Move to `phase`; a move the table does not allow is a bug."""
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"{self!r}: no transition {self.phase.value} -> {phase.value}")
        self.phase = phase
        self.ended = phase in ENDED
        if self.admission is not None and phase in (Phase.JOINED, Phase.CLOSING):
            self.admission.release(self)  # no longer unjoined: its source may open another
            self.admission = None
