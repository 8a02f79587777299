"""Our place on the server across connections: the joined session, reconnection, sending.

`Link` holds the session the chat is joined on. After a lost connection the
chat's network thread calls `recover`, which opens new connections with backoff
and rejoins with `since` (§6 Resume), unless a `bye` forbids it. Its sender thread
takes typed lines from the `Outbox` and sends them on whichever session is joined,
paced by a `Pacer` a little stricter than the server's bucket (§4), in records that
fit `welcome.max_record` and 64 messages (§1, §3); what a lost connection did not
take waits for the next one. No terminal: it tells the user through two callbacks.

Locks: `Link._lock` guards the session, its welcome and its pacer (replaced together
on reconnect) and the sent says; `Outbox._cond` guards the lines waiting. Neither is
held while taking another; Tab takes `Link._lock` (for `welcome`) under
`Console._lock`, and the callbacks run with no lock held, so never the other way.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable

from errors import ClientError, ConnectionLost, JoinRefused, ServerFault
from protocol import (
    MAX_CLIENT_RECORD_MESSAGES,
    ClientMessage,
    Dm,
    Say,
    Welcome,
    Who,
    Whois,
    encode_client_message,
)
from session import Joiner, Session

OUTBOX_LINES = 100  # typed but not sent yet; past it a pipe waits, a person is told
RECONNECT_FIRST_S = 1.0  # §6 Resume: the first wait after a lost connection, doubled each try
RECONNECT_MAX_S = 30.0  # ... up to this
RECONNECT_GIVE_UP_S = 300  # a pipe (a script) gives up after this long without a connection
SENT_REMEMBERED = 200  # my says kept to recognise their replay after a resume
# A `bye` after which reconnecting would be wrong (§6 Resume).
NO_RESUME = frozenset({"leave", "kicked", "banned", "not_allowed", "replaced"})
RATED = (Say, Dm, Who, Whois)  # §4: each takes a rate token
# A record's bytes around its messages: the length, the GCM tag, the brackets of the array.
RECORD_OVERHEAD = 4 + 16 + 2


class Pacer:
    """A token bucket a little stricter than the server's, so paced sends are never refused.

    Half the burst and 90 % of the refill leave room for network jitter: the
    server's bucket (capacity `rate`, refill `rate`/s, full at join) always holds
    at least as many tokens as this one when a paced message arrives.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = max(1, rate // 2)
        self.refill = rate * 0.9
        self.tokens = float(self.capacity)
        self.clock = clock
        self.stamp = clock()

    def ready(self) -> bool:
        """Whether a token is there now (take() would not wait)."""
        if self.refill == 0:
            return True
        now = self.clock()
        return min(self.capacity, self.tokens + (now - self.stamp) * self.refill) >= 1.0

    def take(self) -> float:
        """Take one token; returns how long to sleep first (0 when one is there)."""
        if self.refill == 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        wait = max(0.0, (1.0 - self.tokens) / self.refill)
        self.tokens += wait * self.refill - 1.0
        self.stamp = now + wait
        return wait


class Outbox:
    """Lines waiting to be sent, in order, bounded: a pipe waits for room, a person is told."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: deque[ClientMessage] = deque()
        self._cond = threading.Condition()  # guards _items, _busy and _closed
        self._busy = 0  # taken by the sender, not sent yet
        self._closed = False

    def put(self, msg: ClientMessage, block: bool, give_up: Callable[[], bool]) -> bool:
        """Queue `msg`; with `block`, wait for room unless `give_up()` (False: not queued)."""
        with self._cond:
            while block and len(self._items) >= self.limit and not self._closed:
                if give_up():
                    return False
                self._cond.wait(0.1)
            if len(self._items) >= self.limit or self._closed:
                return False
            self._items.append(msg)
            self._cond.notify_all()
            return True

    def take(self, most: int) -> list[ClientMessage]:
        """Up to `most` messages to send, waiting for the first (then `done` for each);
        [] once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            taken = [self._items.popleft() for _ in range(min(most, len(self._items)))]
            self._busy += len(taken)
            self._cond.notify_all()
            return taken

    def done(self, count: int) -> None:
        with self._cond:
            self._busy -= count
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self, timeout: float | None, give_up: Callable[[], bool]) -> bool:
        """Wait until everything was sent (True), `timeout` passed or `give_up()` (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if give_up() or (left is not None and left <= 0):
                    return False
                self._cond.wait(0.1 if left is None else min(0.1, left))
            return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + self._busy


class Link:
    """The joined session across reconnects, and the sender thread that feeds it.

    The chat's network thread calls `resumable` and `recover`; the main thread reads
    `welcome`, asks `offline_notice` and ends it all with `stop`.
    """

    def __init__(
        self,
        joiner: Joiner,
        session: Session,
        outbox: Outbox,
        status: Callable[[str], None],
        waiting: Callable[[str | None], None],
        patient: bool,
    ):
        assert session.welcome is not None
        self.joiner = joiner
        self.outbox = outbox
        self.name = session.welcome.name  # every rejoin asks for the name we joined as
        self._status = status  # a line for the user, from any thread
        self._waiting = waiting  # "reconnecting in 3 s", "reconnecting"; None: connected
        self._patient = patient  # a terminal keeps trying; a pipe gives up in the end
        self._lock = threading.Lock()  # guards the (lock) fields
        self._session = session  # (lock) replaced on reconnect by the network thread
        self._welcome = session.welcome  # (lock) idem
        self._pacer = Pacer(self._welcome.rate)  # (lock) idem: the server's bucket is full
        self._sent: deque[str] = deque(maxlen=SENT_REMEMBERED)  # (lock) my says sent
        self._offline_said = False  # (lock) the user was told that lines wait
        self._online = threading.Event()  # a joined session is there to send on
        self._online.set()
        self._over = threading.Event()  # no more sending or reconnecting: the chat ends
        self._sender = threading.Thread(target=self._send_loop, name="bcast-sender")
        self._sender.daemon = True

    @property
    def session(self) -> Session:
        with self._lock:
            return self._session

    @property
    def welcome(self) -> Welcome:
        with self._lock:
            return self._welcome

    def start(self) -> None:
        """Start the session's threads and the sender (once joined)."""
        self.session.start()
        self._sender.start()

    def stop(self) -> Session:
        """No more reconnecting or sending (the user leaves, or the chat ended); returns
        the session to leave on."""
        with self._lock:
            self._over.set()
            return self._session

    @property
    def stopped(self) -> bool:
        return self._over.is_set()

    def offline_notice(self) -> bool:
        """True once per outage, asked while not connected: time to tell the user that
        what they type is sent once reconnected."""
        with self._lock:
            if self._online.is_set() or self._offline_said:
                return False
            self._offline_said = True
            return True

    def take_sent(self, text: str) -> bool:
        """Whether `text` is a say of mine that went out (then forgotten): a resume
        replays it (§6), and it was shown when typed."""
        with self._lock:
            if text not in self._sent:
                return False
            self._sent.remove(text)
            return True

    # -- the network thread --

    def resumable(self, lost: ConnectionLost) -> bool:
        """Whether to reconnect after `lost`: not after a `bye` that forbids it (§6), nor
        after a failure of the server's that another try cannot mend."""
        bye = self.session.bye
        return not isinstance(lost, ServerFault) and (bye is None or bye.reason not in NO_RESUME)

    def recover(self, lost: ConnectionLost, since: int) -> Welcome | None:
        """Reconnect after `lost` and rejoin with `since` (§6): the new welcome, or None
        when the chat was stopped meanwhile. A ClientError means: the chat ends."""
        with self._lock:
            self._online.clear()
        self.session.close()
        self._status(f"{lost}; reconnecting")
        return self._reconnect(lost, since)

    def _reconnect(self, lost: ConnectionLost, since: int) -> Welcome | None:
        """New connections with backoff (1, 2, 4 ... 30 s, with jitter) until one joins.

        Raises what ends the chat: a changed server key (TrustError, never retried), a
        refusal other than name_taken, or, in a pipe, RECONNECT_GIVE_UP_S without one.
        """
        delay, started, said_taken = RECONNECT_FIRST_S, time.monotonic(), False
        while True:
            wait = delay * random.uniform(0.75, 1.25)
            self._waiting(f"reconnecting in {round(wait)} s")
            if self._over.wait(wait):
                return None
            self._waiting("reconnecting")
            session = None
            try:
                session = self.joiner.open()
                welcome = self.joiner.join(session, self.name, since=since)
            except JoinRefused as exc:
                session and session.close()
                if exc.code != "name_taken":
                    raise
                if not said_taken:  # §6: until the server notices the old connection died
                    said_taken = True
                    self._status("the server still holds our old connection; trying again")
            except ConnectionLost:
                session and session.close()
            else:
                return self._resume(session, welcome)
            if not self._patient and time.monotonic() - started > RECONNECT_GIVE_UP_S:
                raise ClientError(f"{lost}; no reconnection for {RECONNECT_GIVE_UP_S} s")
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _resume(self, session: Session, welcome: Welcome) -> Welcome | None:
        with self._lock:
            if self._over.is_set():  # the user left meanwhile
                session.close()
                return None
            self._session, self._welcome = session, welcome
            self._pacer = Pacer(welcome.rate)  # §4: the server's bucket is full at join
        session.start()
        with self._lock:
            self._online.set()
            self._offline_said = False
        self._waiting(None)
        return welcome

    # -- the sender thread --

    def _send_loop(self) -> None:
        """Send what is queued, paced, in records that fit the server's (§1 max_record, §3 64
        messages); after a lost connection, what was not sent waits for the next one."""
        while batch := self.outbox.take(MAX_CLIENT_RECORD_MESSAGES):
            pending = deque(batch)
            while pending:
                session = self._current_session()
                if session is None:
                    self.outbox.done(len(pending))
                    return
                record = self._fill_record(pending)
                try:
                    session.send(*record)
                except ConnectionLost:
                    pending.extendleft(reversed(record))
                    with self._lock:
                        if self._session is session:  # the network thread will reconnect
                            self._online.clear()
                    continue
                with self._lock:
                    self._sent.extend(m.text for m in record if isinstance(m, Say))
                self.outbox.done(len(record))

    def _current_session(self) -> Session | None:
        """The joined session to send on, waiting while reconnecting; None once stopped."""
        while not self._online.wait(0.2):
            if self._over.is_set():
                return None
        with self._lock:
            return self._session

    def _fill_record(self, pending: deque[ClientMessage]) -> list[ClientMessage]:
        """Take from `pending` what one record may carry: a rate token for each rated
        message (waiting only for the first), within the server's record size."""
        with self._lock:
            pacer, room = self._pacer, self._welcome.max_record - RECORD_OVERHEAD
        record: list[ClientMessage] = []
        for msg in list(pending):
            size = len(encode_client_message(msg)) + 1
            if record and (size > room or (isinstance(msg, RATED) and not pacer.ready())):
                break
            if isinstance(msg, RATED):
                time.sleep(pacer.take())
            record.append(pending.popleft())
            room -= size
        return record
