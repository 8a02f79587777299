"""Operator commands and whois (PROTOCOL.md §5), as run by a reader thread.

Who owns what: nothing here holds state. Each handler looks the target up
through the hub, builds every message it needs outside the hub lock, lets
the hub apply the change in one locked call, and hands what must persist
(a ban, an unban) to the state writer. The reader has already checked the
operator right and the fields (protocol.check_state, parse_client_message);
what is left is the target (`unknown_user`) and, for whois, the rate.
"""

from __future__ import annotations

import logging
import time

import protocol
from conn import Conn
from delivery import entry
from hub import Hub
from protocol import Refused
from statewriter import StateWriter
from store import Ban

log = logging.getLogger("bcast.server")

MINUTE_MS = 60_000


def now_ms() -> int:
    return int(time.time() * 1000)


class Moderation:
    def __init__(self, hub: Hub, writer: StateWriter | None):
        self.hub = hub
        self.writer = writer

    def _target(self, name: str) -> Conn:
        target = self.hub.find(name)
        if target is None:
            raise Refused("unknown_user", f"no user named {name[:64]}")
        return target

    def kick(self, op: Conn, msg: protocol.Kick) -> None:
        target = self._target(msg.name)
        bye = protocol.encode_message(protocol.bye("kicked", op.name, msg.reason))
        if self.hub.kick(target, "kicked", op, bye + b","):
            log.info("%s kicked %s%s", op.describe(), target.describe(), _because(msg.reason))

    def ban(self, op: Conn, msg: protocol.Ban) -> None:
        target = self._target(msg.name)
        created = now_ms()
        until = created + msg.minutes * MINUTE_MS if msg.minutes is not None else None
        bye = protocol.encode_message(protocol.bye("banned", op.name, msg.reason))

        def ban_for(who: str) -> Ban:
            return Ban(who=who, until_ms=until, by=op.name, reason=msg.reason, created_ms=created)

        ban = self.hub.ban(target, ban_for, op, bye + b",")
        if ban is None:
            return
        if self.writer is not None:
            self.writer.add_ban(ban)
        span = "until unbanned" if until is None else f"for {msg.minutes} min"
        log.info(
            "%s banned %s (%s) %s%s",
            op.describe(),
            target.describe(),
            ban.who,
            span,
            _because(msg.reason),
        )

    def unban(self, op: Conn, msg: protocol.Unban) -> bytes:
        if not self.hub.unban(msg.who, now_ms()):
            raise Refused("unknown_user", f"nothing is banned under {msg.who[:64]}")
        if self.writer is not None:
            self.writer.remove_ban(msg.who)
        log.info("%s lifted the ban on %s", op.describe(), msg.who[:64])
        return self.bans()

    def bans(self) -> bytes:
        bans = self.hub.bans(now_ms())
        entries = [protocol.ban_entry(b.who, b.until_ms, b.by, b.reason) for b in bans]
        return entry(protocol.bans(entries))

    def mute(self, op: Conn, msg: protocol.Mute) -> None:
        target = self._target(msg.name)
        until = now_ms() + msg.minutes * MINUTE_MS if msg.minutes else None
        to_target = protocol.encode_message(protocol.muted(op.name, until))
        to_op = protocol.encode_message(protocol.muted(op.name, until, target.name))
        if self.hub.mute(target, until, op, to_target, to_op):
            what = f"muted for {msg.minutes} min" if until else "no longer muted"
            log.info("%s: %s is %s", op.describe(), target.describe(), what)

    def whois(self, conn: Conn, msg: protocol.Whois, now: float) -> bytes:
        outcome, facts = self.hub.whois(conn, msg.name, now)
        if outcome == "unknown_user":
            raise Refused("unknown_user", f"no user named {msg.name[:64]}")
        if facts is None:
            raise Refused("rate_limited", f"more than {self.hub.rate} messages per second")
        return entry(
            protocol.whois(facts.name, facts.identity, facts.op, facts.since_ms, facts.address)
        )


def _because(reason: str | None) -> str:
    return f": {reason[:64]!r}" if reason else ""
