"""One connection's reader thread: the handshake, then records in, every check of a message.

Who owns what: a `Reader` runs on its own thread, one per connection, and is the
only thread that reads its socket, opens its records (its receive counter) and
applies its messages in order. It touches shared state only through the hub's
locked events (and moderation's, which use them), never holds the hub lock while
doing I/O or crypto, and hands what must persist (bindings, bans) to the state
writer. It seals a record itself only for the shutdown `bye` of a connection
that has no flusher yet. The `Server` owns it and gets it back through `end`
and `close`.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Any

import crypto_utils
import protocol
from conn import Conn
from crypto_utils import CryptoError
from delivery import RECORD_BUDGET, entry
from flusher import wake
from hub import JoinRequest
from protocol import ByeProtocol, CloseSilently, Refused

if TYPE_CHECKING:
    from server import Server

log = logging.getLogger("bcast.server")

# §1: the server's record limit R (welcome.max_record). A joined client may park all
# but one byte of a record in its reader's buffer: R bounds what that costs the
# server (bench/README.md, "Abuse"). A longest say (max_text 16384) fits with room.
MAX_RECORD_BYTES = 128 * 1024
# The longest say's record beside its text: brackets, type, action, the GCM tag.
SAY_RECORD_OVERHEAD_BYTES = 64
# One read's worth (the buffer exists only while a recv() runs: readers wait in
# poll()). 64 KiB measured no better on fan-out and ~10 % worse with 10 clients.
RECV_CHUNK_BYTES = 256 * 1024
LOG_WHY_CHARS = 200  # a close reason in a log line (it may quote the peer)


def clip(text: object, limit: int = LOG_WHY_CHARS) -> str:
    """A sentence of ours that may quote the peer, as a log line shows it: characters that
    are not printable escaped, at most `limit` of them (a peer must not flood the log)."""
    text = str(text)
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)[:limit]
    return head if len(text) <= limit else f"{head}... ({len(text)} characters)"


class Reader:
    """One connection's reader thread: handshake, then records in, every check."""

    def __init__(self, server: Server, conn: Conn):
        self.server = server
        self.hub = server.hub
        self.moderation = server.moderation
        self.handshake: tuple[bytes, bytes, bytes, bytes] | None = None  # §5 proof inputs
        self.settings = server.settings
        self.conn = conn

    def run(self) -> None:
        conn, end = self.conn, self.server.end
        decoder = protocol.FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
        try:
            self._handshake(decoder)
            self._read_records(decoder)
        except CloseSilently as exc:
            end(conn, "protocol", bye=conn.slot is not None, why=str(exc))
        except CryptoError as exc:
            end(conn, "protocol", bye=False, why=str(exc))
        except ByeProtocol as exc:
            end(conn, "protocol", bye=True, why=str(exc))
        except EOFError:
            end(conn, "disconnect", bye=False, why="closed by the peer")
        except OSError as exc:
            end(conn, "disconnect", bye=False, why=exc.strerror or str(exc))
        except Exception as exc:  # a bug must cost one connection, never the server
            # One line, its text cut and escaped (it may quote the peer); the traceback
            # is for a developer (--log-level DEBUG), not for the operator's screen.
            log.error(
                "internal error on %s: %s: %s (a bug in bcast; --log-level DEBUG shows where)",
                conn.peer,
                type(exc).__name__,
                clip(exc, 200),
            )
            log.debug("where the internal error on %s happened", conn.peer, exc_info=True)
            end(conn, "protocol", bye=False, why="internal error")
        finally:
            if self.hub.release(conn):
                self.server.close(conn)

    def _recv_frame(self, decoder: protocol.FrameDecoder) -> bytes:
        """The next frame body; raises EOFError when the peer (or a waker) closed."""
        conn = self.conn
        while True:
            body = decoder.next_frame()
            if body is not None:
                # §4 idle: only whole frames count, so a frame begun must end in time
                conn.last_seen = time.monotonic()
                return body
            try:
                data = conn.sock.recv(RECV_CHUNK_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Wait without a buffer: a reader blocked inside recv() would hold
                # RECV_CHUNK_BYTES (12 KiB of it resident) per idle client.
                poller = select.poll()  # select() would not take fds over 1023
                poller.register(conn.sock, select.POLLIN)
                poller.poll()
                continue
            if not data:
                raise EOFError
            decoder.feed(data)
            del data  # not held while waiting in poll(): a parked frame costs R, not R + a read

    def _handshake(self, decoder: protocol.FrameDecoder) -> None:
        """§2: hello out, key in, session keys; then the channel is up and a flusher serves it."""
        conn, server = self.conn, self.server
        nonce = crypto_utils.random_bytes(protocol.NONCE_BYTES)
        eph = crypto_utils.Ephemeral()
        hello = protocol.Hello(key=server.spki, nonce=nonce, eph=eph.public)
        conn.sock.sendall(protocol.encode_frame(protocol.encode_hello(hello)))
        body = self._recv_frame(decoder)
        if not self.hub.key_read(conn):
            raise EOFError  # shutdown or the reaper came first and has woken this socket
        key_msg = protocol.parse_key(body)
        k_c2s, k_s2c = crypto_utils.server_keys(
            server.key, server.spki, nonce, eph, key_msg.nonce, key_msg.secret, key_msg.eph
        )
        self.handshake = (nonce, key_msg.nonce, eph.public, key_msg.eph)
        del eph  # forward secrecy: the private half is gone (exchange() already dropped it)
        decoder.max_len = MAX_RECORD_BYTES  # §1: our R, announced in welcome.max_record
        conn.rx = crypto_utils.RecordCipher(k_c2s)
        conn.tx = crypto_utils.RecordCipher(k_s2c)
        outcome = self.hub.keyed(conn)
        if outcome == "shutdown":
            self._bye_from_reader("shutdown")
        if outcome != "ok":
            raise EOFError

    def _bye_from_reader(self, reason: str) -> None:
        """§4: `bye` to a connection that sent `key` but has no flusher (shutdown).

        With no flusher, the reader is the only thread with its send counter, so
        it may seal. One non-blocking send: the client has had nothing since
        `hello`, so its buffer has room; if not, it is closed without the bye.
        """
        conn = self.conn
        record = conn.tx.seal(protocol.join_record([protocol.encode_message(protocol.bye(reason))]))
        try:
            conn.sock.send(protocol.encode_frame(record), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _read_records(self, decoder: protocol.FrameDecoder) -> None:
        """§3: open each record, decode it, apply its messages in order."""
        conn = self.conn
        while True:
            try:
                body = self._recv_frame(decoder)
            except CloseSilently as exc:  # a bad length after key: bye (protocol)
                raise ByeProtocol(str(exc)) from None
            if conn.ended:  # dropped (slow, timed out, evicted) or closing: stop here
                return
            plaintext = conn.rx.open(body)
            for obj in protocol.decode_record(plaintext):
                # nothing more of a record runs once its connection is dropped or closing
                # (a join after replies that got it dropped as slow would leave a ghost)
                if conn.ended or not self._apply(obj):
                    return

    # --- messages ---

    def _apply(self, obj: dict[str, Any]) -> bool:
        """Apply one message; False once the connection is to end (leave, refused join)."""
        conn = self.conn
        try:
            kind = protocol.message_type(obj)
            protocol.check_state(kind, conn.name, conn.op)  # §4 order: joined, then operator
            msg = protocol.parse_known(kind, obj, self.settings.max_text)
            return self._dispatch(msg)
        except Refused as refusal:
            # A refused join is worth a line (who tried which name); the rest is chatter.
            level = logging.INFO if obj.get("type") == "join" else logging.DEBUG
            log.log(
                level,
                "%s: %s refused: %s",
                conn.describe(),
                clip(obj["type"], 16),
                clip(refusal.message, 120),
            )
            self._reply(protocol.error(refusal.code, refusal.message))
        return True

    def _dispatch(self, msg: protocol.ClientMessage) -> bool:
        conn, mod = self.conn, self.moderation
        if isinstance(msg, protocol.Say):
            self._say(msg)
        elif isinstance(msg, protocol.Dm):
            self._dm(msg)
        elif isinstance(msg, protocol.Join):
            return self._join(msg)
        elif isinstance(msg, protocol.Ping):
            self._reply(protocol.pong(msg.id))
        elif isinstance(msg, protocol.Who):
            users = self.hub.users(conn, time.monotonic())
            if users is None:
                raise self._rate_limited()
            self._push_reply(users)
        elif isinstance(msg, protocol.Whois):
            self._push_reply(mod.whois(conn, msg, time.monotonic()))
        elif isinstance(msg, protocol.Kick):
            mod.kick(conn, msg)
        elif isinstance(msg, protocol.Ban):
            mod.ban(conn, msg)
        elif isinstance(msg, protocol.Unban):
            self._push_reply(mod.unban(conn, msg))
        elif isinstance(msg, protocol.Mute):
            mod.mute(conn, msg)
        elif isinstance(msg, protocol.Bans):
            self._push_reply(mod.bans())
        else:
            self.hub.leave(conn)
            log.info("%s left", conn.describe())
            return False
        return True

    def _reply(self, obj: dict[str, Any]) -> None:
        try:
            data = entry(obj)
        except ValueError:  # e.g. a ping id that JSON cannot carry back (a huge integer)
            data = entry(protocol.error("bad_message", "ping id cannot be echoed"))
        self._push_reply(data)

    def _push_reply(self, data: bytes) -> None:
        """Queue one encoded reply for this connection alone; drop it if that is too much."""
        if len(data) > RECORD_BUDGET:
            data = entry(protocol.error("bad_message", "the reply would exceed a record"))
        if self.hub.reply(self.conn, data):
            self._dropped_slow([self.conn])

    def _rate_limited(self) -> Refused:
        return Refused("rate_limited", f"more than {self.settings.rate} messages per second")

    def _join(self, msg: protocol.Join) -> bool:
        """§5 join: the proof first (bad_identity), then the hub's checks and registration."""
        conn = self.conn
        identity = None
        if msg.identity is not None:
            transcript = crypto_utils.identity_transcript(self.server.spki, *self.handshake)
            if not crypto_utils.verify_identity(msg.identity, msg.proof, transcript):
                raise Refused(
                    "bad_identity", "the identity proof does not verify on this connection"
                )
            identity = crypto_utils.identity_fingerprint(msg.identity)
        request = JoinRequest(
            name=msg.name,
            name_json=protocol.json_string(msg.name),
            identity=identity,
            identity_json=protocol.json_string(identity) if identity else b"null",
            history=msg.history,
            since=msg.since,
            now=time.monotonic(),
            now_ms=int(time.time() * 1000),
        )
        result = self.hub.join(conn, request)
        if result.outcome == "gone":
            return False
        if result.outcome in ("not_allowed", "banned"):  # §5: error, then bye and close
            self._reply(protocol.error(result.outcome, result.message))
            self.server.end(conn, result.outcome, bye=True, why=f"join as {clip(msg.name, 64)}")
            return False
        if result.outcome != "ok":
            raise Refused(result.outcome, result.message)
        for old in result.replaced:  # its flusher sends bye (replaced) and closes it
            log.info("%s replaced by a newer connection of its identity", old.describe())
        if result.binding is not None and self.server.writer is not None:
            self.server.writer.bind(result.binding)
        who = f" with identity {identity}" if identity else ""
        log.info("%s joined as %s%s", conn.peer, clip(msg.name, 64), who)
        return True

    def _say(self, msg: protocol.Say) -> None:
        ts = int(time.time() * 1000)
        head, tail = protocol.encode_message_parts(
            self.conn.name_json, protocol.json_string(msg.text), ts, msg.action
        )
        outcome, slow = self.hub.say(self.conn, head, tail, time.monotonic(), ts)
        if outcome == "muted":
            raise Refused("muted", "you are muted")
        if outcome == "rate_limited":
            raise self._rate_limited()
        self._dropped_slow(slow)

    def _dm(self, msg: protocol.Dm) -> None:
        text = protocol.json_string(msg.text)
        ts = int(time.time() * 1000)
        outcome, slow = self.hub.dm(self.conn, msg.to, text, ts, time.monotonic())
        if outcome == "unknown_user":
            raise Refused("unknown_user", f"no user named {msg.to[:64]}")
        if outcome == "muted":
            raise Refused("muted", "you are muted")
        if outcome == "rate_limited":
            raise self._rate_limited()
        if slow is not None:
            self._dropped_slow([slow])

    def _dropped_slow(self, slow: list[Conn]) -> None:
        for conn in slow:
            log.info(
                "dropped %s as slow: over %d pending bytes",
                conn.describe(),
                self.settings.max_pending,
            )
            wake(conn.sock)
