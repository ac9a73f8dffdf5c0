"""Register's challenges (services/encoder/possession.py): one-time, per (identity, language_id,
rank), expiring, bounded per identity; and the proof reader's comparison, with a fake engine read
(the real one is exercised between processes in tests/integration/test_hostile.py)."""

from __future__ import annotations

import asyncio

import pytest

from common import errors
from common.layout import PoolGeometry, RecordLayout, default_fields
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
    return PoolGeometry(
        RecordLayout.pack(default_fields(16, "bfloat16")), 4, 8, base_address=0x10000
    )


@pytest.mark.parametrize(
    "remote, outcome",
    [
        (b"N" * NONCE_BYTES, None),
        (b"M" * NONCE_BYTES, errors.PermissionDenied),
        (errors.TransportError("rejected"), errors.PermissionDenied),
    ],
)
async def test_the_proof_reader_accepts_only_the_nonce_at_the_pools_end(remote, outcome):
    reads = []

    def read_sync(session, local, address, length):
        reads.append((session, address, length))
        if isinstance(remote, Exception):
            raise remote
        import ctypes

        ctypes.memmove(local, remote, length)

    reader = ProofReader(read_sync, ProofReader.new_lanes())
    geo = geometry()
    if outcome is None:
        await reader.verify("127.0.0.1:1", geo, b"N" * NONCE_BYTES, "Register")
    else:
        with pytest.raises(outcome):
            await reader.verify("127.0.0.1:1", geo, b"N" * NONCE_BYTES, "Register")
    # Where it read: right after the claimed blocks (base + blocks x block_size x record bytes).
    end = 0x10000 + 8 * 4 * geo.record.record_bytes
    assert {a for _, a, _ in reads} == {end} and {n for _, _, n in reads} == {NONCE_BYTES}
    assert len(reads) == (
        3 if isinstance(remote, Exception) else 1
    )  # a refused read is tried again


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
