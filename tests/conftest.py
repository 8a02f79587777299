"""Shared fixtures: a fast server key, and servers on port 0 in this process or as a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from Crypto.PublicKey import RSA

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import crypto_utils  # noqa: E402
import server  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the user's ~/.local/share/bcast: XDG_DATA_HOME is a temp folder."""
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if old is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = old


# 2048 bits is the protocol's minimum and generates in a fraction of the time of 3072.
TEST_RSA_BITS = 2048


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One server key for the whole session, stored with mode 0600 as the server requires."""
    path = tmp_path_factory.mktemp("serverkey") / "server_key.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(RSA.generate(TEST_RSA_BITS).export_key())
    return path


@pytest.fixture(scope="session")
def server_key(key_file: Path):
    return crypto_utils.load_or_create_server_key(key_file)


@contextlib.contextmanager
def running_server(key_file: Path, key=None, **overrides) -> Iterator[server.Server]:
    """A server on 127.0.0.1 port 0 in this process, shut down afterwards.

    Each gets a state file of its own in a fresh folder unless `state` is given.
    """
    with tempfile.TemporaryDirectory(prefix="bcast-state-") as folder:
        base = server.Settings(
            host="127.0.0.1", port=0, key_file=key_file, state=Path(folder) / "state.db"
        )
        srv = server.Server(dataclasses.replace(base, **overrides), key=key)
        srv.start()
        try:
            yield srv
        finally:
            srv.shutdown()


@pytest.fixture
def run_server(key_file: Path, server_key):
    """Factory: `with run_server(rate=0) as srv:` then connect to `srv.address`."""

    def factory(**overrides):
        return running_server(key_file, key=server_key, **overrides)

    return factory


@contextlib.contextmanager
def server_process(key_file: Path, *args: str, env: dict | None = None):
    """`python3 server.py` as a subprocess on port 0; yields (proc, host, port, fingerprint)."""
    cmd = [sys.executable, str(ROOT / "server.py"), "--port", "0", "--key-file", str(key_file)]
    if "--state" not in args:  # a state file of its own, in a folder removed at the end
        folder = tempfile.mkdtemp(prefix="bcast-state-")
        cmd += ["--state", str(Path(folder) / "state.db")]
    proc = subprocess.Popen(
        [*cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    host = port = fingerprint = None
    try:
        for line in proc.stdout:
            if "listening on" in line:
                host, _, port = line.rsplit(" ", 1)[1].strip().rpartition(":")
            if line.startswith("fingerprint:"):
                fingerprint = line.split()[1]
                break
        if fingerprint is None:
            raise RuntimeError(f"server did not start: {proc.stderr.read()}")
        yield proc, host, int(port), fingerprint
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def spawn_server(key_file: Path):
    """Factory for `server_process` bound to the session key file."""

    def factory(*args: str, env: dict | None = None):
        return server_process(key_file, *args, env=env)

    return factory
