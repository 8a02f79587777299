"""client.py on a pseudo-terminal (pexpect): what a person at the keyboard sees and does.

`Screen` is a tiny terminal emulator (the few sequences readline and the client
use), so tests check the screen, not the byte stream. The other users are
refpeer clients on the real server; hostile input comes from test_client's
FakeServer.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from refpeer import connect_and_join
from test_client import CLIENT, FakeConn, FakeServer, T, client_env, event

import protocol

ROWS, COLS = 24, 100
SGR = re.compile(r"\x1b\[[0-9;]*m")


class Screen:
    """Applies terminal output to a grid: enough of a VT100 for readline and client.py."""

    TOKEN = re.compile(r"\x1b\[([?0-9;]*)([@-~])|\x1b\][^\x07]*\x07|\x1b.|[\s\S]")

    def __init__(self, rows: int = ROWS, cols: int = COLS):
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0

    def write(self, text: str) -> None:  # pexpect's logfile_read interface
        for m in self.TOKEN.finditer(text):
            if m.group(2):
                self._csi(m.group(1), m.group(2))
            elif not m.group(0).startswith("\x1b"):
                self._char(m.group(0))

    def flush(self) -> None:
        pass

    def _char(self, ch: str) -> None:
        if ch == "\r":
            self.col = 0
        elif ch == "\n":
            self._down()
        elif ch == "\b":
            self.col = max(0, self.col - 1)
        elif ch >= " ":
            if self.col >= self.cols:
                self.col = 0
                self._down()
            self.grid[self.row][self.col] = ch
            self.col += 1

    def _down(self) -> None:
        if self.row == self.rows - 1:
            self.grid.pop(0)
            self.grid.append([" "] * self.cols)
        else:
            self.row += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # private modes (bracketed paste and such)
        n = int(params.split(";")[0] or 1) if params and final not in "KJm" else 1
        line = self.grid[self.row]
        if final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = n - 1
        elif final == "K":
            line[self.col :] = [" "] * (self.cols - self.col)
        elif final == "J":
            line[self.col :] = [" "] * (self.cols - self.col)
            for r in range(self.row + 1, self.rows):
                self.grid[r] = [" "] * self.cols
        elif final == "P":
            del line[self.col : self.col + n]
            line.extend([" "] * n)
        elif final == "@":
            line[self.col : self.col] = [" "] * n
            del line[self.cols :]

    def lines(self) -> list[str]:
        """The non-empty rows, right-stripped."""
        return [r for r in ("".join(row).rstrip() for row in self.grid) if r]


def spawn(tmp_path: Path, port: int, *args: str, **env: str) -> tuple[pexpect.spawn, Screen]:
    child = pexpect.spawn(
        sys.executable,
        [str(CLIENT), "--port", str(port), *args],
        env=client_env(tmp_path, TERM="xterm", **env),
        encoding="utf-8",
        timeout=T,
        dimensions=(ROWS, COLS),
    )
    screen = Screen()
    child.logfile_read = screen
    return child, screen


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@pytest.fixture
def chat(run_server, tmp_path: Path):
    """A real server with bob (refpeer) in it and alice's terminal client joined."""
    with run_server(rate=0) as srv:
        host, port = srv.address
        bob, _ = connect_and_join(host, port, "bob")
        child, screen = spawn(tmp_path, port, "--name", "alice")
        child.expect("exit to leave")
        assert event(bob.recv(T)) == ("joined", "alice")
        yield SimpleNamespace(srv=srv, bob=bob, child=child, screen=screen)
        child.close(force=True)
        bob.close()


def test_message_arrives_while_typing(chat) -> None:
    """Issue B: a message arriving mid-line is printed above it; the half line and cursor stay."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    child.send("hello wor")
    child.send("\x1b[D\x1b[D")  # cursor two to the left, before "or"
    child.expect("\x08\x08")
    bob.send({"type": "say", "text": "ping from bob"})
    child.expect("ping from bob")
    child.expect("> hello wor")  # redrawn below the message
    child.send("X")  # lands where the cursor was
    child.expect("Xor")
    lines = screen.lines()
    assert lines[-2].endswith("<bob> ping from bob")
    assert lines[-1] == "> hello wXor"
    assert screen.col == len("> hello wX")
    child.send("\r")
    assert bob.recv(T)["text"] == "hello wXor"  # sent whole
    child.send("exit\r")
    assert finish(child) == 0


def test_history_recalls_the_last_line(chat) -> None:
    """Issue B: line editing and history (up arrow) through readline."""
    bob, child = chat.bob, chat.child
    child.send("first line\r")
    assert bob.recv(T)["text"] == "first line"
    child.send("\x1b[A\r")
    assert bob.recv(T)["text"] == "first line"


@pytest.mark.parametrize("keys", ["exit\r", "/quit\r", "\x04", "half typed\x03"])
def test_leaving_exits_0(chat, keys: str) -> None:
    """Issue A: exit, /quit, Ctrl-D and Ctrl-C send `leave` and exit 0."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    child.send(keys)
    assert finish(child) == 0
    assert event(bob.recv(T)) == ("left", "alice", "leave")
    assert "Traceback" not in "\n".join(screen.lines())


def test_server_loss_exits_1(chat) -> None:
    """Issue A: the server goes away while the user types: one line, exit 1."""
    srv, child, screen = chat.srv, chat.child, chat.screen
    child.send("half")
    child.expect("half")
    srv.shutdown()
    assert finish(child) == 1
    lines = screen.lines()
    assert lines[-1] == "client.py: the server closed the connection (bye: shutdown)"
    assert lines[-2] == "> half"
    assert "Traceback" not in "\n".join(lines)


def test_help_and_unknown_commands(chat) -> None:
    """Issue B: /help lists commands; an unknown /command gets a hint and is not sent."""
    bob, child = chat.bob, chat.child
    child.send("/help\r")
    child.expect("/msg NAME TEXT")
    child.send("/nope hello\r")
    child.expect("unknown command /nope")
    child.send("@bob psst\r")
    got = bob.recv(T)
    assert (got["type"], got["text"]) == ("dm", "psst")  # the /nope line never left


def test_too_long_line_gets_a_hint(run_server, tmp_path: Path) -> None:
    with run_server(rate=0, max_text=8) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, _ = spawn(tmp_path, srv.address[1], "--name", "alice")
        child.expect("exit to leave")
        child.send("123456789\r")
        child.expect("split the line")
        child.send("exit\r")
        assert finish(child) == 0
        bob.recv(T)  # joined
        assert bob.recv(T)["type"] == "left"
        bob.close()


@pytest.mark.parametrize("no_color", [False, True])
def test_colours_on_a_terminal_unless_no_color(chat, run_server, tmp_path: Path, no_color) -> None:
    """Issue B: names in colour on a colour terminal; NO_COLOR turns colour off."""
    srv, bob = chat.srv, chat.bob
    extra = {"NO_COLOR": "1"} if no_color else {}
    carol, _ = spawn(tmp_path, srv.address[1], "--name", "carol", **extra)
    carol.expect("exit to leave")
    bob.send({"type": "say", "text": "colourful"})
    carol.expect("colourful")
    shown = carol.before
    carol.send("exit\r")
    assert finish(carol) == 0
    if no_color:
        assert not SGR.search(shown)
    else:
        assert re.search(r"<\x1b\[[0-9;]*mbob\x1b\[0m> ", shown)


def test_escape_sequences_are_neutralised(server_key, tmp_path: Path) -> None:
    """Issue B: control characters in names or text are shown escaped, never interpreted."""

    def hostile(conn: FakeConn) -> None:
        conn.send(protocol.message(1, "\x1b[2Jmallory", "hi \x1b]0;owned\x07 \x1b[31mred", 0))
        assert conn.recv() == [{"type": "leave"}]
        conn.send(protocol.bye("leave"))

    with FakeServer(server_key, hostile) as fake:
        child, screen = spawn(tmp_path, fake.port, "--name", "alice")
        child.expect("red")
        raw = child.before + "red"
        child.send("exit\r")
        assert finish(child) == 0
    assert "\x1b[2J" not in raw and "\x1b]0;" not in raw and "\x07" not in raw
    assert "\x1b[31mred" not in raw
    line = next(r for r in screen.lines() if "mallory" in r)
    assert line.endswith("<\\x1b[2Jmallory> hi \\x1b]0;owned\\x07 \\x1b[31mred")


def test_name_is_asked_and_asked_again_after_refusals(run_server, tmp_path: Path) -> None:
    """Issue A: no --name: the client asks; after an invalid or taken name it asks again."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, _ = spawn(tmp_path, srv.address[1])
        child.expect("your name: ")
        child.send("no spaces!\r")
        child.expect("not a valid name")
        child.expect("your name: ")
        child.send("BOB\r")
        child.expect("refused the name BOB")
        child.expect("your name: ")
        child.send("carol\r")
        child.expect("joined as .*carol")
        child.send("exit\r")
        assert finish(child) == 0
        # The refused attempts never joined: bob sees carol only.
        assert event(bob.recv(T)) == ("joined", "carol")
        assert event(bob.recv(T)) == ("left", "carol", "leave")
        bob.close()


def test_changed_fingerprint_refuses_with_exit_2(run_server, tmp_path: Path) -> None:
    """Issue B: a changed key is a loud refusal on the terminal too, before any name is sent."""
    with run_server(rate=0) as srv:
        pins = tmp_path / "pins"
        pins.write_text(f"127.0.0.1:{srv.address[1]} SHA256:{'A' * 43}\n")
        child, screen = spawn(
            tmp_path, srv.address[1], "--name", "alice", "--known-hosts", str(pins)
        )
        child.expect("HAS CHANGED")
        assert finish(child) == 2
        assert srv.fingerprint in "\n".join(screen.lines())


def test_plain_fallback_without_readline(chat, tmp_path: Path) -> None:
    """Issue B: where readline does not load, plain input() still chats and leaves cleanly."""
    srv, bob = chat.srv, chat.bob
    no_readline = (
        "import runpy, sys; sys.modules['readline'] = None; "
        f"sys.argv = ['client.py', '--port', '{srv.address[1]}', '--name', 'dave']; "
        f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')"
    )
    child = pexpect.spawn(
        sys.executable,
        ["-c", no_readline],
        env=client_env(tmp_path, TERM="xterm"),
        encoding="utf-8",
        timeout=T,
        dimensions=(ROWS, COLS),
    )
    child.expect("exit to leave")
    assert event(bob.recv(T)) == ("joined", "dave")
    bob.send({"type": "say", "text": "hello dave"})
    child.expect("hello dave")
    child.send("hi bob\r")
    assert bob.recv(T)["text"] == "hi bob"
    child.send("exit\r")
    assert finish(child) == 0
    assert event(bob.recv(T)) == ("left", "dave", "leave")
