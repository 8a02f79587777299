"""The state writer: one thread that persists what the hub and the readers hand it.

Who owns what: the `StateWriter` owns the store once the server has loaded it,
and its thread is the only one that writes to it while the server runs (the
readers enqueue bindings and bans; the kept messages it takes from the hub).
Writes are batched off the hot path: a say is delivered without waiting for
the disk; every `INTERVAL_S` the thread commits what has accumulated in one
transaction, so a crash loses at most that last batch (PROTOCOL.md §6).
Ids are reserved ahead in blocks, so a crash skips ids, never reuses one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from hub import Hub
from store import Ban, Binding, RunState, Store, StoredMessage, StoreError

log = logging.getLogger("bcast.server")

INTERVAL_S = 0.1  # the most a crash can lose of kept messages (§6)
ID_BLOCK = 1_000_000  # ids reserved ahead; renewed when half of them are used


class StateWriter:
    """A thread committing kept messages, bindings and bans to the store."""

    def __init__(self, store: Store, hub: Hub, keep: int, reserved: int):
        self._store = store
        self._hub = hub
        self._keep = keep
        self._reserved = reserved  # ids up to here may be handed out
        # Guards `_jobs`; the thread takes them in order.
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[Store], None]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False  # the last write failed (logged once until it works again)
        self._saved_ids: tuple[int, int] | None = None  # the ids last saved in the run state
        self._retry: list[StoredMessage] = []  # a batch that failed, tried again next time
        self._thread = threading.Thread(target=self._run, name="state writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def bind(self, binding: Binding) -> None:
        self._enqueue(lambda store: store.bind(binding))

    def add_ban(self, ban: Ban) -> None:
        self._enqueue(lambda store: store.add_ban(ban))

    def remove_ban(self, who: str) -> None:
        self._enqueue(lambda store: store.remove_ban(who))

    def stop(self) -> None:
        """Write what is left, then close the store (§6: after SIGTERM nothing is lost)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._flush()
        last_id, forgotten = self._hub.ids()
        state = RunState(last_id, forgotten, True)
        self._attempt(lambda store: store.save_run_state(state), quiet=True)
        try:
            self._store.close()
        except StoreError as exc:
            log.warning("closing the state file: %s", exc)

    def _enqueue(self, job: Callable[[Store], None]) -> None:
        with self._lock:
            self._jobs.append(job)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(INTERVAL_S)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, deque()
        for job in jobs:
            self._attempt(job)
        # A batch that failed is tried again with the next (the newest `keep` of them).
        batch = (self._retry + self._hub.unsaved())[-self._keep :] if self._keep else []
        if batch:
            saved = self._attempt(lambda store: store.append_messages(batch, self._keep))
            self._retry = [] if saved else batch
        ids = self._hub.ids()
        last = ids[0]
        if last > self._reserved - ID_BLOCK // 2:
            upto = max(last, self._reserved) + ID_BLOCK
            if self._attempt(lambda store: store.reserve_ids(upto)):
                self._reserved = upto
        if ids != self._saved_ids:
            state = RunState(ids[0], ids[1], False)
            if self._attempt(lambda store: store.save_run_state(state), quiet=True):
                self._saved_ids = ids

    def _attempt(self, job: Callable[[Store], None], quiet: bool = False) -> bool:
        """Run one write; log a failure once, and when writes work again. A `quiet` job
        (the small run-state record) neither logs nor counts as working again."""
        try:
            job(self._store)
        except StoreError as exc:
            if quiet:
                log.debug("%s", exc)
                return False
            if not self._failing:
                log.error(
                    "%s; history, bindings and bans are not saved until it works again "
                    "(the chat goes on)",
                    exc,
                )
            self._failing = True
            return False
        except ValueError as exc:  # a bug of ours (e.g. a binding clash): loud, not fatal
            log.exception("the state store refused a write: %s", exc)
            return False
        if self._failing and not quiet:
            log.warning("the state file works again: history, bindings and bans are saved")
            self._failing = False
        return True
