"""The chat on the main thread: typed lines to messages and commands, and leaving.

`Chat` is the conversation across connections. It reads lines (from the `Console`
or the `Pipe`) on the main thread, turns each into a message for the outbox, a
command, or a sentence saying why not; and it leaves: politely (`leave`, what still
waits sent first), or with the error that ended the chat. What it needs besides:
  * `feed.Feed` — the network thread: shows what arrives, keeps who is here, recovers
    a lost connection or ends the chat;
  * `link.Link` — the joined session across reconnects, and the sender thread that
    takes the outbox to it, paced.
Threads: main (here), network (Feed), sender (Link), and the session's reader and
keepalive. Each lock is its owner's (see those modules); the only nesting is
Tab's: under `Console._lock`, `Feed._lock` (the names) and then `Link._lock` (am I
an operator), one after the other.
"""

from __future__ import annotations

import signal
from typing import Any

from commands import BELL_WORDS, complete, help_rows, parse_line
from console import PROMPT, Console, Pipe, Woken, signals_handled
from display import Line
from errors import EXIT_OK, ClientError
from feed import Feed
from link import OUTBOX_LINES, Link, Outbox
from protocol import (
    MAX_REASON_BYTES,
    Ban,
    Bans,
    ClientMessage,
    Dm,
    Kick,
    Mute,
    Say,
    Unban,
    Who,
    Whois,
    text_problem,
    utf8_size,
)
from session import BYE_WAIT_S, Joiner, Session
from view import Style

DRAIN_WAIT_S = 5.0  # on /quit, how long lines still waiting for a rate token may take


class Chat:
    """The conversation: reads lines on the main thread and acts on each, until leaving."""

    def __init__(
        self,
        io: Console | Pipe,
        style: Style,
        joiner: Joiner,
        session: Session,
        bell: str,
        follow: bool = False,
    ):
        self.io = io
        self.style = style
        self.follow = follow
        self.outbox = Outbox(OUTBOX_LINES)
        self.link = Link(joiner, session, self.outbox, self.status, self._waiting, io.interactive)
        self.feed = Feed(io, style, self.link, bell)
        self.name = self.link.name
        self.lines = 0  # non-empty lines read (a pipe reports what was not delivered)
        self.refused = 0  # lines refused here, before sending

    def run(self) -> int:
        """Chat until the user leaves (0), the input ends (pipe: 0, or 1 if a line was not
        delivered) or the chat ends otherwise (ClientError)."""
        welcome = self.link.welcome
        others = ", ".join(self.style.name(n) for n in welcome.users) or "nobody else yet"
        self.status(f"joined as {self.style.name(self.name)}; here: {others}")
        self._say_identity()
        if self.io.interactive:
            self.status("type /help for commands, exit to leave")
            self._prompt(PROMPT)  # after "your name: ", if the name was asked
        else:
            self.io.watch_stdout()
        self.link.start()
        self.feed.start()
        leave = lambda signum, frame: self.io.wake("leave")  # noqa: E731 - no lock, a wake-up
        with signals_handled((signal.SIGINT, signal.SIGTERM), leave):  # leave politely, exit 0
            return self._input_loop()

    def _say_identity(self) -> None:
        fp = self.link.welcome.identity
        if fp and self.io.interactive:
            self.status(f"your identity {fp} is verified by the server")
        elif self.link.joiner.identity is not None and not fp:
            self.status("this server does not verify identities (revision 1): joined as a guest")

    def _input_loop(self) -> int:
        now = False  # leave without sending what still waits (a signal, stdout gone)
        while True:
            try:
                line = self.io.read_line(None, self.complete)
            except Woken as woken:
                now = woken.reason != "end"
                break
            if line is None:
                if self.follow and not self.io.interactive:
                    now = self._follow()
                break
            if not self.handle(line):
                break
        return self._finish(now)

    def _follow(self) -> bool:
        """--follow: the input ended; show what arrives until the chat ends (False) or a
        signal or a closed stdout asks to leave (True)."""
        self.outbox.drain(None, self._stopping)
        assert isinstance(self.io, Pipe)
        return self.io.wait_woken() != "end"

    def _finish(self, now: bool) -> int:
        self.outbox.close()
        if self.feed.end is None and not now:
            wait = None if not self.io.interactive else DRAIN_WAIT_S
            self.outbox.drain(wait, give_up=self._stopping)
        session = self.link.stop()
        if self.feed.end is not None:
            self._close_input(keep=True)
            raise self.feed.end
        session.leave()
        self.feed.join(BYE_WAIT_S)  # every error comes before the server's bye
        self._close_input(keep=False)
        # errors answer lines: a stray one is not counted
        failed = min(self.refused + self.feed.errors, self.lines)
        if self.io.interactive:
            self.status("left")
        elif failed:
            raise ClientError(f"{failed} of {self.lines} lines were not delivered")
        return EXIT_OK

    def _stopping(self) -> bool:
        """The chat ended, or a signal or a closed stdout asks to leave now."""
        return self.feed.end is not None or self.io.reason in ("leave", "stdout")

    def _close_input(self, keep: bool) -> None:
        if isinstance(self.io, Console):
            self.io.finish(keep)

    def handle(self, line: str) -> bool:
        """Act on one typed line; False when it asks to leave."""
        cmd = parse_line(line)
        kind = cmd[0]
        if kind == "skip":
            return True
        self.lines += 1
        if kind == "quit":
            return False
        if kind == "hint":
            self._refuse(cmd[1])
        elif kind == "help":
            for row in help_rows(self.link.welcome.op):
                self.io.show(Line(row, 26, status=True))
        elif kind == "clear":
            if isinstance(self.io, Console):
                self.io.clear()
        elif kind == "bell":
            self.feed.bell = cmd[1]
            self.status(f"the bell rings for {BELL_WORDS[cmd[1]]}")
        elif kind in ("say", "dm", "action"):
            self._say(cmd)
        else:
            self._command(cmd)
        return True

    def _command(self, cmd: tuple[Any, ...]) -> None:
        """who, whois and the operator commands (§5): sent as they are; the server checks."""
        kind = cmd[0]
        feature = "moderation" if kind != "who" and kind != "whois" else "identity"
        if kind != "who" and feature not in self.link.welcome.features:
            self._refuse(f"this server does not support /{kind}")
            return
        if kind in ("kick", "ban") and cmd[-1] is not None:
            problem = text_problem(cmd[-1], "reason")
            if problem or utf8_size(cmd[-1]) > MAX_REASON_BYTES:
                self._refuse(problem or f"a reason is at most {MAX_REASON_BYTES} bytes")
                return
        msg = {
            "who": lambda: Who(),
            "whois": lambda: Whois(cmd[1]),
            "kick": lambda: Kick(cmd[1], cmd[2]),
            "ban": lambda: Ban(cmd[1], cmd[2], cmd[3]),
            "unban": lambda: Unban(cmd[1]),
            "bans": lambda: Bans(),
            "mute": lambda: Mute(cmd[1], cmd[2]),
        }[kind]()
        self._queue(msg)

    def _say(self, cmd: tuple[Any, ...]) -> None:
        kind, text = cmd[0], cmd[-1]
        welcome = self.link.welcome
        if kind == "action" and "action" not in welcome.features:
            self._refuse("this server does not support /me", cmd[1])
            return
        size = utf8_size(text)
        problem = text_problem(text)
        line = text if kind != "dm" else f"/msg {cmd[1]} {text}"
        if size > welcome.max_text:
            limit = welcome.max_text
            self._refuse(f"not sent: {size} bytes, the server takes at most {limit}", line)
            return
        if problem:
            self._refuse(f"not sent: the {problem}", line)
            return
        msg: Say | Dm = Dm(cmd[1], text) if kind == "dm" else Say(text, action=kind == "action")
        if self._queue(msg, line) and self.io.interactive:
            self.feed.show(self.style.own(msg))
            if self.link.offline_notice():
                self.status("not connected: what you type is sent once reconnected")

    def _queue(self, msg: ClientMessage, line: str | None = None) -> bool:
        if self.outbox.put(msg, not self.io.interactive, self._stopping):
            return True
        self._refuse(f"not sent: {len(self.outbox)} lines are still waiting to go out", line)
        return False

    def _refuse(self, why: str, line: str | None = None) -> None:
        """A line that was not sent: say why; on a terminal, give a text `line` back to edit
        (a refused command is not: it is short, and its hint says how to type it)."""
        self.refused += 1
        self.io.show(self.style.problem(why))
        if isinstance(self.io, Console) and line is not None:
            self.io.put_back(line)

    def status(self, text: str) -> None:
        self.io.show(self.style.status(text))

    def complete(self, before: str) -> tuple[str, list[str]]:
        """Tab (called by the console under its lock): names of the others here, commands."""
        others = [u for u in self.feed.users() if u != self.name]
        return complete(before, others, self.link.welcome.op)

    def _prompt(self, prompt: str) -> None:
        if isinstance(self.io, Console):
            self.io.set_prompt(prompt)

    def _waiting(self, note: str | None) -> None:
        """The link reconnecting ("reconnecting in 3 s"), or connected again (None)."""
        self._prompt(f"({note}) {PROMPT}" if note else PROMPT)
