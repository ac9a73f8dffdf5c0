"""Both pools nearly full under many concurrent requests (docs/DESIGN.md, "Pressure"): FIFO waits,
partial resume rounds, no deadlock (a watchdog bounds the test), and every request ends in
SUCCESS with the right bytes or a clear RESOURCE_EXHAUSTED; both pools end fully free."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from common.pb.epd.v1 import language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 64


@pytest.fixture(scope="module")
def pair():
    # Encoder: 48 blocks x 128 = 6144 tokens of source; language: 16 blocks = 2048 tokens.
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=48,
        language_blocks=16,
        initial_tokens=1024,
        encoder_args=("--alloc-timeout-s", "3"),
        language_args=("--alloc-timeout-s", "3"),
    )
    yield p
    p.stop()


async def test_many_requests_on_nearly_full_pools(pair):
    rng = random.Random(8)
    sizes = [rng.choice([30, 500, 1024, 1500, 2600, 4000, 6000]) for _ in range(48)]
    stub = language_stub(pair.language.address)

    async def one(i: int, n: int):
        try:
            reply = await stub.Generate(
                language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=i, want_digest=True)
            )
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (n, e.code(), e.details())
            assert "blocks" in e.details()  # says which pool and how many blocks
            return "exhausted", n, 0
        assert reply.payload_sha256 == expected_digest(n, i, HIDDEN)
        return "ok", n, reply.rounds

    results = await asyncio.wait_for(
        asyncio.gather(*(one(i, n) for i, n in enumerate(sizes))), 180
    )  # watchdog
    ok = [r for r in results if r[0] == "ok"]
    assert len(ok) >= len(sizes) // 2, (
        results
    )  # the pools keep moving: most finish within the timeouts
    assert any(rounds > 1 + (n - 1) // 2048 for _, n, rounds in ok), (
        "no partial resume round happened"
    )
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))
    # And the pair still works normally afterwards.
    reply = await stub.Generate(
        language_pb2.GenerateRequest(synthetic_tokens=5000, synthetic_seed=1, want_digest=True)
    )
    assert reply.payload_sha256 == expected_digest(5000, 1, HIDDEN)
