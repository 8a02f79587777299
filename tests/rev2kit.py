"""Helpers shared by the revision-2 tests (§5 identity/moderation, §6 history) over real sockets.

Every client is the independent reference peer (tests/refpeer.py) with
`validate` on: each message the server sends is checked against §4-§6's
shapes as it arrives. To show that something did NOT arrive, tests use
`RefPeer.sync()`: a ping whose pong comes after everything queued before it.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

from refpeer import RefIdentity, RefPeer, connect_and_join

RECV_S = 5.0  # bound on any single wait for a message
TS_SLACK_MS = 5_000  # "the server's time": a few seconds of skew and delay
LOCAL = "127.0.0.1"


class Room:
    """Clients of one server; every peer it makes is closed by `close`."""

    def __init__(self, address: tuple[str, int]):
        self.host, self.port = address[0], address[1]
        self.peers: list[RefPeer] = []

    def connect(self, source: str = LOCAL) -> RefPeer:
        """A keyed connection, not joined yet, from the address `source`."""
        peer = RefPeer.connect(
            self.host, self.port, timeout=RECV_S, source_address=(source, 0), validate=True
        )
        self.peers.append(peer)
        return peer

    def join(
        self,
        name: str,
        identity: RefIdentity | None = None,
        *,
        source: str = LOCAL,
        history: int | None = None,
        since: int | None = None,
    ) -> tuple[RefPeer, dict[str, Any]]:
        """Connect and join (key and join in one write, §2); the peer and its welcome."""
        peer, welcome = connect_and_join(
            self.host,
            self.port,
            name,
            identity=identity,
            history=history,
            since=since,
            timeout=RECV_S,
            source_address=(source, 0),
            validate=True,
        )
        self.peers.append(peer)
        return peer, welcome

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@contextlib.contextmanager
def room_of(server: Any) -> Iterator[Room]:
    host, port = server.address[0], server.address[1]
    # a dual-stack listener (::) is reached over IPv4 loopback, as the sources are IPv4
    room = Room(("127.0.0.1" if host in ("::", "0.0.0.0") else host, port))
    try:
        yield room
    finally:
        room.close()


def code_of(msg: dict[str, Any]) -> str:
    """An error's code, or the type of anything else (for compact asserts)."""
    return msg.get("code", "") if msg["type"] == "error" else msg["type"]


def ask(peer: RefPeer, msg: dict[str, Any]) -> dict[str, Any]:
    """Send `msg`, return the first reply meant for us alone (error, bans, whois, ...)."""
    reply, _ = peer.request(msg)
    return reply


def refused_and_closed(peer: RefPeer, code: str) -> None:
    """§5 not_allowed/banned: error `code`, then bye `code`, then the server closes."""
    msgs = peer.wait_closed(RECV_S)
    kinds = [(m["type"], m.get("code") or m.get("reason")) for m in msgs]
    assert kinds == [("error", code), ("bye", code)], kinds


def assert_recent(ms: int) -> None:
    """A time in integer milliseconds since the epoch, near the server's now."""
    assert isinstance(ms, int) and not isinstance(ms, bool)
    assert abs(ms - time.time() * 1000) < TS_SLACK_MS, ms


def presence(msgs: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """The joined/left news among `msgs`, as (type, name, reason)."""
    return [
        (m["type"], m["name"], m.get("reason")) for m in msgs if m["type"] in ("joined", "left")
    ]


class LineReader:
    """A subprocess's stream read by a thread into a queue, to wait for one line."""

    def __init__(self, stream: Any):
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, *words: str, timeout: float = RECV_S) -> str:
        """The next line holding every one of `words`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {words} in {self.seen[-5:]}") from None
            self.seen.append(line)
            if all(word in line for word in words):
                return line


def run_refused(cmd: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a server command that must refuse to start; its result."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
