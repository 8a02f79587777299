"""End to end over real sockets: "chat works", checked rule by rule against PROTOCOL.md.

Every client here is the independent reference peer (tests/refpeer.py), so a
pass means a client written from the spec alone interoperates. Servers run on
port 0, in this process (`run_server`) or as `python3 server.py` (`spawn_server`).

To show that something did NOT arrive, a test sends a later `say` as a marker:
§4 promises `message`/`dm` in increasing `id` order, so anything the server
produced before the marker would have come before it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netutil import RECV_S
from refpeer import RefPeer, connect_and_join, fingerprint_of, parse_json_object, read_plain_frame

ROOT = Path(__file__).resolve().parent.parent
TS_SLACK_MS = 5_000  # §4 ts: "the server's time"; allow a few seconds of skew and delay


# --- helpers -----------------------------------------------------------------------------------


def say(text: str) -> dict[str, Any]:
    return {"type": "say", "text": text}


def dm(to: str, text: str) -> dict[str, Any]:
    return {"type": "dm", "to": to, "text": text}


def error(code: str) -> tuple[str, str]:
    return ("error", code)


def kind(msg: dict[str, Any]) -> tuple[str, str]:
    """(type, code) for an error, for compact comparisons."""
    return (msg["type"], msg.get("code", ""))


def until_message(peer: RefPeer, text: str, timeout: float = RECV_S) -> list[dict[str, Any]]:
    """Read until the `message` whose text is `text`; return what came before it."""
    deadline = time.monotonic() + timeout
    before: list[dict[str, Any]] = []
    while True:
        msg = peer.recv(max(0.01, deadline - time.monotonic()))
        if msg["type"] == "message" and msg["text"] == text:
            return before
        before.append(msg)


def until_pong(peer: RefPeer, token: str) -> list[dict[str, Any]]:
    """Send `ping` with `token`; return the replies that came before its `pong`."""
    peer.send({"type": "ping", "id": token})
    pong, before = peer.recv_until("pong", RECV_S)
    assert pong == {"type": "pong", "id": token}
    return before


def assert_ts_now(msg: dict[str, Any]) -> None:
    """§4: `ts` is the server's time in integer milliseconds since the Unix epoch."""
    assert type(msg["ts"]) is int, msg
    assert abs(msg["ts"] - time.time() * 1000) < TS_SLACK_MS, msg


class Chat:
    """The peers of one test, all closed at the end."""

    def __init__(self, address: tuple[str, int]):
        self.host, self.port = address
        self.peers: list[RefPeer] = []

    def connect(self, first: list[dict[str, Any]] | None = None) -> RefPeer:
        peer = RefPeer.connect(self.host, self.port, first=first, timeout=RECV_S)
        self.peers.append(peer)
        return peer

    def join(self, name: str) -> tuple[RefPeer, dict[str, Any]]:
        peer, welcome = connect_and_join(self.host, self.port, name, timeout=RECV_S)
        self.peers.append(peer)
        # §2: the reply to key + [join] is the record [welcome]; §4: no `joined` to the joiner.
        assert peer.skipped == [], f"{name} got {peer.skipped} before its welcome"
        return peer, welcome

    def join_all(self, *names: str) -> list[RefPeer]:
        """Join in order; check and consume the `joined` each earlier peer gets (§4)."""
        peers = [self.join(name)[0] for name in names]
        for i, peer in enumerate(peers):
            later = [peer.recv(RECV_S) for _ in names[i + 1 :]]
            assert later == [
                {"type": "joined", "name": name, "identity": None} for name in names[i + 1 :]
            ]
        return peers

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@pytest.fixture
def chat(run_server):
    """Factory: `with chat(rate=0) as room:` gives a Chat on a fresh server with those settings."""

    @contextlib.contextmanager
    def factory(**overrides: Any) -> Iterator[Chat]:
        with run_server(**overrides) as srv:
            room = Chat(srv.address)
            try:
                yield room
            finally:
                room.close()

    return factory


# --- broadcast, order, ids ---------------------------------------------------------------------


def test_many_clients_one_global_order(chat) -> None:
    """§4 message: each say reaches every other client exactly once, in one increasing id order."""
    names = [f"user{i:02d}" for i in range(12)]
    per_sender = 5
    with chat(rate=0) as room:
        peers = room.join_all(*names)
        start = threading.Barrier(len(peers))
        failures: list[BaseException] = []

        def talk(peer: RefPeer, name: str) -> None:
            try:
                start.wait(RECV_S)
                for n in range(per_sender):
                    peer.send(say(f"{name} #{n}"))
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=talk, args=pair) for pair in zip(peers, names)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RECV_S * 2)
        assert not any(t.is_alive() for t in threads)
        assert not failures
        expected_count = (len(names) - 1) * per_sender
        seen: dict[str, list[dict[str, Any]]] = {}
        for peer, name in zip(peers, names):
            seen[name] = [peer.recv(RECV_S) for _ in range(expected_count)]
        by_id: dict[int, tuple[str, str, int]] = {}
        for name, msgs in seen.items():
            assert {m["type"] for m in msgs} == {"message"}
            for m in msgs:
                assert_ts_now(m)
            ids = [m["id"] for m in msgs]
            assert all(type(i) is int for i in ids)
            assert ids == sorted(set(ids)), f"{name} saw ids out of order or twice: {ids}"
            senders = {m["from"] for m in msgs}
            assert name not in senders, f"{name} received its own say"
            assert senders == set(names) - {name}
            for sender in senders:  # per sender: all of its says, once each, in order
                texts = [m["text"] for m in msgs if m["from"] == sender]
                assert texts == [f"{sender} #{n}" for n in range(per_sender)]
            for m in msgs:  # one id means one message for everybody
                assert by_id.setdefault(m["id"], (m["from"], m["text"], m["ts"])) == (
                    m["from"],
                    m["text"],
                    m["ts"],
                )
        assert len(by_id) == len(names) * per_sender
        # One order for all: any two receivers agree on the order of what both saw.
        orders = {name: [m["id"] for m in msgs] for name, msgs in seen.items()}
        for a in names:
            for b in names:
                common = set(orders[a]) & set(orders[b])
                assert [i for i in orders[a] if i in common] == [
                    i for i in orders[b] if i in common
                ]
        for peer in peers:  # and nothing more (no duplicate) is on its way
            assert until_pong(peer, "end") == []


def test_late_joiner_gets_only_later_messages(chat) -> None:
    """§4 joined/welcome: a say reaches those joined when read; users sorted by code point."""
    with chat(rate=0) as room:
        bob, zoe, emile = room.join_all("bob", "Zoë", "Émile")
        bob.send(say("before 1"), say("before 2"))
        before = [zoe.recv(RECV_S), zoe.recv(RECV_S)]
        assert [m["text"] for m in before] == ["before 1", "before 2"]
        assert [m["text"] for m in (emile.recv(RECV_S), emile.recv(RECV_S))] == [
            "before 1",
            "before 2",
        ]
        carol, welcome = room.join("carol")
        # Code point order: "Z" (U+5A) < "b" (U+62) < "É" (U+C9); not alphabetical.
        revision1 = {k: welcome[k] for k in ("type", "name", "users", "max_text", "rate")}
        assert revision1 == {
            "type": "welcome",
            "name": "carol",
            "users": ["Zoë", "bob", "Émile"],
            "max_text": 16384,
            "rate": 0,
        }
        for other in (bob, zoe, emile):
            assert other.recv(RECV_S) == {"type": "joined", "name": "carol", "identity": None}
        zoe.send(say("after"))
        first = carol.recv(RECV_S)  # no `joined` about itself, no earlier message
        assert (first["type"], first["from"], first["text"]) == ("message", "Zoë", "after")
        assert first["id"] > before[1]["id"]
        assert until_message(bob, "after") == []


def test_presence_news_keeps_its_place_before_says(chat) -> None:
    """§4 joined/left: the server may hold presence news back to batch it, but a say that
    follows a join or a leave in the log never overtakes it, for any receiver."""
    with chat(rate=0) as room:
        bob, zoe = room.join_all("bob", "zoe")
        # carol's join and first say arrive in one record: joined must come first.
        room.connect(first=[{"type": "join", "name": "carol"}, say("hello from carol")])
        for peer in (bob, zoe):
            assert peer.recv(RECV_S) == {"type": "joined", "name": "carol", "identity": None}
            msg = peer.recv(RECV_S)
            assert (msg["type"], msg["from"], msg["text"]) == (
                "message",
                "carol",
                "hello from carol",
            )
        # dave joins, then zoe speaks at once: bob sees dave's arrival before zoe's say.
        dave, _ = room.join("dave")
        zoe.send(say("right after dave"))
        assert bob.recv(RECV_S) == {"type": "joined", "name": "dave", "identity": None}
        assert bob.recv(RECV_S)["text"] == "right after dave"
        assert zoe.recv(RECV_S) == {"type": "joined", "name": "dave", "identity": None}
        assert dave.recv(RECV_S)["text"] == "right after dave"
        # zoe leaves, then bob speaks at once: dave sees the leave before bob's say.
        zoe.send({"type": "leave"})
        assert zoe.recv(RECV_S) == {"type": "bye", "reason": "leave"}
        bob.send(say("after zoe left"))
        assert dave.recv(RECV_S) == {"type": "left", "name": "zoe", "reason": "leave"}
        assert dave.recv(RECV_S)["text"] == "after zoe left"


def test_default_welcome_carries_limits(chat) -> None:
    """§4 welcome: max_text and rate are the server's settings (defaults 16384 and 10)."""
    with chat() as room:
        _, welcome = room.join("alice")
        assert (welcome["max_text"], welcome["rate"], welcome["users"]) == (16384, 10, [])
    with chat(rate=7, max_text=99) as room:
        _, welcome = room.join("alice")
        assert (welcome["max_text"], welcome["rate"]) == (99, 7)


# --- dm ----------------------------------------------------------------------------------------


def test_dm_reaches_only_recipient_by_nfkc_casefold(chat) -> None:
    """§4 dm: `to` matched by NFKC+casefold; only the recipient gets it, `to` as welcomed."""
    with chat(rate=0) as room:
        alice, bob, carol = room.join_all("alice", "Bob", "carol")
        alice.send(dm("ＢＯＢ", "psst"))  # fullwidth, other case
        got = bob.recv(RECV_S)
        assert type(got["id"]) is int
        assert {k: v for k, v in got.items() if k not in ("id", "ts")} == {
            "type": "dm",
            "from": "alice",
            "to": "Bob",
            "text": "psst",
        }
        assert_ts_now(got)
        alice.send(say("marker"))
        assert until_message(carol, "marker") == []
        assert until_message(bob, "marker") == []
        assert until_pong(alice, "a") == []  # the sender gets no copy and no error


def test_dm_casefold_sharp_s(chat) -> None:
    """§4 dm: matching uses str.casefold, so "STRASSE" reaches "Straße"."""
    with chat(rate=0) as room:
        alice, strasse = room.join_all("alice", "Straße")
        alice.send(dm("STRASSE", "hallo"))
        got = strasse.recv(RECV_S)
        assert (got["type"], got["to"], got["text"]) == ("dm", "Straße", "hallo")


def test_dm_to_oneself(chat) -> None:
    """§4 dm: a dm to oneself is delivered to oneself (and to no one else)."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(dm("ALICE", "note to self"))
        got = alice.recv(RECV_S)
        assert (got["type"], got["from"], got["to"], got["text"]) == (
            "dm",
            "alice",
            "alice",
            "note to self",
        )
        alice.send(say("marker"))
        assert until_message(bob, "marker") == []


def test_dm_ids_share_counter_and_interleave(chat) -> None:
    """§4 id: one counter for say and dm; each client gets message and dm in id order."""
    with chat(rate=0) as room:
        alice, bob, carol = room.join_all("alice", "bob", "carol")
        alice.send(say("m1"), dm("bob", "d1"), say("m2"), dm("carol", "d2"), say("m3"))
        # ids relative to m1's: d1 and d2 take the numbers between the messages.
        for peer, expected in (
            (
                bob,
                [("message", "m1", 0), ("dm", "d1", 1), ("message", "m2", 2), ("message", "m3", 4)],
            ),
            (
                carol,
                [("message", "m1", 0), ("message", "m2", 2), ("dm", "d2", 3), ("message", "m3", 4)],
            ),
        ):
            got = [peer.recv(RECV_S) for _ in expected]
            base = got[0]["id"]
            assert [(m["type"], m["text"], m["id"] - base) for m in got] == expected
        # Concurrent senders: every receiver's merged stream stays in increasing id order.
        bob.send(*[dm("carol", f"b{i}") for i in range(20)])
        carol.send(*[say(f"c{i}") for i in range(20)])
        alice.send(*[say(f"a{i}") for i in range(20)])
        for peer, senders in (
            (carol, ("bob", "alice")),
            (bob, ("carol", "alice")),
            (alice, ("carol",)),
        ):
            msgs = [peer.recv(RECV_S) for _ in range(20 * len(senders))]
            ids = [m["id"] for m in msgs]
            assert ids == sorted(set(ids))
            for sender in senders:
                texts = [m["text"] for m in msgs if m["from"] == sender]
                assert texts == [f"{sender[0]}{i}" for i in range(20)]
            assert until_pong(peer, "end") == []


def test_dm_unknown_user(chat) -> None:
    """§4 dm: no such user → error unknown_user; delivered to no one, the connection stays."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(dm("nobody", "hello?"))
        reply = alice.recv(RECV_S)
        assert kind(reply) == error("unknown_user")
        assert isinstance(reply["message"], str)
        alice.send(say("marker"))
        assert until_message(bob, "marker") == []


# --- who, ping ---------------------------------------------------------------------------------


def test_who_lists_every_joined_name_sorted(chat) -> None:
    """§4 users: `who` answers every joined name (asker included), sorted by code point."""
    with chat(rate=0) as room:
        alice, _, _ = room.join_all("alice", "Bob", "Émile")
        alice.send({"type": "who"})
        assert alice.recv(RECV_S) == {"type": "users", "names": ["Bob", "alice", "Émile"]}


def test_ping_echoes_id_before_and_after_join(chat) -> None:
    """§4 ping: answered by pong echoing id (null when absent), even before join."""
    ids: list[Any] = [7, "x", {"a": [1, None, True]}, 2.5, None]
    with chat() as room:
        peer = room.connect(first=[{"type": "ping", "id": i} for i in ids] + [{"type": "ping"}])
        assert [peer.recv(RECV_S) for _ in range(len(ids) + 1)] == [
            {"type": "pong", "id": i} for i in [*ids, None]
        ]
        assert peer.join("alice")["type"] == "welcome"
        peer.send({"type": "ping", "id": [1, 2]}, {"type": "ping"})
        assert peer.recv(RECV_S) == {"type": "pong", "id": [1, 2]}
        assert peer.recv(RECV_S) == {"type": "pong", "id": None}


# --- joined state and which error --------------------------------------------------------------


def test_before_join_say_dm_who_refused(chat) -> None:
    """§4: before join, say/dm/who get not_joined and the connection stays."""
    with chat(rate=0) as room:
        (alice,) = room.join_all("alice")
        early = room.connect(first=[say("hi"), dm("alice", "hi"), {"type": "who"}])
        assert [kind(early.recv(RECV_S)) for _ in range(3)] == [error("not_joined")] * 3
        assert early.join("bob")["type"] == "welcome"
        assert alice.recv(RECV_S) == {"type": "joined", "name": "bob", "identity": None}
        early.send(say("now"))
        assert alice.recv(RECV_S)["text"] == "now"  # nothing of the refused ones arrived


def test_leave_before_join_closes(chat) -> None:
    """§4: leave before join gets bye(leave) and the close; no one sees a `left`."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        early = room.connect(first=[{"type": "leave"}, say("ignored")])
        assert early.wait_closed(RECV_S) == [{"type": "bye", "reason": "leave"}]
        bob.send(say("marker"))
        assert until_message(alice, "marker") == []


def test_join_again_is_already_joined(chat) -> None:
    """§4: after a successful join, another join gets already_joined (even with a free name)."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send({"type": "join", "name": "carol"})
        assert kind(alice.recv(RECV_S)) == error("already_joined")
        bob.send({"type": "who"})
        assert bob.recv(RECV_S) == {"type": "users", "names": ["alice", "bob"]}


# (label, joined first?, message, expected code): §4 "Which error", first failing check wins.
PRECEDENCE = [
    ("unknown type before not_joined", False, {"type": "shout", "text": "x"}, "bad_message"),
    ("not_joined before missing field", False, {"type": "say"}, "not_joined"),
    ("not_joined before bad text", False, say("\x00"), "not_joined"),
    ("not_joined before unknown_user", False, dm("nobody", "x"), "not_joined"),
    ("already_joined before bad name field", True, {"type": "join", "name": 5}, "already_joined"),
    ("already_joined before missing name", True, {"type": "join"}, "already_joined"),
    ("already_joined before invalid_name", True, {"type": "join", "name": " x"}, "already_joined"),
    ("already_joined before name_taken", True, {"type": "join", "name": "ALICE"}, "already_joined"),
    ("unknown type after join", True, {"type": "shout"}, "bad_message"),
    ("field typed before size", True, {"type": "say", "text": ["x" * 50]}, "bad_message"),
    ("dm field typed before size", True, {"type": "dm", "to": 1, "text": "x" * 50}, "bad_message"),
    ("too_long before control char", True, say("\x00" * 11), "too_long"),
    ("too_long before unknown_user", True, dm("nobody", "x" * 11), "too_long"),
    ("content before unknown_user", True, dm("nobody", "a\x07"), "bad_message"),
    ("empty text before unknown_user", True, dm("nobody", ""), "bad_message"),
    ("name not a string", False, {"type": "join", "name": ["alice"]}, "bad_message"),
]


@pytest.mark.parametrize(
    ("joined", "msg", "code"),
    [case[1:] for case in PRECEDENCE],
    ids=[case[0] for case in PRECEDENCE],
)
def test_which_error(chat, joined: bool, msg: dict[str, Any], code: str) -> None:
    """§4 Which error: known type, joined, fields, size, content, name free, recipient, rate."""
    with chat(max_text=10) as room:
        (alice,) = room.join_all("alice")
        peer = alice if joined else room.connect()
        peer.send(msg)
        assert kind(peer.recv(RECV_S)) == error(code)
        assert until_pong(peer, "still open") == []  # error, and the connection stays


def test_invalid_name_before_name_taken(chat) -> None:
    """§4 Which error: content (invalid_name) before name free, even when the keys collide."""
    with chat() as room:
        room.join_all("ι")  # Greek iota, a valid name
        peer = room.connect()
        # U+0345 casefolds to "ι" too, but a combining mark cannot start a name.
        assert peer.join("\u0345")["code"] == "invalid_name"
        assert peer.join("Ι")["code"] == "name_taken"  # capital iota: same key, valid


def test_unknown_user_before_rate_limited(chat) -> None:
    """§4 Which error: recipient (unknown_user) before rate; refused messages take no token."""
    with chat(rate=1) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(say("uses the token"), dm("nobody", "x"), dm("bob", "no token left"))
        assert [kind(alice.recv(RECV_S)) for _ in range(2)] == [
            error("unknown_user"),
            error("rate_limited"),
        ]
        assert bob.recv(RECV_S)["text"] == "uses the token"
    with chat(rate=2, max_text=10) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(
            say("x" * 11), say(""), dm("nobody", "x"), {"type": "say"}, say("one"), say("two")
        )
        assert [kind(alice.recv(RECV_S)) for _ in range(4)] == [
            error("too_long"),
            error("bad_message"),
            error("unknown_user"),
            error("bad_message"),
        ]
        assert [bob.recv(RECV_S)["text"] for _ in range(2)] == ["one", "two"]
        assert until_pong(alice, "no rate_limited") == []


# --- names over the wire -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["аlice", "", "a" * 33, " bob", "bob!", "_bob", "bob smith", "\u0301bob", "Ωmega"],
    ids=[
        "cyrillic-a",
        "empty",
        "33-chars",
        "leading-space",
        "bang",
        "underscore-first",
        "space",
        "mark-first",
        "greek-latin",
    ],
)
def test_invalid_names(chat, raw: str) -> None:
    """§4 name: the normative predicate refuses these with invalid_name; a retry may follow."""
    with chat() as room:
        peer = room.connect(first=[{"type": "join", "name": raw}])
        assert kind(peer.recv(RECV_S)) == error("invalid_name")
        assert peer.join("retry")["type"] == "welcome"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("ａｌｉｃｅ", "alice"),
        ("Jose\u0301", "José"),
        ("Анна", "Анна"),
        ("राहुल", "राहुल"),
        ("太郎", "太郎"),
        ("a" * 32, "a" * 32),
        ("9lives", "9lives"),
        ("x_y-z.w", "x_y-z.w"),
    ],
)
def test_valid_names_are_normalised(chat, raw: str, name: str) -> None:
    """§4 name: NFKC form is used everywhere (welcome, joined, message from)."""
    with chat(rate=0) as room:
        (watcher,) = room.join_all("watcher")
        peer, welcome = room.join(raw)
        assert welcome["name"] == name
        assert watcher.recv(RECV_S) == {"type": "joined", "name": name, "identity": None}
        peer.send(say("hi"))
        assert watcher.recv(RECV_S)["from"] == name


def test_names_unique_after_nfkc_and_casefold(chat) -> None:
    """§4 name: unique among joined clients after NFKC+casefold → name_taken; retry succeeds."""
    with chat() as room:
        room.join_all("José", "alice")  # "José" composed
        peer = room.connect(first=[{"type": "join", "name": "Jose\u0301"}])  # decomposed
        assert kind(peer.recv(RECV_S)) == error("name_taken")
        for taken in ("ALICE", "ａｌｉｃｅ", "JOSÉ", "José"):
            assert kind(peer.join(taken)) == error("name_taken"), taken
        assert kind(peer.join("аlice")) == error("invalid_name")
        welcome = peer.join("alicia")
        assert (welcome["type"], welcome["name"], welcome["users"]) == (
            "welcome",
            "alicia",
            ["José", "alice"],
        )


def test_name_freed_by_leave(chat) -> None:
    """§4 name: unique among *joined* clients; after leave the name is free again."""
    with chat() as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send({"type": "leave"})
        assert alice.wait_closed(RECV_S) == [{"type": "bye", "reason": "leave"}]
        assert bob.recv(RECV_S) == {"type": "left", "name": "alice", "reason": "leave"}
        _, welcome = room.join("ALICE")
        assert welcome["users"] == ["bob"]


# --- text over the wire ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a" * 10, True),
        ("a" * 11, False),
        ("é" * 5, True),  # 10 bytes, 5 characters
        ("é" * 5 + "a", False),  # 11 bytes, 6 characters
        ("😀😀ab", True),  # 4 + 4 + 2 bytes
        ("😀😀😀", False),  # 12 bytes, 3 characters
    ],
)
def test_text_size_in_utf8_bytes(chat, text: str, ok: bool) -> None:
    """§4 text: at most max_text UTF-8 bytes (bounds inclusive), else too_long."""
    with chat(max_text=10, rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(say(text), say("marker"))
        before = until_message(bob, "marker")
        if ok:
            assert [m["text"] for m in before] == [text]
            assert until_pong(alice, "p") == []
        else:
            assert before == []
            assert kind(alice.recv(RECV_S)) == error("too_long")


@pytest.mark.parametrize(
    "bad",
    ["", "\x00", "a\x01b", "\x1b[31m", "\r", "line\r\n", "\x7f", "\x80", "\x85", "\x9f"],
)
def test_control_characters_refused(chat, bad: str) -> None:
    """§4 text: empty, C0 (except \\n, \\t), DEL and C1 → bad_message, delivered to no one."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(say(bad), dm("bob", bad), say("marker"))
        assert [kind(alice.recv(RECV_S)) for _ in range(2)] == [error("bad_message")] * 2
        assert until_message(bob, "marker") == []


def test_lone_surrogate_refused(chat) -> None:
    """§4 text: a lone surrogate (JSON \\ud800) is bad_message; the connection stays."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send_plaintext(b'[{"type":"say","text":"a\\ud800"},{"type":"say","text":"\\udc00"}]')
        assert [kind(alice.recv(RECV_S)) for _ in range(2)] == [error("bad_message")] * 2
        alice.send(say("marker"))
        assert until_message(bob, "marker") == []


def test_unicode_text_delivered_byte_exact(chat) -> None:
    """§4 text: emoji, RTL, combining marks, tabs and newlines are accepted and kept exactly."""
    texts = [
        "👩‍👩‍👧‍👦 family, 🇫🇷 flag, 🏳️‍🌈",
        "שלום עולם — مرحبا بالعالم",
        "\u202eRTL override\u202c and \u200f mark",
        "e\u0301 vs é, Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒g̯̊o",
        "tab\there\nnew line\n",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ＦＵＬＬ 太郎 \ufeff BOM \U0010fffd",
        '"quotes" \\ back \\u0000 slash </script>',
    ]
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(*[say(t) for t in texts])
        alice.send(*[dm("bob", t) for t in texts])
        got = [bob.recv(RECV_S) for _ in range(2 * len(texts))]
        assert [m["text"].encode("utf-8") for m in got] == [t.encode("utf-8") for t in texts] * 2
        assert [m["type"] for m in got] == ["message"] * len(texts) + ["dm"] * len(texts)


# --- records: several messages, leave --------------------------------------------------------


def test_record_messages_processed_in_order(chat) -> None:
    """§3: the messages of one record are processed in order."""
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        alice.send(
            say("1"),
            {"type": "ping", "id": 1},
            say("2"),
            {"type": "who"},
            {"type": "bogus"},
            say("3"),
            {"type": "ping", "id": 2},
        )
        replies = [alice.recv(RECV_S) for _ in range(4)]
        assert replies[:2] == [
            {"type": "pong", "id": 1},
            {"type": "users", "names": ["alice", "bob"]},
        ]
        assert kind(replies[2]) == error("bad_message")
        assert replies[3] == {"type": "pong", "id": 2}
        assert [bob.recv(RECV_S)["text"] for _ in range(3)] == ["1", "2", "3"]


def test_leave_mid_record_ignores_the_rest(chat) -> None:
    """§4 leave: earlier messages of the record delivered, later ones ignored; bye then close."""
    with chat(rate=0) as room:
        alice, bob, carol = room.join_all("alice", "bob", "carol")
        alice.send(
            say("kept 1"),
            dm("bob", "kept 2"),
            {"type": "leave"},
            say("dropped"),
            dm("bob", "dropped"),
            {"type": "who"},
            {"type": "join", "name": "x"},
        )
        assert alice.wait_closed(RECV_S) == [{"type": "bye", "reason": "leave"}]
        got = [bob.recv(RECV_S) for _ in range(3)]
        assert [(m["type"], m.get("text")) for m in got] == [
            ("message", "kept 1"),
            ("dm", "kept 2"),
            ("left", None),
        ]
        assert got[2] == {"type": "left", "name": "alice", "reason": "leave"}
        assert [m.get("text") for m in (carol.recv(RECV_S), carol.recv(RECV_S))] == [
            "kept 1",
            None,
        ]
        carol.send(say("marker"))
        assert until_message(bob, "marker") == []  # "dropped" never came, nor a second left


# --- disconnects and timeouts ------------------------------------------------------------------


def test_abrupt_disconnect_announced_once(chat) -> None:
    """§4 left: a client closing without leave is announced as left(disconnect), exactly once."""
    with chat(rate=0) as room:
        alice, bob, carol = room.join_all("alice", "bob", "carol")
        bob.send(say("last words"))
        for peer in (alice, carol):
            assert peer.recv(RECV_S)["text"] == "last words"
        bob.close()
        for peer in (alice, carol):
            assert peer.recv(RECV_S) == {"type": "left", "name": "bob", "reason": "disconnect"}
        alice.send(say("marker 1"))
        assert until_message(carol, "marker 1") == []
        carol.send(say("marker 2"))
        assert until_message(alice, "marker 2") == []
        alice.send({"type": "who"})
        assert alice.recv(RECV_S) == {"type": "users", "names": ["alice", "carol"]}


def test_idle_timeout(chat) -> None:
    """§4 Timeouts: joined and silent for idle_timeout → bye(timeout); others see left(timeout)."""
    idle_s = 0.5
    with chat(idle_timeout=idle_s) as room:
        joined_at = time.monotonic()  # sleepy sends its join after this, then nothing
        sleepy, watcher = room.join_all("sleepy", "watcher")
        deadline = joined_at + RECV_S
        seen: list[dict[str, Any]] = []
        pings = 0
        while not any(m["type"] == "left" for m in seen):
            assert time.monotonic() < deadline, f"no left(timeout) within {RECV_S} s: {seen}"
            watcher.send({"type": "ping", "id": pings})  # keeps the watcher alive
            pings += 1
            try:
                seen.append(watcher.recv(idle_s / 5))
            except TimeoutError:
                pass
        elapsed = time.monotonic() - joined_at
        assert elapsed >= idle_s * 0.95, f"timed out after {elapsed:.2f} s"
        notices = [m for m in seen if m["type"] != "pong"]
        assert notices == [{"type": "left", "name": "sleepy", "reason": "timeout"}]
        assert sleepy.wait_closed(RECV_S) == [{"type": "bye", "reason": "timeout"}]
        watcher.send({"type": "who"})
        reply, _ = watcher.recv_until("users", RECV_S)
        assert reply["names"] == ["watcher"]


# --- rate limit --------------------------------------------------------------------------------


def test_rate_limit_burst_and_refill(chat) -> None:
    """§4 Rate limit: bucket of `rate` tokens, full at join, refilled at `rate`/s, capped."""
    rate = 3
    with chat(rate=rate) as room:
        alice, bob, carol = room.join_all("alice", "bob", "carol")
        alice.send(*[say(f"burst {i}") for i in range(5)])
        burst_at = time.monotonic()
        assert [kind(alice.recv(RECV_S)) for _ in range(2)] == [error("rate_limited")] * 2
        carol.send(say("marker 1"))
        assert [m["text"] for m in until_message(bob, "marker 1")] == [
            f"burst {i}" for i in range(rate)
        ]
        assert until_message(alice, "marker 1") == []
        # One token comes back after 1/rate s: retry (bounded) until a say passes.
        tries = 0
        while True:
            assert time.monotonic() - burst_at < RECV_S, "no token came back"
            tries += 1
            alice.send(say(f"retry {tries}"), {"type": "ping", "id": tries})
            pong, replies = alice.recv_until("pong", RECV_S)
            assert pong == {"type": "pong", "id": tries}
            if not replies:
                break
            assert [kind(m) for m in replies] == [error("rate_limited")]
            time.sleep(0.05)
        refill_s = time.monotonic() - burst_at
        assert 0.8 / rate <= refill_s <= 1.0, f"first token back after {refill_s:.2f} s"
        assert tries > 1  # it was empty right after the burst
        # Capacity caps the bucket: after 5/rate s with no say, still only `rate` tokens.
        time.sleep(5 / rate + 0.1)  # the one fixed wait: an uncapped bucket would hold 5
        alice.send(*[say(f"second {i}") for i in range(5)])
        assert [kind(alice.recv(RECV_S)) for _ in range(2)] == [error("rate_limited")] * 2
        carol.send(say("marker 2"))
        assert [m["text"] for m in until_message(bob, "marker 2")] == [f"retry {tries}"] + [
            f"second {i}" for i in range(rate)
        ]


def test_rate_zero_is_unlimited(chat) -> None:
    """§4 Rate limit: rate 0 means no limit (and welcome.rate is 0)."""
    with chat(rate=0) as room:
        (alice,) = room.join_all("alice")
        bob, welcome = room.join("bob")
        assert welcome["rate"] == 0
        assert alice.recv(RECV_S) == {"type": "joined", "name": "bob", "identity": None}
        alice.send(*[say(f"n{i}") for i in range(50)])  # §3: at most 64 messages a record
        alice.send(*[dm("bob", f"d{i}") for i in range(50)])
        got = [bob.recv(RECV_S)["text"] for _ in range(100)]
        assert got == [f"n{i}" for i in range(50)] + [f"d{i}" for i in range(50)]
        assert until_pong(alice, "no errors") == []


# --- batching ----------------------------------------------------------------------------------


def test_server_batches_waiting_messages(chat) -> None:
    """§3: several messages waiting for one client at the same time go out in one record."""
    total = 600
    with chat(rate=0) as room:
        alice, bob = room.join_all("alice", "bob")
        for start in range(0, total, 50):  # §3: at most 64 messages in a client record
            alice.send(*[say(f"m{i}") for i in range(start, start + 50)])
        records: list[list[dict[str, Any]]] = []
        deadline = time.monotonic() + RECV_S
        while sum(len(r) for r in records) < total:
            records.append(bob.recv_record(max(0.01, deadline - time.monotonic())))
        texts = [m["text"] for r in records for m in r]
        assert texts == [f"m{i}" for i in range(total)]
        assert max(len(r) for r in records) > 1, "every message came in a record of its own"
        assert len(records) < total // 2, f"{len(records)} records for {total} messages"


# --- the process: signals, fingerprint, bind failure -------------------------------------------


def test_sigterm_sends_bye_shutdown_and_exits_0(spawn_server) -> None:
    """§4 SIGTERM: bye(shutdown) to every keyed client, no left, exit 0; §2 fingerprint printed."""
    with spawn_server("--rate", "0") as (proc, host, port, fingerprint):
        alice, _ = connect_and_join(host, port, "alice", timeout=RECV_S)
        bob, _ = connect_and_join(host, port, "bob", timeout=RECV_S)
        keyed = RefPeer.connect(host, port, timeout=RECV_S)  # keyed, never joined
        bare = socket.create_connection((host, port), timeout=RECV_S)  # never sends key
        try:
            assert parse_json_object(read_plain_frame(bare))["type"] == "hello"
            assert fingerprint.startswith("SHA256:")
            assert fingerprint == fingerprint_of(alice.server_spki) == alice.fingerprint
            assert alice.recv(RECV_S) == {"type": "joined", "name": "bob", "identity": None}
            bob.send({"type": "ping", "id": 1})
            assert bob.recv(RECV_S) == {"type": "pong", "id": 1}
            keyed.send({"type": "ping", "id": 2})
            assert keyed.recv(RECV_S) == {"type": "pong", "id": 2}
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for peer in (alice, bob, keyed):
                assert peer.wait_closed(RECV_S) == [{"type": "bye", "reason": "shutdown"}]
            try:
                tail = bare.recv(1)
            except ConnectionResetError:
                tail = b""
            assert tail == b"", "a connection without key must be closed with no reply"
            assert proc.wait(RECV_S) == 0
            assert time.monotonic() - sent_at < 2.0
        finally:
            bare.close()
            for peer in (alice, bob, keyed):
                peer.close()


def test_port_in_use_exits_1_with_one_line(key_file: Path) -> None:
    """Server CLI: a port already in use → exit status 1 and one line on stderr, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A small --max-clients keeps a low open-file limit from adding a warning line.
        result = subprocess.run(
            [
                *(sys.executable, str(ROOT / "server.py"), "--port", str(port)),
                *("--key-file", str(key_file), "--max-clients", "10"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "fingerprint" not in result.stdout
