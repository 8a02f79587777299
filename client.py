"""bcast/1 chat client: the command line, and connecting and joining (PROTOCOL.md).

`main(argv) -> int` parses the flags (each with a BCAST_ fallback), checks them,
connects, asks for a name on a terminal, joins, and hands over to `chat.Chat`;
every failure becomes one sentence and an exit status (`errors.py`). Run it as
`python3 client.py`. Who owns the rest, from the top down (none imports one above):
  * chat.py     `Chat`: the main thread: typed lines to messages and commands, leaving
  * feed.py     `Feed`: the network thread: shows what arrives; after a lost
                connection, recovers (through the link) or ends the chat
  * link.py     `Link`: the joined session across reconnects (§6) and the sender thread
  * session.py  `Session`: one connection: handshake, records, the bounded inbox
  * known_hosts.py  the server fingerprint pins (§2)
  * console.py  `Console` (the terminal, one lock for all output) and `Pipe`
  * lineedit.py keys and the line being edited; commands.py the /commands; view.py
    how messages look; display.py escaping, widths, wrapping; errors.py failures
The main thread runs everything here; the chat's threads start in `Chat.run`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from protocol import has_lone_surrogate, name_problem

# The one third-party package (pycryptodome, imported by crypto_utils) is checked before
# any module that imports it: a terminal without the venv gets one sentence saying what to
# do instead of a ModuleNotFoundError traceback.
try:
    from crypto_utils import (
        CryptoError,
        identity_fingerprint,
        identity_public,
        load_or_create_identity,
    )
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] != "Crypto":
        raise
    sys.stderr.write(
        f"client.py: the Python package pycryptodome is missing (no module named "
        f"{exc.name!r}); install it with `python3 -m pip install -r requirements.txt`, or "
        "use the project's venv: `. .venv/bin/activate` in each new terminal, or run "
        "`.venv/bin/python client.py`\n"
    )
    sys.exit(2)

from chat import Chat
from commands import help_rows
from console import Console, Pipe, Woken, signals_handled
from display import Line, sanitize
from errors import EXIT_LOST, EXIT_OK, ClientError, ConnectionLost, NameRefused, UsageError
from known_hosts import (
    FINGERPRINT_RE,
    KnownHosts,
    check_pin,
    default_known_hosts,
    host_key,
    parse_host_key,
)
from session import Joiner, Session
from view import Style

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
# A connection opened this long ago is not used for a join: the server's handshake timeout
# (10 s) counts from the TCP accept, and the name may take a person a while to type.
JOIN_FRESH_S = 6.0
HISTORY_DEFAULT = 50  # earlier messages shown on joining, on a terminal (a pipe: none)
MAX_HISTORY = 1_000_000  # --history past this is a typo
NAME_PROMPT = "your name: "


def default_identity() -> Path:
    """$XDG_DATA_HOME/bcast/identity.pem, i.e. ~/.local/share/bcast/identity.pem."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "bcast" / "identity.pem"


EPILOG = """\
exit status: 0 left normally, 1 connection lost or refused (or, piped, a line not
delivered), 2 bad usage or server fingerprint mismatch.

The server's fingerprint is pinned per host:port in $XDG_CONFIG_HOME/bcast/known_hosts
(default ~/.config/bcast/known_hosts) on first use; a changed fingerprint is refused.
Your identity (an Ed25519 key) is made on first use in $XDG_DATA_HOME/bcast/identity.pem
(default ~/.local/share/bcast/identity.pem) and proven to the server at every join.
With stdin or stdout not a terminal the client is a pipe tool: it sends each input
line (paced to the server's rate), prints one received message per line on stdout
and status lines on stderr, and leaves at end of input (--follow: keeps listening).

""" + "\n".join(help_rows(op=False))

# One-shot actions: they do something and exit, so they take no BCAST_ fallback (an
# exported BCAST_FORGET would forget a pin on every run).
ACTION_FLAGS = frozenset({"help", "forget", "show_identity"})
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(environ: Mapping[str, str], var: str) -> bool:
    """A yes/no environment variable (1/0, true/false, yes/no, on/off)."""
    value = environ.get(var, "").strip().lower()
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise UsageError(f"{var}={environ[var]!r}: use 1 or 0 (true/false, yes/no, on/off)")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; every setting flag falls back to BCAST_<FLAG> in `environ`."""
    environ = os.environ if environ is None else environ
    env = environ.get
    p = argparse.ArgumentParser(
        prog="client.py",
        description="bcast/1 encrypted group-chat client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default=env("BCAST_HOST", DEFAULT_HOST),
        help=f"server address; BCAST_HOST (default {DEFAULT_HOST})",
    )
    p.add_argument(
        "--port",
        default=env("BCAST_PORT", str(DEFAULT_PORT)),
        help=f"server port; BCAST_PORT (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--name", default=env("BCAST_NAME"), help="your name; BCAST_NAME (asked when missing)"
    )
    p.add_argument(
        "--fingerprint",
        default=env("BCAST_FINGERPRINT") or None,
        help="the server fingerprint SHA256:... to require (and pin) instead of trusting on "
        "first use; BCAST_FINGERPRINT",
    )
    p.add_argument(
        "--known-hosts",
        type=Path,
        default=env("BCAST_KNOWN_HOSTS") or None,
        help="the pin file; BCAST_KNOWN_HOSTS (default $XDG_CONFIG_HOME/bcast/known_hosts)",
    )
    p.add_argument(
        "--identity",
        type=Path,
        default=env("BCAST_IDENTITY") or None,
        help="your identity key, made on first use; BCAST_IDENTITY "
        "(default $XDG_DATA_HOME/bcast/identity.pem)",
    )
    p.add_argument(
        "--guest",
        action="store_true",
        default=env_flag(environ, "BCAST_GUEST"),
        help="join without proving an identity; BCAST_GUEST=1",
    )
    p.add_argument(
        "--history",
        default=env("BCAST_HISTORY"),
        metavar="N",
        help="how many earlier messages to show when joining; BCAST_HISTORY "
        f"(default {HISTORY_DEFAULT} on a terminal, 0 in a pipe)",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        default=env_flag(environ, "BCAST_FOLLOW"),
        help="in a pipe, keep printing messages after the input ends; BCAST_FOLLOW=1",
    )
    p.add_argument(
        "--no-bell",
        action="store_true",
        default=env_flag(environ, "BCAST_NO_BELL"),
        help="never ring the terminal bell (/bell changes it while chatting); BCAST_NO_BELL=1",
    )
    p.add_argument(
        "--forget",
        metavar="HOST:PORT",
        help="remove the pinned fingerprint of HOST:PORT from the pin file, then exit",
    )
    p.add_argument(
        "--show-identity",
        action="store_true",
        help="print your identity's fingerprint (making the key if needed), then exit",
    )
    return p


def ask_name(io: Console, status: Callable[[str], None]) -> str | None:
    """Ask for a name until one passes §4's predicate; None when the user gives up."""
    while True:
        try:
            name = io.read_line(NAME_PROMPT)
        except Woken:
            return None
        if name is None:
            return None
        io.finish(keep=False)  # the answer stays on the screen, the prompt goes until asked
        io.show(Line(NAME_PROMPT + sanitize(name)))
        name = name.strip()
        problem = name_check(name)
        if problem is None:
            return name
        status(f"{problem}; try another")


def name_check(name: str) -> str | None:
    """Why `name` cannot be used, as the server would say (§4), or None."""
    if has_lone_surrogate(name):
        return "the name holds bytes that are not UTF-8"
    problem = name_problem(name)
    return None if problem is None else f"the name {sanitize(name)!r} {problem}"


def join_chat(joiner: Joiner, io: Console | Pipe, name: str | None, style: Style) -> Session | None:
    """Connect first (so a refused connection or a changed key is said before anyone
    types), then ask for a name if none was given, then join; interactively, ask again
    after a refused name. None when the user gives up."""
    session = joiner.open()
    try:
        while True:
            if name is None:
                assert isinstance(io, Console)
                name = ask_name(io, lambda text: io.show(style.problem(text)))
                if name is None:
                    session.close()
                    return None
            if session.age > JOIN_FRESH_S:  # the server's handshake timeout is near
                session.close()
                session = joiner.open()
            try:
                joiner.join(session, name)
                return session
            except NameRefused as exc:
                if not io.interactive:
                    raise
                io.show(style.problem(f"{exc}; try another"))
                name = None
            except ConnectionLost:
                if not io.interactive or session.age <= JOIN_FRESH_S:
                    raise
                session.close()  # it timed out while the name was typed: once more
                session = joiner.open()
    except BaseException:
        session.close()
        raise


def forget(known: KnownHosts, target: str) -> int:
    """--forget HOST:PORT: remove its pins (atomically), say what was removed."""
    key = parse_host_key(target)
    try:
        gone = known.replace(key, None) if known.lookup(key) else []
    except OSError as exc:
        raise ClientError(f"cannot rewrite {known.path}: {exc.strerror or exc}") from None
    if gone:
        print(f"removed the pin of {key} ({', '.join(gone)}) from {known.path}")
    else:
        print(f"no pin for {key} in {known.path}; nothing to remove")
    return EXIT_OK


def load_identity(path: Path, status: Callable[[str], None]) -> Any:
    """Our Ed25519 identity (§5), made on first use (mode 0600); an unusable file is a
    usage error naming it."""
    new = not path.exists()
    try:
        key = load_or_create_identity(path)
    except CryptoError as exc:
        raise UsageError(str(exc)) from None
    if new:
        fp = identity_fingerprint(identity_public(key))
        status(f"made your identity {fp} in {path} (keep it: it proves your name)")
    return key


def history_count(value: str | None, interactive: bool) -> int:
    if value is None:
        return HISTORY_DEFAULT if interactive else 0
    if not value.isdigit() or not value.isascii() or int(value) > MAX_HISTORY:
        raise UsageError(f"--history takes a number of messages 0..{MAX_HISTORY}, not {value!r}")
    return int(value)


def run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    if args.known_hosts is not None and not args.known_hosts.parent.is_dir():
        raise UsageError(
            f"the folder of the pin file {args.known_hosts} does not exist "
            f"({args.known_hosts.parent}); create it or give another --known-hosts"
        )
    known = KnownHosts(args.known_hosts or default_known_hosts(), args.known_hosts is None)
    if args.forget is not None:
        return forget(known, args.forget)
    if args.show_identity:
        key = load_identity(args.identity or default_identity(), lambda text: None)
        print(identity_fingerprint(identity_public(key)))
        return EXIT_OK
    if not str(args.port).isdigit() or not 0 < int(args.port) < 65536:
        raise UsageError(f"the port must be 1..65535, not {args.port!r}")
    if args.fingerprint and not FINGERPRINT_RE.match(args.fingerprint):
        raise UsageError("--fingerprint takes the form SHA256: followed by 43 base64 characters")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    history = history_count(args.history, interactive)
    if args.name is not None and (problem := name_check(args.name)):
        raise UsageError(problem)
    if args.name is None and not interactive:
        raise UsageError(
            "--name (or BCAST_NAME) is required when input or output is not a terminal"
        )
    colour = interactive and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    style = Style(colour, multiline=interactive)
    key = host_key(args.host, int(args.port))
    io: Console | Pipe
    if interactive:
        io = Console(sys.stdin.fileno(), sys.stdout)
    else:
        io = Pipe(sys.stdin.fileno(), sys.stdout, sys.stderr)
    # Before the chat, SIGTERM interrupts like SIGINT, so the terminal mode is restored.
    with io, signals_handled((signal.SIGTERM,), signal.default_int_handler):

        def status(text: str) -> None:
            io.show(style.status(text))

        identity = None
        if not args.guest:
            identity = load_identity(args.identity or default_identity(), status)

        def verify(fp: str) -> None:
            check_pin(known, key, fp, args.fingerprint, status)

        joiner = Joiner(args.host, int(args.port), verify, identity, history)
        session = join_chat(joiner, io, args.name, style)
        if session is None:
            return EXIT_OK
        bell = "off" if args.no_bell else "mentions"
        return Chat(io, style, joiner, session, bell, args.follow).run()


def main(argv: list[str] | None = None) -> int:
    """Run the client; every failure becomes one sentence on stderr and an exit status."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        return run(argv)
    except ClientError as exc:
        message, code = str(exc), exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # no traceback, ever: one sentence
        message, code = f"unexpected error: {type(exc).__name__}: {exc}", EXIT_LOST
    with contextlib.suppress(OSError, ValueError):  # a loud warning keeps its own layout
        print(message if "\n" in message else f"client.py: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
