"""Payload sizes at every edge, over real processes and real Mooncake TCP.

Each request is checked byte for byte (the synthetic payload's digest recomputed independently by
services/tools/reference_payload.py, which shares no code with the services) and both pools must be
fully free afterwards.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from common.pb.epd.v1 import common_pb2, language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 256
INITIAL = 8192
LANG_BLOCKS = 96  # 12288 tokens: resumes are bounded by the whole pool


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        block_size=128,
        language_blocks=LANG_BLOCKS,
        initial_tokens=INITIAL,
        encoder_blocks=2048,
    )
    yield p
    p.stop()


def expected_rounds(n: int, pool_tokens: int) -> int:
    return 1 if n <= INITIAL else 1 + math.ceil((n - INITIAL) / pool_tokens)


async def generate(stub, n: int, seed: int):
    reply = await stub.Generate(
        language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=seed, want_digest=True)
    )
    assert reply.total_tokens == n
    assert reply.integrity_verified
    assert reply.payload_sha256 == expected_digest(n, seed, HIDDEN), (
        f"payload of {n} tokens differs"
    )
    assert reply.bytes == n * (HIDDEN * 2 + 4 + 12)
    assert reply.first_token_id == -1
    return reply


@pytest.mark.parametrize(
    "n, label",
    [
        (1, "one token"),
        (127, "block_size - 1"),
        (128, "block_size"),
        (129, "block_size + 1"),
        (INITIAL, "exactly the initial allocation"),
        (INITIAL + 1, "initial allocation + 1"),
        (INITIAL + 12288, "2 rounds, second fills the pool"),
        (INITIAL + 12288 + 1, "3 rounds"),
        (30000, "larger than the whole language pool"),
        (INITIAL + 9 * 12288, "10 rounds"),
        (INITIAL + 10 * 12288 + 7, "12 rounds"),
    ],
)
async def test_payload_sizes(pair, n, label):
    stub = language_stub(pair.language.address)
    reply = await generate(stub, n, seed=n % 1000)
    assert reply.rounds == expected_rounds(n, pair.language_pool_tokens), label
    if n > INITIAL:
        assert reply.rounds >= 2
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_32_concurrent_mixed(pair):
    rng = random.Random(32)
    sizes = [rng.choice([1, 64, 129, 2000, INITIAL, INITIAL + 1, 15000, 40000]) for _ in range(32)]
    stub = language_stub(pair.language.address)
    replies = await asyncio.gather(*(generate(stub, n, seed=1000 + i) for i, n in enumerate(sizes)))
    assert [r.total_tokens for r in replies] == sizes
    assert any(r.rounds >= 3 for r in replies)
    assert len({r.request_id for r in replies}) == 32
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_request_id_is_kept_and_reuse_of_a_live_id_is_refused(pair, unique_id):
    import grpc

    stub = language_stub(pair.language.address)
    rid = unique_id()
    first = asyncio.ensure_future(
        stub.Generate(
            language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=200000, synthetic_seed=3)
        )
    )
    # Wait until the language shows the request live (a ~1 s transfer), then reuse its id.
    while True:
        try:
            info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
            if info.state in (1, 2, 3):
                break
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=5))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and rid in e.value.details()
    assert (await first).request_id == rid
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))
