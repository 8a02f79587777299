"""A first end-to-end check over real sockets, with the independent reference peer."""

from __future__ import annotations

from refpeer import connect_and_join


def test_broadcast_dm_who_ping_leave(run_server) -> None:
    """§4: say reaches the others (not the sender), dm only its recipient, who/ping answered."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        alice, welcome = connect_and_join(host, port, "alice")
        assert welcome["users"] == []
        bob, welcome = connect_and_join(host, port, "Bob")
        assert welcome["users"] == ["alice"]
        assert alice.recv(5) == {"type": "joined", "name": "Bob", "identity": None}
        alice.send({"type": "say", "text": "hi"}, {"type": "dm", "to": "BOB", "text": "psst"})
        got = bob.recv(5)
        assert (got["type"], got["from"], got["text"]) == ("message", "alice", "hi")
        dm = bob.recv(5)
        assert (dm["type"], dm["to"], dm["id"]) == ("dm", "Bob", got["id"] + 1)
        bob.send({"type": "who"}, {"type": "ping", "id": 7}, {"type": "leave"})
        assert bob.recv(5) == {"type": "users", "names": ["Bob", "alice"]}
        assert bob.recv(5) == {"type": "pong", "id": 7}
        assert bob.wait_closed(5) == [{"type": "bye", "reason": "leave"}]
        assert alice.recv(5) == {"type": "left", "name": "Bob", "reason": "leave"}
