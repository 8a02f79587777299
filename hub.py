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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import protocol

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
        # (lock) identity and rate
        self.name: str | None = None
        self.name_json: bytes = b""
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
        start = self.end
        self.data += data
        end = start + len(data)
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


class Hub:
    """The registry and the log. Every public method takes the lock itself."""

    def __init__(self, max_clients: int, max_pending: int, rate: int):
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.rate = rate
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
        self._next_id = 1
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

    def join(self, conn: Conn, name: str, name_json: bytes, now: float, max_text: int) -> str:
        """§4 join: register the name, queue `welcome`, announce `joined`.

        Returns "ok", "name_taken", or "gone" (the connection is closing: no
        ghost may be registered for it).
        """
        key = protocol.name_key(name)
        joined = protocol.encode_joined(name_json) + b","
        with self._locked():
            if conn.phase is not Phase.KEYED:
                return "gone"
            if key in self._joined:
                return "name_taken"
            welcome = protocol.encode_welcome(name_json, self._names, max_text, self.rate)
            self._append(joined, urgent=False)
            self._joined[key] = conn
            bisect.insort(self._names, name_json)
            conn._enter(Phase.JOINED)
            conn.name, conn.name_json = name, name_json
            conn.cursor = self._log.end
            conn.bucket = Bucket(self.rate, now)
            self._push_private(conn, welcome + b",")
            return "ok"

    def say(self, conn: Conn, head: bytes, tail: bytes, now: float) -> tuple[str, list[Conn]]:
        """§4 say: assign an id and log it. Returns ("ok"|"rate_limited"|"gone", slow)."""
        with self._locked():
            if conn.phase is not Phase.JOINED:
                return "gone", []
            if not conn.bucket.take(now):
                return "rate_limited", []
            msg_id = self._next_id
            self._next_id += 1
            span = self._append(b"%s%d%s," % (head, msg_id, tail))
            conn.own.append(span)
            conn.own_bytes += span[1] - span[0]
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
            if not conn.bucket.take(now):
                return "rate_limited", None
            msg_id = self._next_id
            self._next_id += 1
            data = protocol.encode_direct(msg_id, conn.name_json, target.name_json, text_json, ts)
            self._push_private(target, data + b",")
            if self._lag(target) > self.max_pending and self._halt(target, "slow"):
                return "ok", target
            return "ok", None

    def users(self) -> bytes:
        """§4 who: the `users` entry, every joined name in order."""
        with self._locked():
            return protocol.encode_users(self._names) + b","

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
                    return Taken([entry(protocol.bye(conn.bye))], final=True)
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

    def _remove(self, conn: Conn, reason: str) -> bool:
        """Unregister once; announce `left` if it had joined. False if already removed."""
        assert self._held()
        if conn.ended:
            return False
        was_joined = conn.phase is Phase.JOINED
        conn._enter(Phase.CLOSING)
        conn.reason = reason
        if was_joined:
            del self._joined[protocol.name_key(conn.name)]
            self._names.remove(conn.name_json)
            conn.final_end = self._log.end
            if not self._shutting_down:
                left = protocol.encode_left(conn.name_json, reason) + b","
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
