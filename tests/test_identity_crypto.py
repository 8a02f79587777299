"""Unit tests of the client identity in crypto_utils.py against PROTOCOL.md §5.

Known answers come from RFC 8032 §7.1; `cryptography` (OpenSSL) is the
independent second Ed25519; the points of small order and the crafted
signatures are computed with the small pure-Python Edwards arithmetic of the
independent peer (tests/refpeer.py, RFC 8032 §5.1), which shares nothing with
pycryptodome.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import eddsa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from netutil import run_in_threads
from refpeer import ED_L, ED_NEUTRAL, ED_P, ed_add, ed_decode, ed_encode, ed_mul

import _fastcrypto as fc
import crypto_utils as c
from crypto_utils import CryptoError, KeyFileError

FAST = pytest.mark.skipif(c.PUBLIC_CRYPTO, reason="BCAST_PUBLIC_CRYPTO=1 turns fast paths off")

# --- RFC 8032 §5.1 by hand: tests/refpeer.py's Edwards arithmetic (X, Y, Z, T) ---

P, L, NEUTRAL = ED_P, ED_L, ED_NEUTRAL
add, mul, encode, decode = ed_add, ed_mul, ed_encode, ed_decode


def neg(p: tuple) -> tuple:
    return (-p[0] % P, p[1], p[2], -p[3] % P)


BASE = decode(c.ED25519_BASE)


def challenge(r: bytes, public: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + public + message).digest(), "little") % L


def equation_holds(public: bytes, signature: bytes, message: bytes) -> bool:
    """The three raw equations (both fast paths and the public API), which know nothing
    of the policy."""
    outcomes = {fc.ed25519_verify_held(public, signature, message)}
    outcomes.add(fc.ed25519_verify(public, signature, message))
    outcomes.add(c._ed25519_verify_standard(public, signature, message))
    assert len(outcomes) == 1
    return outcomes.pop()


# RFC 8032 7.1, tests 1-3: secret key, public key, message, signature.
RFC8032 = [
    tuple(bytes.fromhex(x) for x in vector)
    for vector in (
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
            "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    )
]


def their_verdict(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def secret_scalar(seed: bytes) -> int:
    """RFC 8032 5.1.5: the clamped scalar a of a secret key."""
    a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    return (a & ((1 << 254) - 8)) | (1 << 254)


# --- the identity key file ---


def test_identity_file_is_an_ed25519_pem_created_0600(tmp_path: Path):
    """§5: the private key is kept like the server's: a PEM file created with mode 0600
    whatever the umask, and the same key on the next start."""
    path = tmp_path / "identity.pem"
    old = os.umask(0)
    try:
        key = c.load_or_create_identity(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    theirs = load_pem_private_key(path.read_bytes(), password=None)  # unencrypted PEM
    assert isinstance(theirs, Ed25519PrivateKey)
    public = theirs.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert c.identity_public(key) == public
    assert c.identity_public(c.load_or_create_identity(path)) == public


def pem_of(kind: str) -> bytes:
    if kind == "rsa":
        return RSA.generate(2048).export_key()
    if kind == "p256":
        return ECC.generate(curve="P-256").export_key(format="PEM").encode()
    if kind == "ed25519 public":
        return ECC.generate(curve="Ed25519").public_key().export_key(format="PEM").encode()
    return {"empty": b"", "garbage": b"not a key\n", "random": os.urandom(300)}[kind]


@pytest.mark.parametrize("kind", ["rsa", "p256", "ed25519 public", "empty", "garbage", "random"])
def test_identity_file_without_an_ed25519_private_key_refused(tmp_path: Path, kind: str):
    """§5: a file that is not an Ed25519 private key is refused, naming it, left alone."""
    path = tmp_path / "identity.pem"
    path.write_bytes(pem_of(kind))
    path.chmod(0o600)
    content = path.read_bytes()
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_identity(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_identity_file_readable_by_others_refused(tmp_path: Path, mode: int):
    """§5: an identity file readable by group or others is refused, saying how to fix it."""
    path = tmp_path / "identity.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        c.load_or_create_identity(path)


# --- public key, fingerprint, transcript ---


def test_identity_fingerprint_is_sha256_of_the_raw_key():
    """§5: fingerprint = "SHA256:" + unpadded base64 of SHA256(32-byte public key)."""
    public = RFC8032[0][1]
    expected = base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")
    assert c.identity_fingerprint(public) == "SHA256:" + expected
    assert len(c.identity_fingerprint(public)) == len("SHA256:") + 43
    for size in (0, 31, 33, 44):
        with pytest.raises(CryptoError):
            c.identity_fingerprint(bytes(size))


def test_identity_transcript_layout():
    """§5: b"bcast/1 identity" || SHA256(SPKI) || server_nonce || client_nonce ||
    server_eph || client_eph, in that order."""
    spki, parts = b"some DER", [bytes([i]) * 32 for i in range(1, 5)]
    transcript = c.identity_transcript(spki, *parts)
    assert transcript == b"bcast/1 identity" + hashlib.sha256(spki).digest() + b"".join(parts)
    assert len(transcript) == 16 + 32 * 5
    for i in range(4):
        wrong = list(parts)
        wrong[i] = bytes(31)
        with pytest.raises(CryptoError):
            c.identity_transcript(spki, *wrong)


# --- signing and verifying ---


@pytest.mark.parametrize("vector", RFC8032, ids=["test1", "test2", "test3"])
def test_rfc8032_vectors(vector):
    """§5: pure Ed25519 (RFC 8032): the known signatures, and they verify."""
    seed, public, message, signature = vector
    key = eddsa.import_private_key(seed)
    assert c.identity_public(key) == public
    assert c.sign_identity(key, message) == signature
    assert c.verify_identity(public, signature, message)
    assert not c.verify_identity(public, signature, message + b"\x00")


def test_sign_identity_needs_an_ed25519_private_key():
    """Signing with any other key is a CryptoError, not a different signature scheme."""
    with pytest.raises(CryptoError):
        c.sign_identity(ECC.generate(curve="P-256"), b"x")
    with pytest.raises(CryptoError):
        c.sign_identity(ECC.generate(curve="Ed25519").public_key(), b"x")


@settings(max_examples=60, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=300),
    flip=st.integers(0, 64 * 8 - 1),
)
def test_sign_and_verify_agree_with_cryptography(seed: bytes, message: bytes, flip: int):
    """§5: our signatures are OpenSSL's byte for byte (Ed25519 is deterministic), ours
    verify, and a flipped bit anywhere gets the same verdict from both."""
    theirs = Ed25519PrivateKey.from_private_bytes(seed)
    public = theirs.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = c.sign_identity(eddsa.import_private_key(seed), message)
    assert signature == theirs.sign(message)
    assert c.verify_identity(public, signature, message)
    bad = bytearray(signature)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert c.verify_identity(public, bytes(bad), message) == their_verdict(
        public, bytes(bad), message
    )
    assert not c.verify_identity(public, signature, message + b"!")


@settings(max_examples=60, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    r=st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from([c.ED25519_BASE])),
    s=st.integers(0, L - 1),
    message=st.binary(max_size=64),
)
def test_arbitrary_signatures_agree_with_cryptography_and_both_paths(seed, r, s, message):
    """On any (R, S < L) for a real key: the fast path, the public-API path and OpenSSL
    give the same verdict."""
    public = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    signature = r + s.to_bytes(32, "little")
    verdict = c.verify_identity(public, signature, message)
    assert verdict == equation_holds(public, signature, message)
    assert verdict == their_verdict(public, signature, message)


# --- strict refusals ---


def test_wrong_sizes_and_types_refused():
    """§5: a key other than 32 bytes or a signature other than 64 is refused (False)."""
    _, public, message, signature = RFC8032[0]
    for size in (0, 31, 33):
        assert not c.verify_identity(public[:size] + bytes(max(0, size - 32)), signature, message)
    for size in (0, 63, 65):
        assert not c.verify_identity(public, (signature * 2)[:size], message)
    assert not c.verify_identity(public.hex(), signature, message)  # type: ignore[arg-type]
    assert not c.verify_identity(public, signature, "text")  # type: ignore[arg-type]


def test_s_at_or_above_l_refused():
    """§5: S >= L is refused, though (R, S + L) satisfies the equation: it would let
    anyone make a second valid signature of the same message (malleability)."""
    _, public, message, signature = RFC8032[1]
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + L).to_bytes(32, "little")
    assert equation_holds(public, malleated, message)
    assert not c.verify_identity(public, malleated, message)
    for big in (L, 2**256 - 1):
        assert not c.verify_identity(public, signature[:32] + big.to_bytes(32, "little"), message)


def test_non_canonical_public_keys_refused():
    """§5: a key must be the canonical encoding of a curve point: y >= p, x = 0 with the
    sign bit set, and a y with no x on the curve are all refused."""
    _, _, message, signature = RFC8032[0]
    encodings = [(y + P).to_bytes(32, "little") for y in range(19)]
    encodings += [((y + P) | 1 << 255).to_bytes(32, "little") for y in range(19)]
    encodings += [(1 | 1 << 255).to_bytes(32, "little"), (P - 1 | 1 << 255).to_bytes(32, "little")]
    off_curve = next(y for y in range(2, 100) if decode(y.to_bytes(32, "little")) is None)
    encodings.append(off_curve.to_bytes(32, "little"))
    for public in encodings:
        assert decode(public) is None
        assert not c.verify_identity(public, signature, message)


def test_small_order_set_is_the_torsion_subgroup():
    """The 8 refused keys are exactly the points P with [8]P = 0, canonically encoded."""
    points = [decode(encoded) for encoded in c.ED25519_SMALL_ORDER]
    assert len(points) == 8 and None not in points
    assert all(encode(mul(8, point)) == encode(NEUTRAL) for point in points)
    assert {encode(point) for point in points} == c.ED25519_SMALL_ORDER


def test_the_neutral_key_with_r_b_and_s_1_refused():
    """§5: key = the neutral point (01 00 .. 00), R = B, S = 1 satisfies the equation for
    every message (pycryptodome and OpenSSL both accept it): it must be refused."""
    public = (1).to_bytes(32, "little")
    signature = c.ED25519_BASE + (1).to_bytes(32, "little")
    for message in (b"", b"bcast/1 identity", os.urandom(208)):
        assert equation_holds(public, signature, message)
        assert not c.verify_identity(public, signature, message)


def forge(public: bytes, message: bytes) -> bytes:
    """A signature satisfying [S]B - [k]A = R for a key A of small order: choose S, then
    R = [S]B - [j]A, until [k]A = [j]A (k depends on R; A has at most 8 multiples)."""
    a = decode(public)
    for s in range(1, 200):
        for j in range(8):
            r = encode(add(mul(s, BASE), neg(mul(j, a))))
            if encode(mul(challenge(r, public, message) % 8, a)) == encode(mul(j, a)):
                return r + s.to_bytes(32, "little")
    raise AssertionError("no forgery found")


@pytest.mark.parametrize("public", sorted(c.ED25519_SMALL_ORDER), ids=lambda b: b.hex()[:8])
def test_small_order_keys_refused(public: bytes):
    """§5: a key of small order is refused even with a signature that satisfies the
    equation (one anybody can make for any message)."""
    message = b"bcast/1 identity" + os.urandom(32)
    signature = forge(public, message)
    assert equation_holds(public, signature, message)
    assert not c.verify_identity(public, signature, message)


def test_non_canonical_r_refused():
    """A signature whose R is the neutral point verifies (the equation holds; OpenSSL
    agrees), but not with R written in a non-canonical way (x = 0 with the sign bit set,
    or y = p + 1): the equation is checked on R's canonical encoding."""
    seed, public, _, _ = RFC8032[2]
    a = secret_scalar(seed)
    message = b"hello"
    for r, valid in (
        ((1).to_bytes(32, "little"), True),
        ((1 | 1 << 255).to_bytes(32, "little"), False),
        ((P + 1).to_bytes(32, "little"), False),
    ):
        s = challenge(r, public, message) * a % L  # [S]B - [k]A = 0, which is R
        signature = r + s.to_bytes(32, "little")
        assert c.verify_identity(public, signature, message) is valid
        assert equation_holds(public, signature, message) is valid
        if valid:
            assert their_verdict(public, signature, message)


# --- the paths, and threads ---


def test_curve_constants_agree():
    """The order L and base point B that both modules use are RFC 8032's."""
    assert c.ED25519_L == fc.ED25519_L == L
    assert c.ED25519_BASE == fc.ED25519_BASE
    assert BASE[1] == 4 * pow(5, P - 2, P) % P  # B's y is 4/5
    assert encode(mul(L, BASE)) == encode(NEUTRAL)


@FAST
def test_fast_verify_chosen_on_this_install():
    """The import-time self-check chose the GIL-holding fast Ed25519 verification here
    (the others cost more server CPU per join with an identity in a storm)."""
    assert c.ED25519_VERIFY_IMPL is fc.ed25519_verify_held


def test_held_path_calls_keep_the_gil():
    """The held path's C functions come from ctypes.PyDLL, whose calls keep the GIL (the
    reason it exists); pycryptodome's own functions are untouched."""
    lib, _ = fc._ed25519_held_lib()
    for name, _, _ in fc._ED25519_SIGNATURES:
        assert getattr(lib, name)._flags_ & ctypes._FUNCFLAG_PYTHONAPI, name
    theirs = fc._curve_lib("Ed25519").decode_point
    assert theirs is not lib.decode_point
    assert not getattr(theirs, "_flags_", 0) & ctypes._FUNCFLAG_PYTHONAPI


def test_fast_verify_refused_when_it_disagrees(monkeypatch):
    """A fast verification that disagrees with the public API, or cannot run, is not
    chosen: the held path falls back to the cffi one, that one to None."""
    assert fc.select_ed25519(c._ed25519_verify_standard) is fc.ed25519_verify_held
    assert fc.select_ed25519(lambda public, signature, message: True) is None

    def missing(name: str = "") -> None:
        raise OSError(f"no library {name}")

    monkeypatch.setattr(fc, "_ed25519_held", None)
    monkeypatch.setattr(fc, "_ed25519_pydll", missing)
    assert fc.select_ed25519(c._ed25519_verify_standard) is fc.ed25519_verify
    monkeypatch.setattr(fc, "_ed25519", None)
    monkeypatch.setattr(fc, "_curve_lib", missing)
    assert fc.select_ed25519(c._ed25519_verify_standard) is None


def test_held_path_refuses_wrong_sizes_and_types_before_c():
    """Only a 32-byte key and a 64-byte signature, all bytes, reach the C functions (which
    read 32 bytes from each pointer): anything else is an exception, not a read past."""
    _, public, message, signature = RFC8032[0]
    for bad_public, bad_signature in ((public[:31], signature), (public, signature[:63])):
        with pytest.raises(ValueError, match="32 and 64 bytes"):
            fc.ed25519_verify_held(bad_public, bad_signature, message)
    for args in ((bytearray(public), signature, message), (public, signature, "text")):
        with pytest.raises(TypeError):
            fc.ed25519_verify_held(*args)  # type: ignore[arg-type]


class CountingLib:
    """The held path's functions, counting the points made and freed; `fail` names one
    function made to return an error code."""

    def __init__(self, lib, fail: str = ""):
        self._lib, self.fail, self.made, self.freed = lib, fail, 0, 0

    def __getattr__(self, name: str):
        function = getattr(self._lib, name)

        def call(*args):
            if name == self.fail:
                return 5
            result = function(*args)
            if name in ("decode_point", "clone") and result == 0:
                self.made += 1
            if name == "free_point":
                self.freed += 1
            return result

        return call


@pytest.mark.parametrize("fail", ["", "scalar_public", "neg", "clone", "add", "get_xy"])
def test_held_path_frees_every_point_it_makes(monkeypatch, fail: str):
    """Each point the held path makes (A, [S]B) is freed, also when a C call fails midway
    (a C error is a ValueError, which verify_identity reads as False)."""
    lib, base = fc._ed25519_held_lib()
    counting = CountingLib(lib, fail)
    monkeypatch.setattr(fc, "_ed25519_held", (counting, base))
    _, public, message, signature = RFC8032[1]
    if fail:
        with pytest.raises(ValueError):
            fc.ed25519_verify_held(public, signature, message)
    else:
        assert fc.ed25519_verify_held(public, signature, message)
        assert not fc.ed25519_verify_held(public, signature, message + b"!")
    not_a_point = next(y for y in range(2, 100) if decode(y.to_bytes(32, "little")) is None)
    assert not fc.ed25519_verify_held(not_a_point.to_bytes(32, "little"), signature, message)
    assert counting.made > 0
    assert counting.freed == counting.made


@settings(max_examples=40, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    r=st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from([c.ED25519_BASE])),
    s=st.integers(0, 2**256 - 1),
    message=st.binary(max_size=64),
    real=st.booleans(),
)
def test_held_path_agrees_with_the_cffi_path_public_api_and_cryptography(seed, r, s, message, real):
    """On real signatures and on any (R, S), S >= L included: the held path gives the
    verdict of the cffi path and of the public API (the raw equation), and with S < L
    that of OpenSSL."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signature = key.sign(message) if real else r + s.to_bytes(32, "little")
    verdict = fc.ed25519_verify_held(public, signature, message)
    assert verdict == fc.ed25519_verify(public, signature, message)
    assert verdict == c._ed25519_verify_standard(public, signature, message)
    if int.from_bytes(signature[32:], "little") < L:
        assert verdict == their_verdict(public, signature, message)
    assert verdict or not real


@pytest.mark.parametrize(
    "verify",
    [c.verify_identity, fc.ed25519_verify_held, fc.ed25519_verify],
    ids=["verify_identity", "held", "cffi"],
)
def test_verify_from_many_threads_at_once(verify):
    """The server verifies in every reader thread: 8 threads calling at once get the
    right answers (valid, wrong message, a flipped bit of S), on each path."""
    keys = [Ed25519PrivateKey.generate() for _ in range(4)]
    jobs = []
    for i in range(48):
        key = keys[i % 4]
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        message = i.to_bytes(4, "big") * 10
        signature = key.sign(message)
        if i % 3 == 0:
            jobs.append((public, signature, message + b"x", False))
        elif i % 3 == 1:
            flipped = signature[:40] + bytes([signature[40] ^ 1]) + signature[41:]
            jobs.append((public, flipped, message, False))
        else:
            jobs.append((public, signature, message, True))
    wrong: list[int] = []
    start = threading.Barrier(8)

    def work(first: int) -> None:
        start.wait()
        for _ in range(3):
            for index in range(first, len(jobs), 8):
                public, signature, message, expected = jobs[index]
                if verify(public, signature, message) is not expected:
                    wrong.append(index)

    run_in_threads(work, 8)
    assert wrong == []
