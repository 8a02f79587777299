"""bcast/1 broadcast server: one thread per client, one shared message log.

Run `python3 server.py --help` for the flags. The wire protocol is PROTOCOL.md
(bcast/1); docs/PROTOCOL.md explains it in our words.

Rules of this module (read before changing it):
  * Threads. Per connection, a *reader* (handshake, then records in, every
    check, id assignment). A few *flushers* (FLUSHERS of them) share the
    keyed connections between them: a connection belongs to one flusher,
    the only thread that seals and sends its records, so counter order is
    wire order. Plus one accept thread and one reaper (timeouts).
  * One lock, `Hub.lock`, guards the registry, the shared log and every
    connection's delivery state (cursor, private queue, closing flags).
    Under it: only list/bytes bookkeeping. Never I/O, never crypto, never
    JSON of user data. Snapshot under the lock, act outside it. Take it with
    `with hub:`, which also wakes sleeping flushers after releasing it.
  * The log. Every broadcast (message, joined, left) is encoded once and
    appended to one bytearray; each receiver has a cursor into it. A flusher
    takes everything between a cursor and the end (skipping the client's own
    `say`s, merging its private items such as dm/pong/error at their log
    positions) and sends it as ONE record. The cost per message x recipient
    is a memcpy; Python work happens per flush. `id` order is log order.
    A say or dm is flushed at once; presence news (joined, left) may wait
    PRESENCE_DELAY_S for company, and any later say takes it along in order.
  * Sockets. Readers wait in poll(), then recv what is there (no buffer is
    held by an idle client). Flushers never block on a client: they
    send with MSG_DONTWAIT, park what did not fit, poll for writability, and
    drop a client whose record has waited `send_timeout`. A socket is closed
    by whichever of its reader and its flusher lets go of it last; others
    only wake threads with shutdown().
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crypto_utils
import protocol
from crypto_utils import CryptoError
from protocol import ByeProtocol, CloseSilently, Refused

log = logging.getLogger("bcast.server")

# --- defaults, each from PROTOCOL.md unless said otherwise ---
DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator opens it up on purpose
DEFAULT_PORT = 12345
DEFAULT_MAX_CLIENTS = 1000
DEFAULT_RATE = 10  # §4: tokens per second and bucket capacity
DEFAULT_MAX_TEXT = protocol.DEFAULT_MAX_TEXT
DEFAULT_IDLE_TIMEOUT_S = 120.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_MAX_PENDING_BYTES = 4 * 1024 * 1024
# One read's worth (the buffer exists only while a recv() runs: readers wait in
# poll()). 64 KiB measured no better on fan-out and ~10 % worse with 10 clients.
RECV_CHUNK_BYTES = 256 * 1024
# Small stacks let thousands of mostly idle threads fit; 256 KiB still holds the
# C JSON decoder's deepest recursion (it stops at Python's recursion limit).
THREAD_STACK_BYTES = 256 * 1024
# How much log may accumulate between two scans for slow receivers (and trimming).
COMPACT_STEP_MAX_BYTES = 1024 * 1024
# Per record: the JSON array brackets replace one trailing comma, so budget + 1.
RECORD_BUDGET = protocol.MAX_RECORD_PLAINTEXT - 1
# A name in JSON at its longest: 32 characters of up to 4 UTF-8 bytes, quotes, comma.
NAME_JSON_MAX_BYTES = 4 * protocol.MAX_NAME_CHARS + 3
# `welcome` lists every other name in one record (§4): so many clients always fit.
MAX_CLIENTS_LIMIT = (RECORD_BUDGET - 1024) // NAME_JSON_MAX_BYTES
# §3: never seal a record that would take the counter to 2**32; keep one for `bye`.
LAST_DATA_SEQ = crypto_utils.MAX_RECORDS_PER_DIRECTION - 2
SHUTDOWN_GRACE_S = 1.5  # §4 SIGTERM: we promise an exit within 2 s
# Two flushers let one seal or send (C code, GIL released) while the other runs Python;
# more only add switching on a 2-core machine (measured: bench/README.md).
FLUSHERS = 2
DRAIN_ON_CLOSE_BYTES = 1024 * 1024  # unread input read away so close() sends FIN, not RST
# `joined` and `left` wait for company before the flushers scan every member for
# them: 50 ms, or 10 times the last full scan if longer, so that presence news
# alone keeps a flusher busy at most a tenth of the time (a scan of 2,500
# members takes ~75 ms: news then comes within ~0.75 s). A say is delivered at
# once and takes any waiting news with it, in log order. Without the wait, N
# clients joining at once cost N scans of N members: a storm of 500 spent more
# time announcing joins than doing handshakes (bench/README.md).
PRESENCE_DELAY_S = 0.05
PRESENCE_SCAN_FACTOR = 10


@dataclass(frozen=True)
class Settings:
    """Every tunable of the server; the CLI fills it from flags and BCAST_* variables."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    key_file: Path = field(default_factory=lambda: default_key_file())
    max_clients: int = DEFAULT_MAX_CLIENTS
    rate: int = DEFAULT_RATE
    max_text: int = DEFAULT_MAX_TEXT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S
    max_pending: int = DEFAULT_MAX_PENDING_BYTES
    log_level: str = "INFO"


def default_key_file() -> Path:
    """$XDG_DATA_HOME/bcast/server_key.pem, i.e. ~/.local/share/bcast/ by default."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "bcast" / "server_key.pem"


def wake(sock: socket.socket) -> None:
    """Unblock the threads using `sock` (the reader's recv returns); the fd stays open."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
    """One client connection. Fields marked (lock) are guarded by Hub.lock."""

    def __init__(self, sock: socket.socket, addr: tuple[Any, ...], now: float):
        self.sock = sock
        self.peer = f"{addr[0]}:{addr[1]}"
        self.accepted_at = now
        self.last_seen = now  # written by the reader only; read racily by the reaper
        self.rx: crypto_utils.RecordCipher | None = None  # reader only
        self.tx: crypto_utils.RecordCipher | None = None  # its flusher only
        self.bucket: Bucket | None = None  # reader only
        # flusher only: the unsent rest of the current record, and what to do after it
        self.outbuf: memoryview | None = None
        self.close_after_send = False
        # (lock) delivery and lifecycle state
        self.flusher: Flusher | None = None  # set once keyed, cleared when retired
        self.holds = 1  # reader, plus the flusher once keyed; the last one closes the socket
        self.name: str | None = None  # set once joined
        self.name_json: bytes = b""  # the name as JSON, once joined
        self.keyed = False
        self.key_read = False  # its `key` frame was read: shutdown owes it a bye (§4)
        self.cursor: int | None = None  # absolute log position; None until joined
        self.private: deque[tuple[int, bytes]] = deque()  # (log position, entry)
        self.private_bytes = 0
        self.own: deque[tuple[int, int]] = deque()  # log spans of its own says, skipped
        self.own_bytes = 0
        self.final_end: int | None = None  # after removal: deliver the log up to here
        self.removed = False
        self.reason: str | None = None  # why it left (first cause wins)
        self.bye: str | None = None  # a bye to send after what is due, then close
        self.bye_sent = False
        self.stop = False  # flusher: send nothing more, let go of the socket

    def __repr__(self) -> str:
        return f"<Conn {self.peer} {self.name or '-'}>"


def entry(obj: dict[str, Any]) -> bytes:
    """A message as it sits in the log or a private queue: JSON plus a trailing comma."""
    return protocol.encode_message(obj) + b","


class Hub:
    """The registry and the log; every method named *_locked expects `lock` held."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # Guards everything below and every Conn's (lock) fields.
        self.lock = threading.Lock()
        self.conns: set[Conn] = set()  # every open connection (max_clients counts these)
        self.joined: dict[str, Conn] = {}  # name_key -> joined connection
        # The joined names as JSON strings, in code point order (which is their byte
        # order: names hold no quote, backslash or control character). `welcome` and
        # `users` are a join of these: no JSON and no sort per join under the lock.
        self.names: list[bytes] = []
        self.receivers: set[Conn] = set()  # keyed connections whose flusher reads the log
        self.flushers: list[Flusher] = []
        self.kicks: list[Flusher] = []  # sleeping flushers to wake once the lock is released
        self.drained = threading.Condition(self.lock)  # notified when `conns` becomes empty
        self.log = bytearray()
        self.base = 0  # absolute position of log[0]
        self.ends: list[int] = []  # absolute end of each entry in the log, ascending
        self.next_id = 1
        self.urgent_end = 0  # log_end after the last entry to deliver at once
        self.compact_step = max(1024, min(COMPACT_STEP_MAX_BYTES, settings.max_pending // 4))
        self.compact_at = self.compact_step
        self.shutting_down = False

    @property
    def log_end(self) -> int:
        return self.base + len(self.log)

    def __enter__(self) -> Hub:
        self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the lock, then wake the flushers that work was queued for (a pipe write)."""
        kicks = self.kicks
        if kicks:
            self.kicks = []
        self.lock.release()
        for flusher in kicks:
            flusher.kick()

    # --- queueing work for flushers (lock held) ---

    def _kick_locked(self, flusher: Flusher) -> None:
        if flusher.sleeping:
            flusher.sleeping = False
            self.kicks.append(flusher)

    def want_locked(self, conn: Conn) -> None:
        """Have `conn`'s flusher look at it soon (new private item, bye, stop)."""
        flusher = conn.flusher
        if flusher is not None:
            flusher.dirty.add(conn)
            self._kick_locked(flusher)

    def has_pending_locked(self, conn: Conn) -> bool:
        if conn.private:
            return True
        if conn.cursor is None:
            return False
        end = conn.final_end if conn.final_end is not None else self.log_end
        return conn.cursor < end

    def release_locked(self, conn: Conn) -> bool:
        """One holder (reader or flusher) lets go; True if it was the last: close now."""
        conn.holds -= 1
        return conn.holds == 0

    # --- appending (lock held) ---

    def _append_locked(self, data: bytes, *, urgent: bool = True) -> tuple[int, int]:
        """Add one entry for every receiver; `urgent=False` lets it wait for company."""
        start = self.log_end
        self.log += data
        end = start + len(data)
        self.ends.append(end)
        # Each flusher rescans its members: work per flush, not per message x recipient.
        if urgent:
            self.urgent_end = end
            for flusher in self.flushers:
                self._kick_locked(flusher)
        else:
            for flusher in self.flushers:
                if flusher.lazy_due is None:  # the first since its last scan sets the clock
                    flusher.lazy_due = time.monotonic() + max(
                        PRESENCE_DELAY_S, PRESENCE_SCAN_FACTOR * flusher.scan_s
                    )
                    self._kick_locked(flusher)  # to sleep until then, not forever
        return start, end

    def push_private_locked(self, conn: Conn, data: bytes) -> None:
        """Queue `data` for `conn` alone, ordered at the current end of the log."""
        if conn.removed or not conn.keyed:
            return
        conn.private.append((self.log_end, data))
        conn.private_bytes += len(data)
        self.want_locked(conn)

    def halt_locked(self, conn: Conn, reason: str) -> bool:
        """Remove `conn` and stop its writer at once, no `bye` (slow, broken record)."""
        first = self.remove_locked(conn, reason)
        conn.stop = True
        self.receivers.discard(conn)  # its cursor must no longer pin the log
        self.want_locked(conn)
        return first

    def lag_locked(self, conn: Conn) -> int:
        """Bytes waiting for `conn` (§4 max_pending): its log slice plus private items."""
        behind = 0 if conn.cursor is None else self.log_end - conn.cursor - conn.own_bytes
        return behind + conn.private_bytes

    def compact_locked(self) -> list[Conn]:
        """Now and then: drop receivers over max_pending, trim the log.

        A scan costs one pass over the receivers, so it runs only when the log
        has grown far enough that someone could have crossed max_pending: the
        next scan is due when the closest receiver would cross it, at most
        `compact_step` bytes on, at least `max_pending // 64` (so a receiver
        that lingers near the limit cannot make every say scan). A slow client
        is thus dropped at most max_pending/64 bytes (and one message) late.
        Returns the connections dropped as slow; the caller wakes their sockets.
        """
        if len(self.log) < self.compact_at:
            return []
        max_pending = self.settings.max_pending
        slow = [c for c in self.receivers if self.lag_locked(c) > max_pending]
        for conn in slow:
            self.halt_locked(conn, "slow")
        low = end = self.log_end
        crossing = end + self.compact_step
        for c in self.receivers:
            if c.cursor is not None:
                low = min(low, c.cursor)
                crossing = min(crossing, c.cursor + max_pending - c.private_bytes + 1)
        if low > self.base:
            del self.log[: low - self.base]
            self.base = low
            del self.ends[: bisect.bisect_right(self.ends, low)]
        soonest = end + max(1, max_pending // 64)
        self.compact_at = max(crossing, soonest) - self.base
        return slow

    def remove_locked(self, conn: Conn, reason: str) -> bool:
        """Unregister once; announce `left` if it had joined. False if already removed."""
        if conn.removed:
            return False
        conn.removed = True
        conn.reason = reason
        if conn.name is not None:
            del self.joined[protocol.name_key(conn.name)]
            self.names.remove(conn.name_json)
            conn.final_end = self.log_end
            if not self.shutting_down:
                left = protocol.encode_left(conn.name_json, reason) + b","
                self._append_locked(left, urgent=False)
        self.want_locked(conn)
        return True

    # --- taking (lock held, writer thread) ---

    def take_locked(self, conn: Conn) -> list[bytes]:
        """Everything due to `conn`, up to one record's budget, in delivery order."""
        pieces: list[bytes] = []
        room = RECORD_BUDGET
        private, own = conn.private, conn.own
        pos = conn.cursor
        end = conn.final_end if conn.final_end is not None else self.log_end
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
                i = bisect.bisect_right(self.ends, pos + room)
                cut = self.ends[i - 1] if i else pos
                if cut <= pos:
                    return pieces
                stop = cut
            pieces.append(bytes(self.log[pos - self.base : stop - self.base]))
            room -= stop - pos
            pos = conn.cursor = stop


class Flusher:
    """A writer thread for a share of the keyed connections: take, seal, send, never block.

    Loop: collect the connections worth a look (all of its members when the log
    grew, else those marked dirty), give each one record of what is due, then
    sleep in poll() on a wake-up pipe plus the sockets that are full.
    """

    def __init__(self, server: Server, index: int):
        self.server = server
        self.hub = server.hub
        self.settings = server.settings
        # (lock) shared with the threads that queue work
        self.members: set[Conn] = set()
        self.dirty: set[Conn] = set()
        self.seen_end = 0  # log_end at the last full scan
        self.lazy_due: float | None = None  # when to scan for entries that may wait
        self.scan_s = 0.0  # how long the last full scan took (written by the flusher)
        self.sleeping = False
        self.closed = False
        # flusher only
        self.blocked: dict[Conn, float] = {}  # socket full: conn -> deadline for its record
        self.unblocked: set[Conn] = set()  # drained since: look again
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.thread = threading.Thread(target=self.run, name=f"flusher {index}", daemon=True)

    def kick(self) -> None:
        """Wake the thread from poll(); called outside the lock (by Hub.__exit__)."""
        try:
            os.write(self.wfd, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def run(self) -> None:
        hub = self.hub
        sleep_ms = -1
        try:
            while True:
                with hub:
                    if self.closed:
                        return
                    work, full = self._collect_locked()
                    if not work and not self.unblocked:
                        self.sleeping = True
                        sleep_ms = self._sleep_ms_locked()
                if work or self.unblocked:
                    started = time.monotonic()
                    work |= self.unblocked
                    self.unblocked = set()
                    for conn in work:
                        self._service(conn)
                    if full:
                        self.scan_s = time.monotonic() - started
                    if self.blocked:
                        self._poll(0)
                else:
                    self._poll(sleep_ms)
        except Exception:  # a bug here would silence many clients: make it loud
            log.exception("flusher failed")
            raise

    def close_pipe(self) -> None:
        """Release the wake-up pipe once the thread has ended (no kick can follow)."""
        if not self.thread.is_alive():
            os.close(self.rfd)
            os.close(self.wfd)

    def _collect_locked(self) -> tuple[set[Conn], bool]:
        """The connections to service now, and whether that is a full scan."""
        hub = self.hub
        full = self.seen_end != hub.log_end and (
            hub.urgent_end > self.seen_end
            or (self.lazy_due is not None and time.monotonic() >= self.lazy_due)
        )
        if full:
            self.seen_end = hub.log_end
            self.lazy_due = None
            work = self.members | self.dirty
        else:
            work = self.dirty
        self.dirty = set()
        return work, full

    def _sleep_ms_locked(self) -> int:
        """poll() timeout: until the first send deadline or the lazy scan, else forever."""
        deadlines = list(self.blocked.values())
        if self.lazy_due is not None:
            deadlines.append(self.lazy_due)
        if not deadlines:
            return -1
        wait = min(deadlines) - time.monotonic()
        return max(0, int(wait * 1000) + 1)

    def _service(self, conn: Conn) -> None:
        """Give `conn` one record of what is due to it (or its bye, or let it go)."""
        if conn.outbuf is not None:  # still waiting for room for the previous record
            if conn.stop:
                self._retire(conn)
            return
        hub = self.hub
        retire = False
        with hub:
            if conn.flusher is not self:
                return  # retired already
            if conn.stop:
                retire = True
            else:
                pieces = hub.take_locked(conn)
                final = False
                if not pieces:
                    if conn.bye is not None and not conn.bye_sent:
                        conn.bye_sent = True
                        pieces, final = [entry(protocol.bye(conn.bye))], True
                    elif conn.removed:
                        retire = True
                    else:
                        return
                elif hub.has_pending_locked(conn) or conn.removed:
                    self.dirty.add(conn)  # more than a record's worth, or a bye to follow
        if retire:
            self._retire(conn)
            return
        assert conn.tx is not None
        if conn.tx.seq >= LAST_DATA_SEQ:  # §3: close before the counter runs out
            pieces, final = [entry(protocol.bye("shutdown"))], True
        plaintext = bytearray(b"[")
        for piece in pieces:
            plaintext += piece
        plaintext[-1] = 0x5D  # the last trailing comma becomes "]"
        record = conn.tx.seal(bytes(plaintext))
        conn.outbuf = memoryview(protocol.encode_frame(record))
        conn.close_after_send = final
        self._push(conn, time.monotonic())

    def _push(self, conn: Conn, now: float) -> None:
        """Send what fits of `conn.outbuf` without waiting."""
        out = conn.outbuf
        try:
            while out:
                out = out[conn.sock.send(out, socket.MSG_DONTWAIT) :]
        except BlockingIOError:
            conn.outbuf = out
            self.blocked.setdefault(conn, now + self.settings.send_timeout)
            return
        except OSError:
            self._retire(conn)  # the peer is gone; its reader sees it too and reports it
            return
        conn.outbuf = None
        was_blocked = self.blocked.pop(conn, None) is not None
        if conn.close_after_send:
            self._retire(conn)
        elif was_blocked:  # work queued meanwhile found it busy and was left: look again
            self.unblocked.add(conn)

    def _poll(self, timeout_ms: int) -> None:
        """Wait for a kick or for room on full sockets; drop those past `send_timeout`."""
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        by_fd: dict[int, Conn] = {}
        for conn in self.blocked:
            by_fd[conn.sock.fileno()] = conn
            poller.register(conn.sock, select.POLLOUT)
        events = poller.poll(timeout_ms)
        now = time.monotonic()
        for fd, _ in events:
            if fd == self.rfd:
                while True:
                    try:
                        if not os.read(self.rfd, 4096):
                            break
                    except BlockingIOError:
                        break
            elif by_fd[fd] in self.blocked:
                self._push(by_fd[fd], now)
        for conn, deadline in list(self.blocked.items()):
            if now >= deadline:
                with self.hub:
                    first = self.hub.halt_locked(conn, "slow")
                if first:
                    log.info(
                        "dropped %s: a send waited over %.1f s", conn, self.settings.send_timeout
                    )
                self._retire(conn)

    def _retire(self, conn: Conn) -> None:
        """This flusher is done with `conn`: no more sends; close it if the reader is gone."""
        self.blocked.pop(conn, None)
        self.unblocked.discard(conn)
        conn.outbuf = None
        with self.hub:
            if conn.flusher is not self:
                return
            conn.flusher = None
            conn.stop = True
            self.members.discard(conn)
            self.dirty.discard(conn)
            self.hub.receivers.discard(conn)
            last = self.hub.release_locked(conn)
        wake(conn.sock)  # the reader, if still in recv, returns
        if last:
            self.server.close(conn)


class Server:
    """Owns the listening socket, the hub and every thread."""

    def __init__(self, settings: Settings, key: Any | None = None):
        self.settings = settings
        self.key = (
            key if key is not None else crypto_utils.load_or_create_server_key(settings.key_file)
        )
        self.spki = crypto_utils.spki_der(self.key)
        self.fingerprint = crypto_utils.fingerprint(self.spki)
        slow = crypto_utils.slow_paths(self.key)  # runs the RSA self-check now, not in a handshake
        if slow:
            log.warning(
                "this pycryptodome fails the self-check of the fast %s code; using its "
                "public API instead (correct, but handshakes or records cost more CPU)",
                " and ".join(slow),
            )
        self.hub = Hub(settings)
        self.listener: socket.socket | None = None
        self.address: tuple[str, int] = (settings.host, settings.port)
        self._threads: list[threading.Thread] = []
        self.hub.flushers = [Flusher(self, i) for i in range(FLUSHERS)]
        self._next_flusher = 0  # (lock) round robin
        self._reaper_wake = threading.Event()
        self._stopped = threading.Event()

    # --- lifecycle ---

    def listen(self) -> None:
        """Raise the fd limit, bind and listen; nothing is accepted until `start`.

        Split from `start` so that `main` prints the fingerprint before the first
        connection is accepted (§2 Server identity).
        """
        if self.listener is not None:
            return
        threading.stack_size(THREAD_STACK_BYTES)
        raise_fd_limit(self.settings.max_clients)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
            sock.listen(min(socket.SOMAXCONN, 4096))
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.address = sock.getsockname()[:2]

    def start(self) -> None:
        """Listen (if not yet), then start the accept, reaper and flusher threads."""
        self.listen()
        for target, name in ((self._accept_loop, "accept"), (self._reap_loop, "reaper")):
            self._threads.append(threading.Thread(target=target, name=name, daemon=True))
        self._threads += [flusher.thread for flusher in self.hub.flushers]
        for thread in self._threads:
            thread.start()

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """§4 SIGTERM: stop accepting, `bye` (shutdown) to keyed clients, no `left`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.listener is not None:
            wake(self.listener)
            self.listener.close()
        to_wake: list[socket.socket] = []
        with self.hub:
            self.hub.shutting_down = True
            for conn in self.hub.conns:
                if conn.flusher is not None and not conn.stop:
                    self.hub.remove_locked(conn, "shutdown")
                    if conn.bye is None:
                        conn.bye = "shutdown"
                    self.hub.want_locked(conn)
                elif not conn.key_read or conn.keyed or conn.removed:
                    to_wake.append(conn.sock)
                # else: its reader is deriving keys; it sees shutting_down and says bye itself
        for sock in to_wake:
            wake(sock)
        self._reaper_wake.set()
        deadline = time.monotonic() + grace
        with self.hub:
            while self.hub.conns and time.monotonic() < deadline:
                self.hub.drained.wait(deadline - time.monotonic())
            for flusher in self.hub.flushers:
                flusher.closed = True
                self.hub._kick_locked(flusher)
            kicks, self.hub.kicks = self.hub.kicks, []
        for flusher in kicks:
            flusher.kick()
        for flusher in self.hub.flushers:
            flusher.thread.join(max(0.1, deadline - time.monotonic()))
            flusher.close_pipe()
        log.info("server stopped")

    # --- accepting ---

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while not self._stopped.is_set():
            try:
                sock, addr = self.listener.accept()
            except OSError as exc:
                if self._stopped.is_set():
                    return
                log.warning("accept failed: %s", exc)  # e.g. EMFILE: keep serving others
                time.sleep(0.05)
                continue
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, addr, time.monotonic())
        with self.hub:
            full = len(self.hub.conns) >= self.settings.max_clients
            if not full:
                self.hub.conns.add(conn)
        if full:
            log.info(
                "refused %s: server full (%d connections)", conn.peer, self.settings.max_clients
            )
            refusal = protocol.encode_frame(
                protocol.encode_server_full(
                    f"the server is full ({self.settings.max_clients} connections); try later"
                )
            )
            try:
                sock.send(refusal, socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"reader {conn.peer}")
        thread.daemon = True
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: refuse this one, keep going
            log.warning("refused %s: %s", conn.peer, exc)
            self.close(conn)
        else:
            log.info("connect from %s", conn.peer)

    # --- one connection: reader thread ---

    def _serve(self, conn: Conn) -> None:
        decoder = protocol.FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
        try:
            self._handshake(conn, decoder)
            self._read_records(conn, decoder)
        except CloseSilently as exc:
            self._drop(conn, "protocol", bye=conn.keyed, why=str(exc))
        except CryptoError as exc:
            self._drop(conn, "protocol", bye=False, why=str(exc))
        except ByeProtocol as exc:
            self._drop(conn, "protocol", bye=True, why=str(exc))
        except EOFError:
            self._drop(conn, "disconnect", bye=False, why="closed by peer")
        except OSError as exc:
            self._drop(conn, "disconnect", bye=False, why=exc.strerror or str(exc))
        except Exception:  # a bug must cost one connection, never the server
            log.exception("internal error on %s", conn.peer)
            self._drop(conn, "protocol", bye=False, why="internal error")
        finally:
            self._finish(conn)

    def _recv_frame(self, conn: Conn, decoder: protocol.FrameDecoder) -> bytes:
        """The next frame body; raises EOFError when the peer (or a waker) closed."""
        while True:
            body = decoder.next_frame()
            if body is not None:
                return body
            try:
                data = conn.sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Wait without a buffer: a reader blocked inside recv() would hold
                # RECV_CHUNK_BYTES (12 KiB of it resident) per idle client.
                poller = select.poll()  # select() would not take fds over 1023
                poller.register(conn.sock, select.POLLIN)
                poller.poll()
                continue
            if not data:
                raise EOFError
            conn.last_seen = time.monotonic()
            decoder.feed(data)

    def _handshake(self, conn: Conn, decoder: protocol.FrameDecoder) -> None:
        """§2: hello out, key in, session keys; then the channel is up and a writer runs."""
        nonce = crypto_utils.random_bytes(protocol.NONCE_BYTES)
        eph = crypto_utils.Ephemeral()
        hello = protocol.Hello(key=self.spki, nonce=nonce, eph=eph.public)
        conn.sock.sendall(protocol.encode_frame(protocol.encode_hello(hello)))
        body = self._recv_frame(conn, decoder)
        with self.hub:
            if self.hub.shutting_down:
                raise EOFError  # shutdown came first and has woken this socket
            conn.key_read = True
        key_msg = protocol.parse_key(body)
        k_c2s, k_s2c = crypto_utils.server_keys(
            self.key, self.spki, nonce, eph, key_msg.nonce, key_msg.secret, key_msg.eph
        )
        del eph  # forward secrecy: the private half is gone (exchange() already dropped it)
        decoder.max_len = protocol.MAX_RECORD_FRAME
        conn.rx = crypto_utils.RecordCipher(k_c2s)
        conn.tx = crypto_utils.RecordCipher(k_s2c)
        with self.hub:
            shutting_down = self.hub.shutting_down
            if conn.removed and not shutting_down:
                raise EOFError
            if not shutting_down:
                flusher = self.hub.flushers[self._next_flusher % len(self.hub.flushers)]
                self._next_flusher += 1
                conn.flusher = flusher
                conn.holds += 1
                conn.keyed = True
                flusher.members.add(conn)
                self.hub.receivers.add(conn)
        if shutting_down:
            self._bye_from_reader(conn, "shutdown")
            raise EOFError

    def _bye_from_reader(self, conn: Conn, reason: str) -> None:
        """§4: `bye` to a connection that sent `key` but has no flusher yet (shutdown).

        With no flusher, the reader is the only thread with its send counter, so
        it may seal. One non-blocking send: the client has had nothing since
        `hello`, so its buffer has room; if not, it is closed without the bye.
        """
        assert conn.tx is not None
        record = conn.tx.seal(protocol.join_record([protocol.encode_message(protocol.bye(reason))]))
        try:
            conn.sock.send(protocol.encode_frame(record), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _read_records(self, conn: Conn, decoder: protocol.FrameDecoder) -> None:
        """§3: open each record, decode it, apply its messages in order."""
        assert conn.rx is not None
        while True:
            try:
                body = self._recv_frame(conn, decoder)
            except CloseSilently as exc:  # a bad length after key: bye (protocol)
                raise ByeProtocol(str(exc)) from None
            plaintext = conn.rx.open(body)
            for obj in protocol.decode_record(plaintext):
                if not self._apply(conn, obj):
                    return

    # --- messages (reader thread) ---

    def _apply(self, conn: Conn, obj: dict[str, Any]) -> bool:
        """Apply one message; False once the connection is to end (leave)."""
        try:
            kind = protocol.message_type(obj)
            if conn.name is None and kind in ("say", "dm", "who"):
                raise Refused("not_joined", f"join before sending {kind}")
            if conn.name is not None and kind == "join":
                raise Refused("already_joined", f"you already joined as {conn.name}")
            msg = protocol.parse_client_message(obj, self.settings.max_text)
            if isinstance(msg, protocol.Say):
                self._say(conn, msg)
            elif isinstance(msg, protocol.Dm):
                self._dm(conn, msg)
            elif isinstance(msg, protocol.Join):
                self._join(conn, msg)
            elif isinstance(msg, protocol.Ping):
                self._reply(conn, protocol.pong(msg.id))
            elif isinstance(msg, protocol.Who):
                with self.hub:
                    users = protocol.encode_users(self.hub.names) + b","
                self._push_reply(conn, users)
            else:
                self._leave(conn)
                return False
        except Refused as refusal:
            log.debug("refused from %s: %s (%s)", conn.peer, refusal.code, refusal.message)
            self._reply(conn, protocol.error(refusal.code, refusal.message))
        return True

    def _reply(self, conn: Conn, obj: dict[str, Any]) -> None:
        try:
            data = entry(obj)
        except ValueError:  # e.g. a ping id that JSON cannot carry back (a huge integer)
            data = entry(protocol.error("bad_message", "ping id cannot be echoed"))
        self._push_reply(conn, data)

    def _push_reply(self, conn: Conn, data: bytes) -> None:
        """Queue one encoded reply for `conn` alone; drop it as slow if that is too much."""
        if len(data) > RECORD_BUDGET:
            data = entry(protocol.error("bad_message", "the reply would exceed a record"))
        with self.hub:
            self.hub.push_private_locked(conn, data)
            slow = self.hub.lag_locked(conn) > self.settings.max_pending
            if slow:  # log and wake once: later replies to a halted conn find it removed
                slow = self.hub.halt_locked(conn, "slow")
        if slow:
            log.info("dropped %s: over %d pending bytes", conn, self.settings.max_pending)
            wake(conn.sock)

    def _join(self, conn: Conn, msg: protocol.Join) -> None:
        key = protocol.name_key(msg.name)
        name_json = protocol.json_string(msg.name)
        joined = protocol.encode_joined(name_json) + b","
        max_text, rate = self.settings.max_text, self.settings.rate
        now = time.monotonic()
        with self.hub:
            if key in self.hub.joined:
                taken = True
            else:
                taken = False
                welcome = protocol.encode_welcome(name_json, self.hub.names, max_text, rate)
                self.hub._append_locked(joined, urgent=False)
                self.hub.joined[key] = conn
                bisect.insort(self.hub.names, name_json)
                conn.name, conn.name_json = msg.name, name_json
                conn.cursor = self.hub.log_end
                conn.bucket = Bucket(self.settings.rate, now)
                self.hub.push_private_locked(conn, welcome + b",")
        if taken:
            raise Refused("name_taken", f"the name {msg.name} is taken")
        log.info("%s joined as %r", conn.peer, msg.name)

    def _say(self, conn: Conn, msg: protocol.Say) -> None:
        head, tail = self._message_parts(conn, msg.text)
        now = time.monotonic()
        slow: list[Conn] = []
        with self.hub:
            if conn.removed:
                return
            if not conn.bucket.take(now):
                limited = True
            else:
                limited = False
                msg_id = self.hub.next_id
                self.hub.next_id += 1
                span = self.hub._append_locked(b"%s%d%s," % (head, msg_id, tail))
                conn.own.append(span)
                conn.own_bytes += span[1] - span[0]
                slow = self.hub.compact_locked()
        if limited:
            raise Refused("rate_limited", f"more than {self.settings.rate} messages per second")
        self._wake_slow(slow)

    def _dm(self, conn: Conn, msg: protocol.Dm) -> None:
        text = protocol.json_string(msg.text)
        ts = int(time.time() * 1000)
        now = time.monotonic()
        overflow = False
        with self.hub:
            target = self.hub.joined.get(protocol.name_key(msg.to))
            if conn.removed:
                return
            if target is None:
                problem = "unknown_user"
            elif not conn.bucket.take(now):
                problem = "rate_limited"
            else:
                problem = None
                msg_id = self.hub.next_id
                self.hub.next_id += 1
                data = protocol.encode_direct(msg_id, conn.name_json, target.name_json, text, ts)
                self.hub.push_private_locked(target, data + b",")
                if self.hub.lag_locked(target) > self.settings.max_pending:
                    overflow = self.hub.halt_locked(target, "slow")
        if problem == "unknown_user":
            raise Refused("unknown_user", f"no user named {msg.to[:64]}")
        if problem == "rate_limited":
            raise Refused("rate_limited", f"more than {self.settings.rate} messages per second")
        if overflow:
            self._wake_slow([target])

    @staticmethod
    def _message_parts(conn: Conn, text: str) -> tuple[bytes, bytes]:
        """The bytes of a `message` around its id, encoded outside the lock."""
        ts = int(time.time() * 1000)
        return protocol.encode_message_parts(conn.name_json, protocol.json_string(text), ts)

    def _leave(self, conn: Conn) -> None:
        with self.hub:
            self.hub.remove_locked(conn, "leave")
            conn.bye = "leave"
        log.info("%s left", conn.name or conn.peer)

    def _wake_slow(self, slow: list[Conn]) -> None:
        for conn in slow:
            log.info("dropped %s: over %d pending bytes", conn, self.settings.max_pending)
            wake(conn.sock)

    # --- ending a connection ---

    def _drop(self, conn: Conn, reason: str, *, bye: bool, why: str) -> None:
        """End `conn` for `reason`; with `bye`, its flusher sends that first."""
        with self.hub:
            if bye and conn.flusher is not None and conn.bye is None and not conn.stop:
                first = self.hub.remove_locked(conn, reason)
                conn.bye = reason
            elif conn.bye is None:
                first = self.hub.halt_locked(conn, reason)
            else:
                first = False
        if first:
            level = logging.INFO if reason != "disconnect" or conn.name else logging.DEBUG
            log.log(level, "%s closed (%s): %s", conn, reason, why)

    def _finish(self, conn: Conn) -> None:
        """The reader's last act: let go of the socket (its flusher may still send a bye)."""
        with self.hub:
            last = self.hub.release_locked(conn)
        if last:
            self.close(conn)

    def close(self, conn: Conn) -> None:
        """Close the socket once nobody uses it, and forget the connection."""
        try:  # unread input would make close() send RST, which can destroy our last bye
            for _ in range(DRAIN_ON_CLOSE_BYTES // RECV_CHUNK_BYTES):
                if not conn.sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
        conn.sock.close()
        with self.hub:
            self.hub.conns.discard(conn)
            self.hub.receivers.discard(conn)
            conn.private.clear()
            if not self.hub.conns:
                self.hub.drained.notify_all()

    # --- timeouts: reaper thread ---

    def _reap_loop(self) -> None:
        """§4 Timeouts: handshake (from accept) and idle (joined, nothing received)."""
        s = self.settings
        tick = max(0.01, min(0.5, s.handshake_timeout / 4, s.idle_timeout / 4))
        while not self._stopped.is_set():
            self._reaper_wake.wait(tick)
            self._reaper_wake.clear()
            now = time.monotonic()
            with self.hub:
                expired = [
                    c
                    for c in self.hub.conns
                    if not c.removed
                    and (
                        (c.name is None and now - c.accepted_at >= s.handshake_timeout)
                        or (c.name is not None and now - c.last_seen >= s.idle_timeout)
                    )
                ]
            for conn in expired:
                if conn.keyed:
                    self._drop(conn, "timeout", bye=True, why="timed out")
                else:
                    with self.hub:
                        self.hub.remove_locked(conn, "timeout")
                    log.info("%s closed: no handshake within %.1f s", conn, s.handshake_timeout)
                    wake(conn.sock)


def raise_fd_limit(max_clients: int) -> None:
    """Lift the soft open-file limit to the hard one; warn if it cannot fit max_clients."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to do
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, max_clients + 64)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < max_clients + 32:
        log.warning(
            "the open-file limit is %d, below the %d that --max-clients %d needs",
            soft,
            max_clients + 32,
            max_clients,
        )


# --- command line ---


# (flag, type, default, help): every flag also reads BCAST_<FLAG> from the environment.
FLAGS: list[tuple[str, Any, Any, str]] = [
    ("host", str, DEFAULT_HOST, "address to listen on"),
    ("port", int, DEFAULT_PORT, "TCP port, 0 for any free one"),
    (
        "key-file",
        Path,
        None,
        "server RSA key, created if missing (default $XDG_DATA_HOME/bcast/server_key.pem)",
    ),
    (
        "max-clients",
        int,
        DEFAULT_MAX_CLIENTS,
        f"most connections at once, joined or not (at most {MAX_CLIENTS_LIMIT}: a welcome "
        "lists every name)",
    ),
    ("rate", int, DEFAULT_RATE, "say/dm per second per client, also the burst; 0 = no limit"),
    ("max-text", int, DEFAULT_MAX_TEXT, "longest text in UTF-8 bytes"),
    ("idle-timeout", float, DEFAULT_IDLE_TIMEOUT_S, "seconds a joined client may stay silent"),
    ("handshake-timeout", float, DEFAULT_HANDSHAKE_TIMEOUT_S, "seconds from connect to join"),
    (
        "send-timeout",
        float,
        DEFAULT_SEND_TIMEOUT_S,
        "seconds one send may block before that client is dropped as slow",
    ),
    (
        "max-pending",
        int,
        DEFAULT_MAX_PENDING_BYTES,
        "bytes that may wait for one client before it is dropped as slow",
    ),
]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="server.py",
        description="bcast/1 encrypted group-chat server. Each flag falls back to the "
        "environment variable named in its help.",
    )
    for flag, kind, default, text in FLAGS:
        env = "BCAST_" + flag.upper().replace("-", "_")
        shown = f" (default {default})" if default is not None else ""
        p.add_argument(
            f"--{flag}",
            type=kind,
            default=os.environ.get(env, default),
            help=f"{text}; {env}{shown}",
        )
    p.add_argument(
        "--log-level",
        type=str.upper,
        default=os.environ.get("BCAST_LOG_LEVEL", "INFO"),
        choices=LOG_LEVELS,
        help="BCAST_LOG_LEVEL (default INFO)",
    )
    return p


def settings_from_args(argv: list[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse converts string defaults from the environment
    checks = [
        (0 <= args.port <= 65535, "--port must be 0..65535"),
        (
            1 <= args.max_clients <= MAX_CLIENTS_LIMIT,
            f"--max-clients must be 1..{MAX_CLIENTS_LIMIT} (a welcome lists every name "
            "in one record)",
        ),
        (args.rate >= 0, "--rate must be 0 (no limit) or more"),
        (
            1 <= args.max_text <= 48 * 1024,
            "--max-text must be 1..49152 bytes (a record holds 1 MiB)",
        ),
        (args.idle_timeout > 0, "--idle-timeout must be positive"),
        (args.handshake_timeout > 0, "--handshake-timeout must be positive"),
        (args.send_timeout > 0, "--send-timeout must be positive"),
        (args.max_pending >= 65536, "--max-pending must be at least 65536 bytes"),
        (  # argparse checks `choices` for typed flags, not for a default from the environment
            args.log_level in LOG_LEVELS,
            f"--log-level (or BCAST_LOG_LEVEL) must be one of {', '.join(LOG_LEVELS)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return Settings(
        host=args.host,
        port=args.port,
        key_file=Path(args.key_file) if args.key_file else default_key_file(),
        max_clients=args.max_clients,
        rate=args.rate,
        max_text=args.max_text,
        idle_timeout=args.idle_timeout,
        handshake_timeout=args.handshake_timeout,
        send_timeout=args.send_timeout,
        max_pending=args.max_pending,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    # The format uses none of these; skipping them saves work on every log line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not settings.key_file.exists():
        print(f"creating a new server key at {settings.key_file} ...", flush=True)
    try:
        server = Server(settings)
    except CryptoError as exc:
        print(f"server.py: {exc}", file=sys.stderr)
        return 1
    try:
        server.listen()
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"server.py: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    host, port = server.address
    print(f"bcast server listening on {host}:{port}", flush=True)
    print(f"key file: {settings.key_file}", flush=True)
    print(f"fingerprint: {server.fingerprint}", flush=True)
    print(
        f"connect with: python3 client.py --host {host} --port {port} "
        f"--fingerprint {server.fingerprint}",
        flush=True,
    )
    server.start()  # §2: the fingerprint is out before the first connection is accepted
    log.info("listening on %s:%d, fingerprint %s", host, port, server.fingerprint)
    return run_until_signal(server)


def run_until_signal(server: Server) -> int:
    """Serve until SIGINT or SIGTERM; a second signal exits at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os._exit(130)
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
