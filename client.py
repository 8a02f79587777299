"""bcast/1 chat client: the chat, on a network session and a terminal (PROTOCOL.md).

Moved out so far: `session.py` (one connection: handshake, records, the bounded
inbox; `Joiner`), `known_hosts.py` (pins), `console.py` (`Console`, the terminal
with its line editor, and `Pipe`), `lineedit.py` (keys and the edited line, pure),
`display.py` (escaping, display width, wrapping, `Line`), `errors.py` (every
failure and its exit status). `Chat` is the conversation: it shows what arrives,
turns typed lines into messages and sends them from its own thread, paced to the
server's rate.

Threads: the main thread reads input and hands each line to `Chat.handle`;
the chat's network thread shows what the session receives; its sender thread
sends queued lines; the session's reader and keepalive threads. Locks, never
two at once except Console._lock then Chat._lock (Tab completion reads the
user list): `Session._send_lock` guards the send counter and the socket's
writes (seal and send together, so counter order is wire order);
`Console._lock` guards the screen and the input line, and every write to the
terminal happens under it, so a message cannot land on the prompt;
`Outbox._cond` guards the lines waiting to be sent; `Chat._lock` guards the
user list and the counters the network and main threads share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from protocol import (
    MAX_CLIENT_RECORD_MESSAGES,
    MAX_MINUTES,
    MAX_REASON_BYTES,
    Ban,
    BanList,
    Bans,
    ClientMessage,
    DirectMessage,
    Dm,
    Error,
    Joined,
    Kick,
    Left,
    Message,
    Mute,
    Muted,
    Say,
    ServerMessage,
    Unban,
    Users,
    Welcome,
    Who,
    Whois,
    WhoisInfo,
    encode_client_message,
    has_lone_surrogate,
    name_key,
    name_problem,
    text_problem,
    utf8_size,
)

# The one third-party package (pycryptodome, imported by crypto_utils) is checked before
# any module that imports it: a terminal without the venv gets one sentence saying what to
# do instead of a ModuleNotFoundError traceback.
try:
    from crypto_utils import (
        CryptoError,
        identity_fingerprint,
        identity_public,
        load_or_create_identity,
    )
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "Crypto":
        raise
    sys.stderr.write(
        f"client.py: the Python package pycryptodome is missing (no module named "
        f"{exc.name!r}); install it with `python3 -m pip install -r requirements.txt`, or "
        "use the project's venv: `. .venv/bin/activate` in each new terminal, or run "
        "`.venv/bin/python client.py`\n"
    )
    sys.exit(2)

from console import PROMPT, Console, Pipe, Woken
from display import Line, sanitize, text_width
from errors import (
    EXIT_LOST,
    EXIT_OK,
    ClientError,
    ConnectionLost,
    JoinRefused,
    NameRefused,
    ServerFault,
    TrustError,
    UsageError,
)
from known_hosts import (
    FINGERPRINT_RE,
    KnownHosts,
    check_pin,
    default_known_hosts,
    host_key,
    parse_host_key,
)
from session import (
    BYE_WAIT_S,
    Joiner,
    Session,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
# A connection opened this long ago is not used for a join: the server's handshake timeout
# (10 s) counts from the TCP accept, and the name may take a person a while to type.
JOIN_FRESH_S = 6.0
DRAIN_WAIT_S = 5.0  # on /quit, how long lines still waiting for a rate token may take
OUTBOX_LINES = 100  # typed but not sent yet; past it a pipe waits, a person is told
RECONNECT_FIRST_S = 1.0  # §6 Resume: the first wait after a lost connection, doubled each try
RECONNECT_MAX_S = 30.0  # ... up to this
RECONNECT_GIVE_UP_S = 300  # a pipe (a script) gives up after this long without a connection
REPLAY_IDLE_S = 0.3  # replayed history then nothing for this long: the live part begins
HISTORY_DEFAULT = 50  # earlier messages shown on joining, on a terminal (a pipe: none)
MAX_HISTORY = 1_000_000  # --history past this is a typo
NAME_PROMPT = "your name: "
BELL_MODES = ("off", "mentions", "all")


_NAME_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)

# §4 and §5 reasons in plain words, never the codes themselves.
LEFT_WORDS = {
    "leave": "left",
    "disconnect": "left (connection lost)",
    "timeout": "left (silent too long)",
    "slow": "left (could not keep up)",
    "protocol": "left (protocol error)",
    "kicked": "was kicked",
    "banned": "was banned",
    "not_allowed": "left (no longer allowed here)",
    "replaced": "left (joined again elsewhere)",
}


def clock_time(ts_ms: int | None = None) -> time.struct_time | None:
    try:
        return time.localtime(None if ts_ms is None else ts_ms / 1000)
    except (OverflowError, OSError, ValueError):
        return None


def day_rule(when: time.struct_time) -> str:
    """`--- Saturday 5 December 2026 ---`: shown when the date changes."""
    return f"--- {time.strftime('%A', when)} {when.tm_mday} {time.strftime('%B %Y', when)} ---"


class Style:
    """Formats what is shown; colour codes only when asked; `me` is who mentions ring for."""

    def __init__(self, colour: bool, me: str = "", multiline: bool = False):
        self.colour = colour
        self.multiline = multiline  # a terminal: newlines kept (wrapped); a pipe: escaped
        self.me = me
        # name_key of everyone whose join (or whois) carried a proven identity (§5): marked
        # with a check on a terminal. The chat's network thread adds and removes them.
        self.verified: set[str] = set()

    @property
    def me(self) -> str:
        return self._me

    @me.setter
    def me(self, name: str) -> None:
        self._me = name
        key = re.escape(name_key(name)) if name else "(?!)"
        self._mention = re.compile(rf"(?<!\w){key}(?!\w)")

    def paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def name(self, raw: str) -> str:
        code = _NAME_COLOURS[zlib.crc32(raw.casefold().encode("utf-8", "replace")) % 12]
        shown = self.paint(sanitize(raw), f"1;{code}" if raw == self.me else str(code))
        return shown + VERIFIED if self.multiline and name_key(raw) in self.verified else shown

    def clock(self, ts_ms: int | None = None) -> str:
        when = clock_time(ts_ms)
        return "[??:??:??]" if when is None else "[" + time.strftime("%H:%M:%S", when) + "]"

    def text(self, raw: str) -> str:
        return sanitize(raw, "\n" if self.multiline else None)

    def mentions(self, text: str) -> bool:
        """Whether `text` names me as a whole word, case-insensitively (like IRC, Slack)."""
        return bool(self._mention.search(name_key(text)))

    def _said(self, head: str, text: str, ts: int | None, loud: bool = False) -> Line:
        body = self.text(text)
        if loud:
            body = self.paint(body, "1;33")
        return Line(f"{head} {body}", text_width(head) + 1, ts=ts if ts is not None else now_ms())

    def message(self, msg: Message) -> Line:
        if getattr(msg, "action", False):
            head = f"{self.clock(msg.ts)} * {self.name(msg.sender)}"
        else:
            head = f"{self.clock(msg.ts)} <{self.name(msg.sender)}>"
        return self._said(head, msg.text, msg.ts, loud=self.mentions(msg.text))

    def direct(self, msg: DirectMessage) -> Line:
        head = f"{self.clock(msg.ts)} {self.paint('[dm]', '1;35')} <{self.name(msg.sender)}>"
        return self._said(head, msg.text, msg.ts, loud=True)

    def own(self, msg: ClientMessage) -> Line:
        """A line I typed, shown like everyone's once it is handed over for sending."""
        if isinstance(msg, Dm):
            tag = self.paint(f"[dm → {sanitize(msg.to)}]", "1;35")
            return self._said(f"{self.clock()} {tag}", msg.text, None)
        assert isinstance(msg, Say)
        if getattr(msg, "action", False):
            return self._said(f"{self.clock()} * {self.name(self.me)}", msg.text, None)
        return self._said(f"{self.clock()} <{self.name(self.me)}>", msg.text, None)

    def event(self, arrow: str, name: str, what: str) -> Line:
        """A join or leave: dimmed, with an arrow, unlike a message."""
        head = self.paint(f"{self.clock()} {arrow} ", "2")
        return Line(head + self.name(name) + self.paint(f" {what}", "2"), 11, ts=now_ms())

    def left(self, msg: Left) -> Line:
        words = LEFT_WORDS.get(msg.reason, f"left ({sanitize(msg.reason)})")
        by = getattr(msg, "by", None)
        return self.event("<--", msg.name, words + (f" by {sanitize(by)}" if by else ""))

    def users(self, names: list[str]) -> Line:
        head = f"{self.clock()} here ({len(names)}):"
        listed = ", ".join(self.name(n) for n in names)
        return Line(f"{head} {listed}", text_width(head) + 1, ts=now_ms())

    def whois(self, info: WhoisInfo) -> Line:
        """The answer to /whois: identity, operator, since when (and from where, for ops)."""
        who = f"identity {sanitize(info.identity)}" if info.identity else "no identity (a guest)"
        parts = [who, "an operator" if info.op else "not an operator"]
        parts.append(f"here since {when_words(info.since)}")
        if info.address:
            parts.append(f"from {sanitize(info.address)}")
        head = f"{self.clock()} {self.name(info.name)}:"
        return Line(f"{head} {'; '.join(parts)}", text_width(head) + 1, ts=now_ms())

    def bans(self, msg: BanList) -> Line:
        if not msg.bans:
            return Line(f"{self.clock()} no bans in force", 11, ts=now_ms())
        rows = [f"{self.clock()} bans in force ({len(msg.bans)}):"]
        for ban in msg.bans:
            until = "until unbanned" if ban.until is None else f"until {when_words(ban.until)}"
            why = f": {sanitize(ban.reason)}" if ban.reason else ""
            rows.append(f"  {sanitize(ban.who)} {until}, by {self.name(ban.by)}{why}")
        return Line("\n".join(rows), 4, ts=now_ms())

    def muted(self, msg: Muted) -> Line:
        """§5: to the muted client (no `name`), or the operator's acknowledgement."""
        until = None if msg.until is None else when_words(msg.until)
        if msg.name is None:
            words = (
                f"{self.name(msg.by)} lifted your mute"
                if until is None
                else f"you are muted by {self.name(msg.by)} until {until}"
            )
        else:
            words = (
                f"{self.name(msg.name)} is no longer muted"
                if until is None
                else f"{self.name(msg.name)} is muted until {until}"
            )
        return Line(f"{self.clock()} {words}", 11, ts=now_ms())

    def status(self, text: str) -> Line:
        return Line(self.paint(f"* {text}", "2"), 2, status=True)

    def problem(self, text: str) -> Line:
        return Line(self.paint(f"* {text}", "31"), 2, status=True)

    def format(self, msg: ServerMessage) -> Line | None:
        """The line for a message worth showing as it is, else None."""
        if isinstance(msg, Message):
            return self.message(msg)
        if isinstance(msg, DirectMessage):
            return self.direct(msg)
        if isinstance(msg, Joined):
            return self.event("-->", msg.name, "joined")
        if isinstance(msg, Left):
            return self.left(msg)
        if isinstance(msg, Users):
            return self.users(msg.names)
        if isinstance(msg, Error):
            return self.problem(error_sentence(msg))
        if isinstance(msg, WhoisInfo):
            return self.whois(msg)
        if isinstance(msg, BanList):
            return self.bans(msg)
        if isinstance(msg, Muted):
            return self.muted(msg)
        return None  # pong, bye and unknown types are handled elsewhere or ignored


ERROR_WORDS = {
    "rate_limited": "not delivered: you are sending faster than the server allows",
    "not_op": "refused: only operators may do that",
    "muted": "not delivered: you are muted",
}


def error_sentence(err: Error) -> str:
    """An `error` answering something I sent, in words (the server's own sentence)."""
    words = ERROR_WORDS.get(err.code)
    return words or f"not delivered: {sanitize(err.message)}"


def now_ms() -> int:
    return int(time.time() * 1000)


VERIFIED = "✓"  # after a name whose identity the server verified (§5)


def when_words(ts_ms: int) -> str:
    """A moment as `14:02:11` today, else `5 December 14:02`."""
    when, today = clock_time(ts_ms), clock_time(None)
    if when is None:
        return "an unknown time"
    if today is not None and when[:3] == today[:3]:
        return time.strftime("%H:%M:%S", when)
    return f"{when.tm_mday} {time.strftime('%B %H:%M', when)}"


# --- pacing (§4 Rate limit) ---


class Pacer:
    """A token bucket a little stricter than the server's, so paced sends are never refused.

    Half the burst and 90 % of the refill leave room for network jitter: the
    server's bucket (capacity `rate`, refill `rate`/s, full at join) always holds
    at least as many tokens as this one when a paced message arrives.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = max(1, rate // 2)
        self.refill = rate * 0.9
        self.tokens = float(self.capacity)
        self.clock = clock
        self.stamp = clock()

    def ready(self) -> bool:
        """Whether a token is there now (take() would not wait)."""
        if self.refill == 0:
            return True
        now = self.clock()
        return min(self.capacity, self.tokens + (now - self.stamp) * self.refill) >= 1.0

    def take(self) -> float:
        """Take one token; returns how long to sleep first (0 when one is there)."""
        if self.refill == 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        wait = max(0.0, (1.0 - self.tokens) / self.refill)
        self.tokens += wait * self.refill - 1.0
        self.stamp = now + wait
        return wait


# --- commands ---


@dataclass(frozen=True)
class Command:
    """One slash command: what it takes, what /help says, who may use it."""

    usage: str
    help: str
    op: bool = False


COMMANDS: dict[str, Command] = {
    "msg": Command("/msg NAME TEXT", "a direct message to NAME only (also /dm, /query)"),
    "me": Command("/me TEXT", "an action, shown as * you TEXT"),
    "who": Command("/who", "who is here (also /names)"),
    "whois": Command("/whois NAME", "NAME's identity, operator or not, here since when"),
    "bell": Command("/bell off|mentions|all", "when the terminal bell rings"),
    "clear": Command("/clear", "clear the screen"),
    "help": Command("/help", "this list"),
    "quit": Command("/quit", "leave (also /q, exit)"),
    "kick": Command("/kick NAME [REASON]", "close NAME's connection", op=True),
    "ban": Command(
        "/ban NAME [MINUTES] [REASON]",
        "kick NAME and refuse them (for good if no MINUTES)",
        op=True,
    ),
    "unban": Command("/unban WHO", "lift a ban (WHO as /bans lists it)", op=True),
    "bans": Command("/bans", "the bans in force", op=True),
    "mute": Command("/mute NAME MINUTES", "NAME's messages are refused (0 lifts it)", op=True),
}
ALIASES = {"dm": "msg", "query": "msg", "names": "who", "q": "quit", "exit": "quit", "?": "help"}
# Commands whose first word is a user's name (Tab completes it).
NAME_FIRST = frozenset({"msg", "whois", "kick", "ban", "mute"})
BARE = frozenset({"who", "help", "quit", "clear", "bans"})  # commands that take nothing


def help_rows(op: bool) -> list[str]:
    """/help: the commands (operator commands only for operators), then the keys."""
    rows = ["commands (in upper or lower case):", f"  {'TEXT':<24}say TEXT to everyone"]
    rows.append(f"  {'@NAME in TEXT':<24}mention NAME (highlighted for them; still public)")
    rows += [f"  {cmd.usage:<24}{cmd.help}" for cmd in COMMANDS.values() if not cmd.op]
    rows.append(f"  {'//TEXT':<24}say TEXT that starts with a slash")
    if op:
        rows.append("operator commands:")
        rows += [f"  {cmd.usage:<24}{cmd.help}" for cmd in COMMANDS.values() if cmd.op]
    rows.append("keys: Tab completes names and commands; Up/Down recall earlier lines;")
    rows.append("      Ctrl-C clears the line; Ctrl-C or Ctrl-D on an empty line leaves;")
    rows.append("      Ctrl-L redraws the screen")
    return rows


def parse_line(line: str) -> tuple[Any, ...]:
    """What a typed line means: ("say", text), ("action", text), ("dm", to, text), ("who",),
    ("whois", name), ("kick", name, reason), ("ban", name, minutes, reason), ("unban",
    who), ("bans",), ("mute", name, minutes), ("help",), ("quit",), ("clear",), ("bell",
    mode), ("hint", why) or ("skip",)."""
    stripped = line.strip()
    if not stripped:
        return ("skip",)
    if stripped.lower() == "exit":
        return ("quit",)
    if line.startswith("//"):
        return ("say", line[1:])
    if not line.startswith("/"):
        return ("say", line)
    word, _, rest = stripped.partition(" ")
    name = ALIASES.get(word[1:].lower(), word[1:].lower())
    cmd = COMMANDS.get(name)
    if cmd is None:
        shown = sanitize(word)
        return ("hint", f"unknown command {shown}: /help lists the commands (//TEXT sends text)")
    parsed = _arguments(name, rest.strip())
    return parsed if parsed is not None else ("hint", f"usage: {cmd.usage}")


def _arguments(name: str, rest: str) -> tuple[Any, ...] | None:
    """The command's arguments, or None when they do not fit its usage."""
    first, _, more = rest.partition(" ")
    more = more.lstrip(" ")
    if name in BARE:
        return None if rest else (name,)
    if name == "msg":
        return ("dm", first, more) if first and more.strip() else None
    if name == "me":
        return ("action", rest) if rest else None
    if name == "bell":
        return ("bell", rest.lower()) if rest.lower() in BELL_MODES else None
    if name in ("whois", "unban"):
        return (name, rest) if rest and " " not in rest else None
    if not first:
        return None
    if name == "kick":
        return ("kick", first, more or None)
    minutes_word, _, reason = more.partition(" ")
    digits = minutes_word.isdigit() and minutes_word.isascii()
    minutes = int(minutes_word) if digits else None  # §5: at most a year (MAX_MINUTES)
    if name == "mute":
        fits = minutes is not None and minutes <= MAX_MINUTES and not reason.strip()
        return ("mute", first, minutes) if fits else None
    if minutes is None:  # ban: no number means until unbanned, the rest is the reason
        return ("ban", first, None, more or None)
    if not 0 < minutes <= MAX_MINUTES:
        return None
    return ("ban", first, minutes, reason.strip() or None)


# --- the chat ---


class Outbox:
    """Lines waiting to be sent, in order, bounded: a pipe waits for room, a person is told."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: deque[ClientMessage] = deque()
        self._cond = threading.Condition()  # guards _items, _busy and _closed
        self._busy = 0  # taken by the sender, not sent yet
        self._closed = False

    def put(self, msg: ClientMessage, block: bool, give_up: Callable[[], bool]) -> bool:
        """Queue `msg`; with `block`, wait for room unless `give_up()` (False: not queued)."""
        with self._cond:
            while block and len(self._items) >= self.limit and not self._closed:
                if give_up():
                    return False
                self._cond.wait(0.1)
            if len(self._items) >= self.limit or self._closed:
                return False
            self._items.append(msg)
            self._cond.notify_all()
            return True

    def take(self, most: int) -> list[ClientMessage]:
        """Up to `most` messages to send, waiting for the first (then `done` for each);
        [] once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            taken = [self._items.popleft() for _ in range(min(most, len(self._items)))]
            self._busy += len(taken)
            self._cond.notify_all()
            return taken

    def done(self, count: int) -> None:
        with self._cond:
            self._busy -= count
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self, timeout: float | None, give_up: Callable[[], bool]) -> bool:
        """Wait until everything was sent (True), `timeout` passed or `give_up()` (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if give_up() or (left is not None and left <= 0):
                    return False
                self._cond.wait(0.1 if left is None else min(0.1, left))
            return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + self._busy


def default_identity() -> Path:
    """$XDG_DATA_HOME/bcast/identity.pem, i.e. ~/.local/share/bcast/identity.pem."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "bcast" / "identity.pem"


# A `bye` after which reconnecting would be wrong (§6 Resume).
NO_RESUME = frozenset({"leave", "kicked", "banned", "not_allowed", "replaced"})
RATED = (Say, Dm, Who, Whois)  # §4: each takes a rate token


class Chat:
    """The conversation across connections: shows what arrives, sends what is typed, knows
    who is here, reconnects when the connection is lost (§6 Resume)."""

    def __init__(
        self,
        io: Console | Pipe,
        style: Style,
        joiner: Joiner,
        session: Session,
        bell: str,
        follow: bool = False,
    ):
        assert session.welcome is not None
        self.io = io
        self.style = style
        self.joiner = joiner
        self.session = session  # (lock) replaced on reconnect by the network thread
        self.welcome = session.welcome  # (lock) idem
        self.name = self.welcome.name
        self.bell = bell
        self.follow = follow
        self.outbox = Outbox(OUTBOX_LINES)
        self._pacer = Pacer(self.welcome.rate)  # (lock) replaced with the session
        self._online = threading.Event()  # a joined session is there to send on
        self._online.set()
        self._lock = threading.Lock()  # guards the (lock) fields
        self._users = {name_key(n): n for n in self.welcome.users}  # (lock)
        self.lines = 0  # (lock) non-empty lines read (a pipe reports what was not delivered)
        self.undelivered = 0  # (lock) refused here, or answered by an error
        self._since = self.welcome.last_id  # the highest id seen: where a resume starts (§6)
        self._sent: deque[str] = deque(maxlen=200)  # my says sent: a replay of one is dropped
        self._replaying = False  # network thread: showing messages marked history
        self._offline_said = False  # main thread: told once per outage that lines wait
        self._leaving = False  # set before `leave` is sent: the end that follows is normal
        self._quit = threading.Event()  # the user leaves: stop reconnecting
        self._end: ClientError | None = None  # why the chat ended, if not by leaving
        self._ended = threading.Event()
        self._day = _day_of(None)  # the date of the last timed line (the date rule)
        style.me = self.name
        style.verified = {name_key(self.name)} if self.welcome.identity else set()
        self._network = threading.Thread(target=self._network_loop, name="bcast-network")
        self._sender = threading.Thread(target=self._send_loop, name="bcast-sender")
        self._network.daemon = self._sender.daemon = True

    # -- the main thread --

    def run(self) -> int:
        """Chat until the user leaves (0), the input ends (pipe: 0, or 1 if a line was not
        delivered) or the chat ends otherwise (ClientError)."""
        others = ", ".join(self.style.name(n) for n in self.welcome.users) or "nobody else yet"
        self.status(f"joined as {self.style.name(self.name)}; here: {others}")
        self._say_identity()
        if self.io.interactive:
            self.status("type /help for commands, exit to leave")
            self._prompt(PROMPT)  # after "your name: ", if the name was asked
        else:
            self.io.watch_stdout()
        self.session.start()
        self._network.start()
        self._sender.start()
        with _signals_leave(self.io):
            return self._input_loop()

    def _say_identity(self) -> None:
        fp = self.welcome.identity
        if fp and self.io.interactive:
            self.status(f"your identity {fp} is verified by the server")
        elif self.joiner.identity is not None and not fp:
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
        if self._end is None and not now:
            wait = None if not self.io.interactive else DRAIN_WAIT_S
            self.outbox.drain(wait, give_up=self._stopping)
        with self._lock:
            self._leaving = True
            self._quit.set()
            session = self.session
        if self._end is not None:
            self._close_input(keep=True)
            raise self._end
        session.leave()
        self._network.join(BYE_WAIT_S)  # every error comes before the server's bye
        self._close_input(keep=False)
        failed = min(self.undelivered, self.lines)  # errors answer lines: a stray one is not
        if self.io.interactive:
            self.status("left")
        elif failed:
            raise ClientError(f"{failed} of {self.lines} lines were not delivered")
        return EXIT_OK

    def _stopping(self) -> bool:
        """The chat ended, or a signal or a closed stdout asks to leave now."""
        return self._ended.is_set() or self.io.reason in ("leave", "stdout")

    def _close_input(self, keep: bool) -> None:
        if isinstance(self.io, Console):
            self.io.finish(keep)

    def handle(self, line: str) -> bool:
        """Act on one typed line; False when it asks to leave."""
        cmd = parse_line(line)
        kind = cmd[0]
        if kind == "skip":
            return True
        with self._lock:
            self.lines += 1
        if kind == "quit":
            return False
        if kind == "hint":
            self._refuse(cmd[1])
        elif kind == "help":
            for row in help_rows(self.welcome.op):
                self.io.show(Line(row, 26, status=True))
        elif kind == "clear":
            if isinstance(self.io, Console):
                self.io.clear()
        elif kind == "bell":
            self.bell = cmd[1]
            self.status(f"the bell rings for {BELL_WORDS[self.bell]}")
        elif kind in ("say", "dm", "action"):
            self._say(cmd)
        else:
            self._command(cmd)
        return True

    def _command(self, cmd: tuple[Any, ...]) -> None:
        """who, whois and the operator commands (§5): sent as they are; the server checks."""
        kind = cmd[0]
        feature = "moderation" if kind != "who" and kind != "whois" else "identity"
        if kind != "who" and feature not in self.welcome.features:
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
        if kind == "action" and "action" not in self.welcome.features:
            self._refuse("this server does not support /me", cmd[1])
            return
        size = utf8_size(text)
        problem = text_problem(text)
        line = text if kind != "dm" else f"/msg {cmd[1]} {text}"
        if size > self.welcome.max_text:
            limit = self.welcome.max_text
            self._refuse(f"not sent: {size} bytes, the server takes at most {limit}", line)
            return
        if problem:
            self._refuse(f"not sent: the {problem}", line)
            return
        msg: Say | Dm = Dm(cmd[1], text) if kind == "dm" else Say(text, action=kind == "action")
        if self._queue(msg, line) and self.io.interactive:
            self._show(self.style.own(msg))
            if not self._online.is_set() and not self._offline_said:
                self._offline_said = True
                self.status("not connected: what you type is sent once reconnected")

    def _queue(self, msg: ClientMessage, line: str | None = None) -> bool:
        if self.outbox.put(msg, not self.io.interactive, self._stopping):
            return True
        self._refuse(f"not sent: {len(self.outbox)} lines are still waiting to go out", line)
        return False

    def _refuse(self, why: str, line: str | None = None) -> None:
        """A line that was not sent: say why; on a terminal, give a text `line` back to edit
        (a refused command is not: it is short, and its hint says how to type it)."""
        with self._lock:
            self.undelivered += 1
        self.io.show(self.style.problem(why))
        if isinstance(self.io, Console) and line is not None:
            self.io.put_back(line)

    def status(self, text: str) -> None:
        self.io.show(self.style.status(text))

    def complete(self, before: str) -> tuple[str, list[str]]:
        """Tab: the line before the cursor completed, and the candidates when several fit.

        Names from the user list; at the start of the line a name gets ": " (addressing
        someone, as in IRC); commands after a leading slash.
        """
        start = before.rfind(" ") + 1
        head, word = before[:start], before[start:]
        first = head.split(" ", 1)[0].lower().lstrip("/")
        if start == 0 and word.startswith("/"):
            names = [c for c in (*COMMANDS, *ALIASES) if c.startswith(word[1:].lower())]
            names = [c for c in names if self.welcome.op or not COMMANDS.get(c, HELPLESS).op]
            return _completed(head, word, sorted({"/" + c for c in names}), " ")
        if head.startswith("/") and head.count(" ") == 1 and first == "bell":
            return _completed(head, word, [m for m in BELL_MODES if m.startswith(word)], "")
        at = "@" if word.startswith("@") else ""
        with self._lock:
            users = sorted(self._users.values(), key=str.casefold)
        users = [u for u in users if u != self.name]
        fits = [at + u for u in users if name_key(u).startswith(name_key(word[len(at) :]))]
        named = head.startswith("/") and head.count(" ") == 1
        named = named and ALIASES.get(first, first) in NAME_FIRST
        suffix = ": " if start == 0 and not at else " "
        return _completed(head, word, fits, " " if named else suffix)

    # -- the network thread --

    def _network_loop(self) -> None:
        try:
            while True:
                try:
                    msg = self.session.recv(timeout=REPLAY_IDLE_S if self._replaying else None)
                except queue.Empty:
                    self._end_replay()
                    continue
                except ConnectionLost as exc:
                    if self._leaving or not self._recover(exc):
                        return
                    continue
                self._on_message(msg)
        except BaseException as exc:  # a bug must not leave the user staring at a dead chat
            self._stop(ClientError(f"unexpected error: {type(exc).__name__}: {exc}"))

    def _stop(self, why: ClientError) -> None:
        self._end = why
        self._ended.set()
        self.io.wake("end")

    def _recover(self, lost: ConnectionLost) -> bool:
        """After a lost connection: reconnect (True), or end the chat (False) after a `bye`
        that forbids it (§6) or a failure that another try cannot mend."""
        bye = self.session.bye
        if isinstance(lost, ServerFault) or (bye is not None and bye.reason in NO_RESUME):
            self._stop(lost)
            return False
        self._end_replay()
        with self._lock:
            self._online.clear()
        self.session.close()
        self.status(f"{lost}; reconnecting")
        return self._reconnect(lost)

    def _reconnect(self, lost: ConnectionLost) -> bool:
        """§6 Resume: new connections with backoff (1, 2, 4 ... 30 s, with jitter) until one
        joins with `since`, the user leaves, or the server refuses for good."""
        delay, started, said_taken = RECONNECT_FIRST_S, time.monotonic(), False
        while True:
            wait = delay * random.uniform(0.75, 1.25)
            self._prompt(f"(reconnecting in {round(wait)} s) {PROMPT}")
            if self._quit.wait(wait):
                return False
            self._prompt(f"(reconnecting) {PROMPT}")
            session = None
            try:
                session = self.joiner.open()
                welcome = self.joiner.join(session, self.name, since=self._since)
            except TrustError as exc:  # a changed server key is never retried
                self._stop(exc)
                return False
            except JoinRefused as exc:
                session and session.close()
                if exc.code != "name_taken":
                    self._stop(exc)
                    return False
                if not said_taken:  # §6: until the server notices the old connection died
                    said_taken = True
                    self.status("the server still holds our old connection; trying again")
            except ConnectionLost:
                session and session.close()
            else:
                return self._resume(session, welcome)
            if not self.io.interactive and time.monotonic() - started > RECONNECT_GIVE_UP_S:
                self._stop(ClientError(f"{lost}; no reconnection for {RECONNECT_GIVE_UP_S} s"))
                return False
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _resume(self, session: Session, welcome: Welcome) -> bool:
        with self._lock:
            if self._quit.is_set():  # the user left meanwhile
                session.close()
                return False
            self.session, self.welcome = session, welcome
            self._pacer = Pacer(welcome.rate)  # §4: the server's bucket is full at join
            self._users = {name_key(n): n for n in welcome.users}
        session.start()
        self._online.set()
        self._offline_said = False
        self._prompt(PROMPT)
        self.status(f"reconnected as {self.style.name(welcome.name)}")
        if welcome.gap:
            self.status("some messages were missed: the server no longer keeps them")
        return True

    def _prompt(self, prompt: str) -> None:
        if isinstance(self.io, Console):
            self.io.set_prompt(prompt)

    def _on_message(self, msg: ServerMessage) -> None:
        if isinstance(msg, (Message, DirectMessage)):
            self._since = max(self._since, msg.id)
        if isinstance(msg, Message) and msg.history:
            if self._replayed_mine(msg):
                return
            if not self._replaying:
                self._replaying = True
                self._rule("--- history ---")
        elif self._replaying:
            self._end_replay()
        if isinstance(msg, (Joined, Left, Users, WhoisInfo)):
            self._track(msg)
        if isinstance(msg, Error):
            with self._lock:
                self.undelivered += 1
        line = self.style.format(msg)
        if line is None:
            return
        if self._rings(msg):
            line = replace(line, bell=True)
        self._show(line)

    def _replayed_mine(self, msg: Message) -> bool:
        """A replayed say of mine that was shown when I typed it (§6: drop it)."""
        if msg.sender != self.name or msg.text not in self._sent:
            return False
        self._sent.remove(msg.text)
        return True

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

    def _show(self, line: Line) -> None:
        """Show a line, after a date rule when its date is not the last one shown."""
        if self.io.interactive and line.ts is not None:
            day = _day_of(line.ts)
            if day is not None and day != self._day:
                self._day = day
                when = clock_time(line.ts)
                if when is not None:
                    self.io.show(Line(self.style.paint(day_rule(when), "2")))
        self.io.show(line)

    # -- the sender thread --

    def _send_loop(self) -> None:
        """Send what is queued, paced, in records that fit the server's (§1 max_record, §3 64
        messages); after a lost connection, what was not sent waits for the next one."""
        while batch := self.outbox.take(MAX_CLIENT_RECORD_MESSAGES):
            pending = deque(batch)
            while pending:
                session = self._current_session()
                if session is None:
                    self.outbox.done(len(pending))
                    return
                record = self._fill_record(pending)
                try:
                    session.send(*record)
                except ConnectionLost:
                    pending.extendleft(reversed(record))
                    with self._lock:
                        if self.session is session:  # the network thread will reconnect
                            self._online.clear()
                    continue
                self._sent.extend(m.text for m in record if isinstance(m, Say))
                self.outbox.done(len(record))

    def _current_session(self) -> Session | None:
        """The joined session to send on, waiting while reconnecting; None once over."""
        while not self._online.wait(0.2):
            if self._ended.is_set() or self._quit.is_set():
                return None
        with self._lock:
            return self.session

    def _fill_record(self, pending: deque[ClientMessage]) -> list[ClientMessage]:
        """Take from `pending` what one record may carry: a rate token for each rated
        message (waiting only for the first), within the server's record size."""
        with self._lock:
            pacer, room = self._pacer, self.welcome.max_record - RECORD_OVERHEAD
        record: list[ClientMessage] = []
        for msg in list(pending):
            size = len(encode_client_message(msg)) + 1
            if record and (size > room or (isinstance(msg, RATED) and not pacer.ready())):
                break
            if isinstance(msg, RATED):
                time.sleep(pacer.take())
            record.append(pending.popleft())
            room -= size
        return record


HELPLESS = Command("", "")
BELL_WORDS = {
    "off": "nothing (it is off)",
    "mentions": "mentions of your name and direct messages",
    "all": "every message",
}
# A record's bytes around its messages: the length, the GCM tag, the brackets of the array.
RECORD_OVERHEAD = 4 + 16 + 2


def _completed(head: str, word: str, fits: list[str], suffix: str) -> tuple[str, list[str]]:
    """Complete `word` from `fits`: the one fit with `suffix`, else their common start."""
    if len(fits) == 1:
        return head + fits[0] + suffix, []
    if not fits:
        return head + word, []
    folded = [f.casefold() for f in fits]
    common = 0
    while all(len(f) > common and f[common] == folded[0][common] for f in folded):
        common += 1
    if common > len(word):
        return head + fits[0][:common], fits
    return head + word, fits


def _day_of(ts_ms: int | None) -> tuple[int, int, int] | None:
    when = clock_time(ts_ms)
    return None if when is None else (when.tm_year, when.tm_mon, when.tm_mday)


@contextlib.contextmanager
def _signals_interrupt() -> Any:
    """Before the chat, SIGTERM interrupts like SIGINT, so the terminal mode is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _signals_leave(io: Console | Pipe) -> Any:
    """SIGINT and SIGTERM ask to leave (politely: `leave`, then exit 0) while chatting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = lambda signum, frame: io.wake("leave")  # noqa: E731 - no lock, just a wake-up
    old = [signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


# --- command line ---

EPILOG = """\
exit status: 0 left normally, 1 connection lost or refused (or, piped, a line not
delivered), 2 bad usage or server fingerprint mismatch.

The server's fingerprint is pinned per host:port in $XDG_CONFIG_HOME/bcast/known_hosts
(default ~/.config/bcast/known_hosts) on first use; a changed fingerprint is refused.
Your identity (an Ed25519 key) is made on first use in $XDG_DATA_HOME/bcast/identity.pem
(default ~/.local/share/bcast/identity.pem) and proven to the server at every join.
With stdin or stdout not a terminal the client is a pipe tool: it sends each input
line (paced to the server's rate), prints one received message per line on stdout
and status lines on stderr, and leaves at end of input (--follow: keeps listening).

""" + "\n".join(help_rows(op=False))

# One-shot actions: they do something and exit, so they take no BCAST_ fallback (an
# exported BCAST_FORGET would forget a pin on every run).
ACTION_FLAGS = frozenset({"help", "forget", "show_identity"})
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(environ: Mapping[str, str], var: str) -> bool:
    """A yes/no environment variable (1/0, true/false, yes/no, on/off)."""
    value = environ.get(var, "").strip().lower()
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise UsageError(f"{var}={environ[var]!r}: use 1 or 0 (true/false, yes/no, on/off)")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; every setting flag falls back to BCAST_<FLAG> in `environ`."""
    environ = os.environ if environ is None else environ
    env = environ.get
    p = argparse.ArgumentParser(
        prog="client.py",
        description="bcast/1 encrypted group-chat client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default=env("BCAST_HOST", DEFAULT_HOST),
        help=f"server address; BCAST_HOST (default {DEFAULT_HOST})",
    )
    p.add_argument(
        "--port",
        default=env("BCAST_PORT", str(DEFAULT_PORT)),
        help=f"server port; BCAST_PORT (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--name", default=env("BCAST_NAME"), help="your name; BCAST_NAME (asked when missing)"
    )
    p.add_argument(
        "--fingerprint",
        default=env("BCAST_FINGERPRINT") or None,
        help="the server fingerprint SHA256:... to require (and pin) instead of trusting on "
        "first use; BCAST_FINGERPRINT",
    )
    p.add_argument(
        "--known-hosts",
        type=Path,
        default=env("BCAST_KNOWN_HOSTS") or None,
        help="the pin file; BCAST_KNOWN_HOSTS (default $XDG_CONFIG_HOME/bcast/known_hosts)",
    )
    p.add_argument(
        "--identity",
        type=Path,
        default=env("BCAST_IDENTITY") or None,
        help="your identity key, made on first use; BCAST_IDENTITY "
        "(default $XDG_DATA_HOME/bcast/identity.pem)",
    )
    p.add_argument(
        "--guest",
        action="store_true",
        default=env_flag(environ, "BCAST_GUEST"),
        help="join without proving an identity; BCAST_GUEST=1",
    )
    p.add_argument(
        "--history",
        default=env("BCAST_HISTORY"),
        metavar="N",
        help="how many earlier messages to show when joining; BCAST_HISTORY "
        f"(default {HISTORY_DEFAULT} on a terminal, 0 in a pipe)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        default=env_flag(environ, "BCAST_FOLLOW"),
        help="in a pipe, keep printing messages after the input ends; BCAST_FOLLOW=1",
    )
    p.add_argument(
        "--no-bell",
        action="store_true",
        default=env_flag(environ, "BCAST_NO_BELL"),
        help="never ring the terminal bell (/bell changes it while chatting); BCAST_NO_BELL=1",
    )
    p.add_argument(
        "--forget",
        metavar="HOST:PORT",
        help="remove the pinned fingerprint of HOST:PORT from the pin file, then exit",
    )
    p.add_argument(
        "--show-identity",
        action="store_true",
        help="print your identity's fingerprint (making the key if needed), then exit",
    )
    return p


def ask_name(io: Console, status: Callable[[str], None]) -> str | None:
    """Ask for a name until one passes §4's predicate; None when the user gives up."""
    while True:
        try:
            name = io.read_line(NAME_PROMPT)
        except Woken:
            return None
        if name is None:
            return None
        io.finish(keep=False)  # the answer stays on the screen, the prompt goes until asked
        io.show(Line(NAME_PROMPT + sanitize(name)))
        name = name.strip()
        problem = name_check(name)
        if problem is None:
            return name
        status(f"{problem}; try another")


def name_check(name: str) -> str | None:
    """Why `name` cannot be used, as the server would say (§4), or None."""
    if has_lone_surrogate(name):
        return "the name holds bytes that are not UTF-8"
    problem = name_problem(name)
    return None if problem is None else f"the name {sanitize(name)!r} {problem}"


def join_chat(joiner: Joiner, io: Console | Pipe, name: str | None, style: Style) -> Session | None:
    """Connect first (so a refused connection or a changed key is said before anyone
    types), then ask for a name if none was given, then join; interactively, ask again
    after a refused name. None when the user gives up."""
    session = joiner.open()
    try:
        while True:
            if name is None:
                assert isinstance(io, Console)
                name = ask_name(io, lambda text: io.show(style.problem(text)))
                if name is None:
                    session.close()
                    return None
            if session.age > JOIN_FRESH_S:  # the server's handshake timeout is near
                session.close()
                session = joiner.open()
            try:
                joiner.join(session, name)
                return session
            except NameRefused as exc:
                if not io.interactive:
                    raise
                io.show(style.problem(f"{exc}; try another"))
                name = None
            except ConnectionLost:
                if not io.interactive or session.age <= JOIN_FRESH_S:
                    raise
                session.close()  # it timed out while the name was typed: once more
                session = joiner.open()
    except BaseException:
        session.close()
        raise


def forget(known: KnownHosts, target: str) -> int:
    """--forget HOST:PORT: remove its pins (atomically), say what was removed."""
    key = parse_host_key(target)
    try:
        gone = known.replace(key, None) if known.lookup(key) else []
    except OSError as exc:
        raise ClientError(f"cannot rewrite {known.path}: {exc.strerror or exc}") from None
    if gone:
        print(f"removed the pin of {key} ({', '.join(gone)}) from {known.path}")
    else:
        print(f"no pin for {key} in {known.path}; nothing to remove")
    return EXIT_OK


def load_identity(path: Path, status: Callable[[str], None]) -> Any:
    """Our Ed25519 identity (§5), made on first use (mode 0600); an unusable file is a
    usage error naming it."""
    new = not path.exists()
    try:
        key = load_or_create_identity(path)
    except CryptoError as exc:
        raise UsageError(str(exc)) from None
    if new:
        fp = identity_fingerprint(identity_public(key))
        status(f"made your identity {fp} in {path} (keep it: it proves your name)")
    return key


def history_count(value: str | None, interactive: bool) -> int:
    if value is None:
        return HISTORY_DEFAULT if interactive else 0
    if not value.isdigit() or not value.isascii() or int(value) > MAX_HISTORY:
        raise UsageError(f"--history takes a number of messages 0..{MAX_HISTORY}, not {value!r}")
    return int(value)


def run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    if args.known_hosts is not None and not args.known_hosts.parent.is_dir():
        raise UsageError(
            f"the folder of the pin file {args.known_hosts} does not exist "
            f"({args.known_hosts.parent}); create it or give another --known-hosts"
        )
    known = KnownHosts(args.known_hosts or default_known_hosts(), args.known_hosts is None)
    if args.forget is not None:
        return forget(known, args.forget)
    if args.show_identity:
        key = load_identity(args.identity or default_identity(), lambda text: None)
        print(identity_fingerprint(identity_public(key)))
        return EXIT_OK
    if not str(args.port).isdigit() or not 0 < int(args.port) < 65536:
        raise UsageError(f"the port must be 1..65535, not {args.port!r}")
    if args.fingerprint and not FINGERPRINT_RE.match(args.fingerprint):
        raise UsageError("--fingerprint takes the form SHA256: followed by 43 base64 characters")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    history = history_count(args.history, interactive)
    if args.name is not None and (problem := name_check(args.name)):
        raise UsageError(problem)
    if args.name is None and not interactive:
        raise UsageError(
            "--name (or BCAST_NAME) is required when input or output is not a terminal"
        )
    colour = interactive and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    style = Style(colour, multiline=interactive)
    key = host_key(args.host, int(args.port))
    io: Console | Pipe
    if interactive:
        io = Console(sys.stdin.fileno(), sys.stdout)
    else:
        io = Pipe(sys.stdin.fileno(), sys.stdout, sys.stderr)
    with io, _signals_interrupt():

        def status(text: str) -> None:
            io.show(style.status(text))

        identity = None
        if not args.guest:
            identity = load_identity(args.identity or default_identity(), status)

        def verify(fp: str) -> None:
            check_pin(known, key, fp, args.fingerprint, status)

        joiner = Joiner(args.host, int(args.port), verify, identity, history)
        session = join_chat(joiner, io, args.name, style)
        if session is None:
            return EXIT_OK
        bell = "off" if args.no_bell else "mentions"
        return Chat(io, style, joiner, session, bell, args.follow).run()


def main(argv: list[str] | None = None) -> int:
    """Run the client; every failure becomes one sentence on stderr and an exit status."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        return run(argv)
    except ClientError as exc:
        message, code = str(exc), exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # no traceback, ever: one sentence
        message, code = f"unexpected error: {type(exc).__name__}: {exc}", EXIT_LOST
    with contextlib.suppress(OSError, ValueError):  # a loud warning keeps its own layout
        print(message if "\n" in message else f"client.py: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
