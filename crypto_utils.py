"""Every cryptographic choice of bcast/1 in one place (PROTOCOL.md §2, §3).

Nothing here touches sockets or threads. Each failure surfaces as one exception
type, `CryptoError`, whose message says what went wrong (never key material).

Thread safety: a `RecordCipher` owns a counter; it must be used by one thread
at a time. The server gives each direction of each connection its own
instance, and only the connection's writer seals, only its reader opens.
`unwrap_secret` may run in many threads at once: the per-key `_LeanOaep`
guards its blinding state with a lock and hands each call its own buffers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol import DH
from Crypto.PublicKey import RSA
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Random import get_random_bytes

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

RandomBytes = Callable[[int], bytes]


class CryptoError(Exception):
    """Any cryptographic failure: bad key file, bad ciphertext, bad point."""


class KeyFileError(CryptoError):
    """The server key file cannot be used; the message names the file and why."""


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes (the default randomness source)."""
    return get_random_bytes(n)


# --- the server's long-term RSA key ---


def load_or_create_server_key(
    path: Path, bits: int = DEFAULT_RSA_BITS, randfunc: RandomBytes | None = None
) -> RsaKey:
    """Load the server's RSA key from `path`, creating it (mode 0600) if absent.

    Refuses, with one sentence naming the file, a key readable by group or
    others, one that does not parse, or one under 2048 bits (§2).
    """
    path = Path(path)
    if not path.exists():
        return _create_server_key(path, bits, randfunc)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"the key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); run 'chmod 600 {path}' and start again"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None
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


def _create_server_key(path: Path, bits: int, randfunc: RandomBytes | None) -> RsaKey:
    """Generate a key and write it with mode 0600 from the first byte (O_EXCL, fchmod)."""
    if bits < MIN_RSA_BITS:
        raise KeyFileError(f"refusing to create a {bits}-bit key: the minimum is {MIN_RSA_BITS}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise KeyFileError(
            f"cannot create the folder {path.parent} for the key file: {exc.strerror}"
        ) from None
    key = RSA.generate(bits, randfunc=randfunc)
    pem = key.export_key(format="PEM")
    try:
        # O_EXCL: never overwrite a key that appeared meanwhile; 0o600 is masked by the
        # umask only towards fewer rights, and fchmod makes it exact whatever the umask.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_server_key(path, bits, randfunc)
    except OSError as exc:
        raise KeyFileError(f"cannot create the key file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


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


# --- RSA-OAEP for the 32-byte secret ---


def _oaep(key: RsaKey, randfunc: RandomBytes | None = None) -> PKCS1_OAEP.PKCS1OAEP_Cipher:
    # pycryptodome defaults to SHA-1: the spec says SHA-256 for both the hash and MGF1.
    # The MGF1 is ours only for speed; it is the same function (tests compare them).
    return PKCS1_OAEP.new(key, hashAlgo=SHA256, mgfunc=_mgf1_sha256, randfunc=randfunc)


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-256 (RFC 8017 B.2.1), as OAEP's mask function.

    The same function pycryptodome uses by default for SHA-256, through hashlib:
    it runs a dozen hashes per decryption, and pycryptodome's hash objects cost
    ~10 us each in Python, which a storm of handshakes pays while holding the GIL.
    """
    blocks = (length + 31) // 32
    return b"".join(
        hashlib.sha256(seed + counter.to_bytes(4, "big")).digest() for counter in range(blocks)
    )[:length]


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


def unwrapper(key: RsaKey) -> Unwrap:
    """The OAEP-SHA256 decryption of `key`: `_LeanOaep` if its self-check passes, else
    pycryptodome's public OAEP. Made once per key (the server warms it at start)."""
    known = _UNWRAPPERS.get(id(key))
    if known is not None and known[0] is key:
        return known[1]
    standard: Unwrap = _oaep(key).decrypt
    chosen = standard
    try:
        lean = _LeanOaep(key)
        if _same_unwrap(lean.decrypt, standard, key):
            chosen = lean.decrypt
    except Exception:  # any missing private piece: keep the public API
        pass
    _UNWRAPPERS[id(key)] = (key, chosen)  # the key is kept, so its id is not reused
    return chosen


def _same_unwrap(lean: Unwrap, standard: Unwrap, key: RsaKey) -> bool:
    """Whether `lean` decrypts and refuses exactly as `standard` on a few ciphertexts."""
    public = PKCS1_OAEP.new(key.public_key(), hashAlgo=SHA256)
    good = [public.encrypt(bytes([i]) * size) for i, size in enumerate((32, 0, 1, 33))]
    bad = bytearray(good[0])
    bad[len(bad) // 2] ^= 1
    for ciphertext in (*good, bytes(bad), bytes(len(bad))):
        outcomes = []
        for decrypt in (lean, standard):
            try:
                outcomes.append(decrypt(ciphertext))
            except (ValueError, TypeError):
                outcomes.append(None)
        if outcomes[0] != outcomes[1]:
            return False
    return True


class _LeanOaep:
    """RSA-OAEP-SHA256 decryption for one private key with ~18 calls into C, not ~90.

    pycryptodome's Python layers around its C naturals (a new number, a check,
    a free for each step) cost ~75 calls into C per RSA decryption. Each call
    releases the GIL, and in a storm of handshakes each release wakes a waiting
    thread for nothing (futex alone was 12 % of the server's time). Here the
    same constant-time C functions (`Crypto.Math._IntegerNat`, private) run the
    same blinded CRT steps as `RsaKey._decrypt_to_bytes`, on buffers made once
    and reused; the OAEP unmasking is pycryptodome's own steps (`oaep.py`),
    with its constant-time C check. Nothing secret goes through Python
    integers. `unwrapper` checks this class against the public API for each
    key and falls back if anything differs or is missing.
    """

    BLINDING_USES = 32  # as pycryptodome: a fresh r every 32 decryptions, squared between
    SCRATCH_KEPT = 16  # buffer sets kept for reuse (~3 KiB each for RSA-3072)

    def __init__(self, key: RsaKey):
        from Crypto.Cipher._pkcs1_oaep_decode import oaep_decode
        from Crypto.Math import _IntegerNat
        from Crypto.Util.strxor import strxor

        if not key.has_private():
            raise TypeError("not a private key")
        self._lib, self._new_nat = _IntegerNat._lib, _IntegerNat._new_nat
        self._oaep_decode, self._strxor = oaep_decode, strxor
        self._key = key
        self._n_int = int(key.n)
        self._k = (self._n_int.bit_length() + 7) // 8
        n, p, q = key._n, key._crt_p, key._crt_q  # IntegerNat, else AttributeError: fallback
        if not all(isinstance(x, _IntegerNat.IntegerNat) for x in (n, p, q)):
            raise TypeError("not pycryptodome's C naturals")
        # Keep the numbers and their Montgomery contexts alive with this object.
        self._numbers = (n, p, q, key._crt_dp, key._crt_dq, key._crt_u)
        self._contexts = (n._mont_ctx(), p._mont_ctx(), q._mont_ctx())
        self._n, self._p, self._q, self._dp, self._dq, self._u = (x._p.get() for x in self._numbers)
        self._ctx_n, self._ctx_p, self._ctx_q = (ctx.get() for ctx in self._contexts)
        self._dp_bits, self._dq_bits = key._crt_dp._bits, key._crt_dq._bits
        self._bits = (n._bits, p._bits, q._bits)
        self._lhash = hashlib.sha256(b"").digest()
        self._blinding_lock = threading.Lock()
        self._blinding: tuple[Any, Any, int] | None = None
        self._scratch: list[tuple[Any, ...]] = []  # buffer sets; pop/append are atomic

    def _check(self, result: int, what: str) -> None:
        if result:
            raise ValueError(f"error {result} in {what}")

    def _blinding_pair(self) -> tuple[Any, Any]:
        """(r^e mod n, r^-1 mod n) for a secret r that changes at each call, as pycryptodome."""
        from Crypto.Math.Numbers import Integer

        with self._blinding_lock:
            state = self._blinding
            if state is None or state[2] == 0:
                n = self._numbers[0]
                r = Integer.random_range(min_inclusive=1, max_exclusive=n)
                state = (pow(r, self._key.e, n)._p, r.inverse(n)._p, self.BLINDING_USES)
            else:
                squares = []
                for old in state[:2]:
                    new = self._new_nat(self._bits[0])
                    self._check(
                        self._lib.nat_mulmod_ctx(
                            new.get(), old.get(), old.get(), self._n, self._ctx_n
                        ),
                        "nat_mulmod_ctx",
                    )
                    squares.append(new)
                state = (squares[0], squares[1], state[2])
            self._blinding = (state[0], state[1], state[2] - 1)
        return state[0], state[1]

    def _buffers(self) -> tuple[Any, ...]:
        try:
            return self._scratch.pop()
        except IndexError:
            n_bits, p_bits, q_bits = self._bits
            sizes = (8 * self._k, n_bits, p_bits, q_bits, q_bits, q_bits, p_bits + q_bits + 1)
            return tuple(self._new_nat(bits) for bits in (*sizes, n_bits))

    def encoded_message(self, ciphertext: bytes) -> bytes:
        """RSADP + I2OSP (RFC 8017 5.1.2): the k-byte EM of `ciphertext`, blinded CRT."""
        from Crypto.Util._raw_api import c_size_t, create_string_buffer, get_raw_buffer

        k = self._k
        if len(ciphertext) != k or int.from_bytes(ciphertext, "big") >= self._n_int:
            raise ValueError("ciphertext with incorrect length or out of range")
        r_e, r_inv = self._blinding_pair()
        buffers = self._buffers()
        c, cp, m1, m2, h, hu, mp, m = (b.get() for b in buffers)
        lib, check = self._lib, self._check
        check(lib.nat_from_bytes(c, ciphertext, c_size_t(k), 0), "nat_from_bytes")
        check(lib.nat_mulmod_ctx(cp, c, r_e.get(), self._n, self._ctx_n), "blind")
        check(
            lib.nat_powmod_ctx(m1, cp, self._dp, c_size_t(self._dp_bits), 0, self._p, self._ctx_p),
            "powmod p",
        )
        check(
            lib.nat_powmod_ctx(m2, cp, self._dq, c_size_t(self._dq_bits), 0, self._q, self._ctx_q),
            "powmod q",
        )
        check(lib.nat_submod(h, m2, m1, self._q), "nat_submod")  # (m2 - m1) mod q
        check(lib.nat_mulmod_ctx(hu, h, self._u, self._q, self._ctx_q), "nat_mulmod_ctx")
        check(lib.nat_muladd(mp, m1, hu, self._p), "nat_muladd")  # m' = m1 + h * p, under n
        check(lib.nat_mulmod_ctx(m, r_inv.get(), mp, self._n, self._ctx_n), "unblind")
        out = create_string_buffer(k)
        check(lib.nat_to_bytes(out, c_size_t(k), m, 0), "nat_to_bytes")
        if len(self._scratch) < self.SCRATCH_KEPT:  # a spike's extra sets are freed
            self._scratch.append(buffers)
        return get_raw_buffer(out)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """RSAES-OAEP-DECRYPT with SHA-256, MGF1-SHA-256 and an empty label (RFC 8017 7.1.2)."""
        em = self.encoded_message(ciphertext)
        h_len = len(self._lhash)
        # Y = em[0] must be 0, but is only checked with the rest, in constant time (Manger).
        masked_seed, masked_db = em[1 : h_len + 1], em[h_len + 1 :]
        seed = self._strxor(masked_seed, _mgf1_sha256(masked_db, h_len))
        db = self._strxor(masked_db, _mgf1_sha256(seed, self._k - h_len - 1))
        start = self._oaep_decode(em, self._lhash, db)
        if start <= 0:
            raise ValueError("Incorrect decryption.")
        return db[start:]


# --- X25519 ephemeral exchange ---


X25519Function = Callable[[bytes, bytes], bytes]
X25519_BASE = (9).to_bytes(X25519_BYTES, "little")
_X25519_P = 2**255 - 19
# The u-coordinates (mod p) of the points of small order: refused as pycryptodome
# does (http://cr.yp.to/ecdh.html#validate); the all-zero result check covers the rest.
_X25519_SMALL_ORDER = frozenset(
    (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _X25519_P - 1,
    )
)


def _x25519_standard(scalar: bytes, u: bytes) -> bytes:
    """X25519(scalar, u) of RFC 7748 (both raw 32 bytes) through pycryptodome's public DH API."""
    private = DH.import_x25519_private_key(scalar)
    peer = DH.import_x25519_public_key(u)
    return DH.key_agreement(eph_priv=private, eph_pub=peer, kdf=bytes)


def _x25519_lean(scalar: bytes, u: bytes) -> bytes:
    """The same with 4 calls into pycryptodome's C curve25519 (`_point`, private), not ~40.

    The public API builds ECC key and point objects on C naturals: ~40 calls into
    C per operation, each of which lets go of the GIL (see `_LeanOaep`).
    `_select_x25519` checks this against `_x25519_standard` at import.
    """
    from Crypto.Util._raw_api import (
        SmartPointer,
        VoidPointer,
        c_size_t,
        c_ulonglong,
        create_string_buffer,
        get_raw_buffer,
        null_pointer,
    )

    if len(scalar) != X25519_BYTES or len(u) != X25519_BYTES:
        raise ValueError("X25519 scalars and points are 32 bytes")
    u_value = int.from_bytes(u, "little") & ((1 << 255) - 1)  # RFC 7748 5: mask bit 255
    if u_value % _X25519_P in _X25519_SMALL_ORDER:
        raise ValueError("Invalid Curve25519 public key")
    clamped = bytearray(scalar)
    clamped[0] &= 0xF8
    clamped[31] = (clamped[31] & 0x7F) | 0x40
    lib = _CURVE25519.rawlib
    raw = VoidPointer()
    size = c_size_t(X25519_BYTES)
    if lib.new_point(raw.address_of(), u_value.to_bytes(X25519_BYTES, "big"), size, null_pointer):
        raise ValueError("Invalid Curve25519 public key")
    point = SmartPointer(raw.get(), lib.free_point)
    blind = c_ulonglong(int.from_bytes(os.urandom(8), "little"))  # the ladder's randomisation
    if lib.scalar(point.get(), bytes(reversed(clamped)), size, blind):
        raise ValueError("X25519 scalar multiplication failed")
    x = create_string_buffer(X25519_BYTES)
    if lib.get_x(x, size, point.get()):
        raise ValueError("Invalid ECDH point")  # the point at infinity
    return get_raw_buffer(x)[::-1]


# RFC 7748 5.2, the first test vector.
_X25519_VECTOR = (
    bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
    bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"),
    bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
)


def _select_x25519() -> X25519Function:
    """`_x25519_lean` if it matches the RFC 7748 vector and `_x25519_standard`, else the latter."""
    global _CURVE25519
    try:
        from Crypto.PublicKey._point import _curves

        _CURVE25519 = _curves["Curve25519"]
        scalar, u, expected = _X25519_VECTOR
        if _x25519_lean(scalar, u) != expected or _x25519_standard(scalar, u) != expected:
            return _x25519_standard
        if _x25519_lean(scalar, X25519_BASE) != _x25519_standard(scalar, X25519_BASE):
            return _x25519_standard
        try:
            _x25519_lean(scalar, bytes(X25519_BYTES))
        except ValueError:
            return _x25519_lean
    except Exception:  # any missing private piece: use the public API
        pass
    return _x25519_standard


_CURVE25519: Any = None
X25519_IMPL: X25519Function = _select_x25519()


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


# --- session keys ---


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
    """HKDF-SHA256 (RFC 5869) on the standard library's C HMAC.

    Equal to pycryptodome's `HKDF(..., hashmod=SHA256)` (the tests compare both
    and `cryptography`'s), at a tenth of the cost.
    """
    prk = hmac.digest(salt, ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, (length + 31) // 32 + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


# --- records ---


# Records of up to this many 16-byte blocks are encrypted with one ECB call over
# their counter blocks (faster than building a CTR cipher up to about 4 KiB).
_SMALL_RECORD_BLOCKS = 256


def _counter_tables() -> tuple[list[int], list[int]]:
    """For n blocks: the counters 1..n as one big-endian integer of n 16-byte blocks,
    and the multiplier that puts a 64-bit sequence number into bytes 4..11 of each."""
    counters, spread = [0], [0]
    for i in range(1, _SMALL_RECORD_BLOCKS + 2):
        counters.append((counters[-1] << 128) | i)
        spread.append((spread[-1] << 128) | (1 << 32))
    return counters, spread


_COUNTERS, _SEQ_SPREAD = _counter_tables()


class _Gcm:
    """AES-256-GCM (no AAD, nonce 0^4 || u64 seq, 16-byte tag) with per-key work done once.

    pycryptodome's GCM object re-derives H, re-expands the GHASH table and builds
    three ciphers for every record (~90 us); the server seals one record per
    flush per client, so that setup is its hottest path. Here the ECB cipher,
    H and the GHASH table are made once per key. A small record's keystream is
    one ECB call over its counter blocks (built with integer arithmetic), a large
    one's a CTR cipher; the tag is two GHASH calls. The GHASH helper is
    pycryptodome's own C code reached through its private `_mode_gcm._GHASH`;
    `_select_gcm` checks the result byte for byte against the public API at
    import and falls back to `_StandardGcm` if anything differs or is missing,
    so a pycryptodome upgrade can only make it slower, never wrong.
    """

    def __init__(self, key: bytes):
        from Crypto.Cipher import _mode_gcm
        from Crypto.Util._raw_api import create_string_buffer

        self._key = key
        self._fresh_state = create_string_buffer
        self._ecb = AES.new(key, AES.MODE_ECB)
        impl = _mode_gcm._ghash_clmul or _mode_gcm._ghash_portable
        self._ghash = _mode_gcm._GHASH(self._ecb.encrypt(bytes(16)), impl)

    def _keystream(self, seq: int, size: int) -> tuple[bytes, Any]:
        """(E_K(J0), a function XOR-ing `size` bytes with the keystream from counter 2)."""
        blocks = (size + 15) // 16 + 1
        if blocks <= _SMALL_RECORD_BLOCKS + 1:
            counters = _COUNTERS[blocks] + seq * _SEQ_SPREAD[blocks]
            stream = self._ecb.encrypt(counters.to_bytes(16 * blocks, "big"))
            pad = int.from_bytes(stream[16 : 16 + size], "big")

            def apply(data: Any) -> bytes:
                return (int.from_bytes(data, "big") ^ pad).to_bytes(size, "big")

            return stream[:16], apply
        nonce = bytes(4) + seq.to_bytes(8, "big")
        ctr = AES.new(self._key, AES.MODE_CTR, nonce=nonce, initial_value=1)
        return ctr.encrypt(bytes(16)), ctr.encrypt  # CTR: decrypting is encrypting

    def _tag(self, mask: bytes, ciphertext: memoryview) -> bytes:
        ghash = self._ghash
        ghash._last_y = self._fresh_state(16)  # GHASH state back to zero for this record
        size = len(ciphertext)
        whole = size - size % 16
        if whole:
            ghash.update(ciphertext[:whole])
        lengths = bytes(8) + (size * 8).to_bytes(8, "big")  # len(AAD)=0, len(C) in bits
        ghash.update(bytes(ciphertext[whole:]) + bytes(-size % 16) + lengths)
        value = int.from_bytes(ghash.digest(), "big") ^ int.from_bytes(mask, "big")
        return value.to_bytes(16, "big")

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        mask, apply = self._keystream(seq, len(plaintext))
        ciphertext = apply(plaintext)
        return ciphertext + self._tag(mask, memoryview(ciphertext))

    def open(self, seq: int, record: bytes) -> bytes:
        view = memoryview(record)[:-TAG_BYTES]
        mask, apply = self._keystream(seq, len(view))
        if not hmac.compare_digest(self._tag(mask, view), record[-TAG_BYTES:]):
            raise ValueError("MAC check failed")
        return apply(view)


class _StandardGcm:
    """The same through pycryptodome's public GCM API (the reference and the fallback)."""

    def __init__(self, key: bytes):
        self._key = key

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=record_nonce(seq), mac_len=TAG_BYTES)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        return ciphertext + tag

    def open(self, seq: int, record: bytes) -> bytes:
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=record_nonce(seq), mac_len=TAG_BYTES)
        return cipher.decrypt_and_verify(record[:-TAG_BYTES], record[-TAG_BYTES:])


def record_nonce(seq: int) -> bytes:
    """§3: the 12-byte GCM nonce of record number `seq`: 0x00000000 || u64be(seq)."""
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")


def _select_gcm() -> type:
    """`_Gcm` if it matches `_StandardGcm` exactly on this install, else `_StandardGcm`."""
    key, seq = bytes(range(32)), 0x0102030405060708
    try:
        fast, reference = _Gcm(key), _StandardGcm(key)
        for size in (
            0,
            1,
            15,
            16,
            17,
            100,
            16 * _SMALL_RECORD_BLOCKS,
            16 * _SMALL_RECORD_BLOCKS + 1,
        ):
            plaintext = bytes(i % 251 for i in range(size))
            record = reference.seal(seq, plaintext)
            if fast.seal(seq, plaintext) != record or fast.open(seq, record) != plaintext:
                return _StandardGcm
        tampered = bytearray(record)
        tampered[0] ^= 1
        try:
            fast.open(seq, bytes(tampered))
        except ValueError:
            return _Gcm
    except Exception:  # any missing private piece: use the public API
        pass
    return _StandardGcm


GCM_IMPL: type = _select_gcm()


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


# --- the two halves of the handshake ---


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


# --- which fast paths this install uses ---


def slow_paths(key: RsaKey) -> list[str]:
    """The fast paths whose self-check failed on this install (so the public API
    serves instead, correct but slower): for the server to say so at start."""
    slow = []
    if GCM_IMPL is not _Gcm:
        slow.append("AES-GCM records")
    if X25519_IMPL is not _x25519_lean:
        slow.append("X25519")
    if not isinstance(getattr(unwrapper(key), "__self__", None), _LeanOaep):
        slow.append("RSA-OAEP")
    return slow
