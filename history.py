"""The kept public messages and the id counter (PROTOCOL.md §6), as the hub holds them.

Who owns what: the hub owns one `History` and calls it only with its lock held
(ids are handed out in log order); nothing here does I/O. What is new since
the state writer last looked is handed over by `take_unsaved`, outside any
hot path: the writer commits it to the store.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from store import StoredMessage


class History:
    """The last `keep` messages, the next id, the highest id handed out and forgotten."""

    def __init__(
        self,
        keep: int,
        kept: Sequence[StoredMessage] = (),
        first_id: int = 1,
        last_id: int = 0,
        forgotten: int = 0,
    ):
        self.keep = keep
        # (id, the message's bytes): tuples, not StoredMessage, on the say path
        self._kept: deque[tuple[int, bytes]] = deque(
            ((m.id, m.entry) for m in (list(kept)[-keep:] if keep else [])), maxlen=keep or 1
        )
        # what the writer has not had yet; only the newest `keep` can matter to it
        self._unsaved: deque[tuple[int, bytes]] = deque(maxlen=keep or 1)
        self._next_id = first_id  # the next id to hand out (ids are reserved in blocks)
        self.last_id = last_id  # the highest id handed out so far (§6 welcome.last_id)
        # The highest message id no longer kept (or that may not be, after a crash):
        # a `since` under it has a gap.
        self.forgotten = forgotten

    def new_id(self) -> int:
        """The next id, for a message or a dm (§4: one counter, log order)."""
        self.last_id = msg_id = self._next_id
        self._next_id += 1
        return msg_id

    def add(self, msg_id: int, message: bytes) -> None:
        """Keep a public message (the `message` object's bytes), forgetting the oldest."""
        if not self.keep:
            self.forgotten = msg_id
            return
        kept = self._kept
        if len(kept) == self.keep:
            self.forgotten = kept[0][0]  # the append below pushes it out (maxlen)
        item = (msg_id, message)
        kept.append(item)
        self._unsaved.append(item)

    def replay(self, history: int | None, since: int | None) -> tuple[list[StoredMessage], bool]:
        """§6: the kept messages a join asked for (none unless it asked), and `gap`:
        whether a message above `since` will not be sent (forgotten, or over `history`)."""
        if history is None and since is None:
            return [], False
        kept = [StoredMessage(i, m) for i, m in self._kept if since is None or i > since]
        wanted = kept if history is None else kept[len(kept) - history :] if history else []
        gap = since is not None and (self.forgotten > since or len(wanted) < len(kept))
        return wanted, gap

    def take_unsaved(self) -> list[tuple[int, bytes]]:
        """The kept messages the writer has not had yet, in id order."""
        batch = list(self._unsaved)
        self._unsaved.clear()
        return batch
