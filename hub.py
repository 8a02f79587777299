"""The hub: the registry of connections, their lifecycle and the chat's events, behind one lock.

Who owns what:
  * `Hub` (with its base `Core`) owns the lock and everything it guards: the
    registry (every open connection, the joined names and identities), the
    `Delivery` (shared log, private queues, flush slots), the `History` (kept
    messages, id counter), the `Access` rules and the per-source admission.
    Its public methods are the only way in: one locked call per event (admit,
    keyed, join, say, dm, kick, drop, ...), each returning what the caller must
    do outside the lock (wake a socket, log a line, store a binding). After
    releasing the lock it wakes the flushers that work was queued for.
  * `Core` keeps connections alive and delivered (accept to close, shutdown,
    the flushers' calls); `Hub` adds the chat's rules (§4-§6).
  * Threads: readers call the events, flushers `collect`/`take`/`retire`, the
    accept thread `admit`, the reaper `expired`, the state writer `unsaved`.
No I/O, no crypto and no JSON of user data happen under the lock: only list
and bytes bookkeeping. This module opens no socket and starts no thread.
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import limits
import protocol
from access import Access, Listed
from conn import Bucket, Conn, Phase
from delivery import NOT_HELD, Delivery, FlushSlot, Taken, entry
from history import History
from store import Ban, Binding, StoredMessage


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
class WhoisFacts:
    name: str
    identity: str | None
    op: bool
    since_ms: int
    address: str | None


_NONE: list[Conn] = []  # "nobody dropped": shared, never changed


class _HubLock:
    """The hub lock as a context manager that wakes flushers after releasing it."""

    __slots__ = ("_lock", "_out")

    def __init__(self, lock: threading.Lock, out: Delivery):
        self._lock = lock
        self._out = out

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        out = self._out
        wakes = out.wakes
        if not wakes:
            self._lock.release()
            return
        out.wakes = []
        self._lock.release()
        for slot in wakes:
            slot.wake()


class Core:
    """The registry, the connections' lifecycle and their delivery, behind the one lock.

    Every public method takes the lock itself. `Hub` adds the chat's own events.
    """

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
        last_id: int = 0,
        forgotten: int = 0,
        max_unjoined_per_ip: int = 0,
        connect_rate_per_ip: float = 0.0,
    ):
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.rate = rate
        self.max_text = max_text
        self.max_record = max_record
        self._access = access if access is not None else Access(frozenset(), None, [], [])
        self._by_identity: dict[str, Conn] = {}  # proven fingerprint -> joined connection
        # §6: the kept messages and the id counter
        self._history = History(history, kept, first_id, last_id, forgotten)
        # Guards everything below, every Conn's (lock) fields and every FlushSlot.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # notified when `_conns` empties
        self._conns: set[Conn] = set()  # every open connection (max_clients counts these)
        self._joined: dict[str, Conn] = {}  # name_key -> joined connection
        # The joined names as JSON strings in code point order (their byte order:
        # names hold no quote, backslash or control character). `welcome` and
        # `users` are a join of these: no JSON and no sort per join under the lock.
        self._names: list[bytes] = []
        self._out = Delivery(self._lock, max_pending)  # the log, queues and flush slots
        self._lock_cm = _HubLock(self._lock, self._out)
        self._shutting_down = False
        # Per-source limits and the unjoined share of max_clients (limits.py, issue 12).
        self._admission = limits.Admission(max_clients, max_unjoined_per_ip, connect_rate_per_ip)

    # --- the lock ---

    def _locked(self) -> _HubLock:
        """`with self._locked():` holds the lock; on release it wakes the flushers that
        work was queued for. (A class, not @contextmanager: this is on every hot path.)"""
        return self._lock_cm

    def _held(self) -> bool:
        assert self._lock.locked(), "the hub lock must be held"
        return True

    # --- flushers ---

    def add_slot(self, wake: Callable[[], None]) -> FlushSlot:
        """Register a flusher (before any connection is keyed); returns its slot."""
        with self._locked():
            return self._out.add_slot(wake)

    # --- connections: accept to keyed (reader thread, accept thread) ---

    def admit(self, conn: Conn, now: float | None = None) -> limits.Verdict:
        """Count a new connection: §2 max_clients and the per-source limits (limits.py).

        The verdict is falsy when refused (it says why). When admitted, `conn`
        counts as unjoined until it joins or ends, and `verdict.evicted` may name
        the oldest unjoined connection, closed here to make room: the caller
        wakes its socket and logs it.
        """
        with self._locked():
            if self._shutting_down:
                return limits.Verdict(False, "the server is shutting down; try later", "full")
            when = conn.accepted_at if now is None else now
            verdict = self._admission.admit(conn, conn.ip, when, len(self._conns))
            if verdict:
                self._conns.add(conn)
                conn.admission = self._admission
                victim = verdict.evicted
                if isinstance(victim, Conn):
                    victim.admission = None  # the admission has let go of it already
                    self._halt(victim, "evicted")
            return verdict

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
            conn.slot = self._out.assign(conn)
            conn.holds += 1
            return "ok"

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
                    self._close_with_bye(conn, "shutdown")
                    self._out.want(conn)
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
            for slot in self._out.slots:
                slot.closed = True
                self._out.wake_slot(slot)

    def open_connections(self) -> int:
        with self._locked():
            return len(self._conns)

    def pending_bytes(self, conn: Conn) -> int:
        """Bytes waiting for `conn` (what max_pending bounds)."""
        with self._locked():
            return self._out.lag(conn)

    def log_bytes(self) -> int:
        """Bytes the shared log holds now (what no receiver has passed yet)."""
        with self._locked():
            return len(self._out.log.data)

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
            return self._out.collect(slot, may_sleep)

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
            pieces = self._out.take(conn)
            if not pieces:
                if conn.bye is not None and not conn.bye_sent:
                    conn.bye_sent = True
                    bye = conn.bye_entry or entry(protocol.bye(conn.bye))
                    return Taken([bye], final=True)
                if conn.ended:
                    return Taken([], retire=True)
                return None
            if self._out.has_pending(conn) or conn.ended:
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
            self._out.unassign(conn, slot)
            return self._release(conn)

    # --- internals (lock held) ---

    def _close_with_bye(
        self,
        conn: Conn,
        reason: str,
        *,
        announce: bool = True,
        by_json: bytes | None = None,
        bye_entry: bytes | None = None,
    ) -> bool:
        """Unregister `conn` (see _remove); its flusher then sends what is due and a
        `bye` (`reason`; `bye_entry` when it carries by/message), unless a bye is set
        already. True if this was the first cause."""
        first = self._remove(conn, reason, announce=announce, by_json=by_json)
        if conn.bye is None:
            conn.bye = reason
            conn.bye_entry = bye_entry
        return first

    def _halt(self, conn: Conn, reason: str) -> bool:
        """Remove `conn` and stop its writer at once, no `bye` (slow, broken record)."""
        first = self._remove(conn, reason)
        conn.halted = True
        self._out.receivers.discard(conn)  # its cursor must no longer pin the log
        self._out.want(conn)
        return first

    def _remove(
        self, conn: Conn, reason: str, *, announce: bool = True, by_json: bytes | None = None
    ) -> bool:
        """Unregister once; announce `left` if it had joined. False if already removed."""
        assert self._lock.locked(), NOT_HELD
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
            conn.final_end = self._out.log.end
            if announce and not self._shutting_down:
                left = protocol.encode_left(conn.name_json, reason, by_json)
                self._out.append(left, urgent=False)
        self._out.want(conn)
        return True

    def _compact(self) -> list[Conn]:
        """Now and then: drop receivers over max_pending (Delivery.slow_receivers), trim
        the log. Returns those dropped as slow; the caller wakes their sockets."""
        assert self._lock.locked(), NOT_HELD
        if not self._out.log.due_for_compaction():  # the common case, on every say
            return _NONE
        slow = self._out.slow_receivers()
        for conn in slow:
            self._halt(conn, "slow")
        self._out.trim()
        return slow


class Hub(Core):
    """The chat's events on top of the core: join, say, dm, who, whois, moderation, history.

    Each is one locked call that returns what the caller must do outside the lock.
    """

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
        assert self._lock.locked(), NOT_HELD
        if announce:
            self._out.append(protocol.encode_joined(req.name_json, req.identity_json), urgent=False)
        names = self._names
        replay, gap = self._history.replay(req.history, req.since)
        welcome = protocol.encode_welcome(
            req.name_json,
            names,
            self.max_text,
            self.rate,
            access=self._access.mode,
            identity=req.identity_json,
            op=self._access.is_op(req.identity),
            max_record=self.max_record,
            last_id=self._history.last_id,
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
        conn.cursor = self._out.log.end
        conn.bucket = Bucket(self.rate, req.now)
        self._out.push_private(conn, welcome + b",")
        for kept in replay:
            self._out.push_private(conn, protocol.mark_history(kept.entry) + b",")

    def _replace(self, old: Conn, announce: bool) -> None:
        """§5 take-over: `old` gets bye(replaced); `left` (replaced) only if `announce`."""
        assert self._lock.locked(), NOT_HELD
        self._close_with_bye(old, "replaced", announce=announce)

    def say(
        self, conn: Conn, head: bytes, tail: bytes, now: float, now_ms: int
    ) -> tuple[str, list[Conn]]:
        """§4 say: the `message` bytes around its id (`head`, `tail`, built outside the
        lock) get an id, go in the log and are kept (§6). Returns (outcome, dropped as
        slow)."""
        with self._locked():
            if conn.phase is not Phase.JOINED:
                return "gone", []
            if conn.muted_until is not None and self._is_muted(conn, now_ms):
                return "muted", []
            if not conn.bucket.take(now):
                return "rate_limited", []
            msg_id = self._history.new_id()
            message = b"%s%d%s" % (head, msg_id, tail)
            span = self._out.append(message)
            conn.own.append(span)
            conn.own_bytes += span[1] - span[0]
            self._history.add(msg_id, message)
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
            if conn.muted_until is not None and self._is_muted(conn, ts):
                return "muted", None
            if not conn.bucket.take(now):
                return "rate_limited", None
            msg_id = self._history.new_id()
            data = protocol.encode_direct(msg_id, conn.name_json, target.name_json, text_json, ts)
            self._out.push_private(target, data + b",")
            if self._out.too_slow(target) and self._halt(target, "slow"):
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
            self._close_with_bye(target, reason, by_json=by.name_json, bye_entry=bye_entry)
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
            self._close_with_bye(target, "banned", by_json=by.name_json, bye_entry=bye_entry)
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
            self._out.push_private(target, to_target + b",")
            if op is not target:
                self._out.push_private(op, to_op + b",")
            return True

    def set_allowlist(self, allow: dict[str, Listed]) -> list[Conn]:
        """§5 SIGHUP: the new list applies at once; returns the clients it shuts out."""
        with self._locked():
            self._access.set_allowlist(allow)
            out: list[Conn] = []
            for key, conn in list(self._joined.items()):
                if not self._access.still_allowed(conn.identity, key):
                    self._close_with_bye(conn, "not_allowed")
                    out.append(conn)
                else:
                    conn.op = self._access.is_op(conn.identity)
            return out

    # --- §6: what the state writer persists ---

    def unsaved(self) -> list[StoredMessage]:
        """The kept messages not yet handed to the writer, in id order; they are now."""
        with self._locked():
            batch = self._history.take_unsaved()
        return [StoredMessage(msg_id, message) for msg_id, message in batch]

    def ids(self) -> tuple[int, int]:
        """(the highest id handed out, the highest message id no longer kept)."""
        with self._locked():
            return self._history.last_id, self._history.forgotten

    def reply(self, conn: Conn, data: bytes) -> bool:
        """Queue one encoded reply for `conn` alone; True if that made it too slow (dropped)."""
        with self._locked():
            self._out.push_private(conn, data)
            return self._out.too_slow(conn) and self._halt(conn, "slow")

    def leave(self, conn: Conn) -> None:
        """§4 leave: announce it, then its flusher sends `bye` (leave) and closes."""
        with self._locked():
            self._close_with_bye(conn, "leave")

    def drop(self, conn: Conn, reason: str, *, bye: bool) -> bool:
        """End `conn` for `reason`, with a `bye` first if asked and possible.

        Returns True if this was the first cause (the caller logs it).
        """
        with self._locked():
            if bye and conn.slot is not None and conn.bye is None and not conn.halted:
                return self._close_with_bye(conn, reason)
            if conn.bye is None:
                return self._halt(conn, reason)
            return False

    def expired(self, now: float, handshake_s: float, idle_s: float) -> list[Conn]:
        """§4 Timeouts: connections past the handshake deadline or idle too long.

        `last_seen` moves only when a whole frame has arrived, so a joined
        client that has started a frame must finish it within `idle_s` too.
        """
        with self._locked():
            self._admission.sweep(now)  # forget sources that have gone quiet
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
        assert self._lock.locked(), NOT_HELD
        conn.holds -= 1
        return conn.holds == 0

    def forget(self, conn: Conn) -> None:
        """The socket is closed: the connection leaves the registry for good."""
        with self._locked():
            if not conn.ended:
                self._halt(conn, conn.reason or "disconnect")
            conn._enter(Phase.CLOSED)
            self._conns.discard(conn)
            self._out.receivers.discard(conn)
            conn.private.clear()
            if not self._conns:
                self._drained.notify_all()
