"""Run the bcast benchmark scenarios against the real server.py and print the figures.

    python3 bench/run.py                      # the standard set, 3 runs each
    python3 bench/run.py --quick              # small sizes, a smoke run (< 30 s)
    python3 bench/run.py fanout storm --runs 1
    python3 bench/run.py 'fanout:N=50,K=5,M=200' --workers 2
    python3 bench/run.py 'storm:N=500' 'storm:N=500,identity=1' --interleave

A scenario is a name (its standard sizes) or name:key=value,... to change them.
Each run starts a fresh server (one key made for the whole session) with a
fresh state file, so runs do not share state. Prints a table of medians per
scenario, a summary against the targets, and one JSON line per scenario; the
same goes to bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import scenarios
import serverproc

RESULTS = Path(__file__).resolve().parent / "results"

# The standard set (the targets are for these sizes) and its quick twin.
# fanout: each of K senders sends M says of 100 bytes, at most `window` unseen at a time.
STANDARD: list[tuple[str, dict[str, Any]]] = [
    ("fanout", {"N": 200, "K": 200, "M": 50, "window": 4}),
    ("fanout", {"N": 10, "K": 10, "M": 3000, "window": 64}),
    ("latency", {"N": 100, "K": 10, "rate": 20, "M": 100}),
    ("storm", {"N": 500}),
    ("idle", {"N": 5000}),
]
QUICK: list[tuple[str, dict[str, Any]]] = [
    ("fanout", {"N": 20, "K": 20, "M": 50, "window": 4}),
    ("fanout", {"N": 10, "K": 10, "M": 300, "window": 64}),
    ("latency", {"N": 20, "K": 5, "rate": 20, "M": 20}),
    ("storm", {"N": 50}),
    ("idle", {"N": 200}),
]
DEFAULTS: dict[str, dict[str, Any]] = {
    "fanout": {"N": 200, "K": 200, "M": 50, "window": 4, "per_record": 1, "mode": "window"},
    "latency": {"N": 100, "K": 10, "rate": 20, "M": 100, "mode": "paced"},
    "storm": {"N": 500},
    "idle": {"N": 5000, "settle_s": 1.0},
}
# (scenario, params that must match, metric, comparison, bound) from the issue.
TARGETS: list[tuple[str, dict[str, int], str, str, float | str]] = [
    ("fanout", {"N": 200, "K": 200}, "deliveries_per_s", ">=", 300_000),
    ("fanout", {"N": 10, "K": 10}, "deliveries_per_s", ">=", 50_000),
    ("fanout", {}, "lost", "==", 0),
    ("fanout", {}, "duplicated", "==", 0),
    ("fanout", {}, "out_of_order", "==", 0),
    ("latency", {"N": 100, "K": 10, "rate": 20}, "lat_p99_ms", "<=", 20),
    ("latency", {}, "lost", "==", 0),
    ("storm", {"N": 500}, "handshakes_per_s", ">=", 250),
    ("storm", {}, "rsa_decrypts_per_s", "info", "the RSA-3072 bound, beside it"),
    ("storm", {}, "server_keys_per_s", "info", "all handshake crypto, beside it"),
    ("storm", {}, "storm_vs_rsa", "info", "handshakes/s over the RSA bound (target's: 250/330)"),
    ("idle", {}, "joined", ">=", "N"),  # every client joined within the run's time bound
    ("idle", {"N": 5000}, "rss_per_client_kib", "<=", 64),
    ("idle", {"N": 5000}, "broadcast_ms", "<=", 1000),
]
# Error counters are summed over the runs, not taken as a median: one is too many.
SUMMED = ("lost", "duplicated", "out_of_order")
# other_cpu_pct + steal_pct above this (other programs on the machine, and time the
# hypervisor gave to other machines, in % of one core) marks a run as disturbed: on
# 2 cores, a neighbour taking a fifth of a core already moves the figures.
DISTURBED_PCT = 20.0
SERVER_FLAGS = {
    "rate": 0,  # no rate limit: we measure throughput
    "idle_timeout": 3600,
    "handshake_timeout": 120,  # a wave of thousands of handshakes takes a while
    "send_timeout": 30,  # the generator may lag a little; that is not a slow client
    "max_pending": 256 * 2**20,
}
_RUN_IDS = itertools.count()  # names each run's server log and state file


def parse_scenario(text: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,...` into (name, params)."""
    name, _, rest = text.partition(":")
    if name not in DEFAULTS:
        raise argparse.ArgumentTypeError(f"unknown scenario {name!r}; one of {list(DEFAULTS)}")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        params[key] = float(value) if "." in value else int(value)
    return name, params


def plan(names: list[str], quick: bool) -> list[tuple[str, dict[str, Any]]]:
    base = QUICK if quick else STANDARD
    if not names:
        chosen = list(base)
    else:
        chosen = []
        for text in names:
            name, params = parse_scenario(text)
            if params:
                chosen.append((name, params))
            else:
                chosen += [(n, dict(p)) for n, p in base if n == name]
    return [(name, {**DEFAULTS[name], **p, "scenario": name}) for name, p in chosen]


def label(name: str, params: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("scenario", "mode", "settle_s")}
    return name + " " + " ".join(f"{k}={v}" for k, v in shown.items())


def run_one(
    keys: serverproc.KeyDir,
    name: str,
    params: dict[str, Any],
    run: int,
    server_cpus: str | None = None,
    server_path: Path = serverproc.SERVER,
) -> dict[str, Any]:
    """One run: a fresh server, the scenario, the server stopped whatever happens."""
    extra: dict[str, Any] = {}
    if name == "storm":
        time.sleep(0.5)  # the previous run's server and sockets are gone
        extra = scenarios.rsa_bound(keys.key_file)  # before the server, undisturbed
    tag = f"{name}-{params['N']}-{run}-{next(_RUN_IDS)}"
    log_path = keys.path / f"{tag}.log"
    # A fresh state file per run, never the user's: runs with identity=1 bind names (§5),
    # and a server holds its state file locked. Through the environment (BCAST_STATE),
    # so that a server from before --state (an A/B with --server) still starts.
    os.environ["BCAST_STATE"] = str(keys.path / f"{tag}.db")
    flags = {**SERVER_FLAGS, "max_clients": params["N"] + 64}
    t0 = time.monotonic()
    try:
        with serverproc.ServerProcess(keys.key_file, log_path, server_path, **flags) as server:
            server.start(["taskset", "-c", server_cpus] if server_cpus else None)
            figures = scenarios.RUNNERS[name](server, keys.spki, params)
    except Exception as exc:
        kept = RESULTS / f"server-{tag}.log"
        RESULTS.mkdir(exist_ok=True)
        shutil.copyfile(log_path, kept)
        raise RuntimeError(f"{type(exc).__name__}: {exc} (server log: {kept})") from exc
    figures.update(extra)
    if "rsa_decrypts_per_s" in figures:  # comparable across machines of different speed
        figures["storm_vs_rsa"] = figures["handshakes_per_s"] / figures["rsa_decrypts_per_s"]
    figures["run_s"] = time.monotonic() - t0
    figures["server_warnings"] = _count_warnings(log_path)
    return figures


def _count_warnings(log_path: Path) -> int:
    try:
        with open(log_path, errors="replace") as f:
            return sum(1 for line in f if " WARNING " in line or " ERROR " in line)
    except OSError:
        return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs that succeeded and were not disturbed (if there are any)."""
    ok = [r for r in runs if "error" not in r]
    ok = [r for r in ok if not r["disturbed"]] or ok
    median: dict[str, Any] = {}
    if not ok:
        return median
    for key, value in ok[0].items():
        if key == "disturbed":
            continue
        if key == "anomalies":
            merged: dict[str, int] = {}
            for r in ok:
                for kind, n in r[key].items():
                    merged[kind] = merged.get(kind, 0) + n
            median[key] = merged
        elif key in SUMMED:
            median[key] = sum(r[key] for r in ok)
        elif isinstance(value, bool):
            median[key] = all(r[key] for r in ok)
        elif isinstance(value, (int, float)) or value is None:
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            median[key] = statistics.median(values) if values else None
    median["failed_runs"] = sum(1 for r in runs if "error" in r)
    median["disturbed_runs"] = sum(1 for r in runs if r.get("disturbed"))
    return median


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if value else "0"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_block(title: str, median: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    heads = ["metric", "median"] + [f"run{i + 1}" for i in range(len(runs))]
    rows = []
    for key, value in median.items():
        if key == "anomalies":
            continue
        rows.append([key, fmt(value)] + [fmt(r.get(key, "-")) for r in runs])
    _table(heads, rows)
    if median.get("anomalies"):
        print(f"  anomalies (server messages other than message/joined): {median['anomalies']}")
    for i, r in enumerate(runs):
        if "error" in r:
            print(f"  run{i + 1} failed: {r['error'][:400]}")


def _table(heads: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *[r + [""] * 9 for r in rows])]
    print(
        "  "
        + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))
    )
    for row in rows:
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells))


def check_targets(records: list[dict[str, Any]], quick: bool) -> list[list[str]]:
    rows = []
    for rec in records:
        for name, where, metric, op, bound in TARGETS:
            params, median = rec["params"], rec["median"]
            if rec["scenario"] != name or metric not in median:
                continue
            if any(params.get(k) != v for k, v in where.items()):
                continue
            value = median[metric]
            if value is None:
                rows.append([label(name, params), metric, "none", f"{op} {bound}", "NO"])
                continue
            if op == "info":
                rows.append([label(name, params), metric, fmt(value), str(bound), "-"])
                continue
            if bound == "N":
                bound = params["N"]
            met = {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]
            verdict = "n/a (quick)" if quick and where else ("yes" if met else "NO")
            rows.append([label(name, params), metric, fmt(value), f"{op} {fmt(bound)}", verdict])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", help="fanout, latency, storm, idle (default all)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--workers", type=int, default=1, help="generator processes (default 1, see README)"
    )
    parser.add_argument(
        "--server-cpus",
        metavar="LIST",
        help="pin the server to these CPUs with taskset (e.g. 0); default: not pinned",
    )
    parser.add_argument(
        "--server",
        type=Path,
        default=serverproc.SERVER,
        metavar="PATH",
        help="the server.py to measure (default: this repository's), e.g. a patched copy",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="one run of each scenario in turn (A, B, A, B, ...), so that a slow spell "
        "of this shared machine touches both sides of a comparison",
    )
    args = parser.parse_args(argv)
    try:
        todo = plan(args.scenarios, args.quick)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    serverproc.raise_nofile(max(p["N"] for _, p in todo) + 1024)
    machine = serverproc.machine_info()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}"
    )
    version = serverproc.server_version()
    if args.server.resolve() != serverproc.SERVER:
        version = str(args.server)
    print(f"server: {version}")
    records: list[dict[str, Any]] = []
    runs_of: list[list[dict[str, Any]]] = [[] for _ in todo]

    def wanted(i: int) -> bool:
        # A run during which other programs used much CPU is kept, marked, and
        # made up for by one more run (at most `--runs` more in all).
        runs = runs_of[i]
        undisturbed = sum(not r.get("disturbed") for r in runs)
        return undisturbed < args.runs and len(runs) < 2 * args.runs

    def one_run(i: int, keys: serverproc.KeyDir) -> None:
        name, params = todo[i]
        try:
            figures = run_one(keys, name, params, len(runs_of[i]), args.server_cpus, args.server)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            figures = {"error": str(exc)}
        figures["disturbed"] = (
            figures.get("other_cpu_pct", 0) + figures.get("steal_pct", 0) > DISTURBED_PCT
        )
        runs_of[i].append(figures)

    def report(i: int) -> None:
        name, params = todo[i]
        median = summarize(runs_of[i])
        shown = {k: v for k, v in params.items() if k != "scenario"}
        records.append({"scenario": name, "params": shown, "median": median, "runs": runs_of[i]})
        print_block(label(name, params), median, runs_of[i])
        sys.stdout.flush()

    for _, params in todo:
        params.setdefault("workers", args.workers)
    with serverproc.KeyDir() as keys:
        if args.interleave:
            while any(map(wanted, range(len(todo)))):
                for i in range(len(todo)):
                    if wanted(i):
                        one_run(i, keys)
        for i in range(len(todo)):
            while not args.interleave and wanted(i):
                one_run(i, keys)
            report(i)
    if args.server.resolve() == serverproc.SERVER and serverproc.server_version() != version:
        print(
            f"\nWARNING: the server changed during the benchmark ({version} -> "
            f"{serverproc.server_version()}); the figures mix two versions"
        )
    print("\n== targets")
    _table(["scenario", "metric", "median", "target", "met"], check_targets(records, args.quick))
    print()
    for rec in records:
        print(json.dumps(rec, sort_keys=False))
    RESULTS.mkdir(exist_ok=True)
    out = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python3", "bench/run.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "server_version": version,
        "results": records,
    }
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=1) + "\n")
    failed = any(r["median"].get("failed_runs") for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
