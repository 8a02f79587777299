"""A lean bcast/1 load generator: many clients on non-blocking sockets in one event loop.

Written from PROTOCOL.md with `cryptography` (C code for AES-GCM, X25519, HKDF and
RSA), so that the generator's own work stays small next to the server's:

  * Each client's handshake material (RSA-wrapped secret, X25519 key pair, nonce)
    is made before it connects; on `hello` only X25519 + HKDF remain (§2). With
    `identity`, each client also has an Ed25519 key made beforehand; the proof
    signs this connection's handshake (§5), so it is made on `hello` (~50 us).
  * Records are opened as they arrive, but messages are not JSON-decoded in the
    hot path: a record's deliveries are counted with `bytes.count`, and the
    record is kept with its arrival time for `verify` afterwards, which pulls
    (id, sender, seq, send time) out of it with one compiled regex.
  * The text of every `say` carries its sender, sequence number and send time
    (time.monotonic_ns, one clock for every process on the machine).

The generator assumes the compact JSON that server.py writes (no spaces) and
that a `message` lists `id` before `text`; a server that differs shows up as
lost messages, never as silent success.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable
from itertools import repeat
from operator import itemgetter, lt, sub
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RECV_BYTES = 256 * 1024
MAX_RECORD_BYTES = 1_048_576  # §1: a client accepts records up to 1 MiB
MAX_HANDSHAKE_BYTES = 8192  # §1
HKDF_INFO_LABEL = b"bcast/1 keys"
IDENTITY_LABEL = b"bcast/1 identity"  # §5: the head of what a join proof signs
TEXT_BYTES = 100  # every say carries exactly this much text
QUIET_S = 0.5  # a partial join is over once no record has come for this long
_NONCE = struct.Struct(">4xQ").pack  # §3: 0x00000000 || u64be(seq)
_LEN = struct.Struct(">I")
# The text of a say: sender (5 digits), sequence (7), monotonic send time (19 digits).
_TEXT_HEAD = b"s%05d q%07d t%019d "
_TEXT_PAD = b"x" * (TEXT_BYTES - len(_TEXT_HEAD % (0, 0, 0)))
# A delivered message, as server.py writes it: {"type":"message","id":N,"from":..,"text":..}
DELIVERY_RE = re.compile(rb'"id":(\d+),[^{}]*?"text":"s(\d{5}) q(\d{7}) t(\d{19}) ')
ACK_RE = re.compile(rb'"text":"s(\d{5}) q(\d{7}) ')
MESSAGE_TAG = b':"message"'  # `"type":"message"`; the key "message" is followed by a colon
OBJECT_TAG = b'{"type":'


class LoadError(Exception):
    """A client failed (closed, refused, or the server answered unexpectedly)."""


def say_record_plaintext(sender: int, seqs: range) -> bytes:
    """One record of `say`s numbered `seqs`, each text stamped with the send time."""
    now = time.monotonic_ns()
    says = [
        b'{"type":"say","text":"' + _TEXT_HEAD % (sender, q, now) + _TEXT_PAD + b'"}' for q in seqs
    ]
    return b"[" + b",".join(says) + b"]"


def sender_tag(sender: int) -> bytes:
    """How a sender's number appears in DELIVERY_RE / ACK_RE matches."""
    return b"%05d" % sender


class Client:
    """One connection. The engine drives it; scenario code reads its counters."""

    __slots__ = (
        "acks_for",
        "closed",
        "connect_ns",
        "eph",
        "eph_public",
        "expect",
        "got",
        "identity",
        "identity_b64",
        "identity_fp",
        "idx",
        "joined_expected",
        "joined_seen",
        "keep",
        "last_ns",
        "name",
        "nonce",
        "nrecords",
        "out",
        "rbuf",
        "records",
        "rx",
        "rx_seq",
        "secret",
        "settled",
        "sock",
        "state",
        "tx",
        "tx_seq",
        "welcome_ns",
        "wrapped",
    )

    def __init__(self, idx: int, wrapped: bytes, secret: bytes, identity: bool = False):
        self.idx = idx
        self.name = f"c{idx:05d}"
        self.secret = secret
        self.wrapped = wrapped
        self.nonce = os.urandom(32)
        self.eph: X25519PrivateKey | None = X25519PrivateKey.generate()
        self.eph_public = self.eph.public_key().public_bytes_raw()
        # §5 identity: the key, its b64 and the fingerprint `welcome` must name.
        self.identity: Ed25519PrivateKey | None = None
        self.identity_b64 = b""
        self.identity_fp = ""
        if identity:
            self.identity = Ed25519PrivateKey.generate()
            public = self.identity.public_key().public_bytes_raw()
            self.identity_b64 = base64.b64encode(public)
            self.identity_fp = "SHA256:" + base64.b64encode(_sha256(public)).decode().rstrip("=")
        self.sock: socket.socket | None = None
        self.state = "new"  # new -> hello -> welcome -> joined
        self.rbuf = bytearray()
        self.out = bytearray()  # bytes the socket did not take yet
        self.tx: AESGCM | None = None
        self.rx: AESGCM | None = None
        self.tx_seq = 0
        self.rx_seq = 0
        self.connect_ns = 0
        self.welcome_ns = 0
        self.joined_expected = -1  # `joined` notices still due after welcome
        self.joined_seen = 0
        self.settled = False  # welcomed and every due `joined` seen
        self.got = 0  # `message` deliveries counted
        self.nrecords = 0  # records that held at least one of them
        self.expect = 0
        self.last_ns = 0  # arrival time of the last record holding a message
        self.keep = False  # keep (arrival_ns, plaintext) of records for verify()
        self.records: list[tuple[int, bytes]] = []
        self.acks_for: dict[bytes, Sender] | None = None
        self.closed: str | None = None

    def seal(self, plaintext: bytes) -> bytes:
        assert self.tx is not None
        record = self.tx.encrypt(_NONCE(self.tx_seq), plaintext, None)
        self.tx_seq += 1
        return _LEN.pack(len(record)) + record


class Sender:
    """The sending side of one client: how far it got and what has been seen."""

    __slots__ = ("client", "first_ns", "seen", "sent", "total", "window")

    def __init__(self, client: Client, total: int, window: int):
        self.client = client
        self.total = total  # messages to send
        self.window = window  # most messages sent but not yet seen by the acker
        self.sent = 0
        self.seen = 0  # messages seen by the designated receiver
        self.first_ns = 0


def server_spki_material(spki: bytes, count: int) -> list[tuple[bytes, bytes]]:
    """`count` (wrapped secret, secret) pairs for the server key `spki` (§2)."""
    public = serialization.load_der_public_key(spki)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    out = []
    for _ in range(count):
        secret = os.urandom(32)
        out.append((public.encrypt(secret, oaep), secret))  # type: ignore[union-attr]
    return out


class Engine:
    """Clients of one process on one selector; every scenario runs through `pump`."""

    def __init__(
        self,
        address: tuple[str, int],
        spki: bytes,
        indices: list[int],
        n_total: int,
        identity: bool = False,
    ):
        """With `identity`, every client joins with an Ed25519 identity and proof (§5)."""
        self.address = address
        self.spki = spki
        self.spki_hash = _sha256(spki)
        self.transcript_head = IDENTITY_LABEL + self.spki_hash
        self.n_total = n_total
        self.sel = selectors.DefaultSelector()
        material = server_spki_material(spki, len(indices))
        self.clients = [Client(i, w, s, identity) for i, (w, s) in zip(indices, material)]
        self.queue = list(reversed(self.clients))  # clients not yet connected
        self.inflight = 0  # connected, not yet welcomed
        self.welcomed = 0
        self.unsettled = 0  # connected, not yet welcomed or still owed `joined` notices
        self.remaining = 0  # receivers still waiting for messages
        self.on_record: Callable[[Client, bytes, int], None] = self._record_joining
        self.ready: set[Sender] = set()  # senders whose window opened
        self.last_rx = 0.0  # time.monotonic() of the last read
        self._rx = memoryview(bytearray(RECV_BYTES))
        self.errors: list[str] = []
        self.anomalies: dict[str, int] = {}

    # --- connecting ---

    def connect_more(self, max_inflight: int) -> None:
        """Start connections while fewer than `max_inflight` handshakes are under way."""
        while self.queue and self.inflight < max_inflight:
            c = self.queue.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect_ns = time.monotonic_ns()
            err = sock.connect_ex(self.address)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                raise LoadError(f"connect failed: {os.strerror(err)}")
            c.sock = sock
            c.state = "hello"
            self.inflight += 1
            self.unsettled += 1
            self.sel.register(sock, selectors.EVENT_READ, c)

    def join_all(
        self,
        max_inflight: int,
        timeout: float,
        connect_for: float | None = None,
        must: bool = True,
    ) -> bool:
        """Connect and join clients; return once each has seen every `joined` due to it.

        With `connect_for`, no connection starts after that many seconds; those
        started are seen through, and since the `joined` notices due then depend
        on how many clients the other workers started, the phase ends once every
        started client is welcomed and no record has come for QUIET_S. With
        `must=False`, a timeout is no error. Returns whether every client joined
        and settled; `clients` keeps only the joined ones.
        """
        start = time.monotonic()
        stop_connecting = start + (connect_for if connect_for is not None else timeout)
        self.on_record = self._record_joining

        def tick() -> float | None:
            if time.monotonic() < stop_connecting:
                self.connect_more(max_inflight)
            return None

        def done() -> bool:
            if self.inflight:
                return False
            if not self.queue:
                return not self.unsettled
            now = time.monotonic()
            return now >= stop_connecting and now - self.last_rx >= QUIET_S

        tick()
        finished = self.pump(done, start + timeout, tick, "join", must)
        complete = finished and not self.queue and not self.unsettled
        self.queue.clear()
        self.clients = [c for c in self.clients if c.state == "joined"]
        return complete

    def welcome_all(self, max_inflight: int, timeout: float) -> None:
        """Connect and join every client; return at the last welcome (storm)."""
        deadline = time.monotonic() + timeout
        self.on_record = self._record_joining

        def tick() -> None:
            self.connect_more(max_inflight)

        tick()
        self.pump(lambda: self.welcomed == len(self.clients), deadline, tick, "welcome")

    # --- the loop ---

    def pump(
        self,
        done: Callable[[], bool],
        deadline: float,
        tick: Callable[[], float | None] | None = None,
        what: str = "",
        must: bool = True,
    ) -> bool:
        """Serve socket events until `done()`; `tick` may return its next due time.

        At `deadline`: TimeoutError, or with `must=False` return False.
        """
        select = self.sel.select
        while not done():
            if self.errors:
                raise LoadError(f"{len(self.errors)} client(s) failed, first: {self.errors[0]}")
            now = time.monotonic()
            if now >= deadline:
                if not must:
                    return False
                raise TimeoutError(f"{what} did not finish in time")
            wait = deadline - now
            if tick is not None:
                due = tick()
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
                if done():
                    break
            for key, mask in select(min(wait, 0.5)):
                c = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(c)
                if mask & selectors.EVENT_READ:
                    self._read(c)
        return True

    def send(self, c: Client, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._fail(c, f"send: {exc}")
            return
        if n < len(data):
            c.out += data[n:]
            self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def _flush(self, c: Client) -> None:
        try:
            n = c.sock.send(c.out)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(c, f"send: {exc}")
            return
        del c.out[:n]
        if not c.out:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)

    def _read(self, c: Client) -> None:
        try:
            # recv_into one reused buffer: sock.recv(256 KiB) would allocate (mmap) a
            # fresh 256 KiB object per call, ~16 us of kernel time each.
            n = c.sock.recv_into(self._rx)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(c, f"recv: {exc}")
            return
        if not n:
            self._fail(c, "closed by the server")
            return
        now = time.monotonic_ns()
        self.last_rx = now / 1e9
        buf = c.rbuf
        buf += self._rx[:n]
        pos, end = 0, len(buf)
        while end - pos >= 4:
            length = _LEN.unpack_from(buf, pos)[0]
            limit = MAX_HANDSHAKE_BYTES if c.state == "hello" else MAX_RECORD_BYTES
            if not 1 <= length <= limit:
                self._fail(c, f"frame of {length} bytes")
                return
            stop = pos + 4 + length
            if stop > end:
                break
            body = bytes(buf[pos + 4 : stop])
            pos = stop
            if c.state == "hello":
                self._on_hello(c, body)
                continue
            try:
                plaintext = c.rx.decrypt(_NONCE(c.rx_seq), body, None)  # type: ignore[union-attr]
            except Exception:
                self._fail(c, f"record {c.rx_seq} failed to open")
                return
            c.rx_seq += 1
            if c.state == "joined":
                self.on_record(c, plaintext, now)
            else:
                self._record_joining(c, plaintext, now)
            if c.closed:
                return
        if pos:
            del buf[:pos]

    def _fail(self, c: Client, why: str) -> None:
        if c.closed:
            return
        c.closed = why
        self.errors.append(f"{c.name}: {why}")
        if c.sock is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()

    # --- handshake (§2) ---

    def _on_hello(self, c: Client, body: bytes) -> None:
        hello = json.loads(body)
        if hello.get("type") != "hello" or hello.get("protocol") != "bcast/1":
            self._fail(c, f"not a bcast/1 hello: {body[:120]!r}")
            return
        if base64.b64decode(hello["key"]) != self.spki:
            self._fail(c, "the server key is not the one the benchmark made")
            return
        server_nonce = base64.b64decode(hello["nonce"])
        server_eph = base64.b64decode(hello["eph"])
        assert c.eph is not None
        dh = c.eph.exchange(X25519PublicKey.from_public_bytes(server_eph))
        c.eph = None  # forward secrecy, as a client should
        info = HKDF_INFO_LABEL + self.spki_hash + server_eph + c.eph_public
        okm = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=server_nonce + c.nonce, info=info
        ).derive(c.secret + dh)
        c.tx, c.rx = AESGCM(okm[:32]), AESGCM(okm[32:])
        key_msg = json.dumps(
            {
                "type": "key",
                "nonce": base64.b64encode(c.nonce).decode(),
                "secret": base64.b64encode(c.wrapped).decode(),
                "eph": base64.b64encode(c.eph_public).decode(),
            }
        ).encode()
        join = b'[{"type":"join","name":"%s"}]' % c.name.encode()
        if c.identity is not None:
            transcript = self.transcript_head + server_nonce + c.nonce + server_eph + c.eph_public
            proof = base64.b64encode(c.identity.sign(transcript))
            join = b'[{"type":"join","name":"%s","identity":"%s","proof":"%s"}]' % (
                c.name.encode(),
                c.identity_b64,
                proof,
            )
        c.state = "welcome"
        self.send(c, _LEN.pack(len(key_msg)) + key_msg + c.seal(join))

    def _record_joining(self, c: Client, plaintext: bytes, now: int) -> None:
        """Records before the traffic starts: the welcome, then `joined` notices."""
        if c.state == "welcome":
            msgs = json.loads(plaintext)
            first = msgs[0]
            if first.get("type") != "welcome":
                self._fail(c, f"join answered with {plaintext[:200]!r}")
                return
            if c.identity is not None and first.get("identity") != c.identity_fp:
                self._fail(c, f"welcome names identity {first.get('identity')!r}, not ours")
                return
            c.state = "joined"
            c.welcome_ns = now
            self.welcomed += 1
            self.inflight -= 1
            c.joined_expected = self.n_total - 1 - len(first["users"])
            c.joined_seen = sum(1 for m in msgs[1:] if m.get("type") == "joined")
            self._note_others(c, msgs[1:])
        else:
            joined = plaintext.count(b':"joined"')
            c.joined_seen += joined
            if plaintext.count(OBJECT_TAG) != joined:
                self._note_others(c, json.loads(plaintext))
        if not c.settled and c.joined_seen >= c.joined_expected:
            c.settled = True
            self.unsettled -= 1

    def _note_others(self, c: Client, msgs: list[dict[str, Any]]) -> None:
        for m in msgs:
            kind = m.get("type")
            if kind in ("joined", "message"):
                continue
            self.anomalies[kind] = self.anomalies.get(kind, 0) + 1
            if kind in ("error", "bye"):
                self._fail(c, f"server sent {json.dumps(m)[:200]}")
                return

    # --- traffic ---

    def start_receiving(self, receivers: list[Client], expect: Callable[[Client], int]) -> None:
        """From now on count `message` deliveries and keep records for `verify`."""
        for c in receivers:
            c.expect = expect(c)
            c.keep = True
            c.got = 0
            c.nrecords = 0
            c.records = []
        self.remaining = sum(1 for c in receivers if c.expect > 0)
        self.on_record = self._record_traffic

    def _record_traffic(self, c: Client, plaintext: bytes, now: int) -> None:
        k = plaintext.count(MESSAGE_TAG)
        if plaintext.count(OBJECT_TAG) != k:
            self._note_others(c, json.loads(plaintext))
        if not k:
            return
        if c.keep:
            c.records.append((now, plaintext))
        c.last_ns = now
        c.nrecords += 1
        before = c.got
        c.got += k
        if before < c.expect <= c.got:
            self.remaining -= 1
        if c.acks_for is not None:
            for tag, q in dict(ACK_RE.findall(plaintext)).items():
                snd = c.acks_for.get(tag)
                if snd is not None:
                    snd.seen = int(q) + 1
                    if snd.sent < snd.total:
                        self.ready.add(snd)

    def send_window(self, snd: Sender, per_record: int) -> None:
        """Send as many says as `snd`'s window allows, `per_record` to a record."""
        room = min(snd.window - (snd.sent - snd.seen), snd.total - snd.sent)
        if room > 0:
            self.send_says(snd, room, per_record)

    def send_says(self, snd: Sender, count: int, per_record: int) -> None:
        """Send `snd`'s next `count` says in one write, `per_record` to a record."""
        c = snd.client
        if not snd.first_ns:
            snd.first_ns = time.monotonic_ns()
        data = bytearray()
        stop = snd.sent + count
        for start in range(snd.sent, stop, per_record):
            data += c.seal(say_record_plaintext(c.idx, range(start, min(stop, start + per_record))))
        snd.sent = stop
        self.send(c, bytes(data))

    def close_all(self) -> None:
        for c in self.clients:
            if c.sock is not None and not c.closed:
                try:
                    self.sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
                c.sock.close()
                c.closed = "closed by the benchmark"
        self.sel.close()


def _sha256(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


# --- checking what was received ---


def verify(c: Client, senders: list[int], per_sender: int) -> tuple[dict[str, int], list[int]]:
    """Lost / duplicated / out-of-order counts and latencies (ns) for one receiver.

    Expected: every (sender, seq) of `senders` x range(per_sender) exactly once,
    each sender's seqs increasing, and ids strictly increasing (§4).
    """
    found: list[tuple[bytes, bytes, bytes, bytes]] = []
    arrivals: list[int] = []
    for now, plaintext in c.records:
        hits = DELIVERY_RE.findall(plaintext)
        found += hits
        arrivals += repeat(now, len(hits))
    c.records = []
    if not found:
        return {"lost": len(senders) * per_sender, "duplicated": 0, "out_of_order": 0}, []
    ids, who, seqs, sent = zip(*found)
    latencies = list(map(sub, arrivals, map(int, sent)))
    id_values = list(map(int, ids))
    id_errors = len(id_values) - 1 - sum(map(lt, id_values, id_values[1:]))
    expected = [(sender_tag(s), b"%07d" % q) for s in sorted(senders) for q in range(per_sender)]
    pairs = sorted(zip(who, seqs), key=itemgetter(0))  # stable: per sender, arrival order
    if pairs == expected:
        return {"lost": 0, "duplicated": 0, "out_of_order": id_errors}, latencies
    lost = dup = disorder = 0
    by_sender: dict[bytes, list[bytes]] = {}
    for tag, q in pairs:
        by_sender.setdefault(tag, []).append(q)
    for s in senders:
        qs = by_sender.pop(sender_tag(s), [])
        distinct = set(qs)
        lost += per_sender - len(distinct)
        dup += len(qs) - len(distinct)
        disorder += sum(1 for a, b in zip(qs, qs[1:]) if b < a)
    dup += sum(len(qs) for qs in by_sender.values())  # from senders it should not hear
    return {"lost": lost, "duplicated": dup, "out_of_order": disorder + id_errors}, latencies
