"""server.py as a program: flags and their environment fallbacks, start-up order, and the
shutdown `bye` owed to a connection caught in the middle of its handshake."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT
from netutil import RECV_S
from refpeer import RefPeer

import crypto_utils
import server

WAIT_S = RECV_S


def run_server_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BCAST_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
    )


def test_help_names_every_flag_and_its_environment_variable() -> None:
    """Issue 3: each flag is shown by --help with its BCAST_* fallback."""
    done = run_server_py("--help")
    assert done.returncode == 0
    for flag, *_ in server.FLAGS:
        assert f"--{flag}" in done.stdout
        assert "BCAST_" + flag.upper().replace("-", "_") in done.stdout
    assert "--log-level" in done.stdout and "BCAST_LOG_LEVEL" in done.stdout


def test_environment_fallbacks_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 3: a flag beats its BCAST_* variable, which beats the spec's default."""
    for name in list(os.environ):
        if name.startswith("BCAST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", "/tmp/xdg-data-for-test")
    defaults = server.settings_from_args([])
    assert (defaults.host, defaults.port, defaults.max_clients) == ("127.0.0.1", 12345, 1000)
    assert (defaults.rate, defaults.max_text, defaults.max_pending) == (10, 16384, 4 * 2**20)
    assert (defaults.idle_timeout, defaults.handshake_timeout, defaults.send_timeout) == (
        120.0,
        10.0,
        5.0,
    )
    assert defaults.key_file == Path("/tmp/xdg-data-for-test/bcast/server_key.pem")
    assert defaults.log_level == "INFO"
    monkeypatch.setenv("BCAST_MAX_TEXT", "99")
    monkeypatch.setenv("BCAST_RATE", "0")
    monkeypatch.setenv("BCAST_LOG_LEVEL", "debug")
    from_env = server.settings_from_args([])
    assert (from_env.max_text, from_env.rate, from_env.log_level) == (99, 0, "DEBUG")
    assert server.settings_from_args(["--max-text", "100"]).max_text == 100


def test_state_history_allow_and_op_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """§5/§6 server options: --state, --history, --allow, --op (repeatable; BCAST_OP holds
    several, space-separated), with their defaults."""
    for name in list(os.environ):
        if name.startswith("BCAST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", "/tmp/xdg-data-for-test")
    defaults = server.settings_from_args([])
    assert defaults.state == Path("/tmp/xdg-data-for-test/bcast/state.db")
    assert (defaults.history, defaults.allow, defaults.ops) == (100, None, ())
    ana, bob = "SHA256:" + "A" * 43, "SHA256:" + "B" * 43
    monkeypatch.setenv("BCAST_OP", f"{ana} {bob}")
    monkeypatch.setenv("BCAST_HISTORY", "0")
    from_env = server.settings_from_args([])
    assert (from_env.ops, from_env.history) == ((ana, bob), 0)
    given = server.settings_from_args(
        ["--op", bob, "--state", "/tmp/s.db", "--allow", "/tmp/allow", "--history", "5"]
    )
    assert (given.ops, given.state, given.allow, given.history) == (
        (bob,),
        Path("/tmp/s.db"),
        Path("/tmp/allow"),
        5,
    )


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"BCAST_LOG_LEVEL": "chatty"}, "BCAST_LOG_LEVEL"),
        ({"BCAST_PORT": "twelve"}, "--port"),
        ({"BCAST_PORT": "70000"}, "--port"),
        ({"BCAST_MAX_PENDING": "10"}, "--max-pending"),
        ({"BCAST_OP": "SHA256:short"}, "--op"),
        ({"BCAST_HISTORY": "-1"}, "--history"),
        ({"BCAST_MAX_CLIENTS": "9000"}, "--max-clients"),  # a welcome could not list them all
    ],
)
def test_bad_environment_value_is_one_sentence_and_exit_2(env: dict[str, str], words: str):
    """A bad value from the environment is a usage error like a bad flag: no traceback."""
    done = run_server_py(env=env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert words in done.stderr.splitlines()[-1]


def test_fingerprint_is_printed_before_accepting(
    key_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """§2 Server identity: the fingerprint line is on stdout before connections are accepted."""
    printed_before_start: list[str] = []
    real_start = server.Server.start

    def start(self: server.Server) -> None:
        printed_before_start.append(capsys.readouterr().out)
        real_start(self)

    def stop_at_once(srv: server.Server) -> int:
        srv.shutdown()
        return 0

    monkeypatch.setattr(server.Server, "start", start)
    monkeypatch.setattr(server, "run_until_signal", stop_at_once)
    assert server.main(["--port", "0", "--key-file", str(key_file), "--log-level", "ERROR"]) == 0
    assert len(printed_before_start) == 1
    lines = printed_before_start[0].splitlines()
    fingerprint = crypto_utils.fingerprint(
        crypto_utils.spki_der(crypto_utils.load_or_create_server_key(key_file))
    )
    assert f"fingerprint: {fingerprint}" in lines
    assert f"key file: {key_file}" in lines
    listening = [line for line in lines if line.startswith("bcast server listening on ")]
    assert len(listening) == 1
    port = int(listening[0].rsplit(":", 1)[1])
    assert port > 0  # port 0 asked for: the one the OS chose is shown
    connect = f"connect with: python3 client.py --host 127.0.0.1 --port {port} --fingerprint "
    assert connect + fingerprint in lines


def test_shutdown_during_key_derivation_still_says_bye(
    run_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§4: SIGTERM sends bye(shutdown) to every connection that has sent `key`, also one
    whose session keys are still being derived when the shutdown starts."""
    entered, release = threading.Event(), threading.Event()
    real_server_keys = crypto_utils.server_keys

    def slow_server_keys(*args, **kwargs):
        entered.set()
        release.wait(WAIT_S)
        return real_server_keys(*args, **kwargs)

    monkeypatch.setattr(crypto_utils, "server_keys", slow_server_keys)
    with run_server() as srv:
        peer = RefPeer.connect(*srv.address, timeout=WAIT_S)
        assert entered.wait(WAIT_S)
        stopper = threading.Thread(target=srv.shutdown)
        stopper.start()
        while not srv.hub.shutting_down:
            threading.Event().wait(0.001)
        release.set()
        assert peer.wait_closed(WAIT_S) == [{"type": "bye", "reason": "shutdown"}]
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
        peer.close()


class FakeLimits:
    """Stands in for `resource`'s RLIMIT_NOFILE get/set, recording what was asked."""

    def __init__(self, soft: int, hard: int, refuse: bool = False):
        self.limits = (soft, hard)
        self.refuse = refuse
        self.set_calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.set_calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize(
    ("soft", "hard", "refuse", "max_clients", "raised_to", "warns"),
    [
        (1024, 65536, False, 1000, 65536, False),  # lifted to the hard limit, enough
        (256, 512, False, 1000, 512, True),  # lifted, still too few for 1000 clients
        (256, 4096, True, 1000, None, True),  # the system refuses: say so
        (8192, 8192, False, 1000, None, False),  # already at the hard limit, enough
    ],
)
def test_open_file_limit_raised_and_shortfall_reported(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    soft: int,
    hard: int,
    refuse: bool,
    max_clients: int,
    raised_to: int | None,
    warns: bool,
) -> None:
    """Issue 4: at start the server lifts its soft open-file limit as far as the hard
    limit allows, and logs a warning when it stays below what --max-clients needs."""
    import resource

    fake = FakeLimits(soft, hard, refuse)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    with caplog.at_level("WARNING", logger="bcast.server"):
        server.raise_fd_limit(max_clients)
    if raised_to is not None:
        assert fake.set_calls == [(raised_to, hard)]
    elif not refuse:
        assert fake.set_calls == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warns:
        assert len(warnings) == 1 and f"--max-clients {max_clients}" in warnings[0]
    else:
        assert warnings == []


fast_paths_only = pytest.mark.skipif(
    crypto_utils.PUBLIC_CRYPTO, reason="BCAST_PUBLIC_CRYPTO=1 turns the fast paths off"
)


@fast_paths_only
def test_no_warning_when_every_fast_path_is_in_use(
    run_server, caplog: pytest.LogCaptureFixture
) -> None:
    """On this install every fast path passes its self-check: the server says nothing of it."""
    caplog.set_level(logging.WARNING, logger="bcast.server")
    with run_server():
        pass
    assert not [r for r in caplog.records if "self-check" in r.getMessage()]


@fast_paths_only
def test_warns_once_at_start_when_a_fast_path_falls_back(
    run_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pycryptodome whose private pieces changed still works, and the operator is told."""
    caplog.set_level(logging.WARNING, logger="bcast.server")
    monkeypatch.setattr(crypto_utils, "X25519_IMPL", crypto_utils._x25519_standard)
    monkeypatch.setattr(crypto_utils, "GCM_IMPL", crypto_utils._StandardGcm)
    with run_server() as srv, RefPeer.connect(*srv.address, timeout=WAIT_S) as peer:
        assert peer.join("slowpath")["type"] == "welcome"
        peer.send({"type": "ping", "id": 7})
        assert peer.recv(WAIT_S) == {"type": "pong", "id": 7}
    warnings = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert warnings == [
        "this pycryptodome fails the self-check of the fast AES-GCM records and X25519 "
        "code; using its public API instead (correct, but handshakes or records cost "
        "more CPU)"
    ]


@fast_paths_only
def test_slow_paths_names_each_fallback(server_key, monkeypatch: pytest.MonkeyPatch) -> None:
    assert crypto_utils.slow_paths(server_key) == []
    monkeypatch.setattr(crypto_utils, "GCM_IMPL", crypto_utils._StandardGcm)
    assert crypto_utils.slow_paths(server_key) == ["AES-GCM records"]
    monkeypatch.setattr(crypto_utils, "_UNWRAPPERS", {})
    monkeypatch.setattr(crypto_utils._LeanOaep, "decrypt", lambda self, ciphertext: b"")
    assert crypto_utils.slow_paths(server_key) == ["AES-GCM records", "RSA-OAEP"]


def test_missing_pycryptodome_is_one_sentence_exit_2() -> None:
    """Issue 15 bug 9: without the venv, server.py prints one sentence saying what to install
    and how, and exits 2 (no ModuleNotFoundError traceback)."""
    no_crypto = (
        "import runpy, sys; sys.modules['Crypto'] = None; "
        "sys.argv = ['server.py', '--port', '0']; "
        f"runpy.run_path({str(ROOT / 'server.py')!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", no_crypto], capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "pycryptodome" in done.stderr and "requirements.txt" in done.stderr


@pytest.mark.skipif(not crypto_utils.PUBLIC_CRYPTO, reason="run with BCAST_PUBLIC_CRYPTO=1")
def test_public_crypto_is_named_at_start(run_server, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: BCAST_PUBLIC_CRYPTO=1 forces the public API; the start-up warning says so
    and names every path, and chat works."""
    caplog.set_level(logging.WARNING, logger="bcast.server")
    with run_server() as srv, RefPeer.connect(*srv.address, timeout=WAIT_S) as peer:
        assert peer.join("public")["type"] == "welcome"
    warnings = [r.getMessage() for r in caplog.records if "BCAST_PUBLIC_CRYPTO" in r.getMessage()]
    assert len(warnings) == 1 and "RSA-OAEP" in warnings[0] and "X25519" in warnings[0]
