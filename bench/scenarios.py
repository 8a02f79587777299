"""The four scenarios: each drives a running server with generator worker processes.

The clients are shared round-robin between `workers` processes (forked), each
with its own `loadgen.Engine`. The parent only coordinates, over pipes: every
worker connects and joins its clients and says "ready"; the parent reads the
server's CPU time and says "go"; each worker reports its measured window, then
its verification. Times are time.monotonic_ns, one clock for all processes.

Every phase has a deadline, so a run that goes wrong ends with an error
instead of hanging; the caller (run.py) kills the server in any case.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import loadgen
import serverproc
from loadgen import Engine, Sender

JOIN_TIMEOUT_S = 45.0  # connecting and joining every client of a run
TRAFFIC_TIMEOUT_S = 40.0  # from "go" to the last delivery
PIPE_SLACK_S = 15.0  # extra time the parent allows for verification and reporting
JOIN_INFLIGHT = 500  # handshakes under way at once while setting a run up
# idle: start connections for IDLE_CONNECT_FOR_S at most and wait IDLE_JOIN_S at most
# for them to settle, so that a run stays under two minutes even on a server too
# slow to join N clients in that time; the figures then say how many joined.
# (5,000 handshakes at ~150/s take ~35 s; the time to join is not what idle measures.)
IDLE_CONNECT_FOR_S = 75.0
IDLE_JOIN_S = 85.0
IDLE_INFLIGHT = 100
BROADCAST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Spec:
    """What a worker needs: where the server is and which clients are its own."""

    scenario: str
    address: tuple[str, int]
    spki: bytes
    indices: list[int]
    n_total: int
    params: dict[str, Any]


# --- the worker side ---


def _worker_main(pipe: Connection, spec: Spec) -> None:
    engine: Engine | None = None
    try:
        serverproc.raise_nofile(len(spec.indices) + 256)
        identity = bool(spec.params.get("identity", 0))  # §5 proofs in every join
        engine = Engine(spec.address, spec.spki, spec.indices, spec.n_total, identity)
        WORKERS[spec.scenario](engine, pipe, spec)
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        pipe.send(("error", detail, traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close_all()
        pipe.close()


def _await(pipe: Connection, word: str) -> int:
    """Block until the parent says `word` ("go", "close"); returns its argument."""
    message = pipe.recv()
    if message[0] != word:
        raise RuntimeError(f"expected {word}, got {message[0]}")
    return message[1]


def _traffic_worker(engine: Engine, pipe: Connection, spec: Spec) -> None:
    """fanout and latency: senders are clients 0..K-1; every client receives."""
    p = spec.params
    k, per_sender = p["K"], p["M"]
    engine.join_all(JOIN_INFLIGHT, JOIN_TIMEOUT_S)
    local = engine.clients
    window = p.get("window", 1)
    senders = [Sender(c, per_sender, window) for c in local if c.idx < k]
    # Designated receivers see each local sender's messages and open its window.
    if p["mode"] == "window":
        d0, d1 = local[0], local[1]
        d0.acks_for = {loadgen.sender_tag(s.client.idx): s for s in senders if s.client is not d0}
        d1.acks_for = {loadgen.sender_tag(s.client.idx): s for s in senders if s.client is d0}
    pipe.send(("ready", {}))
    start_ns = _await(pipe, "go")
    cpu0 = time.process_time()
    engine.start_receiving(local, lambda c: per_sender * (k - (1 if c.idx < k else 0)))
    if p["mode"] == "window":
        engine.ready.update(senders)
        per_record = p.get("per_record", 1)

        def tick() -> float | None:
            for snd in engine.ready:
                engine.send_window(snd, per_record)
            engine.ready.clear()
            return None

    else:
        tick = _paced_ticker(engine, senders, start_ns, p["rate"], k)
    engine.pump(
        lambda: engine.remaining == 0, time.monotonic() + TRAFFIC_TIMEOUT_S, tick, "traffic"
    )
    cpu = time.process_time() - cpu0
    pipe.send(
        (
            "window",
            {
                "first_ns": min((s.first_ns for s in senders), default=0),
                "last_ns": max(c.last_ns for c in local),
                "deliveries": sum(c.got for c in local),
                "records": sum(c.nrecords for c in local),
                "sent": sum(s.sent for s in senders),
                "cpu_s": cpu,
            },
        )
    )
    counts = {"lost": 0, "duplicated": 0, "out_of_order": 0}
    latencies = array("q")
    for c in local:
        expected = [s for s in range(k) if s != c.idx]
        found, lat = loadgen.verify(c, expected, per_sender)
        for key in counts:
            counts[key] += found[key]
        latencies.extend(lat)
    pipe.send(
        ("result", {**counts, "latencies": latencies.tobytes(), "anomalies": engine.anomalies})
    )
    _await(pipe, "close")  # closing now would send `left` to other workers' clients


def _paced_ticker(
    engine: Engine, senders: list[Sender], start_ns: int, rate: float, k: int
) -> Callable[[], float | None]:
    """Each sender sends one say every 1/rate s, the senders evenly staggered."""
    period_ns = int(1e9 / rate)
    next_ns = {s: start_ns + s.client.idx * period_ns // k for s in senders}

    def tick() -> float | None:
        now = time.monotonic_ns()
        for snd, due in next_ns.items():
            if snd.sent < snd.total and due <= now:
                engine.send_says(snd, 1, 1)
                next_ns[snd] = due + period_ns
        pending = [due for snd, due in next_ns.items() if snd.sent < snd.total]
        return min(pending) / 1e9 if pending else None  # monotonic seconds

    return tick


def _storm_worker(engine: Engine, pipe: Connection, spec: Spec) -> None:
    pipe.send(("ready", {}))
    _await(pipe, "go")
    cpu0 = time.process_time()
    engine.welcome_all(len(engine.clients), JOIN_TIMEOUT_S)
    pipe.send(
        (
            "window",
            {
                "first_ns": min(c.connect_ns for c in engine.clients),
                "last_ns": max(c.welcome_ns for c in engine.clients),
                "cpu_s": time.process_time() - cpu0,
            },
        )
    )
    pipe.send(("result", {"anomalies": engine.anomalies}))
    _await(pipe, "close")  # closing now would send `left` to other workers' clients


def _idle_worker(engine: Engine, pipe: Connection, spec: Spec) -> None:
    """Join as many clients as the time bound allows, then one broadcast to all of them."""
    t0 = time.monotonic()
    settled = engine.join_all(IDLE_INFLIGHT, IDLE_JOIN_S, IDLE_CONNECT_FOR_S, must=False)
    joined = engine.clients
    pipe.send(
        (
            "ready",
            {
                "join_s": time.monotonic() - t0,
                "joined": len(joined),
                "settled": sum(c.settled for c in joined),
                "complete": settled,
            },
        )
    )
    _await(pipe, "go")
    cpu0 = time.process_time()
    speaker = next((c for c in joined if c.idx == 0), None)
    engine.start_receiving(joined, lambda c: 0 if c.idx == 0 else 1)
    for c in joined:
        c.keep = False
    sent_ns = 0
    if speaker is not None:
        sent_ns = time.monotonic_ns()
        plaintext = b'[{"type":"say","text":"%s"}]' % (b"x" * loadgen.TEXT_BYTES)
        engine.send(speaker, speaker.seal(plaintext))
    deadline = time.monotonic() + BROADCAST_TIMEOUT_S
    engine.pump(lambda: engine.remaining == 0, deadline, None, "idle", must=False)
    listeners = [c for c in joined if c is not speaker]
    window = {
        "first_ns": sent_ns,
        "last_ns": max((c.last_ns for c in listeners), default=0),
        "reached": sum(1 for c in listeners if c.got),
        "listeners": len(listeners),
        "cpu_s": time.process_time() - cpu0,
    }
    pipe.send(("window", window))
    pipe.send(("result", {"anomalies": engine.anomalies}))
    _await(pipe, "close")  # closing now would send `left` to other workers' clients


WORKERS: dict[str, Callable[[Engine, Connection, Spec], None]] = {
    "fanout": _traffic_worker,
    "latency": _traffic_worker,
    "storm": _storm_worker,
    "idle": _idle_worker,
}


# --- the parent side ---


class WorkerError(RuntimeError):
    pass


class Workers:
    """Forked worker processes, one pipe each; all are ended when the block exits."""

    def __init__(
        self, scenario: str, server: serverproc.ServerProcess, spki: bytes, p: dict[str, Any]
    ):
        n = p["N"]
        count = max(1, min(p.get("workers", 1), n // 2))
        ctx = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for w in range(count):
            spec = Spec(scenario, server.address, spki, list(range(w, n, count)), n, p)
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, spec), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def gather(self, phase: str, timeout: float) -> list[dict[str, Any]]:
        """One `phase` message from every worker, in worker order."""
        deadline = time.monotonic() + timeout
        got: dict[int, dict[str, Any]] = {}
        while len(got) < len(self.pipes):
            left = deadline - time.monotonic()
            pending = [p for i, p in enumerate(self.pipes) if i not in got]
            ready = wait(pending, timeout=max(0.0, left))
            if not ready:
                raise WorkerError(f"workers did not report {phase} within {timeout:.0f} s")
            for pipe in ready:
                try:
                    message = pipe.recv()
                except EOFError:
                    raise WorkerError("a worker died") from None
                if message[0] == "error":
                    print(message[2], file=sys.stderr)
                    raise WorkerError(f"worker failed: {message[1]}")
                if message[0] != phase:
                    raise WorkerError(f"expected {phase}, got {message[0]}")
                got[self.pipes.index(pipe)] = message[1]
        return [got[i] for i in range(len(self.pipes))]

    def go(self, start_ns: int = 0) -> None:
        for pipe in self.pipes:
            pipe.send(("go", start_ns))

    def close(self) -> None:
        """Let the workers close their clients (all at once), then end them."""
        for pipe in self.pipes:
            try:
                pipe.send(("close", 0))
            except OSError:
                pass  # that worker is gone already
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in self.pipes:
            pipe.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerMeter:
    """The server's CPU time (user and system) and wall time from start() to stop()."""

    def __init__(self, pid: int):
        self.pid = pid
        self.user0, self.sys0 = serverproc.cpu_times(pid)
        self.busy0, self.steal0 = serverproc.machine_busy_seconds()
        self.wall0 = time.monotonic()
        self.figures: dict[str, float] = {}

    def stop(self) -> None:
        user, system = serverproc.cpu_times(self.pid)
        busy, steal = serverproc.machine_busy_seconds()
        self.busy, self.steal = busy - self.busy0, steal - self.steal0
        self.wall = time.monotonic() - self.wall0
        user, system = user - self.user0, system - self.sys0
        self.figures = {
            "server_cpu_s": user + system,
            "server_cpu_pct": 100 * (user + system) / self.wall,
            "server_sys_pct": 100 * system / self.wall,
        }

    def generator(self, gen_cpu: float) -> dict[str, float]:
        """The generator's share, what the rest of the machine used, and steal meanwhile."""
        other = self.busy - self.figures["server_cpu_s"] - gen_cpu
        return {
            "gen_cpu_s": gen_cpu,
            "gen_cpu_pct": 100 * gen_cpu / self.wall,
            "other_cpu_pct": 100 * max(0.0, other) / self.wall,
            "steal_pct": 100 * self.steal / self.wall,
        }


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


def _merge_anomalies(results: list[dict[str, Any]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for r in results:
        for kind, n in r.get("anomalies", {}).items():
            merged[kind] = merged.get(kind, 0) + n
    return merged


def run_traffic(
    server: serverproc.ServerProcess,
    spki: bytes,
    p: dict[str, Any],
    on_go: Callable[[], None] | None = None,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """fanout (window mode) and latency (paced mode); returns the run's figures.

    `on_go` runs once every client has joined, just before the traffic starts;
    `on_window` right after its last delivery (profile_fanout.py attaches there).
    """
    with Workers(p["scenario"], server, spki, p) as workers:
        workers.gather("ready", JOIN_TIMEOUT_S + PIPE_SLACK_S)
        if on_go is not None:
            on_go()
        meter = ServerMeter(server.pid)
        workers.go(time.monotonic_ns() + 50_000_000)  # paced senders start together
        windows = workers.gather("window", TRAFFIC_TIMEOUT_S + PIPE_SLACK_S)
        meter.stop()
        rss = serverproc.rss_bytes(server.pid)
        if on_window is not None:
            on_window()
        results = workers.gather("result", TRAFFIC_TIMEOUT_S + PIPE_SLACK_S)
    first = min(w["first_ns"] for w in windows if w["first_ns"])
    last = max(w["last_ns"] for w in windows)
    span = (last - first) / 1e9
    latencies = array("q")
    for r in results:
        latencies.frombytes(r["latencies"])
    ordered = sorted(latencies)
    gen_cpu = sum(w["cpu_s"] for w in windows)
    deliveries = sum(w["deliveries"] for w in windows)
    return {
        "deliveries_per_s": deliveries / span,
        "sent_per_s": sum(w["sent"] for w in windows) / span,
        "lat_p50_ms": _percentile(ordered, 0.50) / 1e6,
        "lat_p99_ms": _percentile(ordered, 0.99) / 1e6,
        "lat_max_ms": (ordered[-1] if ordered else float("nan")) / 1e6,
        "lost": sum(r["lost"] for r in results),
        "duplicated": sum(r["duplicated"] for r in results),
        "out_of_order": sum(r["out_of_order"] for r in results),
        "deliveries": deliveries,
        "msgs_per_record": deliveries / max(1, sum(w["records"] for w in windows)),
        "window_s": span,
        **meter.figures,
        **meter.generator(gen_cpu),
        "server_rss_mib": rss / 2**20,
        "anomalies": _merge_anomalies(results),
    }


def run_storm(
    server: serverproc.ServerProcess,
    spki: bytes,
    p: dict[str, Any],
    on_go: Callable[[], None] | None = None,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """N clients connect at once and join; hooks as for run_traffic."""
    n = p["N"]
    with Workers("storm", server, spki, p) as workers:
        workers.gather("ready", JOIN_TIMEOUT_S)  # handshake material made before "go"
        if on_go is not None:
            on_go()
        meter = ServerMeter(server.pid)
        workers.go()
        windows = workers.gather("window", JOIN_TIMEOUT_S + PIPE_SLACK_S)
        meter.stop()
        if on_window is not None:
            on_window()
        results = workers.gather("result", PIPE_SLACK_S)
    span = (max(w["last_ns"] for w in windows) - min(w["first_ns"] for w in windows)) / 1e9
    gen_cpu = sum(w["cpu_s"] for w in windows)
    return {
        "handshakes_per_s": n / span,
        "storm_s": span,
        **meter.figures,
        "server_cpu_ms_per_handshake": 1000 * meter.figures["server_cpu_s"] / n,
        **meter.generator(gen_cpu),
        "anomalies": _merge_anomalies(results),
    }


def run_idle(
    server: serverproc.ServerProcess,
    spki: bytes,
    p: dict[str, Any],
    on_go: Callable[[], None] | None = None,
    on_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """N clients join (in waves) and stay idle; then one broadcast. Hooks span the joining."""
    time.sleep(0.3)  # let the fresh server finish starting before the baseline
    baseline = serverproc.rss_bytes(server.pid)
    if on_go is not None:
        on_go()
    with Workers("idle", server, spki, p) as workers:
        ready = workers.gather("ready", IDLE_JOIN_S + PIPE_SLACK_S)
        joined = sum(r["joined"] for r in ready)
        if on_window is not None:
            on_window()
        time.sleep(p.get("settle_s", 1.0))  # writers back asleep, buffers returned
        rss = serverproc.rss_bytes(server.pid)
        threads = serverproc.thread_count(server.pid)
        meter = ServerMeter(server.pid)
        workers.go()
        windows = workers.gather("window", BROADCAST_TIMEOUT_S + PIPE_SLACK_S)
        meter.stop()
        results = workers.gather("result", PIPE_SLACK_S)
    sent = max(w["first_ns"] for w in windows)  # only the speaker's worker has one
    reached = sum(w["reached"] for w in windows)
    everyone = reached == sum(w["listeners"] for w in windows)
    last = max(w["last_ns"] for w in windows)
    return {
        "joined": joined,
        "rss_per_client_kib": (rss - baseline) / max(1, joined) / 1024,
        "broadcast_ms": (last - sent) / 1e6 if everyone else None,
        "broadcast_reached": reached,
        "join_s": max(r["join_s"] for r in ready),
        "join_complete": all(r["complete"] for r in ready),
        "server_rss_baseline_mib": baseline / 2**20,
        "server_rss_mib": rss / 2**20,
        "server_threads": threads,
        **meter.figures,
        **meter.generator(sum(w["cpu_s"] for w in windows)),
        "anomalies": _merge_anomalies(results),
    }


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "fanout": run_traffic,
    "latency": run_traffic,
    "storm": run_storm,
    "idle": run_idle,
}


def rsa_bound(key_file: Any, count: int = 200) -> dict[str, float]:
    """The server's handshake crypto alone, in this process, with the server's own code.

    `rsa_decrypts_per_s`: pycryptodome RSA-3072 OAEP-SHA256 decryptions on one
    thread. pycryptodome releases the GIL in its modular exponentiation (two
    threads reach ~1.7x this), but the rest of a handshake holds it, so in
    practice this is close to a one-process server's ceiling.
    `server_keys_per_s`: the whole of crypto_utils.server_keys (RSA + X25519 + HKDF).
    Each is the faster of two halves of `count`: a bound, so the least disturbed.
    """
    if str(serverproc.REPO) not in sys.path:
        sys.path.append(str(serverproc.REPO))
    import crypto_utils  # the server's own module

    key = crypto_utils.load_or_create_server_key(key_file)
    spki = crypto_utils.spki_der(key)
    material = loadgen.server_spki_material(spki, count)
    peers = [crypto_utils.Ephemeral().public for _ in range(count)]
    nonce = bytes(32)
    half = count // 2
    rsa_s = full_s = float("inf")
    for part in (slice(0, half), slice(half, count)):
        t0 = time.perf_counter()
        for wrapped, secret in material[part]:
            if crypto_utils.unwrap_secret(key, wrapped) != secret:
                raise RuntimeError("RSA round trip failed")
        rsa_s = min(rsa_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for (wrapped, _), peer in zip(material[part], peers[part]):
            eph = crypto_utils.Ephemeral()
            crypto_utils.server_keys(key, spki, nonce, eph, nonce, wrapped, peer)
        full_s = min(full_s, time.perf_counter() - t0)
    return {"rsa_decrypts_per_s": half / rsa_s, "server_keys_per_s": half / full_s}
