"""Unit and property tests of protocol.py against PROTOCOL.md (bcast/1).

Every test's docstring names the rule it checks. Byte streams are fed whole,
byte by byte and split at every offset; hypothesis fuzzes the decoders with
the invariant "parse it or raise a ProtocolError, nothing else".
"""

from __future__ import annotations

import base64
import json
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import protocol as p
from protocol import ByeProtocol, CloseSilently, ProtocolError, Refused

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NONCE = bytes(range(32))
EPH = bytes(range(100, 132))
SPKI = b"\x30\x82\x01\x22" + bytes(range(200))  # any non-empty bytes will do for the codec


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def drain(decoder: p.FrameDecoder) -> list[bytes]:
    bodies = []
    while (body := decoder.next_frame()) is not None:
        bodies.append(body)
    return bodies


def feed_chunks(chunks: list[bytes], max_len: int = p.MAX_HANDSHAKE_FRAME) -> list[bytes]:
    decoder = p.FrameDecoder(max_len)
    bodies = []
    for chunk in chunks:
        decoder.feed(chunk)
        bodies += drain(decoder)
    assert decoder.buffered == 0
    return bodies


def record(*objs: dict[str, Any]) -> bytes:
    return json.dumps(list(objs)).encode()


def refusal(obj: dict[str, Any], max_text: int = p.DEFAULT_MAX_TEXT) -> str:
    with pytest.raises(Refused) as info:
        p.parse_client_message(obj, max_text)
    return info.value.code


# --- §1 framing ---

BODIES = [b"a", b"hello world", bytes(range(256)) * 3, b"\x00\x00\x00\x00", b"x" * 8192]


def test_encode_frame_is_u32be_length_then_body():
    """§1: a frame is u32be length L || L bytes of body."""
    assert p.encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert p.encode_frame(b"x" * 0x010203)[:4] == b"\x00\x01\x02\x03"


def test_frames_fed_whole():
    """§1: several frames in one read all come out, in order."""
    stream = b"".join(frame(b) for b in BODIES)
    assert feed_chunks([stream]) == BODIES


def test_frames_fed_byte_by_byte():
    """§1: a frame may arrive split across any number of reads (one byte each)."""
    stream = b"".join(frame(b) for b in BODIES[:4])
    assert feed_chunks([stream[i : i + 1] for i in range(len(stream))]) == BODIES[:4]


def test_frames_split_at_every_offset():
    """§1: a stream of frames split in two at every offset gives the same bodies."""
    bodies = [b"a", b"bc", b"\x00" * 7, b"\xff" * 300]
    stream = b"".join(frame(b) for b in bodies)
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == bodies, cut


@FUZZ
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    data=st.data(),
)
def test_frames_any_chunking(bodies: list[bytes], data: st.DataObject):
    """§1: any list of frames, cut into arbitrary reads, gives the same bodies in order."""
    stream = b"".join(frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    edges = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in zip(edges, edges[1:])]
    assert feed_chunks(chunks) == bodies


@pytest.mark.parametrize("length", [0, p.MAX_HANDSHAKE_FRAME + 1, 0xFFFFFFFF])
def test_bad_length_refused_on_its_four_bytes(length: int):
    """§1: a length of 0 or over the limit is refused as soon as its 4 bytes arrive."""
    decoder = p.FrameDecoder(p.MAX_HANDSHAKE_FRAME)
    header = length.to_bytes(4, "big")
    for i in range(3):
        decoder.feed(header[i : i + 1])
        assert decoder.next_frame() is None
    decoder.feed(header[3:])
    with pytest.raises(CloseSilently):
        decoder.next_frame()
    assert decoder.buffered == 4  # nothing of a body was read or kept


@pytest.mark.parametrize("length", [0, p.MAX_RECORD_FRAME + 1, 0xFFFFFFFF])
def test_bad_record_length_refused(length: int):
    """§1: with the record limit (1 MiB), 0 and 1 MiB + 1 are refused on the header alone."""
    decoder = p.FrameDecoder(p.MAX_RECORD_FRAME)
    decoder.feed(length.to_bytes(4, "big"))
    with pytest.raises(CloseSilently):
        decoder.next_frame()


def test_bad_length_after_good_frame_in_same_read():
    """§1: a bad length following a good frame is refused once the good frame is out."""
    decoder = p.FrameDecoder(16)
    decoder.feed(frame(b"ok") + (17).to_bytes(4, "big"))
    assert decoder.next_frame() == b"ok"
    with pytest.raises(CloseSilently):
        decoder.next_frame()


def test_decoder_asks_for_header_before_body():
    """§1: a reader that reads `wants()` bytes never reads body bytes before the length check."""
    decoder = p.FrameDecoder(p.MAX_RECORD_FRAME)
    assert decoder.wants() == 4
    decoder.feed(b"\x00\x10")
    assert decoder.wants() == 2
    decoder.feed(b"\x00\x00")  # 1 MiB announced
    assert decoder.next_frame() is None
    assert decoder.buffered == 4  # no allocation for the announced body
    assert decoder.wants() == p.MAX_RECORD_FRAME
    decoder.feed(b"z" * 1000)
    assert decoder.wants() == p.MAX_RECORD_FRAME - 1000


@pytest.mark.parametrize("max_len", [1, 10, p.MAX_HANDSHAKE_FRAME, p.MAX_RECORD_FRAME])
def test_bounds_are_inclusive(max_len: int):
    """§1: bounds are inclusive: L = 1 and L = max_len are both accepted."""
    body_max = bytes([7]) * max_len
    assert feed_chunks([frame(b"\x01"), frame(body_max)], max_len) == [b"\x01", body_max]


def test_max_len_changes_between_frames_in_one_read():
    """§1: key (<= 8192) and a 100000-byte first record in one read, limit raised between."""
    key_body = p.encode_key(p.KeyExchange(NONCE, b"s" * 384, EPH))
    rec = bytes(range(256)) * 390 + b"tail"
    assert len(rec) > p.MAX_HANDSHAKE_FRAME
    decoder = p.FrameDecoder(p.MAX_HANDSHAKE_FRAME)
    decoder.feed(frame(key_body) + frame(rec))
    assert decoder.next_frame() == key_body
    decoder.max_len = p.MAX_RECORD_FRAME
    assert decoder.next_frame() == rec
    assert decoder.next_frame() is None


def test_max_len_not_raised_refuses_big_record():
    """§1: the same stream under the handshake limit alone is refused at the record."""
    decoder = p.FrameDecoder(p.MAX_HANDSHAKE_FRAME)
    decoder.feed(frame(b"{}") + frame(b"r" * 100_000))
    assert decoder.next_frame() == b"{}"
    with pytest.raises(CloseSilently):
        decoder.next_frame()


# --- §2 hello / key ---


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hello_obj(**over: Any) -> dict[str, Any]:
    obj = {"type": "hello", "protocol": "bcast/1", "key": b64(SPKI), "nonce": b64(NONCE)}
    obj["eph"] = b64(EPH)
    obj.update(over)
    return obj


def key_obj(**over: Any) -> dict[str, Any]:
    obj = {"type": "key", "nonce": b64(NONCE), "secret": b64(b"S" * 256), "eph": b64(EPH)}
    obj.update(over)
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_hello_round_trip_and_bytes():
    """§2 hello: encode then parse gives the same fields; compact JSON in the page's order."""
    hello = p.Hello(key=SPKI, nonce=NONCE, eph=EPH)
    body = p.encode_hello(hello)
    assert body == (
        b'{"type":"hello","protocol":"bcast/1","key":"'
        + b64(SPKI).encode()
        + b'","nonce":"'
        + b64(NONCE).encode()
        + b'","eph":"'
        + b64(EPH).encode()
        + b'"}'
    )
    assert p.parse_hello(body) == hello
    assert p.parse_hello(dumps(hello_obj())) == hello


def test_key_round_trip():
    """§2 key: encode then parse gives the same fields."""
    msg = p.KeyExchange(nonce=NONCE, secret=b"\x01" * 384, eph=EPH)
    assert p.parse_key(p.encode_key(msg)) == msg
    assert json.loads(p.encode_key(msg)) == {
        "type": "key",
        "nonce": b64(NONCE),
        "secret": b64(b"\x01" * 384),
        "eph": b64(EPH),
    }


def test_unknown_extra_fields_ignored():
    """§2: unknown extra fields of hello and key are ignored."""
    extra = {"x": [1, {"y": None}], "version": 9}
    assert p.parse_hello(dumps(hello_obj(**extra))) == p.Hello(SPKI, NONCE, EPH)
    assert p.parse_key(dumps(key_obj(**extra))) == p.KeyExchange(NONCE, b"S" * 256, EPH)


# A 32-byte value whose b64 holds '+' and '/', to try urlsafe substitutes.
PLUS_SLASH = b"\xfb\xff\xbf" * 10 + b"\xfb\xff"
B64_PS = b64(PLUS_SLASH)
assert "+" in B64_PS and "/" in B64_PS and B64_PS.endswith("=")

BAD_B64 = {
    "space inside": B64_PS[:8] + " " + B64_PS[8:],
    "trailing newline": B64_PS + "\n",
    "leading space": " " + B64_PS,
    "tab inside": B64_PS[:4] + "\t" + B64_PS[4:],
    "missing padding": B64_PS.rstrip("="),
    "urlsafe -": B64_PS.replace("+", "-"),
    "urlsafe _": B64_PS.replace("/", "_"),
    "non-ASCII letter": "Ａ" + B64_PS[1:],
    "non-ASCII digit": "٣" + B64_PS[1:],
    "padding in the middle": B64_PS[:4] + "=" + B64_PS[4:],
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(BAD_B64))
@pytest.mark.parametrize("field", ["nonce", "eph"])
def test_non_strict_b64_refused(case: str, field: str):
    """§2: nonce and eph must be strict b64 (padding, standard alphabet, nothing else)."""
    assert getattr(p.parse_hello(dumps(hello_obj(**{field: B64_PS}))), field) == PLUS_SLASH
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(**{field: BAD_B64[case]})))
    with pytest.raises(CloseSilently):
        p.parse_key(dumps(key_obj(**{field: BAD_B64[case]})))


@pytest.mark.parametrize(
    "case", ["space inside", "missing padding", "urlsafe _", "non-ASCII letter"]
)
def test_non_strict_b64_refused_in_key_and_secret(case: str):
    """§2: hello.key and key.secret must be strict b64 too."""
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(key=BAD_B64[case])))
    with pytest.raises(CloseSilently):
        p.parse_key(dumps(key_obj(secret=BAD_B64[case])))


@pytest.mark.parametrize("field", ["nonce", "eph"])
def test_excess_padding_refused(field: str):
    """Notation + §2: strict b64 has exactly the padding needed, no extra '=' characters."""
    padded = b64(NONCE)
    assert padded.endswith("=") and not padded.endswith("==")
    with pytest.raises(CloseSilently):
        p.parse_key(dumps(key_obj(**{field: padded + "="})))
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(**{field: padded + "=="})))


def test_excess_padding_after_full_quad_refused():
    """Notation + §2: '=' after a value that needs no padding (384-byte secret) is refused."""
    unpadded = b64(b"S" * 384)
    assert not unpadded.endswith("=")
    assert p.parse_key(dumps(key_obj(secret=unpadded))).secret == b"S" * 384
    for extra in ("=", "==", "==="):
        with pytest.raises(CloseSilently):
            p.parse_key(dumps(key_obj(secret=unpadded + extra)))
        with pytest.raises(CloseSilently):
            p.parse_hello(dumps(hello_obj(key=unpadded + extra)))


@pytest.mark.parametrize("field", ["nonce", "eph"])
def test_non_canonical_b64_refused(field: str):
    """Notation: strict b64 is the one canonical encoding: no stray bits before the padding."""
    canonical = b64(NONCE)  # 32 bytes: the last character before '=' carries 2 unused bits
    last = canonical[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stray = alphabet[alphabet.index(last) + 1]
    variant = canonical[:-2] + stray + "="
    assert base64.b64decode(variant) == NONCE  # same bytes, different text
    with pytest.raises(CloseSilently):
        p.parse_key(dumps(key_obj(**{field: variant})))
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(**{field: variant})))


@pytest.mark.parametrize("size", [0, 31, 33, 64])
@pytest.mark.parametrize("field", ["nonce", "eph"])
def test_nonce_and_eph_must_be_32_bytes(size: int, field: str):
    """§2: a nonce or eph that is not 32 bytes closes the connection."""
    value = b64(bytes(range(size)))
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(**{field: value})))
    with pytest.raises(CloseSilently):
        p.parse_key(dumps(key_obj(**{field: value})))


HANDSHAKE_DEFECTS: dict[str, tuple[bytes, bytes]] = {
    # name: (bad hello body, bad key body)
    "not UTF-8": (b"\xff" + dumps(hello_obj()), b"\xff" + dumps(key_obj())),
    "latin-1 text": (
        json.dumps(hello_obj(x="é"), ensure_ascii=False).encode("latin-1"),
        json.dumps(key_obj(x="é"), ensure_ascii=False).encode("latin-1"),
    ),
    "not JSON": (b"{hello", b'{"type": "key",'),
    "empty": (b"", b""),
    "NaN": (b'{"type":"hello","x":NaN}', b'{"type":"key","x":NaN}'),
    "array": (dumps([hello_obj()]), dumps([key_obj()])),
    "string": (b'"hello"', b'"key"'),
    "number": (b"1", b"1"),
    "null": (b"null", b"null"),
    "wrong type": (dumps(hello_obj(type="key")), dumps(key_obj(type="hello"))),
    "type missing": (
        dumps({k: v for k, v in hello_obj().items() if k != "type"}),
        dumps({k: v for k, v in key_obj().items() if k != "type"}),
    ),
    "type not a string": (dumps(hello_obj(type=["hello"])), dumps(key_obj(type=None))),
    "nonce missing": (
        dumps({k: v for k, v in hello_obj().items() if k != "nonce"}),
        dumps({k: v for k, v in key_obj().items() if k != "nonce"}),
    ),
    "eph missing": (
        dumps({k: v for k, v in hello_obj().items() if k != "eph"}),
        dumps({k: v for k, v in key_obj().items() if k != "eph"}),
    ),
    "key/secret missing": (
        dumps({k: v for k, v in hello_obj().items() if k != "key"}),
        dumps({k: v for k, v in key_obj().items() if k != "secret"}),
    ),
    "nonce a list": (dumps(hello_obj(nonce=[b64(NONCE)])), dumps(key_obj(nonce=[b64(NONCE)]))),
    "eph a number": (dumps(hello_obj(eph=32)), dumps(key_obj(eph=32))),
    "key/secret null": (dumps(hello_obj(key=None)), dumps(key_obj(secret=None))),
    "key/secret an object": (dumps(hello_obj(key={})), dumps(key_obj(secret={}))),
    "deep nesting": (b"[" * 100_000, b"{" * 50_000),
}


@pytest.mark.parametrize("defect", sorted(HANDSHAKE_DEFECTS))
def test_handshake_defects_close_silently(defect: str):
    """§2: a hello or key that is not a UTF-8 JSON object of the right shape is CloseSilently."""
    bad_hello, bad_key = HANDSHAKE_DEFECTS[defect]
    with pytest.raises(CloseSilently):
        p.parse_hello(bad_hello)
    with pytest.raises(CloseSilently):
        p.parse_key(bad_key)


@pytest.mark.parametrize("protocol", ["bcast/2", "bcast/1 ", "BCAST/1", "", None, 1])
def test_hello_wrong_protocol(protocol: Any):
    """§2: a client MUST close on a protocol other than bcast/1."""
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(protocol=protocol)))
    without = {k: v for k, v in hello_obj().items() if k != "protocol"}
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(without))


def test_hello_empty_key_refused():
    """§2: hello.key is a DER SPKI; an empty one is refused."""
    with pytest.raises(CloseSilently):
        p.parse_hello(dumps(hello_obj(key="")))


def test_server_full_round_trip():
    """§2: the plaintext server_full error is recognised instead of a hello."""
    body = p.encode_server_full("too many")
    assert json.loads(body) == {"type": "error", "code": "server_full", "message": "too many"}
    assert p.parse_handshake_error(body) == p.Error("server_full", "too many")
    assert p.parse_handshake_error(p.encode_hello(p.Hello(SPKI, NONCE, EPH))) is None
    assert p.parse_handshake_error(b"\xff") is None


# --- §3 record plaintexts ---


def test_decode_record_valid():
    """§3: a UTF-8 JSON array of one or more objects with a string type decodes, in order."""
    objs = [{"type": "say", "text": "hi"}, {"type": "who"}, {"type": "zzz", "n": [1]}]
    assert p.decode_record(record(*objs)) == objs
    assert p.decode_record(b'[{"type":"ping"}]') == [{"type": "ping"}]
    assert p.decode_record(b' [ {"type" : "x"} ] \n') == [{"type": "x"}]
    assert p.decode_record('[{"type":"say","text":"é😀"}]'.encode()) == [
        {"type": "say", "text": "é😀"}
    ]


BAD_RECORDS = {
    "not UTF-8": b'[{"type":"say","text":"\xff"}]',
    "latin-1": b'[{"type":"say","text":"\xe9"}]',
    "truncated UTF-8": '[{"type":"say","text":"é'.encode()[:-1],
    "not JSON": b"[{type: say}]",
    "trailing garbage": b'[{"type":"who"}] x',
    "two arrays": b'[{"type":"who"}][{"type":"who"}]',
    "NaN": b'[{"type":"ping","id":NaN}]',
    "Infinity": b'[{"type":"ping","id":Infinity}]',
    "-Infinity": b'[{"type":"ping","id":-Infinity}]',
    "empty array": b"[]",
    "empty body": b"",
    "object": b'{"type":"who"}',
    "string": b'"who"',
    "null": b"null",
    "number": b"3",
    "element a list": b'[{"type":"who"},[]]',
    "element a string": b'["who"]',
    "element null": b'[{"type":"who"},null]',
    "no type": b'[{"text":"hi"}]',
    "type a number": b'[{"type":1}]',
    "type null": b'[{"type":null}]',
    "type a list": b'[{"type":["say"]}]',
    "deep junk": b"[" * 100_000,
    "deep valid nesting": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_decode_record_refuses(case: str):
    """§3: a record not a UTF-8 JSON non-empty array of typed objects is ByeProtocol."""
    with pytest.raises(ByeProtocol):
        p.decode_record(BAD_RECORDS[case])


def test_client_record_holds_at_most_64_messages():
    """§3 (rev. 2): a client record of 64 messages decodes; of 65 it is ByeProtocol, whole."""
    assert p.MAX_CLIENT_RECORD_MESSAGES == 64
    assert len(p.decode_record(record(*[{"type": "who"}] * 64))) == 64
    with pytest.raises(ByeProtocol, match="65 messages"):
        p.decode_record(record(*[{"type": "ping"}] * 65))
    with pytest.raises(ByeProtocol):
        p.decode_record(record(*[{"type": "say", "text": "x"}] * 1000))


def test_server_records_are_not_limited_on_the_client():
    """§3 (rev. 2): the server's batches to a client are not limited (max_messages=None)."""
    objs = [{"type": "message", "id": i, "from": "a", "text": "t", "ts": 1} for i in range(500)]
    assert p.decode_record(record(*objs), max_messages=None) == objs
    with pytest.raises(ByeProtocol):
        p.decode_record(b"[]", max_messages=None)  # the other checks still apply


@FUZZ
@given(
    sizes=st.lists(st.integers(0, 250), max_size=200),  # messages of 28..278 bytes
    max_plaintext=st.integers(302, 2000),
    max_messages=st.integers(1, 70),
)
def test_pack_records_keeps_every_record_within_the_limits(
    sizes: list[int], max_plaintext: int, max_messages: int
):
    """§1, §3 (rev. 2): a client splits a batch so that every record fits welcome.max_record
    and holds at most 64 messages; all messages arrive, in order; a record is full when
    the next message would not fit."""
    encoded = [p.encode_message({"type": "say", "text": "x" * n}) for n in sizes]
    records = p.pack_records(encoded, max_plaintext, max_messages)
    decoded = [obj for rec in records for obj in p.decode_record(rec, max_messages)]
    assert decoded == [json.loads(e) for e in encoded]
    for rec, nxt in zip(records, records[1:]):
        assert len(rec) <= max_plaintext
        count = len(p.decode_record(rec, None))
        first_of_next = p.encode_message(p.decode_record(nxt, None)[0])
        assert count == max_messages or len(rec) + 1 + len(first_of_next) > max_plaintext
    assert all(len(rec) <= max_plaintext for rec in records)


def test_pack_records_refuses_a_message_too_big_alone():
    """§1: a message that cannot fit one record on its own is not sent (ValueError)."""
    assert p.pack_records([b"x" * 98], 100) == [b"[" + b"x" * 98 + b"]"]
    with pytest.raises(ValueError, match="99 bytes"):
        p.pack_records([b"x" * 99], 100)
    assert p.pack_records([], 100) == []


def test_join_record_makes_an_array():
    """§3: several encoded messages batched into one record decode in order."""
    parts = [p.encode_message({"type": "who"}), p.encode_message({"type": "ping", "id": 3})]
    assert p.join_record(parts) == b'[{"type":"who"},{"type":"ping","id":3}]'
    assert p.decode_record(p.join_record(parts)) == [{"type": "who"}, {"type": "ping", "id": 3}]


# --- §4 client -> server messages ---


def test_parse_each_client_type():
    """§4: each client message type with good fields gives its dataclass."""
    assert p.parse_client_message({"type": "join", "name": "alice"}) == p.Join("alice")
    assert p.parse_client_message({"type": "say", "text": "hi"}) == p.Say("hi")
    assert p.parse_client_message({"type": "dm", "to": "Bob", "text": "yo"}) == p.Dm("Bob", "yo")
    assert p.parse_client_message({"type": "who"}) == p.Who()
    assert p.parse_client_message({"type": "leave"}) == p.Leave()
    assert p.parse_client_message({"type": "ping"}) == p.Ping(None)
    for ping_id in [7, "x", None, [1, {"a": True}], {"k": 1.5}, -3, 2**70]:
        assert p.parse_client_message({"type": "ping", "id": ping_id}) == p.Ping(ping_id)
        assert p.message_type({"type": "ping", "id": ping_id}) == "ping"


def test_join_name_is_normalised():
    """§4 name: the server uses the NFKC-normalised name."""
    assert p.parse_client_message({"type": "join", "name": "ａｌｉｃｅ"}) == p.Join("alice")
    assert p.parse_client_message({"type": "join", "name": "Jose\u0301"}) == p.Join("Jos\u00e9")


def test_extra_fields_ignored():
    """§3: unknown fields in a message are ignored."""
    assert p.parse_client_message({"type": "say", "text": "hi", "to": 5, "x": [1]}) == p.Say("hi")
    assert p.parse_client_message({"type": "who", "names": "x"}) == p.Who()
    assert p.parse_client_message({"type": "leave", "reason": None}) == p.Leave()
    assert p.parse_client_message({"type": "join", "name": "bo", "text": 1}) == p.Join("bo")


@pytest.mark.parametrize("kind", ["", "SAY", "Say", "message", "welcome", "hello", "key", "say "])
def test_unknown_type_is_bad_message(kind: str):
    """§4: an unknown type is bad_message (the first check)."""
    with pytest.raises(Refused) as info:
        p.message_type({"type": kind, "text": "hi"})
    assert info.value.code == "bad_message"
    assert refusal({"type": kind, "text": "hi"}) == "bad_message"


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "join"},
        {"type": "join", "name": None},
        {"type": "join", "name": 5},
        {"type": "join", "name": ["alice"]},
        {"type": "say"},
        {"type": "say", "text": None},
        {"type": "say", "text": 1},
        {"type": "say", "text": ["hi"]},
        {"type": "say", "text": {"t": "hi"}},
        {"type": "say", "text": True},
        {"type": "dm", "text": "hi"},
        {"type": "dm", "to": "bob"},
        {"type": "dm", "to": 1, "text": "hi"},
        {"type": "dm", "to": "bob", "text": False},
        {"type": "dm", "to": ["bob"], "text": "x" * 20000},  # fields come before size
    ],
)
def test_missing_or_mistyped_fields_are_bad_message(obj: dict[str, Any]):
    """§4: a missing or wrongly typed field is bad_message."""
    assert refusal(obj) == "bad_message"


@pytest.mark.parametrize("unit", ["a", "é", "€", "😀"])
@pytest.mark.parametrize("kind", ["say", "dm"])
def test_text_size_boundary_in_utf8_bytes(unit: str, kind: str):
    """§4 text: at most max_text UTF-8 bytes: exactly max_text passes, one byte more fails."""
    n = len(unit.encode())
    fits = unit * (p.DEFAULT_MAX_TEXT // n) + "a" * (p.DEFAULT_MAX_TEXT % n)
    assert len(fits.encode()) == p.DEFAULT_MAX_TEXT
    over = fits + "a"

    def obj(text: str) -> dict[str, Any]:
        return {"type": kind, "to": "bob", "text": text}

    assert p.parse_client_message(obj(fits)).text == fits
    assert refusal(obj(over)) == "too_long"
    if n > 1:  # counted in bytes, not characters
        assert refusal(obj(unit * (p.DEFAULT_MAX_TEXT // n + 1))) == "too_long"


def test_text_size_custom_limit():
    """§4 text: max_text is a parameter (given in welcome); the bound is inclusive."""
    assert p.parse_client_message({"type": "say", "text": "é" * 5}, max_text=10) == p.Say("é" * 5)
    assert refusal({"type": "say", "text": "é" * 5 + "a"}, max_text=10) == "too_long"


@pytest.mark.parametrize("bad", ["\x1b", "\x00", "\r", "\x7f", "\x85", "\x9b", "\ud800", "\udfff"])
def test_size_checked_before_content(bad: str):
    """§4 which error: size (too_long) is checked before content (bad_message)."""
    assert refusal({"type": "say", "text": bad + "x" * p.DEFAULT_MAX_TEXT}) == "too_long"
    assert refusal({"type": "say", "text": bad + "x" * 10}) == "bad_message"


CONTROLS = [chr(c) for c in range(0x20) if chr(c) not in "\n\t"] + [
    chr(c) for c in range(0x7F, 0xA0)
]


@pytest.mark.parametrize("kind", ["say", "dm"])
def test_text_content_refusals(kind: str):
    """§4 text: empty, C0 (but \\n, \\t), DEL, C1, or a lone surrogate is bad_message."""
    assert len(CONTROLS) == 30 + 33
    for text in ["", *CONTROLS, "\ud800", "\udc00", "ok\udbffok", "a\x00b", "end\x9b"]:
        assert refusal({"type": kind, "to": "bob", "text": text}) == "bad_message", repr(text)
    for ch in CONTROLS:
        assert refusal({"type": kind, "to": "bob", "text": f"hello {ch} world"}) == "bad_message"


@pytest.mark.parametrize(
    "text",
    [
        "line1\nline2",
        "\tindented",
        "\n",
        "😀🎉👍🏽👨‍👩‍👧",
        "e\u0301 a\u0308 \u0915\u094d\u0937",
        "مرحبا بالعالم",
        "שלום עולם",
        "\u200fRLM and \u202eoverride\u202c",
        "\u00a0nbsp \u2028 sep",
        "太郎 Анна राहुल",
        "\U0010fffd",
        " ",
    ],
)
def test_text_allowed_content(text: str):
    """§4 text: \\n, \\t, emoji, combining marks and right-to-left text are allowed."""
    assert p.parse_client_message({"type": "say", "text": text}) == p.Say(text)
    assert p.parse_client_message({"type": "dm", "to": "x", "text": text}) == p.Dm("x", text)


def test_dm_to_lone_surrogate_refused():
    """Notation + §4: a lone surrogate string is invalid, so a dm to one is bad_message."""
    assert refusal({"type": "dm", "to": "b\ud800b", "text": "hi"}) == "bad_message"


def test_join_lone_surrogate_refused():
    """Notation + §4: a name with a lone surrogate is refused (content check)."""
    code = refusal({"type": "join", "name": "al\udc80ice"})
    assert code in ("bad_message", "invalid_name")


def test_ping_id_with_lone_surrogate_refused():
    """Notation: a JSON string that decodes to a lone surrogate is invalid, even in a ping id."""
    assert refusal({"type": "ping", "id": "\ud800"}) == "bad_message"
    assert refusal({"type": "ping", "id": {"\udc00": 1}}) == "bad_message"
    assert refusal({"type": "ping", "id": [[["ok", "\ud83d"]]]}) == "bad_message"
    # a JSON escape pair decodes to one code point, not to surrogates
    obj = p.decode_record(b'[{"type":"ping","id":"\\ud83d\\ude00"}]')[0]
    assert p.parse_client_message(obj) == p.Ping("😀")


def test_ping_id_out_of_float_range_can_be_echoed():
    """§4 ping/pong: any JSON id the server accepts is echoed by pong (1e400 is valid JSON)."""
    body = b'[{"type":"ping","id":1e400}]'
    try:
        msg = p.parse_client_message(p.decode_record(body)[0])
    except ProtocolError:
        return  # refusing it is acceptable
    assert isinstance(msg, p.Ping)
    echoed = p.encode_message(p.pong(msg.id))  # must not raise
    assert json.loads(echoed)["type"] == "pong"


@pytest.mark.parametrize("kind", p.CLIENT_TYPES)
def test_message_type_known(kind: str):
    """§4, §5: every client type is known."""
    assert p.message_type({"type": kind}) == kind


# --- §5, §6 client -> server messages ---

ID_KEY = bytes(range(32))
ID_PROOF = bytes(range(64, 128))


def join_obj(**over: Any) -> dict[str, Any]:
    obj = {"type": "join", "name": "alice", "identity": b64(ID_KEY), "proof": b64(ID_PROOF)}
    obj.update(over)
    return {k: v for k, v in obj.items() if v is not ABSENT}


ABSENT = object()  # join_obj(field=ABSENT) leaves the field out


def test_parse_each_new_client_type():
    """§5, §6: each new client message with good fields gives its dataclass."""
    parse = p.parse_client_message
    assert parse(join_obj()) == p.Join("alice", ID_KEY, ID_PROOF)
    assert parse(join_obj(history=0, since=7)) == p.Join("alice", ID_KEY, ID_PROOF, 0, 7)
    assert parse({"type": "join", "name": "a", "since": 2**70}) == p.Join("a", since=2**70)
    assert parse({"type": "say", "text": "waves", "action": True}) == p.Say("waves", True)
    assert parse({"type": "say", "text": "hi", "action": False}) == p.Say("hi")
    assert parse({"type": "kick", "name": "Bob"}) == p.Kick("Bob")
    assert parse({"type": "kick", "name": "Bob", "reason": "spam"}) == p.Kick("Bob", "spam")
    assert parse({"type": "ban", "name": "b"}) == p.Ban("b")
    assert parse({"type": "ban", "name": "b", "minutes": 5, "reason": "x"}) == p.Ban("b", 5, "x")
    assert parse({"type": "unban", "who": "10.0.0.1"}) == p.Unban("10.0.0.1")
    assert parse({"type": "mute", "name": "b", "minutes": 0}) == p.Mute("b", 0)
    assert parse({"type": "bans"}) == p.Bans()
    assert parse({"type": "whois", "name": "ＢＯＢ"}) == p.Whois("ＢＯＢ")  # matched later, as sent


@pytest.mark.parametrize(
    "over",
    [
        {"name": None},
        {"name": 5},
        {"identity": None},
        {"proof": None},
        {"identity": 5},
        {"proof": [b64(ID_PROOF)]},
        {"history": None},
        {"history": -1},
        {"history": True},
        {"history": 1.0},
        {"history": "3"},
        {"since": None},
        {"since": -1},
        {"since": False},
        {"since": 2.5},
        {"since": [1]},
        # fields are checked before the name and the identity
        {"name": "al ice", "history": -1},
        {"name": "al ice", "identity": None},
        {"name": 5, "proof": "!!"},
        {"identity": ABSENT, "proof": None},
    ],
)
def test_join_fields_are_bad_message_first(over: dict[str, Any]):
    """§5 join order, §6: a mistyped name, identity, proof, history or since (null included)
    is bad_message, ahead of invalid_name and bad_identity."""
    assert refusal(join_obj(**over)) == "bad_message"


@pytest.mark.parametrize(
    "over",
    [
        {"name": "\u0430lice", "identity": ABSENT},
        {"name": "\u0430lice", "proof": "not b64"},
        {"name": "", "identity": b64(b"short")},
    ],
)
def test_join_name_before_identity(over: dict[str, Any]):
    """§5 join order: invalid_name comes before bad_identity."""
    assert refusal(join_obj(**over)) == "invalid_name"


@pytest.mark.parametrize(
    "over",
    [
        {"identity": ABSENT},
        {"proof": ABSENT},
        {"identity": b64(ID_KEY[:31])},
        {"identity": b64(ID_KEY + b"!")},
        {"identity": b64(ID_PROOF)},  # 64 bytes where 32 belong
        {"proof": b64(ID_PROOF[:63])},
        {"proof": b64(ID_PROOF + b"!")},
        {"proof": b64(ID_KEY)},
        {"identity": ""},
        {"proof": ""},
        *({"identity": bad} for bad in BAD_B64.values()),
        *({"proof": bad} for bad in BAD_B64.values()),
        {"identity": b64(ID_KEY).rstrip("=")},
        {"identity": base64.urlsafe_b64encode(PLUS_SLASH).decode()},
    ],
)
def test_join_bad_identity(over: dict[str, Any]):
    """§5: identity without proof or the reverse, bad strict b64, or sizes other than
    32 and 64 bytes: bad_identity (the connection stays)."""
    assert refusal(join_obj(**over)) == "bad_identity"


def test_join_identity_plus_slash_decodes():
    """§5 + notation: identity is standard base64 (with + and /) and decodes to its bytes."""
    msg = p.parse_client_message(join_obj(identity=B64_PS))
    assert msg == p.Join("alice", PLUS_SLASH, ID_PROOF)


@pytest.mark.parametrize("action", [None, 1, 0, "true", [True], {}])
def test_say_action_must_be_boolean(action: Any):
    """§6: a non-boolean action (null included) is bad_message, checked with the fields,
    so before size."""
    assert refusal({"type": "say", "text": "hi", "action": action}) == "bad_message"
    long = "x" * (p.DEFAULT_MAX_TEXT + 1)
    assert refusal({"type": "say", "text": long, "action": action}) == "bad_message"
    assert refusal({"type": "say", "text": long, "action": True}) == "too_long"


REASON_200 = "é" * 100  # 200 UTF-8 bytes


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "kick"},
        {"type": "kick", "name": None},
        {"type": "kick", "name": 1},
        {"type": "kick", "name": "b\ud800"},
        {"type": "kick", "name": "b", "reason": None},
        {"type": "kick", "name": "b", "reason": 5},
        {"type": "kick", "name": "b", "reason": ""},
        {"type": "kick", "name": "b", "reason": REASON_200 + "a"},
        {"type": "kick", "name": "b", "reason": "x" * 100_000},
        {"type": "kick", "name": "b", "reason": "bad\x1bcolour"},
        {"type": "kick", "name": "b", "reason": "\x85"},
        {"type": "kick", "name": "b", "reason": "lone \udc00"},
        {"type": "ban", "name": ["b"]},
        {"type": "ban", "name": "b", "minutes": 0},
        {"type": "ban", "name": "b", "minutes": -1},
        {"type": "ban", "name": "b", "minutes": 525_601},
        {"type": "ban", "name": "b", "minutes": 10**400},
        {"type": "ban", "name": "b", "minutes": None},
        {"type": "ban", "name": "b", "minutes": True},
        {"type": "ban", "name": "b", "minutes": 5.0},
        {"type": "ban", "name": "b", "minutes": "5"},
        {"type": "ban", "name": "b", "minutes": 5, "reason": ""},
        {"type": "mute", "name": "b"},
        {"type": "mute", "name": "b", "minutes": None},
        {"type": "mute", "name": "b", "minutes": -1},
        {"type": "mute", "name": "b", "minutes": 525_601},
        {"type": "mute", "name": "b", "minutes": False},
        {"type": "mute", "minutes": 5},
        {"type": "unban"},
        {"type": "unban", "who": None},
        {"type": "unban", "who": 3},
        {"type": "unban", "who": "\udfff"},
        {"type": "whois"},
        {"type": "whois", "name": None},
        {"type": "whois", "name": {"n": "b"}},
        {"type": "whois", "name": "\ud800"},
    ],
)
def test_moderation_fields_are_bad_message(obj: dict[str, Any]):
    """§5: a bad name, who, reason (even over 200 bytes: not too_long) or minutes is
    bad_message."""
    assert refusal(obj) == "bad_message"


@pytest.mark.parametrize("reason", [REASON_200, "a", "line\nbreak\ttab", "😀" * 50, " "])
def test_reason_bounds(reason: str):
    """§5 reason: any non-empty text of at most 200 UTF-8 bytes passes (200 included)."""
    assert p.parse_client_message({"type": "kick", "name": "b", "reason": reason}) == p.Kick(
        "b", reason
    )
    obj = {"type": "ban", "name": "b", "reason": reason}
    assert p.parse_client_message(obj) == p.Ban("b", None, reason)


@pytest.mark.parametrize(("kind", "least"), [("ban", 1), ("mute", 0)])
def test_minutes_bounds(kind: str, least: int):
    """§5 minutes: at most 525600; positive for ban, non-negative for mute; bounds inclusive."""
    for minutes in (least, 525_600):
        msg = p.parse_client_message({"type": kind, "name": "b", "minutes": minutes})
        assert msg.minutes == minutes
    for minutes in (least - 1, 525_601):
        assert refusal({"type": kind, "name": "b", "minutes": minutes}) == "bad_message"


def test_error_codes_and_reasons_of_revision_2():
    """§5: the new error codes, bye reasons and left reasons are known."""
    for code in ("bad_identity", "name_reserved", "not_allowed", "banned", "not_op", "muted"):
        assert code in p.ERROR_CODES
    for reason in ("kicked", "banned", "not_allowed", "replaced"):
        assert reason in p.BYE_REASONS and reason in p.LEAVE_REASONS
    assert set(p.OP_TYPES) == {"kick", "ban", "unban", "mute", "bans"} <= set(p.CLIENT_TYPES)
    assert "whois" in p.CLIENT_TYPES


@pytest.mark.parametrize("kind", p.CLIENT_TYPES)
def test_requires_join_and_is_op_type(kind: str):
    """§4: every type but join, ping and leave needs a join; §5: the five operator types."""
    assert p.requires_join(kind) == (kind not in ("join", "ping", "leave"))
    assert p.is_op_type(kind) == (kind in ("kick", "ban", "unban", "mute", "bans"))


@pytest.mark.parametrize(
    ("kind", "joined_as", "op", "code"),
    [
        ("say", None, False, "not_joined"),
        ("whois", None, False, "not_joined"),
        ("kick", None, False, "not_joined"),  # joined comes before operator
        ("bans", None, True, "not_joined"),
        ("join", "alice", False, "already_joined"),
        ("join", "alice", True, "already_joined"),
        ("kick", "alice", False, "not_op"),
        ("unban", "alice", False, "not_op"),
        ("kick", "alice", True, None),
        ("whois", "alice", False, None),
        ("join", None, False, None),
        ("ping", None, False, None),
        ("leave", None, False, None),
        ("ping", "alice", False, None),
    ],
)
def test_check_state_order(kind: str, joined_as: str | None, op: bool, code: str | None):
    """§4 which error: joined (not_joined / already_joined) before operator (not_op)."""
    if code is None:
        p.check_state(kind, joined_as, op)
        return
    with pytest.raises(Refused) as info:
        p.check_state(kind, joined_as, op)
    assert info.value.code == code


def test_new_client_messages_wire_bytes():
    """§5, §6: optional fields go on the wire only when set; identity and proof as b64."""
    enc = p.encode_client_message
    assert enc(p.Join("al")) == b'{"type":"join","name":"al"}'
    assert enc(p.Join("al", ID_KEY, ID_PROOF, 5, 0)) == (
        b'{"type":"join","name":"al","identity":"%s","proof":"%s","history":5,"since":0}'
        % (b64(ID_KEY).encode(), b64(ID_PROOF).encode())
    )
    assert enc(p.Say("x")) == b'{"type":"say","text":"x"}'
    assert enc(p.Say("x", action=True)) == b'{"type":"say","text":"x","action":true}'
    assert enc(p.Kick("b")) == b'{"type":"kick","name":"b"}'
    assert enc(p.Ban("b", None, "r")) == b'{"type":"ban","name":"b","reason":"r"}'
    assert enc(p.Ban("b", 3)) == b'{"type":"ban","name":"b","minutes":3}'
    assert enc(p.Mute("b", 0)) == b'{"type":"mute","name":"b","minutes":0}'
    assert enc(p.Unban("1.2.3.4")) == b'{"type":"unban","who":"1.2.3.4"}'
    assert enc(p.Bans()) == b'{"type":"bans"}'
    assert enc(p.Whois("b")) == b'{"type":"whois","name":"b"}'


# --- §4 names ---


def spec_valid_name(raw: str) -> str | None:
    """Verbatim copy of the normative predicate of PROTOCOL.md §4 (revision 2)."""
    name = unicodedata.normalize("NFKC", raw)
    if not 1 <= len(name) <= 32:
        return None
    if not (name[0].isalpha() or unicodedata.category(name[0]) == "Nd"):
        return None
    scripts, marks = set(), 0
    for ch in name:
        cat = unicodedata.category(ch)
        marks = marks + 1 if cat[0] == "M" else 0
        if marks > 3:  # no pile of combining marks
            return None
        if ch in "_-." or cat == "Nd" or cat[0] == "M":
            continue
        if cat[0] != "L":
            return None
        words = unicodedata.name(ch, "").split(" ")
        if "FILLER" in words:  # Hangul fillers look blank
            return None
        scripts.add(words[0])
    if len(scripts) <= 1 or scripts <= SPEC_JAPANESE or scripts <= SPEC_KOREAN:
        return name
    return None


SPEC_JAPANESE = {"CJK", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"}
SPEC_KOREAN = {"CJK", "IDEOGRAPHIC", "HANGUL"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", "alice"),
        ("José", "José"),
        ("Jose\u0301", "José"),
        ("राहुल", "राहुल"),
        ("太郎", "太郎"),
        ("Анна", "Анна"),
        ("Αλέξανδρος", "Αλέξανδρος"),
        ("ａｌｉｃｅ", "alice"),
        ("ﬁona", "fiona"),
        ("1alice", "1alice"),
        ("٣bob", "٣bob"),
        ("a_b-c.d", "a_b-c.d"),
        ("a" * 32, "a" * 32),
        ("e\u0301" * 17, "é" * 17),  # 34 code points raw, 17 after NFKC
        ("やまだ太郎", "やまだ太郎"),  # Japanese: hiragana with kanji
        ("김민준", "김민준"),
        ("佐々木", "佐々木"),  # 々 is IDEOGRAPHIC ITERATION MARK
        ("ルーク", "ルーク"),  # ー is KATAKANA-HIRAGANA PROLONGED SOUND MARK
        ("ｶﾀｶﾅ", "カタカナ"),  # halfwidth katakana, NFKC to fullwidth
        ("金김", "金김"),  # Korean: hanja with hangul
        ("x\u0301\u0302\u0303", "x\u0301\u0302\u0303"),  # three marks in a row: fine
        ("a\u0301b\u0302\u0303\u0304", "áb\u0302\u0303\u0304"),  # runs reset at a letter
    ],
)
def test_valid_names(raw: str, expected: str):
    """§4 name: valid names normalise (NFKC) to the name the server uses."""
    assert p.valid_name(raw) == expected
    assert p.valid_name(expected) == expected
    assert p.name_problem(raw) is None
    assert p.parse_client_message({"type": "join", "name": raw}) == p.Join(expected)


def test_jose_composed_and_decomposed_agree():
    """§4 name: José composed or decomposed is one NFKC name."""
    assert "José" != "Jose\u0301"
    assert p.valid_name("Jos\u00e9") == p.valid_name("Jose\u0301") == "Jos\u00e9"
    assert p.name_key("Jos\u00e9") == p.name_key("JOSE\u0301")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a" * 33,
        "é" * 33,
        "_alice",
        "-alice",
        ".alice",
        "al ice",
        " alice",
        "alice ",
        "alice!",
        "al@ice",
        "al'ice",
        "alice😀",
        "😀",
        "\u0430lice",  # Cyrillic а + Latin
        "\u13aalice",  # Cherokee Ꭺ + Latin
        "b\u0585b",  # Armenian օ between Latin
        "alice\u3164",  # HANGUL FILLER looks blank
        "alice\uffa0",  # HALFWIDTH HANGUL FILLER: NFKC gives U+1160, a filler too
        "x\u0301\u0302\u0303\u0304",  # four combining marks in a row
        "alice太郎",  # Latin + CJK
        "やまだ김",  # Japanese kana + Korean hangul
        "αlice",  # Greek α + Latin
        "Анна\u03b1",  # Cyrillic + Greek
        "\u0301a",  # a mark first
        "a\u200bb",  # zero-width space (Cf)
        "a\x00b",
        "a\nb",
        "〇a",  # Nl first (U+3007), not a letter
    ],
)
def test_invalid_names(raw: str):
    """§4 name: empty, over 32, leading punctuation, spaces, symbols, emoji, mixed scripts."""
    assert p.valid_name(raw) is None
    assert refusal({"type": "join", "name": raw}) == "invalid_name"


NAME_ALPHABET = [
    *"aZé\u0301\u0430Ӓαω1٣_-. !😀太ल\u094dुａＡﬁ\u00b2\u2160ǅ\u200b\u0308Ⅻ",
    *"\ud800\x7f\u3000",
    *"やカｶー々〆김\u3164\uffa0\u1160ᎪօԱ\u0302\u0303\u0304\u0305",  # rev. 2: scripts, marks
]
NAME_TEXTS = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),
    st.text(st.sampled_from(NAME_ALPHABET), max_size=36),
)


@FUZZ
@given(raw=NAME_TEXTS)
@example(raw="\u0430lice")
@example(raw="a" * 32)
@example(raw="\ufdfa")  # one code point that NFKC expands to 18
@example(raw="x\u0301\u0302\u0303\u0304")
@example(raw="やまだ김")
def test_valid_name_matches_spec_predicate(raw: str):
    """§4 name: protocol.valid_name agrees with the page's normative predicate on any text."""
    assert p.valid_name(raw) == spec_valid_name(raw)


@FUZZ
@given(raw=NAME_TEXTS)
@example(raw="alice\u3164")
@example(raw="")
def test_name_problem_agrees_with_valid_name(raw: str):
    """§4 name: name_problem gives a reason exactly when valid_name refuses, and the
    invalid_name error carries that reason (one predicate, two faces)."""
    problem = p.name_problem(raw)
    assert (problem is None) == (p.valid_name(raw) is not None)
    if problem is None:
        assert p.parse_client_message({"type": "join", "name": raw}) == p.Join(p.valid_name(raw))
    else:
        assert problem and not p.has_lone_surrogate(problem)
        assert problem.isprintable()  # never echoes an invisible character
        with pytest.raises(Refused) as info:
            p.parse_client_message({"type": "join", "name": raw})
        assert info.value.code == "invalid_name"
        assert problem in info.value.message


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("\u0430lice", "mixes Cyrillic and Latin letters"),
        ("alic\u0435", "mixes Latin and Cyrillic letters"),
        ("\u13aalice", "mixes Cherokee and Latin letters"),
        ("b\u0585b", "mixes Latin and Armenian letters"),
        ("alice太郎", "mixes Latin and CJK letters"),
        ("alice\u3164", "contains a blank-looking Hangul filler"),
        ("x\u0301\u0302\u0303\u0304", "has more than 3 combining marks in a row"),
        ("a" * 33, "has 33 characters (32 characters at most)"),
        ("", "is empty"),
        ("_alice", "must start with a letter or digit"),
        ("alice!", "contains the character '!' (U+0021)"),
        ("al ice", "contains the character U+0020 SPACE"),
        ("a\u200bb", "contains the character U+200B ZERO WIDTH SPACE"),
        ("a\x00b", "contains the character U+0000"),
        ("al\udc80ice", "contains the character U+DC80"),
    ],
)
def test_name_problem_says_why(raw: str, reason: str):
    """§4 name: each refusal of the predicate gets its own plain reason, also in the error."""
    assert p.name_problem(raw) == reason
    with pytest.raises(Refused) as info:
        p.parse_client_message({"type": "join", "name": raw})
    assert (info.value.code, info.value.message) == ("invalid_name", "the name " + reason)


def test_section_4_name_examples():
    """§4 name: every example the page gives, refused or fine, as the page says."""
    refused = ["\u0430lice", "\u13aalice", "b\u0585b", "alice\u3164", "x\u0301\u0302\u0303\u0304"]
    for raw in refused:
        assert p.valid_name(raw) is None, repr(raw)
    assert p.valid_name("ａｌｉｃｅ") == "alice"
    fine = ["Jos\u00e9", "Anna", "Анна", "राहुल", "太郎", "やまだ太郎", "김민준", "佐々木", "ルーク"]
    for raw in fine:
        assert p.valid_name(raw) == raw, raw
    assert p.valid_name("Jose\u0301") == "Jos\u00e9"


def test_name_key_casefolds_after_nfkc():
    """§4 name: names are compared after NFKC then str.casefold."""
    assert p.name_key("ALICE") == p.name_key("alice") == p.name_key("ａｌｉｃｅ") == "alice"
    assert p.name_key("ＡＬＩＣＥ") == "alice"
    assert p.name_key("Straße") == p.name_key("STRASSE")
    assert p.name_key("ΑΝΝΑ") == p.name_key("αννα")
    assert p.name_key("alice") != p.name_key("\u0430lice")


# --- §4 server -> client messages ---

FP = "SHA256:" + "A" * 43
WELCOME1 = {"type": "welcome", "name": "a", "users": [], "max_text": 1, "rate": 1}
MESSAGE1 = {"type": "message", "id": 1, "from": "a", "text": "t", "ts": 1}
SERVER_ROUND_TRIPS = [
    (
        p.welcome("bob", ["carol", "Alice", "émile", "Zed", "太郎"], 16384, 10),
        p.Welcome(
            "bob", ["Alice", "Zed", "carol", "émile", "太郎"], 16384, 10, features=p.FEATURES
        ),
    ),
    (
        p.welcome(
            "al",
            [],
            99,
            0,
            access="allowlist",
            identity=FP,
            op=True,
            features=("history",),
            max_record=65536,
            last_id=41,
            gap=True,
        ),
        p.Welcome("al", [], 99, 0, "allowlist", FP, True, ("history",), 65536, 41, True),
    ),
    (p.message(3, "al", "waves", 7, action=True), p.Message(3, "al", "waves", 7, action=True)),
    (p.message(4, "al", "old", 8, history=True), p.Message(4, "al", "old", 8, history=True)),
    (p.joined("bo", FP), p.Joined("bo", FP)),
    (p.left("bo", "kicked", by="op"), p.Left("bo", "kicked", "op")),
    (p.bye("banned", by="op", message="spam"), p.Bye("banned", "op", "spam")),
    (p.bye("kicked", by="op"), p.Bye("kicked", "op")),
    (
        p.bans([p.ban_entry("b", 5, "op", None), p.ban_entry("A", None, "op", "x")]),
        p.BanList([p.BanEntry("A", None, "op", "x"), p.BanEntry("b", 5, "op", None)]),
    ),
    (p.bans([]), p.BanList([])),
    (p.muted("op", 1234), p.Muted("op", 1234)),
    (p.muted("op", None, name="bo"), p.Muted("op", None, "bo")),
    (p.whois("bo", FP, False, 77), p.WhoisInfo("bo", FP, False, 77)),
    (p.whois("bo", None, True, 77, "::1"), p.WhoisInfo("bo", None, True, 77, "::1")),
    (
        p.message(1, "alice", "hi 😀", 1_700_000_000_000),
        p.Message(1, "alice", "hi 😀", 1_700_000_000_000),
    ),
    (p.direct(2, "alice", "bob", "psst", 5), p.DirectMessage(2, "alice", "bob", "psst", 5)),
    (p.joined("José"), p.Joined("José")),
    (p.left("bob", "timeout"), p.Left("bob", "timeout")),
    (p.users(["b", "B", "a", "Á"]), p.Users(["B", "a", "b", "Á"])),
    (p.pong(None), p.Pong(None)),
    (p.pong({"n": [1, "x"]}), p.Pong({"n": [1, "x"]})),
    (p.error("name_taken", "bob is taken"), p.Error("name_taken", "bob is taken")),
    (p.bye("shutdown"), p.Bye("shutdown")),
]


def test_server_messages_round_trip():
    """§4 server messages: constructor -> encode -> one record -> parse gives the dataclasses."""
    objs = [obj for obj, _ in SERVER_ROUND_TRIPS]
    plaintext = p.join_record([p.encode_message(obj) for obj in objs])
    decoded = p.decode_record(plaintext)
    assert decoded == objs
    assert [p.parse_server_message(o) for o in decoded] == [dc for _, dc in SERVER_ROUND_TRIPS]


def test_server_message_wire_bytes():
    """§4 server messages: field names on the wire as in the table (from, not sender)."""
    assert p.encode_message(p.message(1, "al", "hi", 5)) == (
        b'{"type":"message","id":1,"from":"al","text":"hi","ts":5}'
    )
    assert p.encode_message(p.direct(2, "al", "bo", "x", 6)) == (
        b'{"type":"dm","id":2,"from":"al","to":"bo","text":"x","ts":6}'
    )
    assert p.encode_message(p.welcome("bo", ["z", "a"], 100, 0)) == (
        b'{"type":"welcome","name":"bo","users":["a","z"],"max_text":100,"rate":0,'
        b'"access":"open","identity":null,"op":false,'
        b'"features":["identity","moderation","history","action"],'
        b'"max_record":1048576,"last_id":0,"gap":false}'
    )
    assert p.encode_message(p.pong(None)) == b'{"type":"pong","id":null}'
    assert p.encode_message(p.left("al", "slow")) == b'{"type":"left","name":"al","reason":"slow"}'


def test_revision_2_server_message_wire_bytes():
    """§5, §6: optional fields (action, history, by, message, name, address) appear only
    when set; joined always carries identity (null without one)."""
    enc = p.encode_message
    assert enc(p.message(1, "al", "hi", 5, action=True)) == (
        b'{"type":"message","id":1,"from":"al","text":"hi","ts":5,"action":true}'
    )
    assert enc(p.message(1, "al", "hi", 5, action=True, history=True)) == (
        b'{"type":"message","id":1,"from":"al","text":"hi","ts":5,"action":true,"history":true}'
    )
    assert enc(p.joined("al")) == b'{"type":"joined","name":"al","identity":null}'
    assert enc(p.left("al", "kicked", "op")) == (
        b'{"type":"left","name":"al","reason":"kicked","by":"op"}'
    )
    assert enc(p.bye("leave")) == b'{"type":"bye","reason":"leave"}'
    assert enc(p.bye("banned", "op", "spam")) == (
        b'{"type":"bye","reason":"banned","by":"op","message":"spam"}'
    )
    assert enc(p.bans([p.ban_entry("1.2.3.4", None, "op", None)])) == (
        b'{"type":"bans","bans":[{"who":"1.2.3.4","until":null,"by":"op","reason":null}]}'
    )
    assert enc(p.muted("op", 9)) == b'{"type":"muted","by":"op","until":9}'
    assert enc(p.muted("op", None, "al")) == b'{"type":"muted","by":"op","until":null,"name":"al"}'
    assert enc(p.whois("al", None, False, 3)) == (
        b'{"type":"whois","name":"al","identity":null,"op":false,"since":3}'
    )
    assert json.loads(enc(p.whois("al", None, False, 3, "10.0.0.1")))["address"] == "10.0.0.1"


def test_bans_sorted_by_who():
    """§5: bans lists its entries sorted by who (code point order)."""
    entries = [p.ban_entry(w, None, "op", None) for w in ["b", "SHA256:x", "10.0.0.2", "::1", "B"]]
    listed = [e["who"] for e in p.bans(entries)["bans"]]
    assert listed == ["10.0.0.2", "::1", "B", "SHA256:x", "b"]


def test_revision_1_welcome_gets_defaults():
    """§5, §6 (client side): a revision-1 server's welcome, without the new fields, parses
    with access open, no identity, not op, no features, R = 1 MiB, last_id 0, no gap."""
    obj = {"type": "welcome", "name": "al", "users": ["bo"], "max_text": 10, "rate": 3}
    assert p.parse_server_message(obj) == p.Welcome(
        "al", ["bo"], 10, 3, "open", None, False, (), 1_048_576, 0, False
    )
    old_message = {"type": "message", "id": 1, "from": "a", "text": "t", "ts": 1}
    assert p.parse_server_message(old_message) == p.Message(1, "a", "t", 1, False, False)
    assert p.parse_server_message({"type": "joined", "name": "a"}) == p.Joined("a", None)
    assert p.parse_server_message({"type": "bye", "reason": "leave"}) == p.Bye("leave")


@pytest.mark.parametrize("max_record", [65_536, 1_048_576, 100_000])
def test_welcome_max_record_in_range(max_record: int):
    """§1: the server's R is 65536..1048576, announced in welcome.max_record."""
    obj = p.welcome("al", [], 1, 1, max_record=max_record)
    assert p.parse_server_message(obj).max_record == max_record


def test_welcome_and_users_sorted_by_code_point():
    """§4: welcome.users and users.names are sorted by code point, not case-folded."""
    names = ["émile", "bob", "Bob", "alice", "Zoe", "太郎", "Анна", "1x"]
    expected = ["1x", "Bob", "Zoe", "alice", "bob", "émile", "Анна", "太郎"]
    assert p.welcome("me", names, 1, 1)["users"] == expected
    assert p.users(names)["names"] == expected
    assert names[0] == "émile"  # the caller's list is not reordered in place


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "message", "id": "1", "from": "a", "text": "t", "ts": 1},
        {"type": "message", "id": True, "from": "a", "text": "t", "ts": 1},
        {"type": "message", "id": 1.0, "from": "a", "text": "t", "ts": 1},
        {"type": "message", "id": 1, "from": None, "text": "t", "ts": 1},
        {"type": "message", "id": 1, "from": "a", "text": 3, "ts": 1},
        {"type": "message", "id": 1, "from": "a", "text": "t", "ts": False},
        {"type": "message", "id": 1, "from": "a", "text": "t"},
        {"type": "dm", "id": 1, "from": "a", "text": "t", "ts": 1},
        {"type": "dm", "id": 1, "from": "a", "to": ["b"], "text": "t", "ts": 1},
        {"type": "welcome", "name": "a", "users": "b", "max_text": 1, "rate": 1},
        {"type": "welcome", "name": "a", "users": ["b", 2], "max_text": 1, "rate": 1},
        {"type": "welcome", "name": "a", "users": [], "max_text": True, "rate": 1},
        {"type": "welcome", "name": "a", "users": [], "max_text": 1},
        {"type": "joined"},
        {"type": "joined", "name": 1},
        {"type": "left", "name": "a"},
        {"type": "users", "names": None},
        {"type": "users", "names": [None]},
        {"type": "error", "code": "x"},
        {"type": "error", "code": 1, "message": "m"},
        {"type": "bye", "reason": None},
        # revision 2: a wrongly typed optional field, null included, is not "absent"
        {**WELCOME1, "access": None},
        {**WELCOME1, "access": 1},
        {**WELCOME1, "identity": 5},
        {**WELCOME1, "op": None},
        {**WELCOME1, "op": 1},
        {**WELCOME1, "features": None},
        {**WELCOME1, "features": "history"},
        {**WELCOME1, "features": [1]},
        {**WELCOME1, "max_record": None},
        {**WELCOME1, "max_record": True},
        {**WELCOME1, "max_record": 65_535},
        {**WELCOME1, "max_record": 1_048_577},
        {**WELCOME1, "max_record": 0},
        {**WELCOME1, "last_id": None},
        {**WELCOME1, "last_id": "3"},
        {**WELCOME1, "gap": None},
        {**WELCOME1, "gap": 0},
        {**MESSAGE1, "action": None},
        {**MESSAGE1, "action": 1},
        {**MESSAGE1, "history": "true"},
        {"type": "joined", "name": "a", "identity": 1},
        {"type": "left", "name": "a", "reason": "kicked", "by": None},
        {"type": "left", "name": "a", "reason": "kicked", "by": 1},
        {"type": "bye", "reason": "kicked", "by": None},
        {"type": "bye", "reason": "kicked", "message": 5},
        {"type": "bans"},
        {"type": "bans", "bans": None},
        {"type": "bans", "bans": [None]},
        {"type": "bans", "bans": ["x"]},
        {"type": "bans", "bans": [{"who": "x", "until": None, "by": "op"}]},
        {"type": "bans", "bans": [{"who": "x", "by": "op", "reason": None}]},
        {"type": "bans", "bans": [{"who": 1, "until": None, "by": "op", "reason": None}]},
        {"type": "bans", "bans": [{"who": "x", "until": "1", "by": "op", "reason": None}]},
        {"type": "bans", "bans": [{"who": "x", "until": None, "by": None, "reason": None}]},
        {"type": "muted", "by": "op"},
        {"type": "muted", "until": 5},
        {"type": "muted", "by": "op", "until": True},
        {"type": "muted", "by": "op", "until": 5, "name": None},
        {"type": "whois", "name": "a", "identity": None, "op": False},
        {"type": "whois", "name": "a", "op": False, "since": 1},
        {"type": "whois", "name": "a", "identity": None, "op": 0, "since": 1},
        {"type": "whois", "name": "a", "identity": None, "op": False, "since": 1, "address": None},
    ],
)
def test_server_message_bad_field_is_bye_protocol(obj: dict[str, Any]):
    """§3/§4 (client side): a server message with a bad or missing field is a protocol error."""
    with pytest.raises(ByeProtocol):
        p.parse_server_message(obj)


def test_unknown_server_type_is_unknown():
    """§3: unknown messages from the server are not fatal; the client gets Unknown."""
    assert p.parse_server_message({"type": "typing", "name": "a"}) == p.Unknown("typing")
    assert p.parse_server_message({"type": ""}) == p.Unknown("")


@pytest.mark.parametrize(
    "text",
    ["😀 مرحبا שלום e\u0301", "\n\t\x00\x1b\x7f\x85\u2028\u2029", 'q"uo\\te</script>', "\ufeff"],
)
def test_encode_message_text_round_trips_exactly(text: str):
    """§3: message text (emoji, RTL, controls) survives encode -> decode exactly."""
    body = p.encode_message(p.message(9, "al", text, 1))
    assert p.parse_server_message(p.decode_record(p.join_record([body]))[0]).text == text


def test_encode_message_is_compact_utf8():
    """§3: plaintexts are UTF-8 JSON: non-ASCII is sent as UTF-8, not \\u escapes; no spaces."""
    body = p.encode_message(p.message(1, "José", "😀 مرحبا", 2))
    assert "😀 مرحبا".encode() in body
    assert "José".encode() in body
    assert b"\\u" not in body
    assert b", " not in body and b": " not in body
    assert body.decode("utf-8")


# --- fuzz: parse it or raise a ProtocolError, nothing else ---

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=()), max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=()), max_size=6), inner, max_size=4
        )
    ),
    max_leaves=6,
)
ANY_TYPE = st.text(st.characters(exclude_categories=()), max_size=8)
TEXTS = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=30),
    st.text(st.sampled_from(["a", "é", "😀", "\n", "\x1b", "\x85", "\ud800"]), max_size=30),
    JSON_VALUES,
)
INTS = st.integers(-(2**40), 2**40) | JSON_SCALARS
B64S = st.binary(max_size=70).map(b64) | TEXTS
CLIENT_MESSAGES = st.fixed_dictionaries(
    {"type": st.sampled_from(p.CLIENT_TYPES) | ANY_TYPE},
    optional={
        "text": TEXTS,
        "to": TEXTS,
        "name": TEXTS,
        "id": JSON_VALUES,
        "identity": B64S,
        "proof": B64S,
        "history": INTS,
        "since": INTS,
        "action": JSON_SCALARS,
        "reason": TEXTS,
        "minutes": st.integers(-2, 525_602) | INTS,
        "who": TEXTS,
    },
)
SERVER_MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "dm"])},
        optional={
            "id": INTS,
            "from": TEXTS,
            "to": TEXTS,
            "text": TEXTS,
            "ts": INTS,
            "action": JSON_SCALARS,
            "history": JSON_SCALARS,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("welcome")},
        optional={
            "name": TEXTS,
            "users": st.lists(TEXTS, max_size=3) | JSON_VALUES,
            "max_text": INTS,
            "rate": INTS,
            "access": TEXTS,
            "identity": TEXTS,
            "op": JSON_SCALARS,
            "features": st.lists(TEXTS, max_size=3) | JSON_VALUES,
            "max_record": st.integers(65_535, 1_048_577) | INTS,
            "last_id": INTS,
            "gap": JSON_SCALARS,
        },
    ),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["joined", "left", "users", "pong", "error", "bye", "muted", "whois"]
            )
            | ANY_TYPE
        },
        optional={
            "name": TEXTS,
            "reason": TEXTS,
            "names": st.lists(TEXTS, max_size=3) | JSON_VALUES,
            "id": JSON_VALUES,
            "code": TEXTS,
            "message": TEXTS,
            "identity": TEXTS,
            "by": TEXTS,
            "until": INTS,
            "op": JSON_SCALARS,
            "since": INTS,
            "address": TEXTS,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("bans")},
        optional={
            "bans": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={"who": TEXTS, "until": INTS, "by": TEXTS, "reason": TEXTS},
                )
                | JSON_VALUES,
                max_size=3,
            )
            | JSON_VALUES
        },
    ),
)
JSONISH = st.text(st.sampled_from(list('[]{}",:0123456789.eE+-truefalsnNI \\u\n')), max_size=60)


@FUZZ
@given(data=st.binary(max_size=200) | JSONISH.map(str.encode))
def test_fuzz_decoders_raise_only_protocol_errors(data: bytes):
    """h11 invariant for §1-§3: decoders parse or raise a ProtocolError, nothing else."""
    for decode in (p.decode_record, p.parse_key, p.parse_hello):
        try:
            decode(data)
        except ProtocolError:
            pass
    decoder = p.FrameDecoder(64)
    decoder.feed(data)
    try:
        bodies = drain(decoder)
    except CloseSilently:
        return
    assert b"".join(frame(b) for b in bodies) == data[: len(data) - decoder.buffered]


@FUZZ
@given(objs=st.lists(CLIENT_MESSAGES, min_size=1, max_size=3))
def test_fuzz_client_messages_raise_only_refused(objs: list[dict[str, Any]]):
    """§4: for any decoded record, message_type + parse_client_message raise only Refused."""
    plaintext = json.dumps(objs).encode()  # ensure_ascii keeps lone surrogates as \\u escapes
    for obj in p.decode_record(plaintext):
        try:
            p.message_type(obj)
            msg = p.parse_client_message(obj, max_text=20)
        except Refused as exc:
            assert exc.code in p.ERROR_CODES
            continue
        if isinstance(msg, (p.Say, p.Dm)):
            assert msg.text and len(msg.text.encode("utf-8")) <= 20
            assert not any(p.is_forbidden_char(ch) for ch in msg.text)  # C0, DEL, C1, surrogate
        if isinstance(msg, p.Join):
            assert p.valid_name(msg.name) == msg.name
            assert (msg.identity is None) == (msg.proof is None)
            assert msg.identity is None or (len(msg.identity), len(msg.proof)) == (32, 64)
            for count in (msg.history, msg.since):
                assert count is None or (type(count) is int and count >= 0)
        if isinstance(msg, p.Say):
            assert type(msg.action) is bool
        if isinstance(msg, p.Ping):  # what the server echoes in pong must encode
            assert json.loads(p.encode_message(p.pong(msg.id)))["id"] == msg.id
        if isinstance(msg, (p.Kick, p.Ban)) and msg.reason is not None:
            assert 1 <= len(msg.reason.encode("utf-8")) <= 200
            assert not any(p.is_forbidden_char(ch) for ch in msg.reason)
        if isinstance(msg, (p.Ban, p.Mute)) and msg.minutes is not None:
            assert type(msg.minutes) is int
            assert (1 if isinstance(msg, p.Ban) else 0) <= msg.minutes <= 525_600
        for field in ("name", "to", "who"):  # the names a request carries are valid strings
            value = getattr(msg, field, "")
            assert isinstance(value, str) and not p.has_lone_surrogate(value)


@FUZZ
@given(objs=st.lists(SERVER_MESSAGES, min_size=1, max_size=3))
def test_fuzz_server_messages_raise_only_bye_protocol(objs: list[dict[str, Any]]):
    """§3/§4 (client side): parse_server_message parses or raises ByeProtocol, nothing else."""
    for obj in p.decode_record(json.dumps(objs).encode()):
        try:
            p.parse_server_message(obj)
        except ByeProtocol:
            pass


# --- codec round trip: every valid client message survives encode -> record -> decode ---

VALID_TEXTS = st.text(
    st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from(["\n", "\t"]),
    min_size=1,
    max_size=40,
)
VALID_NAMES = st.sampled_from(["alice", "José", "Jose\u0301", "राहुल", "太郎", "Анна", "x_1.-"]) | (
    st.text(st.sampled_from("abcXYZ019_-.é"), min_size=1, max_size=32).filter(
        lambda name: p.valid_name(name) == name
    )
)
VALID_REASONS = st.none() | VALID_TEXTS
COUNTS = st.none() | st.integers(0, 2**62)
VALID_CLIENT_MESSAGES = st.one_of(
    VALID_NAMES.map(lambda name: p.Join(p.valid_name(name))),
    st.builds(
        lambda name, pair, history, since: p.Join(p.valid_name(name), *pair, history, since),
        VALID_NAMES,
        st.just((None, None))
        | st.tuples(st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64)),
        COUNTS,
        COUNTS,
    ),
    VALID_TEXTS.map(p.Say),
    st.builds(p.Say, VALID_TEXTS, st.booleans()),
    st.builds(p.Dm, to=VALID_NAMES, text=VALID_TEXTS),
    st.just(p.Who()),
    st.just(p.Leave()),
    (st.none() | st.booleans() | st.integers(-(2**60), 2**60) | VALID_TEXTS).map(p.Ping),
    st.builds(p.Kick, VALID_NAMES, VALID_REASONS),
    st.builds(p.Ban, VALID_NAMES, st.none() | st.integers(1, 525_600), VALID_REASONS),
    st.builds(p.Unban, VALID_TEXTS),
    st.builds(p.Mute, VALID_NAMES, st.integers(0, 525_600)),
    st.just(p.Bans()),
    st.builds(p.Whois, VALID_NAMES),
)


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(VALID_CLIENT_MESSAGES, min_size=1, max_size=5))
def test_client_messages_round_trip_through_a_record(msgs: list[p.ClientMessage]):
    """§3/§4: a record of valid client messages decodes to exactly those messages."""
    plaintext = p.join_record([p.encode_client_message(m) for m in msgs])
    decoded = []
    for obj in p.decode_record(plaintext):
        p.message_type(obj)
        decoded.append(p.parse_client_message(obj))
    assert decoded == msgs


# --- the server's byte builders equal the dict builders, byte for byte ---

_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_names = st.lists(_texts, max_size=6, unique=True)
_ints = st.integers(0, 2**53)


@settings(max_examples=200)
@given(
    name=_texts,
    others=_names,
    text=_texts,
    to=_texts,
    msg_id=_ints,
    ts=_ints,
    identity=st.none() | _texts,
    by=st.none() | _texts,
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    access=st.sampled_from(p.ACCESS_MODES),
    features=st.lists(st.sampled_from(p.FEATURES), unique=True).map(tuple),
    max_record=st.integers(65_536, 1_048_576),
)
def test_byte_builders_equal_encode_message_of_the_dict_builders(
    name: str,
    others: list[str],
    text: str,
    to: str,
    msg_id: int,
    ts: int,
    identity: str | None,
    by: str | None,
    flags: tuple[bool, bool, bool],
    access: str,
    features: tuple[str, ...],
    max_record: int,
) -> None:
    """The server writes these messages with the byte builders: any drift from the
    dict builders (field order, spacing, escaping, optional fields) fails here."""
    js = p.json_string
    op, gap, action = flags
    id_json = b"null" if identity is None else js(identity)
    ordered = sorted(others)  # the server keeps its list in this order
    assert p.encode_welcome(js(name), [js(n) for n in ordered], 4096, 10) == p.encode_message(
        p.welcome(name, others, 4096, 10)
    )
    assert p.encode_welcome(
        js(name),
        [js(n) for n in ordered],
        16384,
        0,
        access=access,
        identity=id_json,
        op=op,
        features=features,
        max_record=max_record,
        last_id=msg_id,
        gap=gap,
    ) == p.encode_message(
        p.welcome(
            name,
            others,
            16384,
            0,
            access=access,
            identity=identity,
            op=op,
            features=features,
            max_record=max_record,
            last_id=msg_id,
            gap=gap,
        )
    )
    head, tail = p.encode_message_parts(js(name), js(text), ts)
    assert b"%s%d%s" % (head, msg_id, tail) == p.encode_message(p.message(msg_id, name, text, ts))
    head, tail = p.encode_message_parts(js(name), js(text), ts, action=action)
    kept = b"%s%d%s" % (head, msg_id, tail)
    assert kept == p.encode_message(p.message(msg_id, name, text, ts, action=action))
    assert p.mark_history(kept) == p.encode_message(
        p.message(msg_id, name, text, ts, action=action, history=True)
    )
    assert p.encode_direct(msg_id, js(name), js(to), js(text), ts) == p.encode_message(
        p.direct(msg_id, name, to, text, ts)
    )
    assert p.encode_joined(js(name)) == p.encode_message(p.joined(name))
    assert p.encode_joined(js(name), id_json) == p.encode_message(p.joined(name, identity))
    for reason in p.LEAVE_REASONS:
        assert p.encode_left(js(name), reason) == p.encode_message(p.left(name, reason))
        by_json = None if by is None else js(by)
        assert p.encode_left(js(name), reason, by_json) == p.encode_message(
            p.left(name, reason, by)
        )
    assert p.encode_left(js(name), to) == p.encode_message(p.left(name, to))  # any reason
    assert p.encode_users([js(n) for n in ordered]) == p.encode_message(p.users(others))


def test_mark_history_takes_one_object():
    """§6: mark_history adds "history": true to one stored message object, and refuses
    anything else (a batch's trailing comma) instead of writing bad JSON."""
    head, tail = p.encode_message_parts(b'"al"', b'"hi"', 5)
    entry = head + b"7" + tail
    assert json.loads(p.mark_history(entry)) == {**json.loads(entry), "history": True}
    assert p.parse_server_message(json.loads(p.mark_history(entry))).history
    with pytest.raises(ValueError):
        p.mark_history(entry + b",")
