"""Multi-rank language instances: real rank processes in one gloo group, real
Mooncake TCP to every rank. Every data rank must end with the encoder's bytes (its own digest,
checked against the independent reference), all ranks must consume in the same order, and
any rank's failure must fail the request everywhere with every pool free."""

from __future__ import annotations

import asyncio
import math
import os
import pathlib
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, consumer_logs, language_stub, wait_for_rounds

HIDDEN = 128
INITIAL = 1024
LANG_BLOCKS = 32  # 4096 tokens per rank


def make_pair(tmp_path: pathlib.Path, *language_args: str, **kw) -> Pair:
    return Pair(
        hidden=HIDDEN,
        language_blocks=LANG_BLOCKS,
        initial_tokens=INITIAL,
        encoder_blocks=1024,
        language_args=("--consumer-log", str(tmp_path / "consumed"), *language_args),
        **kw,
    )


def consumed(tmp_path: pathlib.Path, tp: int) -> list[list[str]]:
    return [(tmp_path / f"consumed.rank{r}").read_text().split() for r in range(tp)]


async def generate(stub, n: int, seed: int, data_ranks: list[int], **kw):
    reply = await stub.Generate(
        language_pb2.GenerateRequest(
            synthetic_tokens=n, synthetic_seed=seed, want_digest=True, **kw
        )
    )
    want = expected_digest(n, seed, HIDDEN)
    assert reply.total_tokens == n and reply.payload_sha256 == want
    assert [r.rank for r in reply.ranks] == list(range(len(reply.ranks)))
    for r in reply.ranks:
        assert r.data_rank == (r.rank in data_ranks)
        if r.data_rank:  # every data rank holds exactly the encoder's bytes
            assert r.payload_sha256 == want and r.received_tokens == n and r.rounds == reply.rounds
        else:  # dummy ranks receive nothing
            assert r.payload_sha256 == "" and r.received_tokens == 0
    return reply


@pytest.fixture(scope="module")
def tp_dirs(tmp_path_factory):
    return tmp_path_factory


@pytest.mark.parametrize(
    "tp, data_ranks", [(2, [0, 1]), (3, [0, 1])], ids=["tp2", "tp3-dummy-rank2"]
)
async def test_single_multi_round_and_larger_than_pool(tmp_path, tp, data_ranks):
    extra = ("--tp", str(tp)) + (
        ("--data-ranks", ",".join(map(str, data_ranks))) if len(data_ranks) < tp else ()
    )
    pair = make_pair(tmp_path, *extra)
    try:
        stub = language_stub(pair.language.address)
        assert (await generate(stub, 700, 1, data_ranks)).rounds == 1
        five = INITIAL + 4 * LANG_BLOCKS * 128  # 1 + 4 resume rounds of the whole pool
        assert (await generate(stub, five, 2, data_ranks)).rounds == 5
        big = 3 * LANG_BLOCKS * 128 + 17  # larger than a whole rank pool
        assert (await generate(stub, big, 3, data_ranks)).rounds == 1 + math.ceil(
            (big - INITIAL) / (LANG_BLOCKS * 128)
        )
        # Concurrent requests: every rank consumes the same requests in the same order.
        sizes = [5, 3000, 900, 12000, 64, 7000, 1, 2500]
        replies = await asyncio.gather(
            *(generate(stub, n, 10 + i, data_ranks) for i, n in enumerate(sizes))
        )
        logs = await consumer_logs(tmp_path / "consumed", tp, 3 + len(sizes))
        assert all(log == logs[0] for log in logs), logs
        assert set(r.request_id for r in replies) <= set(logs[0]) and len(logs[0]) == 3 + len(sizes)
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


async def test_rank_with_less_free_pool_shrinks_rounds(tmp_path):
    # Rank 1 keeps only 8 of its 32 blocks free (a nearly full pool: fault injection holds 24).
    pair = make_pair(tmp_path, "--tp", "2", "--fault", "rank=1,hold_blocks=24")
    held = {1: 24}  # by the injected fault
    try:
        stub = language_stub(pair.language.address)
        n = 20000
        reply = await generate(stub, n, 5, [0, 1])
        assert reply.rounds == math.ceil(
            n / (8 * 128)
        )  # every round limited by rank 1's 1024 tokens
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language"), held=held
        )
    finally:
        pair.stop()


async def test_rank_that_cannot_allocate_fails_everywhere_fault_injected(tmp_path, unique_id):
    pair = make_pair(
        tmp_path, "--tp", "2", "--fault", "rank=1,hold_blocks=32", "--alloc-timeout-s", "1"
    )
    held = {1: 32}  # by the injected fault
    try:
        stub = language_stub(pair.language.address)
        rid = unique_id()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=3000))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == common_pb2.TRANSFER_STATE_FAILED
        assert info.error.reason == common_pb2.FAILURE_REASON_RESOURCE_EXHAUSTED
        assert [v.rank for v in info.ranks] == [0, 1]
        async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
            enc = await encoder_pb2_grpc.EncoderStub(ch).GetTransfer(
                common_pb2.GetTransferRequest(request_id=rid)
            )
        assert enc.state == common_pb2.TRANSFER_STATE_FAILED
        assert enc.error.reason == common_pb2.FAILURE_REASON_RESOURCE_EXHAUSTED, enc.error
        assert consumed(tmp_path, 2) == [[], []] if (tmp_path / "consumed.rank0").exists() else True
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language"), held=held
        )
    finally:
        pair.stop()


async def test_lagging_and_repeating_status_on_one_rank_fault_injected(tmp_path):
    pair = make_pair(tmp_path, "--tp", "2", "--fault", "rank=1,status_lag_s=0.03,status_dup=1")
    try:
        stub = language_stub(pair.language.address)
        sizes = [100, 6000, 15000, 2000, 9000]
        replies = await asyncio.gather(
            *(generate(stub, n, 40 + i, [0, 1]) for i, n in enumerate(sizes))
        )
        assert max(r.rounds for r in replies) >= 4
        logs = await consumer_logs(tmp_path / "consumed", 2, len(sizes))
        assert logs[0] == logs[1] and len(logs[0]) == len(sizes)
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


async def test_rank_process_killed_mid_transfer(tmp_path, unique_id):
    # Rank 1's statuses lag (fault injection), so the request is surely mid-transfer when killed.
    pair = make_pair(tmp_path, "--tp", "2", "--fault", "rank=1,status_lag_s=0.2")
    try:
        stub = language_stub(pair.language.address)
        rid = unique_id()
        call = asyncio.ensure_future(
            stub.Generate(language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=60000))
        )
        await wait_for_rounds(stub, rid, 1)
        assert not call.done()
        os.kill(pair.language.info["rank_pids"][0], signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
            enc = await encoder_pb2_grpc.EncoderStub(ch).GetTransfer(
                common_pb2.GetTransferRequest(request_id=rid)
            )
        assert enc.state == common_pb2.TRANSFER_STATE_FAILED
        assert enc.error.reason == common_pb2.FAILURE_REASON_PEER_LOST, enc.error
        async with grpc.aio.insecure_channel(pair.language.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # The encoder and rank 0 free everything (the dead rank's pool died with it).
        await assert_all_free((pair.encoder.address, "encoder"))
        lang_pool = await stub.GetPool(common_pb2.GetPoolRequest())
        assert lang_pool.used_blocks == 0 and lang_pool.waiters == 0
    finally:
        pair.stop()
