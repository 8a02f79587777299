"""Soak: many clients talking at once while some drop out, over real sockets.

50 reference peers join, then all talk at once (rate 0): each sends its says
in records of a few messages while a thread per peer reads everything that
arrives. Five of them send only the first half of their says, wait until the
server has read them (a `pong`), and close the socket without `leave`. Every
client that stayed for the whole run must then hold every say exactly once,
per sender in order, all in one increasing-`id` order, plus one
`left(disconnect)` per dropout. Bounded by deadlines throughout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from netutil import RECV_S
from refpeer import RefPeer, connect_and_join

CLIENTS = 50
SAYS = 200  # per client that stays
LEAVERS = 5
LEAVER_SAYS = 100  # a leaver drops out after this many says, in the middle of the run
PER_RECORD = 4  # says per record
RUN_S = 45.0  # bound on the whole talking phase (the suite allows 60 s)
SYNC = "sync"  # the ping id a leaver waits for before it drops out


@dataclass
class Client:
    name: str
    peer: RefPeer
    says: int  # how many says it sends
    received: list[dict[str, Any]] = field(default_factory=list)
    failure: BaseException | None = None
    sent_all: threading.Event = field(default_factory=threading.Event)

    @property
    def leaver(self) -> bool:
        return self.says < SAYS


def text_of(name: str, n: int) -> str:
    return f"{name} says {n}"


def send_says(client: Client, start: threading.Barrier, gone: threading.Barrier) -> None:
    """Sender thread: says in records of PER_RECORD; a leaver then asks for a pong.

    A stayer sends its first LEAVER_SAYS, waits until the leavers are gone,
    then sends the rest, so that they drop out in the middle of the run.
    """
    try:
        start.wait(RECV_S)
        for first in range(0, client.says, PER_RECORD):
            if first == LEAVER_SAYS and not client.leaver:
                gone.wait(RUN_S)
            last = min(first + PER_RECORD, client.says)
            client.peer.send(
                *[{"type": "say", "text": text_of(client.name, n)} for n in range(first, last)]
            )
        if client.leaver:
            client.peer.send({"type": "ping", "id": SYNC})
    except BaseException as exc:  # reported by the main thread
        client.failure = exc
        gone.abort()  # nobody waits for a leaver that will not come
    finally:
        client.sent_all.set()


def receive(client: Client, expected_says: int, deadline: float, gone: threading.Barrier) -> None:
    """Reader thread: a stayer reads until it has every say and every `left`.

    A leaver reads until its SYNC pong (the server has read all its says), then
    closes the socket abruptly, with no `leave` and unread data (a reset).
    """
    try:
        says = lefts = 0
        while client.leaver or says < expected_says or lefts < LEAVERS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{client.name}: {says} says and {lefts} lefts by the deadline")
            record = client.peer.recv_record(remaining)
            client.received.extend(record)
            says += sum(m["type"] == "message" for m in record)
            lefts += sum(m["type"] == "left" for m in record)
            if client.leaver and {"type": "pong", "id": SYNC} in record:
                client.sent_all.wait(max(0.0, deadline - time.monotonic()))
                client.peer.close()
                gone.wait(RUN_S)
                return
    except BaseException as exc:  # reported by the main thread
        client.failure = exc
        gone.abort()


def join_everyone(host: str, port: int) -> list[Client]:
    """Join CLIENTS peers; each earlier peer sees a `joined` for each later one (§4)."""
    clients = []
    for i in range(CLIENTS):
        name = f"peer{i:02d}"
        peer, welcome = connect_and_join(host, port, name, timeout=RECV_S)
        assert welcome["users"] == sorted(c.name for c in clients)
        says = LEAVER_SAYS if i % (CLIENTS // LEAVERS) == 1 else SAYS
        clients.append(Client(name, peer, says))
    for i, client in enumerate(clients):
        later = [client.peer.recv(RECV_S) for _ in range(i + 1, CLIENTS)]
        assert later == [
            {"type": "joined", "name": c.name, "identity": None} for c in clients[i + 1 :]
        ]
    assert sum(c.leaver for c in clients) == LEAVERS
    return clients


def test_soak_many_clients_with_dropouts(spawn_server) -> None:
    """§4 message: every say reaches every client that stayed, exactly once, in one id order."""
    # 50 clients join from one address at once: the per-source limits (issue 12) are off
    limits_off = ("--connect-rate-per-ip", "0", "--max-unjoined-per-ip", "0")
    with spawn_server("--rate", "0", "--log-level", "WARNING", *limits_off) as (
        proc,
        host,
        port,
        _,
    ):
        clients = join_everyone(host, port)
        try:
            run(clients)
        finally:
            for client in clients:
                client.peer.close()
        assert proc.poll() is None, "the server died during the soak"


def run(clients: list[Client]) -> None:
    assert LEAVER_SAYS % PER_RECORD == 0  # stayers pause on a record boundary
    stayers = [c for c in clients if not c.leaver]
    leavers = [c for c in clients if c.leaver]
    expected_says = sum(c.says for c in clients) - SAYS  # everyone's but its own
    start = threading.Barrier(len(clients))
    gone = threading.Barrier(len(stayers) + len(leavers))  # senders of stayers, leaver readers
    began = time.monotonic()
    deadline = began + RUN_S
    threads = [
        threading.Thread(target=send_says, args=(c, start, gone), name=f"send {c.name}")
        for c in clients
    ] + [
        threading.Thread(
            target=receive, args=(c, expected_says, deadline, gone), name=f"recv {c.name}"
        )
        for c in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, deadline + RECV_S - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "threads still running past the deadline"
    failures = {c.name: repr(c.failure) for c in clients if c.failure is not None}
    assert not failures
    took = time.monotonic() - began

    by_id: dict[int, tuple[str, str]] = {}
    for client in stayers:
        msgs = [m for m in client.received if m["type"] == "message"]
        others = [m for m in client.received if m["type"] != "message"]
        # One left(disconnect) per leaver, in whatever order they dropped out.
        assert sorted(m.get("name", "") for m in others) == [c.name for c in leavers], others
        assert all(m["type"] == "left" and m["reason"] == "disconnect" for m in others), others
        ids = [m["id"] for m in msgs]
        assert ids == sorted(set(ids)), f"{client.name}: ids not strictly increasing"
        for sender in clients:
            texts = [m["text"] for m in msgs if m["from"] == sender.name]
            if sender is client:
                assert texts == [], f"{client.name} received its own says"
            else:
                wanted = [text_of(sender.name, n) for n in range(sender.says)]
                assert texts == wanted, f"{client.name} from {sender.name}: {len(texts)} says"
        for m in msgs:
            assert by_id.setdefault(m["id"], (m["from"], m["text"])) == (m["from"], m["text"])
    assert len(by_id) == sum(c.says for c in clients)
    for client in leavers:  # what a leaver read before it dropped out was in order too
        ids = [m["id"] for m in client.received if m["type"] == "message"]
        assert ids == sorted(set(ids))
        assert all(
            by_id[m["id"]] == (m["from"], m["text"])
            for m in client.received
            if m["type"] == "message"
        )
    for client in stayers:  # and nothing else is on its way
        client.peer.send({"type": "ping", "id": "end"})
        assert client.peer.recv(RECV_S) == {"type": "pong", "id": "end"}
    assert took < RUN_S
