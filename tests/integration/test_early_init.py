"""The Init sent alongside the Encode (`--early-init`, DESIGN §4 "the language sends both at
once"): used when the pool has room to spare, never when it has not, correct payloads either way,
nothing left behind when the Encode is refused after the Init went out, and no deadlock when
both pools are short of blocks."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, language_pb2
from services.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 64


async def _generate(stub, n: int, seed: int, **kw) -> language_pb2.GenerateReply:
    return await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=seed,
                                                            want_digest=True, **kw))


@pytest.fixture(scope="module")
def roomy():
    # Language: 32 blocks, fixed 1024-token (8-block) initial allocations: early reservations may
    # hold up to 24 blocks.
    p = Pair(hidden=HIDDEN, encoder_blocks=64, language_blocks=32, initial_tokens=1024)
    yield p
    p.stop()


async def test_init_goes_out_alongside_the_encode_when_the_pool_has_room(roomy):
    stub = language_stub(roomy.language.address)
    for n, seed in ((64, 1), (1024, 2), (3000, 3)):  # one round, exactly the allocation, a resume
        reply = await _generate(stub, n, seed)
        assert reply.early_init, n
        assert reply.payload_sha256 == expected_digest(n, seed, HIDDEN)
        assert reply.rounds == (1 if n <= 1024 else 2)  # a resume takes what remains (the pool has room)
        # The transfer's clock starts once both the Init and the Encode are done.
        assert 0 < reply.transfer_seconds <= reply.total_seconds
    await assert_all_free((roomy.encoder.address, "encoder"), (roomy.language.address, "language"))


async def test_refused_encode_after_an_early_init_leaves_nothing_behind(roomy):
    """The Init may reach the encoder before, with or after the Encode's refusal; every order
    ends with both pools free and no transfer waiting on the encoder."""
    stub = language_stub(roomy.language.address)
    for i in range(12):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(language_pb2.GenerateRequest(
                request_id=f"bad-image-{i}", images=[common_pb2.Image(data=b"not an image", mime_type="image/png")]))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), e.value.details()
        assert "images[0]" in e.value.details()
    await assert_all_free((roomy.encoder.address, "encoder"), (roomy.language.address, "language"))
    reply = await _generate(stub, 500, 9)  # and the pair still works
    assert reply.early_init and reply.payload_sha256 == expected_digest(500, 9, HIDDEN)


async def test_no_early_init_without_room_to_spare_or_when_turned_off():
    # 8 blocks, 8-block initial allocations: an early reservation could hold the blocks a request
    # admitted after its Encode waits for, so every Init waits for its Encode.
    tight = Pair(hidden=HIDDEN, encoder_blocks=32, language_blocks=8, initial_tokens=1024)
    off = Pair(hidden=HIDDEN, encoder_blocks=32, language_blocks=32, initial_tokens=1024,
               language_args=("--no-early-init",))
    try:
        for pair in (tight, off):
            stub = language_stub(pair.language.address)
            reply = await _generate(stub, 700, 4)
            assert not reply.early_init
            assert reply.payload_sha256 == expected_digest(700, 4, HIDDEN)
            await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))
    finally:
        tight.stop()
        off.stop()


async def test_no_deadlock_when_both_pools_are_short():
    """Many concurrent requests through a small encoder pool and a small language pool, with
    allocation timeouts far beyond the watchdog: a deadlock between early reservations and
    encoder source blocks would hang here instead of failing fast."""
    pair = Pair(hidden=HIDDEN, encoder_blocks=24, language_blocks=24, initial_tokens=512,
                encoder_args=("--alloc-timeout-s", "300"), language_args=("--alloc-timeout-s", "300"))
    try:
        stub = language_stub(pair.language.address)
        sizes = [(i * 733) % 2900 + 40 for i in range(40)]  # up to 23 source blocks each
        replies = await asyncio.wait_for(
            asyncio.gather(*(_generate(stub, n, i) for i, n in enumerate(sizes))), 150)  # watchdog
        for i, (n, reply) in enumerate(zip(sizes, replies)):
            assert reply.payload_sha256 == expected_digest(n, i, HIDDEN)
        assert any(r.early_init for r in replies) and not all(r.early_init for r in replies)
        await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))
    finally:
        pair.stop()
