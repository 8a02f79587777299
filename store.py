"""The server's persistent state: bindings and bans (PROTOCOL.md §5), kept messages and ids (§6).

Who owns what, which threads call it:
  * The server owns the one Store object and every thread that calls it. At start it loads
    everything it needs (bindings, bans in force, the last kept messages, the id floor) into
    memory; afterwards it only writes through the store: from its writer thread (messages,
    id reservations, bindings) and, rarely, from a reader thread (ban, unban).
  * Never call the store under the hub lock: a write may wait on the disk.
  * store.py starts no threads. SqliteStore serialises its callers with one lock around its
    one connection; the file stays locked against other processes until close().

`Store` is the interface: plain values and small frozen dataclasses, nothing of SQL, so that a
shared network store could implement it later for several servers. `open_store` returns the one
implementation, SqliteStore (stdlib sqlite3).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

FILE_MODE = 0o600  # §5: the state file is created 0600 whatever the umask
DIR_MODE = 0o700  # a missing parent folder is made private too

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version), in the
# transaction that opens the file: a later revision appends a tuple, never edits one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # §5: an identity holds at most one bound name, and a name (by its NFKC+casefold key)
        # is bound to at most one identity.
        """CREATE TABLE bindings (
            identity TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            name_key TEXT NOT NULL UNIQUE,
            since_ms INTEGER NOT NULL)""",
        # until_ms NULL: until unbanned.
        """CREATE TABLE bans (
            who TEXT PRIMARY KEY,
            until_ms INTEGER,
            banned_by TEXT NOT NULL,
            reason TEXT,
            created_ms INTEGER NOT NULL)""",
        # entry: the exact JSON bytes of the delivered `message` object (§6).
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, entry BLOB NOT NULL)",
        # The highest id ever reserved or stored: §6, an id is never reused.
        "CREATE TABLE id_floor (one INTEGER PRIMARY KEY CHECK (one = 1), value INTEGER NOT NULL)",
        "INSERT INTO id_floor VALUES (1, 0)",
    ),
    (
        # §6 welcome.last_id and gap after a restart: the highest id handed out, the highest
        # message id no longer kept, and whether the last run stopped cleanly (after a crash
        # both are unknown above the id floor).
        """CREATE TABLE run_state (one INTEGER PRIMARY KEY CHECK (one = 1),
            last_id INTEGER NOT NULL, forgotten INTEGER NOT NULL, clean INTEGER NOT NULL)""",
        "INSERT INTO run_state VALUES (1, 0, 0, 1)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class StoreError(Exception):
    """The state file cannot be opened, read or written: one sentence naming it and what to do."""


@dataclass(frozen=True)
class Binding:
    """A name bound to a proven identity (§5, open mode); name_key is NFKC+casefold of name."""

    identity: str
    name: str
    name_key: str
    since_ms: int


@dataclass(frozen=True)
class Ban:
    """A ban of a fingerprint or an IP address (§5); until_ms None: until unbanned."""

    who: str
    until_ms: int | None
    by: str
    reason: str | None
    created_ms: int


@dataclass(frozen=True)
class RunState:
    """Where the last run left the ids (§6): see Store.save_run_state."""

    last_id: int  # the highest id it handed out (to a message or a dm)
    forgotten: int  # the highest message id it no longer kept
    clean: bool  # it stopped cleanly; else ids up to the floor may have been handed out


@dataclass(frozen=True)
class StoredMessage:
    """A kept message (§6): its id and the exact JSON bytes of the `message` as delivered."""

    id: int
    entry: bytes


class Store(Protocol):
    """What the server needs from its state, whatever holds it."""

    def load_bindings(self) -> list[Binding]: ...

    def bind(self, binding: Binding) -> None: ...

    def load_bans(self, now_ms: int) -> list[Ban]: ...

    def add_ban(self, ban: Ban) -> None: ...

    def remove_ban(self, who: str) -> bool: ...

    def load_messages(self, limit: int) -> list[StoredMessage]: ...

    def append_messages(self, messages: Sequence[StoredMessage], keep: int) -> None: ...

    def load_id_floor(self) -> int: ...

    def reserve_ids(self, upto: int) -> None: ...

    def load_run_state(self) -> RunState: ...

    def save_run_state(self, state: RunState) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Store: ...

    def __exit__(self, *exc_info: object) -> None: ...


def open_store(path: Path) -> Store:
    """Open (creating if missing) the state file at `path` and lock it for this process."""
    path = Path(path)
    before = _prepare_file(path)
    store = SqliteStore(path, _connect(path))
    try:
        after = os.lstat(path)
    except OSError as exc:
        store.close()
        raise StoreError(
            f"cannot read the state file {path} ({exc.strerror}); check its folder's permissions"
        ) from None
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        store.close()
        raise StoreError(f"the state file {path} was replaced while it was opened; start again")
    return store


class SqliteStore:
    """The Store in one SQLite file, in WAL mode, held with an exclusive lock until close()."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._lock = threading.Lock()  # guards _conn: one caller at a time on the connection
        self._conn: sqlite3.Connection | None = conn  # (lock) None once closed

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- bindings (§5) ---

    def load_bindings(self) -> list[Binding]:
        rows = self._run(
            "read",
            lambda c: c.execute(
                "SELECT identity, name, name_key, since_ms FROM bindings ORDER BY name_key"
            ).fetchall(),
        )
        return [Binding(*row) for row in rows]

    def bind(self, binding: Binding) -> None:
        """Bind binding.name to binding.identity, freeing the identity's old name (§5).

        The caller guarantees that no other identity holds name_key (a bound name is taken
        only by its own identity): a conflict is a bug and raises ValueError.
        """

        def work(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT identity FROM bindings WHERE name_key = ? AND identity != ?",
                (binding.name_key, binding.identity),
            ).fetchone()
            if row is not None:
                raise ValueError(
                    f"the name {binding.name!r} is bound to {row[0]}, not to {binding.identity}"
                )
            c.execute("DELETE FROM bindings WHERE identity = ?", (binding.identity,))
            c.execute(
                "INSERT INTO bindings VALUES (?, ?, ?, ?)",
                (binding.identity, binding.name, binding.name_key, binding.since_ms),
            )

        self._run("write to", work)

    # --- bans (§5) ---

    def load_bans(self, now_ms: int) -> list[Ban]:
        """The bans still in force at now_ms, sorted by who; expired ones are deleted."""

        def work(c: sqlite3.Connection) -> list[tuple]:
            c.execute("DELETE FROM bans WHERE until_ms IS NOT NULL AND until_ms <= ?", (now_ms,))
            return c.execute(
                "SELECT who, until_ms, banned_by, reason, created_ms FROM bans ORDER BY who"
            ).fetchall()

        return [Ban(*row) for row in self._run("write to", work)]

    def add_ban(self, ban: Ban) -> None:
        """Record a ban, replacing any earlier ban of the same who."""
        self._run(
            "write to",
            lambda c: c.execute(
                "INSERT OR REPLACE INTO bans VALUES (?, ?, ?, ?, ?)",
                (ban.who, ban.until_ms, ban.by, ban.reason, ban.created_ms),
            ),
        )

    def remove_ban(self, who: str) -> bool:
        """Lift the ban of who; False if none was stored."""
        cur = self._run("write to", lambda c: c.execute("DELETE FROM bans WHERE who = ?", (who,)))
        return cur.rowcount > 0

    # --- kept messages and ids (§6) ---

    def load_messages(self, limit: int) -> list[StoredMessage]:
        """The newest `limit` kept messages, in increasing id."""
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        rows = self._run(
            "read",
            lambda c: c.execute(
                "SELECT id, entry FROM messages ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall(),
        )
        return [StoredMessage(row[0], bytes(row[1])) for row in reversed(rows)]

    def append_messages(self, messages: Sequence[StoredMessage], keep: int) -> None:
        """In one transaction: store the batch, then keep only the newest `keep` (0: none).

        The id floor rises to the batch's highest id even when nothing is kept.
        """
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, not {keep}")
        if not messages:
            return

        def work(c: sqlite3.Connection) -> None:
            top = max(m.id for m in messages)
            c.execute("UPDATE id_floor SET value = MAX(value, ?)", (top,))
            if keep == 0:
                c.execute("DELETE FROM messages")
                return
            c.executemany("INSERT INTO messages VALUES (?, ?)", [(m.id, m.entry) for m in messages])
            # The keep-th newest id; NULL (nothing deleted) while fewer are stored.
            c.execute(
                "DELETE FROM messages WHERE id < "
                "(SELECT id FROM messages ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep - 1,),
            )

        self._run("write to", work)

    def load_id_floor(self) -> int:
        """The highest id ever reserved or stored (0 for a new file): hand out ids above it."""
        row = self._run(
            "read",
            lambda c: c.execute(
                "SELECT MAX((SELECT value FROM id_floor), "
                "(SELECT COALESCE(MAX(id), 0) FROM messages))"
            ).fetchone(),
        )
        return int(row[0])

    def reserve_ids(self, upto: int) -> None:
        """Record that ids up to `upto` may be handed out (never lowers the floor).

        Synced to disk before returning (synchronous=FULL for this one transaction), so that
        even a power loss cannot make a restarted server hand out an id again (§6).
        """
        self._run(
            "write to",
            lambda c: c.execute("UPDATE id_floor SET value = MAX(value, ?)", (upto,)),
            durable=True,
        )

    def load_run_state(self) -> RunState:
        row = self._run(
            "read",
            lambda c: c.execute("SELECT last_id, forgotten, clean FROM run_state").fetchone(),
        )
        return RunState(int(row[0]), int(row[1]), bool(row[2]))

    def save_run_state(self, state: RunState) -> None:
        """Record where ids stand; `clean` only at a clean stop (the start clears it)."""
        self._run(
            "write to",
            lambda c: c.execute(
                "UPDATE run_state SET last_id = ?, forgotten = ?, clean = ?",
                (state.last_id, state.forgotten, int(state.clean)),
            ),
        )

    def close(self) -> None:
        """Checkpoint the log into the file and release it; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        failure: sqlite3.Error | None = None
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            failure = exc
        finally:
            conn.close()
        if failure is not None:
            raise StoreError(
                f"cannot checkpoint the state file {self.path} ({failure}); the next start "
                f"applies its last changes from {self.path}-wal, so keep both files together"
            )

    def _run(
        self, action: str, work: Callable[[sqlite3.Connection], T], durable: bool = False
    ) -> T:
        """Run `work` in one transaction; any failure rolls back and leaves the store usable."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"the state file {self.path} is closed; open it again")
            try:
                if durable:
                    conn.execute("PRAGMA synchronous=FULL")
                try:
                    conn.execute("BEGIN")
                    result = work(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    _rollback(conn)
                    raise
                finally:
                    if durable:
                        conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"refused by the state file {self.path}: {exc}") from None
            except sqlite3.Error as exc:
                if "malformed" in str(exc):
                    advice = "stop the server and move it away to start with an empty state"
                else:
                    advice = "check the free space and the file's permissions"
                raise StoreError(
                    f"cannot {action} the state file {self.path} ({exc}); {advice}"
                ) from None


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo a failed transaction; a rollback that fails too leaves SQLite to recover later."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _prepare_file(path: Path) -> os.stat_result:
    """Create the file 0600 if missing; refuse a link, a non-file, or one open to others."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise StoreError(
            f"cannot create the folder {path.parent} for the state file {path.name} "
            f"({exc.strerror}); create it or choose another place"
        ) from None
    try:
        # O_EXCL | O_NOFOLLOW: never open something that appeared meanwhile; the mode is masked
        # by the umask only towards fewer rights, and fchmod makes it exact whatever the umask.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, FILE_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(
            f"cannot create the state file {path} ({exc.strerror}); "
            "check the folder's permissions or choose another place"
        ) from None
    else:
        try:
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StoreError(
            f"cannot read the state file {path} ({exc.strerror}); check its folder's permissions"
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"the state file {path} is a symbolic link; give the file's own path")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"the state file {path} is not a regular file; give a file's path")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(
            f"the state file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}' and start again"
        )
    # Checked here because SQLite would only say "disk I/O error" or "readonly database".
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(
            f"the state file {path} is not readable and writable by this user; "
            "give it read and write access (chmod, chown) and start again"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"the folder {path.parent} of the state file {path.name} is not writable by this "
            f"user, and SQLite keeps {path.name}-wal there; make it writable and start again"
        )
    return st


def _connect(path: Path) -> sqlite3.Connection:
    """Open the existing file, lock it, check it and bring its schema up to date."""
    # mode=rw: SQLite must not create a file of its own (with the umask's mode) if ours vanished.
    uri = "file://" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    try:
        # timeout=0: a file held by another server is refused at once, not after a wait.
        conn = sqlite3.connect(
            uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    try:
        _configure(conn, path)
    except BaseException as exc:
        _rollback(conn)
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise _open_error(path, exc) from None
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    # EXCLUSIVE before the first access in WAL mode: the WAL index lives in this process's
    # memory (no -shm file) and the lock, taken by BEGIN EXCLUSIVE below, is kept until close:
    # a second server on the same file, in this process or another, gets "database is locked".
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(
            f"the state file {path} cannot use a write-ahead log (journal mode {mode}); "
            "put it on a local file system"
        )
    # NORMAL in WAL mode syncs only at checkpoints: a power loss may lose the last
    # transactions (kept messages, which §6 allows after a crash) but never corrupts the file,
    # and a crash of the process alone loses nothing committed. reserve_ids syncs each time.
    conn.execute("PRAGMA synchronous=NORMAL")
    # Trimmed messages are overwritten, not left readable in free pages of the file.
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("BEGIN EXCLUSIVE")
    # quick_check(1): the first problem found is enough to refuse the file.
    lines = [line for (row,) in conn.execute("PRAGMA quick_check(1)") for line in row.splitlines()]
    problems = [line for line in lines if not line.startswith("***")]  # "*** in database main"
    if problems != ["ok"]:
        raise StoreError(
            f"the state file {path} is corrupt ({' '.join(problems)}); "
            "move it away to start with an empty state"
        )
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the state file {path} has schema version {version}, newer than this server's "
            f"{SCHEMA_VERSION}; run a newer server or move the file away"
        )
    if version == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
        raise StoreError(
            f"the state file {path} is a database of another program; "
            "move it away or choose another path"
        )
    for number in range(version, SCHEMA_VERSION):
        for statement in _MIGRATIONS[number]:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number + 1}")
    conn.execute("COMMIT")


def _open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """One sentence for what SQLite said while opening the file."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreError(
            f"the state file {path} is in use by another server; "
            "stop it or give this server another state file"
        )
    if "not a database" in text:
        return StoreError(
            f"the state file {path} is not a database; move it away or choose another path"
        )
    if "malformed" in text or "corrupt" in text:
        return StoreError(
            f"the state file {path} is corrupt ({text}); move it away to start with an empty state"
        )
    return StoreError(
        f"cannot open the state file {path} ({text}); "
        "check the file's and its folder's permissions and the free space"
    )
