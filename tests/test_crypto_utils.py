"""Unit tests of crypto_utils.py against PROTOCOL.md §2 (handshake) and §3 (records),
and of the key files (§2, §5) and the fast paths of _fastcrypto.py.

Known answers are computed here independently: HKDF by hand from RFC 5869 with
hashlib/hmac, AES-GCM and OAEP with pycryptodome or `cryptography` directly,
X25519 against RFC 7748. RSA keys are 2048 bits and made once per module.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC, RSA
from Crypto.PublicKey.RSA import RsaKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_der_public_key,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from netutil import run_in_threads

import _fastcrypto as fc
import crypto_utils as c
from crypto_utils import CryptoError, KeyFileError

KEY = bytes(range(32))
FAST = pytest.mark.skipif(c.PUBLIC_CRYPTO, reason="BCAST_PUBLIC_CRYPTO=1 turns fast paths off")
LAST_SEQ = 2**32 - 1  # §3: a side closes before its send counter would reach 2**32


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return RSA.generate(2048)


@pytest.fixture(scope="module")
def small_key() -> RsaKey:
    return RSA.generate(1024)


@pytest.fixture(scope="module")
def spki(rsa_key: RsaKey) -> bytes:
    return c.spki_der(rsa_key)


def write_key(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def oaep_sha256(key: RsaKey) -> PKCS1_OAEP.PKCS1OAEP_Cipher:
    return PKCS1_OAEP.new(key.public_key(), hashAlgo=SHA256)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) extract-then-expand with HMAC-SHA256, written out by hand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


# --- §2: the server key file ---


def test_key_file_created_0600_under_umask_0(tmp_path: Path):
    """§2: the key file is created with mode 0600 whatever the umask; reloading gives the key."""
    path = tmp_path / "state" / "server_key.pem"
    old = os.umask(0)
    try:
        key = c.load_or_create_server_key(path, bits=2048)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.has_private() and key.size_in_bits() == 2048
    assert b"ENCRYPTED" not in path.read_bytes()  # unencrypted PEM
    assert RSA.import_key(path.read_bytes()) == key
    again = c.load_or_create_server_key(path, bits=2048)
    assert (again.n, again.e, again.d) == (key.n, key.e, key.d)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_key_file_is_0600_before_its_first_byte(tmp_path: Path, monkeypatch):
    """Issue 2: the key is never briefly readable by others: when the first byte of the
    PEM is written (to the file that becomes the key file), its mode is already exactly
    0600 (even under umask 0)."""
    path = tmp_path / "server_key.pem"
    modes_at_write: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            modes_at_write.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    old = os.umask(0)
    try:
        c.load_or_create_server_key(path, bits=2048)
    finally:
        os.umask(old)
    assert modes_at_write and set(modes_at_write) == {0o600}


def test_new_server_key_is_3072_bits_by_default(tmp_path: Path):
    """Issue 2: a server key created without a size is 3072-bit RSA."""
    key = c.load_or_create_server_key(tmp_path / "k.pem")
    assert key.size_in_bits() == 3072


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o700 | 0o044])
def test_key_file_readable_by_others_refused(tmp_path: Path, rsa_key: RsaKey, mode: int):
    """§2: the server refuses a key file readable by group or others, naming the file."""
    path = write_key(tmp_path / "key.pem", rsa_key.export_key(), mode)
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_server_key(path, bits=2048)
    assert str(path) in str(info.value)
    assert path.read_bytes() == rsa_key.export_key()  # left alone


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_private_modes_accepted(tmp_path: Path, rsa_key: RsaKey, mode: int):
    """§2: a key file readable only by its owner is loaded."""
    path = write_key(tmp_path / "key.pem", rsa_key.export_key(), mode)
    assert c.load_or_create_server_key(path, bits=2048) == rsa_key


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key",
        b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        os.urandom(1200),
    ],
)
def test_corrupt_key_file_refused(tmp_path: Path, data: bytes):
    """§2: the server refuses a key file that cannot be parsed, naming the file."""
    path = write_key(tmp_path / "key.pem", data, 0o600)
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_server_key(path, bits=2048)
    assert str(path) in str(info.value)


def test_truncated_key_file_refused(tmp_path: Path, rsa_key: RsaKey):
    """§2: a truncated PEM is a file that cannot be parsed."""
    pem = rsa_key.export_key()
    path = write_key(tmp_path / "key.pem", pem[: len(pem) // 2], 0o600)
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_server_key(path, bits=2048)
    assert str(path) in str(info.value)


def test_small_key_file_refused(tmp_path: Path, small_key: RsaKey):
    """§2: the server refuses a key under 2048 bits (a 1024-bit key, mode 0600)."""
    path = write_key(tmp_path / "key.pem", small_key.export_key(), 0o600)
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_server_key(path, bits=2048)
    assert str(path) in str(info.value)
    assert "1024" in str(info.value)


def test_public_key_file_refused(tmp_path: Path, rsa_key: RsaKey):
    """§2: a file holding only a public key cannot be the server's key."""
    path = write_key(tmp_path / "key.pem", rsa_key.public_key().export_key(), 0o600)
    with pytest.raises(KeyFileError) as info:
        c.load_or_create_server_key(path, bits=2048)
    assert str(path) in str(info.value)


def test_refuses_to_create_small_key(tmp_path: Path):
    """§2: the server's RSA key is at least 2048 bits, also when it creates one."""
    path = tmp_path / "key.pem"
    with pytest.raises(KeyFileError):
        c.load_or_create_server_key(path, bits=1024)
    assert not path.exists()


def test_key_file_error_is_crypto_error():
    """crypto_utils: every failure is one CryptoError (KeyFileError included)."""
    assert issubclass(KeyFileError, CryptoError)


# --- hardened key files: the server's key (§2) and a client's identity (§5) ---

WAIT_S = 10  # how long a test waits for a thread or a child that should be done at once


class Loader(NamedTuple):
    load: Callable[[Path], object]
    generator: str  # the crypto_utils function that makes a new key
    pem: Callable[[], bytes]  # a valid key file's content


LOADERS = {
    "server key": Loader(
        lambda path: c.load_or_create_server_key(path, bits=2048),
        "_new_rsa_key",
        lambda: RSA.generate(2048).export_key(),
    ),
    "identity": Loader(
        c.load_or_create_identity,
        "_new_identity_key",
        lambda: ECC.generate(curve="Ed25519").export_key(format="PEM").encode(),
    ),
}


@pytest.fixture(params=sorted(LOADERS))
def loader(request) -> Loader:
    return LOADERS[request.param]


@pytest.fixture
def no_keygen(monkeypatch, loader: Loader) -> None:
    """A refused key file must be refused before any key is generated."""

    def refuse(*args, **kwargs):
        raise AssertionError("a key was generated")

    monkeypatch.setattr(c, loader.generator, refuse)


def refusal(loader: Loader, path: Path) -> str:
    """The KeyFileError message for `path`, which must come within a second; the load
    runs in a thread so that an open that blocks fails the test instead of hanging it."""
    outcome: list[object] = []

    def work() -> None:
        try:
            outcome.append(loader.load(path))
        except BaseException as exc:  # reported below, whatever it is
            outcome.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive(), f"loading {path} still blocks after {WAIT_S} s"
    assert time.monotonic() - start < 1.0
    assert isinstance(outcome[0], KeyFileError), outcome
    message = str(outcome[0])
    assert str(path) in message and "\n" not in message and ". " not in message
    return message


def test_symlink_to_a_key_file_refused(tmp_path: Path, loader: Loader, no_keygen):
    """§2, §5: a key file that is a symbolic link is refused (another user who can write
    the folder could point it anywhere), even to a good key; the target is left alone."""
    target = write_key(tmp_path / "real.pem", loader.pem(), 0o600)
    content = target.read_bytes()
    (tmp_path / "key.pem").symlink_to(target)
    assert "symbolic link" in refusal(loader, tmp_path / "key.pem")
    assert target.read_bytes() == content


def test_dangling_symlink_refused(tmp_path: Path, loader: Loader, no_keygen):
    """A dangling symbolic link is refused at once: no key is generated, nothing is
    created at its target (before: an endless loop of key generation)."""
    path = tmp_path / "key.pem"
    path.symlink_to(tmp_path / "elsewhere.pem")
    assert "symbolic link" in refusal(loader, path)
    assert not (tmp_path / "elsewhere.pem").exists() and path.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["key.pem"]


def test_fifo_refused_without_blocking(tmp_path: Path, loader: Loader, no_keygen):
    """A FIFO at the key file's path is refused at once (opening it must not wait for a
    writer)."""
    path = tmp_path / "key.pem"
    os.mkfifo(path, 0o600)
    assert "FIFO" in refusal(loader, path)


def test_directory_refused(tmp_path: Path, loader: Loader, no_keygen):
    """A directory at the key file's path is refused, saying so."""
    path = tmp_path / "key.pem"
    path.mkdir(mode=0o700)
    assert "directory" in refusal(loader, path)


def test_foreign_owner_refused(tmp_path: Path, loader: Loader, no_keygen, monkeypatch):
    """A key file owned by another user is refused, even with mode 0600 (checked on the
    descriptor that is read; tests run as root, so the user is faked)."""
    path = write_key(tmp_path / "key.pem", loader.pem(), 0o600)
    other = os.stat(path).st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: other)
    message = refusal(loader, path)
    assert f"uid {other}" in message and f"uid {other - 1}" in message


def test_oversized_key_file_refused(tmp_path: Path, loader: Loader, no_keygen):
    """A key file far larger than any key is refused without reading it all."""
    path = write_key(tmp_path / "key.pem", b"x" * (c.MAX_KEY_FILE_BYTES + 1), 0o600)
    assert "too large" in refusal(loader, path)


def test_symlinked_folder_is_fine(tmp_path: Path, loader: Loader):
    """Only the key file itself must not be a link: a folder on the way may be one."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    first = loader.load(tmp_path / "link" / "key.pem")
    assert (tmp_path / "real" / "key.pem").is_file()
    assert loader.load(tmp_path / "real" / "key.pem") == first


def test_missing_folders_created_0700(tmp_path: Path, loader: Loader):
    """The missing folders above a new key file are created with mode 0700 (as XDG asks
    of $XDG_DATA_HOME), whatever the umask."""
    path = tmp_path / "data" / "bcast" / "key.pem"
    old = os.umask(0)
    try:
        loader.load(path)
    finally:
        os.umask(old)
    for folder in (tmp_path / "data", tmp_path / "data" / "bcast"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_key_file_synced_then_its_folder(tmp_path: Path, loader: Loader, monkeypatch):
    """A new key survives a crash: its file is fsynced before it takes its name, then the
    folder that holds the name; no temporary file is left behind."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    loader.load(tmp_path / "key.pem")
    assert synced == ["file", "folder"]
    assert os.listdir(tmp_path) == ["key.pem"]


def test_two_starts_at_once_end_with_one_key(tmp_path: Path, loader: Loader, monkeypatch):
    """Two processes creating the key at once (here two threads, each having generated
    its key before either writes it) end with one key, the same for both."""
    path = tmp_path / "key.pem"
    barrier = threading.Barrier(2, timeout=WAIT_S)
    generate = getattr(c, loader.generator)

    def generate_then_wait(*args):
        key = generate(*args)
        barrier.wait()
        return key

    monkeypatch.setattr(c, loader.generator, generate_then_wait)
    keys: list[object] = []
    threads = [threading.Thread(target=lambda: keys.append(loader.load(path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(keys) == 2 and keys[0] == keys[1]
    monkeypatch.setattr(c, loader.generator, generate)
    assert loader.load(path) == keys[0]
    assert os.listdir(tmp_path) == ["key.pem"]


def test_two_server_processes_at_once_end_with_one_key(tmp_path: Path):
    """Two server processes started at once on a missing key file use the same key."""
    path = tmp_path / "server_key.pem"

    def work() -> object:
        return c.fingerprint(c.spki_der(c.load_or_create_server_key(path, bits=2048)))

    children = [start_child(work) for _ in range(2)]
    first, second = (finish_child(child) for child in children)
    assert first == second == c.fingerprint(c.spki_der(RSA.import_key(path.read_bytes())))
    assert os.listdir(tmp_path) == ["server_key.pem"]


# --- §2: server identity ---


def test_fingerprint_matches_hashlib(spki: bytes):
    """§2: fingerprint = "SHA256:" + unpadded base64 of SHA256(SPKI DER)."""
    digest = hashlib.sha256(spki).digest()
    expected = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    fp = c.fingerprint(spki)
    assert fp == expected
    assert fp.startswith("SHA256:") and len(fp) == len("SHA256:") + 43
    assert "=" not in fp


def test_fingerprint_known_answer():
    """§2: fingerprint of a fixed input, as OpenSSH would print it."""
    assert c.fingerprint(b"") == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"


def test_spki_is_der_subject_public_key_info(rsa_key: RsaKey, spki: bytes):
    """§2: hello.key is the DER SubjectPublicKeyInfo of the server's RSA public key."""
    public = load_der_public_key(spki)  # an independent DER SPKI parser
    assert public.public_numbers().n == rsa_key.n
    assert public.public_numbers().e == rsa_key.e
    assert c.import_spki(spki) == rsa_key.public_key()


def test_import_spki_refuses_small_or_bad(small_key: RsaKey, rsa_key: RsaKey):
    """§2: a server key under 2048 bits or not a key is unusable."""
    with pytest.raises(CryptoError):
        c.import_spki(c.spki_der(small_key))
    with pytest.raises(CryptoError):
        c.import_spki(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CryptoError):
        c.wrap_secret(c.spki_der(small_key), bytes(32))


# --- §2: RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) ---


def test_wrap_unwrap_round_trip(rsa_key: RsaKey, spki: bytes):
    """§2: the 32-byte secret wrapped to the server's key unwraps to itself."""
    secret = os.urandom(32)
    wrapped = c.wrap_secret(spki, secret)
    assert len(wrapped) == 256
    assert c.unwrap_secret(rsa_key, wrapped) == secret
    assert c.wrap_secret(spki, secret) != wrapped  # OAEP is randomised


def test_wrap_uses_oaep_sha256_mgf1_sha256(rsa_key: RsaKey, spki: bytes):
    """§2: OAEP with SHA-256 as hash and MGF1 hash, empty label (checked with `cryptography`)."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    private = load_der_private_key(rsa_key.export_key(format="DER"), password=None)
    secret = bytes(range(32))
    assert private.decrypt(c.wrap_secret(spki, secret), oaep) == secret
    theirs = private.public_key().encrypt(secret, oaep)
    assert c.unwrap_secret(rsa_key, theirs) == secret


def test_unwrap_refuses_sha1_oaep(rsa_key: RsaKey):
    """§2: a ciphertext made with SHA-1 OAEP (pycryptodome's default) does not unwrap."""
    wrapped = PKCS1_OAEP.new(rsa_key.public_key()).encrypt(bytes(32))
    with pytest.raises(CryptoError):
        c.unwrap_secret(rsa_key, wrapped)


def test_unwrap_refuses_label(rsa_key: RsaKey):
    """§2: the OAEP label is empty; a labelled ciphertext does not unwrap."""
    wrapped = PKCS1_OAEP.new(rsa_key.public_key(), hashAlgo=SHA256, label=b"bcast").encrypt(
        bytes(32)
    )
    with pytest.raises(CryptoError):
        c.unwrap_secret(rsa_key, wrapped)


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_unwrap_refuses_wrong_secret_size(rsa_key: RsaKey, size: int):
    """§2: a secret that does not decrypt to exactly 32 bytes is refused."""
    wrapped = oaep_sha256(rsa_key).encrypt(bytes(range(size)))
    with pytest.raises(CryptoError):
        c.unwrap_secret(rsa_key, wrapped)


@pytest.mark.parametrize(
    "ciphertext", [b"", b"\x00", bytes(255), bytes(256), b"\xff" * 256, bytes(257), b"x" * 512]
)
def test_unwrap_refuses_garbage(rsa_key: RsaKey, ciphertext: bytes):
    """§2: a secret that does not decrypt is refused (CryptoError, nothing else)."""
    with pytest.raises(CryptoError):
        c.unwrap_secret(rsa_key, ciphertext)


def test_unwrap_refuses_tampered(rsa_key: RsaKey, spki: bytes):
    """§2: a wrapped secret with one flipped bit does not decrypt."""
    wrapped = bytearray(c.wrap_secret(spki, bytes(32)))
    wrapped[100] ^= 0x01
    with pytest.raises(CryptoError):
        c.unwrap_secret(rsa_key, bytes(wrapped))


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([32, 0, 1, 31, 33, 190]),
    garbage=st.binary(min_size=256, max_size=256),
    flip=st.integers(0, 256 * 8 - 1),
)
def test_lean_oaep_equals_public_oaep(rsa_key: RsaKey, size: int, garbage: bytes, flip: int):
    """§2: the lean OAEP decryption gives what pycryptodome's public OAEP gives, or both refuse."""
    lean, public = fc.LeanOaep(rsa_key), PKCS1_OAEP.new(rsa_key, hashAlgo=SHA256)
    good = oaep_sha256(rsa_key).encrypt(os.urandom(size))
    assert lean.decrypt(good) == public.decrypt(good)
    tampered = bytearray(good)
    tampered[flip // 8] ^= 1 << (flip % 8)
    for ciphertext in (bytes(tampered), garbage):
        outcomes = []
        for decrypt in (lean.decrypt, public.decrypt):
            try:
                outcomes.append(decrypt(ciphertext))
            except ValueError:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1]


def test_lean_oaep_blinding_renews(monkeypatch, rsa_key: RsaKey, spki: bytes):
    """The lean path squares its blinding pair between fresh ones (a fresh r every
    BLINDING_USES decryptions, as pycryptodome) and decrypts right with both kinds."""
    from Crypto.Math.Numbers import Integer

    fresh = []
    draw = Integer.random_range

    def spy(**kwargs):
        fresh.append(kwargs)
        return draw(**kwargs)

    monkeypatch.setattr(Integer, "random_range", spy)
    lean = fc.LeanOaep(rsa_key)
    for i in range(2 * lean.BLINDING_USES + 1):
        secret = i.to_bytes(32, "big")
        assert lean.decrypt(c.wrap_secret(spki, secret)) == secret
    assert len(fresh) == 3  # at the 1st, the 33rd and the 65th decryption


def test_lean_oaep_from_many_threads_at_once(rsa_key: RsaKey, spki: bytes):
    """The server unwraps in every reader thread: shared blinding and buffers stay right."""
    lean = fc.LeanOaep(rsa_key)
    jobs = [(i.to_bytes(32, "big"), c.wrap_secret(spki, i.to_bytes(32, "big"))) for i in range(96)]
    wrong: list[int] = []

    def work(start: int) -> None:
        for secret, wrapped in jobs[start::8]:
            try:
                if lean.decrypt(wrapped) != secret:
                    wrong.append(start)
            except ValueError:  # what mixed-up buffers give, mostly
                wrong.append(start)

    run_in_threads(work, 8)
    assert wrong == []
    assert 1 <= len(lean._scratch) <= 8  # buffer sets were reused, one per concurrent call


def test_lean_oaep_refuses_wrong_sizes_and_out_of_range(rsa_key: RsaKey):
    """RFC 8017 7.1.2 step 1 and RSADP's range check, as in the public API."""
    lean = fc.LeanOaep(rsa_key)
    for ciphertext in (bytes(255), bytes(257), int(rsa_key.n).to_bytes(256, "big"), b"\xff" * 256):
        with pytest.raises(ValueError):
            lean.decrypt(ciphertext)


@FAST
def test_unwrapper_uses_the_lean_oaep_on_this_install(rsa_key: RsaKey):
    """The per-key self-check chose the lean path here (else a storm of joins is slower)."""
    chosen = c.unwrapper(rsa_key)
    assert isinstance(getattr(chosen, "__self__", None), fc.LeanOaep)
    assert c.unwrapper(rsa_key) is chosen  # made once per key


def test_unwrapper_falls_back_when_the_lean_path_differs(monkeypatch, small_key: RsaKey):
    """A lean path that decrypts differently (or cannot be built) is never used."""
    monkeypatch.setattr(fc.LeanOaep, "decrypt", lambda self, ciphertext: bytes(32))
    wrong = RSA.import_key(small_key.export_key())
    assert not isinstance(getattr(c.unwrapper(wrong), "__self__", None), fc.LeanOaep)
    secret = os.urandom(32)
    assert c.unwrap_secret(wrong, oaep_sha256(wrong).encrypt(secret)) == secret

    def broken(self, key):
        raise AttributeError("_crt_p")

    monkeypatch.setattr(fc.LeanOaep, "__init__", broken)
    missing = RSA.import_key(small_key.export_key())
    assert c.unwrap_secret(missing, oaep_sha256(missing).encrypt(secret)) == secret


@pytest.mark.parametrize("size", [0, 31, 33])
def test_wrap_refuses_wrong_secret_size(spki: bytes, size: int):
    """§2: the wrapped secret is exactly 32 bytes."""
    with pytest.raises(CryptoError):
        c.wrap_secret(spki, bytes(size))


# --- §2: X25519 ---

RFC7748_A_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_A_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC7748_B_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
RFC7748_B_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_ephemeral_rfc7748_vector():
    """§2: X25519 as in RFC 7748 with raw 32-byte keys (the §6.1 test vector)."""
    alice = c.Ephemeral(private=RFC7748_A_PRIV)
    bob = c.Ephemeral(private=RFC7748_B_PRIV)
    assert alice.public == RFC7748_A_PUB
    assert bob.public == RFC7748_B_PUB
    assert alice.exchange(bob.public) == RFC7748_SHARED
    assert bob.exchange(alice.public) == RFC7748_SHARED


def test_ephemeral_both_sides_agree():
    """§2: both sides compute the same dh; fresh pairs differ."""
    server, client = c.Ephemeral(), c.Ephemeral()
    assert len(server.public) == 32 and server.public != client.public
    theirs = X25519PrivateKey.generate()  # an independent X25519
    ours = c.Ephemeral()
    their_pub = theirs.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert ours.exchange(their_pub) == theirs.exchange(
        X25519PublicKey.from_public_bytes(ours.public)
    )
    assert server.exchange(client.public) == client.exchange(server.public)


def test_ephemeral_private_half_forgotten():
    """§2: the private half is forgotten once used: a second exchange fails."""
    eph = c.Ephemeral()
    peer = c.Ephemeral()
    eph.exchange(peer.public)
    with pytest.raises(CryptoError):
        eph.exchange(peer.public)
    with pytest.raises(CryptoError):
        eph.exchange(c.Ephemeral().public)


LOW_ORDER_POINTS = [
    bytes(32),  # 0
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p - 1
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p + 1
]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda b: b.hex()[:8])
def test_ephemeral_refuses_low_order_points(point: bytes):
    """§2: an X25519 result of all zeros (a low-order point) is refused."""
    with pytest.raises(CryptoError):
        c.Ephemeral().exchange(point)


@pytest.mark.parametrize("impl", [fc.x25519, c._x25519_standard], ids=["lean", "standard"])
@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda b: b.hex()[:8])
def test_x25519_implementations_refuse_low_order_points(impl, point: bytes):
    """Both X25519 paths refuse the small-order points themselves (ValueError)."""
    with pytest.raises(ValueError):
        impl(os.urandom(32), point)


NON_CANONICAL_NINE = (2**255 - 19 + 9).to_bytes(32, "little")


@settings(max_examples=200, deadline=None)
@given(
    scalar=st.binary(min_size=32, max_size=32),
    u=st.one_of(
        st.binary(min_size=32, max_size=32),
        st.sampled_from([c.X25519_BASE, NON_CANONICAL_NINE, b"\xff" * 32]),
    ),
)
def test_x25519_lean_equals_standard_and_cryptography(scalar: bytes, u: bytes):
    """RFC 7748: the lean X25519 equals pycryptodome's public DH and `cryptography`'s."""
    outcomes = []
    for impl in (fc.x25519, c._x25519_standard):
        try:
            outcomes.append(impl(scalar, u))
        except ValueError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]
    if outcomes[0] is not None and any(outcomes[0]):
        theirs = X25519PrivateKey.from_private_bytes(scalar)
        assert outcomes[0] == theirs.exchange(X25519PublicKey.from_public_bytes(u))


@FAST
def test_x25519_uses_the_lean_path_on_this_install():
    """The import-time self-check chose the lean X25519 here."""
    assert c.X25519_IMPL is fc.x25519


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_ephemeral_refuses_wrong_length(size: int):
    """§2: X25519 public keys are raw 32 bytes."""
    with pytest.raises(CryptoError):
        c.Ephemeral().exchange(bytes(range(1, size + 1)))


def test_ephemeral_randomness_injectable():
    """crypto_utils: randomness is injectable, so a fixed source gives a fixed key pair."""
    a = c.Ephemeral(randfunc=lambda n: RFC7748_A_PRIV[:n])
    assert a.public == RFC7748_A_PUB


# --- §2: session keys ---

SECRET = bytes(range(32))
DH = bytes(range(32, 64))
SERVER_NONCE = b"\x11" * 32
CLIENT_NONCE = b"\x22" * 32
SERVER_SPKI = b"0\x82\x01\x22 not really DER but any bytes"
SERVER_EPH = b"\x33" * 32
CLIENT_EPH = b"\x44" * 32


def test_hand_hkdf_matches_rfc5869():
    """RFC 5869 A.1: the hand-written HKDF used as the reference below is right."""
    okm = hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@settings(max_examples=60, deadline=None)
@given(
    ikm=st.binary(max_size=96),
    salt=st.binary(max_size=80),
    info=st.binary(max_size=200),
    length=st.integers(min_value=1, max_value=200),
)
def test_fast_hkdf_equals_pycryptodome_and_cryptography(ikm, salt, info, length):
    """crypto_utils.hkdf_sha256 (stdlib HMAC) is the HKDF of both libraries, byte for byte."""
    from Crypto.Protocol.KDF import HKDF as PycryptodomeHKDF
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF as CryptographyHKDF

    ours = c.hkdf_sha256(ikm, salt, info, length)
    assert len(ours) == length
    assert ours == PycryptodomeHKDF(ikm, length, salt, SHA256, 1, info)
    assert ours == CryptographyHKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def test_fast_hkdf_matches_rfc5869():
    """RFC 5869 A.1 known answer, for the function derive_keys uses."""
    okm = c.hkdf_sha256(b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@settings(max_examples=60, deadline=None)
@given(seed=st.binary(max_size=64), length=st.integers(min_value=0, max_value=400))
def test_fast_mgf1_equals_pycryptodome(seed, length):
    """OAEP's mask function is pycryptodome's MGF1-SHA-256, only faster."""
    from Crypto.Signature.pss import MGF1

    assert fc.mgf1_sha256(seed, length) == MGF1(seed, length, SHA256)


def test_derive_keys_known_answer():
    """§2 session keys: HKDF-SHA256(secret||dh, salt=nonces, info=label||SHA256(spki)||ephs)."""
    okm = hkdf_sha256(
        ikm=SECRET + DH,
        salt=SERVER_NONCE + CLIENT_NONCE,
        info=b"bcast/1 keys" + hashlib.sha256(SERVER_SPKI).digest() + SERVER_EPH + CLIENT_EPH,
        length=64,
    )
    k_c2s, k_s2c = c.derive_keys(
        SECRET, DH, SERVER_NONCE, CLIENT_NONCE, SERVER_SPKI, SERVER_EPH, CLIENT_EPH
    )
    assert k_c2s == okm[:32]
    assert k_s2c == okm[32:]
    assert k_c2s != k_s2c


@pytest.mark.parametrize(
    "swap",
    ["secret/dh", "nonces", "ephs", "spki", "secret", "dh"],
)
def test_derive_keys_depends_on_every_input_in_order(swap: str):
    """§2 session keys: every input counts, each in its place (no swapped halves)."""
    args = dict(
        secret=SECRET,
        dh=DH,
        server_nonce=SERVER_NONCE,
        client_nonce=CLIENT_NONCE,
        server_spki=SERVER_SPKI,
        server_eph=SERVER_EPH,
        client_eph=CLIENT_EPH,
    )
    base = c.derive_keys(**args)
    if swap == "secret/dh":
        args["secret"], args["dh"] = DH, SECRET
    elif swap == "nonces":
        args["server_nonce"], args["client_nonce"] = CLIENT_NONCE, SERVER_NONCE
    elif swap == "ephs":
        args["server_eph"], args["client_eph"] = CLIENT_EPH, SERVER_EPH
    elif swap == "spki":
        args["server_spki"] = SERVER_SPKI + b"\x00"
    else:
        args[swap] = bytes(31) + b"\x01"
    changed = c.derive_keys(**args)
    assert changed[0] != base[0] and changed[1] != base[1]


def handshake(rsa_key: RsaKey, spki: bytes, server_nonce: bytes, server_eph: c.Ephemeral):
    """A client and a server half over the same hello; returns both key pairs."""
    client_nonce, wrapped, client_eph, k_c2s, k_s2c = c.client_keys(
        spki, server_nonce, server_eph.public
    )
    server = c.server_keys(
        rsa_key, spki, server_nonce, server_eph, client_nonce, wrapped, client_eph
    )
    return (k_c2s, k_s2c), server, (client_nonce, wrapped, client_eph)


def test_client_and_server_keys_agree(rsa_key: RsaKey, spki: bytes):
    """§2: client_keys and server_keys derive the same (k_c2s, k_s2c)."""
    server_eph = c.Ephemeral()
    client, server, (client_nonce, wrapped, client_eph) = handshake(
        rsa_key, spki, os.urandom(32), server_eph
    )
    assert client == server
    assert len(client[0]) == len(client[1]) == 32 and client[0] != client[1]
    assert len(client_nonce) == 32 and len(client_eph) == 32 and len(wrapped) == 256
    with pytest.raises(CryptoError):  # the server's private half is gone
        server_eph.exchange(client_eph)
    # and the channel works both ways
    assert c.RecordCipher(server[0]).open(c.RecordCipher(client[0]).seal(b"[]")) == b"[]"
    assert c.RecordCipher(client[1]).open(c.RecordCipher(server[1]).seal(b"{}")) == b"{}"


def test_client_keys_match_spec_derivation(rsa_key: RsaKey, spki: bytes):
    """§2: the client's keys are the page's formula over the values it sent."""
    server_nonce = os.urandom(32)
    server_eph = c.Ephemeral()
    server_pub = server_eph.public
    client_nonce, wrapped, client_eph, k_c2s, k_s2c = c.client_keys(spki, server_nonce, server_pub)
    secret = c.unwrap_secret(rsa_key, wrapped)
    dh = server_eph.exchange(client_eph)
    okm = hkdf_sha256(
        secret + dh,
        server_nonce + client_nonce,
        b"bcast/1 keys" + hashlib.sha256(spki).digest() + server_pub + client_eph,
        64,
    )
    assert (k_c2s, k_s2c) == (okm[:32], okm[32:])


def test_replayed_key_frame_gives_other_keys(rsa_key: RsaKey, spki: bytes):
    """§2: a key frame replayed to another connection (fresh server nonce) gives other keys."""
    seed = os.urandom(32)  # even with the same server eph, the nonce alone changes the keys
    first_nonce = os.urandom(32)
    client, server, key_frame = handshake(rsa_key, spki, first_nonce, c.Ephemeral(seed))
    assert client == server
    replayed = c.server_keys(rsa_key, spki, os.urandom(32), c.Ephemeral(seed), *key_frame)
    assert replayed[0] != client[0] and replayed[1] != client[1]
    same = c.server_keys(rsa_key, spki, first_nonce, c.Ephemeral(seed), *key_frame)
    assert same == client  # the nonce is what made the difference
    fresh_eph = c.server_keys(rsa_key, spki, os.urandom(32), c.Ephemeral(), *key_frame)
    assert fresh_eph[0] != client[0]
    with pytest.raises(CryptoError):  # a record sealed for the first session does not open
        c.RecordCipher(replayed[0]).open(c.RecordCipher(client[0]).seal(b"[]"))


def test_server_keys_refuse_bad_key_frame(rsa_key: RsaKey, spki: bytes):
    """§2: a bad secret or a low-order eph in a key frame fails the handshake."""
    server_eph = c.Ephemeral()
    client_nonce, wrapped, client_eph, _, _ = c.client_keys(spki, bytes(32), server_eph.public)
    with pytest.raises(CryptoError):
        c.server_keys(rsa_key, spki, bytes(32), c.Ephemeral(), client_nonce, b"x" * 256, client_eph)
    with pytest.raises(CryptoError):
        c.server_keys(rsa_key, spki, bytes(32), c.Ephemeral(), client_nonce, wrapped, bytes(32))


# --- §3: records ---


def gcm_reference(key: bytes, seq: int, plaintext: bytes) -> bytes:
    nonce = b"\0" * 4 + seq.to_bytes(8, "big")
    ciphertext, tag = AES.new(key, AES.MODE_GCM, nonce=nonce).encrypt_and_digest(plaintext)
    return ciphertext + tag


def test_record_round_trip():
    """§3: records sealed in order open in order; the counters advance together."""
    sender, receiver = c.RecordCipher(KEY), c.RecordCipher(KEY)
    messages = [b'[{"type":"who"}]', b"", b"x" * 100_000, "é😀".encode()]
    for i, plaintext in enumerate(messages):
        assert sender.seq == receiver.seq == i
        rec = sender.seal(plaintext)
        assert len(rec) == len(plaintext) + 16
        assert receiver.open(rec) == plaintext
    assert sender.seq == receiver.seq == len(messages)


@pytest.mark.parametrize("seq", [0, 1, 255, 256, 2**31, 2**32 - 2])
def test_record_nonce_layout_known_answer(seq: int):
    """§3: AES-256-GCM, nonce = 0x00000000 || u64be(seq), no AAD, ciphertext || 16-byte tag."""
    plaintext = b'[{"type":"ping","id":1}]'
    expected = gcm_reference(KEY, seq, plaintext)
    independent = AESGCM(KEY).encrypt(b"\0" * 4 + seq.to_bytes(8, "big"), plaintext, None)
    assert expected == independent
    assert c.RecordCipher(KEY, seq=seq).seal(plaintext) == expected
    assert c.RecordCipher(KEY, seq=seq).open(expected) == plaintext


def test_record_first_nonce_is_zero():
    """§3: seq starts at 0 in each direction."""
    assert c.RecordCipher(KEY).seal(b"a") == gcm_reference(KEY, 0, b"a")


def test_record_key_is_aes_256():
    """§3: AES-256: a record key is 32 bytes; other sizes are refused."""
    for size in (0, 16, 24, 31, 33):
        with pytest.raises(CryptoError):
            c.RecordCipher(bytes(size))


def test_tamper_any_bit_refused():
    """§3: flipping any bit (ciphertext or tag) fails to open and does not advance seq."""
    rec = c.RecordCipher(KEY).seal(b"hello")
    receiver = c.RecordCipher(KEY)
    for i in range(len(rec)):
        for bit in range(8):
            bad = bytearray(rec)
            bad[i] ^= 1 << bit
            with pytest.raises(CryptoError):
                receiver.open(bytes(bad))
            assert receiver.seq == 0
    for cut in (rec[:-1], rec[1:], rec + b"\x00", b"\x00" + rec):
        with pytest.raises(CryptoError):
            receiver.open(cut)
        assert receiver.seq == 0
    assert receiver.open(rec) == b"hello"  # the counter never moved
    assert receiver.seq == 1


def test_replay_refused():
    """§3: a replayed record fails to open; seq stays."""
    sender, receiver = c.RecordCipher(KEY), c.RecordCipher(KEY)
    first = sender.seal(b"one")
    assert receiver.open(first) == b"one"
    with pytest.raises(CryptoError):
        receiver.open(first)
    assert receiver.seq == 1


def test_reorder_refused():
    """§3: records opened out of order fail; seq stays."""
    sender, receiver = c.RecordCipher(KEY), c.RecordCipher(KEY)
    first, second = sender.seal(b"one"), sender.seal(b"two")
    with pytest.raises(CryptoError):
        receiver.open(second)
    assert receiver.seq == 0
    assert receiver.open(first) == b"one"
    assert receiver.open(second) == b"two"


def test_skip_refused():
    """§3: a dropped record makes the next one fail (no trying the next counter)."""
    sender, receiver = c.RecordCipher(KEY), c.RecordCipher(KEY)
    sender.seal(b"dropped")
    third = sender.seal(b"next")
    with pytest.raises(CryptoError):
        receiver.open(third)
    assert receiver.seq == 0
    with pytest.raises(CryptoError):  # still refused: the receiver did not move on
        receiver.open(third)
    assert receiver.seq == 0


def test_wrong_key_and_direction_refused():
    """§3: a record under another key (e.g. the other direction's) fails to open."""
    k_c2s, k_s2c = c.derive_keys(
        SECRET, DH, SERVER_NONCE, CLIENT_NONCE, SERVER_SPKI, SERVER_EPH, CLIENT_EPH
    )
    rec = c.RecordCipher(k_c2s).seal(b"[]")
    receiver = c.RecordCipher(k_s2c)
    with pytest.raises(CryptoError):
        receiver.open(rec)
    assert receiver.seq == 0


@pytest.mark.parametrize("size", [0, 1, 15])
def test_record_shorter_than_tag_refused(size: int):
    """§3: a record is ciphertext || 16-byte tag: under 16 bytes it cannot open."""
    receiver = c.RecordCipher(KEY)
    with pytest.raises(CryptoError):
        receiver.open(bytes(size))
    assert receiver.seq == 0


def test_tag_only_record_is_empty_plaintext():
    """§3: exactly 16 bytes is an empty ciphertext with its tag."""
    rec = c.RecordCipher(KEY).seal(b"")
    assert len(rec) == 16
    assert c.RecordCipher(KEY).open(rec) == b""
    with pytest.raises(CryptoError):
        c.RecordCipher(KEY).open(bytes(16))


def test_counter_exhaustion():
    """§3: a side closes before its send counter would reach 2**32: it cannot seal past it."""
    sender = c.RecordCipher(KEY, seq=2**32 - 2)
    assert not sender.exhausted
    assert sender.seal(b"a") == gcm_reference(KEY, 2**32 - 2, b"a")
    assert sender.seq == LAST_SEQ
    assert sender.exhausted
    with pytest.raises(CryptoError):
        sender.seal(b"b")
    assert sender.seq == LAST_SEQ  # a refused seal does not move the counter
    at_limit = c.RecordCipher(KEY, seq=2**32)
    assert at_limit.exhausted
    with pytest.raises(CryptoError):
        at_limit.seal(b"c")
    with pytest.raises(CryptoError):
        at_limit.open(gcm_reference(KEY, 2**32 - 1, b"c"))
    assert at_limit.seq == 2**32
    assert not c.RecordCipher(KEY).exhausted


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    seq=st.integers(0, 2**64 - 1),
    pt=st.one_of(st.binary(max_size=300), st.binary(min_size=4000, max_size=4200)),
)
def test_fast_gcm_equals_public_gcm(key: bytes, seq: int, pt: bytes) -> None:
    """§3: the fast record cipher (ECB-keystream and CTR paths) equals GCM in two libraries."""
    nonce = b"\x00" * 4 + seq.to_bytes(8, "big")
    fast, public = fc.Gcm(key), c._StandardGcm(key)
    record = public.seal(seq, pt)
    assert record == AESGCM(key).encrypt(nonce, pt, None)
    assert fast.seal(seq, pt) == record
    assert fast.open(seq, record) == pt
    bad = bytearray(record)
    bad[len(bad) // 2] ^= 0x80
    with pytest.raises(ValueError):
        fast.open(seq, bytes(bad))


@FAST
def test_record_cipher_uses_the_fast_gcm_on_this_install() -> None:
    """The import-time self-check selected the fast path here (else records cost more CPU)."""
    assert c.GCM_IMPL is fc.Gcm


@FAST
def test_small_record_calls_keep_the_gil() -> None:
    """A record of up to 4 KiB is sealed and opened through ctypes.PyDLL functions, whose
    calls keep the GIL (the reason they exist: no hand-off to another thread per say)."""
    import ctypes

    _, functions, _ = fc._gcm_c()
    for function in (functions.ecb_encrypt, functions.ghash):
        assert function._flags_ & ctypes._FUNCFLAG_PYTHONAPI


@pytest.mark.parametrize("size", [0, 1, 16, 4095, 4096, 4097, 70000])
def test_fast_gcm_refuses_each_tampered_byte_class(size: int) -> None:
    """§3: on both sides of the 4 KiB switch, a flipped bit in the ciphertext or the tag,
    a wrong counter, or a record cut short does not open."""
    gcm = fc.Gcm(KEY)
    record = gcm.seal(7, bytes(range(256)) * (size // 256) + bytes(size % 256))
    for where in {0, len(record) // 2, len(record) - 1}:
        bad = bytearray(record)
        bad[where] ^= 0x01
        with pytest.raises(ValueError):
            gcm.open(7, bytes(bad))
    with pytest.raises(ValueError):
        gcm.open(8, record)
    with pytest.raises(ValueError):
        gcm.open(7, record[1:])


def test_fast_gcm_not_chosen_when_it_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The import-time self-check refuses a fast GCM that differs from the public API in
    one size class, or whose C functions cannot be loaded: records then use the public API."""
    assert fc.select_gcm(c._StandardGcm) is fc.Gcm
    with monkeypatch.context() as patch:
        patch.setattr(fc.Gcm, "_xor", staticmethod(lambda data, stream, size: bytes(size)))
        assert fc.select_gcm(c._StandardGcm) is None
    with monkeypatch.context() as patch:
        patch.setattr(fc, "_gcm_setup", None)  # loaded again, and fails

        def missing(package: list[str], stem: str) -> None:
            raise OSError(f"no {stem}")

        patch.setattr(fc, "_pydll", missing)
        assert fc.select_gcm(c._StandardGcm) is None


# --- the fast paths: the switch, fork() and the owners of raw pointers ---

ROOT = Path(__file__).resolve().parent.parent
ALL_PUBLIC = ["AES-GCM records", "X25519", "RSA-OAEP", "Ed25519 identity"]

# Run both in this process and in a child with another environment, so that the two
# sets of outcomes can be compared.
PROBE = """
import crypto_utils as c
from Crypto.PublicKey import RSA
from Crypto.Signature import eddsa


def probe(key_pem, wrapped):
    key = RSA.import_key(key_pem)
    out = {"slow": c.slow_paths(key), "public": c.PUBLIC_CRYPTO}
    out["unwrap"] = []
    for ciphertext in wrapped:
        try:
            out["unwrap"].append(c.unwrap_secret(key, bytes.fromhex(ciphertext)).hex())
        except c.CryptoError:
            out["unwrap"].append(None)
    alice = c.Ephemeral(private=bytes(range(32)))
    bob = c.Ephemeral(private=bytes(range(32, 64)))
    out["x25519"] = [alice.public.hex(), alice.exchange(bob.public).hex()]
    sealer, opener = c.RecordCipher(bytes(range(32)), 7), c.RecordCipher(bytes(range(32)), 7)
    records = [sealer.seal(bytes(size)) for size in (0, 1, 100, 5000)]
    out["gcm"] = [r.hex() for r in records] + [opener.open(r).hex() for r in records]
    identity = eddsa.import_private_key(bytes(range(32)))
    public, message = c.identity_public(identity), b"transcript"
    signature = c.sign_identity(identity, message)
    s = int.from_bytes(signature[32:], "little") + c.ED25519_L
    neutral = (1).to_bytes(32, "little"), c.ED25519_BASE + (1).to_bytes(32, "little")
    out["ed25519"] = [signature.hex()] + [
        c.verify_identity(*case)
        for case in (
            (public, signature, message),
            (public, signature, message + b"!"),
            (public, signature[:32] + s.to_bytes(32, "little"), message),
            (*neutral, message),
        )
    ]
    return out
"""


def probe_inputs(rsa_key: RsaKey, spki: bytes) -> tuple[str, list[str]]:
    wrapped = [c.wrap_secret(spki, bytes([i]) * 32) for i in range(3)]
    bad = bytearray(wrapped[0])
    bad[5] ^= 1
    return rsa_key.export_key().decode(), [w.hex() for w in (*wrapped, bytes(bad))]


def probe_in_child(env_value: str, key_pem: str, wrapped: list[str]) -> dict:
    env = {**os.environ, "BCAST_PUBLIC_CRYPTO": env_value, "PYTHONPATH": str(ROOT)}
    script = PROBE + "\nimport json, sys\nprint(json.dumps(probe(*json.load(sys.stdin))))\n"
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([key_pem, wrapped]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_public_crypto_switch_uses_every_public_path_with_the_same_results(
    rsa_key: RsaKey, spki: bytes
):
    """BCAST_PUBLIC_CRYPTO=1: slow_paths names every fast path (so the server's start-up
    warning does), and every operation gives what the fast paths give."""
    key_pem, wrapped = probe_inputs(rsa_key, spki)
    child = probe_in_child("1", key_pem, wrapped)
    assert child.pop("public") is True
    assert child.pop("slow") == ALL_PUBLIC
    here: dict = {}
    exec(PROBE, here)
    ours = here["probe"](key_pem, wrapped)
    del ours["slow"], ours["public"]
    assert child == ours
    assert child["unwrap"] == [bytes([i] * 32).hex() for i in range(3)] + [None]
    assert child["ed25519"][1:] == [True, False, False, False]


def test_public_crypto_switch_is_only_the_value_1(rsa_key: RsaKey, spki: bytes):
    """Any other value of BCAST_PUBLIC_CRYPTO leaves the fast paths on (on this install)."""
    child = probe_in_child("0", *probe_inputs(rsa_key, spki))
    assert (child["public"], child["slow"]) == (False, [])


def start_child(work: Callable[[], object]) -> tuple[int, int]:
    """Fork a child that runs `work` and sends what it returns (as JSON) through a pipe;
    returns (pid, read end) for `finish_child`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            signal.alarm(2 * WAIT_S)
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def finish_child(child: tuple[int, int]) -> object:
    """What the child's `work` returned; a child that raised, crashed or hung fails."""
    pid, read_end = child
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child ended with status {status}"
    return json.loads(data)


def in_child(work: Callable[[], object]) -> object:
    """Run `work` in a forked child and return what it returned."""
    return finish_child(start_child(work))


def blinding_value(lean: fc.LeanOaep) -> str:
    """r^e mod n of the lean OAEP's current blinding pair, in hex."""
    from Crypto.Util._raw_api import c_size_t, create_string_buffer, get_raw_buffer

    out = create_string_buffer(lean._k)
    assert lean._blinding is not None
    assert lean._lib.nat_to_bytes(out, c_size_t(lean._k), lean._blinding[0].get(), 0) == 0
    return get_raw_buffer(out).hex()


def test_forked_child_draws_a_fresh_blinding(monkeypatch, rsa_key: RsaKey, spki: bytes):
    """After fork() the child must not continue the parent's sequence of blinding factors
    (both would square the same r), nor wait on a lock the parent held at fork()."""
    from Crypto.Math.Numbers import Integer

    lean = fc.LeanOaep(rsa_key)
    secret = bytes(range(32))
    wrapped = c.wrap_secret(spki, secret)
    assert lean.decrypt(wrapped) == secret  # the parent draws r and has uses left
    draws = []
    draw = Integer.random_range

    def counting(**kwargs):
        draws.append(1)
        return draw(**kwargs)

    monkeypatch.setattr(Integer, "random_range", counting)

    def child() -> object:
        return [lean.decrypt(wrapped) == secret, len(draws), blinding_value(lean)]

    with lean._blinding_lock:  # held by the parent at fork()
        ok, child_draws, child_value = in_child(child)
    assert lean.decrypt(wrapped) == secret
    assert draws == []  # the parent went on squaring its r
    assert ok and child_draws == 1
    assert child_value != blinding_value(lean)


def test_lean_oaep_keeps_the_buffers_it_points_into(rsa_key: RsaKey, spki: bytes):
    """pycryptodome swaps a number's buffer on in-place operations: the lean OAEP must
    keep the buffers it took pointers from, not just the numbers (run in a child, as
    a use after free may crash)."""
    from Crypto.Math._IntegerNat import IntegerNat

    key = RSA.import_key(rsa_key.export_key())
    lean = fc.LeanOaep(key)
    jobs = [(bytes([i]) * 32, c.wrap_secret(spki, bytes([i]) * 32)) for i in range(20)]

    def child() -> object:
        for name in ("_n", "_crt_p", "_crt_q", "_crt_dp", "_crt_dq", "_crt_u"):
            number = getattr(key, name)
            number._adopt(IntegerNat(int(number)))  # the old buffer loses its owner
            number._mont = None
        gc.collect()
        churn = [IntegerNat(int.from_bytes(os.urandom(128), "big")) for _ in range(4000)]
        results = [lean.decrypt(wrapped) == secret for secret, wrapped in jobs]
        del churn
        return results

    assert in_child(child) == [True] * len(jobs)
