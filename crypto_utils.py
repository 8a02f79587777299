"""Every cryptographic choice of bcast/1 in one place (PROTOCOL.md §2, §3, §5).

Nothing here touches sockets or threads. Each failure surfaces as one exception
type, `CryptoError`, whose message says what went wrong (never key material).

This module is the policy, on pycryptodome's public API. Where a fast path in
`_fastcrypto` (on pycryptodome's private internals) passed its self-check
against that public API, it serves instead; `slow_paths` names those that do
not. The environment variable BCAST_PUBLIC_CRYPTO=1, read at import, switches
every fast path off (to compare, or to rule them out when chasing a bug).

Thread safety: a `RecordCipher` owns a counter; it must be used by one thread
at a time (the server gives each direction of each connection its own, only
its writer seals, only its reader opens). `unwrap_secret` and
`verify_identity` may run in many threads at once.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol import DH
from Crypto.PublicKey import ECC, RSA
from Crypto.PublicKey.ECC import EccKey
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Random import get_random_bytes
from Crypto.Signature import eddsa

import _fastcrypto

# PROTOCOL.md §2: "at least 2048 bits (3072 by default)".
DEFAULT_RSA_BITS = 3072
MIN_RSA_BITS = 2048
SECRET_BYTES = 32  # the RSA-wrapped secret and both nonces are 32 bytes
NONCE_BYTES = 32
X25519_BYTES = 32
SESSION_KEY_BYTES = 32
TAG_BYTES = 16  # AES-GCM tag appended to each record
# §3: a side closes before its send counter would reach 2**32.
MAX_RECORDS_PER_DIRECTION = 2**32
HKDF_INFO_LABEL = b"bcast/1 keys"
# §5: raw Ed25519 public keys and signatures, and the label the proof signs.
IDENTITY_BYTES = 32
SIGNATURE_BYTES = 64
IDENTITY_LABEL = b"bcast/1 identity"
# A PEM key file is a few KiB at most; reading stops well past that.
MAX_KEY_FILE_BYTES = 64 * 1024

# Read once: every fast path is chosen (or not) at import or at a key's first use.
PUBLIC_CRYPTO = os.environ.get("BCAST_PUBLIC_CRYPTO") == "1"

RandomBytes = Callable[[int], bytes]
IdentityKey = EccKey  # an Ed25519 private key
K = TypeVar("K")


class CryptoError(Exception):
    """Any cryptographic failure: bad key file, bad ciphertext, bad point."""


class KeyFileError(CryptoError):
    """A key file cannot be used; the message names the file, why, and what to do."""


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes (the default randomness source)."""
    return get_random_bytes(n)


# --- key files: the server's RSA key (§2) and a client's Ed25519 identity (§5) ---


def load_or_create_server_key(
    path: Path, bits: int = DEFAULT_RSA_BITS, randfunc: RandomBytes | None = None
) -> RsaKey:
    """Load the server's RSA key from `path`, creating it (mode 0600) if absent.

    Refuses, with one sentence naming the file, anything `_read_key_file`
    refuses, a key that does not parse, or one under 2048 bits (§2).
    """
    path = Path(path)

    def create() -> tuple[RsaKey, bytes]:
        if bits < MIN_RSA_BITS:
            raise KeyFileError(
                f"refusing to create a {bits}-bit key: the minimum is {MIN_RSA_BITS}"
            )
        key = _new_rsa_key(bits, randfunc)
        return key, key.export_key(format="PEM")

    return _load_or_create(path, lambda data: _parse_rsa_key(path, data), create)


def _new_rsa_key(bits: int, randfunc: RandomBytes | None) -> RsaKey:
    return RSA.generate(bits, randfunc=randfunc)


def _parse_rsa_key(path: Path, data: bytes) -> RsaKey:
    try:
        key = RSA.import_key(data)
    except (ValueError, IndexError, TypeError):
        raise KeyFileError(f"the key file {path} does not hold a valid RSA key") from None
    if not key.has_private():
        raise KeyFileError(f"the key file {path} holds a public key, not a private key")
    if key.size_in_bits() < MIN_RSA_BITS:
        raise KeyFileError(
            f"the key in {path} has {key.size_in_bits()} bits, under the minimum of "
            f"{MIN_RSA_BITS}; move it away to let the server create a new one"
        )
    return key


def load_or_create_identity(path: Path) -> IdentityKey:
    """Load a client's Ed25519 identity key from `path`, creating it if absent (§5).

    The same file rules as the server's key (PEM, mode 0600, same refusals),
    and a file that does not hold an Ed25519 private key is refused.
    """
    path = Path(path)

    def create() -> tuple[IdentityKey, bytes]:
        key = _new_identity_key()
        return key, key.export_key(format="PEM").encode("ascii")

    return _load_or_create(path, lambda data: _parse_identity(path, data), create)


def _new_identity_key() -> IdentityKey:
    return ECC.generate(curve="Ed25519")


def _parse_identity(path: Path, data: bytes) -> IdentityKey:
    try:
        key = ECC.import_key(data)
    except (ValueError, IndexError, TypeError):
        key = None
    if key is None or key.curve != "Ed25519":
        raise KeyFileError(f"the key file {path} does not hold an Ed25519 key")
    if not key.has_private():
        raise KeyFileError(f"the key file {path} holds a public key, not a private key")
    return key


def _load_or_create(
    path: Path, parse: Callable[[bytes], K], create: Callable[[], tuple[K, bytes]]
) -> K:
    """Parse the key at `path`, or create one there; a key that another process
    placed meanwhile wins, so two processes starting at once end with one key."""
    data = _read_key_file(path)
    if data is not None:
        return parse(data)
    key, pem = create()
    if _place_key_file(path, pem):
        return key
    data = _read_key_file(path)
    if data is None:
        raise KeyFileError(f"the key file {path} vanished as it was being created; start again")
    return parse(data)


def _read_key_file(path: Path) -> bytes | None:
    """The bytes of the key file, or None if there is none.

    Opened without following a symbolic link and without blocking (a FIFO),
    then checked and read through the same descriptor, so what is checked is
    what is read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # Linux, FreeBSD: a symbolic link
            raise KeyFileError(
                f"the key file {path} is a symbolic link, which is refused; "
                "give the path of the file itself"
            ) from None
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        _check_key_file(path, os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise KeyFileError(
            f"the key file {path} is over {MAX_KEY_FILE_BYTES} bytes, too large for a key; "
            "check the path"
        )
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def _check_key_file(path: Path, info: os.stat_result) -> None:
    """Refuse anything but a regular file of ours that only we may read or write."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "a special file")
        raise KeyFileError(
            f"the key file {path} is {kind}, not a regular file; "
            "remove it or give the path of a key file"
        )
    uid = os.geteuid()
    if info.st_uid != uid:
        raise KeyFileError(
            f"the key file {path} belongs to uid {info.st_uid}, not to this user (uid {uid}); "
            "give the path of a key file of your own"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}' and start again"
        )


def _place_key_file(path: Path, pem: bytes) -> bool:
    """Write `pem` to `path` atomically, mode 0600 from the first byte; False if a
    file appeared at `path` meanwhile (it is left alone).

    The key goes to a temporary file in the same folder, synced, then hard-linked
    into place: a link never replaces a file, and a reader never sees half a key.
    """
    _make_folders(path.parent)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise KeyFileError(f"cannot create the key file {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask only ever removes rights; this makes it exact
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise KeyFileError(f"cannot create the key file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    _fsync_folder(path.parent)
    return True


def _make_folders(folder: Path) -> None:
    """Create `folder` and its missing parents with mode 0700 (as XDG asks)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise KeyFileError(
                f"cannot create the folder {each} for the key file: {exc.strerror}"
            ) from None


def _fsync_folder(folder: Path) -> None:
    """Make the new name durable; a file system that cannot sync a folder is let be."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the server's identity (§2) ---


def spki_der(key: RsaKey) -> bytes:
    """DER SubjectPublicKeyInfo of the public half: what `hello.key` carries (§2)."""
    return key.public_key().export_key(format="DER")


def fingerprint(spki: bytes) -> str:
    """OpenSSH-style fingerprint: "SHA256:" + unpadded base64 of SHA256(SPKI DER)."""
    digest = hashlib.sha256(spki).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def import_spki(spki: bytes) -> RsaKey:
    """Parse a server's public key from DER SPKI, refusing keys under 2048 bits."""
    try:
        key = RSA.import_key(spki)
    except (ValueError, IndexError, TypeError):
        raise CryptoError("the server's public key is not a valid RSA key") from None
    if key.has_private() or key.size_in_bits() < MIN_RSA_BITS:
        raise CryptoError("the server's public key is unusable (private or under 2048 bits)")
    return key


# --- RSA-OAEP for the 32-byte secret (§2) ---


def _oaep(key: RsaKey, randfunc: RandomBytes | None = None) -> PKCS1_OAEP.PKCS1OAEP_Cipher:
    # pycryptodome defaults to SHA-1: the spec says SHA-256, which MGF1 then uses too.
    return PKCS1_OAEP.new(key, hashAlgo=SHA256, randfunc=randfunc)


def wrap_secret(spki: bytes, secret: bytes, randfunc: RandomBytes | None = None) -> bytes:
    """Client side: RSA-OAEP-encrypt the 32-byte secret to the server's key."""
    if len(secret) != SECRET_BYTES:
        raise CryptoError(f"the secret must be {SECRET_BYTES} bytes, not {len(secret)}")
    return _oaep(import_spki(spki), randfunc).encrypt(secret)


def unwrap_secret(key: RsaKey, ciphertext: bytes) -> bytes:
    """Server side: decrypt the wrapped secret; anything but exactly 32 bytes fails."""
    try:
        secret = unwrapper(key)(ciphertext)
    except (ValueError, TypeError):
        raise CryptoError("the secret does not decrypt under the server key") from None
    if len(secret) != SECRET_BYTES:
        raise CryptoError(f"the secret decrypts to {len(secret)} bytes, not {SECRET_BYTES}")
    return secret


Unwrap = Callable[[bytes], bytes]
_UNWRAPPERS: dict[int, tuple[RsaKey, Unwrap]] = {}
_LeanOaep = _fastcrypto.LeanOaep  # the fast path's class, for slow_paths


def unwrapper(key: RsaKey) -> Unwrap:
    """The OAEP-SHA256 decryption of `key`: the fast one if its self-check passes, else
    pycryptodome's public OAEP. Made once per key (the server warms it at start)."""
    known = _UNWRAPPERS.get(id(key))
    if known is not None and known[0] is key:
        return known[1]
    standard: Unwrap = _oaep(key).decrypt
    fast = None if PUBLIC_CRYPTO else _fastcrypto.select_unwrap(key, standard)
    chosen = fast or standard
    _UNWRAPPERS[id(key)] = (key, chosen)  # the key is kept, so its id is not reused
    return chosen


# --- X25519 ephemeral exchange (§2) ---


X25519Function = Callable[[bytes, bytes], bytes]
X25519_BASE = (9).to_bytes(X25519_BYTES, "little")


def _x25519_standard(scalar: bytes, u: bytes) -> bytes:
    """X25519(scalar, u) of RFC 7748 (both raw 32 bytes) through pycryptodome's public DH API."""
    private = DH.import_x25519_private_key(scalar)
    peer = DH.import_x25519_public_key(u)
    return DH.key_agreement(eph_priv=private, eph_pub=peer, kdf=bytes)


X25519_IMPL: X25519Function = (
    None if PUBLIC_CRYPTO else _fastcrypto.select_x25519(_x25519_standard)
) or _x25519_standard


class Ephemeral:
    """A one-connection X25519 key pair whose private half is dropped after `exchange`.

    Dropping it is what gives forward secrecy (§2): once both sides forget their
    private halves, a recorded session cannot be reopened with the RSA key alone.
    """

    def __init__(self, private: bytes | None = None, randfunc: RandomBytes = random_bytes):
        seed = private if private is not None else randfunc(X25519_BYTES)
        if len(seed) != X25519_BYTES:
            raise CryptoError(f"an X25519 private key is {X25519_BYTES} bytes, not {len(seed)}")
        self._private: bytes | None = seed
        self.public: bytes = X25519_IMPL(seed, X25519_BASE)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519(own private, peer public); refuses low-order points (all-zero result)."""
        private, self._private = self._private, None
        if private is None:
            raise CryptoError("this ephemeral key was already used")
        if len(peer_public) != X25519_BYTES:
            raise CryptoError(
                f"an X25519 public key is {X25519_BYTES} bytes, not {len(peer_public)}"
            )
        try:
            shared = X25519_IMPL(private, peer_public)
        except (ValueError, TypeError):
            raise CryptoError("the peer's X25519 key is a low-order point") from None
        if not any(shared):
            raise CryptoError("the X25519 result is all zeros (low-order point)")
        return shared


# --- session keys (§2) ---


def derive_keys(
    secret: bytes,
    dh: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    server_spki: bytes,
    server_eph: bytes,
    client_eph: bytes,
) -> tuple[bytes, bytes]:
    """HKDF-SHA256 exactly as §2 "Session keys"; returns (k_c2s, k_s2c)."""
    info = HKDF_INFO_LABEL + hashlib.sha256(server_spki).digest() + server_eph + client_eph
    okm = hkdf_sha256(secret + dh, server_nonce + client_nonce, info, 2 * SESSION_KEY_BYTES)
    return okm[:SESSION_KEY_BYTES], okm[SESSION_KEY_BYTES:]


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) on the standard library's C HMAC, which costs less than
    pycryptodome's HKDF (the tests compare both, and `cryptography`'s)."""
    prk = hmac.digest(salt, ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, (length + 31) // 32 + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


# --- records (§3) ---


def record_nonce(seq: int) -> bytes:
    """§3: the 12-byte GCM nonce of record number `seq`: 0x00000000 || u64be(seq)."""
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")


class _StandardGcm:
    """AES-256-GCM for records through pycryptodome's public API."""

    def __init__(self, key: bytes):
        self._key = key

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=record_nonce(seq), mac_len=TAG_BYTES)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return ciphertext + tag

    def open(self, seq: int, record: bytes) -> bytes:
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=record_nonce(seq), mac_len=TAG_BYTES)
        return cipher.decrypt_and_verify(record[:-TAG_BYTES], record[-TAG_BYTES:])


GCM_IMPL: type = (None if PUBLIC_CRYPTO else _fastcrypto.select_gcm(_StandardGcm)) or _StandardGcm


class RecordCipher:
    """AES-256-GCM for one direction, with the implicit counter nonce of §3.

    The counter advances only on success, so a record that fails to open
    leaves it where it was (the caller closes the connection anyway). Not
    thread-safe: one thread seals (or opens) at a time.
    """

    def __init__(self, key: bytes, seq: int = 0):
        if len(key) != SESSION_KEY_BYTES:
            raise CryptoError(f"a record key is {SESSION_KEY_BYTES} bytes, not {len(key)}")
        self._gcm = GCM_IMPL(key)
        self.seq = seq

    @property
    def exhausted(self) -> bool:
        """True once sealing another record would take the counter to 2**32 (§3)."""
        return self.seq >= MAX_RECORDS_PER_DIRECTION - 1

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt one record: ciphertext || 16-byte tag; advances the counter."""
        if self.exhausted:
            raise CryptoError("the record counter is exhausted; the connection must close")
        record = self._gcm.seal(self.seq, plaintext)
        self.seq += 1
        return record

    def open(self, record: bytes) -> bytes:
        """Decrypt and authenticate one record; CryptoError if it is not the next one."""
        if len(record) < TAG_BYTES:
            raise CryptoError(f"a record of {len(record)} bytes is shorter than its tag")
        if self.seq >= MAX_RECORDS_PER_DIRECTION:
            raise CryptoError("the peer's record counter is exhausted")
        try:
            plaintext = self._gcm.open(self.seq, record)
        except ValueError:
            raise CryptoError(
                f"record {self.seq} failed to open (tampered, replayed, reordered or dropped)"
            ) from None
        self.seq += 1
        return plaintext


# --- the two halves of the handshake (§2) ---


def server_keys(
    key: RsaKey,
    server_spki: bytes,
    server_nonce: bytes,
    server_eph: Ephemeral,
    client_nonce: bytes,
    wrapped_secret: bytes,
    client_eph: bytes,
) -> tuple[bytes, bytes]:
    """Server side of §2: unwrap, exchange, derive; returns (k_c2s, k_s2c)."""
    server_eph_public = server_eph.public
    secret = unwrap_secret(key, wrapped_secret)
    dh = server_eph.exchange(client_eph)
    return derive_keys(
        secret, dh, server_nonce, client_nonce, server_spki, server_eph_public, client_eph
    )


def client_keys(
    server_spki: bytes,
    server_nonce: bytes,
    server_eph: bytes,
    randfunc: RandomBytes = random_bytes,
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Client side of §2; returns (client_nonce, wrapped_secret, client_eph, k_c2s, k_s2c)."""
    secret = randfunc(SECRET_BYTES)
    client_nonce = randfunc(NONCE_BYTES)
    wrapped = wrap_secret(server_spki, secret)
    eph = Ephemeral(randfunc=randfunc)
    client_eph = eph.public
    dh = eph.exchange(server_eph)
    k_c2s, k_s2c = derive_keys(
        secret, dh, server_nonce, client_nonce, server_spki, server_eph, client_eph
    )
    return client_nonce, wrapped, client_eph, k_c2s, k_s2c


# --- a client's Ed25519 identity (§5) ---

ED25519_P = 2**255 - 19
ED25519_L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
ED25519_BASE = bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666")
# The canonical encodings of the 8 points of small order (the torsion subgroup):
# for such a key anyone can make signatures that satisfy the equation (§5).
ED25519_SMALL_ORDER = frozenset(
    bytes.fromhex(point)
    for point in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # neutral
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    )
)


def identity_public(key: IdentityKey) -> bytes:
    """The raw 32-byte Ed25519 public key that `join.identity` carries (§5)."""
    return key.public_key().export_key(format="raw")


def identity_fingerprint(public: bytes) -> str:
    """§5: "SHA256:" + unpadded base64 of SHA256(raw 32-byte public key)."""
    if len(public) != IDENTITY_BYTES:
        raise CryptoError(f"an identity is {IDENTITY_BYTES} bytes, not {len(public)}")
    return fingerprint(public)


def identity_transcript(
    spki: bytes, server_nonce: bytes, client_nonce: bytes, server_eph: bytes, client_eph: bytes
) -> bytes:
    """§5: what a proof signs: the label, SHA256(server SPKI), then both nonces and both
    ephemeral keys of this connection (all 32 bytes, so the layout is unambiguous)."""
    for name, value in (
        ("server nonce", server_nonce),
        ("client nonce", client_nonce),
        ("server eph", server_eph),
        ("client eph", client_eph),
    ):
        if len(value) != 32:
            raise CryptoError(f"the {name} of a transcript is 32 bytes, not {len(value)}")
    return (
        IDENTITY_LABEL
        + hashlib.sha256(spki).digest()
        + server_nonce
        + client_nonce
        + server_eph
        + client_eph
    )


def sign_identity(key: IdentityKey, transcript: bytes) -> bytes:
    """The 64-byte pure Ed25519 signature (RFC 8032) of `transcript`: `join.proof`."""
    if getattr(key, "curve", None) != "Ed25519" or not key.has_private():
        raise CryptoError("an identity proof needs an Ed25519 private key")
    return eddsa.new(key, "rfc8032").sign(transcript)


def verify_identity(public: bytes, signature: bytes, transcript: bytes) -> bool:
    """§5: whether `signature` is `public`'s Ed25519 signature of `transcript`, strictly.

    False for wrong sizes, S >= L (a malleated signature), a key that is not
    the canonical encoding of a curve point or is of small order, and any
    signature whose equation does not hold. The equation is checked as
    encode([S]B - [k]A) == R, so a non-canonical R is refused too.
    """
    if not (
        isinstance(public, bytes)
        and isinstance(signature, bytes)
        and len(public) == IDENTITY_BYTES
        and len(signature) == SIGNATURE_BYTES
    ):
        return False
    if int.from_bytes(signature[32:], "little") >= ED25519_L:
        return False
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y >= ED25519_P or public in ED25519_SMALL_ORDER:
        return False
    if public[31] & 0x80 and y in (1, ED25519_P - 1):  # x = 0 with the sign bit set
        return False
    try:
        return ED25519_VERIFY_IMPL(public, signature, bytes(transcript))
    except (ValueError, TypeError):  # not a curve point, or a transcript not of bytes
        return False


_ED25519_B = eddsa.import_public_key(ED25519_BASE).pointQ


def _ed25519_verify_standard(public: bytes, signature: bytes, message: bytes) -> bool:
    """encode([S]B - [k]A) == R through pycryptodome's public ECC API; ValueError if
    `public` is not a curve point. The caller checks sizes, S and the key."""
    a = eddsa.import_public_key(public).pointQ
    s = int.from_bytes(signature[32:], "little")
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little")
    x, y = (_ED25519_B * s + -(a * (k % ED25519_L))).xy
    return (y | (x & 1) << 255).to_bytes(32, "little") == signature[:32]


Ed25519Verify = Callable[[bytes, bytes, bytes], bool]
ED25519_VERIFY_IMPL: Ed25519Verify = (
    None if PUBLIC_CRYPTO else _fastcrypto.select_ed25519(_ed25519_verify_standard)
) or _ed25519_verify_standard


# --- which fast paths this install uses ---


def slow_paths(key: RsaKey) -> list[str]:
    """The paths served by pycryptodome's public API (correct, but costlier) because a
    fast path failed its self-check or BCAST_PUBLIC_CRYPTO=1: for the server to say so."""
    slow = []
    if GCM_IMPL is _StandardGcm:
        slow.append("AES-GCM records")
    if X25519_IMPL is _x25519_standard:
        slow.append("X25519")
    if not isinstance(getattr(unwrapper(key), "__self__", None), _LeanOaep):
        slow.append("RSA-OAEP")
    if ED25519_VERIFY_IMPL is _ed25519_verify_standard:
        slow.append("Ed25519 identity")
    return slow
