"""Double-buffered rounds (`--overlap-rounds`): with blocks to spare, a rank resumes into them
before it copies out and verifies the round just received, so the encoder writes the next round
meanwhile. The bytes are right for every round boundary, the round before the last is never
overlapped, and a round corrupted in flight still fails the transfer on both sides."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.config import LanguageConfig
from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 512
ROUND = 1024  # initial allocation, and the pool holds two of them
WATCHDOG_S = 120


async def _generate(stub, n: int, seed: int) -> language_pb2.GenerateReply:
    return await asyncio.wait_for(
        stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=seed, want_digest=True)
        ),
        WATCHDOG_S,
    )


def _pair(*encoder_args: str) -> Pair:
    return Pair(
        hidden=HIDDEN,
        encoder_blocks=256,
        language_blocks=2 * ROUND // 128,
        initial_tokens=ROUND,
        encoder_args=encoder_args,
        language_args=("--overlap-rounds",),
    )


async def _free(p: Pair) -> None:
    await assert_all_free((p.encoder.address, "encoder"), (p.language.address, "language"))


async def test_overlapped_rounds_deliver_the_right_bytes_and_a_corrupt_round_fails_on_both_sides():
    """Fault injection (encoder --transport-fault corrupt_nth=2): the first request's round 2 is
    flipped after it landed, and its check runs while round 3 is written (5000 tokens: rounds 1
    and 2 are overlapped). The client gets DATA_LOSS, the encoder records the failure as
    integrity (it was waiting for a Resume, not finished), every block comes back, and the same
    blocks then carry every later request intact."""
    p = _pair("--transport-fault", "corrupt_nth=2")
    try:
        stub = language_stub(p.language.address)
        rid = "corrupt-round-2"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(
                language_pb2.GenerateRequest(
                    request_id=rid, synthetic_tokens=5000, synthetic_seed=2
                ),
                timeout=WATCHDOG_S,
            )
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
        assert "round 2" in e.value.details(), e.value.details()
        async with grpc.aio.insecure_channel(p.encoder.address) as ch:
            enc = await encoder_pb2_grpc.EncoderStub(ch).GetTransfer(
                common_pb2.GetTransferRequest(request_id=rid)
            )
        assert enc.state == common_pb2.TRANSFER_STATE_FAILED, enc
        assert enc.error.reason == common_pb2.FAILURE_REASON_INTEGRITY, enc.error
        # Round 3 may have been written meanwhile (the Cancel waits for its write), no further.
        assert enc.rounds in (2, 3), enc
        await _free(p)
        # (tokens, rounds, overlapped): 1024-token rounds while more than the two-round pool is
        # left, then the rest in one round, never overlapping the round before the last.
        for n, rounds, overlapped in (
            (1024, 1, 0),
            (2048, 2, 0),
            (3072, 2, 0),
            (3073, 3, 1),
            (5000, 4, 2),
            (8192, 7, 5),
        ):
            reply = await _generate(stub, n, n)
            assert reply.payload_sha256 == expected_digest(n, n, HIDDEN), n
            assert (reply.rounds, reply.overlapped_rounds) == (rounds, overlapped), (n, reply)
            assert reply.integrity_verified
        await _free(p)
    finally:
        p.stop()


async def test_nothing_to_overlap_in_a_one_round_pool():
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=256,
        language_blocks=ROUND // 128,
        initial_tokens=ROUND,
        language_args=("--overlap-rounds",),
    )
    try:
        reply = await _generate(language_stub(p.language.address), 5000, 1)
        assert reply.payload_sha256 == expected_digest(5000, 1, HIDDEN)
        assert (reply.rounds, reply.overlapped_rounds) == (5, 0), reply
        await _free(p)
    finally:
        p.stop()


def test_overlap_is_off_by_default():
    assert LanguageConfig().overlap_rounds is False
