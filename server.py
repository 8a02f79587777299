"""bcast/1 broadcast server: one thread per client, one shared message log.

Run `python3 server.py --help` for the flags. The wire protocol is PROTOCOL.md
(bcast/1); docs/PROTOCOL.md explains it in our words.

How it is built (read before changing it):
  * Modules. `server.py` (this one): the listening socket, the accept thread,
    the reaper (timeouts), shutdown and the command line. `reader.py`: one
    *reader* thread per connection (handshake, then records in, every check).
    `hub.py`: the registry, the log and the chat's events behind one lock
    (with `conn.py`, `delivery.py`, `history.py`, `access.py`).
    `flusher.py`: the writer threads. `statewriter.py`: the thread that saves
    state. `protocol.py` is pure; `crypto_utils.py` holds the cryptography.
  * Threads. A few *flushers* (FLUSHERS of them) share the keyed connections:
    a connection belongs to one flusher, the only thread that seals and sends
    its records, so counter order is wire order.
  * One lock, the hub's, guards the registry, the shared log and every
    connection's delivery and lifecycle state. Only hub methods take it; each
    is one event (join, say, dm, reply, drop, ...) and returns what to do
    outside the lock. Under it: only list/bytes bookkeeping. Never I/O, never
    crypto, never JSON of user data.
  * The log. Every broadcast (message, joined, left) is encoded once and
    appended to one bytearray; each receiver has a cursor into it. A flusher
    takes everything between a cursor and the end (skipping the client's own
    `say`s, merging its private items such as dm/pong/error at their log
    positions) and sends it as ONE record. The cost per message x recipient
    is a memcpy; Python work happens per flush. `id` order is log order.
    A say or dm is flushed at once; presence news (joined, left) may wait
    a moment for company, and any later say takes it along in order.
  * Sockets. Readers wait in poll(), then recv what is there (no buffer is
    held by an idle client). Flushers never block on a client: they
    send with MSG_DONTWAIT, park what did not fit, poll for writability, and
    drop a client whose record has waited `send_timeout`. A socket is closed
    by whichever of its reader and its flusher lets go of it last; others
    only wake threads with shutdown().
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The one third-party package (pycryptodome, imported by crypto_utils): a terminal without
# the venv gets one sentence saying what to do instead of a ModuleNotFoundError traceback.
try:
    import crypto_utils
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "Crypto":
        raise
    sys.stderr.write(
        f"server.py: the Python package pycryptodome is missing (no module named {exc.name!r}); "
        "install it with `python3 -m pip install -r requirements.txt`, or use the project's "
        "venv: `. .venv/bin/activate` in each new terminal, or run `.venv/bin/python server.py`\n"
    )
    sys.exit(2)
import limits
import protocol
from access import FINGERPRINT_RE, Access, AllowlistError, Listed, parse_allowlist
from conn import Conn
from crypto_utils import CryptoError
from delivery import RECORD_BUDGET
from flusher import Flusher, wake
from hub import Hub
from moderation import Moderation
from reader import (
    MAX_RECORD_BYTES,
    RECV_CHUNK_BYTES,
    SAY_RECORD_OVERHEAD_BYTES,
    Reader,
    clip,
)
from statewriter import ID_BLOCK, StateWriter
from store import RunState, StoreError, open_store

log = logging.getLogger("bcast.server")

# --- defaults, each from PROTOCOL.md unless said otherwise ---
DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator opens it up on purpose
DEFAULT_PORT = 12345
DEFAULT_MAX_CLIENTS = 1000
DEFAULT_RATE = 10  # §4: tokens per second and bucket capacity
DEFAULT_MAX_TEXT = protocol.DEFAULT_MAX_TEXT
DEFAULT_IDLE_TIMEOUT_S = 120.0
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_MAX_PENDING_BYTES = 4 * 1024 * 1024
DEFAULT_HISTORY = 100  # §6: public messages kept for those who ask
# JSON may spell a text in 3 times its UTF-8 bytes (\uXXXX for a 2-byte character, a
# surrogate pair for a 4-byte one), so --max-text is capped for the longest say to fit R.
MAX_TEXT_LIMIT = (MAX_RECORD_BYTES - SAY_RECORD_OVERHEAD_BYTES) // 3
# issue 12: per-source limits (limits.py says why each value)
DEFAULT_MAX_UNJOINED_PER_IP = limits.DEFAULT_MAX_UNJOINED_PER_SOURCE
DEFAULT_CONNECT_RATE_PER_IP = limits.DEFAULT_CONNECT_RATE_PER_SOURCE
# Each client's kernel send buffer (SO_SNDBUF asked for; Linux doubles it). Left to
# itself the kernel grows it to ~4 MiB that --max-pending cannot see; this much keeps
# fan-out as fast as autotuning (64 KiB cost 10-20 %), and is counted (bench/README.md).
DEFAULT_SEND_BUFFER_BYTES = 128 * 1024
# glibc keeps what ended connections freed in its per-thread arenas (up to 8 per core), and
# RSS crept by ~3 KB per connection replaced, never given back (bench/README.md, churn).
# Two arenas are enough (the GIL serializes most allocations), and after connections end
# the reaper hands free pages back (malloc_trim) at most every TRIM_INTERVAL_S.
MALLOC_ARENAS = 2
TRIM_INTERVAL_S = 10.0
# Small stacks let thousands of mostly idle threads fit; 256 KiB still holds the
# C JSON decoder's deepest recursion (it stops at Python's recursion limit).
THREAD_STACK_BYTES = 256 * 1024
# A name in JSON at its longest: 32 characters of up to 4 UTF-8 bytes, quotes, comma.
NAME_JSON_MAX_BYTES = 4 * protocol.MAX_NAME_CHARS + 3
# `welcome` lists every other name in one record (§4): so many clients always fit.
MAX_CLIENTS_LIMIT = (RECORD_BUDGET - 1024) // NAME_JSON_MAX_BYTES
SHUTDOWN_GRACE_S = 1.5  # §4 SIGTERM: we promise an exit within 2 s
# Two flushers let one seal or send (C code, GIL released) while the other runs Python;
# more only add switching on a 2-core machine (measured: bench/README.md).
FLUSHERS = 2
DRAIN_ON_CLOSE_BYTES = 1024 * 1024  # unread input read away so close() sends FIN, not RST
# How log lines name reasons (issue: "names and reasons in words").
REASON_WORDS = {
    "disconnect": "disconnected",
    "timeout": "timed out",
    "protocol": "protocol error",
    "slow": "too slow",
    "leave": "left",
    "shutdown": "server shutting down",
    "evicted": "evicted",
}


@dataclass(frozen=True)
class Settings:
    """Every tunable of the server; the CLI fills it from flags and BCAST_* variables."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    key_file: Path = field(default_factory=lambda: default_key_file())
    max_clients: int = DEFAULT_MAX_CLIENTS
    rate: int = DEFAULT_RATE
    max_text: int = DEFAULT_MAX_TEXT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S
    max_pending: int = DEFAULT_MAX_PENDING_BYTES
    log_level: str = "INFO"
    state: Path = field(default_factory=lambda: default_data_file("state.db"))
    history: int = DEFAULT_HISTORY
    allow: Path | None = None  # §5 allowlist mode when given
    ops: tuple[str, ...] = ()  # §5 operators' fingerprints, in either mode
    # Per-source limits: off (0) in a bare Settings, which tests and embedders use to
    # connect many clients from one address; the command line turns them on (FLAGS).
    max_unjoined_per_ip: int = 0
    connect_rate_per_ip: float = 0.0
    send_buffer: int = DEFAULT_SEND_BUFFER_BYTES  # 0 = the kernel's autotuning


def default_data_file(name: str) -> Path:
    """$XDG_DATA_HOME/bcast/NAME, i.e. ~/.local/share/bcast/ by default."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "bcast" / name


def default_key_file() -> Path:
    return default_data_file("server_key.pem")


def read_allowlist(path: Path) -> dict[str, Listed]:
    """§5: the allow file, parsed; AllowlistError (one sentence) if unreadable or bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise AllowlistError(f"cannot read the allow file {path}: {why}") from None
    return parse_allowlist(text, str(path))


class Server:
    """Owns the listening socket, the hub and every thread: accept, reaper, flushers."""

    def __init__(self, settings: Settings, key: Any | None = None):
        self.settings = settings
        self.key = (
            key if key is not None else crypto_utils.load_or_create_server_key(settings.key_file)
        )
        self.spki = crypto_utils.spki_der(self.key)
        self.fingerprint = crypto_utils.fingerprint(self.spki)
        # The RSA self-check runs now, not in a handshake; `start` says what fell back
        # (after any start-up error, so that an error stays the one line printed).
        self.slow_paths = crypto_utils.slow_paths(self.key)
        # Bytes the kernel may hold for each client (0: autotuned, not counted).
        self.send_buffer = kernel_send_buffer(send_buffer_request(settings))
        self.store = open_store(settings.state)
        try:
            self.hub, self.writer = self._load_state(settings)
        except BaseException:
            self.store.close()
            raise
        self.moderation = Moderation(self.hub, self.writer)
        self.flushers = [
            Flusher(self.hub, i, settings.send_timeout, self.close) for i in range(FLUSHERS)
        ]
        self.listener: socket.socket | None = None
        self.address: tuple[str, int] = (settings.host, settings.port)
        self._threads: list[threading.Thread] = []
        self._reaper_wake = threading.Event()
        self._stopped = threading.Event()
        self._refusal_log = limits.LogThrottle()  # accept thread only
        self._closed = 0  # sockets closed so far (any thread; a lost count only delays a trim)
        self._closed_at_trim = 0  # reaper only, as is:
        self._trimmed_at = time.monotonic()

    def _load_state(self, settings: Settings) -> tuple[Hub, StateWriter]:
        """§5/§6: bindings, bans, kept messages and the id floor from the store."""
        allow = read_allowlist(settings.allow) if settings.allow is not None else None
        now_ms = int(time.time() * 1000)
        access = Access(
            frozenset(settings.ops),
            allow,
            self.store.load_bindings(),
            self.store.load_bans(now_ms),
        )
        floor = self.store.load_id_floor()
        reserved = floor + ID_BLOCK
        self.store.reserve_ids(reserved)  # before any id is handed out: none is ever reused
        last = self.store.load_run_state()
        if not last.clean:  # after a crash, any id up to the floor may have been handed out
            last = RunState(floor, floor, False)
        self.store.save_run_state(RunState(last.last_id, last.forgotten, False))
        # One more than kept: if it exists, it and all before it are forgotten (§6 gap).
        kept = self.store.load_messages(settings.history + 1)
        forgotten = last.forgotten
        if len(kept) > settings.history:
            forgotten = max(forgotten, kept[0].id)
            kept = kept[1:]
        hub = Hub(
            settings.max_clients,
            settings.max_pending - self.send_buffer,  # what the kernel holds counts too
            settings.rate,
            max_text=settings.max_text,
            max_record=MAX_RECORD_BYTES,
            max_unjoined_per_ip=settings.max_unjoined_per_ip,
            connect_rate_per_ip=settings.connect_rate_per_ip,
            access=access,
            history=settings.history,
            kept=kept,
            first_id=floor + 1,
            last_id=last.last_id,
            forgotten=forgotten,
        )
        return hub, StateWriter(self.store, hub, settings.history, reserved)

    def _warn_slow_paths(self) -> None:
        slow = " and ".join(self.slow_paths)
        if slow and crypto_utils.PUBLIC_CRYPTO:
            log.warning(
                "BCAST_PUBLIC_CRYPTO=1: using pycryptodome's public API for the %s code "
                "(correct, but handshakes or records cost more CPU)",
                slow,
            )
        elif slow:
            log.warning(
                "this pycryptodome fails the self-check of the fast %s code; using its "
                "public API instead (correct, but handshakes or records cost more CPU)",
                slow,
            )

    def reload_allowlist(self) -> None:
        """§5 SIGHUP: re-read the allow file; on a bad file keep the old list and say why."""
        if self.settings.allow is None:
            log.info("SIGHUP: no allow file (open mode), nothing to re-read")
            return
        try:
            allow = read_allowlist(self.settings.allow)
        except AllowlistError as exc:
            log.error("%s; the previous allowlist stays in force", exc)
            return
        shut_out = self.hub.set_allowlist(allow)
        log.info("re-read %s: %d identities listed", self.settings.allow, len(allow))
        for conn in shut_out:
            log.info("%s is no longer on the allowlist: closed", conn.describe())

    # --- lifecycle ---

    def listen(self) -> None:
        """Raise the fd limit, bind and listen; nothing is accepted until `start`.

        Split from `start` so that `main` prints the fingerprint before the first
        connection is accepted (§2 Server identity).
        """
        if self.listener is not None:
            return
        threading.stack_size(THREAD_STACK_BYTES)
        limit_malloc_arenas()
        raise_fd_limit(self.settings.max_clients)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        request = send_buffer_request(self.settings)
        if request:  # accepted sockets inherit it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, request)
        try:
            sock.bind((self.settings.host, self.settings.port))
            sock.listen(min(socket.SOMAXCONN, 4096))
        except OSError:
            sock.close()
            raise
        self.listener = sock
        self.address = sock.getsockname()[:2]

    def start(self) -> None:
        """Listen (if not yet), then start the accept, reaper and flusher threads."""
        self.listen()
        self._warn_slow_paths()
        for target, name in ((self._accept_loop, "accept"), (self._reap_loop, "reaper")):
            self._threads.append(threading.Thread(target=target, name=name, daemon=True))
        self._threads += [flusher.thread for flusher in self.flushers]
        for thread in self._threads:
            thread.start()
        self.writer.start()

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """§4 SIGTERM: stop accepting, `bye` (shutdown) to keyed clients, no `left`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.listener is not None:
            wake(self.listener)
            self.listener.close()
        for sock in self.hub.begin_shutdown():
            wake(sock)
        self._reaper_wake.set()
        deadline = time.monotonic() + grace
        self.hub.wait_drained(deadline)
        self.hub.close_slots()
        for flusher in self.flushers:
            flusher.thread.join(max(0.1, deadline - time.monotonic()))
            flusher.close_pipe()
        self.writer.stop()  # §6: after SIGTERM everything kept survives
        log.info("server stopped")

    # --- accepting ---

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while not self._stopped.is_set():
            try:
                sock, addr = self.listener.accept()
            except OSError as exc:
                if self._stopped.is_set():
                    return
                log.warning("accept failed: %s", exc)  # e.g. EMFILE: keep serving others
                time.sleep(0.05)
                continue
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        """§2 max_clients and the per-source limits (limits.py): admit, or refuse."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        conn = Conn(sock, addr, now)
        verdict = self.hub.admit(conn, now)
        if not verdict:
            source = limits.source_of(conn.ip)
            self._log_throttled(source, now, f"refused {conn.peer}: {verdict.detail}")
            refuse(sock, verdict.why)
            return
        victim = verdict.evicted
        if isinstance(victim, Conn):
            wake(victim.sock)  # its reader sees it closed (after its key, if deriving one)
            self._log_throttled(
                "evictions",
                now,
                f"{victim.peer} closed: evicted, the oldest of the unjoined connections, "
                "which held their whole share of --max-clients",
            )
        reader = Reader(self, conn)
        thread = threading.Thread(target=reader.run, name=f"reader {conn.peer}", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: refuse this one, keep going
            log.warning("refused %s: %s", conn.peer, exc)
            self.close(conn)
        else:
            log.info("connection from %s", conn.peer)

    def _log_throttled(self, source: str, now: float, line: str) -> None:
        """`line` at INFO, at most once per source per interval, saying how many were not."""
        noted = self._refusal_log.note(source, now)
        if noted is None:
            return
        shown, silent = noted
        more = f" (and {silent} more for {shown} since the last such line)" if silent else ""
        log.info("%s%s", line, more)

    def close(self, conn: Conn) -> None:
        """Close the socket once nobody uses it, and forget the connection."""
        try:  # unread input would make close() send RST, which can destroy our last bye
            for _ in range(DRAIN_ON_CLOSE_BYTES // RECV_CHUNK_BYTES):
                if not conn.sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
        conn.sock.close()
        self.hub.forget(conn)
        self._closed += 1

    def end(self, conn: Conn, reason: str, *, bye: bool, why: str) -> None:
        """End `conn` for `reason`; with `bye`, its flusher sends that first. Logs once."""
        if self.hub.drop(conn, reason, bye=bye):
            level = logging.INFO if reason != "disconnect" or conn.name else logging.DEBUG
            words = REASON_WORDS.get(reason, reason)
            log.log(level, "%s closed: %s (%s)", conn.describe(), words, clip(why))

    # --- timeouts: reaper thread ---

    def _reap_loop(self) -> None:
        """§4 Timeouts: handshake (from accept) and idle (joined, nothing received)."""
        s = self.settings
        tick = max(0.01, min(0.5, s.handshake_timeout / 4, s.idle_timeout / 4))
        while not self._stopped.is_set():
            self._reaper_wake.wait(tick)
            self._reaper_wake.clear()
            now = time.monotonic()
            for conn in self.hub.expired(now, s.handshake_timeout, s.idle_timeout):
                if conn.name is not None:
                    self.end(conn, "timeout", bye=True, why=f"silent for {s.idle_timeout:g} s")
                else:
                    keyed = conn.slot is not None
                    why = f"no join within {s.handshake_timeout:g} s"
                    self.end(conn, "timeout", bye=keyed, why=why)
                    if not keyed:
                        wake(conn.sock)
            if self._closed != self._closed_at_trim and now - self._trimmed_at >= TRIM_INTERVAL_S:
                self._closed_at_trim, self._trimmed_at = self._closed, now
                release_free_memory()


def _libc_function(name: str) -> Any:
    """A glibc function by name, or None (another C library: nothing to call)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")
M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc arenas (unless MALLOC_ARENA_MAX says otherwise)."""
    if _MALLOPT is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _MALLOPT(M_ARENA_MAX, MALLOC_ARENAS)


def release_free_memory() -> None:
    """Give the memory that ended connections freed back to the kernel (glibc only)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def send_buffer_request(settings: Settings) -> int:
    """The SO_SNDBUF to ask for: --send-buffer, at most a quarter of --max-pending
    (the kernel doubles it, and what it holds is counted in --max-pending)."""
    return min(settings.send_buffer, settings.max_pending // 4)


def kernel_send_buffer(request: int) -> int:
    """The send buffer the kernel gives a socket that asks for `request` bytes (0: none asked)."""
    if request <= 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, request)
        return probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def refuse(sock: socket.socket, message: str) -> None:
    """§2: the plaintext `server_full` error, then close (never blocks)."""
    refusal = protocol.encode_frame(protocol.encode_server_full(message))
    try:
        sock.send(refusal, socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


def raise_fd_limit(max_clients: int) -> None:
    """Lift the soft open-file limit to the hard one; warn if it cannot fit max_clients."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to do
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, max_clients + 64)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < max_clients + 32:
        log.warning(
            "the open-file limit is %d, below the %d that --max-clients %d needs",
            soft,
            max_clients + 32,
            max_clients,
        )


# --- command line ---


# (flag, type, default, help): every flag also reads BCAST_<FLAG> from the environment.
FLAGS: list[tuple[str, Any, Any, str]] = [
    ("host", str, DEFAULT_HOST, "address to listen on"),
    ("port", int, DEFAULT_PORT, "TCP port, 0 for any free one"),
    (
        "key-file",
        Path,
        None,
        "server RSA key, created if missing (default $XDG_DATA_HOME/bcast/server_key.pem)",
    ),
    (
        "max-clients",
        int,
        DEFAULT_MAX_CLIENTS,
        f"most connections at once, joined or not (at most {MAX_CLIENTS_LIMIT}: a welcome "
        "lists every name)",
    ),
    ("rate", int, DEFAULT_RATE, "say/dm per second per client, also the burst; 0 = no limit"),
    ("max-text", int, DEFAULT_MAX_TEXT, "longest text in UTF-8 bytes"),
    ("idle-timeout", float, DEFAULT_IDLE_TIMEOUT_S, "seconds a joined client may stay silent"),
    ("handshake-timeout", float, DEFAULT_HANDSHAKE_TIMEOUT_S, "seconds from connect to join"),
    (
        "send-timeout",
        float,
        DEFAULT_SEND_TIMEOUT_S,
        "seconds one send may block before that client is dropped as slow",
    ),
    (
        "max-pending",
        int,
        DEFAULT_MAX_PENDING_BYTES,
        "bytes that may wait for one client before it is dropped as slow",
    ),
    (
        "state",
        Path,
        None,
        "state file: kept messages, the id counter, name bindings and bans "
        "(default $XDG_DATA_HOME/bcast/state.db)",
    ),
    ("history", int, DEFAULT_HISTORY, "public messages kept for those who ask; 0 keeps none"),
    (
        "max-unjoined-per-ip",
        int,
        DEFAULT_MAX_UNJOINED_PER_IP,
        "connections one address (IPv6: one /64) may hold before they join; more get "
        "server_full; 0 = no limit",
    ),
    (
        "connect-rate-per-ip",
        float,
        DEFAULT_CONNECT_RATE_PER_IP,
        "new connections per second one address may open (bursts of twice that); 0 = no limit",
    ),
    (
        "send-buffer",
        int,
        DEFAULT_SEND_BUFFER_BYTES,
        "kernel send buffer asked for each client (SO_SNDBUF, at most a quarter of "
        "--max-pending; Linux doubles it), counted in --max-pending; 0 = kernel autotuning",
    ),
    ("allow", Path, None, "allowlist file: only the identities listed there may join"),
]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="server.py",
        description="bcast/1 encrypted group-chat server. Each flag falls back to the "
        "environment variable named in its help.",
    )
    for flag, kind, default, text in FLAGS:
        env = "BCAST_" + flag.upper().replace("-", "_")
        shown = f" (default {default})" if default is not None else ""
        p.add_argument(
            f"--{flag}",
            type=kind,
            default=os.environ.get(env, default),
            help=f"{text}; {env}{shown}",
        )
    p.add_argument(
        "--op",
        action="append",
        metavar="FINGERPRINT",
        default=None,
        help="an operator's identity fingerprint (repeatable); BCAST_OP (space-separated)",
    )
    p.add_argument(
        "--log-level",
        type=str.upper,
        default=os.environ.get("BCAST_LOG_LEVEL", "INFO"),
        choices=LOG_LEVELS,
        help="BCAST_LOG_LEVEL (default INFO)",
    )
    return p


def settings_from_args(argv: list[str] | None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse converts string defaults from the environment
    checks = [
        (0 <= args.port <= 65535, "--port must be 0..65535"),
        (
            1 <= args.max_clients <= MAX_CLIENTS_LIMIT,
            f"--max-clients must be 1..{MAX_CLIENTS_LIMIT} (a welcome lists every name "
            "in one record)",
        ),
        (args.rate >= 0, "--rate must be 0 (no limit) or more"),
        (
            1 <= args.max_text <= MAX_TEXT_LIMIT,
            f"--max-text must be 1..{MAX_TEXT_LIMIT} bytes: the longest say, JSON-escaped "
            f"(up to 3 bytes per byte of text), must fit a record of {MAX_RECORD_BYTES} bytes",
        ),
        (args.idle_timeout > 0, "--idle-timeout must be positive"),
        (args.handshake_timeout > 0, "--handshake-timeout must be positive"),
        (args.send_timeout > 0, "--send-timeout must be positive"),
        (args.max_pending >= 65536, "--max-pending must be at least 65536 bytes"),
        (args.max_unjoined_per_ip >= 0, "--max-unjoined-per-ip must be 0 (no limit) or more"),
        (args.connect_rate_per_ip >= 0, "--connect-rate-per-ip must be 0 (no limit) or more"),
        (args.send_buffer >= 0, "--send-buffer must be 0 (the kernel's autotuning) or more"),
        (  # argparse checks `choices` for typed flags, not for a default from the environment
            args.log_level in LOG_LEVELS,
            f"--log-level (or BCAST_LOG_LEVEL) must be one of {', '.join(LOG_LEVELS)}",
        ),
    ]
    ops = tuple(args.op if args.op is not None else os.environ.get("BCAST_OP", "").split())
    checks += [
        (args.history >= 0, "--history must be 0 (keep none) or more"),
        *[
            (
                FINGERPRINT_RE.fullmatch(op) is not None,
                f"--op {clip(op, 64)} is not a SHA256: "
                "fingerprint (python3 client.py --show-identity prints one)",
            )
            for op in ops
        ],
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return Settings(
        host=args.host,
        port=args.port,
        key_file=Path(args.key_file) if args.key_file else default_key_file(),
        max_clients=args.max_clients,
        rate=args.rate,
        max_text=args.max_text,
        idle_timeout=args.idle_timeout,
        handshake_timeout=args.handshake_timeout,
        send_timeout=args.send_timeout,
        max_pending=args.max_pending,
        max_unjoined_per_ip=args.max_unjoined_per_ip,
        connect_rate_per_ip=args.connect_rate_per_ip,
        send_buffer=args.send_buffer,
        log_level=args.log_level,
        state=Path(args.state) if args.state else default_data_file("state.db"),
        history=args.history,
        allow=Path(args.allow) if args.allow else None,
        ops=ops,
    )


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    # The format uses none of these; skipping them saves work on every log line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not os.path.lexists(settings.key_file):  # a dangling link is refused, not created
        print(f"creating a new server key at {settings.key_file} ...", flush=True)
    try:
        server = Server(settings)
    except (CryptoError, StoreError, AllowlistError) as exc:  # one sentence, exit 2
        print(f"server.py: {exc}", file=sys.stderr)
        return 2
    try:
        server.listen()
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        print(f"server.py: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    host, port = server.address
    print(f"bcast server listening on {host}:{port}", flush=True)
    print(f"key file: {settings.key_file}", flush=True)
    print(f"state file: {settings.state}", flush=True)
    print(f"fingerprint: {server.fingerprint}", flush=True)
    print(
        f"connect with: python3 client.py --host {host} --port {port} "
        f"--fingerprint {server.fingerprint}",
        flush=True,
    )
    server.start()  # §2: the fingerprint is out before the first connection is accepted
    log.info("listening on %s:%d, fingerprint %s", host, port, server.fingerprint)
    return run_until_signal(server)


def run_until_signal(server: Server) -> int:
    """Serve until SIGINT or SIGTERM (a second one exits at once); SIGHUP re-reads --allow."""
    stop = threading.Event()
    hup = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            os._exit(130)
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum: int, _frame: Any) -> None:
        hup.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    while not stop.wait(0.1):
        if hup.is_set():
            hup.clear()
            server.reload_allowlist()
    server.shutdown()
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
