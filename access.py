"""Who may join under which name, who is an operator, who is banned or muted (PROTOCOL.md §5).

Who owns what: the hub owns one `Access` and calls it only with its lock held
(so a join's checks and its registration are one atomic step); nothing here
does I/O or takes a lock. What must reach the state store (a binding, a ban)
is returned to the caller, who writes it outside the lock. `parse_allowlist`
is pure: the server reads the file and hands it the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import protocol
from store import Ban, Binding

FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
FIELD_SEPARATOR_RE = re.compile(r"[ \t]+")  # §5: "fields separated by spaces or tabs"


class AllowlistError(ValueError):
    """A bad allow file: the message names the line."""


@dataclass(frozen=True)
class Listed:
    """One allowlist line: the name an identity must use, and whether it is an operator."""

    name: str
    op: bool


def parse_allowlist(text: str, source: str = "the allow file") -> dict[str, Listed]:
    """§5 allowlist: `SHA256:<43> <name> [op]` a line, `#` comments; fingerprint -> Listed."""
    listed: dict[str, Listed] = {}
    names: dict[str, int] = {}
    # Lines end at "\n" only (and a "\r" before it): splitlines() would also break at form
    # feeds, NEL or U+2028 inside a comment, refusing a good file or naming the wrong line.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip(" \t\r")
        if not line:
            continue
        fields = FIELD_SEPARATOR_RE.split(line)
        where = f"{source}, line {number}"
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "op"):
            raise AllowlistError(f"{where}: expected 'SHA256:<fingerprint> <name> [op]'")
        fp, raw_name = fields[0], fields[1]
        if not FINGERPRINT_RE.fullmatch(fp):
            raise AllowlistError(f"{where}: {fp[:60]!r} is not a SHA256: fingerprint")
        problem = protocol.name_problem(raw_name)
        if problem is not None:
            raise AllowlistError(f"{where}: the name {raw_name[:40]!r} {problem}")
        name = protocol.valid_name(raw_name)
        key = protocol.name_key(name)
        if fp in listed:
            raise AllowlistError(f"{where}: {fp} is listed twice")
        if key in names:
            raise AllowlistError(f"{where}: the name {name} is listed on line {names[key]} too")
        names[key] = number
        listed[fp] = Listed(name, len(fields) == 3)
    return listed


class Access:
    """§5 access state in memory; every method expects the hub lock held."""

    def __init__(
        self,
        ops: frozenset[str],
        allow: dict[str, Listed] | None,
        bindings: list[Binding],
        bans: list[Ban],
    ):
        self._ops = ops  # from the command line, in either mode
        self._allow = allow  # None in open mode
        self._bound: dict[str, Binding] = {b.name_key: b for b in bindings}  # name_key ->
        self._bound_by_identity: dict[str, Binding] = {b.identity: b for b in bindings}
        self._bans: dict[str, Ban] = {b.who: b for b in bans}
        self._mutes: dict[str, int] = {}  # identity -> until (ms); lifted by a restart

    @property
    def mode(self) -> str:
        return "open" if self._allow is None else "allowlist"

    def is_op(self, identity: str | None) -> bool:
        if identity is None:
            return False
        if identity in self._ops:
            return True
        listed = self._allow.get(identity) if self._allow is not None else None
        return listed is not None and listed.op

    def refusal(
        self, identity: str | None, ip: str, name_key: str, now_ms: int
    ) -> tuple[str, str] | None:
        """The first of not_allowed, banned, name_reserved that applies, as (code, message)."""
        if self._allow is not None and (identity is None or identity not in self._allow):
            return "not_allowed", "this server admits only the identities on its allowlist"
        for who in (identity, ip):
            ban = self._active_ban(who, now_ms) if who is not None else None
            if ban is not None:
                return "banned", _ban_detail(ban, now_ms)
        if self._allow is not None:
            listed = self._allow[identity]
            if protocol.name_key(listed.name) != name_key:
                return "name_reserved", f"your identity is listed under the name {listed.name}"
            return None
        bound = self._bound.get(name_key)
        if bound is not None and bound.identity != identity:
            return "name_reserved", f"the name {bound.name} is reserved for another key"
        return None

    def still_allowed(self, identity: str | None, name_key: str) -> bool:
        """After an allowlist re-read: may this joined client stay?"""
        if self._allow is None:
            return True
        listed = self._allow.get(identity) if identity is not None else None
        return listed is not None and protocol.name_key(listed.name) == name_key

    def set_allowlist(self, allow: dict[str, Listed]) -> None:
        self._allow = allow

    def bind(self, identity: str, name: str, name_key: str, now_ms: int) -> Binding | None:
        """§5 open mode: a proven join binds its name (moving an older binding).

        Returns the binding to store, or None when nothing changed.
        """
        if self._allow is not None:
            return None
        old = self._bound_by_identity.get(identity)
        if old is not None and old.name_key == name_key and old.name == name:
            return None
        if old is not None:
            del self._bound[old.name_key]
        since = old.since_ms if old is not None and old.name_key == name_key else now_ms
        binding = Binding(identity=identity, name=name, name_key=name_key, since_ms=since)
        self._bound[name_key] = binding
        self._bound_by_identity[identity] = binding
        return binding

    # --- bans and mutes ---

    def _active_ban(self, who: str, now_ms: int) -> Ban | None:
        ban = self._bans.get(who)
        if ban is None:
            return None
        if ban.until_ms is not None and ban.until_ms <= now_ms:
            del self._bans[who]
            return None
        return ban

    def add_ban(self, ban: Ban) -> None:
        self._bans[ban.who] = ban

    def remove_ban(self, who: str, now_ms: int) -> bool:
        """§5 unban: False if nothing (still) banned under `who`."""
        if self._active_ban(who, now_ms) is None:
            return False
        del self._bans[who]
        return True

    def active_bans(self, now_ms: int) -> list[Ban]:
        return [b for who in list(self._bans) if (b := self._active_ban(who, now_ms))]

    def mute(self, identity: str, until_ms: int | None) -> None:
        if until_ms is None:
            self._mutes.pop(identity, None)
        else:
            self._mutes[identity] = until_ms

    def muted_until(self, identity: str | None, now_ms: int) -> int | None:
        """A later connection of a muted identity is muted too, until `until` (§5)."""
        if identity is None:
            return None
        until = self._mutes.get(identity)
        if until is not None and until <= now_ms:
            del self._mutes[identity]
            return None
        return until


def _ban_detail(ban: Ban, now_ms: int) -> str:
    """§5 `banned`: by whom, for how long, why: "banned by ana for 9 more minutes: spam"."""
    if ban.until_ms is None:
        span = "until unbanned"
    else:
        minutes = max(1, -(-(ban.until_ms - now_ms) // 60_000))
        span = f"for {minutes} more minute{'s' if minutes > 1 else ''}"
    return f"banned by {ban.by} {span}" + (f": {ban.reason}" if ban.reason else "")
