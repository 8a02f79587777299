"""Admission per source: what one address may hold and how fast it may connect.

Why: before a join nothing has been paid but a TCP handshake, and every
unjoined connection holds a slot of `max_clients`, a thread and a handshake's
RSA work. Three rules keep a flood of half-open connections from locking real
clients out (issue 12):

  * one source holds at most `max_unjoined` connections that have not joined;
  * one source opens at most `rate` connections per second (a token bucket of
    burst 2 x rate; every accepted TCP connection takes a token, refused or not);
  * unjoined connections together hold at most `max_clients - reserve` slots.
    When they hold all of those, a newcomer still gets in and the OLDEST
    unjoined connection is closed in its place: a real client joins within
    milliseconds of connecting, while a flood's connections sit until the
    handshake timeout, so the flood's are the ones that go. The `reserve`
    (a tenth of max_clients, at least one) is room only joined clients hold.

A "source" is an IPv4 address, or an IPv6 /64 (one host is commonly given a
whole /64; an IPv4-mapped IPv6 address counts as its IPv4 address).

Pure: no sockets, no threads, no clock (time is passed in). The hub owns one
`Admission` and calls it under its lock; `LogThrottle` is the accept thread's.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_MAX_UNJOINED_PER_SOURCE = 16  # a household behind one NAT joining at once
DEFAULT_CONNECT_RATE_PER_SOURCE = 20  # per second; burst 2 x: a busy NAT reconnecting
RESERVE_DIVISOR = 10  # a tenth of max_clients is never held by unjoined connections
IPV6_SOURCE_PREFIX = 64
REFUSAL_LOG_INTERVAL_S = 10.0  # one log line per source per interval
LOG_THROTTLE_MAX_SOURCES = 4096  # sources the log throttle tracks at most
OTHER_SOURCES = "other sources"  # what the throttle counts beyond that


def source_of(ip: str) -> str:
    """The source a limit counts `ip` under: IPv4 as is, IPv6 by its /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip  # not an IP address (e.g. a test's fake): itself
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        net = ipaddress.IPv6Network((addr, IPV6_SOURCE_PREFIX), strict=False)
        return str(net)
    return str(addr)


def joined_reserve(max_clients: int) -> int:
    """Slots unjoined connections never hold: a tenth, at least 1, leaving them at least 1."""
    return min(max(1, max_clients // RESERVE_DIVISOR), max_clients - 1)


@dataclass
class Verdict:
    """What `Admission.admit` decided. Truthy when admitted."""

    admitted: bool
    why: str = ""  # one sentence for the refused client
    rule: str = ""  # "full", "per_source", "rate": which rule refused it
    detail: str = ""  # the same for the server's log
    evicted: Hashable | None = None  # the unjoined connection closed to make room

    def __bool__(self) -> bool:
        return self.admitted


class Source:
    """One source's books: its unjoined connections and its connect-rate bucket."""

    __slots__ = ("stamp", "tokens", "unjoined")

    def __init__(self, burst: float, now: float):
        self.unjoined = 0
        self.tokens = burst
        self.stamp = now


class Admission:
    """Per-source admission; the caller holds one lock around every call.

    Items are the caller's connection objects (hashable); `admit` counts an
    admitted one as unjoined until `release` (joined or closed, whichever first;
    a second release is a no-op).
    """

    def __init__(self, max_clients: int, max_unjoined: int = 0, rate: float = 0.0):
        self.max_clients = max_clients
        self.max_unjoined = max_unjoined  # 0 = no limit
        self.rate = rate  # connections per second per source; 0 = no limit
        self.burst = 2.0 * rate
        self.share = max_clients - joined_reserve(max_clients)  # most unjoined at once
        self._sources: dict[str, Source] = {}
        self._unjoined: OrderedDict[Hashable, str] = OrderedDict()  # item -> source, oldest first

    @property
    def unjoined(self) -> int:
        return len(self._unjoined)

    @property
    def sources(self) -> int:
        """Sources with books open (for tests: idle ones are forgotten)."""
        return len(self._sources)

    def unjoined_from(self, ip: str) -> int:
        src = self._sources.get(source_of(ip))
        return src.unjoined if src is not None else 0

    def admit(self, item: Hashable, ip: str, now: float, open_total: int) -> Verdict:
        """Decide on a new connection from `ip`; `open_total` counts every open one."""
        key = source_of(ip)
        src = self._sources.get(key)
        if src is None and (self.rate or self.max_unjoined):
            src = self._sources[key] = Source(self.burst, now)
        if self.rate and not self._take_token(src, now):
            return Verdict(
                False,
                f"too many new connections from your address (over {self.rate:g} per "
                "second); try again in a moment",
                "rate",
                f"over {self.rate:g} new connections per second from {key}",
            )
        if self.max_unjoined and src.unjoined >= self.max_unjoined:
            return Verdict(
                False,
                f"your address already has {src.unjoined} connections that have not "
                f"joined (the limit is {self.max_unjoined}); try later",
                "per_source",
                f"{src.unjoined} connections from {key} have not joined (the limit)",
            )
        if open_total >= self.max_clients:
            full = f"the server is full ({self.max_clients} connections)"
            return Verdict(False, f"{full}; try later", "full", full)
        evicted = None
        if len(self._unjoined) >= self.share:  # the oldest unjoined one makes room
            evicted, evicted_key = self._unjoined.popitem(last=False)
            self._forget(evicted_key)
        self._unjoined[item] = key
        if src is not None:
            src.unjoined += 1
        return Verdict(True, evicted=evicted)

    def release(self, item: Hashable) -> None:
        """`item` joined or ended: it no longer counts as unjoined."""
        key = self._unjoined.pop(item, None)
        if key is not None:
            self._forget(key)

    def _forget(self, key: str) -> None:
        src = self._sources.get(key)
        if src is None:
            return
        src.unjoined -= 1
        if src.unjoined == 0 and not self.rate:
            del self._sources[key]  # nothing else to remember about it

    def _take_token(self, src: Source, now: float) -> bool:
        src.tokens = min(self.burst, src.tokens + (now - src.stamp) * self.rate)
        src.stamp = now
        if src.tokens >= 1.0:
            src.tokens -= 1.0
            return True
        return False

    def sweep(self, now: float) -> None:
        """Forget sources with no unjoined connection whose bucket is full again."""
        if not self._sources:
            return
        refill_s = self.burst / self.rate if self.rate else 0.0
        idle = [
            key
            for key, src in self._sources.items()
            if src.unjoined == 0 and now - src.stamp >= refill_s
        ]
        for key in idle:
            del self._sources[key]


class LogThrottle:
    """At most one log line per source per `interval` seconds; counts the rest.

    `note(source, now)` returns None to stay silent, or what to log: the source
    (OTHER_SOURCES when too many are tracked) and the number of its refusals
    left unlogged since its last line (0 for the first).
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S):
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # source -> (last line, silent since)

    def note(self, source: str, now: float) -> tuple[str, int] | None:
        if source not in self._last and len(self._last) >= LOG_THROTTLE_MAX_SOURCES:
            self._sweep(now)
            if len(self._last) >= LOG_THROTTLE_MAX_SOURCES:
                source = OTHER_SOURCES  # a flood from very many sources: one line for all
        entry = self._last.get(source)
        if entry is not None and now - entry[0] < self.interval:
            self._last[source] = (entry[0], entry[1] + 1)
            return None
        self._last[source] = (now, 0)
        return source, entry[1] if entry is not None else 0

    def _sweep(self, now: float) -> None:
        for key in [k for k, (t, _) in self._last.items() if now - t >= self.interval]:
            del self._last[key]
