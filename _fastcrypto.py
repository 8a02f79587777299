"""Fast paths on pycryptodome's private internals, each checked against its public API.

A leaf module: it imports only the standard library and pycryptodome, and makes
no policy (key sizes, which points to refuse, which error to show: that is
crypto_utils.py). Each fast path does the arithmetic of a pycryptodome public
call through the C functions under it. Why: every call into C releases the
GIL, and the public API's Python layers make many such calls per operation;
in a storm of handshakes each release wakes a waiting thread for nothing
(bench/README.md has the figures). The Ed25519 verify and the records of up
to 4 KiB go further: they call the same C libraries through ctypes.PyDLL,
whose calls keep the GIL (work in C that short is not worth a hand-off).

Each `select_*` function runs a self-check against a reference (the public-API
path crypto_utils passes in) and returns the fast path only if they agree, or
None; so a pycryptodome whose internals changed makes bcast slower, never
wrong. The private modules are imported inside those checks, never at import.

Raw pointers: a pointer from `SmartPointer.get()` is valid only while that
SmartPointer lives. Code here keeps the SmartPointer itself (a number alone is
not enough: pycryptodome swaps a number's buffer on in-place operations) for
as long as the raw pointer is in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import threading
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey.RSA import RsaKey

Unwrap = Callable[[bytes], bytes]
X25519Function = Callable[[bytes, bytes], bytes]
Ed25519Verify = Callable[[bytes, bytes, bytes], bool]


def _check(result: int, what: str) -> None:
    if result:
        raise ValueError(f"error {result} in {what}")


# --- RSA-OAEP decryption ---


def mgf1_sha256(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-256 (RFC 8017 B.2.1) on hashlib: pycryptodome's hash objects
    are Python layers over C, and OAEP runs a dozen hashes per decryption."""
    blocks = (length + 31) // 32
    return b"".join(
        hashlib.sha256(seed + counter.to_bytes(4, "big")).digest() for counter in range(blocks)
    )[:length]


# Every LeanOaep alive, so that a forked child can drop their blinding state.
_LIVE_OAEP: weakref.WeakSet[LeanOaep] = weakref.WeakSet()


class LeanOaep:
    """RSAES-OAEP-DECRYPT with SHA-256, MGF1-SHA-256 and an empty label, for one key.

    The same constant-time C functions as `RsaKey._decrypt_to_bytes`
    (`Crypto.Math._IntegerNat`, private) run the same blinded CRT steps on
    buffers made once and reused; the unmasking is pycryptodome's own
    (`oaep.py`), with its constant-time C check. Nothing secret goes through
    Python integers. Thread-safe: the blinding state is under a lock and each
    call takes its own buffer set.
    """

    BLINDING_USES = 32  # as pycryptodome: a fresh r every 32 decryptions, squared between
    SCRATCH_KEPT = 16  # buffer sets kept after a spike of concurrent calls (~3 KiB each)

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
        numbers = (key._n, key._crt_p, key._crt_q, key._crt_dp, key._crt_dq, key._crt_u)
        if not all(isinstance(x, _IntegerNat.IntegerNat) for x in numbers):
            raise TypeError("not pycryptodome's C naturals")
        # The owners of every raw pointer below, kept as long as this object.
        contexts = tuple(x._mont_ctx() for x in numbers[:3])
        self._owners = (*(x._p for x in numbers), *contexts)
        self._n, self._p, self._q, self._dp, self._dq, self._u = (o.get() for o in self._owners[:6])
        self._ctx_n, self._ctx_p, self._ctx_q = (ctx.get() for ctx in contexts)
        self._dp_bits, self._dq_bits = key._crt_dp._bits, key._crt_dq._bits
        self._bits = (numbers[0]._bits, numbers[1]._bits, numbers[2]._bits)
        self._lhash = hashlib.sha256(b"").digest()
        self._reset_blinding()
        self._scratch: list[tuple[Any, ...]] = []  # buffer sets; pop/append are atomic
        _LIVE_OAEP.add(self)

    def _reset_blinding(self) -> None:
        """Forget r: at creation, and in a forked child, which must not reuse the parent's
        sequence of r (a lock held by a parent thread at fork() would also stay held)."""
        self._blinding_lock = threading.Lock()
        self._blinding: tuple[Any, Any, int] | None = None  # (r^e, r^-1 owners, uses left)

    def _blinding_pair(self) -> tuple[Any, Any]:
        """(r^e mod n, r^-1 mod n) for a secret r that changes at each call, as pycryptodome."""
        from Crypto.Math.Numbers import Integer

        with self._blinding_lock:
            state = self._blinding
            if state is None or state[2] == 0:
                n = self._key._n
                r = Integer.random_range(min_inclusive=1, max_exclusive=n)
                state = (pow(r, self._key._e, n)._p, r.inverse(n)._p, self.BLINDING_USES)
            else:
                squares = []
                for old in state[:2]:
                    new = self._new_nat(self._bits[0])
                    _check(
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
        r_e, r_inv = self._blinding_pair()  # owners, held until the last use below
        buffers = self._buffers()  # owners of c ... m, held likewise
        c, cp, m1, m2, h, hu, mp, m = (b.get() for b in buffers)
        lib = self._lib
        _check(lib.nat_from_bytes(c, ciphertext, c_size_t(k), 0), "nat_from_bytes")
        _check(lib.nat_mulmod_ctx(cp, c, r_e.get(), self._n, self._ctx_n), "blind")
        _check(
            lib.nat_powmod_ctx(m1, cp, self._dp, c_size_t(self._dp_bits), 0, self._p, self._ctx_p),
            "powmod p",
        )
        _check(
            lib.nat_powmod_ctx(m2, cp, self._dq, c_size_t(self._dq_bits), 0, self._q, self._ctx_q),
            "powmod q",
        )
        _check(lib.nat_submod(h, m2, m1, self._q), "nat_submod")  # (m2 - m1) mod q
        _check(lib.nat_mulmod_ctx(hu, h, self._u, self._q, self._ctx_q), "nat_mulmod_ctx")
        _check(lib.nat_muladd(mp, m1, hu, self._p), "nat_muladd")  # m' = m1 + h * p, under n
        _check(lib.nat_mulmod_ctx(m, r_inv.get(), mp, self._n, self._ctx_n), "unblind")
        out = create_string_buffer(k)
        _check(lib.nat_to_bytes(out, c_size_t(k), m, 0), "nat_to_bytes")
        if len(self._scratch) < self.SCRATCH_KEPT:  # a spike's extra sets are freed
            self._scratch.append(buffers)
        return get_raw_buffer(out)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """The plaintext, or ValueError for any ciphertext that does not decrypt."""
        em = self.encoded_message(ciphertext)
        h_len = len(self._lhash)
        # Y = em[0] must be 0, but is only checked with the rest, in constant time (Manger).
        masked_seed, masked_db = em[1 : h_len + 1], em[h_len + 1 :]
        seed = self._strxor(masked_seed, mgf1_sha256(masked_db, h_len))
        db = self._strxor(masked_db, mgf1_sha256(seed, self._k - h_len - 1))
        start = self._oaep_decode(em, self._lhash, db)
        if start <= 0:
            raise ValueError("Incorrect decryption.")
        return db[start:]


def _after_fork_in_child() -> None:
    global _ed25519_held_lock
    for lean in list(_LIVE_OAEP):
        lean._reset_blinding()
    _ed25519_held_lock = threading.Lock()  # if a parent thread held it at fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def select_unwrap(key: RsaKey, reference: Unwrap) -> Unwrap | None:
    """`LeanOaep(key).decrypt` if it decrypts and refuses as `reference` does, else None."""
    try:
        lean = LeanOaep(key).decrypt
        public = PKCS1_OAEP.new(key.public_key(), hashAlgo=SHA256)
        good = [public.encrypt(bytes([i]) * size) for i, size in enumerate((32, 0, 1, 33))]
        bad = bytearray(good[0])
        bad[len(bad) // 2] ^= 1
        for ciphertext in (*good, bytes(bad), bytes(len(bad))):
            if _outcome(lean, ciphertext) != _outcome(reference, ciphertext):
                return None
        return lean
    except Exception:  # any missing private piece: the caller keeps the public API
        return None


def _outcome(decrypt: Unwrap, ciphertext: bytes) -> bytes | None:
    try:
        return decrypt(ciphertext)
    except (ValueError, TypeError):
        return None


# --- X25519 ---

X25519_BYTES = 32
X25519_P = 2**255 - 19
X25519_BASE = (9).to_bytes(X25519_BYTES, "little")
# The u-coordinates (mod p) of the points of small order, refused as pycryptodome
# does (http://cr.yp.to/ecdh.html#validate).
X25519_SMALL_ORDER = frozenset(
    (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        X25519_P - 1,
    )
)


def _curve_lib(name: str) -> Any:
    """The C functions of one of pycryptodome's curves (`_point._curves`, private)."""
    from Crypto.PublicKey._point import _curves

    return _curves[name].rawlib


def x25519(scalar: bytes, u: bytes) -> bytes:
    """X25519(scalar, u) of RFC 7748 on pycryptodome's C curve25519 (`_point`, private);
    ValueError for a small-order point."""
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
    if u_value % X25519_P in X25519_SMALL_ORDER:
        raise ValueError("Invalid Curve25519 public key")
    clamped = bytearray(scalar)
    clamped[0] &= 0xF8
    clamped[31] = (clamped[31] & 0x7F) | 0x40
    lib = _curve_lib("Curve25519")
    raw = VoidPointer()
    size = c_size_t(X25519_BYTES)
    if lib.new_point(raw.address_of(), u_value.to_bytes(X25519_BYTES, "big"), size, null_pointer):
        raise ValueError("Invalid Curve25519 public key")
    point = SmartPointer(raw.get(), lib.free_point)  # owner of raw, held to the end
    blind = c_ulonglong(int.from_bytes(os.urandom(8), "little"))  # the ladder's randomisation
    if lib.scalar(point.get(), bytes(reversed(clamped)), size, blind):
        raise ValueError("X25519 scalar multiplication failed")
    x = create_string_buffer(X25519_BYTES)
    if lib.get_x(x, size, point.get()):
        raise ValueError("Invalid ECDH point")  # the point at infinity
    return get_raw_buffer(x)[::-1]


# RFC 7748 5.2, the first test vector: scalar, u, result.
_X25519_VECTOR = (
    bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
    bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"),
    bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
)


def select_x25519(reference: X25519Function) -> X25519Function | None:
    """`x25519` if it gives the RFC 7748 vector, agrees with `reference` and refuses 0."""
    try:
        scalar, u, expected = _X25519_VECTOR
        if x25519(scalar, u) != expected or reference(scalar, u) != expected:
            return None
        if x25519(scalar, X25519_BASE) != reference(scalar, X25519_BASE):
            return None
        try:
            x25519(scalar, bytes(X25519_BYTES))
        except ValueError:
            return x25519
    except Exception:  # any missing private piece: the caller keeps the public API
        pass
    return None


# --- AES-256-GCM records (PROTOCOL.md §3) ---

TAG_BYTES = 16
# Records of up to this many 16-byte blocks get their keystream from one ECB call
# over their counter blocks; larger ones from a CTR cipher (cheaper to build there).
SMALL_RECORD_BLOCKS = 256


def _counter_tables() -> tuple[list[int], list[int]]:
    """For n blocks: the counters 1..n as one big-endian integer of n 16-byte blocks,
    and the multiplier that puts a 64-bit sequence number into bytes 4..11 of each."""
    counters, spread = [0], [0]
    for i in range(1, SMALL_RECORD_BLOCKS + 2):
        counters.append((counters[-1] << 128) | i)
        spread.append((spread[-1] << 128) | (1 << 32))
    return counters, spread


_COUNTERS, _SEQ_SPREAD = _counter_tables()


_SMALL_RECORD_BYTES = 16 * SMALL_RECORD_BLOCKS
_ZERO_BLOCK = bytes(16)
_gcm_setup: tuple[Any, SimpleNamespace, Callable[[Any], int]] | None = None
_gcm_setup_lock = threading.Lock()


def _gcm_c() -> tuple[Any, SimpleNamespace, Callable[[Any], int]]:
    """Made once per process, read by every `Gcm`: the GHASH flavour pycryptodome's GCM
    uses here, its C functions and ECB_encrypt through ctypes.PyDLL (calls that keep
    the GIL), and how to turn a pycryptodome C pointer into an address."""
    global _gcm_setup
    setup = _gcm_setup
    if setup is None:
        with _gcm_setup_lock:
            if _gcm_setup is None:
                impl, flavour = _ghash_flavour()
                _gcm_setup = (impl, _gcm_functions(flavour), _address_function())
            setup = _gcm_setup
    return setup


def _ghash_flavour() -> tuple[Any, str]:
    """The GHASH pycryptodome's GCM uses here (`_mode_gcm`, private) and its C suffix."""
    from Crypto.Cipher import _mode_gcm
    from Crypto.Util import _cpu_features

    if _mode_gcm._ghash_clmul is not None:
        return _mode_gcm._ghash_clmul, "clmul" if _cpu_features.have_clmul() else "pmull"
    return _mode_gcm._ghash_portable, "portable"


def _gcm_functions(flavour: str) -> SimpleNamespace:
    """ECB_encrypt and ghash_<flavour> through ctypes.PyDLL (calls that keep the GIL)."""
    ecb = _pydll(["Crypto", "Cipher"], "_raw_ecb").ECB_encrypt
    ecb.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
    ecb.restype = ctypes.c_int
    ghash = getattr(_pydll(["Crypto", "Hash"], "_ghash_" + flavour), "ghash_" + flavour)
    ghash.argtypes = (
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_void_p,
    )
    ghash.restype = ctypes.c_int
    return SimpleNamespace(ecb_encrypt=ecb, ghash=ghash)


def _address_function() -> Callable[[Any], int]:
    """A pycryptodome C pointer (cffi or ctypes, per its backend) as an integer."""
    from Crypto.Util import _raw_api

    if _raw_api.backend == "cffi":
        cast = _raw_api.ffi.cast
        return lambda pointer: int(cast("uintptr_t", pointer))
    return lambda pointer: ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _gcm_lengths(size: int) -> bytes:
    """GCM's last GHASH block: len(AAD) = 0 and len(C), in bits."""
    return bytes(8) + (size * 8).to_bytes(8, "big")


class Gcm:
    """AES-256-GCM (no AAD, nonce 0^4 || u64be(seq), 16-byte tag) with per-key work done once.

    pycryptodome's GCM object re-derives H, re-expands the GHASH table and
    builds three ciphers for every record. Here the ECB cipher, H and the
    GHASH table (pycryptodome's own C, through the private `_mode_gcm._GHASH`)
    are made once per key. A record of up to 4 KiB (every `say` a reader
    opens, most records at low fan-out) is one ECB call over its counter
    blocks and one GHASH call, both through ctypes.PyDLL: the work in C is
    tens of nanoseconds, and letting go of the GIL for it would hand the GIL
    to another of hundreds of reader threads each time. A larger record goes
    through pycryptodome's CTR and GHASH calls, which let go of the GIL while
    they work. One thread at a time.
    """

    def __init__(self, key: bytes):
        from Crypto.Cipher import _mode_gcm

        self._key = key
        ghash_impl, self._c, address = _gcm_c()
        # The owners of the C states the raw addresses below point into: kept with them.
        self._ecb = AES.new(key, AES.MODE_ECB)
        self._ghash = _mode_gcm._GHASH(self._ecb.encrypt(bytes(16)), ghash_impl)
        self._ecb_state = address(self._ecb._state.get())
        self._ghash_key = address(self._ghash._exp_key.get())

    # --- records of up to 4 KiB: two C calls that keep the GIL ---

    def _small_stream(self, seq: int, size: int) -> bytes:
        """E_K(J0), then the keystream from counter 2 for `size` bytes (whole blocks)."""
        blocks = (size + 15) // 16 + 1
        length = 16 * blocks
        counters = (_COUNTERS[blocks] + seq * _SEQ_SPREAD[blocks]).to_bytes(length, "big")
        out = ctypes.create_string_buffer(length)
        _check(self._c.ecb_encrypt(self._ecb_state, counters, out, length), "AES-ECB")
        return out.raw

    def _small_tag(self, stream: bytes, ciphertext: bytes) -> bytes:
        size = len(ciphertext)
        blocks = ciphertext + bytes(-size % 16) + _gcm_lengths(size)
        y = ctypes.create_string_buffer(16)
        _check(self._c.ghash(y, blocks, len(blocks), _ZERO_BLOCK, self._ghash_key), "GHASH")
        value = int.from_bytes(y.raw, "big") ^ int.from_bytes(stream[:16], "big")
        return value.to_bytes(16, "big")

    @staticmethod
    def _xor(data: Any, stream: bytes, size: int) -> bytes:
        pad = int.from_bytes(stream[16 : 16 + size], "big")
        return (int.from_bytes(data, "big") ^ pad).to_bytes(size, "big")

    # --- larger records: pycryptodome's calls, which let go of the GIL ---

    def _large_keystream(self, seq: int) -> tuple[bytes, Any]:
        """(E_K(J0), a CTR cipher's encrypt from counter 2)."""
        nonce = bytes(4) + seq.to_bytes(8, "big")
        ctr = AES.new(self._key, AES.MODE_CTR, nonce=nonce, initial_value=1)
        return ctr.encrypt(bytes(16)), ctr.encrypt  # CTR: decrypting is encrypting

    def _large_tag(self, mask: bytes, ciphertext: memoryview) -> bytes:
        from Crypto.Util._raw_api import create_string_buffer

        ghash = self._ghash
        ghash._last_y = create_string_buffer(16)  # GHASH state back to zero for this record
        size = len(ciphertext)
        whole = size - size % 16
        if whole:
            ghash.update(ciphertext[:whole])
        ghash.update(bytes(ciphertext[whole:]) + bytes(-size % 16) + _gcm_lengths(size))
        value = int.from_bytes(ghash.digest(), "big") ^ int.from_bytes(mask, "big")
        return value.to_bytes(16, "big")

    # --- the interface ---

    def seal(self, seq: int, plaintext: bytes) -> bytes:
        size = len(plaintext)
        if size <= _SMALL_RECORD_BYTES:
            stream = self._small_stream(seq, size)
            ciphertext = self._xor(plaintext, stream, size)
            return ciphertext + self._small_tag(stream, ciphertext)
        mask, apply = self._large_keystream(seq)
        ciphertext = apply(plaintext)
        return ciphertext + self._large_tag(mask, memoryview(ciphertext))

    def open(self, seq: int, record: bytes) -> bytes:
        size = len(record) - TAG_BYTES
        if size < 0:
            raise ValueError("a record is shorter than its tag")
        if size <= _SMALL_RECORD_BYTES:
            ciphertext = bytes(record[:size])
            stream = self._small_stream(seq, size)
            if not hmac.compare_digest(self._small_tag(stream, ciphertext), record[size:]):
                raise ValueError("MAC check failed")
            return self._xor(ciphertext, stream, size)
        view = memoryview(record)[:size]
        mask, apply = self._large_keystream(seq)
        if not hmac.compare_digest(self._large_tag(mask, view), record[size:]):
            raise ValueError("MAC check failed")
        return apply(view)


def select_gcm(reference: type) -> type | None:
    """`Gcm` if it seals and opens byte for byte as `reference` (same interface), and
    refuses a tampered record of either size class, else None."""
    key, seq = bytes(range(32)), 0x0102030405060708
    try:
        fast, slow = Gcm(key), reference(key)
        for size in (0, 1, 15, 16, 17, 100, _SMALL_RECORD_BYTES, _SMALL_RECORD_BYTES + 1, 70000):
            plaintext = bytes(i % 251 for i in range(size))
            record = slow.seal(seq, plaintext)
            if fast.seal(seq, plaintext) != record or fast.open(seq, record) != plaintext:
                return None
            if size in (100, 70000) and not _refuses_tampered(fast, seq, record):
                return None
        return Gcm
    except Exception:  # any missing private piece: the caller keeps the public API
        pass
    return None


def _refuses_tampered(gcm: Gcm, seq: int, record: bytes) -> bool:
    for where in (0, len(record) - 1):
        tampered = bytearray(record)
        tampered[where] ^= 1
        try:
            gcm.open(seq, bytes(tampered))
        except ValueError:
            continue
        return False
    return True


# --- Ed25519 verification (PROTOCOL.md §5) ---

ED25519_L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
ED25519_BASE = bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666")
_ed25519: tuple[Any, Any] | None = None  # the C functions, the owner of B's point


def _ed25519_lib() -> tuple[Any, Any]:
    """pycryptodome's C Ed25519 functions and the base point B, which every call reads."""
    global _ed25519
    if _ed25519 is None:  # two threads may both get here: each keeps what it made
        lib = _curve_lib("Ed25519")
        _ed25519 = (lib, _ed25519_decode(lib, ED25519_BASE))
    return _ed25519


def _ed25519_decode(lib: Any, encoded: bytes) -> Any:
    """A new C point (its SmartPointer) from an RFC 8032 encoding, or None."""
    from Crypto.Util._raw_api import SmartPointer, VoidPointer, c_size_t, null_pointer

    raw = VoidPointer()
    if lib.decode_point(raw.address_of(), encoded, c_size_t(32), null_pointer):
        return None
    return SmartPointer(raw.get(), lib.free_point)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """RFC 8032 5.1.7, cofactorless: whether encode([S]B - [k]A) == R, on pycryptodome's
    C Ed25519 points (private). Comparing encodings refuses a non-canonical R; the
    caller checks sizes, S < L and the key. Thread-safe: each call has its own points."""
    from Crypto.Util._raw_api import (
        SmartPointer,
        VoidPointer,
        c_size_t,
        create_string_buffer,
        get_raw_buffer,
    )

    lib, base = _ed25519_lib()  # base: the owner of B's point, held to the end
    size = c_size_t(32)
    a = _ed25519_decode(lib, public)  # the owner of A's point, held to the end
    if a is None:
        return False
    digest = hashlib.sha512(signature[:32] + public + message).digest()
    k = int.from_bytes(digest, "little") % ED25519_L
    _check(lib.scalar_public(a.get(), k.to_bytes(32, "big"), size), "ed25519 [k]A")
    _check(lib.neg(a.get()), "ed25519 -[k]A")
    raw = VoidPointer()
    _check(lib.clone(raw.address_of(), base.get()), "ed25519 clone")
    sb = SmartPointer(raw.get(), lib.free_point)  # owner of the result, held to the end
    _check(lib.scalar_public(sb.get(), signature[63:31:-1], size), "ed25519 [S]B")
    _check(lib.add(sb.get(), a.get()), "ed25519 add")
    x, y = create_string_buffer(32), create_string_buffer(32)
    _check(lib.get_xy(x, y, size, sb.get()), "ed25519 get_xy")
    encoded = int.from_bytes(get_raw_buffer(y), "big") | (get_raw_buffer(x)[31] & 1) << 255
    return encoded.to_bytes(32, "little") == signature[:32]


# The same C functions, called through ctypes.PyDLL: such calls keep the GIL. Each of
# the ~8 calls a verify makes through pycryptodome's loader (cffi, or ctypes.CDLL)
# lets go of the GIL and takes it back, which among hundreds of runnable reader
# threads is a contended hand-off each time (futex, thread switches); holding it
# for the whole verify (~0.2 ms) costs the others less than that (bench/README.md).
# (name, argument types, result type), as the installed `_edwards.py` declares them.
_POINT_OUT = ctypes.POINTER(ctypes.c_void_p)
_ED25519_SIGNATURES: tuple[tuple[str, tuple[Any, ...], Any], ...] = (
    ("decode_point", (_POINT_OUT, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p), ctypes.c_int),
    ("clone", (_POINT_OUT, ctypes.c_void_p), ctypes.c_int),
    ("free_point", (ctypes.c_void_p,), None),
    ("neg", (ctypes.c_void_p,), ctypes.c_int),
    ("add", (ctypes.c_void_p, ctypes.c_void_p), ctypes.c_int),
    ("scalar_public", (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t), ctypes.c_int),
    ("get_xy", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p), ctypes.c_int),
)
_ed25519_held: tuple[Any, Any] | None = None  # the GIL-holding functions, B's point (kept)
_ed25519_held_lock = threading.Lock()  # one B made, even if two threads start at once


def _ed25519_held_lib() -> tuple[Any, Any]:
    """pycryptodome's Ed25519 shared library through ctypes.PyDLL, and B as a C point
    (made once, never freed: every call reads it)."""
    global _ed25519_held
    held = _ed25519_held
    if held is not None:
        return held
    with _ed25519_held_lock:
        if _ed25519_held is None:
            lib = _ed25519_pydll()
            base = ctypes.c_void_p()
            _check(lib.decode_point(ctypes.byref(base), ED25519_BASE, 32, None), "decode B")
            _ed25519_held = (lib, base)
        return _ed25519_held


def _pydll(package: list[str], stem: str) -> ctypes.PyDLL:
    """A shared library of pycryptodome's through ctypes.PyDLL: the file its loader
    (`load_pycryptodome_raw_lib`, private) opens, with its dlopen flags, so the same
    copy in memory as pycryptodome's."""
    from Crypto.Util._file_system import pycryptodome_filename
    from Crypto.Util._raw_api import extension_suffixes

    paths = [pycryptodome_filename(package, stem + e) for e in extension_suffixes]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise OSError(f"no {stem} library among {paths}")
    mode = os.RTLD_NOW
    if hasattr(os, "RTLD_DEEPBIND") and not os.getenv("PYCRYPTODOME_DISABLE_DEEPBIND"):
        mode |= os.RTLD_DEEPBIND
    return ctypes.PyDLL(path, mode=mode)


def _ed25519_pydll() -> Any:
    """The Ed25519 functions through `_pydll`, each declared."""
    _curve_lib("Ed25519")  # pycryptodome's own loading first, with its flags
    dll = _pydll(["Crypto", "PublicKey"], "_ed25519")
    functions = {}
    for name, arguments, result in _ED25519_SIGNATURES:
        function = getattr(dll, "ed25519_" + name)
        function.argtypes, function.restype = arguments, result
        functions[name] = function
    return SimpleNamespace(**functions)


def ed25519_verify_held(public: bytes, signature: bytes, message: bytes) -> bool:
    """`ed25519_verify` through calls that keep the GIL (`_ed25519_pydll`). Only bytes of
    the right sizes reach C (ValueError, TypeError otherwise). Thread-safe: each call
    has its own points, and B is only read; every point made here is freed here."""
    if not all(isinstance(x, bytes) for x in (public, signature, message)):
        raise TypeError("Ed25519 keys, signatures and messages are bytes")
    if len(public) != 32 or len(signature) != 64:
        sizes = f"{len(public)} and {len(signature)} bytes"
        raise ValueError(f"an Ed25519 key and signature are 32 and 64 bytes, not {sizes}")
    lib, base = _ed25519_held_lib()
    a, sb = ctypes.c_void_p(), ctypes.c_void_p()  # NULL until C makes them; freed below
    try:
        if lib.decode_point(ctypes.byref(a), public, 32, None):
            a.value = None  # as pycryptodome: a failed call leaves nothing to free
            return False  # not a curve point
        digest = hashlib.sha512(signature[:32] + public + message).digest()
        k = int.from_bytes(digest, "little") % ED25519_L
        _check(lib.scalar_public(a, k.to_bytes(32, "big"), 32), "ed25519 [k]A")
        _check(lib.neg(a), "ed25519 -[k]A")
        if lib.clone(ctypes.byref(sb), base):
            sb.value = None
            raise ValueError("ed25519 clone failed")
        _check(lib.scalar_public(sb, signature[63:31:-1], 32), "ed25519 [S]B")
        _check(lib.add(sb, a), "ed25519 add")
        xy = ctypes.create_string_buffer(64)  # x then y, 32 bytes each, big-endian
        _check(lib.get_xy(xy, ctypes.byref(xy, 32), 32, sb), "ed25519 get_xy")
        raw = xy.raw
        encoded = int.from_bytes(raw[32:], "big") | (raw[31] & 1) << 255
        return encoded.to_bytes(32, "little") == signature[:32]
    finally:
        for point in (a, sb):
            if point.value:
                lib.free_point(point)


# RFC 8032 7.1, tests 1-3: public key, message, signature.
_ED25519_VECTORS = tuple(
    (bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature))
    for public, message, signature in (
        (
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
            "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    )
)


def select_ed25519(reference: Ed25519Verify) -> Ed25519Verify | None:
    """The first of `ed25519_verify_held`, `ed25519_verify` that gives what `reference`
    gives on the RFC 8032 vectors, each with a flipped bit in R, in S and in the
    message, and on the neutral key; None if none does (or `reference` does not)."""
    # The neutral key with R = B and S = 1 satisfies the equation for any message.
    cases = [((1).to_bytes(32, "little"), b"any", ED25519_BASE + bytes([1] + [0] * 31), True)]
    for public, message, signature in _ED25519_VECTORS:
        cases.append((public, message, signature, True))
        cases.append((public, message + b"\x00", signature, False))
        for flip in (0, 40):  # a bit of R, a bit of S
            bad = bytearray(signature)
            bad[flip] ^= 1
            cases.append((public, message, bytes(bad), False))
    if not _gives(reference, cases):
        return None
    for fast in (ed25519_verify_held, ed25519_verify):
        if _gives(fast, cases):
            return fast
    return None


def _gives(verify: Ed25519Verify, cases: list[tuple[bytes, bytes, bytes, bool]]) -> bool:
    """Whether `verify` gives each case's expected verdict."""
    try:
        return all(
            verify(public, signature, message) is expected
            for public, message, signature, expected in cases
        )
    except Exception:  # any missing private piece: the caller tries the next path
        return False
