"""The hub without sockets: lifecycle table, events, delivery order, slow receivers."""

from __future__ import annotations

import json
import threading

import pytest

import hub as hubmod
import protocol
from conn import TRANSITIONS, Conn, Phase
from delivery import Delivery, FlushSlot
from hub import Hub


class FakeSock:
    """The hub stores a socket but never uses it."""


def keyed_conn(hub: Hub, slot: FlushSlot, port: int) -> Conn:
    conn = Conn(FakeSock(), ("127.0.0.1", port), 0.0)  # type: ignore[arg-type]
    assert hub.admit(conn)
    assert hub.key_read(conn)
    assert hub.keyed(conn) == "ok"
    assert conn.slot is slot
    return conn


def request(name: str, identity: str | None = None, **fields) -> hubmod.JoinRequest:
    """A join as the reader hands it to the hub (checks of fields and proof passed)."""
    return hubmod.JoinRequest(
        name=name,
        name_json=protocol.json_string(name),
        identity=identity,
        identity_json=protocol.json_string(identity) if identity else b"null",
        history=fields.get("history"),
        since=fields.get("since"),
        now=0.0,
        now_ms=fields.get("now_ms", 1000),
    )


def joined_conn(hub: Hub, slot: FlushSlot, name: str, port: int, **fields) -> Conn:
    conn = keyed_conn(hub, slot, port)
    assert hub.join(conn, request(name, **fields)).outcome == "ok"
    return conn


def drain(hub: Hub, conn: Conn, slot: FlushSlot) -> list[dict]:
    """Everything due to `conn`, as message objects (what its flusher would send)."""
    out: list[dict] = []
    while True:
        taken = hub.take(conn, slot)
        if taken is None or not taken.pieces:
            return out
        out += json.loads(b"[" + b"".join(taken.pieces)[:-1] + b"]")


def say(hub: Hub, conn: Conn, text: str) -> tuple[str, list[Conn]]:
    head, tail = protocol.encode_message_parts(conn.name_json, protocol.json_string(text), 1)
    return hub.say(conn, head, tail, 0.0, 1)


@pytest.fixture
def hub_slot() -> tuple[Hub, FlushSlot]:
    hub = Hub(max_clients=10, max_pending=65536, rate=0)
    return hub, hub.add_slot(lambda: None)


def test_phase_table_refuses_a_skipped_stage() -> None:
    """Lifecycle: a connection cannot jump from accepted to joined (the table says no)."""
    conn = Conn(FakeSock(), ("127.0.0.1", 1), 0.0)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="accepted -> joined"):
        conn._enter(Phase.JOINED)
    conn._enter(Phase.CLOSING)
    with pytest.raises(AssertionError, match="closing -> keyed"):
        conn._enter(Phase.KEYED)


def test_every_phase_can_end() -> None:
    """Lifecycle: from every phase but the last there is a way to closed."""
    for phase in Phase:
        seen, todo = set(), [phase]
        while todo:
            p = todo.pop()
            seen.add(p)
            todo += [q for q in TRANSITIONS[p] if q not in seen]
        assert Phase.CLOSED in seen


def test_internals_assert_the_lock(hub_slot) -> None:
    """Lock discipline: a method that needs the lock fails loudly without it."""
    hub, _ = hub_slot
    with pytest.raises(AssertionError, match="lock must be held"):
        hub._compact()
    with pytest.raises(AssertionError, match="lock must be held"):
        Delivery(threading.Lock(), 65536).append(b"{}")


def test_join_say_who_leave(hub_slot) -> None:
    """§4: welcome lists the others; a say reaches the others, not its sender; left announced."""
    hub, slot = hub_slot
    ana = joined_conn(hub, slot, "ana", 1)
    bob = joined_conn(hub, slot, "bob", 2)
    assert ana.phase is Phase.JOINED
    assert [m["type"] for m in drain(hub, ana, slot)] == ["welcome", "joined"]
    assert drain(hub, bob, slot)[0] == protocol.welcome("bob", ["ana"], 16384, 0, last_id=0)
    assert say(hub, ana, "hi")[0] == "ok"
    assert drain(hub, ana, slot) == []
    (got,) = drain(hub, bob, slot)
    assert (got["type"], got["id"], got["text"]) == ("message", 1, "hi")
    assert hub.users(ana, 0.0) == b'{"type":"users","names":["ana","bob"]},'
    hub.leave(bob)
    assert bob.phase is Phase.CLOSING and bob.bye == "leave"
    assert drain(hub, ana, slot) == [protocol.left("bob", "leave")]
    assert hub.take(bob, slot).final  # its bye, then close


def test_name_taken_and_no_ghost_after_drop(hub_slot) -> None:
    """§4 name_taken; a join read after its connection was dropped registers nothing."""
    hub, slot = hub_slot
    ana = joined_conn(hub, slot, "ana", 1)
    other = keyed_conn(hub, slot, 2)
    assert hub.join(other, request("ANA")).outcome == "name_taken"
    assert hub.drop(other, "slow", bye=False)
    assert hub.join(other, request("carl")).outcome == "gone"
    assert hub.users(ana, 0.0) == b'{"type":"users","names":["ana"]},'


def test_dm_only_to_its_recipient(hub_slot) -> None:
    """§4 dm: only the recipient receives it; unknown names are refused."""
    hub, slot = hub_slot
    ana, bob, cy = (joined_conn(hub, slot, n, i) for i, n in enumerate(("ana", "bob", "cy")))
    for c in (ana, bob, cy):
        drain(hub, c, slot)
    assert hub.dm(ana, "BOB", b'"psst"', 5, 0.0) == ("ok", None)
    assert hub.dm(ana, "zed", b'"psst"', 5, 0.0)[0] == "unknown_user"
    assert drain(hub, bob, slot) == [protocol.direct(1, "ana", "bob", "psst", 5)]
    assert drain(hub, cy, slot) == [] and drain(hub, ana, slot) == []


def test_rate_limit_counts_say_and_dm() -> None:
    """§4 rate: a bucket of `rate` tokens, full at join; say and dm take one each."""
    hub = Hub(max_clients=10, max_pending=65536, rate=2)
    slot = hub.add_slot(lambda: None)
    ana = joined_conn(hub, slot, "ana", 1)
    joined_conn(hub, slot, "bob", 2)
    assert say(hub, ana, "1")[0] == "ok"
    assert hub.dm(ana, "bob", b'"2"', 0, 0.0)[0] == "ok"
    assert say(hub, ana, "3")[0] == "rate_limited"


def test_max_clients_counts_every_open_connection() -> None:
    """§2: max_clients counts connections joined or not."""
    hub = Hub(max_clients=1, max_pending=65536, rate=0)
    hub.add_slot(lambda: None)
    first = Conn(FakeSock(), ("127.0.0.1", 1), 0.0)  # type: ignore[arg-type]
    assert hub.admit(first)
    assert not hub.admit(Conn(FakeSock(), ("127.0.0.1", 2), 0.0))  # type: ignore[arg-type]
    hub.drop(first, "disconnect", bye=False)
    hub.forget(first)
    assert first.phase is Phase.CLOSED and hub.open_connections() == 0


def test_shutdown_says_bye_and_no_left(hub_slot) -> None:
    """§4 SIGTERM: keyed connections get bye(shutdown); the others hear no left."""
    hub, slot = hub_slot
    ana = joined_conn(hub, slot, "ana", 1)
    bob = joined_conn(hub, slot, "bob", 2)
    for c in (ana, bob):
        drain(hub, c, slot)
    assert hub.begin_shutdown() == []
    taken = hub.take(ana, slot)
    assert taken.final and json.loads(taken.pieces[0][:-1]) == protocol.bye("shutdown")
    assert hub.take(bob, slot).pieces == taken.pieces  # its bye; no left(ana) before it
    assert hub.keyed(Conn(FakeSock(), ("127.0.0.1", 3), 0.0)) == "shutdown"  # type: ignore[arg-type]


@pytest.mark.parametrize("max_pending", [65536, 4 * 2**20])
@pytest.mark.parametrize("read_first", [0, 37, 5003])
def test_slow_receiver_dropped_within_a_64th_past_max_pending(
    max_pending: int, read_first: int
) -> None:
    """§4 max_pending: the server notices a receiver over the limit promptly: at most
    max_pending/64 bytes plus one message past it, while a receiver that keeps up stays."""
    hub = Hub(max_clients=10, max_pending=max_pending, rate=0)
    slot = hub.add_slot(lambda: None)
    sender = joined_conn(hub, slot, "s", 1)
    stuck = joined_conn(hub, slot, "stuck", 2)
    reader = joined_conn(hub, slot, "reader", 3)
    for c in (sender, stuck, reader):
        drain(hub, c, slot)
    text = "x" * 150
    most = piece = 0
    for _ in range(read_first):  # both read for a while, then one stops
        say(hub, sender, text)
        for c in (sender, stuck, reader):
            drain(hub, c, slot)
    while stuck.phase is Phase.JOINED:
        before = hub.log_bytes()
        say(hub, sender, text)
        piece = max(piece, hub.log_bytes() - before)
        most = max(most, hub.pending_bytes(stuck))
        drain(hub, reader, slot)  # this one reads everything at once
        drain(hub, sender, slot)  # its own says are skipped, but its cursor moves
        assert hub.log_bytes() <= max_pending + max_pending // 64 + 2 * piece
    assert stuck.reason == "slow" and reader.phase is Phase.JOINED
    assert max_pending < most <= max_pending + max_pending // 64 + piece
