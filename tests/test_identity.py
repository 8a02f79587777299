"""§5 identity and access over real sockets: proofs, refused keys, the join order, bindings,
take-over, the allowlist (and SIGHUP), state that survives a restart or refuses to open.

Clients are the independent reference peer (tests/refpeer.py, `cryptography`
only); servers run on port 0 with their own temp state file.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import refpeer
from conftest import ROOT, running_server
from refpeer import RefIdentity, b64, degenerate_proof, join_message, lax_verify
from rev2kit import (
    LineReader,
    Room,
    ask,
    code_of,
    presence,
    refused_and_closed,
    room_of,
    run_refused,
)

import access

FEATURES = {"identity", "moderation", "history", "action"}


@pytest.fixture
def room(run_server) -> Iterator[Any]:
    """Factory: `with room(**settings) as (srv, r):` a server and a Room of clients."""

    @contextlib.contextmanager
    def factory(**overrides: Any) -> Iterator[tuple[Any, Room]]:
        with run_server(**overrides) as srv, room_of(srv) as r:
            yield srv, r

    return factory


@contextlib.contextmanager
def served(key_file: Path, key: Any, **settings: Any) -> Iterator[Room]:
    """A server in this process with these settings, and a Room of its clients."""
    with running_server(key_file, key=key, **settings) as srv, room_of(srv) as r:
        yield r


def proof_fields(identity: RefIdentity, transcript: bytes) -> dict[str, str]:
    return {"identity": b64(identity.public), "proof": b64(identity.sign(transcript))}


def join_raw(peer: refpeer.RefPeer, **fields: Any) -> dict[str, Any]:
    """Send a join with exactly these fields; its reply (welcome or error)."""
    peer.send({"type": "join", **fields})
    return peer._join_reply(None)


# --- proofs ----------------------------------------------------------------------------------


def test_proof_joins_and_welcome_fields(room) -> None:
    """§5 welcome (added): access, identity (our fingerprint), op, features, max_record,
    last_id, gap; joined (added): the joiner's fingerprint or null."""
    ann_id = RefIdentity()
    with room(ops=(ann_id.fingerprint,)) as (_, r):
        bob, welcome = r.join("bob")
        assert (welcome["access"], welcome["identity"], welcome["op"]) == ("open", None, False)
        assert set(welcome["features"]) == FEATURES
        assert welcome["max_record"] >= 65536 and welcome["last_id"] == 0
        assert welcome["gap"] is False
        ann, welcome = r.join("ann", ann_id)
        assert (welcome["identity"], welcome["op"]) == (ann_id.fingerprint, True)
        assert welcome["users"] == ["bob"]
        assert bob.recv() == {"type": "joined", "name": "ann", "identity": ann_id.fingerprint}
        r.join("carl")
        assert ann.recv() == {"type": "joined", "name": "carl", "identity": None}


def test_proof_replayed_from_another_connection(room) -> None:
    """§5: a proof is worthless on any other connection: bad_identity, the connection stays."""
    identity = RefIdentity()
    with room() as (_, r):
        first, second = r.connect(), r.connect()
        stolen = proof_fields(identity, first.transcript)
        reply = join_raw(second, name="ann", **stolen)
        assert code_of(reply) == "bad_identity"
        assert second.join("ann", identity=identity)["type"] == "welcome"  # still there
        assert join_raw(first, name="ann2", **stolen)["type"] == "welcome"  # its own proof


def test_proof_over_another_transcript(room) -> None:
    """§5: the proof signs label || SHA256(SPKI) || server_nonce || client_nonce ||
    server_eph || client_eph of this connection; any other byte string is refused."""
    identity = RefIdentity()
    with room() as (_, r):
        peer = r.connect()
        t = peer.transcript
        label, rest = t[:16], t[16:]
        spki_hash, sn, cn, se, ce = (rest[i : i + 32] for i in range(0, 160, 32))
        others = [
            b"bcast/2 identity" + rest,  # another label
            label + os.urandom(32) + sn + cn + se + ce,  # another server key
            label + spki_hash + cn + sn + se + ce,  # nonces swapped
            label + spki_hash + sn + cn + ce + se,  # ephemeral keys swapped
            label + peer.server_spki + sn + cn + se + ce,  # the SPKI itself, not its hash
            t[:-1],  # one byte short
        ]
        for other in others:
            assert code_of(join_raw(peer, name="ann", **proof_fields(identity, other))) == (
                "bad_identity"
            )
        assert peer.join("ann", identity=identity)["type"] == "welcome"


def test_bad_identity_sizes_b64_and_halves(room) -> None:
    """§5: identity without proof or the reverse, sizes other than 32/64 bytes, bad b64, a
    signature that does not verify: bad_identity, the connection stays, not joined."""
    identity = RefIdentity()
    with room() as (_, r):
        peer = r.connect()
        good = proof_fields(identity, peer.transcript)
        pub, sig = identity.public, base64.b64decode(good["proof"])
        cases = [
            {"identity": good["identity"]},
            {"proof": good["proof"]},
            {**good, "identity": b64(pub[:31])},
            {**good, "identity": b64(pub + b"\0")},
            {**good, "proof": b64(sig[:63])},
            {**good, "proof": b64(sig + b"\0")},
            {**good, "identity": good["identity"].rstrip("=")},  # padding missing
            {**good, "identity": good["identity"][:-2] + "!="},
            {**good, "identity": " " + good["identity"]},
            {**good, "proof": good["proof"][:40] + "\n" + good["proof"][40:]},
            {**good, "proof": good["proof"].replace("+", "-").replace("/", "_") + "%"},
            {**good, "identity": ""},
            {**good, "proof": b64(sig[:32] + bytes(32))},  # right size, does not verify
            {**good, "identity": b64(RefIdentity().public)},  # another key
        ]
        for fields in cases:
            reply = join_raw(peer, name="ann", **fields)
            assert code_of(reply) == "bad_identity", (fields, reply)
        assert code_of(ask(peer, {"type": "who"})) == "not_joined"
        assert join_raw(peer, name="ann", **good)["type"] == "welcome"


def test_identity_and_proof_must_be_strings(room) -> None:
    """§5: identity and proof, when present, are strings (else bad_message); null is not
    absent (§4)."""
    with room() as (_, r):
        peer = r.connect()
        for fields in (
            {"identity": None, "proof": "x"},
            {"identity": "x", "proof": 5},
            {"identity": ["a"], "proof": "x"},
            {"identity": None},
            {"proof": None},
        ):
            assert code_of(join_raw(peer, name="ann", **fields)) == "bad_message", fields
        assert peer.join("ann")["type"] == "welcome"


# y >= p and a negative x = 0: encodings lax decoders accept (and reduce to small order).
NON_CANONICAL = [
    (refpeer.ED_P + 1).to_bytes(32, "little"),  # y = p + 1 = the neutral point
    (refpeer.ED_P).to_bytes(32, "little"),  # y = p = 0: order 4
    (1 | 1 << 255).to_bytes(32, "little"),  # the neutral point with x's sign bit set
    ((refpeer.ED_P - 1) | 1 << 255).to_bytes(32, "little"),  # (0, -1) with the sign bit
]


@pytest.mark.parametrize(
    "key",
    [*refpeer.small_order_points(), *NON_CANONICAL],
    ids=lambda k: k.hex()[:8] + ".." + k.hex()[-4:],
)
def test_degenerate_keys_refused(room, key: bytes) -> None:
    """Issue 13 / §5: a small-order or non-canonical key with R = B, S = 1 (which a lax
    verifier accepts for any transcript) gets bad_identity; the connection stays."""
    with room() as (_, r):
        peer = r.connect()
        assert lax_verify(key, degenerate_proof(), peer.transcript)  # the attack is real
        reply = join_raw(peer, name="ann", identity=b64(key), proof=b64(degenerate_proof()))
        assert code_of(reply) == "bad_identity"
        assert peer.join("ann")["type"] == "welcome"


def test_s_at_least_l_refused(room) -> None:
    """§5: a signature with S >= L (S + L verifies under a lax check) is bad_identity."""
    identity = RefIdentity()
    with room() as (_, r):
        peer = r.connect()
        sig = identity.sign(peer.transcript)
        s = int.from_bytes(sig[32:], "little")
        for big_s in (s + refpeer.ED_L, refpeer.ED_L, 2**256 - 1):
            malleated = sig[:32] + big_s.to_bytes(32, "little")
            if big_s == s + refpeer.ED_L:
                assert lax_verify(identity.public, malleated, peer.transcript)
            reply = join_raw(peer, name="ann", identity=b64(identity.public), proof=b64(malleated))
            assert code_of(reply) == "bad_identity"
        assert join_raw(peer, name="ann", identity=b64(identity.public), proof=b64(sig))[
            "type"
        ] == ("welcome")


# --- the order of join's checks ----------------------------------------------------------------


def test_join_order_up_to_bad_identity(room) -> None:
    """§5 join order: already_joined; bad_message; invalid_name; bad_identity."""
    with room() as (_, r):
        peer = r.connect()
        bad_id = {"identity": "!!", "proof": "x"}
        # bad_message (a field's type) before invalid_name and bad_identity
        assert code_of(join_raw(peer, name="a b", history=-1, **bad_id)) == "bad_message"
        assert code_of(join_raw(peer, name=5)) == "bad_message"
        # invalid_name before bad_identity
        assert code_of(join_raw(peer, name="a b", **bad_id)) == "invalid_name"
        assert code_of(join_raw(peer, name="ann", **bad_id)) == "bad_identity"
        assert peer.join("ann")["type"] == "welcome"
        # already_joined before everything else
        assert code_of(ask(peer, {"type": "join", "name": 5, **bad_id})) == "already_joined"


def test_join_order_not_allowed_before_banned(key_file: Path, server_key, tmp_path: Path) -> None:
    """§5 join order: not_allowed before banned; a ban by address kept across restarts
    applies to a listed identity joining from that address."""
    state = tmp_path / "state.db"
    op_id, listed = RefIdentity(), RefIdentity()
    with served(key_file, server_key, state=state, ops=(op_id.fingerprint,)) as r:
        op, _ = r.join("op", op_id)
        guest, _ = r.join("guest", source="127.0.0.2")
        op.send({"type": "ban", "name": "guest"})
        assert guest.wait_closed(5)[-1]["reason"] == "banned"
    allow = tmp_path / "allow"
    allow.write_text(f"{op_id.fingerprint} op op\n{listed.fingerprint} lee\n")
    with served(key_file, server_key, state=state, allow=allow) as r:
        stranger = r.connect("127.0.0.2")
        stranger.send(join_message("zed", identity=RefIdentity(), transcript=stranger.transcript))
        refused_and_closed(stranger, "not_allowed")
        member = r.connect("127.0.0.2")
        member.send(join_message("lee", identity=listed, transcript=member.transcript))
        refused_and_closed(member, "banned")
        assert r.join("lee", listed, source="127.0.0.3")[1]["access"] == "allowlist"


def test_join_order_banned_before_reserved_before_taken(room) -> None:
    """§5 join order: banned before name_reserved, name_reserved before name_taken."""
    op_id, ann_id = RefIdentity(), RefIdentity()
    with room(ops=(op_id.fingerprint,)) as (_, r):
        op, _ = r.join("op", op_id)
        r.join("ann", ann_id)  # ann is bound and holds the name right now
        other = r.connect()
        assert other.join("ANN", identity=RefIdentity())["code"] == "name_reserved"
        assert other.join("ann")["code"] == "name_reserved"
        guest, _ = r.join("guest", source="127.0.0.2")
        op.send({"type": "ban", "name": "guest"})
        guest.wait_closed(5)
        again = r.connect("127.0.0.2")
        again.send(join_message("ann"))
        refused_and_closed(again, "banned")


def test_name_taken_by_a_guest_even_for_an_identity(room) -> None:
    """§5: a name held without identity stays taken until its connection ends (name_taken,
    also for a proven join); then the identity may take and bind it."""
    identity = RefIdentity()
    with room() as (_, r):
        holder, _ = r.join("bob")
        peer = r.connect()
        assert peer.join("bob", identity=identity)["code"] == "name_taken"
        assert peer.join("BOB")["code"] == "name_taken"
        holder.send({"type": "leave"})
        holder.wait_closed(5)
        assert peer.join("bob", identity=identity)["type"] == "welcome"
        assert r.connect().join("bob")["code"] == "name_reserved"


# --- bindings and take-over ----------------------------------------------------------------------


def test_open_mode_binding_and_moving_it(room) -> None:
    """§5 open: a name joined with a proven identity is bound to it; other joins get
    name_reserved; joining under a new name moves the binding and frees the old one."""
    ann_id = RefIdentity()
    with room() as (_, r):
        ann, _ = r.join("ann", ann_id)
        ann.send({"type": "leave"})
        ann.wait_closed(5)
        peer = r.connect()
        assert peer.join("ann")["code"] == "name_reserved"
        assert peer.join("Ａｎｎ", identity=RefIdentity())["code"] == "name_reserved"
        ann, _ = r.join("ann", ann_id)  # the owner gets it back
        ann.send({"type": "leave"})
        ann.wait_closed(5)
        anna, _ = r.join("anna", ann_id)  # the binding moves
        assert peer.join("ann")["type"] == "welcome"  # the old name is free again
        assert r.connect().join("anna")["code"] == "name_reserved"
        assert anna.sync() == [{"type": "joined", "name": "ann", "identity": None}]


def test_take_over_same_name(room) -> None:
    """§5 taking over: a join proving the identity bound to a name held now: the old
    connection gets bye (replaced) and is closed; the others see neither left nor joined."""
    ann_id = RefIdentity()
    with room() as (_, r):
        old, _ = r.join("ann", ann_id)
        carol, _ = r.join("carol")
        assert old.recv()["name"] == "carol"
        new, welcome = r.join("ann", ann_id)
        assert welcome["users"] == ["carol"]
        assert old.wait_closed(5) == [{"type": "bye", "reason": "replaced"}]
        assert carol.sync() == []  # neither left nor joined
        carol.send({"type": "say", "text": "hi ann"})
        assert new.recv()["text"] == "hi ann"
        assert ask(carol, {"type": "who"})["names"] == ["ann", "carol"]


def test_same_identity_under_another_name(room) -> None:
    """§5: a join proving an identity joined under another name closes that connection
    with bye (replaced); the others see left (replaced) for the old name."""
    ann_id = RefIdentity()
    with room() as (_, r):
        old, _ = r.join("ann", ann_id)
        carol, _ = r.join("carol")
        _, welcome = r.join("anna", ann_id)
        assert "ann" not in welcome["users"] and welcome["users"] == ["carol"]
        assert old.wait_closed(5)[-1] == {"type": "bye", "reason": "replaced"}
        news = presence(carol.sync())
        assert ("left", "ann", "replaced") in news and ("joined", "anna", None) in news
        assert news.index(("left", "ann", "replaced")) < news.index(("joined", "anna", None))


def test_binding_and_ban_survive_restart(key_file: Path, server_key, tmp_path: Path) -> None:
    """§5: bindings and bans are kept in the state file across restarts (--state)."""
    state = tmp_path / "state.db"
    op_id, ann_id, bob_id = RefIdentity(), RefIdentity(), RefIdentity()
    settings = {"state": state, "ops": (op_id.fingerprint,)}
    with served(key_file, server_key, **settings) as r:
        op, _ = r.join("op", op_id)
        r.join("ann", ann_id)
        bob, _ = r.join("bob", bob_id)
        op.send({"type": "ban", "name": "bob", "reason": "spam"})
        assert bob.wait_closed(5)[-1]["reason"] == "banned"
        bans_before = ask(op, {"type": "bans"})["bans"]
    with served(key_file, server_key, **settings) as r:
        peer = r.connect("127.0.0.3")
        assert peer.join("ann")["code"] == "name_reserved"
        banned = r.connect("127.0.0.3")
        banned.send(join_message("bobby", identity=bob_id, transcript=banned.transcript))
        refused_and_closed(banned, "banned")
        op, _ = r.join("op", op_id)
        assert ask(op, {"type": "bans"})["bans"] == bans_before
        assert bans_before[0]["who"] == bob_id.fingerprint
        assert r.join("ann", ann_id)[1]["identity"] == ann_id.fingerprint


# --- the allowlist -----------------------------------------------------------------------------


def test_allowlist_mode(room, tmp_path: Path) -> None:
    """§5 allowlist: only listed identities, each under its listed name; others get
    not_allowed then bye and close; a listed identity under another name: name_reserved."""
    ann_id, bob_id = RefIdentity(), RefIdentity()
    allow = tmp_path / "allow"
    allow.write_text(
        f"# the room\n{ann_id.fingerprint}\tann op  # the operator\n\n{bob_id.fingerprint} bob\n"
    )
    with room(allow=allow) as (_, r):
        ann, welcome = r.join("ann", ann_id)
        assert (welcome["access"], welcome["op"]) == ("allowlist", True)
        guest = r.connect()
        guest.send(join_message("guest"))
        refused_and_closed(guest, "not_allowed")
        stranger = r.connect()
        stranger.send(join_message("zed", identity=RefIdentity(), transcript=stranger.transcript))
        refused_and_closed(stranger, "not_allowed")
        peer = r.connect()
        forged = {"identity": b64(bob_id.public), "proof": b64(bytes(64))}
        assert code_of(join_raw(peer, name="bob", **forged)) == "bad_identity"  # before not_allowed
        assert peer.join("bobby", identity=bob_id)["code"] == "name_reserved"
        assert peer.join("ann", identity=bob_id)["code"] == "name_reserved"
        welcome = peer.join("bob", identity=bob_id)
        assert (welcome["name"], welcome["op"]) == ("bob", False)
        assert ann.sync() == [{"type": "joined", "name": "bob", "identity": bob_id.fingerprint}]


def test_allow_file_sighup(spawn_server, tmp_path: Path) -> None:
    """§5: SIGHUP re-reads the allow file: a joined client no longer listed (or listed under
    another name) gets bye (not_allowed), the others left (not_allowed); op changes apply
    at once; a bad file keeps the old list and the log names the line."""
    ann_id, bob_id, cat_id, dan_id = (RefIdentity() for _ in range(4))
    allow = tmp_path / "allow"
    allow.write_text(
        f"{ann_id.fingerprint} ann op\n{bob_id.fingerprint} bob\n"
        f"{cat_id.fingerprint} cat\n{dan_id.fingerprint} dan\n"
    )
    with spawn_server("--allow", str(allow), "--log-level", "INFO") as (proc, host, port, _):
        log = LineReader(proc.stderr)
        r = Room((host, port))
        try:
            ann, _ = r.join("ann", ann_id)
            bob, _ = r.join("bob", bob_id)
            cat, _ = r.join("cat", cat_id)
            dan, _ = r.join("dan", dan_id)
            assert code_of(ask(bob, {"type": "bans"})) == "not_op"
            assert len(presence(ann.sync())) == 3  # bob, cat and dan joined
            allow.write_text(
                f"{ann_id.fingerprint} ann\n{bob_id.fingerprint} bob op\n"
                f"{dan_id.fingerprint} daniel\n"
            )
            proc.send_signal(signal.SIGHUP)
            assert cat.wait_closed(5)[-1] == {"type": "bye", "reason": "not_allowed"}
            assert dan.wait_closed(5)[-1] == {"type": "bye", "reason": "not_allowed"}
            news = presence(ann.sync())
            assert sorted(news) == [("left", "cat", "not_allowed"), ("left", "dan", "not_allowed")]
            assert ask(bob, {"type": "bans"}) == {"type": "bans", "bans": []}  # op at once
            assert code_of(ask(ann, {"type": "bans"})) == "not_op"  # and no longer op
            allow.write_text(f"{ann_id.fingerprint} ann op\n{cat_id.fingerprint} cat oops\n")
            proc.send_signal(signal.SIGHUP)
            line = log.wait_for("line 2")
            assert str(allow) in line
            # the old list is in force: bob stays an operator, ann does not become one,
            # cat is still out
            assert ask(bob, {"type": "bans"})["type"] == "bans"
            assert code_of(ask(ann, {"type": "bans"})) == "not_op"
            again = r.connect()
            again.send(join_message("cat", identity=cat_id, transcript=again.transcript))
            refused_and_closed(again, "not_allowed")
            assert presence(ann.sync()) == []
        finally:
            r.close()


def test_allowlist_format() -> None:
    """§5 allow file: `SHA256:<43> <name> [op]` a line, fields separated by spaces or tabs,
    `#` comments; a line ends at newline only (a form feed or U+2028 in a comment neither
    breaks the file nor shifts the line numbers errors give)."""
    ann, bob = RefIdentity().fingerprint, RefIdentity().fingerprint
    text = f"# the room \x0c\u2028 ok\r\n{ann}\tＡｎｎ  op # the operator\r\n\n  {bob} bob\n"
    listed = access.parse_allowlist(text)
    assert listed == {ann: access.Listed("Ann", True), bob: access.Listed("bob", False)}
    bad = [
        (f"#\x0c\n{ann} ann\n{bob}\n", "line 3"),  # no name
        (f"{ann} ann\n\n{bob} bob admin\n", "line 3"),  # not op
        (f"{ann} ann\nSHA256:short bob\n", "line 2"),
        (f"{ann} ann\n{bob} a\x0bb\n", "line 2"),  # a vertical tab is not a separator
        (f"{ann} ann\n{bob} a b\n", "line 2"),  # three fields, the third not op
        (f"{ann} ann\n{bob} ANN\n", "line 2"),  # a name listed twice (casefold)
        (f"{ann} ann\n{ann} bob\n", "line 2"),  # an identity listed twice
        (f"# \u2028 \x85\n{ann} a b\n", "line 2"),
        (f"{ann} ann\n\u2028\n", "line 2"),  # only spaces and tabs are blank
    ]
    for text, where in bad:
        with pytest.raises(access.AllowlistError, match=where):
            access.parse_allowlist(text, "allow")


# --- the state file refuses to open ------------------------------------------------------------


def server_cmd(key_file: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "server.py"),
        "--port",
        "0",
        "--key-file",
        str(key_file),
        *args,
    ]


def test_corrupt_state_file_refused(key_file: Path, tmp_path: Path) -> None:
    """Issue 13: a corrupt state file stops the server at start: one sentence, exit 2,
    and the file is left as it was (nothing lost)."""
    state = tmp_path / "state.db"
    junk = b"SQLite format 3\0" + os.urandom(4080)
    state.write_bytes(junk)
    state.chmod(0o600)
    result = run_refused(server_cmd(key_file, "--state", str(state)))
    assert result.returncode == 2, result.stderr
    assert str(state) in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert state.read_bytes() == junk


def test_state_file_in_use_refused(key_file: Path, server_key, tmp_path: Path) -> None:
    """Issue 13: a state file held by another running server: one sentence, exit 2; the
    running server goes on undisturbed."""
    state = tmp_path / "state.db"
    with running_server(key_file, key=server_key, state=state) as srv, room_of(srv) as r:
        ann, _ = r.join("ann")
        result = run_refused(server_cmd(key_file, "--state", str(state)))
        assert result.returncode == 2, result.stderr
        assert str(state) in result.stderr and "in use" in result.stderr
        assert result.stderr.count("\n") == 1
        assert ann.sync() == []


def test_bad_allow_file_refuses_start(key_file: Path, tmp_path: Path) -> None:
    """§5: the server refuses to start on a bad allow file, saying which line (exit 2)."""
    allow = tmp_path / "allow"
    allow.write_text(f"# ok\n{RefIdentity().fingerprint} ann\nSHA256:short bob\n")
    result = run_refused(
        server_cmd(key_file, "--state", str(tmp_path / "s.db"), "--allow", str(allow))
    )
    assert result.returncode == 2, result.stderr
    assert "line 3" in result.stderr and str(allow) in result.stderr
