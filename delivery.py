"""Delivery bookkeeping: the shared log, each connection's private queue, the flush slots.

Who owns what: the hub owns one `Delivery` and its lock; every method here
expects that lock held (and asserts it). Flusher threads reach it only
through hub calls. Nothing here does I/O, crypto or JSON of user data.

The log: every broadcast (message, joined, left) is encoded once and appended
to one bytearray; each receiver has a cursor into it. A flusher takes
everything between a cursor and the end (skipping the client's own `say`s,
merging its private items such as dm/pong/error at their log positions) and
sends it as ONE record: the cost per message x recipient is a memcpy. A say or
dm is flushed at once; presence news (joined, left) may wait a moment for
company, and any later say takes it along in order.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

import protocol
from conn import CHANNEL_UP, Conn

# Per record: the JSON array brackets replace one trailing comma, so budget + 1.
RECORD_BUDGET = protocol.MAX_RECORD_PLAINTEXT - 1
# How much log may accumulate between two scans for slow receivers (and trimming).
COMPACT_STEP_MAX_BYTES = 1024 * 1024
# `joined` and `left` wait for company before the flushers scan every member for
# them: 50 ms, or 10 times the last full scan if longer, so that presence news
# alone keeps a flusher busy at most a tenth of the time. Without the wait, N
# clients joining at once cost N scans of N members (bench/README.md).
PRESENCE_DELAY_S = 0.05
PRESENCE_SCAN_FACTOR = 10


NOT_HELD = "the hub lock must be held"


def entry(obj: dict[str, Any]) -> bytes:
    """A message as it sits in a private queue: JSON plus a trailing comma."""
    return protocol.encode_message(obj) + b","


class FlushSlot:
    """The lock-guarded side of one flusher thread."""

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
        """Forget what every cursor has passed; schedule the next scan (Delivery.trim)."""
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


class Delivery:
    """The log, the private queues and the flush slots; every method needs the hub lock."""

    def __init__(self, lock: threading.Lock, max_pending: int):
        self._lock = lock
        self.max_pending = max_pending
        self.log = SharedLog(max_pending)
        self.slots: list[FlushSlot] = []
        self._next_slot = 0
        self.receivers: set[Conn] = set()  # connections whose flusher reads the log
        self.wakes: list[FlushSlot] = []  # slots to wake once the lock is released

    def held(self) -> bool:
        assert self._lock.locked(), "the hub lock must be held"
        return True

    # --- slots ---

    def add_slot(self, wake: Callable[[], None]) -> FlushSlot:
        assert self._lock.locked(), NOT_HELD
        slot = FlushSlot(len(self.slots), wake)
        self.slots.append(slot)
        return slot

    def assign(self, conn: Conn) -> FlushSlot:
        """Give a keyed connection to the next flusher, round robin."""
        assert self._lock.locked(), NOT_HELD
        slot = self.slots[self._next_slot % len(self.slots)]
        self._next_slot += 1
        slot.members.add(conn)
        self.receivers.add(conn)
        return slot

    def unassign(self, conn: Conn, slot: FlushSlot) -> None:
        assert self._lock.locked(), NOT_HELD
        slot.members.discard(conn)
        slot.dirty.discard(conn)
        self.receivers.discard(conn)

    def wake_slot(self, slot: FlushSlot) -> None:
        assert self._lock.locked(), NOT_HELD
        if slot.sleeping:
            slot.sleeping = False
            self.wakes.append(slot)

    def want(self, conn: Conn) -> None:
        """Have `conn`'s flusher look at it soon (new private item, bye, halt)."""
        assert self._lock.locked(), NOT_HELD
        slot = conn.slot
        if slot is not None:
            slot.dirty.add(conn)
            self.wake_slot(slot)

    # --- queueing ---

    def append(self, data: bytes, *, urgent: bool = True) -> tuple[int, int]:
        """Add one entry for every receiver; `urgent=False` lets it wait for company."""
        assert self._lock.locked(), NOT_HELD
        span = self.log.append(data, urgent)
        # Each flusher rescans its members: work per flush, not per message x recipient.
        for slot in self.slots:
            if urgent:
                if slot.sleeping:  # wake_slot, inline: this runs for every say
                    slot.sleeping = False
                    self.wakes.append(slot)
            elif slot.lazy_due is None:  # the first since its last scan sets the clock
                slot.lazy_due = time.monotonic() + max(
                    PRESENCE_DELAY_S, PRESENCE_SCAN_FACTOR * slot.scan_s
                )
                self.wake_slot(slot)  # to sleep until then, not forever
        return span

    def push_private(self, conn: Conn, data: bytes) -> None:
        """Queue `data` for `conn` alone, ordered at the current end of the log."""
        assert self._lock.locked(), NOT_HELD
        if conn.phase not in CHANNEL_UP:
            return
        conn.private.append((self.log.end, data))
        conn.private_bytes += len(data)
        self.want(conn)

    def has_pending(self, conn: Conn) -> bool:
        if conn.private:
            return True
        if conn.cursor is None:
            return False
        end = conn.final_end if conn.final_end is not None else self.log.end
        return conn.cursor < end

    def lag(self, conn: Conn) -> int:
        """Bytes waiting for `conn` (§4 max_pending): its log slice plus private items."""
        assert self._lock.locked(), NOT_HELD
        behind = 0 if conn.cursor is None else self.log.end - conn.cursor - conn.own_bytes
        return behind + conn.private_bytes

    def too_slow(self, conn: Conn) -> bool:
        """Over §4 max_pending: the one test of it, for the scan and for each reply."""
        return self.lag(conn) > self.max_pending

    # --- slow receivers and trimming ---

    def slow_receivers(self) -> list[Conn]:
        """Receivers over max_pending, looked for only when someone could have crossed it.

        A scan costs one pass over the receivers, so it runs only when the log has
        grown far enough: the next is due when the closest receiver would cross
        max_pending, at most `step` bytes on, at least `max_pending // 64` later
        (so one lingering near the limit cannot make every say scan). A slow
        client is thus dropped at most max_pending/64 bytes (and one message)
        late. The caller halts them, then calls `trim`.
        """
        assert self._lock.locked(), NOT_HELD
        if not self.log.due_for_compaction():
            return []
        return [c for c in self.receivers if self.too_slow(c)]

    def trim(self) -> None:
        """Forget the log every receiver has passed; schedule the next scan."""
        assert self._lock.locked(), NOT_HELD
        log, max_pending = self.log, self.max_pending
        if not log.due_for_compaction():
            return
        low = end = log.end
        crossing = end + log.step
        for c in self.receivers:
            if c.cursor is not None:
                low = min(low, c.cursor)
                crossing = min(crossing, c.cursor + max_pending - c.private_bytes + 1)
        log.trim(low, crossing, max_pending)

    # --- a flusher's side ---

    def collect(self, slot: FlushSlot, may_sleep: bool) -> tuple[set[Conn], bool, int]:
        """See Hub.collect."""
        assert self._lock.locked(), NOT_HELD
        log = self.log
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
        if slot.lazy_due is None:
            return work, full, -1
        return work, full, max(0, int((slot.lazy_due - time.monotonic()) * 1000) + 1)

    def take(self, conn: Conn) -> list[bytes]:
        """Everything due to `conn`, up to one record's budget, in delivery order."""
        assert self._lock.locked(), NOT_HELD
        pieces: list[bytes] = []
        room = RECORD_BUDGET
        private, own, log = conn.private, conn.own, self.log
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
