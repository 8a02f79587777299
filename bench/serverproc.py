"""The server under test as a subprocess, and what /proc says about it.

One RSA key is generated per benchmark session into a private temporary folder
(mode 0700, the key file 0600) and reused by every server started from it, so
no run pays for key generation. Every started server is killed when its
`ServerProcess` context ends, and also if this process dies first
(PR_SET_PDEATHSIG), so an interrupted benchmark leaves no server behind.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "server.py"
RSA_BITS = 3072  # the server's default (PROTOCOL.md §2)
START_TIMEOUT_S = 20.0  # reading the key and binding takes well under a second
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL: the server promises to exit within 2 s
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LISTEN_RE = re.compile(r"listening on (\S+):(\d+)")
# The load scenarios connect hundreds of clients from 127.0.0.1 at once: the
# server's per-source limits (issue 12) are turned off for them, through the
# environment so that an older server.py (an A/B with --server) still starts.
# bench/abuse.py measures the limits and keeps them on.
PER_SOURCE_LIMITS_OFF = {"BCAST_MAX_UNJOINED_PER_IP": "0", "BCAST_CONNECT_RATE_PER_IP": "0"}


class KeyDir:
    """A private temporary folder holding one fresh server key; removed on exit."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="bcast-bench-"))  # mode 0700
        self.key_file = self.path / "server_key.pem"
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exact, whatever the umask
            os.write(fd, pem)
        finally:
            os.close(fd)
        self.spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> KeyDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the benchmark process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`python3 server.py ...` on 127.0.0.1, port 0; stdout parsed for the address."""

    def __init__(
        self,
        key_file: Path,
        log_path: Path,
        server: Path = SERVER,
        env: dict[str, str] | None = None,
        **flags: object,
    ):
        """`env` is added to this process's environment; by default the per-source
        limits are off (PER_SOURCE_LIMITS_OFF)."""
        self.cmd = [
            sys.executable,
            str(server),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--key-file",
            str(key_file),
        ]
        for name, value in flags.items():
            self.cmd += ["--" + name.replace("_", "-"), str(value)]
        self.env = {**os.environ, **(PER_SOURCE_LIMITS_OFF if env is None else env)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.fingerprint = ""

    def start(self, prefix: list[str] | None = None) -> None:
        """Start the server (optionally under `prefix`, e.g. a profiler) and wait for it."""
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                (prefix or []) + self.cmd,
                cwd=Path(self.cmd[1]).parent,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.fingerprint:
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {self.log_path}")
            found = LISTEN_RE.search(line)
            if found:
                self.address = (found.group(1), int(found.group(2)))
            if line.startswith("fingerprint:"):
                self.fingerprint = line.split(":", 1)[1].strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- /proc readers ---


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()  # the command name may hold spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14, 15 of stat(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_times(pid))


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot (all cores), /proc/stat.

    `busy` is what programs here used; `stolen` is time the hypervisor gave to
    other machines while this one wanted to run (steal): on a shared host it
    slows every figure without any program here being busy.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - steal - guest) / CLK_TCK, steal / CLK_TCK


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process."""
    return int(status_fields(pid)["VmRSS"].split()[0]) * 1024


def thread_count(pid: int) -> int:
    return int(status_fields(pid)["Threads"])


def raise_nofile(want: int) -> int:
    """Lift our own open-file limit towards `want` (at most the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def server_version() -> str:
    """The commit of the server under test, "+dirty" if its files differ from it."""
    files = ["server.py", "protocol.py", "crypto_utils.py"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *files], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine_info() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PHYS_PAGES") * PAGE_BYTES / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    versions: dict[str, str] = {}
    for module in ("cryptography", "Crypto"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }
