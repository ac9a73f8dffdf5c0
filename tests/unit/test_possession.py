"""Register's challenges (services/encoder/possession.py): one-time, per (identity, language_id,
rank), expiring, bounded per identity; and the proof reader's comparison at both ends of the
claimed pool, with a fake engine read (the real one is exercised between processes in
tests/integration/test_hostile.py and test_ownership.py)."""

from __future__ import annotations

import asyncio

import pytest

from common import errors
from common.layout import PROOF_AREA_BYTES, PoolGeometry, RecordLayout, default_fields
from services.encoder.possession import NONCE_BYTES, Challenges, ProofReader


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_nonce_is_used_once_and_only_by_its_identity_language_and_rank():
    clock = Clock()
    c = Challenges(per_identity=4, ttl_s=30, clock=clock)
    nonce = c.issue("cert:a", "lang", 0)
    assert len(nonce) == NONCE_BYTES
    for who, lang, rank in (("cert:b", "lang", 0), ("cert:a", "other", 0), ("cert:a", "lang", 1)):
        with pytest.raises(errors.FailedPrecondition, match="no Challenge outstanding"):
            c.take(who, lang, rank, nonce, "Register")
    c.take("cert:a", "lang", 0, nonce, "Register")
    with pytest.raises(errors.FailedPrecondition, match="no Challenge outstanding"):
        c.take("cert:a", "lang", 0, nonce, "Register")  # used up


@pytest.mark.parametrize(
    "given, error, text",
    [
        (b"", errors.FailedPrecondition, "call Challenge first"),
        (bytes(NONCE_BYTES), errors.PermissionDenied, "not the nonce"),
    ],
)
def test_a_wrong_or_missing_nonce_is_refused_and_uses_the_challenge_up(given, error, text):
    c = Challenges(per_identity=4)
    c.issue("token", "lang", 0)
    with pytest.raises(error, match=text):
        c.take("token", "lang", 0, given, "Register")
    assert len(c) == 0


def test_challenges_expire_and_are_bounded_per_identity():
    clock = Clock()
    c = Challenges(per_identity=2, ttl_s=30, clock=clock)
    first = c.issue("token", "a", 0)
    c.issue("token", "b", 0)
    with pytest.raises(errors.ResourceExhausted, match="2 challenges outstanding"):
        c.issue("token", "c", 0)
    c.issue("cert:other", "c", 0)  # another identity has its own room
    assert c.issue("token", "a", 0) != first  # a new nonce for the same key replaces the old one
    clock.now += 31
    c.issue("token", "c", 0)  # the old ones expired
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        c.take("token", "b", 0, b"x" * NONCE_BYTES, "Register")


def geometry() -> PoolGeometry:
    return PoolGeometry(RecordLayout.pack(default_fields(16, "bfloat16")), 4, 8, base_address=BASE)


BASE = 0x10000
END = BASE + 8 * 4 * RecordLayout.pack(default_fields(16, "bfloat16")).record_bytes
HEAD = BASE - PROOF_AREA_BYTES  # the 1 KiB right before the first block
N, M = b"N" * NONCE_BYTES, b"M" * NONCE_BYTES
REFUSED = errors.TransportError("rejected")

PROOFS = [
    # (id, what the claimed session holds at each proof address, error or None, message)
    ("both-ends-hold-the-nonce", {HEAD: N, END: N}, None, ""),
    ("only-the-end: a claim stretched down", {HEAD: M, END: N}, errors.PermissionDenied, "start"),
    ("only-the-start: a claim stretched up", {HEAD: N, END: M}, errors.PermissionDenied, "end"),
    ("neither", {HEAD: M, END: M}, errors.PermissionDenied, "nonce"),
    ("the-end-unreadable", {HEAD: N, END: REFUSED}, errors.PermissionDenied, "cannot read"),
    ("the-start-unreadable", {HEAD: REFUSED, END: N}, errors.PermissionDenied, "cannot read"),
]


@pytest.mark.parametrize(
    "memory, outcome, needle", [c[1:] for c in PROOFS], ids=[c[0] for c in PROOFS]
)
async def test_the_proof_reader_accepts_only_the_nonce_at_both_ends_of_the_pool(
    memory, outcome, needle
):
    reads = []

    def read_sync(session, local, address, length):
        reads.append((session, address, length))
        held = memory[address]
        if isinstance(held, Exception):
            raise held
        import ctypes

        ctypes.memmove(local, held, length)

    reader = ProofReader(read_sync, ProofReader.new_lanes())
    geo = geometry()
    assert (geo.head_proof_address, geo.proof_address) == (HEAD, END)
    if outcome is None:
        await reader.verify("127.0.0.1:1", geo, N, "Register")
    else:
        with pytest.raises(outcome, match=needle):
            await reader.verify("127.0.0.1:1", geo, N, "Register")
    assert {a for _, a, _ in reads} <= {HEAD, END} and {n for _, _, n in reads} == {NONCE_BYTES}
    refused = [a for a, held in memory.items() if isinstance(held, Exception)]
    assert all(sum(1 for _, a, _ in reads if a == r) == 3 for r in refused)  # tried again


async def test_a_pool_with_no_room_before_it_for_the_proof_is_refused_unread():
    reads = []
    geo = PoolGeometry(
        RecordLayout.pack(default_fields(16, "bfloat16")), 4, 8, base_address=PROOF_AREA_BYTES - 1
    )
    reader = ProofReader(lambda *a: reads.append(a), ProofReader.new_lanes())
    with pytest.raises(errors.PermissionDenied, match="no room for the 1024-byte proof area"):
        await reader.verify("127.0.0.1:1", geo, N, "Register")
    assert reads == []


async def test_a_read_that_never_returns_is_given_up_on():
    import threading

    release = threading.Event()
    reader = ProofReader(lambda *a: release.wait(5), ProofReader.new_lanes(), timeout_s=0.2)
    with pytest.raises(errors.Unavailable, match="took longer than"):
        await reader.verify("127.0.0.1:1", geometry(), b"N" * NONCE_BYTES, "Register")
    release.set()
    await asyncio.sleep(0.05)


async def test_one_identity_cannot_take_every_proof_lane():
    """Reads against peers that never answer hold their lanes (up to Mooncake's minute): one
    identity holds at most PROOF_LANES_PER_IDENTITY of them, so others can still register."""
    import threading

    from services.encoder.possession import PROOF_LANES_PER_IDENTITY

    release = threading.Event()

    def read_sync(session, local, address, length):
        if session == "blackhole:1":
            release.wait(5)
        else:
            import ctypes

            ctypes.memmove(local, b"N" * length, length)

    reader = ProofReader(read_sync, ProofReader.new_lanes(), timeout_s=0.2)
    for _ in range(PROOF_LANES_PER_IDENTITY):
        with pytest.raises(errors.Unavailable, match="took longer than"):
            await reader.verify(
                "blackhole:1", geometry(), b"N" * NONCE_BYTES, "Register", "cert:mallory"
            )
    with pytest.raises(errors.Unavailable, match="this identity has"):
        await reader.verify(
            "127.0.0.1:1", geometry(), b"N" * NONCE_BYTES, "Register", "cert:mallory"
        )
    await reader.verify("127.0.0.1:1", geometry(), b"N" * NONCE_BYTES, "Register", "cert:alice")
    release.set()
    await asyncio.sleep(0.1)
    await reader.verify(
        "127.0.0.1:1", geometry(), b"N" * NONCE_BYTES, "Register", "cert:mallory"
    )  # lanes back
