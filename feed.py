"""The chat's network thread: what arrives, shown; a lost connection, recovered or final.

`Feed` runs the thread that takes each message the session received and shows it
(through `view.Style`), after the date rule when the day changed, between
`--- history ---` and `--- live ---` when it is replayed history (§6), ringing the
bell as /bell says. It keeps who is here (Tab completes their names) and who proved
an identity (§5). When the connection is lost it asks the `link.Link` to recover,
or ends the chat: `end` then says why, and the main thread is woken.

`Feed._lock` guards the user list and the error count, which the main thread reads;
it may be taken under `Console._lock` (Tab), never the other way round.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

from console import Console, Pipe
from display import Line
from errors import ClientError, ConnectionLost
from link import Link
from protocol import (
    DirectMessage,
    Error,
    Joined,
    Left,
    Message,
    ServerMessage,
    Users,
    WhoisInfo,
    name_key,
)
from view import Style, clock_time, day_of, day_rule

REPLAY_IDLE_S = 0.3  # replayed history then nothing for this long: the live part begins


class Feed:
    """Shows what the session receives, on the chat's network thread; `bell` is /bell's."""

    def __init__(self, io: Console | Pipe, style: Style, link: Link, bell: str):
        welcome = link.welcome
        self.io, self.style, self.link = io, style, link
        self.name = welcome.name
        self.bell = bell  # off, mentions or all; /bell sets it from the main thread
        self._lock = threading.Lock()  # guards the (lock) fields
        self._users = {name_key(n): n for n in welcome.users}  # (lock) who is here
        self._errors = 0  # (lock) errors answering what I sent
        self._since = welcome.last_id  # the highest id seen: where a resume starts (§6)
        self._replaying = False  # showing messages marked history
        self._day = day_of(None)  # the date of the last timed line (the date rule)
        self._end: ClientError | None = None  # why the chat ended, if not by leaving
        style.me = self.name
        style.verified = {name_key(self.name)} if welcome.identity else set()
        self._thread = threading.Thread(target=self._loop, name="bcast-network", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def end(self) -> ClientError | None:
        """Why the chat ended (a loss it could not recover from, or a bug), once it has."""
        return self._end

    @property
    def errors(self) -> int:
        """How many `error`s answered what I sent (a pipe counts them as undelivered)."""
        with self._lock:
            return self._errors

    def users(self) -> list[str]:
        """The names of everyone here, for Tab, sorted case-insensitively."""
        with self._lock:
            return sorted(self._users.values(), key=str.casefold)

    def _loop(self) -> None:
        try:
            while True:
                wait = REPLAY_IDLE_S if self._replaying else None
                try:
                    msg = self.link.session.recv(timeout=wait)
                except queue.Empty:
                    self._end_replay()
                    continue
                except ConnectionLost as exc:
                    if self.link.stopped or not self._recover(exc):
                        return
                    continue
                self.on_message(msg)
        except BaseException as exc:  # a bug must not leave the user staring at a dead chat
            self._stop(ClientError(f"unexpected error: {type(exc).__name__}: {exc}"))

    def _stop(self, why: ClientError) -> None:
        self._end = why
        self.link.stop()
        self.io.wake("end")

    def _recover(self, lost: ConnectionLost) -> bool:
        """After a lost connection: reconnected (True), or the chat ends (False) after a
        `bye` that forbids it (§6) or a failure that another try cannot mend."""
        if not self.link.resumable(lost):
            self._stop(lost)
            return False
        self._end_replay()
        try:
            welcome = self.link.recover(lost, self._since)
        except ClientError as exc:
            self._stop(exc)
            return False
        if welcome is None:  # the user left meanwhile
            return False
        with self._lock:
            self._users = {name_key(n): n for n in welcome.users}
        self._status(f"reconnected as {self.style.name(welcome.name)}")
        if welcome.gap:
            self._status("some messages were missed: the server no longer keeps them")
        return True

    def on_message(self, msg: ServerMessage) -> None:
        """Show one message (if it is one to show) and note what it says about who is here."""
        if isinstance(msg, (Message, DirectMessage)):
            self._since = max(self._since, msg.id)
        if isinstance(msg, Message) and msg.history:
            if msg.sender == self.name and self.link.take_sent(msg.text):
                return  # a replayed say of mine, shown when I typed it (§6: drop it)
            if not self._replaying:
                self._replaying = True
                self._rule("--- history ---")
        elif self._replaying:
            self._end_replay()
        if isinstance(msg, (Joined, Left, Users, WhoisInfo)):
            self._track(msg)
        if isinstance(msg, Error):
            with self._lock:
                self._errors += 1
        line = self.style.format(msg)
        if line is None:
            return
        if self._rings(msg):
            line = replace(line, bell=True)
        self.show(line)

    def show(self, line: Line) -> None:
        """Show a line, after a date rule when its date is not the last one shown."""
        if self.io.interactive and line.ts is not None:
            day = day_of(line.ts)
            if day is not None and day != self._day:
                self._day = day
                when = clock_time(line.ts)
                if when is not None:
                    self.io.show(Line(self.style.paint(day_rule(when), "2")))
        self.io.show(line)

    def _status(self, text: str) -> None:
        self.io.show(self.style.status(text))

    def _end_replay(self) -> None:
        if self._replaying:
            self._replaying = False
            self._rule("--- live ---")

    def _rule(self, text: str) -> None:
        self.io.show(Line(self.style.paint(text, "2"), status=not self.io.interactive))

    def _rings(self, msg: ServerMessage) -> bool:
        """/bell: off; mentions (a message naming me, or a dm); all (every message too).
        Replayed history never rings."""
        if self.bell == "off" or not isinstance(msg, (Message, DirectMessage)):
            return False
        if isinstance(msg, Message) and msg.history:
            return False
        return self.bell == "all" or isinstance(msg, DirectMessage) or self.style.mentions(msg.text)

    def _track(self, msg: Joined | Left | Users | WhoisInfo) -> None:
        """Who is here (for Tab), and who proved an identity (marked ✓)."""
        verified = self.style.verified
        with self._lock:
            if isinstance(msg, Joined):
                self._users[name_key(msg.name)] = msg.name
                if msg.identity:
                    verified.add(name_key(msg.name))
                else:
                    verified.discard(name_key(msg.name))
            elif isinstance(msg, Left):
                self._users.pop(name_key(msg.name), None)
                verified.discard(name_key(msg.name))
            elif isinstance(msg, Users):
                self._users = {name_key(n): n for n in msg.names}
            elif msg.identity:
                verified.add(name_key(msg.name))
