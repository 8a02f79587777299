"""The server's extra CPU per join with identity (§5), measured in-process.

    python3 bench/identity_cost.py              # 2000 calls, 5 rounds
    python3 bench/identity_cost.py --calls 5000 --rounds 3

A join with `identity` and `proof` costs the server, beyond a join without:
the transcript of this connection's handshake (crypto_utils.identity_transcript),
the strict Ed25519 check (verify_identity) and the fingerprint it is known by
(identity_fingerprint). This times exactly those three with time.process_time
over distinct keys, transcripts and valid proofs made beforehand, a cross-check
for the storm figure (`storm:N=500,identity=1` against `storm:N=500`), which
also counts what travels with it (b64 of the fields, longer `joined` notices,
the binding written to the state file). Issue 13's bound is ~0.3 ms a join.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import crypto_utils  # noqa: E402  (the server's own module, from the repository)

KEYS = 50  # distinct identities, reused in turn (as many clients would)
BOUND_MS = 0.3  # issue 13


def make_cases(calls: int, spki: bytes) -> list[tuple[bytes, bytes, bytes, bytes, bytes, bytes]]:
    """(server nonce, client nonce, server eph, client eph, public key, proof) per call."""
    keys = [Ed25519PrivateKey.generate() for _ in range(KEYS)]
    publics = [k.public_key().public_bytes_raw() for k in keys]
    cases = []
    for i in range(calls):
        parts = [os.urandom(32) for _ in range(4)]
        transcript = crypto_utils.identity_transcript(spki, *parts)
        proof = keys[i % KEYS].sign(transcript)
        cases.append((*parts, publics[i % KEYS], proof))  # type: ignore[arg-type]
    return cases


def one_round(spki: bytes, cases: list[tuple[bytes, bytes, bytes, bytes, bytes, bytes]]) -> float:
    """CPU seconds of this process for the server's identity work on every case."""
    transcript_of = crypto_utils.identity_transcript
    verify = crypto_utils.verify_identity
    fingerprint = crypto_utils.identity_fingerprint
    t0 = time.process_time()
    for s_nonce, c_nonce, s_eph, c_eph, public, proof in cases:
        if not verify(public, proof, transcript_of(spki, s_nonce, c_nonce, s_eph, c_eph)):
            raise RuntimeError("a valid proof did not verify")
        fingerprint(public)
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/identity_cost.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=2000, help="joins per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args(argv)
    spki = os.urandom(420)  # only its SHA256 enters the transcript
    cases = make_cases(args.calls, spki)
    one_round(spki, cases[:50])  # warm up: the C library and the base point
    per_join_ms = [1000 * one_round(spki, cases) / args.calls for _ in range(args.rounds)]
    impl = crypto_utils.ED25519_VERIFY_IMPL
    print(
        f"Ed25519 verify: {impl.__module__}.{impl.__name__}; "
        f"{args.calls} joins x {args.rounds} rounds (time.process_time)"
    )
    print("per join, ms: " + ", ".join(f"{x:.4f}" for x in per_join_ms))
    median = statistics.median(per_join_ms)
    verdict = "within" if median <= BOUND_MS else "OVER"
    print(f"median {median:.4f} ms, min {min(per_join_ms):.4f} ms ({verdict} {BOUND_MS} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
