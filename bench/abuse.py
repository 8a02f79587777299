"""Attacks on the server, measured (issue 12): each subcommand starts its own server.

    python3 bench/abuse.py cpu       # server CPU per 1 MiB of hostile records
    python3 bench/abuse.py flood     # real joins during a half-open flood from other addresses
    python3 bench/abuse.py parked    # RSS per joined client parking a partial record
    python3 bench/abuse.py stuck     # seconds until a reader that stopped is dropped
    python3 bench/abuse.py churn --minutes 10   # memory over a soak with clients replaced

`--server PATH` measures another server.py (e.g. /work/base/server.py) with the
same script, for before/after figures. Servers get only flags every version
knows; the per-source limits keep their defaults (the attacks come from
127.0.0.2 and up, the real clients from 127.0.0.1), except where a scenario
connects many clients from one address on purpose (`parked`): it turns them
off through the environment, which an older server ignores. Each subcommand
prints a few lines and one JSON line; clients are `tests/refpeer.py` peers.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import serverproc

sys.path.insert(0, str(serverproc.REPO / "tests"))
from refpeer import (
    PeerClosed,
    RefError,
    RefPeer,
    connect_and_join,
    encode_json,
    frame,
    make_key_message,
    read_plain_frame,
)

EXTRA_ENV: dict[str, str] = {}  # --env: for every server started
LIMITS_OFF = {"BCAST_MAX_UNJOINED_PER_IP": "0", "BCAST_CONNECT_RATE_PER_IP": "0"}
BIG_RECORD = 1_048_576  # §1: what a revision-1 server accepts
PING_AFTER_S = 30.0  # §4: a client idle for 30 s sends a ping


# --- servers and clients ---


@contextmanager
def server(
    keys: serverproc.KeyDir, path: Path, name: str, env: dict[str, str] | None = None, **flags: Any
) -> Iterator[serverproc.ServerProcess]:
    """A fresh server for one measurement; its state (if it keeps any) in the key folder."""
    log_path = keys.path / f"{name}.log"
    env = {"XDG_DATA_HOME": str(keys.path / "xdg"), **(env or {}), **EXTRA_ENV}
    proc = serverproc.ServerProcess(keys.key_file, log_path, path, env=env, **flags)
    with proc:
        proc.start()
        yield proc


def raw_socket(address: tuple[str, int], source: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(10.0)
    sock.connect(address)
    return sock


def open_peer(
    address: tuple[str, int], name: str, source: str | None = None, timeout: float = 10.0
) -> RefPeer:
    """A joined client (from `source` if given); RefError if refused."""
    if source is None:
        peer, reply = connect_and_join(*address, name, timeout=timeout)
        peer.welcome = reply  # type: ignore[attr-defined]
        return peer
    sock = raw_socket(address, source)
    hello = json.loads(read_plain_frame(sock))
    if hello.get("type") != "hello":
        sock.close()
        raise RefError(f"refused: {hello}")
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    peer = RefPeer(sock, hello, k_c2s, k_s2c, timeout)
    peer.send_raw(frame(encode_json(key_msg)))
    reply = peer.join(name, timeout)
    if reply.get("type") != "welcome":
        peer.close()
        raise RefError(f"join refused: {reply}")
    peer.welcome = reply  # type: ignore[attr-defined]
    return peer


class Drain:
    """A thread that reads everything a peer receives; `seen(pred)` waits for a message."""

    def __init__(self, peer: RefPeer):
        self.peer = peer
        self.msgs: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                batch = self.peer.recv_record(3600)
                with self.cond:
                    self.msgs.extend(batch)
                    self.cond.notify_all()
        except (PeerClosed, RefError, OSError, TimeoutError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> float | None:
        """Monotonic time at which a message matching `pred` was seen (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            start = 0
            while True:
                for msg in self.msgs[start:]:
                    if pred(msg):
                        return time.monotonic()
                start = len(self.msgs)
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self.cond.wait(left)


def cpu(pid: int) -> float:
    return serverproc.cpu_seconds(pid)


def settle_cpu(pid: int, quiet_s: float = 0.5, timeout: float = 120.0) -> float:
    """Server CPU seconds once it has stopped using CPU for `quiet_s`."""
    deadline = time.monotonic() + timeout
    last = cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = cpu(pid)
        if now - last < 0.02:
            return now
        last = now
    return last


def rss_mib(pid: int) -> float:
    return serverproc.rss_bytes(pid) / 2**20


# --- cpu: hostile records ---


def hostile_records(kind: str, max_record: int, one_record: bool) -> list[bytes]:
    """1 MiB of pings or says as plaintexts: one big record, or records of 64 messages."""
    msg = b'{"type":"ping"}' if kind == "ping" else b'{"type":"say","text":"x"}'
    if one_record:
        count = (BIG_RECORD - 16 - 2 + 1) // (len(msg) + 1)
        return [b"[" + b",".join([msg] * count) + b"]"]
    per = b"[" + b",".join([msg] * 64) + b"]"
    return [per] * (BIG_RECORD // (len(per) + 16 + 4))


class Pinger:
    """A bystander pinging every 20 ms meanwhile; `stop` returns the round trips (ms)."""

    def __init__(self, peer: RefPeer, drain: Drain):
        self.peer, self.drain = peer, drain
        self.rtts: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.done.is_set():
            i += 1
            t = time.monotonic()
            self.peer.send({"type": "ping", "id": i})
            if self.drain.wait(lambda m, i=i: m.get("type") == "pong" and m.get("id") == i, 10):
                self.rtts.append(1000 * (time.monotonic() - t))
            self.done.wait(0.02)

    def stop(self) -> list[float]:
        self.done.set()
        self.thread.join(15)
        return self.rtts


def cmd_cpu(args: argparse.Namespace, keys: serverproc.KeyDir) -> dict[str, Any]:
    """Server CPU for 1 MiB of hostile input: one 1 MiB record, or 64-message records."""
    out: dict[str, Any] = {}
    for kind in ("ping", "say"):
        for one_record in (True, False):
            label = f"{kind}s in {'one 1 MiB record' if one_record else '64-message records'}"
            with server(keys, args.server, f"cpu-{kind}-{one_record}") as srv:
                bystander = open_peer(srv.address, "bystander")
                by = Drain(bystander)
                attacker = open_peer(srv.address, "attacker", source="127.0.0.2")
                drain = Drain(attacker)
                time.sleep(0.3)
                plaintexts = hostile_records(kind, BIG_RECORD, one_record)
                count = sum(p.count(b"{") for p in plaintexts)
                before = settle_cpu(srv.pid)
                pinger = Pinger(bystander, by)
                t0 = time.monotonic()
                try:
                    for pt in plaintexts:
                        attacker.send_plaintext(pt)
                    attacker.send({"type": "ping", "id": "end"})
                except (PeerClosed, OSError):
                    pass
                done = drain.wait(lambda m: m.get("id") == "end", 120)
                after = settle_cpu(srv.pid)
                rtts = pinger.stop()
                out[label] = {
                    "messages": count,
                    "records": len(plaintexts),
                    "server_cpu_s": round(after - before, 3),
                    "cpu_ms_per_record": round(1000 * (after - before) / len(plaintexts), 2),
                    "processed": done is not None,
                    "closed": drain.closed,
                    "wall_s": round(time.monotonic() - t0, 2),
                    "bystander_ping_max_ms": round(max(rtts), 1) if rtts else None,
                }
                print(f"{label}: {out[label]}", flush=True)
                attacker.close()
                bystander.close()
    return out


# --- flood: half-open connections from other addresses ---


class Flooder:
    """Holds as many unjoined connections (hello read, nothing sent) as the server allows."""

    def __init__(self, address: tuple[str, int], sources: list[str], per_source_hz: float):
        self.address = address
        self.sources = sources
        self.gap = 1.0 / per_source_hz
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.opened = self.refused = 0
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in sources]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, source: str) -> None:
        while not self.stop.is_set():
            time.sleep(self.gap)
            try:
                sock = raw_socket(self.address, source)
                sock.settimeout(2.0)
                body = json.loads(read_plain_frame(sock))
            except (OSError, RefError, ValueError):
                self.refused += 1
                continue
            if body.get("type") == "hello":
                self.opened += 1
                self.held.append(sock)  # held until the server closes it (or we stop)
            else:
                self.refused += 1
                sock.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for sock in self.held:
            sock.close()


def cmd_flood(args: argparse.Namespace, keys: serverproc.KeyDir) -> dict[str, Any]:
    """Real joins (one every 0.5 s from 127.0.0.1) while other addresses flood."""
    out: dict[str, Any] = {}
    for n_sources in args.sources:
        sources = [f"127.0.0.{2 + i}" for i in range(n_sources)]
        name = f"flood-{n_sources}"
        with server(keys, args.server, name, max_clients=args.max_clients) as srv:
            flood = Flooder(srv.address, sources, args.per_source_hz)
            flood.start()
            time.sleep(args.head_start)
            ok = failed = 0
            for i in range(args.joins):
                t = time.monotonic()
                try:
                    peer = open_peer(srv.address, f"real{i}", timeout=5.0)
                    peer.send({"type": "leave"})
                    peer.close()
                    ok += 1
                except (RefError, OSError, TimeoutError, ValueError):
                    failed += 1
                time.sleep(max(0.0, 0.5 - (time.monotonic() - t)))
            flood.close()
            out[f"{n_sources} flooding address(es)"] = {
                "joins_ok": ok,
                "joins_tried": ok + failed,
                "flood_connections_opened": flood.opened,
                "flood_refused": flood.refused,
            }
            print(name, out[f"{n_sources} flooding address(es)"], flush=True)
    return out


# --- parked: partial records held by joined clients ---


def cmd_parked(args: argparse.Namespace, keys: serverproc.KeyDir) -> dict[str, Any]:
    """RSS per joined client that parks all but one byte of a largest record."""
    with server(keys, args.server, "parked", env=LIMITS_OFF, max_clients=args.clients + 64) as srv:
        time.sleep(0.5)
        base = rss_mib(srv.pid)
        peers = [open_peer(srv.address, f"p{i}") for i in range(args.clients)]
        time.sleep(2.0)
        joined = rss_mib(srv.pid)
        # §1: the server's R as its welcome announces it (revision 1: 1 MiB)
        limit = args.record or peers[0].welcome.get("max_record", BIG_RECORD)
        for p in peers:  # §1: the length of a largest record, then all of it but one byte
            p.send_raw(struct.pack(">I", limit) + b"\0" * (limit - 1))
        time.sleep(3.0)
        parked = rss_mib(srv.pid)
        alive = 0
        for p in peers:
            try:
                p.sock.setblocking(False)
                if p.sock.recv(1, socket.MSG_PEEK) == b"":
                    continue
            except BlockingIOError:
                pass
            except OSError:
                continue
            alive += 1
        for p in peers:
            p.close()
    out = {
        "clients": args.clients,
        "record_bytes": limit,
        "rss_before_mib": round(base, 1),
        "rss_joined_mib": round(joined, 1),
        "rss_parked_mib": round(parked, 1),
        "kib_per_parked_frame": round((parked - joined) * 1024 / args.clients, 1),
        "kib_per_client_in_all": round((parked - base) * 1024 / args.clients, 1),
        "still_connected": alive,
    }
    print(out, flush=True)
    return out


# --- stuck: a reader that stops for good ---


def cmd_stuck(args: argparse.Namespace, keys: serverproc.KeyDir) -> dict[str, Any]:
    """Seconds from the first say until a client that never reads is dropped as slow."""
    # idle timeout out of the way: only the slow-consumer rules may drop the stuck reader
    with server(keys, args.server, "stuck", idle_timeout=3600) as srv:
        stuck = open_peer(srv.address, "stuck")  # joined, then never reads again
        observer = open_peer(srv.address, "observer")
        obs = Drain(observer)
        sender = open_peer(srv.address, "sender")
        Drain(sender)
        text = "x" * args.text
        t0 = time.monotonic()
        dropped = None
        n = 0
        while time.monotonic() - t0 < args.timeout:
            sender.send({"type": "say", "text": text})
            n += 1
            hit = obs.wait(
                lambda m: m.get("type") == "left" and m.get("name") == "stuck",
                max(0.0, t0 + n / args.rate - time.monotonic()),
            )
            if hit is not None:
                dropped = hit - t0
                break
            if obs.closed:
                raise RuntimeError("the observer was closed; see the server log")
        reason = next((m.get("reason") for m in obs.msgs if m.get("type") == "left"), None)
        for p in (stuck, observer, sender):
            p.close()
    out = {
        "rate_per_s": args.rate,
        "text_bytes": args.text,
        "says_sent": n,
        "dropped_after_s": round(dropped, 1) if dropped is not None else None,
        "reason": reason,
    }
    print(out, flush=True)
    return out


# --- churn: a soak with clients replaced ---


class ChurnClient:
    def __init__(self, peer: RefPeer):
        self.peer = peer
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        """Read everything; like a real client, ping every 30 s (§4 Timeouts), so that only
        the churn ends connections (says are too rare to keep 200 clients alive)."""
        due = time.monotonic() + PING_AFTER_S
        try:
            while True:
                try:
                    self.peer.recv_record(max(0.05, due - time.monotonic()))
                except TimeoutError:
                    pass
                if time.monotonic() >= due:
                    self.peer.send({"type": "ping"})
                    due += PING_AFTER_S
        except (PeerClosed, RefError, OSError, ValueError):
            pass
        self.peer.close()

    def end(self, how: str) -> None:
        sock = self.peer.sock
        try:
            if how == "reset":  # RST: linger 0, the reader thread's close sends it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
            elif how == "close":
                sock.shutdown(socket.SHUT_RDWR)
            else:
                self.peer.send({"type": "leave"})
        except OSError:
            pass


def cmd_churn(args: argparse.Namespace, keys: serverproc.KeyDir) -> dict[str, Any]:
    """N clients chat lightly; `per_second` of them are replaced every second (reset, close,
    leave in turn). RSS is sampled every `sample_s`; `warm` is RSS after the first minute."""
    flags = {"max_clients": args.clients + 64}
    with server(keys, args.server, "churn", **flags) as srv:
        time.sleep(0.5)
        base = rss_mib(srv.pid)
        seq = 0
        clients: list[ChurnClient] = []

        def newcomer() -> None:
            nonlocal seq
            seq += 1
            clients.append(ChurnClient(open_peer(srv.address, f"c{seq}")))

        for _ in range(args.clients):  # within the default connect rate (20/s, burst 40)
            newcomer()
            time.sleep(1 / 15)
        time.sleep(2)
        joined = rss_mib(srv.pid)
        print(f"base {base:.1f} MiB, {args.clients} joined {joined:.1f} MiB", flush=True)
        rng = random.Random(12)
        ways = ("reset", "close", "leave")
        t0 = time.monotonic()
        samples: list[tuple[float, float, int]] = []
        next_sample = next_churn = next_say = t0
        replaced = 0
        end = t0 + args.minutes * 60
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_churn and args.per_second > 0:
                victim = clients.pop(rng.randrange(len(clients)))
                victim.end(ways[replaced % 3])
                replaced += 1
                try:
                    newcomer()
                except (RefError, OSError, TimeoutError) as exc:
                    print(f"a newcomer failed: {exc}", flush=True)
                next_churn += 1 / args.per_second
            if now >= next_say and args.says_per_second > 0:
                try:
                    rng.choice(clients).peer.send({"type": "say", "text": "soak " * 10})
                except (PeerClosed, OSError):
                    pass
                next_say += 1 / args.says_per_second
            if now >= next_sample:
                r = rss_mib(srv.pid)
                samples.append((now - t0, r, serverproc.thread_count(srv.pid)))
                print(
                    f"{now - t0:6.0f} s  rss {r:7.1f} MiB  threads {samples[-1][2]}  "
                    f"replaced {replaced}",
                    flush=True,
                )
                next_sample += args.sample_s
            time.sleep(max(0.0, min(next_churn, next_say, next_sample) - time.monotonic()))
        final = rss_mib(srv.pid)
        for c in clients:
            c.end("leave")
        for c in clients:
            c.thread.join(10)
        time.sleep(5)
        after = rss_mib(srv.pid)
        threads_after = serverproc.thread_count(srv.pid)
    warm = next((r for t, r, _ in samples if t >= 60), samples[-1][1])
    out = {
        "clients": args.clients,
        "replaced": replaced,
        "minutes": args.minutes,
        "rss_base_mib": round(base, 1),
        "rss_joined_mib": round(joined, 1),
        "rss_warm_mib": round(warm, 1),
        "rss_end_mib": round(final, 1),
        "rss_max_mib": round(max(r for _, r, _ in samples), 1),
        "end_over_warm": round(final / warm, 3),
        "kib_per_replaced_after_warm": round((final - warm) * 1024 / max(1, replaced), 1),
        "rss_after_all_left_mib": round(after, 1),
        "threads_after_all_left": threads_after,
        "samples": [(round(t), round(r, 1)) for t, r, _ in samples],
    }
    print({k: v for k, v in out.items() if k != "samples"}, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/abuse.py", description=__doc__.split("\n")[0])
    parser.add_argument("--server", type=Path, default=serverproc.SERVER, help="server.py to run")
    parser.add_argument(
        "--env", type=json.loads, default={}, help='extra server environment, e.g. \'{"A": "1"}\''
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cpu", help="server CPU per 1 MiB of hostile records")
    p = sub.add_parser("flood", help="joins during a half-open flood")
    p.add_argument("--sources", type=int, nargs="+", default=[1, 40])
    p.add_argument("--max-clients", type=int, default=200)
    p.add_argument("--joins", type=int, default=40)
    p.add_argument("--per-source-hz", type=float, default=100.0)
    p.add_argument("--head-start", type=float, default=3.0)
    p = sub.add_parser("parked", help="RSS per parked partial record")
    p.add_argument("--clients", type=int, default=120)
    p.add_argument("--record", type=int, default=0, help="frame length to park (default 1 MiB)")
    p = sub.add_parser("stuck", help="seconds until a stuck reader is dropped")
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--text", type=int, default=16000)
    p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("churn", help="memory over a soak with churn")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--per-second", type=float, default=3.0)
    p.add_argument("--says-per-second", type=float, default=2.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    EXTRA_ENV.update(args.env)
    serverproc.raise_nofile(4096)
    with serverproc.KeyDir() as keys:
        result = globals()[f"cmd_{args.cmd}"](args, keys)
    print(json.dumps({"abuse": args.cmd, "server": str(args.server), "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
