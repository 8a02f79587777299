"""Flushers: the writer threads. Take what is due, seal it, send it, never block.

Who owns what: a `Flusher` thread is the only thread that seals and sends
records on the connections of its `FlushSlot` (so counter order is wire
order); what other threads may touch of it is the slot, which the hub owns
and guards. Its own fields (the sockets that are full, their deadlines) are
its thread's alone. When it lets go of a connection and was the last holder
of the socket, it calls the `close` callback it was built with.

Loop: ask the hub for the connections worth a look (all of its members when
the log grew, else those marked dirty), give each one record of what is due,
then sleep in poll() on a wake-up pipe plus the sockets that are full.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import crypto_utils
import protocol
from conn import Conn
from delivery import entry
from hub import Hub

log = logging.getLogger("bcast.server")

# §3: never seal a record that would take the counter to 2**32; keep one for `bye`.
LAST_DATA_SEQ = crypto_utils.MAX_RECORDS_PER_DIRECTION - 2


def wake(sock: socket.socket) -> None:
    """Unblock the threads using `sock` (the reader's poll returns); the fd stays open."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Flusher:
    """A writer thread for a share of the keyed connections."""

    def __init__(self, hub: Hub, index: int, send_timeout: float, close: Callable[[Conn], None]):
        self.hub = hub
        self.send_timeout = send_timeout
        self.close = close  # closes a socket that nobody holds any more
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.slot = hub.add_slot(self.kick)
        # this thread only
        self.blocked: dict[Conn, float] = {}  # socket full: conn -> deadline for its record
        self.unblocked: set[Conn] = set()  # drained since: look again
        self.thread = threading.Thread(target=self.run, name=f"flusher {index}", daemon=True)

    def kick(self) -> None:
        """Wake the thread from poll(); called by the hub outside its lock."""
        try:
            os.write(self.wfd, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def run(self) -> None:
        try:
            while True:
                collected = self.hub.collect(self.slot, may_sleep=not self.unblocked)
                if collected is None:
                    return
                work, full, sleep_ms = collected
                if work or self.unblocked:
                    started = time.monotonic()
                    work |= self.unblocked
                    self.unblocked = set()
                    for conn in work:
                        self._service(conn)
                    if full:
                        self.hub.note_scan(self.slot, time.monotonic() - started)
                    if self.blocked:
                        self._poll(0)
                else:
                    self._poll(self._sleep_ms(sleep_ms))
        except Exception:  # a bug here would silence many clients: make it loud
            log.exception("flusher failed")
            raise

    def close_pipe(self) -> None:
        """Release the wake-up pipe once the thread has ended (no kick can follow)."""
        if not self.thread.is_alive():
            os.close(self.rfd)
            os.close(self.wfd)

    def _sleep_ms(self, lazy_ms: int) -> int:
        """poll() timeout: until the first send deadline or the lazy scan, else forever."""
        if not self.blocked:
            return lazy_ms
        wait = max(0, int((min(self.blocked.values()) - time.monotonic()) * 1000) + 1)
        return wait if lazy_ms < 0 else min(wait, lazy_ms)

    def _service(self, conn: Conn) -> None:
        """Give `conn` one record of what is due to it (or its bye, or let it go)."""
        if conn.outbuf is not None:  # still waiting for room for the previous record
            if conn.halted:
                self._retire(conn)
            return
        taken = self.hub.take(conn, self.slot)
        if taken is None:
            return
        if taken.retire:
            self._retire(conn)
            return
        pieces, final = taken.pieces, taken.final
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
            self.blocked.setdefault(conn, now + self.send_timeout)
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
                self._drain_pipe()
            elif by_fd[fd] in self.blocked:
                self._push(by_fd[fd], now)
        for conn, deadline in list(self.blocked.items()):
            if now >= deadline:
                if self.hub.halt_slow(conn):
                    log.info(
                        "dropped %s as slow: a send waited over %.1f s",
                        conn.describe(),
                        self.send_timeout,
                    )
                self._retire(conn)

    def _drain_pipe(self) -> None:
        while True:
            try:
                if not os.read(self.rfd, 4096):
                    return
            except BlockingIOError:
                return

    def _retire(self, conn: Conn) -> None:
        """This flusher is done with `conn`: no more sends; close it if the reader is gone."""
        self.blocked.pop(conn, None)
        self.unblocked.discard(conn)
        conn.outbuf = None
        last = self.hub.retire(conn, self.slot)
        if last is None:
            return
        wake(conn.sock)  # the reader, if still waiting in poll, returns
        if last:
            self.close(conn)
