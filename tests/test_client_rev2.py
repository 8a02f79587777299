"""client.py and revision 2 of the protocol: identity and moderation (§5), history, resume
and actions (§6), and the limits of issue 12, mostly through the pipe-mode CLI.

The real server plays the server where it implements the feature; test_client's
FakeServer plays one where a test needs exact control (replays, a key that
changes, record sizes, a flood).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from Crypto.PublicKey import RSA
from refpeer import connect_and_join
from test_client import (
    CLIENT,
    FakeConn,
    FakeServer,
    T,
    client_env,
    event,
    free_port,
    pipe_client,
    read_until,
    spawn_pipe_client,
    wait_open,
)

import crypto_utils
import protocol
from chat import Chat
from commands import parse_line
from errors import ClientError, ConnectionLost
from link import Link, Pacer
from session import INBOX_MESSAGES, Session, sane_welcome
from view import Style

FP = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def show_identity(tmp_path: Path, *args: str, data: str = "data") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLIENT), "--show-identity", *args],
        capture_output=True,
        text=True,
        timeout=T,
        env=client_env(tmp_path, XDG_DATA_HOME=str(tmp_path / data)),
    )


def fingerprint_of(tmp_path: Path, data: str = "data") -> str:
    done = show_identity(tmp_path, data=data)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- identity (§5) -------------------------------------------------------------------------------


def test_show_identity_makes_the_key_once(tmp_path: Path) -> None:
    """§5: the identity is made on first use at $XDG_DATA_HOME/bcast/identity.pem, mode 0600;
    --show-identity prints its fingerprint and exits 0, the same each time; --identity
    chooses another file."""
    first = show_identity(tmp_path)
    assert first.returncode == 0, first.stderr
    assert FP.fullmatch(first.stdout.strip())
    path = tmp_path / "data" / "bcast" / "identity.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    assert show_identity(tmp_path).stdout == first.stdout
    other = show_identity(tmp_path, "--identity", str(tmp_path / "other.pem"))
    assert other.returncode == 0 and other.stdout != first.stdout


def test_an_identity_file_open_to_others_is_refused(tmp_path: Path) -> None:
    """§5: a key file readable by group or others is refused in one sentence, exit 2."""
    path = tmp_path / "id.pem"
    assert show_identity(tmp_path, "--identity", str(path)).returncode == 0
    path.chmod(0o644)
    done = show_identity(tmp_path, "--identity", str(path))
    assert done.returncode == 2
    assert str(path) in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_join_carries_a_proof_of_this_connection(server_key, tmp_path: Path) -> None:
    """§5: join carries identity (the raw public key) and proof (a signature over this
    connection's transcript); --guest sends neither; history is 0 in a pipe unless asked."""
    joins: list[tuple[dict[str, Any], bytes]] = []

    def record(conn: FakeConn) -> None:
        joins.append((conn.join, conn.transcript))
        conn.recv()  # leave
        conn.send(protocol.bye("leave"))

    with FakeServer(server_key, record) as fake:
        assert pipe_client(tmp_path, fake.port, "--name", "ana").returncode == 0
        assert pipe_client(tmp_path, fake.port, "--name", "ana", "--guest").returncode == 0
        assert pipe_client(tmp_path, fake.port, "--name", "ana", "--history", "7").returncode == 0
    (proved, transcript), (guest, _), (asked, _) = joins
    public = protocol.strict_b64decode(proved["identity"], "identity")
    proof = protocol.strict_b64decode(proved["proof"], "proof")
    assert crypto_utils.verify_identity(public, proof, transcript)
    assert crypto_utils.identity_fingerprint(public) == fingerprint_of(tmp_path)
    assert proved["history"] == 0 and "since" not in proved
    assert "identity" not in guest and "proof" not in guest
    assert asked["history"] == 7


def test_others_see_the_verified_identity(run_server, tmp_path: Path) -> None:
    """§5: the real server verifies the proof: the others' `joined` names the fingerprint."""
    fp = fingerprint_of(tmp_path)
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        done = pipe_client(tmp_path, srv.address[1], "--name", "ana")
        assert done.returncode == 0, done.stderr
        joined = bob.recv(T)
        assert (joined["type"], joined["identity"]) == ("joined", fp)
        bob.close()


def test_a_name_bound_to_another_key_is_refused_in_words(run_server, tmp_path: Path) -> None:
    """§5: once ana joined with her key, another key's join as ana gets name_reserved, said
    as `ana's name is reserved for another key`, exit 1."""
    with run_server(rate=0) as srv:
        port = srv.address[1]
        assert pipe_client(tmp_path, port, "--name", "ana").returncode == 0
        other = pipe_client(
            tmp_path, port, "--name", "Ana", env={"XDG_DATA_HOME": str(tmp_path / "other")}
        )
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1] == (
        "client.py: Ana's name is reserved for another key"
    )


# --- moderation (§5) -----------------------------------------------------------------------------


def test_operator_whois_and_kick(run_server, tmp_path: Path) -> None:
    """§5: an operator's /whois answers in words; /kick closes the target's connection
    (its bye carries by and message); /help lists operator commands to operators only."""
    fp = fingerprint_of(tmp_path)
    with run_server(rate=0, ops=(fp,)) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        proc = spawn_pipe_client(tmp_path, srv.address[1], "--name", "ana")
        assert event(bob.recv(T)) == ("joined", "ana")
        proc.stdin.write("/whois BOB\n/help\n")
        proc.stdin.flush()
        whois = read_until(proc.stdout, "bob:")[-1]
        assert "bob: no identity (a guest); not an operator; here since " in whois
        assert "from 127.0.0.1" in whois  # operators see the address
        proc.stdin.write("/kick bob stop that\n")
        proc.stdin.close()
        bye = bob.recv(T)
        assert bye == {"type": "bye", "reason": "kicked", "by": "ana", "message": "stop that"}
        assert read_until(proc.stdout, "bob")[-1].endswith("<-- bob was kicked by ana\n")
        _, err = wait_open(proc)
        bob.close()
    assert proc.returncode == 0, err
    assert "operator commands:" in err and "/kick NAME [REASON]" in err


def test_not_an_operator_is_told_in_words(run_server, tmp_path: Path) -> None:
    """§5: a non-operator's /kick is refused: `only operators may do that`, not (not_op);
    /help shows no operator commands; the refused line makes a pipe exit 1."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        done = pipe_client(tmp_path, srv.address[1], "--name", "ana", stdin="/help\n/kick bob\n")
        bob.close()
    assert done.returncode == 1
    assert "* refused: only operators may do that" in done.stderr
    assert "not_op" not in done.stderr and "operator commands" not in done.stderr
    assert done.stderr.endswith("client.py: 1 of 2 lines were not delivered\n")


@pytest.mark.parametrize(
    ("line", "meaning"),
    [
        ("/kick bob", ("kick", "bob", None)),
        ("/KICK bob  you know why", ("kick", "bob", "you know why")),
        ("/ban bob", ("ban", "bob", None, None)),
        ("/ban bob 30", ("ban", "bob", 30, None)),
        ("/ban bob 30 flooding", ("ban", "bob", 30, "flooding")),
        ("/ban bob for good", ("ban", "bob", None, "for good")),
        ("/unban SHA256:abc", ("unban", "SHA256:abc")),
        ("/bans", ("bans",)),
        ("/mute bob 5", ("mute", "bob", 5)),
        ("/mute bob 0", ("mute", "bob", 0)),
        ("/whois bob", ("whois", "bob")),
        ("/me waves", ("action", "waves")),
    ],
)
def test_parse_revision_2_commands(line: str, meaning: tuple[Any, ...]) -> None:
    """§5, §6: the operator commands, /whois and /me, as typed."""
    assert parse_line(line) == meaning


@pytest.mark.parametrize(
    "line", ["/kick", "/ban bob 0", "/ban bob 525601", "/mute bob", "/mute bob x", "/me", "/bans x"]
)
def test_revision_2_usage_hints(line: str) -> None:
    """§5: minutes outside 1..525600 for a ban (0..525600 for a mute) or a missing name
    give a usage hint instead of a message the server would refuse."""
    kind, hint = parse_line(line)
    assert kind == "hint" and hint.startswith("usage: /")


def test_mute_and_bans_are_said_in_words(server_key, tmp_path: Path) -> None:
    """§5: `muted` (to the target and as the operator's acknowledgement), `bans`, and the
    error `muted` are shown as sentences."""
    until = int(time.time() * 1000) + 60_000

    def moderate(conn: FakeConn) -> None:
        conn.send(
            protocol.muted("ana", until),
            protocol.muted("ana", None),
            protocol.muted("ana", until, name="bob"),
            protocol.bans([protocol.ban_entry("10.0.0.9", None, "ana", "flood")]),
            protocol.bans([]),
            protocol.error("muted", "you are muted until 12:00"),
        )
        conn.recv()
        conn.send(protocol.bye("leave"))

    with FakeServer(server_key, moderate) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "carl")
        out = [proc.stdout.readline().split("] ", 1)[-1] for _ in range(5)]
        proc.stdin.close()
        _, err = wait_open(proc)
    assert re.fullmatch(r"you are muted by ana until \d\d:\d\d:\d\d\n", out[0])
    assert out[1] == "ana lifted your mute\n"
    assert re.fullmatch(r"bob is muted until \d\d:\d\d:\d\d\n", out[2])
    assert out[3] == "bans in force (1):\n"
    assert out[4] == "  10.0.0.9 until unbanned, by ana: flood\n"
    assert "* not delivered: you are muted" in err


# --- history, resume and actions (§6) ------------------------------------------------------------


def test_history_is_shown_apart(run_server, tmp_path: Path) -> None:
    """§6: --history N shows the latest N kept messages between `--- history ---` and
    `--- live ---` (status lines in a pipe), then live ones; a pipe asks for none by default."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        for text in ("one", "two", "three"):
            bob.send({"type": "say", "text": text})
        plain = spawn_pipe_client(tmp_path, srv.address[1], "--name", "ana")
        other = {"XDG_DATA_HOME": str(tmp_path / "cy")}  # one identity, one connection (§5)
        proc = spawn_pipe_client(
            tmp_path, srv.address[1], "--name", "cy", "--history", "2", env=other
        )
        assert read_until(proc.stderr, "--- history ---")
        assert [proc.stdout.readline().split("] ", 1)[1] for _ in range(2)] == [
            "<bob> two\n",
            "<bob> three\n",
        ]
        assert read_until(proc.stderr, "--- live ---")
        bob.send({"type": "say", "text": "four"})
        assert read_until(proc.stdout, "four")[-1].endswith("<bob> four\n")
        seen = read_until(plain.stdout, "four")
        assert not [line for line in seen if "<bob> t" in line or "<bob> one" in line]
        # (a pipe asks for no history by default: no one, two, three)
        for p in (proc, plain):
            p.stdin.close()
            wait_open(p)
        bob.close()


def test_me_sends_an_action_and_shows_others(run_server, tmp_path: Path) -> None:
    """§6: /me sends say with action true; an action arrives as `* bob waves`."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        proc = spawn_pipe_client(tmp_path, srv.address[1], "--name", "ana")
        assert event(bob.recv(T)) == ("joined", "ana")
        proc.stdin.write("/me waves\n")
        proc.stdin.flush()
        got = bob.recv(T)
        assert (got["text"], got.get("action")) == ("waves", True)
        bob.send({"type": "say", "text": "waves back", "action": True})
        assert read_until(proc.stdout, "waves back")[-1].endswith("] * bob waves back\n")
        proc.stdin.close()
        assert wait_open(proc) and proc.returncode == 0
        bob.close()


def test_resume_asks_since_and_drops_my_replayed_says(server_key, tmp_path: Path) -> None:
    """§6 Resume: after a connection lost without `bye`, the client rejoins with `since` the
    highest id it saw (and no `history`), shows what it missed once, and drops the replay
    of its own say, which it showed when sent."""
    joins: list[dict[str, Any]] = []
    said = threading.Event()

    def script(conn: FakeConn) -> None:
        joins.append(conn.join)
        if len(joins) == 1:
            conn.send(protocol.message(6, "bob", "six", 1))
            assert conn.recv()[0]["text"] == "mine"
            said.set()
            return  # closed without bye: lost
        conn.send(
            protocol.message(7, "ana", "mine", 2, history=True),
            protocol.message(8, "bob", "missed", 3, history=True),
            protocol.message(9, "bob", "live again", 4),
        )
        conn.recv()  # leave
        conn.send(protocol.bye("leave"))

    welcome = protocol.welcome("ana", ["bob"], 16384, 0, last_id=5)
    with FakeServer(server_key, script, welcome=welcome) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "ana")
        assert proc.stdout.readline().endswith("<bob> six\n")
        proc.stdin.write("mine\n")
        proc.stdin.flush()
        assert said.wait(T)
        assert read_until(proc.stderr, "reconnected as ana")
        assert proc.stdout.readline().endswith("<bob> missed\n")
        assert proc.stdout.readline().endswith("<bob> live again\n")
        proc.stdin.close()
        out, err = wait_open(proc)
    assert proc.returncode == 0, err
    assert "mine" not in out
    assert joins[0].get("since") is None and joins[0]["history"] == 0
    assert joins[1]["since"] == 6 and "history" not in joins[1]
    assert "--- history ---" in err and "--- live ---" in err


def test_a_changed_key_while_reconnecting_is_a_hard_stop(server_key, tmp_path: Path) -> None:
    """§2, §6: the server comes back with another key: no reconnection, the loud warning,
    exit 2."""
    port = free_port()
    lost = threading.Event()

    def drop(conn: FakeConn) -> None:
        lost.set()  # closed at once, without bye

    with FakeServer(server_key, drop, port=port):
        proc = spawn_pipe_client(tmp_path, port, "--name", "ana")
        assert lost.wait(T)
    other = crypto_utils.spki_der(RSA.generate(2048))
    eph = crypto_utils.Ephemeral().public
    hello = protocol.encode_hello(protocol.Hello(key=other, nonce=os.urandom(32), eph=eph))
    with FakeServer(server_key, hello=protocol.encode_frame(hello), port=port) as fake:
        _, err = wait_open(proc)
    assert fake.first_chunks == [b""]  # nothing sent to the new key: not even `key`
    assert proc.returncode == 2
    assert "HAS CHANGED" in err and "--forget 127.0.0.1:" in err


def test_follow_keeps_listening_after_the_input_ends(run_server, tmp_path: Path) -> None:
    """§6, issue 15: --follow: stdin ends at once, messages still arrive; SIGTERM leaves
    politely (the others see `left` leave) and exits 0."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        proc = spawn_pipe_client(tmp_path, srv.address[1], "--name", "ana", "--follow")
        proc.stdin.close()
        assert event(bob.recv(T)) == ("joined", "ana")
        bob.send({"type": "say", "text": "still there?"})
        assert read_until(proc.stdout, "still there?")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=T) == 0
        assert event(bob.recv(T)) == ("left", "ana", "leave")
        bob.close()
    proc.stdout.close()
    proc.stderr.close()


# --- records and limits (§1, §3, issue 12) --------------------------------------------------------


def test_records_fit_the_servers_max_record(server_key, tmp_path: Path) -> None:
    """§1: every record the client sends fits welcome.max_record (here the least a server
    may announce, 65536 bytes), however many lines wait at once."""
    conns: list[FakeConn] = []

    def collect(conn: FakeConn) -> None:
        conns.append(conn)
        while (msgs := conn.recv()) is not None:
            if msgs[-1]["type"] == "leave":
                conn.send(protocol.bye("leave"))
                return

    welcome = protocol.welcome("ana", [], 16384, 0, max_record=65536)
    lines = [f"{i:03d}" + "é" * 7000 for i in range(40)]  # 14 KB each
    with FakeServer(server_key, collect, welcome=welcome) as fake:
        done = pipe_client(tmp_path, fake.port, "--name", "ana", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert max(conns[0].sizes) <= 65536 - 4


def test_fill_record_splits_by_size_and_tokens() -> None:
    """§1, §3, §4: one record holds what fits max_record, and as many rated messages as
    there are tokens now (the first may wait for one)."""
    link = Link.__new__(Link)
    link._lock = threading.Lock()
    link._welcome = protocol.parse_server_message(
        protocol.welcome("ana", [], 16384, 0, max_record=65536)
    )
    link._pacer = Pacer(0)
    big = deque(protocol.Say("x" * 16000) for _ in range(10))
    sizes = []
    while big:
        record = link._fill_record(big)
        sizes.append(len(record))
        encoded = protocol.join_record([protocol.encode_client_message(m) for m in record])
        assert len(encoded) + 16 + 4 <= 65536
    assert sizes == [4, 4, 2]
    now = [0.0]
    link._pacer = Pacer(4, clock=lambda: now[0])  # a burst of 2
    small = deque(protocol.Say(str(i)) for i in range(5))
    assert len(link._fill_record(small)) == 2


def test_absurd_welcome_values_do_not_crash(server_key, tmp_path: Path) -> None:
    """Issue 12: a welcome with rate 10**400 (an OverflowError in float arithmetic before)
    is clamped: the lines go out, exit 0."""
    got: list[str] = []

    def collect(conn: FakeConn) -> None:
        while (msgs := conn.recv()) is not None:
            got.extend(m.get("text", "") for m in msgs if m["type"] == "say")
            if msgs[-1]["type"] == "leave":
                conn.send(protocol.bye("leave"))
                return

    welcome = protocol.welcome("ana", [], 16384, 10**400)
    with FakeServer(server_key, collect, welcome=welcome) as fake:
        done = pipe_client(tmp_path, fake.port, "--name", "ana", stdin="a\nb\n")
    assert done.returncode == 0, done.stderr
    assert got == ["a", "b"]
    assert sane_welcome(protocol.Welcome("a", [], 10**30, -1)).rate == 0


def test_a_reader_that_falls_behind_pushes_back_on_the_socket(server_key) -> None:
    """Issue 12: the queue between the socket reader and the display is bounded: when
    nothing is shown, the reader stops reading, so the server's sends block (it would drop
    such a client as slow) instead of the client's memory growing."""
    blocked = threading.Event()

    def flood(conn: FakeConn) -> None:
        conn.sock.settimeout(2.0)
        record = protocol.join_record(
            [protocol.encode_message(protocol.message(i, "bob", "x" * 900, 0)) for i in range(8)]
        )
        try:
            for _ in range(20_000):  # 160 MB if nothing pushed back
                conn.sock.sendall(protocol.encode_frame(conn.tx.seal(record)))
        except TimeoutError:
            blocked.set()

    with FakeServer(server_key, flood) as fake:
        session = Session.connect(fake.host, fake.port, "ana", lambda fp: None)
        session.start()
        assert blocked.wait(4 * T)
        assert session._inbox.qsize() <= INBOX_MESSAGES
        session.close()
    os.sched_yield()


def test_reconnect_waits_out_name_taken(server_key, tmp_path: Path) -> None:
    """§6 Resume: a guest may get name_taken until the server notices its old connection
    died; the client says so once and tries again (backoff) until it rejoins."""
    count = iter(range(1, 100))

    def script(conn: FakeConn) -> None:
        n = next(count)
        if n == 2:
            conn.send(protocol.error("name_taken", "the name ana is taken"))
            conn.wait_closed()
            return
        conn.send(protocol.welcome("ana", [], 16384, 0))
        if n == 1:
            return  # lost without bye
        conn.send(protocol.message(1, "bob", "welcome back", 0))
        conn.recv()  # leave
        conn.send(protocol.bye("leave"))

    with FakeServer(server_key, script, welcome=False) as fake:
        proc = spawn_pipe_client(tmp_path, fake.port, "--name", "ana", "--guest")
        said = read_until(proc.stderr, "reconnected as ana")
        assert read_until(proc.stdout, "welcome back")
        proc.stdin.close()
        _, err = wait_open(proc)
    assert proc.returncode == 0, err
    assert sum("still holds our old connection" in line for line in said) == 1


def test_a_pipe_gives_up_reconnecting_in_the_end(monkeypatch) -> None:
    """§6: a pipe (a script) does not wait forever: after RECONNECT_GIVE_UP_S without a
    connection it ends the chat with one sentence (exit 1); a terminal keeps trying."""

    class Unreachable:
        identity = None

        def open(self) -> Session:
            raise ConnectionLost("cannot connect to 127.0.0.1:9: Connection refused")

    monkeypatch.setattr("link.RECONNECT_FIRST_S", 0.001)
    monkeypatch.setattr("link.RECONNECT_GIVE_UP_S", 0.05)
    welcome = protocol.parse_server_message(protocol.welcome("ana", [], 100, 0))
    io = type("IO", (), {"interactive": False, "reason": None})()
    io.show = lambda line: None
    io.wake = lambda reason: None
    session = type("S", (), {"welcome": welcome})()
    chat = Chat(io, Style(False), Unreachable(), session, "off")
    lost = ConnectionLost("the server closed the connection")
    with pytest.raises(ClientError) as ended:  # the chat ends with it
        chat.link._reconnect(lost, since=0)
    assert ended.value.exit_code == 1
    assert str(ended.value) == "the server closed the connection; no reconnection for 0.05 s"


def test_help_rows_keep_a_space_between_command_and_meaning() -> None:
    """/help for an operator: no usage runs into its meaning (the /ban row did)."""
    import commands

    rows = commands.help_rows(True)
    for cmd in commands.COMMANDS.values():
        (row,) = [r for r in rows if r.startswith(f"  {cmd.usage} ")] or [None]
        assert row is not None, f"{cmd.usage!r} runs into its meaning: {rows}"
