"""Timeouts, peers that die, restarts and graceful shutdown, with real processes.

Each scenario ends with both pools fully free and the transfer visible, failed with its reason,
in the inspection history; every Status stream ends."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2
from services.tools.reference_payload import expected_digest
from tests.conftest import (
    Pair,
    ServiceProcess,
    assert_all_free,
    generate_then_kill,
    language_stub,
    wait_for_rounds,
)
from tests.integration.rank_harness import TestRank

FAILED = common_pb2.TRANSFER_STATE_FAILED


@pytest.fixture(scope="module")
def encoder():
    enc = ServiceProcess(
        "encoder",
        "--hidden",
        "256",
        "--block-size",
        "16",
        "--pool-blocks",
        "256",
        "--bootstrap-timeout-s",
        "1",
        "--resume-timeout-s",
        "1",
        "--alloc-timeout-s",
        "1",
    )
    yield enc
    enc.stop()


async def statuses_until_end(stub, rank: TestRank, request_id: str, timeout: float = 10.0) -> list:
    out = []

    async def read():
        async for st in stub.Status(rank.status_request(request_id)):
            out.append(st)

    await asyncio.wait_for(read(), timeout)
    return out


async def test_bootstrap_timeout_without_init(encoder, unique_id):
    """Encode but no Init from any rank: `timeout` after bootstrap_timeout_s, source blocks freed."""
    rank = TestRank()
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        await rank.register(stub)  # an Encode names a language its caller registered
        rid = unique_id()
        await stub.Encode(rank.encode_request(rid, 500))
        assert (await stub.GetPool(common_pb2.GetPoolRequest())).used_blocks > 0
        t0 = time.monotonic()
        sts = await statuses_until_end(stub, rank, rid)
        assert 0.5 < time.monotonic() - t0 < 5
        assert sts[-1].state == FAILED and sts[-1].error.reason == common_pb2.FAILURE_REASON_TIMEOUT
        assert "bootstrap_timeout_s" in sts[-1].error.message
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == FAILED and info.error.reason == common_pb2.FAILURE_REASON_TIMEOUT
        history = await stub.ListTransfers(common_pb2.ListTransfersRequest(states=[FAILED]))
        assert rid in [t.request_id for t in history.transfers]
    await assert_all_free((encoder.address, "encoder"))
    rank.close()


async def test_bootstrap_timeout_when_a_rank_never_inits(encoder, unique_id):
    """rank_count=2 but only rank 0 sends Init: both sides free, rank 0's stream ends FAILED."""
    rank = TestRank()
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        await rank.register(stub)
        rid = unique_id()
        blocks = rank.alloc(4)
        await stub.Init(rank.init_request(rid, blocks, rank_count=2))
        await stub.Encode(rank.encode_request(rid, 50, rank_count=2))
        sts = await statuses_until_end(stub, rank, rid)
        assert sts[-1].state == FAILED and sts[-1].error.reason == common_pb2.FAILURE_REASON_TIMEOUT
        assert "have ranks [0] of rank_count=2" in sts[-1].error.message
        rank.free(blocks)
    await assert_all_free((encoder.address, "encoder"))
    assert rank.used_blocks == 0
    rank.close()


async def test_resume_timeout(encoder, unique_id):
    """A partial round never resumed: `timeout` after resume_timeout_s, every stream ends."""
    rank = TestRank()
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        await rank.register(stub)
        rid = unique_id()
        blocks = rank.alloc(1)
        await stub.Init(rank.init_request(rid, blocks))
        await stub.Encode(rank.encode_request(rid, 100))
        sts = await statuses_until_end(stub, rank, rid)
        states = [s.state for s in sts]
        assert common_pb2.TRANSFER_STATE_TRANSFERRING in states and states[-1] == FAILED
        assert (
            sts[-1].error.reason == common_pb2.FAILURE_REASON_TIMEOUT
            and "resume_timeout_s" in sts[-1].error.message
        )
        assert sts[-1].sent_tokens == 16
        rank.free(blocks)
    await assert_all_free((encoder.address, "encoder"))
    rank.close()


async def test_encoder_source_pool_full_is_resource_exhausted(unique_id):
    enc = ServiceProcess(
        "encoder",
        "--hidden",
        "256",
        "--block-size",
        "16",
        "--pool-blocks",
        "256",
        "--bootstrap-timeout-s",
        "4",
        "--alloc-timeout-s",
        "0.5",
    )
    rank = TestRank()
    try:
        async with grpc.aio.insecure_channel(enc.address) as ch:
            stub = encoder_pb2_grpc.EncoderStub(ch)
            await rank.register(stub)
            # 256 blocks of 16 tokens: the first Encode holds 250 blocks until its bootstrap timeout.
            first, second = unique_id(), unique_id()
            await stub.Encode(rank.encode_request(first, 250 * 16))
            used = (await stub.GetPool(common_pb2.GetPoolRequest())).used_blocks
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Encode(rank.encode_request(second, 100 * 16))
            assert (
                e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "timed out" in e.value.details()
            )
            assert (await stub.GetPool(common_pb2.GetPoolRequest())).used_blocks == used
            await stub.Cancel(rank.cancel_request(first, "test over"))
        await assert_all_free((enc.address, "encoder"))
    finally:
        rank.close()
        enc.stop()


async def test_reregistered_rank_fails_transfers_to_its_old_session(encoder, unique_id):
    """A rank that re-registers (a restarted process) gets its stale transfers failed, and no byte
    is written to the old pool afterwards."""
    old = TestRank()
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        await old.register(stub)
        rid = unique_id()
        blocks = old.alloc(1)
        await stub.Init(old.init_request(rid, blocks))
        await stub.Encode(old.encode_request(rid, 100))
        while (
            await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        ).sent_tokens < 16:
            await asyncio.sleep(0.01)
        new = TestRank(language_id=old.language_id)  # same identity, new pool
        await new.register(stub)
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == FAILED and info.error.reason == common_pb2.FAILURE_REASON_PEER_LOST
        assert "re-registered" in info.error.message
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Resume(old.resume_request(rid, 16, old.alloc(1)))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        old.release_all()
        new.close()
    await assert_all_free((encoder.address, "encoder"))
    old.close()


async def test_encoder_killed_mid_transfer_then_restarted(unique_id):
    """SIGKILL the encoder mid-transfer: the language fails the request with peer_lost (UNAVAILABLE),
    quarantines the round's blocks (its Cancel was refused) until the grace has passed, and serves
    the next request from the restarted encoder (same address)."""
    from services.language.ranks import free_port

    port = free_port("127.0.0.1")
    args = ("--hidden", "256", "--pool-blocks", "2048", "--port", str(port))
    enc = ServiceProcess("encoder", *args)
    lang = ServiceProcess(
        "language",
        "--hidden",
        "256",
        "--pool-blocks",
        "16",
        "--encoder",
        enc.address,
        "--initial-tokens",
        "512",
        "--fault",
        "status_lag_s=0.05",
        "--quarantine-grace-s",
        "3",
    )
    try:
        stub = language_stub(lang.address)
        rid = unique_id()
        error = await generate_then_kill(stub, rid, enc.kill)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == FAILED and info.error.reason == common_pb2.FAILURE_REASON_PEER_LOST
        pool = await stub.GetPool(common_pb2.GetPoolRequest())
        assert pool.used_blocks == 0 and pool.free_blocks + pool.quarantined_blocks == 16, pool
        print(f"{pool.quarantined_blocks} blocks quarantined after the kill")
        enc = ServiceProcess("encoder", *args)  # restarted on the same address
        reply = await stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=3000, synthetic_seed=9, want_digest=True)
        )
        assert reply.payload_sha256 == expected_digest(3000, 9, 256)
        deadline = (
            time.monotonic() + 30
        )  # the refused Cancel counts as an answer: the 3 s grace ends it
        while (pool := await stub.GetPool(common_pb2.GetPoolRequest())).quarantined_blocks:
            assert time.monotonic() < deadline, f"still quarantined: {pool}"
            await asyncio.sleep(0.1)
        await assert_all_free((enc.address, "encoder"), (lang.address, "language"))
    finally:
        lang.stop()
        enc.stop()


async def test_language_killed_mid_transfer_frees_the_encoder(unique_id):
    pair = Pair(
        hidden=256,
        language_blocks=16,
        initial_tokens=512,
        language_args=("--fault", "status_lag_s=0.05"),
    )
    try:
        stub = language_stub(pair.language.address)
        rid = unique_id()
        await generate_then_kill(stub, rid, pair.language.kill)
        async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
            enc = encoder_pb2_grpc.EncoderStub(ch)
            info = await enc.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
            # Whichever the encoder notices first: the broken Status stream or the failed write.
            assert info.state == FAILED and info.error.reason in (
                common_pb2.FAILURE_REASON_PEER_LOST,
                common_pb2.FAILURE_REASON_TRANSPORT,
            )
        await assert_all_free((pair.encoder.address, "encoder"))
    finally:
        pair.stop()


async def test_sigterm_drains_in_flight_then_exits_zero(unique_id):
    """SIGTERM: health NOT_SERVING, new requests UNAVAILABLE, the in-flight request still
    completes within the grace period, exit code 0 (memory unregistered on the way out)."""
    pair = Pair(
        hidden=256,
        language_blocks=16,
        initial_tokens=512,
        language_args=("--fault", "status_lag_s=0.05", "--shutdown-grace-s", "20"),
    )
    try:
        stub = language_stub(pair.language.address)
        rid = unique_id()
        call = asyncio.ensure_future(
            stub.Generate(
                language_pb2.GenerateRequest(
                    request_id=rid, synthetic_tokens=20000, synthetic_seed=4, want_digest=True
                )
            )
        )
        await wait_for_rounds(stub, rid, 1)
        pair.language.proc.send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(pair.language.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await language_pb2_grpc_stub(ch).Generate(
                    language_pb2.GenerateRequest(synthetic_tokens=5)
                )
            assert (
                e.value.code() == grpc.StatusCode.UNAVAILABLE
                and "shutting down" in e.value.details()
            )
        reply = await call
        assert reply.payload_sha256 == expected_digest(20000, 4, 256)
        assert await asyncio.to_thread(pair.language.proc.wait, 30) == 0
        await assert_all_free((pair.encoder.address, "encoder"))
        assert pair.encoder.stop() == 0
    finally:
        pair.stop()


def language_pb2_grpc_stub(channel):
    from common.pb.epd.v1 import language_pb2_grpc

    return language_pb2_grpc.LanguageStub(channel)
