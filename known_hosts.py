"""Pins of server fingerprints (§2 Server identity): the known_hosts file and its policy.

`KnownHosts` is the file: lines `host:port SHA256:...`, appended or replaced
atomically, never skipped (a malformed line is an error naming it). `check_pin` is
the policy: trust on first use per `host:port`, or the `--fingerprint` given; a
changed fingerprint is a TrustError that shows both. Runs on whichever thread opens
a connection; the file is its only shared state.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from display import sanitize
from errors import TrustError, UsageError

FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")  # 32 bytes, unpadded base64


def host_key(host: str, port: int) -> str:
    """The known_hosts key: `host:port`, with IPv6 addresses in brackets."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_key(value: str) -> str:
    """`HOST:PORT` (or `[IPv6]:PORT`) as the user typed it, as a known_hosts key."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:12345)")
    return host_key(host, int(port))


def default_known_hosts() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "bcast" / "known_hosts"


class KnownHosts:
    """Pins as lines `host:port SHA256:...`: appended, or replaced atomically; never skipped.

    Only the default file's folders are created (`create_dirs`): a path the user
    gave whose folder is missing is a typo to report, not a tree to make.
    """

    def __init__(self, path: Path, create_dirs: bool = False):
        self.path = path
        self.create_dirs = create_dirs

    def _read(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustError(f"cannot read {self.path}: {exc}") from None

    def _pins(self, lines: list[str]) -> list[tuple[int, str, str]]:
        """(line number, host:port, fingerprint) of every pin; a malformed line is an error."""
        pins = []
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not FINGERPRINT_RE.match(fields[1]) or ":" not in fields[0]:
                raise TrustError(
                    f"{self.path} line {number} is malformed (expected 'host:port SHA256:...'): "
                    f"{sanitize(line)!r}; fix or remove that line"
                )
            pins.append((number, fields[0].lower(), fields[1]))
        return pins

    def lookup(self, key: str) -> tuple[str, int] | None:
        """(fingerprint, line number) pinned for `key`; a malformed line is a TrustError."""
        found: tuple[str, int] | None = None
        for number, host, fp in self._pins(self._read()):
            if host != key:
                continue
            if found and found[0] != fp:
                raise TrustError(
                    f"{self.path} pins two different fingerprints for {key} (lines {found[1]} "
                    f"and {number}); remove the wrong one"
                )
            found = found or (fp, number)
        return found

    def add(self, key: str, fp: str) -> None:
        """Append one pin (O_APPEND, one write), creating the file 0600 (and the default
        file's folders 0700)."""
        self._make_folder()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            lead = b""
            if size:  # a hand-edited file may lack its final newline
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    lead = b"" if f.read(1) == b"\n" else b"\n"
            os.write(fd, lead + f"{key} {fp}\n".encode())
        finally:
            os.close(fd)

    def replace(self, key: str, fp: str | None) -> list[str]:
        """Put `fp` in place of every pin of `key` (None: remove them), by writing a new file
        and renaming it over the old one; returns the fingerprints taken out."""
        lines = self._read()
        gone = {number: old for number, host, old in self._pins(lines) if host == key}
        kept = [line for number, line in enumerate(lines, 1) if number not in gone]
        if fp is not None:
            kept.append(f"{key} {fp}")
        self._make_folder()
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return list(dict.fromkeys(gone.values()))

    def _make_folder(self) -> None:
        if self.create_dirs:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def check_pin(
    known: KnownHosts, key: str, fp: str, explicit: str | None, status: Callable[[str], None]
) -> None:
    """Trust on first use per `host:port`, or the `--fingerprint` the user gave (§2), which
    is then pinned too (replacing an older pin, saying so)."""
    if explicit:
        if fp != explicit:
            raise TrustError(
                f"the server at {key} presents the fingerprint {fp}, not {explicit} as given "
                "with --fingerprint; not connecting"
            )
        pinned = known.lookup(key)
        if pinned and pinned[0] == fp:
            return
        try:
            known.replace(key, fp)
        except OSError as exc:
            status(f"{fp} matches, but cannot be pinned in {known.path}: {exc.strerror or exc}")
            return
        was = f", replacing the old pin {pinned[0]}" if pinned else ""
        status(f"pinned {fp} for {key} in {known.path} as given with --fingerprint{was}")
        return
    pinned = known.lookup(key)
    if pinned is None:
        try:
            known.add(key, fp)
            where = f"pinned in {known.path}"
        except OSError as exc:
            where = f"NOT pinned: cannot write {known.path}: {exc.strerror or exc}"
        status(f"first connection to {key}: server fingerprint {fp} ({where})")
    elif pinned[0] != fp:
        bar = "@" * 66
        raise TrustError(
            f"{bar}\n@  WARNING: THE FINGERPRINT OF THE SERVER AT {key} HAS CHANGED!\n{bar}\n"
            f"The server now presents  {fp}\nbut you pinned           {pinned[0]}\n"
            f"in {known.path} line {pinned[1]}.\n"
            "Someone may be intercepting the connection, or the server's key was replaced.\n"
            "If you know the key was replaced on purpose, check the new fingerprint with the "
            f"server's operator, then run\n    python3 client.py --forget {key}\n"
            f"(or remove line {pinned[1]} of {known.path}) and connect again. Not connecting."
        )
