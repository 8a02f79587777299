"""The hub: the registry of connections and the shared log, behind one lock.

Who owns what:
  * `Hub` owns the lock, the registry (every open connection, the joined names)
    and the `SharedLog`. Its public methods are the only way in: one locked
    call per event (admit, keyed, join, say, dm, reply, drop, ...), each
    returning what the caller must do outside the lock (wake a socket, log a
    line). After releasing the lock it wakes the flushers that work was queued
    for, through their `FlushSlot`'s wake callback.
  * `Conn` is one connection. Its fields are grouped by owner: fixed at
    accept; the reader's; the flusher's; and those guarded by the hub lock,
    which only hub methods write. Its stage of life is one `Phase`, changed
    only through `Conn._enter` against the `TRANSITIONS` table.
  * `FlushSlot` is the part of a flusher that other threads touch (its
    members, the dirty set, when to scan): the hub owns it, the flusher
    thread reads it through hub calls.
No I/O, no crypto and no JSON of user data happen under the lock: only list
and bytes bookkeeping. This module opens no socket and starts no thread.
"""

from __future__ import annotations

import bisect
import enum
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import protocol
from access import Access, Listed
from store import Ban, Binding, StoredMessage

# Per record: the JSON array brackets replace one trailing comma, so budget + 1.
RECORD_BUDGET = protocol.MAX_RECORD_PLAINTEXT - 1
# How much log may accumulate between two scans for slow receivers (and trimming).
COMPACT_STEP_MAX_BYTES = 1024 * 1024
# `joined` and `left` wait for company before the flushers scan every member for
# them: 50 ms, or 10 times the last full scan if longer, so that presence news
# alone keeps a flusher busy at most a tenth of the time. A say is delivered at
# once and takes any waiting news with it, in log order. Without the wait, N
# clients joining at once cost N scans of N members (bench/README.md).
PRESENCE_DELAY_S = 0.05
PRESENCE_SCAN_FACTOR = 10


def entry(obj: dict[str, Any]) -> bytes:
    """A message as it sits in the log or a private queue: JSON plus a trailing comma."""
    return protocol.encode_message(obj) + b","


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
        self.ip = str(addr[0])
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
        self.slot: FlushSlot | None = None  # its flusher, from keyed until that lets go
        self.holds = 1  # reader, plus the flusher once keyed; the last one closes the socket
        self.reason: str | None = None  # why it ended (first cause wins)
        self.bye: str | None = None  # a bye to send after what is due, then close
        self.halted = False  # send nothing more (slow, broken record, flusher let go)
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

    @property
    def ended(self) -> bool:
        return self.phase in (Phase.CLOSING, Phase.CLOSED)


class FlushSlot:
    """The lock-guarded side of one flusher thread; the hub owns it."""

    def __init__(self, index: int, wake: Callable[[], None]):
        self.index = index
        self.wake = wake  # called outside the lock to end the flusher's poll()
        self.members: set[Conn] = set()
        self.dirty: set[Conn] = set()
        self.seen_end = 0  # log end at the last full scan
        self.lazy_due: float | None = None  # when to scan for entries that may wait
        self.scan_s = 0.0  # how long its last full scan took
        self.sleeping = False
        self.closed = False


class SharedLog:
    """Every broadcast, encoded once, in one bytearray; receivers hold cursors into it."""

    def __init__(self, max_pending: int):
        self.data = bytearray()
        self.base = 0  # absolute position of data[0]
        self.ends: list[int] = []  # absolute end of each entry, ascending
        self.urgent_end = 0  # end after the last entry to deliver at once
        self.step = max(1024, min(COMPACT_STEP_MAX_BYTES, max_pending // 4))
        self.compact_at = self.step

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def append(self, data: bytes, urgent: bool) -> tuple[int, int]:
        """Add one message object; the log holds each followed by a comma."""
        start = self.end
        self.data += data
        self.data += b","
        end = start + len(data) + 1
        self.ends.append(end)
        if urgent:
            self.urgent_end = end
        return start, end

    def slice(self, start: int, stop: int) -> bytes:
        return bytes(self.data[start - self.base : stop - self.base])

    def cut_before(self, pos: int, room: int) -> int:
        """The furthest entry end within `room` bytes after `pos` (pos if none fits)."""
        i = bisect.bisect_right(self.ends, pos + room)
        return self.ends[i - 1] if i else pos

    def due_for_compaction(self) -> bool:
        return len(self.data) >= self.compact_at

    def trim(self, low: int, crossing: int, max_pending: int) -> None:
        """Forget what every cursor has passed; schedule the next scan (see Hub._compact)."""
        if low > self.base:
            del self.data[: low - self.base]
            self.base = low
            del self.ends[: bisect.bisect_right(self.ends, low)]
        soonest = self.end + max(1, max_pending // 64)
        self.compact_at = max(crossing, soonest) - self.base


class Taken:
    """What a flusher is to do for one connection, decided under the lock."""

    __slots__ = ("final", "pieces", "retire")

    def __init__(self, pieces: list[bytes], final: bool = False, retire: bool = False):
        self.pieces = pieces
        self.final = final  # close once these are sent (they end with a bye)
        self.retire = retire  # nothing more will come: let go of the connection


@dataclass(frozen=True)
class JoinRequest:
    """A join that passed every check the reader can make alone (fields, name, proof)."""

    name: str
    name_json: bytes
    identity: str | None  # the proven fingerprint
    identity_json: bytes  # it as JSON, or b"null"
    history: int | None
    since: int | None
    now: float  # monotonic, for the rate bucket
    now_ms: int  # wall clock, for bans, mutes and `since`


@dataclass
class JoinResult:
    outcome: str  # "ok", "gone", or the error code that refuses it
    message: str = ""
    binding: Binding | None = None  # a new or moved binding to store (§5 open mode)
    replaced: list[Conn] = field(default_factory=list)  # connections it took over


@dataclass(frozen=True)
class SayEntry:
    """A say's `message` bytes around its id, built by the reader outside the lock."""

    head: bytes
    tail: bytes
    now: float
    now_ms: int


@dataclass(frozen=True)
class WhoisFacts:
    name: str
    identity: str | None
    op: bool
    since_ms: int
    address: str | None


class Hub:
    """The registry and the log. Every public method takes the lock itself."""

    def __init__(
        self,
        max_clients: int,
        max_pending: int,
        rate: int,
        *,
        max_text: int = protocol.DEFAULT_MAX_TEXT,
        max_record: int = protocol.MAX_RECORD_FRAME,
        access: Access | None = None,
        history: int = 0,
        kept: Sequence[StoredMessage] = (),
        first_id: int = 1,
    ):
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.rate = rate
        self.max_text = max_text
        self.max_record = max_record
        self._access = access if access is not None else Access(frozenset(), None, [], [])
        self._by_identity: dict[str, Conn] = {}  # proven fingerprint -> joined connection
        # §6: the last `history` public messages (id, the object's bytes), oldest first,
        # and those not yet handed to the state writer.
        self._history = history
        self._kept: deque[StoredMessage] = deque(list(kept)[-history:] if history else [])
        self._unsaved: list[StoredMessage] = []
        # The highest message id that is no longer kept (or may not be: before a restart
        # the store held only the last `history`); a `since` under it has a gap.
        self._forgotten = (self._kept[0].id - 1) if self._kept else first_id - 1
        # Guards everything below, every Conn's (lock) fields and every FlushSlot.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # notified when `_conns` empties
        self._conns: set[Conn] = set()  # every open connection (max_clients counts these)
        self._joined: dict[str, Conn] = {}  # name_key -> joined connection
        # The joined names as JSON strings in code point order (their byte order:
        # names hold no quote, backslash or control character). `welcome` and
        # `users` are a join of these: no JSON and no sort per join under the lock.
        self._names: list[bytes] = []
        self._receivers: set[Conn] = set()  # connections whose flusher reads the log
        self._slots: list[FlushSlot] = []
        self._next_slot = 0
        self._wakes: list[FlushSlot] = []  # slots to wake once the lock is released
        self._log = SharedLog(max_pending)
        self._next_id = first_id
        self._shutting_down = False

    # --- the lock ---

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock; on release, wake the flushers that work was queued for."""
        self._lock.acquire()
        try:
            yield
        finally:
            wakes = self._wakes
            if wakes:
                self._wakes = []
            self._lock.release()
            for slot in wakes:
                slot.wake()

    def _held(self) -> bool:
        assert self._lock.locked(), "the hub lock must be held"
        return True

    # --- flushers ---

    def add_slot(self, wake: Callable[[], None]) -> FlushSlot:
        """Register a flusher (before any connection is keyed); returns its slot."""
        with self._locked():
            slot = FlushSlot(len(self._slots), wake)
            self._slots.append(slot)
            return slot

    def _wake_slot(self, slot: FlushSlot) -> None:
        assert self._held()
        if slot.sleeping:
            slot.sleeping = False
            self._wakes.append(slot)

    def _want(self, conn: Conn) -> None:
        """Have `conn`'s flusher look at it soon (new private item, bye, halt)."""
        assert self._held()
        slot = conn.slot
        if slot is not None:
            slot.dirty.add(conn)
            self._wake_slot(slot)

    def _append(self, data: bytes, *, urgent: bool = True) -> tuple[int, int]:
        """Add one entry for every receiver; `urgent=False` lets it wait for company."""
        assert self._held()
        span = self._log.append(data, urgent)
        # Each flusher rescans its members: work per flush, not per message x recipient.
        for slot in self._slots:
            if urgent:
                self._wake_slot(slot)
            elif slot.lazy_due is None:  # the first since its last scan sets the clock
                slot.lazy_due = time.monotonic() + max(
                    PRESENCE_DELAY_S, PRESENCE_SCAN_FACTOR * slot.scan_s
                )
                self._wake_slot(slot)  # to sleep until then, not forever
        return span

    # --- connections: accept to keyed (reader thread, accept thread) ---

    def admit(self, conn: Conn) -> bool:
        """Count a new connection; False when max_clients are open already."""
        with self._locked():
            if len(self._conns) >= self.max_clients or self._shutting_down:
                return False
            self._conns.add(conn)
            return True

    def key_read(self, conn: Conn) -> bool:
        """The reader has read `key`; False if shutdown came first (it woke the socket)."""
        with self._locked():
            if self._shutting_down or conn.ended:
                return False
            conn._enter(Phase.KEY_READ)
            return True

    def keyed(self, conn: Conn) -> str:
        """The channel is up: give `conn` a flusher.

        Returns "ok", "gone" (it was closed meanwhile, e.g. by the reaper) or
        "shutdown" (the reader must send the shutdown bye itself: no flusher
        will serve it).
        """
        with self._locked():
            if self._shutting_down:
                conn._enter(Phase.CLOSING)
                conn.reason = conn.reason or "shutdown"
                return "shutdown"
            if conn.ended:
                return "gone"
            conn._enter(Phase.KEYED)
            slot = self._slots[self._next_slot % len(self._slots)]
            self._next_slot += 1
            conn.slot = slot
            conn.holds += 1
            slot.members.add(conn)
            self._receivers.add(conn)
            return "ok"

    # --- events of a keyed connection (its reader thread) ---

    def join(self, conn: Conn, req: JoinRequest) -> JoinResult:
        """§4/§5/§6 join: checks in §5's order after bad_identity, then register, queue
        `welcome` and the asked-for history, announce `joined` (or take a name over)."""
        key = protocol.name_key(req.name)
        with self._locked():
            if conn.phase is not Phase.KEYED:
                return JoinResult("gone")
            refusal = self._access.refusal(req.identity, conn.ip, key, req.now_ms)
            if refusal is not None:
                return JoinResult(*refusal)
            holder = self._joined.get(key)
            takeover = holder is not None and req.identity is not None
            takeover = takeover and holder.identity == req.identity
            if holder is not None and not takeover:
                return JoinResult("name_taken", f"the name {req.name} is taken")
            replaced: list[Conn] = []
            if takeover:  # §5: the others see neither left nor joined
                self._replace(holder, announce=False)
                replaced.append(holder)
            elsewhere = self._by_identity.get(req.identity) if req.identity else None
            if elsewhere is not None:  # the same identity under another name: left(replaced)
                self._replace(elsewhere, announce=True)
                replaced.append(elsewhere)
            self._register(conn, req, key, announce=not takeover)
            binding = None
            if req.identity is not None:
                binding = self._access.bind(req.identity, req.name, key, req.now_ms)
            return JoinResult("ok", binding=binding, replaced=replaced)

    def _register(self, conn: Conn, req: JoinRequest, key: str, announce: bool) -> None:
        assert self._held()
        if announce:
            self._append(protocol.encode_joined(req.name_json, req.identity_json), urgent=False)
        names = self._names
        replay, gap = self._replay(req.history, req.since)
        welcome = protocol.encode_welcome(
            req.name_json,
            names,
            self.max_text,
            self.rate,
            access=self._access.mode,
            identity=req.identity_json,
            op=self._access.is_op(req.identity),
            max_record=self.max_record,
            last_id=self._next_id - 1,
            gap=gap,
        )
        self._joined[key] = conn
        bisect.insort(names, req.name_json)
        if req.identity is not None:
            self._by_identity[req.identity] = conn
        conn._enter(Phase.JOINED)
        conn.name, conn.name_json, conn.identity = req.name, req.name_json, req.identity
        conn.op = self._access.is_op(req.identity)
        conn.since_ms = req.now_ms
        conn.muted_until = self._access.muted_until(req.identity, req.now_ms)
        conn.cursor = self._log.end
        conn.bucket = Bucket(self.rate, req.now)
        self._push_private(conn, welcome + b",")
        for kept in replay:
            self._push_private(conn, protocol.mark_history(kept.entry) + b",")

    def _replay(self, history: int | None, since: int | None) -> tuple[list[StoredMessage], bool]:
        """§6: the kept messages a join asked for (none unless it asked), and `gap`:
        whether a message above `since` will not be sent (forgotten, or over `history`)."""
        if history is None and since is None:
            return [], False
        kept = list(self._kept)
        if since is not None:
            kept = [m for m in kept if m.id > since]
        wanted = kept if history is None else kept[len(kept) - history :] if history else []
        gap = since is not None and (self._forgotten > since or len(wanted) < len(kept))
        return wanted, gap

    def _replace(self, old: Conn, announce: bool) -> None:
        """§5 take-over: `old` gets bye(replaced); `left` (replaced) only if `announce`."""
        assert self._held()
        self._remove(old, "replaced", announce=announce)
        old.bye = "replaced"

    def say(self, conn: Conn, say: SayEntry) -> tuple[str, list[Conn]]:
        """§4 say: assign an id, log it, keep it (§6). Returns (outcome, dropped as slow)."""
        with self._locked():
            if conn.phase is not Phase.JOINED:
                return "gone", []
            if self._is_muted(conn, say.now_ms):
                return "muted", []
            if not conn.bucket.take(say.now):
                return "rate_limited", []
            msg_id = self._next_id
            self._next_id += 1
            message = b"%s%d%s" % (say.head, msg_id, say.tail)
            span = self._append(message)
            conn.own.append(span)
            conn.own_bytes += span[1] - span[0]
            if self._history:
                if len(self._kept) == self._history:
                    self._forgotten = self._kept[0].id
                kept = StoredMessage(msg_id, message)
                self._kept.append(kept)
                self._unsaved.append(kept)
            else:
                self._forgotten = msg_id
            return "ok", self._compact()

    def dm(
        self, conn: Conn, to: str, text_json: bytes, ts: int, now: float
    ) -> tuple[str, Conn | None]:
        """§4 dm. Returns (outcome, a target just dropped as slow or None)."""
        with self._locked():
            if conn.phase is not Phase.JOINED:
                return "gone", None
            target = self._joined.get(protocol.name_key(to))
            if target is None:
                return "unknown_user", None
            if self._is_muted(conn, ts):
                return "muted", None
            if not conn.bucket.take(now):
                return "rate_limited", None
            msg_id = self._next_id
            self._next_id += 1
            data = protocol.encode_direct(msg_id, conn.name_json, target.name_json, text_json, ts)
            self._push_private(target, data + b",")
            if self._lag(target) > self.max_pending and self._halt(target, "slow"):
                return "ok", target
            return "ok", None

    def _is_muted(self, conn: Conn, now_ms: int) -> bool:
        until = conn.muted_until
        if until is not None and until <= now_ms:
            conn.muted_until = until = None
        return until is not None

    def users(self, conn: Conn, now: float) -> bytes | None:
        """§4 who: the `users` entry, or None when the rate limit says no (revision 2)."""
        with self._locked():
            if conn.bucket is not None and not conn.bucket.take(now):
                return None
            return protocol.encode_users(self._names) + b","

    def find(self, name: str) -> Conn | None:
        """The joined connection under `name` (matched like dm.to), if any."""
        with self._locked():
            return self._joined.get(protocol.name_key(name))

    def whois(self, conn: Conn, name: str, now: float) -> tuple[str, WhoisFacts | None]:
        """§5 whois: ("ok", facts), ("unknown_user", None) or ("rate_limited", None)."""
        with self._locked():
            target = self._joined.get(protocol.name_key(name))
            if target is None:
                return "unknown_user", None
            if not conn.bucket.take(now):
                return "rate_limited", None
            address = target.ip if conn.op else None
            facts = WhoisFacts(target.name, target.identity, target.op, target.since_ms, address)
            return "ok", facts

    # --- moderation (§5; the reader has checked the operator and the fields) ---

    def kick(self, target: Conn, reason: str, by: Conn, bye_entry: bytes) -> bool:
        """Kick or ban `target`: bye (`reason`, with by/message), left (`reason`, by).

        False if `target` is no longer joined.
        """
        with self._locked():
            if target.phase is not Phase.JOINED:
                return False
            self._remove(target, reason, by_json=by.name_json)
            target.bye = reason
            target.bye_entry = bye_entry
            return True

    def ban(
        self, target: Conn, ban_for: Callable[[str], Ban], by: Conn, bye_entry: bytes
    ) -> Ban | None:
        """§5 ban: bans the target's identity (or its address), then kicks it."""
        with self._locked():
            if target.phase is not Phase.JOINED:
                return None
            ban = ban_for(target.identity or target.ip)
            self._access.add_ban(ban)
            self._remove(target, "banned", by_json=by.name_json)
            target.bye = "banned"
            target.bye_entry = bye_entry
            return ban

    def unban(self, who: str, now_ms: int) -> bool:
        with self._locked():
            return self._access.remove_ban(who, now_ms)

    def bans(self, now_ms: int) -> list[Ban]:
        with self._locked():
            return self._access.active_bans(now_ms)

    def mute(
        self, target: Conn, until: int | None, op: Conn, to_target: bytes, to_op: bytes
    ) -> bool:
        """§5 mute (until None lifts it): tell the target and the operator. False if gone."""
        with self._locked():
            if target.phase is not Phase.JOINED:
                return False
            target.muted_until = until
            if target.identity is not None:
                self._access.mute(target.identity, until)
            self._push_private(target, to_target + b",")
            if op is not target:
                self._push_private(op, to_op + b",")
            return True

    def set_allowlist(self, allow: dict[str, Listed]) -> list[Conn]:
        """§5 SIGHUP: the new list applies at once; returns the clients it shuts out."""
        with self._locked():
            self._access.set_allowlist(allow)
            out: list[Conn] = []
            for key, conn in list(self._joined.items()):
                if not self._access.still_allowed(conn.identity, key):
                    self._remove(conn, "not_allowed")
                    conn.bye = "not_allowed"
                    out.append(conn)
                else:
                    conn.op = self._access.is_op(conn.identity)
            return out

    # --- §6: what the state writer persists ---

    def unsaved(self) -> list[StoredMessage]:
        """The kept messages not yet handed to the writer, in id order; they are now."""
        with self._locked():
            batch, self._unsaved = self._unsaved, []
            return batch

    def last_id(self) -> int:
        with self._locked():
            return self._next_id - 1

    def reply(self, conn: Conn, data: bytes) -> bool:
        """Queue one encoded reply for `conn` alone; True if that made it too slow (dropped)."""
        with self._locked():
            self._push_private(conn, data)
            return self._lag(conn) > self.max_pending and self._halt(conn, "slow")

    def leave(self, conn: Conn) -> None:
        """§4 leave: announce it, then its flusher sends `bye` (leave) and closes."""
        with self._locked():
            if self._remove(conn, "leave"):
                conn.bye = "leave"

    def drop(self, conn: Conn, reason: str, *, bye: bool) -> bool:
        """End `conn` for `reason`, with a `bye` first if asked and possible.

        Returns True if this was the first cause (the caller logs it).
        """
        with self._locked():
            if bye and conn.slot is not None and conn.bye is None and not conn.halted:
                first = self._remove(conn, reason)
                conn.bye = reason
                return first
            if conn.bye is None:
                return self._halt(conn, reason)
            return False

    def expired(self, now: float, handshake_s: float, idle_s: float) -> list[Conn]:
        """§4 Timeouts: connections past the handshake deadline or idle too long."""
        with self._locked():
            return [
                c
                for c in self._conns
                if not c.ended
                and (
                    (c.name is None and now - c.accepted_at >= handshake_s)
                    or (c.name is not None and now - c.last_seen >= idle_s)
                )
            ]

    def release(self, conn: Conn) -> bool:
        """One holder (reader or flusher) lets go; True if it was the last: close now."""
        with self._locked():
            return self._release(conn)

    def _release(self, conn: Conn) -> bool:
        assert self._held()
        conn.holds -= 1
        return conn.holds == 0

    def forget(self, conn: Conn) -> None:
        """The socket is closed: the connection leaves the registry for good."""
        with self._locked():
            if not conn.ended:
                self._halt(conn, conn.reason or "disconnect")
            conn._enter(Phase.CLOSED)
            self._conns.discard(conn)
            self._receivers.discard(conn)
            conn.private.clear()
            if not self._conns:
                self._drained.notify_all()

    # --- shutdown (main thread) ---

    def begin_shutdown(self) -> list[socket.socket]:
        """§4 SIGTERM: `bye` (shutdown) to keyed clients, no `left`; the sockets to wake.

        A connection whose reader is deriving keys is left to that reader: it
        sees `keyed` answer "shutdown" and says its own bye.
        """
        to_wake: list[socket.socket] = []
        with self._locked():
            self._shutting_down = True
            for conn in self._conns:
                if conn.slot is not None and not conn.halted:
                    self._remove(conn, "shutdown")
                    if conn.bye is None:
                        conn.bye = "shutdown"
                    self._want(conn)
                elif conn.phase is not Phase.KEY_READ:
                    to_wake.append(conn.sock)
        return to_wake

    def wait_drained(self, deadline: float) -> None:
        """Wait until every connection is closed, or the deadline passes."""
        with self._locked():
            while self._conns and time.monotonic() < deadline:
                self._drained.wait(deadline - time.monotonic())

    def close_slots(self) -> None:
        """Tell every flusher to end."""
        with self._locked():
            for slot in self._slots:
                slot.closed = True
                self._wake_slot(slot)

    def open_connections(self) -> int:
        with self._locked():
            return len(self._conns)

    def pending_bytes(self, conn: Conn) -> int:
        """Bytes waiting for `conn` (what max_pending bounds)."""
        with self._locked():
            return self._lag(conn)

    def log_bytes(self) -> int:
        """Bytes the shared log holds now (what no receiver has passed yet)."""
        with self._locked():
            return len(self._log.data)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # --- a flusher's calls ---

    def collect(self, slot: FlushSlot, may_sleep: bool) -> tuple[set[Conn], bool, int] | None:
        """The connections to service now, whether that is a full scan, and, if there
        are none and `may_sleep`, how long the flusher may sleep (ms, -1 = until
        woken; it is marked asleep so that new work wakes it). None once closed."""
        with self._locked():
            if slot.closed:
                return None
            log = self._log
            full = slot.seen_end != log.end and (
                log.urgent_end > slot.seen_end
                or (slot.lazy_due is not None and time.monotonic() >= slot.lazy_due)
            )
            if full:
                slot.seen_end = log.end
                slot.lazy_due = None
                work = slot.members | slot.dirty
            else:
                work = slot.dirty
            slot.dirty = set()
            if work or not may_sleep:
                return work, full, 0
            slot.sleeping = True
            return work, full, self._lazy_wait_ms(slot)

    @staticmethod
    def _lazy_wait_ms(slot: FlushSlot) -> int:
        if slot.lazy_due is None:
            return -1
        return max(0, int((slot.lazy_due - time.monotonic()) * 1000) + 1)

    def note_scan(self, slot: FlushSlot, seconds: float) -> None:
        """A flusher's full scan took `seconds` (sets how long presence news waits)."""
        with self._locked():
            slot.scan_s = seconds

    def take(self, conn: Conn, slot: FlushSlot) -> Taken | None:
        """What `conn`'s flusher sends next: a record's worth, a bye, or retire.

        None if there is nothing to do (or `conn` is not this slot's any more).
        """
        with self._locked():
            if conn.slot is not slot:
                return None
            if conn.halted:
                return Taken([], retire=True)
            pieces = self._take(conn)
            if not pieces:
                if conn.bye is not None and not conn.bye_sent:
                    conn.bye_sent = True
                    bye = conn.bye_entry or entry(protocol.bye(conn.bye))
                    return Taken([bye], final=True)
                if conn.ended:
                    return Taken([], retire=True)
                return None
            if self._has_pending(conn) or conn.ended:
                slot.dirty.add(conn)  # more than a record's worth, or a bye to follow
            return Taken(pieces)

    def halt_slow(self, conn: Conn) -> bool:
        """A send waited past send_timeout: drop `conn` as slow. True if first cause."""
        with self._locked():
            return self._halt(conn, "slow")

    def retire(self, conn: Conn, slot: FlushSlot) -> bool | None:
        """The flusher lets go of `conn`. None if it was not its own; else True if it was
        the last holder (the caller closes the socket)."""
        with self._locked():
            if conn.slot is not slot:
                return None
            conn.slot = None
            conn.halted = True
            slot.members.discard(conn)
            slot.dirty.discard(conn)
            self._receivers.discard(conn)
            return self._release(conn)

    # --- internals (lock held) ---

    def _push_private(self, conn: Conn, data: bytes) -> None:
        """Queue `data` for `conn` alone, ordered at the current end of the log."""
        assert self._held()
        if conn.phase not in CHANNEL_UP:
            return
        conn.private.append((self._log.end, data))
        conn.private_bytes += len(data)
        self._want(conn)

    def _has_pending(self, conn: Conn) -> bool:
        if conn.private:
            return True
        if conn.cursor is None:
            return False
        end = conn.final_end if conn.final_end is not None else self._log.end
        return conn.cursor < end

    def _lag(self, conn: Conn) -> int:
        """Bytes waiting for `conn` (§4 max_pending): its log slice plus private items."""
        assert self._held()
        behind = 0 if conn.cursor is None else self._log.end - conn.cursor - conn.own_bytes
        return behind + conn.private_bytes

    def _halt(self, conn: Conn, reason: str) -> bool:
        """Remove `conn` and stop its writer at once, no `bye` (slow, broken record)."""
        first = self._remove(conn, reason)
        conn.halted = True
        self._receivers.discard(conn)  # its cursor must no longer pin the log
        self._want(conn)
        return first

    def _remove(
        self, conn: Conn, reason: str, *, announce: bool = True, by_json: bytes | None = None
    ) -> bool:
        """Unregister once; announce `left` if it had joined. False if already removed."""
        assert self._held()
        if conn.ended:
            return False
        was_joined = conn.phase is Phase.JOINED
        conn._enter(Phase.CLOSING)
        conn.reason = reason
        if was_joined:
            key = protocol.name_key(conn.name)
            if self._joined.get(key) is conn:  # not when its name was taken over
                del self._joined[key]
                self._names.remove(conn.name_json)
            if conn.identity is not None and self._by_identity.get(conn.identity) is conn:
                del self._by_identity[conn.identity]
            conn.final_end = self._log.end
            if announce and not self._shutting_down:
                left = protocol.encode_left(conn.name_json, reason, by_json)
                self._append(left, urgent=False)
        self._want(conn)
        return True

    def _compact(self) -> list[Conn]:
        """Now and then: drop receivers over max_pending, trim the log.

        A scan costs one pass over the receivers, so it runs only when the log
        has grown far enough that someone could have crossed max_pending: the
        next scan is due when the closest receiver would cross it, at most
        `step` bytes on, at least `max_pending // 64` (so a receiver that
        lingers near the limit cannot make every say scan). A slow client is
        thus dropped at most max_pending/64 bytes (and one message) late.
        Returns the connections dropped as slow; the caller wakes their sockets.
        """
        assert self._held()
        log = self._log
        if not log.due_for_compaction():
            return []
        max_pending = self.max_pending
        slow = [c for c in self._receivers if self._lag(c) > max_pending]
        for conn in slow:
            self._halt(conn, "slow")
        low = end = log.end
        crossing = end + log.step
        for c in self._receivers:
            if c.cursor is not None:
                low = min(low, c.cursor)
                crossing = min(crossing, c.cursor + max_pending - c.private_bytes + 1)
        log.trim(low, crossing, max_pending)
        return slow

    def _take(self, conn: Conn) -> list[bytes]:
        """Everything due to `conn`, up to one record's budget, in delivery order."""
        assert self._held()
        pieces: list[bytes] = []
        room = RECORD_BUDGET
        private, own, log = conn.private, conn.own, self._log
        pos = conn.cursor
        end = conn.final_end if conn.final_end is not None else log.end
        while True:
            while private and (pos is None or private[0][0] <= pos):
                data = private[0][1]
                if len(data) > room:
                    return pieces
                pieces.append(data)
                room -= len(data)
                conn.private_bytes -= len(data)
                private.popleft()
            if pos is None or pos >= end:
                return pieces
            if own and own[0][0] == pos:  # the sender does not receive its own say
                start, stop = own.popleft()
                conn.own_bytes -= stop - start
                pos = conn.cursor = stop
                continue
            stop = end
            if private:
                stop = min(stop, private[0][0])
            if own:
                stop = min(stop, own[0][0])
            if stop - pos > room:
                cut = log.cut_before(pos, room)
                if cut <= pos:
                    return pieces
                stop = cut
            pieces.append(log.slice(pos, stop))
            room -= stop - pos
            pos = conn.cursor = stop
