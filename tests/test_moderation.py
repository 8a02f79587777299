"""§5 operators over real sockets: kick, ban (identity, or address), unban, bans, mute, whois,
the rights (`not_op`) and the order of checks; who/whois rate-counted.

Clients are the independent reference peer (tests/refpeer.py). Client sockets
bound to 127.0.0.2 and 127.0.0.3 act as other addresses.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from refpeer import RefIdentity, RefPeer, join_message
from rev2kit import Room, ask, assert_recent, code_of, presence, refused_and_closed, room_of

MINUTE_MS = 60_000
OP_COMMANDS = [
    {"type": "kick", "name": "bob"},
    {"type": "ban", "name": "bob", "minutes": 5, "reason": "spam"},
    {"type": "unban", "who": "127.0.0.2"},
    {"type": "mute", "name": "bob", "minutes": 5},
    {"type": "bans"},
]


@pytest.fixture
def op_room(run_server) -> Iterator[Any]:
    """Factory: `with op_room(**settings) as (r, op):` a server whose operator `op` (an
    identity given with --op) has joined as "op"."""

    @contextlib.contextmanager
    def factory(**overrides: Any) -> Iterator[tuple[Room, RefPeer]]:
        op_id = RefIdentity()
        with run_server(ops=(op_id.fingerprint,), **overrides) as srv, room_of(srv) as r:
            op, welcome = r.join("op", op_id)
            assert welcome["op"] is True
            yield r, op

    return factory


def bye_and_closed(peer: RefPeer) -> dict[str, Any]:
    """The server's last word before it closed `peer`: its bye."""
    msgs = peer.wait_closed(5)
    assert msgs and msgs[-1]["type"] == "bye", msgs
    return msgs[-1]


# --- rights and the order of checks ------------------------------------------------------------


@pytest.mark.parametrize("guest_identity", [False, True], ids=["guest", "identity"])
def test_non_operator_gets_not_op(op_room, guest_identity: bool) -> None:
    """§5: a client that is not an operator gets not_op for kick, ban, unban, mute, bans."""
    with op_room() as (r, op):
        bob, welcome = r.join("bob", RefIdentity() if guest_identity else None)
        assert welcome["op"] is False
        for command in OP_COMMANDS:
            assert code_of(ask(bob, command)) == "not_op", command
        assert presence(op.sync()) == [("joined", "bob", None)]  # nothing happened


def test_order_not_joined_then_not_op_then_bad_message(op_room) -> None:
    """§4 order: joined (not_joined) before operator (not_op) before fields (bad_message)."""
    with op_room() as (r, op):
        peer = r.connect()
        for command in OP_COMMANDS:
            assert code_of(ask(peer, command)) == "not_joined", command
        assert code_of(ask(peer, {"type": "kick"})) == "not_joined"
        assert peer.join("bob")["type"] == "welcome"
        bad = [
            {"type": "kick"},
            {"type": "kick", "name": 5},
            {"type": "ban", "name": "op", "minutes": 0},
            {"type": "unban"},
            {"type": "mute", "name": "op"},
            {"type": "mute", "name": "op", "minutes": -1},
        ]
        for command in bad:
            assert code_of(ask(peer, command)) == "not_op", command
            assert code_of(ask(op, command)) == "bad_message", command


def test_operator_field_rules(op_room) -> None:
    """§5: reason non-empty, <= 200 UTF-8 bytes, text's characters (else bad_message, not
    too_long); minutes an integer <= 525600, positive for ban, required and >= 0 for mute;
    fields before the target (unknown_user)."""
    with op_room() as (r, op):
        bob, _ = r.join("bob")
        bad = [
            {"type": "kick", "name": "bob", "reason": ""},
            {"type": "kick", "name": "bob", "reason": "é" * 101},  # 202 bytes
            {"type": "kick", "name": "bob", "reason": "a\x00b"},
            {"type": "kick", "name": "bob", "reason": "a\x7fb"},
            {"type": "kick", "name": "bob", "reason": None},
            {"type": "kick", "name": "nobody", "reason": ""},  # fields before the target
            {"type": "ban", "name": "bob", "minutes": 0},
            {"type": "ban", "name": "bob", "minutes": 525601},
            {"type": "ban", "name": "bob", "minutes": "5"},
            {"type": "ban", "name": "bob", "minutes": True},
            {"type": "ban", "name": "bob", "minutes": 1.5},
            {"type": "ban", "name": "bob", "minutes": None},
            {"type": "mute", "name": "bob"},
            {"type": "mute", "name": "bob", "minutes": -1},
            {"type": "mute", "name": "bob", "minutes": 525601},
            {"type": "mute", "name": "bob", "minutes": False},
            {"type": "unban", "who": 5},
            {"type": "unban", "who": None},
        ]
        for command in bad:
            assert code_of(ask(op, command)) == "bad_message", command
        op.send({"type": "kick", "name": "bob", "reason": "é" * 100})
        assert bye_and_closed(bob)["message"] == "é" * 100  # exactly 200 bytes is fine


def test_unknown_targets(op_room) -> None:
    """§5: an unknown name is unknown_user; names match like dm.to (NFKC, casefold)."""
    with op_room() as (r, op):
        bob, _ = r.join("bob")
        for command in (
            {"type": "kick", "name": "nobody"},
            {"type": "ban", "name": "nobody"},
            {"type": "mute", "name": "nobody", "minutes": 1},
            {"type": "whois", "name": "nobody"},
        ):
            assert code_of(ask(op, command)) == "unknown_user", command
        op.send({"type": "kick", "name": "ＢＯＢ"})  # fullwidth, upper case
        assert bye_and_closed(bob)["reason"] == "kicked"


# --- kick and ban ------------------------------------------------------------------------------


def test_kick(op_room) -> None:
    """§5 kick: the target gets bye (kicked, by, message) and is closed; the others (the
    operator too: its acknowledgement) see left (kicked, by)."""
    with op_room() as (r, op):
        bob, _ = r.join("bob")
        carol, _ = r.join("carol")
        op.sync()
        bob.sync()
        op.send({"type": "kick", "name": "bob", "reason": "be nice"})
        bye = bye_and_closed(bob)
        assert bye == {"type": "bye", "reason": "kicked", "by": "op", "message": "be nice"}
        left = {"type": "left", "name": "bob", "reason": "kicked", "by": "op"}
        assert carol.recv() == left
        assert op.recv() == left
        op.send({"type": "kick", "name": "carol"})
        assert bye_and_closed(carol) == {"type": "bye", "reason": "kicked", "by": "op"}
        assert op.recv() == {"type": "left", "name": "carol", "reason": "kicked", "by": "op"}
        assert r.join("bob")[0].sync() == []  # a kick is not a ban


def test_ban_identity_from_every_address(op_room) -> None:
    """§5 ban: the target's identity is refused with banned (then bye and close) from every
    address until the ban ends; bans lists it with until = now + minutes."""
    with op_room() as (r, op):
        bob_id = RefIdentity()
        bob, _ = r.join("bob", bob_id)
        carol, _ = r.join("carol")
        op.sync()
        before_ms = int(time.time() * 1000)
        op.send({"type": "ban", "name": "bob", "minutes": 30, "reason": "spam"})
        assert bye_and_closed(bob) == {
            "type": "bye",
            "reason": "banned",
            "by": "op",
            "message": "spam",
        }
        left = {"type": "left", "name": "bob", "reason": "banned", "by": "op"}
        assert carol.recv() == left and op.recv() == left
        (ban,) = ask(op, {"type": "bans"})["bans"]
        assert (ban["who"], ban["by"], ban["reason"]) == (bob_id.fingerprint, "op", "spam")
        assert before_ms + 30 * MINUTE_MS <= ban["until"] <= before_ms + 30 * MINUTE_MS + 5000
        for source in ("127.0.0.1", "127.0.0.3"):
            again = r.connect(source)
            again.send(join_message("robert", identity=bob_id, transcript=again.transcript))
            refused_and_closed(again, "banned")
        assert r.connect("127.0.0.3").join("bob")["code"] == "name_reserved"  # still bound


def test_ban_guest_by_address(op_room) -> None:
    """§5: a ban of a client without identity bans its address: every join from it is
    refused (with or without identity); another address still joins."""
    with op_room() as (r, op):
        guest, _ = r.join("guest", source="127.0.0.2")
        op.send({"type": "ban", "name": "guest"})
        assert bye_and_closed(guest) == {"type": "bye", "reason": "banned", "by": "op"}
        (ban,) = ask(op, {"type": "bans"})["bans"]
        assert ban == {"who": "127.0.0.2", "until": None, "by": "op", "reason": None}
        for identity in (None, RefIdentity()):
            again = r.connect("127.0.0.2")
            again.send(join_message("other", identity=identity, transcript=again.transcript))
            refused_and_closed(again, "banned")
        assert r.join("guest", source="127.0.0.3")[1]["name"] == "guest"


def test_bans_sorted_and_unban(op_room) -> None:
    """§5: bans are sorted by who; unban (a fingerprint or an address) is answered by the
    new list; an unban of nothing banned is unknown_user; the unbanned may join again."""
    with op_room() as (r, op):
        ids = [RefIdentity() for _ in range(3)]
        for i, identity in enumerate(ids):
            peer, _ = r.join(f"user{i}", identity)
            op.send({"type": "ban", "name": f"user{i}", "minutes": 10 + i})
            bye_and_closed(peer)
        guest, _ = r.join("guest", source="127.0.0.2")
        op.send({"type": "ban", "name": "guest", "reason": "flood"})
        bye_and_closed(guest)
        bans = ask(op, {"type": "bans"})["bans"]
        whos = [b["who"] for b in bans]
        assert whos == sorted([*(i.fingerprint for i in ids), "127.0.0.2"])
        reply = ask(op, {"type": "unban", "who": ids[1].fingerprint})
        assert reply == {
            "type": "bans",
            "bans": [b for b in bans if b["who"] != ids[1].fingerprint],
        }
        assert code_of(ask(op, {"type": "unban", "who": ids[1].fingerprint})) == "unknown_user"
        assert code_of(ask(op, {"type": "unban", "who": "127.0.0.9"})) == "unknown_user"
        reply = ask(op, {"type": "unban", "who": "127.0.0.2"})
        assert "127.0.0.2" not in [b["who"] for b in reply["bans"]]
        assert r.join("user1", ids[1])[1]["type"] == "welcome"
        assert r.join("guest", source="127.0.0.2")[1]["type"] == "welcome"


# --- mute --------------------------------------------------------------------------------------


def test_mute_and_lift(op_room) -> None:
    """§5 mute: the target gets muted (by, until), the operator muted (name, by, until),
    nobody else is told; the target's say and dm get muted; minutes 0 lifts it (until
    null)."""
    with op_room() as (r, op):
        bob, _ = r.join("bob")
        carol, _ = r.join("carol")
        op.sync()
        bob.sync()
        before_ms = int(time.time() * 1000)
        ack = ask(op, {"type": "mute", "name": "bob", "minutes": 5})
        assert (ack["type"], ack["name"], ack["by"]) == ("muted", "bob", "op")
        assert before_ms + 5 * MINUTE_MS <= ack["until"] <= before_ms + 5 * MINUTE_MS + 5000
        assert bob.recv() == {"type": "muted", "by": "op", "until": ack["until"]}
        assert carol.sync() == []  # nobody else is told
        assert code_of(ask(bob, {"type": "say", "text": "hello?"})) == "muted"
        assert code_of(ask(bob, {"type": "dm", "to": "carol", "text": "psst"})) == "muted"
        assert code_of(ask(bob, {"type": "dm", "to": "nobody", "text": "x"})) == "unknown_user"
        # §4 order: fields, size and content come before muted
        assert code_of(ask(bob, {"type": "say", "text": "x" * 20000})) == "too_long"
        assert code_of(ask(bob, {"type": "say", "text": ""})) == "bad_message"
        assert code_of(ask(bob, {"type": "say", "text": "x", "action": 1})) == "bad_message"
        assert carol.sync() == []
        ack = ask(op, {"type": "mute", "name": "bob", "minutes": 0})
        assert ack == {"type": "muted", "name": "bob", "by": "op", "until": None}
        assert bob.recv() == {"type": "muted", "by": "op", "until": None}
        bob.send({"type": "say", "text": "free"})
        assert carol.recv()["text"] == "free"


def test_mute_follows_identity_to_a_new_connection(op_room) -> None:
    """§5: a mute applies to the identity's later connections until `until`."""
    with op_room() as (r, op):
        bob_id = RefIdentity()
        bob, _ = r.join("bob", bob_id)
        assert ask(op, {"type": "mute", "name": "bob", "minutes": 5})["type"] == "muted"
        bob.send({"type": "leave"})
        bob.wait_closed(5)
        again, _ = r.join("bob", bob_id)
        assert code_of(ask(again, {"type": "say", "text": "still?"})) == "muted"
        guest, _ = r.join("guest")  # a mute of one identity touches no one else
        op.sync()
        guest.send({"type": "say", "text": "hi"})
        assert op.recv()["text"] == "hi"


def test_muted_before_rate_limited(op_room) -> None:
    """§4 order: muted before rate_limited (a muted say takes no token)."""
    with op_room(rate=2) as (r, op):
        bob, _ = r.join("bob")
        assert ask(op, {"type": "mute", "name": "bob", "minutes": 5})["type"] == "muted"
        bob.recv()
        bob.send(*[{"type": "say", "text": f"m{i}"} for i in range(5)])
        codes = [code_of(bob.recv()) for _ in range(5)]
        assert codes == ["muted"] * 5


# --- whois and rates ---------------------------------------------------------------------------


def test_whois(op_room) -> None:
    """§5 whois: name, identity (fingerprint or null), op, since (ms of the join); the
    address only for operators."""
    with op_room() as (r, op):
        bob_id = RefIdentity()
        bob, _ = r.join("bob", bob_id, source="127.0.0.2")
        carol, _ = r.join("carol", source="127.0.0.3")
        seen_by_carol = ask(carol, {"type": "whois", "name": "BOB"})
        assert seen_by_carol["name"] == "bob" and "address" not in seen_by_carol
        assert (seen_by_carol["identity"], seen_by_carol["op"]) == (bob_id.fingerprint, False)
        assert_recent(seen_by_carol["since"])
        seen_by_op = ask(op, {"type": "whois", "name": "carol"})
        assert (seen_by_op["identity"], seen_by_op["address"]) == (None, "127.0.0.3")
        assert ask(op, {"type": "whois", "name": "bob"})["address"] == "127.0.0.2"
        about_op = ask(bob, {"type": "whois", "name": "op"})
        assert about_op["op"] is True and "address" not in about_op
        assert ask(bob, {"type": "whois", "name": "bob"})["since"] == seen_by_carol["since"]


def test_who_and_whois_take_rate_tokens(op_room) -> None:
    """§4 rev. 2: who and whois are rate-counted (rate_limited once the bucket is empty)."""
    with op_room(rate=3) as (r, _):
        bob, _ = r.join("bob")
        bob.send(
            {"type": "who"},
            {"type": "whois", "name": "op"},
            {"type": "who"},
            {"type": "whois", "name": "op"},
            {"type": "who"},
        )
        got = [code_of(bob.recv()) for _ in range(5)]
        assert got[:3] == ["users", "whois", "users"]
        assert got[3:] == ["rate_limited", "rate_limited"]
        # §4 order: the target (unknown_user) before the rate
        assert code_of(ask(bob, {"type": "whois", "name": "nobody"})) == "unknown_user"


def test_ipv4_mapped_address_written_as_ipv4(op_room) -> None:
    """§5: addresses are the peer's IPv4 dotted quad or RFC 5952 IPv6 form, an IPv4-mapped
    address as IPv4 (a server listening on :: sees IPv4 clients as ::ffff:a.b.c.d); whois,
    bans and unban use that form."""
    with op_room(host="::") as (r, op):
        r4 = Room(("127.0.0.1", r.port))
        try:
            guest, _ = r4.join("guest", source="127.0.0.2")
            assert ask(op, {"type": "whois", "name": "guest"})["address"] == "127.0.0.2"
            op.send({"type": "ban", "name": "guest"})
            bye_and_closed(guest)
            assert [b["who"] for b in ask(op, {"type": "bans"})["bans"]] == ["127.0.0.2"]
            assert ask(op, {"type": "unban", "who": "127.0.0.2"}) == {"type": "bans", "bans": []}
        finally:
            r4.close()
