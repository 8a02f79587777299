"""Profile the server while `fanout` runs, and print where its CPU time goes.

    python3 bench/profile_fanout.py                 # fanout N=200 K=200, py-spy
    python3 bench/profile_fanout.py --gil           # only samples holding the GIL
    python3 bench/profile_fanout.py --scenario 'fanout:N=10,K=10,M=3000,window=64'

Needs py-spy (`pip install py-spy`, a dev tool, not a project dependency): it
samples every thread of the running server from outside, which cProfile (main
thread only) cannot. The server is started as usual, py-spy attaches to its
pid for the length of one run, and the collapsed stacks (bench/results/
profile-*.txt) are summed into the top functions by own time (the leaf of each
sample) with their inclusive share (how many samples they appear in).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import run
import scenarios
import serverproc

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
HEADLINES = ("deliveries_per_s", "msgs_per_record", "handshakes_per_s", "server_cpu_pct")
SAMPLE_RATE_HZ = 250
# Longer than the standard fanout (M=50, about 3 s of traffic) for enough samples.
DEFAULT_SCENARIO = "fanout:N=200,K=200,M=150,window=4"


def summarize(path: Path, top: int) -> tuple[int, list[tuple[str, int, int]]]:
    """(total samples, [(function, own samples, inclusive samples)]) from a raw profile."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _function(f) for f in stack.split(";") if not f.startswith(("thread ", "process "))
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, [(name, n, inclusive[name]) for name, n in own.most_common(top)]


def _function(frame: str) -> str:
    """'take (delivery.py:272)' -> 'delivery.py:take'; the line is dropped."""
    found = FRAME_RE.match(frame)
    if not found:
        return frame
    return f"{Path(found['file']).name}:{found['func']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/profile_fanout.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scenario", default=DEFAULT_SCENARIO, help=f"as for run.py (default {DEFAULT_SCENARIO})"
    )
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=SAMPLE_RATE_HZ, help="samples per second")
    parser.add_argument(
        "--server",
        type=Path,
        default=serverproc.SERVER,
        help="the server.py to profile (default: this repository's), e.g. an older copy",
    )
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    [(name, params)] = run.plan([args.scenario], quick=False)[:1]
    params.setdefault("workers", 1)
    run.RESULTS.mkdir(exist_ok=True)
    tag = "" if args.server.resolve() == serverproc.SERVER else f"-{args.server.parent.name}"
    out = run.RESULTS / f"profile-{name}-{'gil' if args.gil else 'cpu'}{tag}.txt"
    serverproc.raise_nofile(params["N"] + 1024)
    with serverproc.KeyDir() as keys:
        flags = {**run.SERVER_FLAGS, "max_clients": params["N"] + 64}
        log_path = keys.path / "server.log"
        os.environ["BCAST_STATE"] = str(keys.path / "state.db")  # fresh, never the user's
        with serverproc.ServerProcess(keys.key_file, log_path, args.server, **flags) as server:
            server.start()
            cmd = [pyspy, "record", "--pid", str(server.pid), "--format", "raw", "-o", str(out)]
            cmd += ["--rate", str(args.rate), "--nonblocking"] + (["--gil"] if args.gil else [])
            spy: list[subprocess.Popen[bytes]] = []

            def attach() -> None:
                spy.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                time.sleep(1.0)  # py-spy attaches; idle threads are not sampled

            def detach() -> None:
                spy[0].send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT

            try:
                figures = scenarios.RUNNERS[name](server, keys.spki, params, attach, detach)
            finally:
                err = b""
                if spy:
                    if spy[0].poll() is None:
                        detach()
                    try:
                        _, err = spy[0].communicate(timeout=60)
                    except subprocess.TimeoutExpired:
                        spy[0].kill()
                        _, err = spy[0].communicate()
    if not out.exists():
        print(f"py-spy wrote no profile: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    shown = [k for k in HEADLINES if k in figures]
    print(
        f"{run.label(name, params)}, under the profiler: "
        + ", ".join(f"{k} {run.fmt(figures[k])}" for k in shown)
    )
    total, rows = summarize(out, args.top)
    kind = "samples holding the GIL" if args.gil else "on-CPU samples, all threads"
    print(f"\ntop {args.top} functions by own time ({total} {kind}, {args.rate} Hz); raw: {out}")
    print(f"  {'own%':>6} {'incl%':>6}  function")
    for func, n_own, n_incl in rows:
        print(f"  {100 * n_own / total:6.1f} {100 * n_incl / total:6.1f}  {func}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
