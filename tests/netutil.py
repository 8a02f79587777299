"""What the socket tests share: one time unit, and the helpers they used to copy.

Every wait in the suite is a multiple of `UNIT_S` (as websockets' tests use MS),
so a slower machine needs one number changed, not forty.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

UNIT_S = 0.5  # the short handshake/idle/send timeout the tests give a server
PROMPT_S = 4 * UNIT_S  # how long something "at once" may take on a loaded test machine
RECV_S = 10 * UNIT_S  # bound on any single wait for a message
LONG_S = 60 * UNIT_S  # a timeout that must NOT be what ends a test's connection


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Every byte the server sends until it closes; fails if it is still open after `timeout`."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"still open after {timeout} s ({len(data)} bytes received)"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return bytes(data)
        except socket.timeout:
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def run_in_threads(work: Callable[[int], None], count: int) -> None:
    """Run `work(0)` ... `work(count - 1)` on `count` threads at once; wait for all."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
