"""limits.py without sockets: per-source admission, the unjoined share, the log throttle.

Each test names the rule of issue 12 it checks (README "Limits").
"""

from __future__ import annotations

import pytest

import limits
from limits import Admission, LogThrottle, joined_reserve, source_of


class Item:
    """A stand-in for a connection: hashable by identity."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def admit_many(adm: Admission, ip: str, n: int, now: float = 0.0) -> list[Item]:
    items = []
    for i in range(n):
        item = Item(f"{ip}#{i}")
        verdict = adm.admit(item, ip, now, adm.unjoined)
        assert verdict, f"{item} refused: {verdict.why}"
        items.append(item)
    return items


@pytest.mark.parametrize(
    ("ip", "source"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),  # the same /64: one source
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_source_of_groups_ipv6_by_64(ip: str, source: str) -> None:
    """Limits: a source is an IPv4 address or an IPv6 /64 (a host often holds a whole /64)."""
    assert source_of(ip) == source


@pytest.mark.parametrize(("max_clients", "reserve"), [(1000, 100), (20, 2), (9, 1), (2, 1), (1, 0)])
def test_reserve_is_a_tenth_at_least_one(max_clients: int, reserve: int) -> None:
    """Limits: a tenth of max_clients (at least 1) is never held by unjoined connections,
    yet unjoined ones always have at least one slot (else nobody could ever join)."""
    assert joined_reserve(max_clients) == reserve


def test_max_unjoined_per_source() -> None:
    """--max-unjoined-per-ip: one more from that address is refused; other addresses are not;
    the count drops when one of them joins or ends."""
    adm = Admission(max_clients=1000, max_unjoined=3)
    first, *_ = admit_many(adm, "127.0.0.2", 3)
    refused = adm.admit(Item("4th"), "127.0.0.2", 0.0, 3)
    assert not refused and refused.rule == "per_source"
    assert "3" in refused.why and "127.0.0.2" in refused.detail
    assert adm.admit(Item("other"), "127.0.0.3", 0.0, 3)
    adm.release(first)  # it joined (or closed)
    adm.release(first)  # a second release is a no-op
    assert adm.unjoined_from("127.0.0.2") == 2
    assert adm.admit(Item("again"), "127.0.0.2", 0.0, 4)
    assert not adm.admit(Item("5th"), "127.0.0.2", 0.0, 5)


def test_connect_rate_bucket_of_burst_twice_the_rate() -> None:
    """--connect-rate-per-ip R: a burst of 2R, then R per second; refused ones take a token."""
    adm = Admission(max_clients=1000, rate=5)
    for i in range(10):
        item = Item(str(i))
        assert adm.admit(item, "127.0.0.2", 0.0, 0)
        adm.release(item)
    refused = adm.admit(Item("11th"), "127.0.0.2", 0.0, 0)
    assert not refused and refused.rule == "rate" and "5" in refused.why
    assert adm.admit(Item("elsewhere"), "127.0.0.3", 0.0, 0)
    assert not adm.admit(Item("early"), "127.0.0.2", 0.1, 0)  # half a token
    assert adm.admit(Item("later"), "127.0.0.2", 0.1 + 1 / 5, 0)


def test_full_refuses_before_evicting() -> None:
    """§2: with max_clients open (joined or not) a newcomer is refused, never let in."""
    adm = Admission(max_clients=4)
    assert not adm.admit(Item("x"), "127.0.0.9", 0.0, 4)
    assert adm.admit(Item("y"), "127.0.0.9", 0.0, 3)


def test_unjoined_share_full_evicts_the_oldest() -> None:
    """Limits: unjoined connections never hold the reserve; when they hold all the rest,
    a newcomer gets in and the oldest unjoined connection is closed in its place."""
    adm = Admission(max_clients=10, max_unjoined=16)  # reserve 1: a share of 9
    flood = admit_many(adm, "127.0.0.2", 5) + admit_many(adm, "127.0.0.3", 4)
    assert adm.unjoined == 9
    real = Item("real")
    verdict = adm.admit(real, "127.0.0.1", 1.0, 9)
    assert verdict and verdict.evicted is flood[0]
    assert adm.unjoined == 9 and adm.unjoined_from("127.0.0.2") == 4
    adm.release(flood[0])  # the hub closing the evicted one: already forgotten
    assert adm.unjoined == 9
    adm.release(real)  # it joined
    verdict = adm.admit(Item("next"), "127.0.0.1", 1.0, 9)
    assert verdict and verdict.evicted is None


def test_zero_turns_the_limits_off() -> None:
    """0 = no limit, for both flags; and nothing is remembered per source then."""
    adm = Admission(max_clients=1000)
    admit_many(adm, "127.0.0.2", 200)
    assert adm.sources == 0


def test_sources_are_forgotten() -> None:
    """Limits: per-source books do not outlive their use (memory under churn)."""
    adm = Admission(max_clients=1000, max_unjoined=16, rate=20)
    items = admit_many(adm, "127.0.0.2", 3) + admit_many(adm, "127.0.0.3", 1)
    for item in items:
        adm.release(item)
    adm.sweep(0.5)  # buckets not yet full again: kept
    assert adm.sources == 2
    adm.sweep(2.0)  # 2R tokens refill in 2 s
    assert adm.sources == 0
    adm = Admission(max_clients=1000, max_unjoined=16)  # no rate: forgotten at once
    (item,) = admit_many(adm, "127.0.0.2", 1)
    adm.release(item)
    assert adm.sources == 0


def test_log_throttle_one_line_per_source_per_interval() -> None:
    """Limits: refusals are logged at most once per source per interval, with a count."""
    throttle = LogThrottle(interval=10.0)
    assert throttle.note("127.0.0.2", 0.0) == ("127.0.0.2", 0)
    assert all(throttle.note("127.0.0.2", t) is None for t in (1.0, 2.0, 9.9))
    assert throttle.note("127.0.0.3", 1.0) == ("127.0.0.3", 0)
    assert throttle.note("127.0.0.2", 10.5) == ("127.0.0.2", 3)
    assert throttle.note("127.0.0.2", 11.0) is None


def test_log_throttle_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits: a flood from very many sources does not grow the throttle without bound."""
    monkeypatch.setattr(limits, "LOG_THROTTLE_MAX_SOURCES", 4)
    throttle = LogThrottle(interval=10.0)
    for i in range(4):
        assert throttle.note(f"10.0.0.{i}", 0.0) is not None
    assert throttle.note("10.0.0.9", 1.0) == (limits.OTHER_SOURCES, 0)
    assert throttle.note("10.0.0.10", 1.0) is None
    assert throttle.note("10.0.0.11", 20.0) == ("10.0.0.11", 0)  # the old ones swept
