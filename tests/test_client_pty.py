"""client.py on a pseudo-terminal (pexpect): what a person at the keyboard sees and does.

`Screen` is a tiny terminal emulator (the few sequences readline and the client
use), so tests check the screen, not the byte stream. The other users are
refpeer clients on the real server; hostile input comes from test_client's
FakeServer.
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from refpeer import RefIdentity, connect_and_join
from test_client import CLIENT, FakeConn, FakeServer, T, client_env, event, free_port

import protocol

ROWS, COLS = 24, 100
SGR = re.compile(r"\x1b\[[0-9;]*m")


def cell_width(ch: str) -> int:
    """Columns a character takes on a terminal: wide and fullwidth 2, marks and formats 0."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class Screen:
    """Applies terminal output to a grid: enough of an xterm for client.py's line editor.

    Like xterm: a wide character takes two cells and wraps whole when only one is left;
    writing the last column leaves the cursor there with the wrap pending until the next
    character (any cursor movement cancels it); a zero-width character joins the cell
    before it. `bells` counts BEL characters.
    """

    TOKEN = re.compile(r"\x1b\[([?0-9;]*)([@-~])|\x1b\][^\x07]*\x07|\x1b.|[\s\S]")

    def __init__(self, rows: int = ROWS, cols: int = COLS):
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0
        self.bells = 0

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
            self.col = max(0, min(self.col, self.cols - 1) - 1)
        elif ch == "\a":
            self.bells += 1
        elif ch >= " ":
            width = cell_width(ch)
            if width == 0:
                if self.col:
                    self.grid[self.row][min(self.col, self.cols) - 1] += ch
                return
            if self.col + width > self.cols:
                self.col = 0
                self._down()
            self.grid[self.row][self.col] = ch
            if width == 2:
                self.grid[self.row][self.col + 1] = ""
            self.col += width

    def _down(self) -> None:
        if self.row == self.rows - 1:
            self.grid.pop(0)
            self.grid.append([" "] * self.cols)
        else:
            self.row += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?") or final == "m":
            return  # private modes (bracketed paste and such), colours
        args = [int(a) if a else 0 for a in params.split(";")] if params else []
        n = max(1, args[0]) if args else 1
        self.col = min(self.col, self.cols - 1)  # a movement cancels a pending wrap
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
            self.col = min(self.cols, n) - 1
        elif final == "H":
            self.row = min(self.rows, n) - 1
            self.col = min(self.cols, max(1, args[1]) if len(args) > 1 else 1) - 1
        elif final == "K":
            line[self.col :] = [" "] * (self.cols - self.col)
        elif final == "J":
            first = 0 if args and args[0] in (2, 3) else self.row + 1
            if not (args and args[0] in (2, 3)):
                line[self.col :] = [" "] * (self.cols - self.col)
            for r in range(first, self.rows):
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


_spawned = itertools.count()


def spawn(
    tmp_path: Path, port: int, *args: str, cols: int = COLS, **env: str
) -> tuple[pexpect.spawn, Screen]:
    """The client on a terminal; each gets an identity of its own unless XDG_DATA_HOME is
    given (two clients proving one identity replace each other, §5)."""
    data = str(tmp_path / f"data-{next(_spawned)}")
    env = {"XDG_DATA_HOME": data, **env}
    child = pexpect.spawn(
        sys.executable,
        [str(CLIENT), "--port", str(port), *args],
        env=client_env(tmp_path, TERM="xterm", LC_ALL="C.UTF-8", **env),
        encoding="utf-8",
        timeout=T,
        dimensions=(ROWS, cols),
    )
    screen = Screen(ROWS, cols)
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
    assert wait_screen(child, screen, lambda _: screen.col == len("> hello w"), T)
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


@pytest.mark.parametrize(
    "keys",
    ["exit\r", "/quit\r", "/Q\r", "\x04", "\x03", "half typed\x03\x03", "ab\x01\x04\x04\x04"],
)
def test_leaving_exits_0(chat, keys: str) -> None:
    """Issue A, 15: exit, /quit, /q, Ctrl-D and Ctrl-C on an empty line send `leave` and exit
    0 (Ctrl-C first clears a draft; Ctrl-D inside a line deletes like a shell's)."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    child.send(keys)
    assert finish(child) == 0
    assert event(bob.recv(T)) == ("left", "alice", "leave")
    assert "Traceback" not in "\n".join(screen.lines())


def test_kicked_while_typing_exits_1(server_key, tmp_path: Path) -> None:
    """Issue A, §5: the chat ends for good while the user types: the draft stays on the
    screen, then one sentence in words (who, why), exit 1."""
    kicked = threading.Event()

    def kick(conn: FakeConn) -> None:
        kicked.wait(T)
        conn.send(protocol.bye("kicked", by="ana", message="off topic"))

    with FakeServer(server_key, kick) as fake:
        child, screen = spawn(tmp_path, fake.port, "--name", "alice", NO_COLOR="1")
        child.expect("exit to leave")
        child.send("half")
        child.expect("half")
        kicked.set()
        assert finish(child) == 1
    lines = screen.lines()
    assert lines[-1] == "client.py: you were kicked by ana: off topic"
    assert lines[-2] == "> half"
    assert "Traceback" not in "\n".join(lines)


def test_reconnects_keeping_the_draft(run_server, tmp_path: Path) -> None:
    """§6 Resume, issue 15: the server goes away while the user types: the prompt says it is
    reconnecting, the draft and the line history stay, a line typed meanwhile waits; when
    the server is back the client rejoins by itself and sends it."""
    port, state = free_port(), tmp_path / "state.db"
    with run_server(rate=0, port=port, state=state) as srv:
        child, screen = spawn(tmp_path, port, "--name", "alice", NO_COLOR="1")
        child.expect("exit to leave")
        child.send("earlier line\r")
        child.expect("<alice.?> earlier line")
        child.send("half")
        child.expect("half")
        srv.shutdown()
    child.expect("the server is shutting down; reconnecting")
    assert wait_screen(child, screen, lambda lines: "(reconnecting" in lines[-1], T)
    assert screen.lines()[-1].endswith("> half")
    child.send(" done\r")  # typed while away: shown, queued
    child.expect("sent once reconnected")
    with run_server(rate=0, port=port, state=state) as srv:
        bob, _ = connect_and_join("127.0.0.1", port, "bob")
        child.expect("reconnected as")
        assert bob.recv(T)["type"] == "joined"
        assert bob.recv(T)["text"] == "half done"
        child.send("\x1b[A")  # Up: the line history survived
        assert wait_screen(child, screen, lambda lines: lines[-1] == "> half done", T)
        child.send("\x1b[A")
        assert wait_screen(child, screen, lambda lines: lines[-1] == "> earlier line", T)
        child.send("\x03\x03")
        assert finish(child) == 0
        bob.close()


DOWN_S = 10.0  # issue 14: how long the server stays away


def test_server_down_ten_seconds_then_back(run_server, tmp_path: Path) -> None:
    """§6 Resume, issue 14: the server is down for 10 s, then back with its state: the
    client keeps its draft while it reconnects by itself, and what was said meanwhile is
    shown once, as is everything it had seen before (nothing twice)."""
    port, state = free_port(), tmp_path / "state.db"
    bob_id = RefIdentity()
    with run_server(rate=0, port=port, state=state) as srv:
        child, screen = spawn(tmp_path, port, "--name", "alice", NO_COLOR="1")
        child.expect("exit to leave")
        bob, _ = connect_and_join("127.0.0.1", port, "bob", identity=bob_id)
        bob.send({"type": "say", "text": "before the outage"})
        child.expect("before the outage")
        child.send("draft")
        child.expect("draft")
        bob.close()
        srv.shutdown()
    child.expect("reconnecting")
    time.sleep(DOWN_S)  # the outage itself: the client retries against a closed port
    with run_server(rate=0, port=port, state=state):
        bob, _ = connect_and_join("127.0.0.1", port, "bob", identity=bob_id)
        bob.send({"type": "say", "text": "said while you were away"})
        child.expect("reconnected as", timeout=35)  # the backoff is at most 30 s
        assert wait_screen(child, screen, lambda ls: "said while you were away" in "\n".join(ls), T)
        # the draft survived: the prompt is redrawn under the message (wait for that redraw)
        assert wait_screen(child, screen, lambda ls: ls[-1].endswith("> draft"), T), screen.lines()
        shown = "\n".join(screen.lines())
        assert shown.count("said while you were away") == 1, shown
        assert shown.count("before the outage") == 1, shown
        child.send("\x03\x03")
        assert finish(child) == 0
        bob.close()


def test_help_and_unknown_commands(chat) -> None:
    """Issue B: /help lists commands; an unknown /command gets a hint and is not sent."""
    bob, child = chat.bob, chat.child
    child.send("/help\r")
    child.expect("/msg NAME TEXT")
    child.send("/nope hello\r")
    child.expect("unknown command /nope")
    child.send("/msg bob psst\r")
    got = bob.recv(T)
    assert (got["type"], got["text"]) == ("dm", "psst")  # the /nope line never left


def test_too_long_line_gets_a_hint(run_server, tmp_path: Path) -> None:
    with run_server(rate=0, max_text=8) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, _ = spawn(tmp_path, srv.address[1], "--name", "alice")
        child.expect("exit to leave")
        child.send("123456789\r")
        child.expect("takes at most 8")
        child.expect("> 123456789")  # given back to edit
        child.send("\x03exit\r")
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
        child, screen = spawn(tmp_path, srv.address[1])
        child.expect("your name: ")
        child.send("no spaces!\r")
        child.expect("contains the character U\\+0020 SPACE; try another")
        child.expect("your name: ")
        child.send("BOB\r")
        child.expect("the name BOB is taken; try another")
        child.expect("your name: ")
        child.send("carol\r")
        child.expect("joined as .*carol")
        child.expect("exit to leave")
        settle(child)
        assert screen.lines()[-1] == ">"  # the chat's prompt, not the name's
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


def test_no_readline_needed(chat, tmp_path: Path) -> None:
    """Issue B: the line editor is the client's own: without readline it chats all the same."""
    srv, bob = chat.srv, chat.bob
    no_readline = (
        "import runpy, sys; sys.modules['readline'] = None; "
        f"sys.argv = ['client.py', '--port', '{srv.address[1]}', '--name', 'dave']; "
        f"runpy.run_path({str(CLIENT)!r}, run_name='__main__')"
    )
    child = pexpect.spawn(
        sys.executable,
        ["-c", no_readline],
        env=client_env(tmp_path, TERM="xterm", XDG_DATA_HOME=str(tmp_path / "dave")),
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


def settle(child: pexpect.spawn, quiet_s: float = 0.3) -> None:
    """Read until the client has written nothing for `quiet_s` (the screen is then final)."""
    while True:
        try:
            child.read_nonblocking(65536, timeout=quiet_s)
        except pexpect.TIMEOUT:
            return


def test_wide_characters_that_wrap_are_redrawn_without_stale_rows(run_server, tmp_path) -> None:
    """Issue 15 bug 2: at 40 columns, 30 CJK characters typed (62 columns with the prompt, two
    rows) stay exactly two rows when messages arrive: the editor counts display columns (wide
    = 2), not characters, so it erases both rows before printing above them."""
    typed = "漢字" * 15
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, screen = spawn(tmp_path, srv.address[1], "--name", "alice", cols=40)
        child.expect("exit to leave")
        assert event(bob.recv(T)) == ("joined", "alice")
        child.send(typed)
        child.expect("漢字漢字")
        settle(child)
        for text in ("first news", "second news"):
            bob.send({"type": "say", "text": text})
            child.expect(text)
        settle(child)
        lines = screen.lines()
        assert lines[-4].endswith("<bob> first news") and lines[-3].endswith("<bob> second news")
        assert lines[-2:] == ["> " + typed[:19], typed[19:]]
        stale = [line for line in lines if line.startswith("> " + typed[:4])]
        assert len(stale) == 1, lines  # no stale copy of the first row
        child.send("\r")
        assert bob.recv(T)["text"] == typed
        child.close(force=True)
        bob.close()


FORKING_CLIENT = """
import os, runpy, sys
client = runpy.run_path(sys.argv[1])  # imports paid once; each run is a fork
for i in range(int(sys.argv[2])):
    print(f"run {i}", flush=True)
    pid = os.fork()
    if pid == 0:
        os._exit(client["main"](sys.argv[3:]))
    os.waitpid(pid, 0)
print("all runs done", flush=True)
"""


def test_prompt_survives_a_notice_right_after_welcome(server_key, tmp_path: Path) -> None:
    """Issue 15 bug 3: a `joined` arriving within milliseconds of `welcome` is printed above
    the prompt, never on it: the prompt is on the last row after every one of 50 starts.
    (Each start is a fork of one process that imported the client once, so 50 are cheap.)"""
    runs = 50
    delays = iter([i / 5_000 for i in range(runs)])  # 0 to 9.8 ms behind welcome

    def notice_at_once(conn: FakeConn) -> None:
        time.sleep(next(delays))
        conn.send(protocol.joined("bob"))  # its own record, right behind welcome
        assert conn.recv() == [{"type": "leave"}]
        conn.send(protocol.bye("leave"))

    with FakeServer(server_key, notice_at_once) as fake:
        argv = ["--port", str(fake.port), "--name", "alice"]
        child = pexpect.spawn(
            sys.executable,
            ["-c", FORKING_CLIENT, str(CLIENT), str(runs), *argv],
            env=client_env(tmp_path, TERM="xterm", LC_ALL="C.UTF-8", NO_COLOR="1"),
            encoding="utf-8",
            timeout=T,
            dimensions=(ROWS, COLS),
        )
        child.delaybeforesend = None
        screen = Screen()
        child.logfile_read = screen
        lost = []
        for i in range(runs):
            child.expect(f"run {i}\r\n")
            child.expect("bob joined")
            if not wait_screen(child, screen, lambda lines: lines[-1] == ">", 1.0):
                lost.append((i, screen.lines()[-3:]))
            child.send("exit\r")
            child.expect("left")
        child.expect("all runs done")
        assert finish(child) == 0
    assert not lost, f"prompt lost in {len(lost)} of {runs} starts: {lost[:3]}"


def wait_screen(child: pexpect.spawn, screen: Screen, ok, timeout: float) -> bool:
    """Read output until `ok(screen.lines())` holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not ok(screen.lines()):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            child.read_nonblocking(65536, timeout=min(left, 0.05))
        except pexpect.TIMEOUT:
            pass
    return True


def test_lines_typed_faster_than_the_rate_show_once_each(run_server, tmp_path: Path) -> None:
    """Issue 15 bug 7: with the server at --rate 1, lines typed quickly are each shown once
    (as sent lines, above the prompt) while the client paces them, never echoed bare first."""
    with run_server(rate=1) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, screen = spawn(tmp_path, srv.address[1], "--name", "alice", NO_COLOR="1")
        child.expect("exit to leave")
        assert event(bob.recv(T)) == ("joined", "alice")
        child.send("line one\r")
        assert bob.recv(T)["text"] == "line one"  # the one token of the burst is spent
        child.send("line two\r")  # waits ~1.1 s for a token ...
        time.sleep(0.2)  # ... a window no event marks on the old client: type inside it
        child.send("line three\r")
        assert [bob.recv(2 * T)["text"] for _ in range(2)] == ["line two", "line three"]
        settle(child)
        lines = screen.lines()
        for text in ("line one", "line two", "line three"):
            assert sum(text in line for line in lines) == 1, lines
        assert lines[-1] == ">", lines
        child.close(force=True)
        bob.close()


def test_mention_is_highlighted_and_rings(chat) -> None:
    """Issue 15: a message naming me (whole word, any case) or a dm is highlighted and rings
    the bell; a name inside another word does not; /bell off silences it."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    bob.send({"type": "say", "text": "nothing for alicex here"})
    child.expect("alicex here")
    assert screen.bells == 0
    bob.send({"type": "say", "text": "hey ALICE, look"})
    child.expect("look")
    assert "\x1b[1;33mhey ALICE, look\x1b[0m" in child.before + "look\x1b[0m"
    assert wait_screen(child, screen, lambda _: screen.bells == 1, T)
    bob.send({"type": "dm", "to": "alice", "text": "psst"})
    child.expect("psst")
    assert wait_screen(child, screen, lambda _: screen.bells == 2, T)
    child.send("/bell off\r")
    child.expect("the bell rings for nothing")
    bob.send({"type": "say", "text": "alice again"})
    child.expect("alice again")
    settle(child)
    assert screen.bells == 2
    assert screen.lines()[-1] == ">"


def test_no_bell_flag(run_server, tmp_path: Path) -> None:
    """Issue 15: --no-bell: a mention is still highlighted, but nothing rings."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        child, screen = spawn(tmp_path, srv.address[1], "--name", "alice", "--no-bell")
        child.expect("exit to leave")
        bob.recv(T)  # joined
        bob.send({"type": "say", "text": "alice?"})
        child.expect("alice\\?")
        settle(child)
        assert screen.bells == 0
        child.close(force=True)
        bob.close()


def test_tab_completes_names_and_commands(chat) -> None:
    """Issue 15: Tab completes a name (at the start of the line with ': ', after @ or /msg
    with a space) and commands; it never inserts a tab; a second Tab lists candidates."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    carol, _ = connect_and_join(*chat.srv.address, "carol")
    assert wait_screen(child, screen, lambda lines: lines[-2].endswith("carol joined"), T)
    assert event(bob.recv(T)) == ("joined", "carol")
    child.send("b\t")
    assert wait_screen(child, screen, lambda lines: lines[-1] == "> bob:", T)
    child.send("hi @c\t")
    assert wait_screen(child, screen, lambda lines: lines[-1] == "> bob: hi @carol", T)
    child.send("x\t\t\r")  # nothing starts with x: no tab inserted
    assert bob.recv(T)["text"] == "bob: hi @carol x"
    child.send("/MS\tbo\tpsst\r")
    got = bob.recv(T)
    assert (got["type"], got["text"]) == ("dm", "psst")
    child.send("/q")
    child.send("\t\t")  # /q, /query, /quit: a second Tab lists them
    child.expect("/query  /quit")
    child.send("\x03/cle\t")
    assert wait_screen(child, screen, lambda lines: lines[-1] == "> /clear", T)
    child.send("\x03")
    carol.close()


def test_ctrl_c_clears_a_draft(chat) -> None:
    """Issue 15: Ctrl-C on a typed line clears it, like a shell, and sends nothing; the
    client stays; the next line goes out alone."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    child.send("a draft I regret")
    child.expect("regret")
    child.send("\x03")
    assert wait_screen(child, screen, lambda lines: lines[-1] == ">", T)
    child.send("instead\r")
    assert bob.recv(T)["text"] == "instead"


def test_own_lines_are_shown_like_everyones(chat) -> None:
    """Issue 15: once sent, the typed line becomes `[hh:mm:ss] <alice> text`; a dm shows as
    `[dm → bob] text`; the prompt stays below."""
    bob, child, screen = chat.bob, chat.child, chat.screen
    child.send("hello all\r")
    assert bob.recv(T)["text"] == "hello all"
    child.send("/msg bob just you\r")
    assert bob.recv(T)["text"] == "just you"
    assert wait_screen(child, screen, lambda lines: "just you" in lines[-2], T)
    lines = screen.lines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] <alice✓> hello all", lines[-3])  # verified
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] \[dm → bob\] just you", lines[-2])
    assert lines[-1] == ">"
    assert not any(line.startswith("> hello") for line in lines)


def test_clear_command_clears_the_screen(chat) -> None:
    """Issue 15: /clear empties the screen and leaves the prompt at the top."""
    child, screen = chat.child, chat.screen
    child.send("/clear\r")
    assert wait_screen(child, screen, lambda lines: lines == [">"], T)


def test_changed_key_is_said_before_the_name_is_asked(run_server, tmp_path: Path) -> None:
    """Issue 15: the client connects first, so a changed server key is refused (exit 2)
    before anyone types a name."""
    with run_server(rate=0) as srv:
        pins = tmp_path / "pins"
        pins.write_text(f"127.0.0.1:{srv.address[1]} SHA256:{'A' * 43}\n")
        child, screen = spawn(tmp_path, srv.address[1], "--known-hosts", str(pins))
        child.expect("HAS CHANGED")
        assert finish(child) == 2
    assert "your name:" not in "\n".join(screen.lines())


def test_refused_connection_is_said_before_the_name_is_asked(tmp_path: Path) -> None:
    """Issue 15: no server: one sentence and exit 1, without asking for a name first."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    child, screen = spawn(tmp_path, port)
    child.expect("cannot connect")
    assert finish(child) == 1
    assert "your name:" not in "\n".join(screen.lines())


def test_verified_names_are_marked(run_server, tmp_path: Path) -> None:
    """§5: a name whose join carried a proven identity is marked ✓; a guest's is not;
    someone already here (welcome has no identities) is marked once /whois shows one."""
    with run_server(rate=0) as srv:
        dave, _ = connect_and_join(*srv.address, "dave", identity=RefIdentity())
        child, _ = spawn(tmp_path, srv.address[1], "--name", "alice", NO_COLOR="1")
        child.expect("exit to leave")
        bob, _ = connect_and_join(*srv.address, "bob", identity=RefIdentity())
        carol, _ = connect_and_join(*srv.address, "carol")
        bob.send({"type": "say", "text": "proven"})
        child.expect("<bob✓> proven")
        carol.send({"type": "say", "text": "guest here"})
        child.expect("<carol> guest here")
        dave.send({"type": "say", "text": "not yet"})
        child.expect("<dave> not yet")
        child.send("/whois dave\r")
        child.expect("dave✓: identity SHA256:")
        dave.send({"type": "say", "text": "now marked"})
        child.expect("<dave✓> now marked")
        child.close(force=True)
        for peer in (bob, carol, dave):
            peer.close()


def test_history_is_set_apart_on_a_terminal(run_server, tmp_path: Path) -> None:
    """§6: on a terminal the client asks for the latest 50 kept messages and shows them
    between `--- history ---` and `--- live ---`."""
    with run_server(rate=0) as srv:
        bob, _ = connect_and_join(*srv.address, "bob")
        bob.send({"type": "say", "text": "earlier one"})
        bob.send({"type": "say", "text": "earlier two"})
        child, screen = spawn(tmp_path, srv.address[1], "--name", "alice", NO_COLOR="1")
        child.expect("--- live ---")
        lines = screen.lines()
        at = lines.index("--- history ---")
        assert lines[at + 1].endswith("<bob> earlier one")
        assert lines[at + 2].endswith("<bob> earlier two")
        assert lines[at + 3] == "--- live ---"
        child.close(force=True)
        bob.close()


def test_help_shows_operator_commands_to_operators_only(run_server, tmp_path: Path) -> None:
    """§5: /help lists /kick, /ban, ... only when welcome says we are an operator."""
    op_data = tmp_path / "op-data"
    shown = subprocess.run(
        [sys.executable, str(CLIENT), "--show-identity"],
        capture_output=True,
        text=True,
        timeout=T,
        env=client_env(tmp_path, XDG_DATA_HOME=str(op_data)),
    ).stdout.strip()
    with run_server(rate=0, ops=(shown,)) as srv:
        op, _ = spawn(tmp_path, srv.address[1], "--name", "ana", XDG_DATA_HOME=str(op_data))
        op.expect("exit to leave")
        op.send("/help\r")
        op.expect("operator commands:")
        op.expect("/mute NAME MINUTES")
        guest, screen = spawn(tmp_path, srv.address[1], "--name", "bo", "--guest")
        guest.expect("exit to leave")
        guest.send("/help\r")
        guest.expect("Ctrl-L redraws")
        assert "operator commands" not in "\n".join(screen.lines())
        op.close(force=True)
        guest.close(force=True)
