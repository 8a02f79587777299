"""§6 history, resume and actions over real sockets: kept messages replayed on request, `since`,
`gap`, `last_id`, ids across restarts (clean, and after SIGKILL), `say.action`.

Clients are the independent reference peer (tests/refpeer.py); servers run on
port 0, in this process or as `python3 server.py`, with a temp state file.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_server
from refpeer import RefIdentity, RefPeer
from rev2kit import Room, ask, code_of, room_of

# §6 / statewriter: kept messages are committed every 100 ms; wait a few batches.
COMMIT_WAIT_S = 0.5


@contextlib.contextmanager
def served(key_file: Path, key: Any, **settings: Any) -> Iterator[tuple[Any, Room]]:
    with running_server(key_file, key=key, **settings) as srv, room_of(srv) as r:
        yield srv, r


@pytest.fixture
def room(key_file: Path, server_key) -> Any:
    """Factory: `with room(**settings) as (srv, r):`."""
    return lambda **settings: served(key_file, server_key, **settings)


def say_all(sender: RefPeer, reader: RefPeer, *texts: str, action: bool = False) -> list[dict]:
    """`sender` says each text; return the messages as `reader` received them (with ids)."""
    extra = {"action": True} if action else {}
    sender.send(*[{"type": "say", "text": t, **extra} for t in texts])
    got = []
    while len(got) < len(texts):
        msg = reader.recv()
        if msg["type"] == "message":
            got.append(msg)
    assert [m["text"] for m in got] == list(texts)
    return got


def replayed(msgs: list[dict]) -> list[dict]:
    """What a joiner got: the replayed messages, checked marked, with the mark taken off."""
    assert all(m["type"] == "message" and m.get("history") is True for m in msgs), msgs
    return [{k: v for k, v in m.items() if k != "history"} for m in msgs]


# --- replay ------------------------------------------------------------------------------------


def test_history_survives_restart_and_ids_keep_increasing(room, tmp_path: Path) -> None:
    """§6: what is kept survives a restart (SIGTERM path: everything); replayed messages are
    the first delivery plus "history": true (same id, from, text, ts, action), right after
    welcome, in id order; ids keep increasing across restarts."""
    state = tmp_path / "state.db"
    with room(state=state) as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        said = say_all(ann, bob, "one", "two") + say_all(ann, bob, "waves", action=True)
        said += say_all(bob, ann, "three")
        assert said[2]["action"] is True and "action" not in said[0]
    with room(state=state) as (_, r):
        carol, welcome = r.join("carol", history=10)
        assert welcome["last_id"] >= said[-1]["id"] and welcome["gap"] is False
        assert replayed(carol.sync()) == said
        dave, _ = r.join("dave")
        carol.sync()
        (new,) = say_all(dave, carol, "after")
        assert new["id"] > said[-1]["id"]


def test_no_history_unless_asked(room) -> None:
    """§6: without history and since, nothing is replayed (bots are not fed old lines);
    history: 0 sends none either; gap is false without since."""
    with room() as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        say_all(ann, bob, "a", "b")
        for kw in ({}, {"history": 0}):
            peer, welcome = r.join(f"late{len(kw)}", **kw)
            assert welcome["gap"] is False and welcome["last_id"] >= 2
            assert peer.sync() == []


def test_history_sends_the_latest(room) -> None:
    """§6 history: at most that many kept messages, the latest; gap only with since."""
    with room() as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        said = say_all(ann, bob, *"abcde")
        peer, welcome = r.join("carol", history=2)
        assert welcome["gap"] is False
        assert replayed(peer.sync()) == said[-2:]
        peer, welcome = r.join("dave", history=2, since=said[1]["id"])
        assert welcome["gap"] is True  # "c" is above since and left out by history
        assert replayed(peer.sync()) == said[-2:]
        peer, welcome = r.join("erin", history=3, since=said[1]["id"])
        assert welcome["gap"] is False
        assert replayed(peer.sync()) == said[2:]


def test_since_and_gap_with_a_short_history(room) -> None:
    """§6 since: kept messages with a greater id, all of them without history; gap when
    one above since is no longer kept; since above last_id sends nothing."""
    with room(history=3) as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        said = say_all(ann, bob, *"abcde")
        ids = [m["id"] for m in said]
        cases = [
            (0, said[-3:], True),  # a, b forgotten
            (ids[0], said[-3:], True),  # b forgotten
            (ids[1], said[-3:], False),  # exactly what is kept
            (ids[3], said[-1:], False),
            (ids[4], [], False),
            (ids[4] + 1000, [], False),
        ]
        for i, (since, expected, gap) in enumerate(cases):
            peer, welcome = r.join(f"p{i}", since=since)
            assert (welcome["gap"], welcome["last_id"]) == (gap, ids[-1]), since
            assert replayed(peer.sync()) == expected, since


def test_history_zero_keeps_none(room) -> None:
    """§6: a server configured to keep none replays nothing, still lists `history` in
    features, and a since below a message it did not keep has a gap."""
    with room(history=0) as (_, r):
        ann, welcome = r.join("ann")
        assert "history" in welcome["features"]
        bob, _ = r.join("bob")
        ann.sync()
        (msg,) = say_all(ann, bob, "gone")
        peer, welcome = r.join("carol", since=0, history=10)
        assert (welcome["gap"], welcome["last_id"]) == (True, msg["id"])
        assert peer.sync() == []
        peer, welcome = r.join("dave", since=msg["id"])
        assert welcome["gap"] is False


def test_dms_not_kept_but_counted_in_last_id(room) -> None:
    """§6: dms are never kept (nor joined/left), but last_id counts their ids; gap looks at
    messages only."""
    with room() as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        (said,) = say_all(ann, bob, "public")
        ann.send({"type": "dm", "to": "bob", "text": "private"})
        dm = bob.recv()
        assert dm["type"] == "dm" and dm["id"] > said["id"]
        peer, welcome = r.join("carol", since=0)
        assert (welcome["last_id"], welcome["gap"]) == (dm["id"], False)
        assert replayed(peer.sync()) == [said]
        peer, welcome = r.join("dave", since=said["id"])
        assert (welcome["gap"], peer.sync()) == (False, [])


def test_resume_with_since_gets_the_missed_once(room) -> None:
    """§6 resume: a client whose connection was lost joins again with since = the highest
    id it saw: every kept message above it once, in id order, its own says included, then
    live messages, none twice."""
    bob_id = RefIdentity()
    with room() as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob", bob_id)
        ann.sync()
        say_all(ann, bob, "before")
        bob.send({"type": "say", "text": "mine"})  # bob never sees this id
        assert ann.recv()["text"] == "mine"
        seen = bob.max_id_seen
        bob.close()  # lost without a bye: the server may not have noticed yet
        ann.send(*[{"type": "say", "text": t} for t in ("m1", "m2", "m3")])
        marker, _ = r.join("marker")
        ann.sync()
        marker.send({"type": "say", "text": "mark"})
        assert ann.recv()["text"] == "mark"
        back, welcome = r.join("bob", bob_id, since=seen)  # takes the name over at once
        got = replayed(back.sync())
        assert [m["text"] for m in got] == ["mine", "m1", "m2", "m3", "mark"]
        ids = [m["id"] for m in got]
        assert ids == sorted(set(ids)) and ids[0] > seen and welcome["last_id"] == ids[-1]
        assert welcome["gap"] is False
        ann.send({"type": "say", "text": "live"})
        live = back.recv()
        assert (live["text"], "history" in live) == ("live", False)
        assert live["id"] > ids[-1] and back.sync() == []


def test_replay_comes_before_anything_live(room) -> None:
    """§6: the kept messages follow welcome at once, before anything live, though others
    keep talking while the joiner arrives."""
    with room(rate=0) as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        say_all(ann, bob, *[f"old{i}" for i in range(20)])
        stop = threading.Event()

        def chatter() -> None:
            i = 0
            while not stop.is_set():
                ann.send({"type": "say", "text": f"live{i}"})
                i += 1
                time.sleep(0.001)

        thread = threading.Thread(target=chatter)
        thread.start()
        try:
            for n in range(3):
                peer, welcome = r.join(f"late{n}", history=20)
                msgs = [peer.recv() for _ in range(25)]
                kinds = ["history" in m for m in msgs if m["type"] == "message"]
                assert kinds[:20] == [True] * 20 and not any(kinds[20:]), kinds
                ids = [m["id"] for m in msgs if m["type"] == "message"]
                assert ids == sorted(ids) and ids[19] <= welcome["last_id"] < ids[20]
        finally:
            stop.set()
            thread.join()


# --- bad values and actions --------------------------------------------------------------------


@pytest.mark.parametrize("field", ["history", "since"])
def test_bad_history_and_since_values(room, field: str) -> None:
    """§6: history and since are non-negative integers; another type or a negative value
    (null included, §4) is bad_message, and the connection stays unjoined."""
    with room() as (_, r):
        peer = r.connect()
        for value in (-1, "1", 1.5, 1.0, None, True, [], {}, -(10**30)):
            peer.send({"type": "join", "name": "ann", field: value})
            assert code_of(peer.recv()) == "bad_message", value
        assert peer.join("ann", **{field: 10**30})["type"] == "welcome"


def test_say_action(room) -> None:
    """§6: say.action true is delivered with "action": true; false is the same as absent;
    any other value is bad_message (delivered to no one)."""
    with room() as (_, r):
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        for value in ("yes", 1, 0, None, [], "true"):
            assert code_of(ask(ann, {"type": "say", "text": "x", "action": value})) == (
                "bad_message"
            )
        ann.send({"type": "say", "text": "plain", "action": False})
        ann.send({"type": "say", "text": "waves", "action": True})
        plain, waves = bob.recv(), bob.recv()
        assert plain["text"] == "plain" and "action" not in plain
        assert waves["text"] == "waves" and waves["action"] is True
        assert bob.sync() == []


# --- restarts ----------------------------------------------------------------------------------


def test_last_id_and_gap_after_a_clean_restart(room, tmp_path: Path) -> None:
    """§6: welcome.last_id is the highest id assigned so far (0 if none), and gap is true
    only when some message above since will not be sent: after a clean restart with every
    message kept, neither may count ids that were reserved but never assigned."""
    state = tmp_path / "state.db"
    with room(state=state) as (_, r):
        assert r.join("ann")[1]["last_id"] == 0
    with room(state=state) as (_, r):
        _, welcome = r.join("ann", since=0)
        assert (welcome["last_id"], welcome["gap"]) == (0, False)
        ann, _ = r.join("bob")
        carol, _ = r.join("carol")
        ann.sync()
        (said,) = say_all(ann, carol, "hello")
    with room(state=state) as (_, r):
        peer, welcome = r.join("dave", since=0)
        assert replayed(peer.sync()) == [said]
        assert (welcome["last_id"], welcome["gap"]) == (said["id"], False)


def test_sigkill_mid_conversation(spawn_server, tmp_path: Path) -> None:
    """§6 / README: after a crash (SIGKILL) at most the last ~100 ms batch of kept messages
    is lost, and no id is ever reused."""
    state = tmp_path / "state.db"
    args = ("--state", str(state), "--rate", "0")
    with spawn_server(*args) as (proc, host, port, _):
        r = Room((host, port))
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        early = say_all(ann, bob, *[f"early{i}" for i in range(10)])
        time.sleep(COMMIT_WAIT_S)  # no event shows a commit: wait several 100 ms batches
        late = say_all(ann, bob, *[f"late{i}" for i in range(10)])
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        r.close()
    with spawn_server(*args) as (proc, host, port, _):
        r = Room((host, port))
        try:
            carol, welcome = r.join("carol", since=0)
            kept = replayed(carol.sync())
            assert kept[: len(early)] == early  # older than the last batch: all there
            assert kept == (early + late)[: len(kept)]  # the rest, if any, a prefix
            assert welcome["last_id"] >= kept[-1]["id"]
            dave, _ = r.join("dave")
            carol.sync()
            (new,) = say_all(dave, carol, "after the crash")
            assert new["id"] > late[-1]["id"]  # never reused, though lost ones were unsaved
        finally:
            r.close()


def test_state_file_failing_while_running(room, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14: the disk fails while the server runs (full, read-only): the chat goes on,
    the failure is logged once however many batches fail, and again when saving works; the
    messages kept meanwhile are saved then."""
    import logging

    from store import StoreError

    caplog.set_level(logging.WARNING, logger="bcast.server")
    with room(history=10) as (srv, r):
        ana, _ = r.join("ana")
        bob, _ = r.join("bob")
        failing = threading.Event()
        failing.set()
        real_append = srv.store.append_messages
        done = []

        def append(messages, keep):
            if failing.is_set():
                raise StoreError(f"cannot write to the state file {srv.settings.state}: disk full")
            done.append(len(messages))
            return real_append(messages, keep)

        srv.store.append_messages = append
        for i in range(3):  # three batches, each failing
            say_all(ana, bob, f"while failing {i}")
            time.sleep(COMMIT_WAIT_S)
        errors = [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()]
        assert len(errors) == 1 and "not saved" in errors[0], errors
        failing.clear()
        say_all(ana, bob, "after")
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.02)
        assert done, "nothing was saved once the disk worked again"
        assert done[0] == 4, done  # the three said while failing, kept and saved with "after"
        assert any("works again" in r.getMessage() for r in caplog.records)
