"""How the chat looks: one `Line` for each message, event or status, in words. Pure.

`Style` formats what the server sends (and my own lines) for the terminal or a pipe:
colours only on a terminal, the time of each line, names coloured by a hash, mine
bold, a check after a verified identity (§5), mentions of my name highlighted, and
every §4/§5 reason code in plain words. The chat's network thread writes
`Style.verified`; everything else here is set before the threads start.
"""

from __future__ import annotations

import re
import time
import zlib

from display import Line, sanitize, text_width
from protocol import (
    BanList,
    ClientMessage,
    DirectMessage,
    Dm,
    Error,
    Joined,
    Left,
    Message,
    Muted,
    Say,
    ServerMessage,
    Users,
    WhoisInfo,
    name_key,
)

VERIFIED = "✓"  # after a name whose identity the server verified (§5)

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


def when_words(ts_ms: int) -> str:
    """A moment as `14:02:11` today, else `5 December 14:02`."""
    when, today = clock_time(ts_ms), clock_time(None)
    if when is None:
        return "an unknown time"
    if today is not None and when[:3] == today[:3]:
        return time.strftime("%H:%M:%S", when)
    return f"{when.tm_mday} {time.strftime('%B %H:%M', when)}"


def day_of(ts_ms: int | None) -> tuple[int, int, int] | None:
    """The local date of a moment (None: no time given), for the date rule."""
    when = clock_time(ts_ms)
    return None if when is None else (when.tm_year, when.tm_mon, when.tm_mday)
