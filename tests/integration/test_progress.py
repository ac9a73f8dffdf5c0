"""Rounds written in parts (`--progress-tokens`, TransferStatus.landed_tokens): what landed is
verified while the rest is written; the bytes are right for every split, and a part corrupted in
flight is caught by its own check."""

from __future__ import annotations

import grpc
import pytest

from common.pb.epd.v1 import language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 512  # payloads over 1 MiB (INLINE_MAX_BYTES) get PayloadSums, which parts need


async def _generate(stub, n: int, seed: int) -> language_pb2.GenerateReply:
    return await stub.Generate(
        language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=seed, want_digest=True)
    )


@pytest.fixture(scope="module")
def pair():
    # 8192-token rounds, written in 1024-token parts.
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=256,
        language_blocks=80,
        initial_tokens=8192,
        language_args=("--progress-tokens", "1000"),
    )  # rounded up to whole blocks: 1024
    yield p
    p.stop()


@pytest.mark.parametrize("n", [100, 1024, 1100, 5000, 8192, 20000])
async def test_parts_deliver_the_right_bytes(pair, n):
    reply = await _generate(language_stub(pair.language.address), n, n)
    assert reply.payload_sha256 == expected_digest(n, n, HIDDEN)
    assert reply.rounds == -(-n // 8192) and reply.integrity_verified
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_a_part_corrupted_in_flight_fails_its_own_check():
    """Fault injection (encoder --transport-fault corrupt_nth=2): the second part's bytes are
    flipped after they landed; the check of what had landed by then names that range."""
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=64,
        language_blocks=64,
        initial_tokens=8192,
        encoder_args=("--transport-fault", "corrupt_nth=2"),
        language_args=("--progress-tokens", "1024"),
    )
    try:
        stub = language_stub(p.language.address)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _generate(stub, 5000, 3)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
        assert "over tokens [0, 2048)" in e.value.details(), e.value.details()
        await assert_all_free((p.encoder.address, "encoder"), (p.language.address, "language"))
        reply = await _generate(stub, 5000, 4)  # later writes are healthy
        assert reply.payload_sha256 == expected_digest(5000, 4, HIDDEN)
    finally:
        p.stop()


async def test_parts_of_a_round_that_is_not_the_last_are_copied_out_as_they_land():
    """A 2048-token pool: 2048-token rounds in 512-token parts, each round but the last copied
    out of the pool part by part; the payload is right for every round boundary."""
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=128,
        language_blocks=16,
        initial_tokens=2048,
        language_args=("--progress-tokens", "512"),
    )
    try:
        stub = language_stub(p.language.address)
        for n in (2048, 2049, 5000, 6144):
            reply = await _generate(stub, n, n)
            assert reply.payload_sha256 == expected_digest(n, n, HIDDEN), n
            assert reply.rounds == -(-n // 2048)
        await assert_all_free((p.encoder.address, "encoder"), (p.language.address, "language"))
    finally:
        p.stop()
