"""The state store (store.py): what the server keeps across restarts, PROTOCOL.md §5 and §6."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netutil import run_in_threads

from store import Ban, Binding, StoredMessage, StoreError, open_store

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
PAGE = 4096  # SQLite's default page size: page 1 holds the header and the schema
CHILD_WAIT_S = 10  # how long a helper process may take to start and open its store

A = "SHA256:" + "a" * 43
B = "SHA256:" + "b" * 43


def entry(i: int) -> bytes:
    """The JSON bytes of a delivered message with id i, as the server would store them."""
    return b'{"type":"message","id":%d,"from":"ana","text":"hi \\u00e9 %d","ts":1}' % (i, i)


def messages(first: int, last: int) -> list[StoredMessage]:
    return [StoredMessage(i, entry(i)) for i in range(first, last + 1)]


def make_db(path: Path, count: int = 200) -> Path:
    """A real state file with `count` kept messages and a binding, closed."""
    with open_store(path) as store:
        store.append_messages(messages(1, count), keep=count)
        store.bind(Binding(A, "Ana", "ana", 5))
    return path


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- creating and refusing the file ---


def test_new_file_is_0600_under_umask_0(tmp_path: Path):
    """§5: the state file is created with mode 0600 whatever the umask, and so is its log."""
    path = tmp_path / "state.db"
    with umask(0), open_store(path) as store:
        store.append_messages(messages(1, 1), keep=10)
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(f"{path}-wal").st_mode & 0o777 == 0o600
        assert not os.path.exists(f"{path}-shm")  # the WAL index stays in memory


def test_missing_folder_created_0700(tmp_path: Path):
    """A missing parent folder is created private (0700), whatever the umask."""
    path = tmp_path / "new" / "state.db"
    with umask(0), open_store(path):
        pass
    assert os.stat(path.parent).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644])
def test_file_open_to_group_or_others_refused(tmp_path: Path, mode: int):
    """A state file readable or writable by group or others is refused, naming the fix."""
    path = make_db(tmp_path / "state.db")
    os.chmod(path, mode)
    with pytest.raises(StoreError) as info:
        open_store(path)
    assert str(info.value) == (
        f"the state file {path} is accessible by group or others (mode {mode:04o}); "
        f"run 'chmod 600 {path}' and start again"
    )


def test_symlink_refused(tmp_path: Path):
    """A state file that is a symbolic link is refused, even to a good file."""
    target = make_db(tmp_path / "real.db")
    link = tmp_path / "state.db"
    link.symlink_to(target)
    with pytest.raises(StoreError, match=r"^the state file .*state\.db is a symbolic link; "):
        open_store(link)


def test_directory_and_fifo_refused(tmp_path: Path):
    """A state path that is not a regular file is refused in one sentence."""
    (tmp_path / "dir").mkdir(mode=0o700)
    os.mkfifo(tmp_path / "fifo", 0o600)
    for name in ("dir", "fifo"):
        with pytest.raises(StoreError, match=r"is not a regular file; give a file's path$"):
            open_store(tmp_path / name)


@pytest.mark.parametrize("damage", ["random pages", "zeroed page 2", "schema page"])
def test_corrupt_file_refused(tmp_path: Path, damage: str):
    """A state file whose pages are damaged is refused with the sentence to move it away."""
    path = make_db(tmp_path / "state.db")
    data = bytearray(path.read_bytes())
    rng = random.Random(damage)
    if damage == "random pages":
        data[PAGE:] = rng.randbytes(len(data) - PAGE)
    elif damage == "zeroed page 2":
        data[PAGE : 2 * PAGE] = bytes(PAGE)
    else:
        data[200:PAGE] = rng.randbytes(PAGE - 200)  # the schema, after the 100-byte header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        open_store(path)
    message = str(info.value)
    assert message.startswith(f"the state file {path} is corrupt (")
    assert message.endswith("); move it away to start with an empty state")
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"hello\n", b"SQLite format 2\0" + bytes(200), bytes(5000)])
def test_not_a_database_refused(tmp_path: Path, content: bytes):
    """A file that is not a database is refused, and left as it was."""
    path = tmp_path / "state.db"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(StoreError, match=r"^the state file .* is not a database; move it away"):
        open_store(path)
    assert path.read_bytes() == content


def test_database_of_another_program_refused(tmp_path: Path):
    """A database that is not a bcast state file (schema version 0, tables) is not touched."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    os.chmod(path, 0o600)
    with pytest.raises(StoreError, match=r"is a database of another program; move it away"):
        open_store(path)


def test_newer_schema_refused(tmp_path: Path):
    """A state file written by a later schema revision is refused, not downgraded."""
    path = make_db(tmp_path / "state.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"has schema version 99, newer than this server's 2;"):
        open_store(path)


# --- one server per file ---


def test_second_opener_in_this_process_refused(tmp_path: Path):
    """A file held by a store is refused to a second store at once; free again after close."""
    path = tmp_path / "state.db"
    first = open_store(path)
    first.append_messages(messages(1, 3), keep=10)
    with pytest.raises(StoreError) as info:
        open_store(path)
    assert str(info.value) == (
        f"the state file {path} is in use by another server; "
        "stop it or give this server another state file"
    )
    assert [m.id for m in first.load_messages(10)] == [1, 2, 3]  # the holder is unharmed
    first.close()
    with open_store(path) as second:
        assert [m.id for m in second.load_messages(10)] == [1, 2, 3]


HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from store import StoredMessage, open_store
store = open_store(Path(sys.argv[2]))
store.append_messages([StoredMessage(7, b"from the child")], keep=10)
store.reserve_ids(1000)
print("ready", flush=True)
sys.stdin.read()
"""

OPENER = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from store import StoreError, open_store
try:
    open_store(Path(sys.argv[2]))
except StoreError as exc:
    print(exc)
"""


def python(script: str, path: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_file_held_by_another_process_refused_until_it_dies(tmp_path: Path):
    """A file held by another process is "in use"; its crash frees it, losing nothing committed."""
    path = tmp_path / "state.db"
    child = python(HOLDER, path)
    try:
        assert child.stdout.readline() == "ready\n"
        with pytest.raises(StoreError, match=r"is in use by another server"):
            open_store(path)
        child.send_signal(signal.SIGKILL)  # a crash: no close(), the log is left behind
        child.wait(CHILD_WAIT_S)
    finally:
        child.kill()
        child.wait(CHILD_WAIT_S)
    with open_store(path) as store:
        assert store.load_messages(10) == [StoredMessage(7, b"from the child")]
        assert store.load_id_floor() == 1000


def test_other_process_refused_while_this_one_holds(tmp_path: Path):
    """Another process opening a file this process holds gets "in use" at once."""
    path = tmp_path / "state.db"
    with open_store(path):
        child = python(OPENER, path)
        out, _ = child.communicate(timeout=CHILD_WAIT_S)
    assert out == (
        f"the state file {path} is in use by another server; "
        "stop it or give this server another state file\n"
    )


# --- permissions at open, failures while running ---


@pytest.fixture
def as_nobody() -> Iterator[tuple[Path, Callable[[Callable[[], object]], str]]]:
    """A folder and a runner that calls fn without root's rights (root ignores file modes).

    Not root: the runner calls fn here. Root: in a forked child switched to nobody, with the
    folder outside pytest's private tree so that nobody can reach it.
    """
    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp())
        yield folder, lambda fn: outcome(fn)
        shutil.rmtree(folder)
        return
    folder = Path(tempfile.mkdtemp())
    os.chown(folder, NOBODY, NOBODY)

    def run(fn: Callable[[], object]) -> str:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.write(write_end, outcome(fn).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            text = reader.read().decode()
        os.waitpid(pid, 0)
        return text

    try:
        yield folder, run
    finally:
        shutil.rmtree(folder)


def outcome(fn: Callable[[], object]) -> str:
    try:
        return f"ok {fn()!r}"
    except StoreError as exc:
        return f"StoreError: {exc}"


def test_read_only_file_refused_at_open(as_nobody):
    """A state file this user cannot write is refused in one sentence, not "disk I/O error"."""
    folder, run = as_nobody
    path = folder / "state.db"

    def scenario() -> object:
        make_db(path)
        os.chmod(path, 0o400)
        open_store(path)

    assert run(scenario) == (
        f"StoreError: the state file {path} is not readable and writable by this user; "
        "give it read and write access (chmod, chown) and start again"
    )


def test_read_only_folder_refused_at_open(as_nobody):
    """A folder where SQLite cannot create its log is refused in one sentence, naming it."""
    folder, run = as_nobody
    path = folder / "state.db"

    def scenario() -> object:
        make_db(path)
        os.chmod(folder, 0o500)
        try:
            open_store(path)
        finally:
            os.chmod(folder, 0o700)

    assert run(scenario) == (
        f"StoreError: the folder {folder} of the state file state.db is not writable by this "
        "user, and SQLite keeps state.db-wal there; make it writable and start again"
    )


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Files of this process cannot grow past `limit` bytes: a disk that is full for us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_write_failure_raises_store_error_and_store_recovers(tmp_path: Path):
    """A failed write raises StoreError, stores nothing of its batch, and later writes work."""
    path = tmp_path / "state.db"
    store = open_store(path)
    store.append_messages(messages(1, 1), keep=1000)
    big = [StoredMessage(i, b"x" * 4000) for i in range(2, 302)]  # 1.2 MB: the log must grow
    with file_size_limit(64 * 1024):
        for _ in range(2):
            with pytest.raises(StoreError) as info:
                store.append_messages(big, keep=1000)
            assert str(info.value).startswith(f"cannot write to the state file {path} (")
            assert str(info.value).endswith("); check the free space and the file's permissions")
        assert [m.id for m in store.load_messages(1000)] == [1]
        assert store.load_id_floor() == 1
    store.append_messages(big, keep=1000)
    store.close()
    with open_store(path) as again:
        assert [m.id for m in again.load_messages(1000)] == list(range(1, 302))


# --- what is kept, across close and reopen ---


def test_bindings_round_trip(tmp_path: Path):
    """§5: bindings survive a restart exactly as bound."""
    path = tmp_path / "state.db"
    bound = [Binding(A, "Ana", "ana", 1_700_000_000_000), Binding(B, "Ｂｏｂ", "bob", 2)]
    with open_store(path) as store:
        for binding in bound:
            store.bind(binding)
    with open_store(path) as store:
        assert store.load_bindings() == bound


def test_binding_moves_with_its_identity(tmp_path: Path):
    """§5: joining under a new name moves the binding; the old name is free for another."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.bind(Binding(A, "Ana", "ana", 1))
        store.bind(Binding(A, "Anna", "anna", 2))
        store.bind(Binding(B, "ANA", "ana", 3))
    with open_store(path) as store:
        assert store.load_bindings() == [Binding(B, "ANA", "ana", 3), Binding(A, "Anna", "anna", 2)]


def test_name_bound_to_another_identity_cannot_be_bound(tmp_path: Path):
    """§5: a bound name is only ever taken by its own identity; a conflict changes nothing."""
    with open_store(tmp_path / "state.db") as store:
        store.bind(Binding(A, "Ana", "ana", 1))
        store.bind(Binding(B, "Bob", "bob", 2))
        with pytest.raises(ValueError, match=r"is bound to SHA256:a+, not to SHA256:b+"):
            store.bind(Binding(B, "ANA", "ana", 3))
        assert store.load_bindings() == [Binding(A, "Ana", "ana", 1), Binding(B, "Bob", "bob", 2)]


def test_bans_round_trip_replace_and_remove(tmp_path: Path):
    """§5: bans are kept across restarts; a new ban of the same who replaces the old one."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.add_ban(Ban("2001:db8::1", None, "op", None, 10))
        store.add_ban(Ban(A, 5_000, "op", "spam", 11))
        store.add_ban(Ban(A, None, "root", "spam again", 12))
        store.add_ban(Ban("192.0.2.7", 9_000, "op", "flood", 13))
        assert store.remove_ban("192.0.2.7") is True
        assert store.remove_ban("192.0.2.7") is False
        assert store.remove_ban("198.51.100.1") is False
    with open_store(path) as store:
        assert store.load_bans(now_ms=100) == [
            Ban("2001:db8::1", None, "op", None, 10),
            Ban(A, None, "root", "spam again", 12),
        ]


def test_expired_bans_are_not_loaded(tmp_path: Path):
    """§5: `bans` lists the bans still in force; one whose until has come is gone for good."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.add_ban(Ban("a", 1_000, "op", None, 0))
        store.add_ban(Ban("b", 1_001, "op", None, 0))
        store.add_ban(Ban("c", None, "op", None, 0))
        assert [ban.who for ban in store.load_bans(now_ms=999)] == ["a", "b", "c"]
        assert [ban.who for ban in store.load_bans(now_ms=1_000)] == ["b", "c"]
    with open_store(path) as store:
        assert [ban.who for ban in store.load_bans(now_ms=0)] == ["b", "c"]
        assert store.remove_ban("a") is False


def test_history_keeps_the_newest_in_increasing_id(tmp_path: Path):
    """§6: the last `history` messages are kept across restarts, in increasing id, byte exact."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.append_messages(messages(1, 5), keep=4)
        store.append_messages([StoredMessage(9, entry(9)), StoredMessage(8, entry(8))], keep=4)
        assert [m.id for m in store.load_messages(100)] == [4, 5, 8, 9]
    with open_store(path) as store:
        assert store.load_messages(100) == [StoredMessage(i, entry(i)) for i in (4, 5, 8, 9)]
        assert store.load_messages(2) == [StoredMessage(8, entry(8)), StoredMessage(9, entry(9))]
        assert store.load_messages(0) == []
        store.append_messages(messages(10, 10), keep=2)
        assert [m.id for m in store.load_messages(100)] == [9, 10]


def test_keep_zero_keeps_nothing(tmp_path: Path):
    """§6: with history 0 nothing is kept, yet the id floor still rises."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.append_messages(messages(1, 3), keep=10)
        store.append_messages(messages(4, 6), keep=0)
    with open_store(path) as store:
        assert store.load_messages(100) == []
        assert store.load_id_floor() == 6


def test_duplicate_message_id_refused(tmp_path: Path):
    """§6: an id is never reused, so storing one twice is the caller's bug; nothing changes."""
    with open_store(tmp_path / "state.db") as store:
        store.append_messages(messages(1, 2), keep=10)
        with pytest.raises(ValueError, match=r"UNIQUE constraint failed"):
            store.append_messages(messages(2, 3), keep=10)
        assert [m.id for m in store.load_messages(10)] == [1, 2]


def test_id_floor_after_reserve_and_messages(tmp_path: Path):
    """§6: ids are never reused: the floor is the highest id reserved or stored, and never falls."""
    path = tmp_path / "state.db"
    with open_store(path) as store:
        assert store.load_id_floor() == 0
        store.reserve_ids(1000)
        store.append_messages(messages(1, 3), keep=10)
    with open_store(path) as store:
        assert store.load_id_floor() == 1000
        store.reserve_ids(500)
        assert store.load_id_floor() == 1000
        store.append_messages(messages(1001, 1005), keep=2)
    with open_store(path) as store:
        assert store.load_id_floor() == 1005
        store.reserve_ids(2000)
    with open_store(path) as store:
        assert store.load_id_floor() == 2000


def test_close_is_idempotent_and_later_calls_refused(tmp_path: Path):
    """close() twice is harmless; a closed store says so in one sentence."""
    path = tmp_path / "state.db"
    store = open_store(path)
    store.close()
    store.close()
    assert not os.path.exists(f"{path}-wal")  # checkpointed into the file
    with pytest.raises(StoreError, match=r"^the state file .* is closed; open it again$"):
        store.load_id_floor()


def test_eight_threads_appending_at_once(tmp_path: Path):
    """The writer and reader threads may call one store at once: every row arrives."""
    path = tmp_path / "state.db"
    store = open_store(path)
    start = threading.Barrier(8)
    failures: list[BaseException] = []

    def append(t: int) -> None:
        try:
            start.wait()
            for batch in range(25):
                first = t * 1000 + batch * 4 + 1
                store.append_messages(messages(first, first + 3), keep=10_000)
                store.add_ban(Ban(f"{t}.{batch}", None, "op", None, 0))
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    run_in_threads(append, 8)
    assert failures == []
    store.close()
    with open_store(path) as again:
        stored = again.load_messages(10_000)
        assert len(stored) == 8 * 25 * 4
        assert stored == sorted(stored, key=lambda m: m.id)
        assert all(m.entry == entry(m.id) for m in stored)
        assert len(again.load_bans(now_ms=0)) == 8 * 25


def test_run_state_round_trip(tmp_path: Path):
    """§6: where ids stood (last id, forgotten id, clean stop) survives close and reopen."""
    from store import RunState

    path = tmp_path / "state.db"
    with open_store(path) as store:
        assert store.load_run_state() == RunState(0, 0, True)  # a new file: nothing yet
        store.save_run_state(RunState(41, 7, False))
    with open_store(path) as store:
        assert store.load_run_state() == RunState(41, 7, False)
