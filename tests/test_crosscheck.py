"""Cross-checks of crypto_utils.py (pycryptodome) against tests/refpeer.py (cryptography), and
of the real server against the independent client.

Two implementations written apart must agree byte for byte on every
cryptographic choice of PROTOCOL.md §2, §3 and §5, in both directions; and the
reference peer, written from PROTOCOL.md alone, must do all of §5 and §6
against server.py, checking the shape of every message it receives.
"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import refpeer
from Crypto.PublicKey import ECC, RSA
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from refpeer import (
    RefError,
    RefIdentity,
    RefRecordCipher,
    fingerprint_of,
    make_key_message,
    server_accept_key,
)
from rev2kit import ask, assert_recent, code_of, presence, room_of

import crypto_utils as cu

P25519 = 2**255 - 19
# RFC 7748 / cr.yp.to: u-coordinates of small order (and their non-canonical encodings).
LOW_ORDER_U = {
    "zero": 0,
    "one": 1,
    "order 8 (a)": 325606250916557431795983626356110631294008115727848805560023387167927233504,
    "order 8 (b)": 39382357235489614581723060781553021112529911719440698176882885853963445705823,
    "p - 1": P25519 - 1,
    "p": P25519,
    "p + 1": P25519 + 1,
    "2^255 (high bit, masked to 0)": 2**255,
}


@pytest.fixture(scope="module")
def ref_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def pem(ref_key: rsa.RSAPrivateKey) -> bytes:
    return ref_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def cu_key(pem: bytes) -> RSA.RsaKey:
    return RSA.import_key(pem)


@pytest.fixture(scope="module")
def spki(ref_key: rsa.RSAPrivateKey) -> bytes:
    return ref_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def x25519_public(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def oaep(hash_: hashes.HashAlgorithm) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


# --- §2 server identity -----------------------------------------------------------------------


def test_spki_der_is_the_same_der(cu_key: RSA.RsaKey, spki: bytes) -> None:
    """§2 hello.key: DER SubjectPublicKeyInfo, byte-identical in both implementations."""
    assert cu.spki_der(cu_key) == spki


def test_fingerprint_agrees(cu_key: RSA.RsaKey, spki: bytes) -> None:
    """§2 Server identity: "SHA256:" + unpadded b64(SHA256(SPKI DER)) agrees."""
    assert cu.fingerprint(spki) == fingerprint_of(spki)
    assert cu.fingerprint(cu.spki_der(cu_key)) == fingerprint_of(spki)
    assert cu.fingerprint(b"") == fingerprint_of(b"")


# --- §2 handshake, both directions ------------------------------------------------------------


def test_refpeer_key_accepted_by_crypto_utils(cu_key: RSA.RsaKey, spki: bytes) -> None:
    """§2: a key built by refpeer is unwrapped, exchanged and derived to the same keys."""
    server_nonce = os.urandom(32)
    server_eph = cu.Ephemeral()
    server_eph_public = server_eph.public
    hello = {
        "type": "hello",
        "protocol": "bcast/1",
        "key": b64(cu.spki_der(cu_key)),
        "nonce": b64(server_nonce),
        "eph": b64(server_eph_public),
    }
    secret = os.urandom(32)
    key_msg, k_c2s, k_s2c = make_key_message(hello, secret=secret)
    client_nonce = base64.b64decode(key_msg["nonce"])
    client_eph = base64.b64decode(key_msg["eph"])

    assert cu.unwrap_secret(cu_key, base64.b64decode(key_msg["secret"])) == secret
    dh = server_eph.exchange(client_eph)
    keys = cu.derive_keys(
        secret, dh, server_nonce, client_nonce, spki, server_eph_public, client_eph
    )
    assert keys == (k_c2s, k_s2c)


def test_crypto_utils_key_accepted_by_refpeer(pem: bytes, spki: bytes) -> None:
    """§2: a key built by crypto_utils is accepted by refpeer's server side, same keys."""
    server_nonce, server_eph_private = os.urandom(32), os.urandom(32)
    server_eph_public = x25519_public(server_eph_private)
    secret, client_nonce = os.urandom(32), os.urandom(32)
    wrapped = cu.wrap_secret(spki, secret)
    eph = cu.Ephemeral()
    client_eph = eph.public
    dh = eph.exchange(server_eph_public)
    keys = cu.derive_keys(
        secret, dh, server_nonce, client_nonce, spki, server_eph_public, client_eph
    )
    key_msg = {
        "type": "key",
        "nonce": b64(client_nonce),
        "secret": b64(wrapped),
        "eph": b64(client_eph),
    }
    assert server_accept_key(pem, server_nonce, server_eph_private, key_msg) == (secret, *keys)


def test_derive_keys_agree_on_fixed_inputs(spki: bytes) -> None:
    """§2 Session keys: both HKDF-SHA256 derivations give identical okm split c2s/s2c."""
    args = [os.urandom(32) for _ in range(6)]
    secret, dh, sn, cn, se, ce = args
    assert cu.derive_keys(secret, dh, sn, cn, spki, se, ce) == refpeer.derive_keys(
        secret, dh, sn, cn, spki, se, ce
    )


def test_ephemeral_matches_rfc7748(spki: bytes) -> None:
    """§2: X25519 as in RFC 7748; same private bytes give the same public key and dh."""
    for _ in range(8):
        a_private, b_private = os.urandom(32), os.urandom(32)
        ours = cu.Ephemeral(a_private)
        assert ours.public == x25519_public(a_private)
        expected = X25519PrivateKey.from_private_bytes(a_private).exchange(
            X25519PublicKey.from_public_bytes(x25519_public(b_private))
        )
        assert ours.exchange(x25519_public(b_private)) == expected


def test_ephemeral_rfc7748_vector() -> None:
    """§2: RFC 7748 §6.1 test vector (Alice's private key, Bob's public key, shared K)."""
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    eph = cu.Ephemeral(alice)
    assert eph.public == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert eph.exchange(bob_public) == shared


def test_oaep_parameters(cu_key: RSA.RsaKey, ref_key: rsa.RSAPrivateKey, spki: bytes) -> None:
    """§2 key: RSA-OAEP with SHA-256 as hash and MGF1 hash, empty label, both ways."""
    secret = os.urandom(32)
    wrapped = cu.wrap_secret(spki, secret)
    assert ref_key.decrypt(wrapped, oaep(hashes.SHA256())) == secret
    public = ref_key.public_key()
    assert cu.unwrap_secret(cu_key, public.encrypt(secret, oaep(hashes.SHA256()))) == secret
    # SHA-1 OAEP (pycryptodome's default) must not be accepted.
    with pytest.raises(cu.CryptoError):
        cu.unwrap_secret(cu_key, public.encrypt(secret, oaep(hashes.SHA1())))
    # A non-empty label must not be accepted either.
    labelled = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label=b"x")
    with pytest.raises(cu.CryptoError):
        cu.unwrap_secret(cu_key, public.encrypt(secret, labelled))


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_unwrap_refuses_wrong_secret_size(
    cu_key: RSA.RsaKey, ref_key: rsa.RSAPrivateKey, size: int
) -> None:
    """§2: the server closes on a secret that does not decrypt to exactly 32 bytes."""
    wrapped = ref_key.public_key().encrypt(os.urandom(size), oaep(hashes.SHA256()))
    with pytest.raises(cu.CryptoError):
        cu.unwrap_secret(cu_key, wrapped)


@pytest.mark.parametrize("name", sorted(LOW_ORDER_U))
def test_low_order_point_refused_by_crypto_utils(name: str) -> None:
    """§2: an X25519 result of all zeros (a low-order point) makes the server close."""
    peer_public = LOW_ORDER_U[name].to_bytes(32, "little")
    with pytest.raises(cu.CryptoError):
        cu.Ephemeral().exchange(peer_public)


@pytest.mark.parametrize("name", sorted(LOW_ORDER_U))
def test_low_order_point_refused_by_refpeer(name: str, pem: bytes, spki: bytes) -> None:
    """§2: both implementations refuse the same low-order client eph."""
    secret = os.urandom(32)
    key_msg = {
        "type": "key",
        "nonce": b64(os.urandom(32)),
        "secret": b64(cu.wrap_secret(spki, secret)),
        "eph": b64(LOW_ORDER_U[name].to_bytes(32, "little")),
    }
    with pytest.raises(RefError):
        server_accept_key(pem, os.urandom(32), os.urandom(32), key_msg)


# --- §3 records ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 1, 255, 2**32 - 5])
def test_records_interoperate(start: int) -> None:
    """§3: AES-256-GCM, nonce 0x00000000 || u64be(seq), no AAD: identical bytes both ways."""
    key = os.urandom(32)
    cu_tx, ref_rx = cu.RecordCipher(key, start), RefRecordCipher(key, start)
    ref_tx, cu_rx = RefRecordCipher(key, start), cu.RecordCipher(key, start)
    for i in range(4):  # up to seq 2**32 - 2, the last one a side may send
        plaintext = f'[{{"type":"say","text":"record {i}"}}]'.encode()
        record = cu_tx.seal(plaintext)
        assert record == RefRecordCipher(key, start + i).seal(plaintext)
        assert ref_rx.open(record) == plaintext
        assert cu_rx.open(ref_tx.seal(plaintext)) == plaintext
    assert cu_tx.seq == ref_rx.seq == ref_tx.seq == cu_rx.seq == start + 4


def test_crypto_utils_refuses_bad_records_without_advancing() -> None:
    """§3: tampered, replayed, reordered or wrong-key records fail and seq stays put."""
    key = os.urandom(32)
    ref_tx = RefRecordCipher(key)
    first, second = ref_tx.seal(b'[{"type":"who"}]'), ref_tx.seal(b'[{"type":"ping"}]')
    rx = cu.RecordCipher(key)
    tampered = bytearray(first)
    tampered[0] ^= 1
    bad_tag = first[:-1] + bytes([first[-1] ^ 1])
    for bad in (bytes(tampered), bad_tag, second, first[:15], first[:-1], b""):
        with pytest.raises(cu.CryptoError):
            rx.open(bad)
        assert rx.seq == 0
    with pytest.raises(cu.CryptoError):
        cu.RecordCipher(os.urandom(32)).open(first)
    assert rx.open(first) == b'[{"type":"who"}]'
    with pytest.raises(cu.CryptoError):
        rx.open(first)  # replayed
    assert rx.seq == 1
    assert rx.open(second) == b'[{"type":"ping"}]'


def test_session_records_flow_both_ways(cu_key: RSA.RsaKey, spki: bytes) -> None:
    """§2+§3: keys from a mixed handshake open each other's records in each direction."""
    server_nonce, server_eph = os.urandom(32), cu.Ephemeral()
    server_eph_public = server_eph.public
    hello = {
        "type": "hello",
        "protocol": "bcast/1",
        "key": b64(spki),
        "nonce": b64(server_nonce),
        "eph": b64(server_eph_public),
    }
    key_msg, k_c2s, k_s2c = make_key_message(hello)
    secret = cu.unwrap_secret(cu_key, base64.b64decode(key_msg["secret"]))
    s_c2s, s_s2c = cu.derive_keys(
        secret,
        server_eph.exchange(base64.b64decode(key_msg["eph"])),
        server_nonce,
        base64.b64decode(key_msg["nonce"]),
        spki,
        server_eph_public,
        base64.b64decode(key_msg["eph"]),
    )
    join = b'[{"type":"join","name":"ann"}]'
    assert cu.RecordCipher(s_c2s).open(RefRecordCipher(k_c2s).seal(join)) == join
    welcome = b'[{"type":"welcome","name":"ann","users":[],"max_text":16384,"rate":10}]'
    assert RefRecordCipher(k_s2c).open(cu.RecordCipher(s_s2c).seal(welcome)) == welcome
    # And never across directions.
    with pytest.raises(cu.CryptoError):
        cu.RecordCipher(s_s2c).open(RefRecordCipher(k_c2s).seal(join))


def test_hash_of_spki_in_info(spki: bytes) -> None:
    """§2 Session keys: info binds SHA256(server SPKI DER); another SPKI gives other keys."""
    args = [os.urandom(32) for _ in range(2)]
    other = hashlib.sha256(b"other").digest()
    a = cu.derive_keys(*args, b"n" * 32, b"c" * 32, spki, b"s" * 32, b"e" * 32)
    b = cu.derive_keys(*args, b"n" * 32, b"c" * 32, other, b"s" * 32, b"e" * 32)
    assert a != b
    assert b == refpeer.derive_keys(*args, b"n" * 32, b"c" * 32, other, b"s" * 32, b"e" * 32)


# --- §5 client identity -------------------------------------------------------------------------


def test_identity_transcript_agrees(spki: bytes) -> None:
    """§5 Proof: both build label || SHA256(SPKI) || nonces || ephs identically."""
    values = [os.urandom(32) for _ in range(4)]
    assert cu.identity_transcript(spki, *values) == refpeer.identity_transcript(spki, *values)


def test_identity_keys_and_signatures_agree() -> None:
    """§5: the same seed gives the same raw public key, fingerprint and (deterministic,
    pure Ed25519) signature in both; each verifies the other's."""
    for _ in range(4):
        seed, transcript = os.urandom(32), os.urandom(176)
        cu_key, ref = ECC.construct(curve="Ed25519", seed=seed), RefIdentity.from_seed(seed)
        assert cu.identity_public(cu_key) == ref.public
        assert cu.identity_fingerprint(ref.public) == ref.fingerprint
        signature = cu.sign_identity(cu_key, transcript)
        assert signature == ref.sign(transcript)
        assert refpeer.verify_identity(ref.public, signature, transcript)
        assert cu.verify_identity(ref.public, ref.sign(transcript), transcript)


def test_small_order_sets_agree() -> None:
    """§5: the small-order keys crypto_utils refuses are the torsion points refpeer derives."""
    assert set(refpeer.small_order_points()) == cu.ED25519_SMALL_ORDER


def _verify_corpus() -> list[tuple[str, bytes, bytes, bytes]]:
    """(case, public, signature, transcript): good and bad proofs, each named."""
    ident = RefIdentity()
    t = os.urandom(176)
    sig = ident.sign(t)
    s = int.from_bytes(sig[32:], "little")
    p = refpeer.ED_P
    cases = [("genuine", ident.public, sig, t), ("other transcript", ident.public, sig, t[1:])]
    cases += [
        ("tampered R", ident.public, bytes([sig[0] ^ 1]) + sig[1:], t),
        ("tampered S", ident.public, sig[:32] + bytes([sig[32] ^ 1]) + sig[33:], t),
        ("S + L", ident.public, sig[:32] + (s + refpeer.ED_L).to_bytes(32, "little"), t),
        ("S = L", ident.public, sig[:32] + refpeer.ED_L.to_bytes(32, "little"), t),
        ("S = 2^256 - 1", ident.public, sig[:32] + b"\xff" * 32, t),
        ("short key", ident.public[:31], sig, t),
        ("long key", ident.public + b"\0", sig, t),
        ("short proof", ident.public, sig[:63], t),
        ("long proof", ident.public, sig + b"\0", t),
        ("off the curve", (2).to_bytes(32, "little"), sig, t),
        ("random proof", ident.public, os.urandom(64), t),
    ]
    for enc in refpeer.small_order_points():
        cases.append((f"small order {enc.hex()[:8]}", enc, refpeer.degenerate_proof(), t))
    for y, sign in ((p, 0), (p + 1, 0), (1, 1), (p - 1, 1), (p + 3, 0), (p + 4, 1)):
        key = (y | sign << 255).to_bytes(32, "little")
        shown = f"p+{y - p}" if y >= p else str(y)
        cases.append((f"non-canonical y={shown} sign={sign}", key, refpeer.degenerate_proof(), t))
        cases.append((f"non-canonical y={shown} sign={sign}, a genuine proof", key, sig, t))
    return cases


def test_verify_identity_agrees() -> None:
    """§5: both verifiers accept the genuine proof and refuse every bad one alike (sizes,
    S >= L, small-order and non-canonical keys, points off the curve, wrong transcript)."""
    for case, public, signature, transcript in _verify_corpus():
        expected = case == "genuine"
        assert refpeer.verify_identity(public, signature, transcript) is expected, case
        assert cu.verify_identity(public, signature, transcript) is expected, case


# --- the independent client does all of §5 and §6 against the real server ----------------------


def test_independent_client_does_section_5(run_server, tmp_path) -> None:
    """§5 end to end with the reference peer: identity proof, welcome/joined fields, whois,
    mute and its lifting, kick, ban by identity and by address, bans, unban, binding and
    take-over; every message it receives has §4-§6's shape."""
    op_id, bob_id = RefIdentity(), RefIdentity()
    with run_server(ops=(op_id.fingerprint,)) as srv, room_of(srv) as r:
        op, welcome = r.join("op", op_id)
        assert (welcome["identity"], welcome["op"], welcome["access"]) == (
            op_id.fingerprint,
            True,
            "open",
        )
        bob, welcome = r.join("bob", bob_id, source="127.0.0.2")
        assert (welcome["identity"], welcome["op"]) == (bob_id.fingerprint, False)
        carol, _ = r.join("carol", source="127.0.0.3")
        assert presence(op.sync()) == [("joined", "bob", None), ("joined", "carol", None)]
        bob.sync()
        # whois: fingerprint for all, address for operators only
        about = ask(carol, {"type": "whois", "name": "bob"})
        assert about["identity"] == bob_id.fingerprint and "address" not in about
        assert_recent(about["since"])
        assert ask(op, {"type": "whois", "name": "carol"})["address"] == "127.0.0.3"
        # mute and lift
        assert ask(op, {"type": "mute", "name": "bob", "minutes": 1})["name"] == "bob"
        assert bob.recv()["type"] == "muted"
        assert code_of(ask(bob, {"type": "say", "text": "x"})) == "muted"
        assert ask(op, {"type": "mute", "name": "bob", "minutes": 0})["until"] is None
        assert bob.recv() == {"type": "muted", "by": "op", "until": None}
        # take-over: bob reconnects with his identity before the server saw the old one go
        bob2, _ = r.join("bob", bob_id, source="127.0.0.3")
        assert bob.wait_closed(5)[-1] == {"type": "bye", "reason": "replaced"}
        assert carol.sync() == []
        # kick, then ban by identity and by address
        op.send({"type": "kick", "name": "bob", "reason": "cool off"})
        assert bob2.wait_closed(5)[-1]["message"] == "cool off"
        bob3, _ = r.join("bob", bob_id)
        op.send({"type": "ban", "name": "bob", "minutes": 60})
        assert bob3.wait_closed(5)[-1]["reason"] == "banned"
        op.send({"type": "ban", "name": "carol", "reason": "spam"})
        assert carol.wait_closed(5)[-1] == {
            "type": "bye",
            "reason": "banned",
            "by": "op",
            "message": "spam",
        }
        bans = ask(op, {"type": "bans"})["bans"]
        assert [b["who"] for b in bans] == sorted(["127.0.0.3", bob_id.fingerprint])
        after = ask(op, {"type": "unban", "who": "127.0.0.3"})["bans"]
        assert [b["who"] for b in after] == [bob_id.fingerprint]
        assert r.join("carol", source="127.0.0.3")[1]["name"] == "carol"
        assert r.connect().join("bob")["code"] == "name_reserved"  # the binding stays


def test_independent_client_does_section_6(run_server) -> None:
    """§6 end to end with the reference peer: actions, history on request after welcome,
    resume with since, last_id and gap; every message it receives has the right shape."""
    with run_server(history=5) as srv, room_of(srv) as r:
        ann, _ = r.join("ann")
        bob, _ = r.join("bob")
        ann.sync()
        ann.send({"type": "say", "text": "waves", "action": True})
        first = bob.recv()
        assert first["action"] is True
        seen = bob.max_id_seen
        bob.close()
        ann.send(*[{"type": "say", "text": f"m{i}"} for i in range(3)])
        carol, _ = r.join("carol")
        ann.sync()
        carol.send({"type": "say", "text": "mark"})
        assert ann.recv()["text"] == "mark"
        back, welcome = r.join("bob2", since=seen)
        replay = back.sync()
        assert [m["text"] for m in replay] == ["m0", "m1", "m2", "mark"]
        assert all(m["history"] is True for m in replay)
        assert (welcome["last_id"], welcome["gap"]) == (replay[-1]["id"], False)
        late, welcome = r.join("dave", history=2)
        assert [m["text"] for m in late.sync()] == ["m2", "mark"]
        assert welcome["gap"] is False
        again, welcome = r.join("erin", since=0, history=1)
        assert [m["text"] for m in again.sync()] == ["mark"] and welcome["gap"] is True
        fay, _ = r.join("fay", history=5)
        assert fay.sync()[0]["action"] is True  # the action survives in history
