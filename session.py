"""One connection to the server, with no terminal: handshake, records in and out.

`Session` is one connection (PROTOCOL.md §2, §3): `open` connects, reads `hello`
and checks the server's fingerprint before anything is sent; `join` sends `key`
and `join` in one write and waits for `welcome`; then `start` runs two threads:
the reader (records -> messages -> a bounded inbox that `recv` empties; a full
inbox stops the reading, so backpressure reaches the server) and the keepalive
(§4 pings). `Joiner` knows how to open and join again: server, identity (§5),
history (§6). Tests drive both without a terminal.

Threads and locks: any thread may `send`; `_send_lock` guards the send counter and
the socket's writes (seal and send together, so counter order is wire order). The
receive cipher is the joining thread's until `start`, then the reader's alone.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from crypto_utils import (
    CryptoError,
    RecordCipher,
    client_keys,
    fingerprint,
    identity_public,
    identity_transcript,
    sign_identity,
)
from display import sanitize
from errors import ClientError, ConnectionLost, JoinRefused, NameRefused, ServerFault
from protocol import (
    MAX_HANDSHAKE_FRAME,
    MAX_RECORD_FRAME,
    MAX_RECORD_PLAINTEXT,
    Bye,
    ClientMessage,
    Error,
    FrameDecoder,
    Hello,
    Join,
    KeyExchange,
    Leave,
    Ping,
    ProtocolError,
    ServerMessage,
    Welcome,
    decode_record,
    encode_client_message,
    encode_frame,
    encode_key,
    join_record,
    parse_handshake_error,
    parse_hello,
    parse_server_message,
)

CONNECT_TIMEOUT_S = 10.0  # the server's own handshake timeout is 10 s (§4)
IDLE_PING_S = 30.0  # §4 Timeouts: "a client idle for 30 s sends a ping"
PONG_WAIT_S = 30.0  # nothing heard this long after a ping: the server is gone
BYE_WAIT_S = 2.0  # how long `leave` waits for the server's `bye` before closing
INBOX_MESSAGES = 1000  # read but not shown yet; past it the reader stops reading the socket
MAX_SANE_RATE = 1_000_000  # a welcome.rate above this is treated as no limit at all

# A `bye`'s reason (§4, §5) in plain words, never the code itself.
BYE_WORDS = {
    "leave": "you left",
    "timeout": "the server closed the connection: it heard nothing from us for too long",
    "protocol": "the server closed the connection after a protocol error",
    "shutdown": "the server is shutting down",
    "kicked": "you were kicked",
    "banned": "you were banned",
    "not_allowed": "you are not allowed on this server (any more)",
    "replaced": "you joined again from somewhere else, which replaced this connection",
}


def bye_sentence(bye: Bye) -> str:
    """What a `bye` means, in words: who did it and why, when the server says."""
    words = BYE_WORDS.get(bye.reason, f"the server closed the connection ({bye.reason})")
    by = getattr(bye, "by", None)
    message = getattr(bye, "message", None)
    if by:
        words += f" by {sanitize(by)}"
    if message:
        words += f": {sanitize(message)}"
    return sanitize(words)


def sane_welcome(welcome: Welcome) -> Welcome:
    """`welcome` with absurd values clamped, so no later arithmetic overflows: a rate past
    MAX_SANE_RATE (or negative) is no limit, max_text stays within one record."""
    rate = welcome.rate if 0 <= welcome.rate <= MAX_SANE_RATE else 0
    max_text = min(max(1, welcome.max_text), MAX_RECORD_PLAINTEXT)
    if (rate, max_text) == (welcome.rate, welcome.max_text):
        return welcome
    return replace(welcome, rate=rate, max_text=max_text)


_END = object()  # queued by the reader after the last message


class Session:
    """One connection: handshake, sealed sends, a reader thread, keepalive pings. No terminal.

    `open` connects and checks the server's key; `join` then sends `key` and `join`
    in one write (§2) and waits for `welcome`; a refused join leaves the keyed
    connection open for another try.
    """

    def __init__(self, sock: socket.socket, decoder: FrameDecoder, hello: Hello, fp: str):
        self.fingerprint = fp
        self.hello = hello
        self.welcome: Welcome | None = None
        self.opened_at = time.monotonic()
        self._sock = sock
        self._decoder = decoder
        self._tx: RecordCipher | None = None  # guarded by _send_lock once start() ran
        self._rx: RecordCipher | None = None  # the joining thread's, then the reader's
        self._key_frame = b""  # `key`, until it goes out with the first join
        self.client_nonce = self.client_eph = b""
        self._send_lock = threading.Lock()
        self._early: deque[ServerMessage] = deque()  # what came with welcome, before start()
        self._inbox: queue.Queue[Any] = queue.Queue(INBOX_MESSAGES)
        self._closed = threading.Event()
        self._abandoned = threading.Event()  # close() ran: the reader gives up on a full inbox
        self._end: ConnectionLost | None = None  # why the connection ended, first cause wins
        self._bye: Bye | None = None
        self._last_sent = self._last_heard = time.monotonic()
        self.idle_ping_s = IDLE_PING_S  # attributes, so tests can shorten them before start()
        self.pong_wait_s = PONG_WAIT_S

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        verify: Callable[[str], None],
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> Session:
        """Connect, read `hello` and check the server's fingerprint (`verify` raises)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionLost(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
            body = _read_frame(sock, decoder, None)
            refusal = parse_handshake_error(body)
            if refusal is not None:
                why = "the server is full" if refusal.code == "server_full" else "refused"
                raise ConnectionLost(f"{why}: {sanitize(refusal.message)}")
            try:
                hello = parse_hello(body)
            except ProtocolError as exc:
                raise ConnectionLost(f"the server's hello is invalid ({exc}); closed") from None
            fp = fingerprint(hello.key)
            verify(fp)
            return cls(sock, decoder, hello, fp)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        name: str,
        verify: Callable[[str], None],
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> Session:
        """Open and join as `name` in one go; a refusal sends `leave` and closes."""
        self = cls.open(host, port, verify, timeout)
        try:
            self.join(Join(name))
        except JoinRefused:
            with contextlib.suppress(ClientError):
                self._send_now([Leave()])
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        return self

    @property
    def age(self) -> float:
        return time.monotonic() - self.opened_at

    def prepare_keys(self) -> None:
        """Derive the session keys (§2) if not done yet; `key` goes out with the next join."""
        if self._tx is not None:
            return
        hello = self.hello
        try:
            nonce, wrapped, eph, k_c2s, k_s2c = client_keys(hello.key, hello.nonce, hello.eph)
        except CryptoError as exc:
            raise ConnectionLost(f"cannot use the server's keys: {exc}") from None
        self._tx, self._rx = RecordCipher(k_c2s), RecordCipher(k_s2c)
        self.client_nonce, self.client_eph = nonce, eph
        self._key_frame = encode_frame(encode_key(KeyExchange(nonce, wrapped, eph)))
        self._decoder.max_len = MAX_RECORD_FRAME

    def join(self, join: Join) -> Welcome:
        """Send `join` (after `key`, in the same write, the first time); wait for `welcome`.

        JoinRefused when the server answers with an error (the connection stays,
        unless a `bye` follows); ConnectionLost when it closes.
        """
        self.prepare_keys()
        self._send_now([join])
        while True:
            msgs = self._read_messages()
            for i, msg in enumerate(msgs):
                if isinstance(msg, Welcome):
                    self.welcome = sane_welcome(msg)
                    self._early.extend(msgs[i + 1 :])
                    self._sock.settimeout(None)
                    return self.welcome
                if isinstance(msg, Error):
                    raise join_refusal(msg, join.name)
                if isinstance(msg, Bye):
                    raise ConnectionLost(bye_sentence(msg))

    def start(self) -> None:
        """Start the reader and keepalive threads (after a successful join)."""
        threading.Thread(target=self._read_loop, name="bcast-reader", daemon=True).start()
        threading.Thread(target=self._keepalive, name="bcast-keepalive", daemon=True).start()

    def send(self, *msgs: ClientMessage) -> None:
        """Seal the messages as one record and send it."""
        with self._send_lock:  # seal and send together: counter order is wire order (§3)
            self._sendall(self._seal(list(msgs)))

    def _send_now(self, msgs: list[ClientMessage]) -> None:
        """Send before start(): `key` first if it has not gone out yet (§2: in one write)."""
        with self._send_lock:
            frame, self._key_frame = self._key_frame + self._seal(msgs), b""
            self._sendall(frame)

    def recv(self, timeout: float | None = None) -> ServerMessage:
        """The next message; ConnectionLost once the connection is over; queue.Empty on timeout."""
        if self._early:
            return self._early.popleft()
        item = self._inbox.get(timeout=timeout)
        if item is _END:
            self._inbox.put(_END)
            raise self._end or ConnectionLost("the connection is closed")
        return item

    def leave(self, timeout: float = BYE_WAIT_S) -> None:
        """Send `leave`, wait a little for the server to close (after `bye`), close."""
        with contextlib.suppress(ClientError):
            self.send(Leave())
            self._closed.wait(timeout)
        self.close()

    @property
    def end(self) -> ConnectionLost | None:
        """Why the connection ended (first cause), once it has."""
        return self._end

    @property
    def bye(self) -> Bye | None:
        """The server's `bye`, if one came."""
        return self._bye

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed.wait(timeout)

    def close(self) -> None:
        self._abandoned.set()
        self._shutdown()
        self._sock.close()

    def _shutdown(self) -> None:
        """Wake the reader (recv returns) without freeing the fd under another thread."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _seal(self, msgs: list[ClientMessage]) -> bytes:
        """One framed record; the caller holds `_send_lock`."""
        assert self._tx is not None
        if self._tx.exhausted:  # §3: close before the counter would reach 2**32
            self._shutdown()
            raise ConnectionLost("the record counter is used up; reconnect")
        return encode_frame(self._tx.seal(join_record([encode_client_message(m) for m in msgs])))

    def _sendall(self, frame: bytes) -> None:
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            raise ConnectionLost(f"connection lost while sending: {exc.strerror or exc}") from None
        self._last_sent = time.monotonic()

    def _read_messages(self) -> list[ServerMessage]:
        body = _read_frame(self._sock, self._decoder, self._closed_words)
        self._last_heard = time.monotonic()
        assert self._rx is not None
        try:
            plain = self._rx.open(body)
        except CryptoError as exc:  # §3: close at once, no bye, do not try the next one
            self._shutdown()
            raise ServerFault(f"a record from the server failed to open ({exc}); closed") from None
        try:  # the server's batches are not limited to 64 messages (§3)
            msgs = [parse_server_message(obj) for obj in decode_record(plain, None)]
        except ProtocolError as exc:
            self._shutdown()
            raise ServerFault(f"the server sent a malformed record ({exc}); closed") from None
        for msg in msgs:
            if isinstance(msg, Bye):
                self._bye = msg
        return msgs

    def _closed_words(self) -> str:
        return bye_sentence(self._bye) if self._bye else "the server closed the connection"

    def _read_loop(self) -> None:
        try:
            while True:
                for msg in self._read_messages():
                    self._put(msg)
        except ConnectionLost as exc:
            self._end = self._end or exc
        finally:
            self._shutdown()
            self._closed.set()
            self._put(_END)

    def _put(self, item: Any) -> None:
        """Queue for the display; a full queue stops this thread, and so the socket's reading
        (backpressure reaches the server, which drops a client that falls too far behind)."""
        while not self._abandoned.is_set():
            with contextlib.suppress(queue.Full):
                self._inbox.put(item, timeout=0.2)
                return

    def _keepalive(self) -> None:
        """§4 Timeouts: ping after `idle_ping_s` without sending; give up if pings go unanswered."""
        ping_at: float | None = None
        wait = self.idle_ping_s
        while not self._closed.wait(wait):
            now = time.monotonic()
            if ping_at is not None and self._last_heard < ping_at:
                if now - ping_at >= self.pong_wait_s:
                    self._end = ConnectionLost("the server stopped answering; connection lost")
                    self._shutdown()
                    return
            else:
                ping_at = None
            if now - self._last_sent >= self.idle_ping_s:
                with contextlib.suppress(ClientError):
                    self.send(Ping(None))
                ping_at = ping_at or time.monotonic()
            wakes = [self._last_sent + self.idle_ping_s]
            if ping_at is not None:
                wakes.append(ping_at + self.pong_wait_s)
            wait = max(0.01, min(wakes) - time.monotonic())


JOIN_WORDS = {
    "name_taken": "the name {name} is taken",
    "name_reserved": "{name}'s name is reserved for another key",
    "bad_identity": "the server did not accept our identity proof: {message}",
    "not_allowed": "this server admits listed identities only, and ours is not listed",
    "banned": "you are banned from this server ({message})",
}


def join_refusal(err: Error, name: str) -> JoinRefused:
    """The error answering `join`, as one sentence (§4, §5: the codes stay out of sight)."""
    words = JOIN_WORDS.get(err.code, "the server refused to let us join: {message}")
    text = words.format(name=sanitize(name), message=sanitize(err.message))
    if err.code == "invalid_name":
        text = f"the server refused the name {sanitize(name)}: {sanitize(err.message)}"
    kind = NameRefused if err.code in ("invalid_name", "name_taken", "name_reserved") else None
    return (kind or JoinRefused)(err.code, text)


def _read_frame(
    sock: socket.socket, decoder: FrameDecoder, note: Callable[[], str] | None
) -> bytes:
    """One frame body; reads at most what the frame needs, so a bad length stops at 4 bytes."""
    while True:
        try:
            body = decoder.next_frame()
        except ProtocolError as exc:
            raise ServerFault(f"the server sent a bad frame ({exc}); closed") from None
        if body is not None:
            return body
        try:
            data = sock.recv(decoder.wants())
        except socket.timeout:
            raise ConnectionLost("the server did not answer in time") from None
        except OSError as exc:
            raise ConnectionLost(f"connection lost: {exc.strerror or exc}") from None
        if not data:
            raise ConnectionLost(note() if note else "the server closed the connection")
        decoder.feed(data)


class Joiner:
    """How to (re)connect: the server and its pin check, our identity (§5) and how much
    history to ask for (§6)."""

    def __init__(
        self,
        host: str,
        port: int,
        verify: Callable[[str], None],
        identity: Any = None,
        history: int = 0,
    ):
        self.host, self.port, self.verify = host, port, verify
        self.identity = identity  # an Ed25519 key, or None for a guest
        self.history = history

    def open(self) -> Session:
        return Session.open(self.host, self.port, self.verify)

    def join(self, session: Session, name: str, since: int | None = None) -> Welcome:
        """Join as `name`, proving our identity on this connection (§5); `since` resumes
        (§6: every kept message after it), else `history` asks for the latest ones."""
        identity = proof = None
        if self.identity is not None:
            session.prepare_keys()
            hello = session.hello
            transcript = identity_transcript(
                hello.key, hello.nonce, session.client_nonce, hello.eph, session.client_eph
            )
            identity = identity_public(self.identity)
            proof = sign_identity(self.identity, transcript)
        history = None if since is not None else self.history
        name = unicodedata.normalize("NFKC", name)
        return session.join(Join(name, identity, proof, history=history, since=since))
