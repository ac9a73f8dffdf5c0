"""The write fence between real processes (real Mooncake over TCP on 127.0.0.1): a write the
encoder gave up on never lands in another request's payload.

The fault is injected (the encoder's test-only `--transport-fault late_nth=1,late_s=S`): the first
write is reported failed at once, but its bytes — a copy of the source taken when the write was
submitted — really land S seconds later. The language pool holds exactly one round, so the next
request needs the very blocks the late write lands in. Its consumer holds the payload across the
late landing (the language's test-only `--fault hold_payload_s=H`, which hashes the payload again
after holding it and fails the request with DATA_LOSS if it changed).

Without the fence, request 1's blocks are freed on both sides when it fails, request 2 gets them at
once, and the late bytes land inside request 2's payload while its consumer holds it. With it:
right after request 1 fails both sides hold blocks (quarantined), request 2 waits for them, and
every payload is the one the formula says (digests recomputed independently, numpy only)."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import grpc
import pytest

from common.pb.epd.v1 import bench_pb2, bench_pb2_grpc, common_pb2, language_pb2
from services.language.ranks import free_port
from services.tools import status as status_cli
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, encoder_stub, language_stub

HIDDEN = 128
BLOCK = 128
ROUND_BLOCKS = 8  # the whole language pool: one round of 1024 tokens
TOKENS = ROUND_BLOCKS * BLOCK
LATE_S = 3.0  # the late write lands this long after it was reported failed
HOLD_S = LATE_S + 2.0  # a consumer holding request 2 from just after request 1 spans the landing

pytestmark = pytest.mark.timeout(180)


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5
    ) as r:  # 127.0.0.1 only
        total = 0.0
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def _pools(pair: Pair) -> tuple[common_pb2.PoolInfo, common_pb2.PoolInfo]:
    enc = await encoder_stub(pair.encoder.address).GetPool(common_pb2.GetPoolRequest())
    lang = await language_stub(pair.language.address).GetPool(common_pb2.GetPoolRequest())
    return enc, lang


@pytest.mark.parametrize("tp", [1, 2])
async def test_a_late_write_never_reaches_another_requests_payload_fault_injected(tp):
    enc_metrics, lang_metrics = free_port("127.0.0.1"), free_port("127.0.0.1")
    pair = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=ROUND_BLOCKS,
        initial_tokens=TOKENS,
        encoder_args=(
            "--transport-fault",
            f"late_nth=1,late_s={LATE_S}",
            "--metrics-port",
            str(enc_metrics),
        ),
        language_args=(
            "--tp",
            str(tp),
            "--fault",
            f"hold_payload_s={HOLD_S}",
            "--metrics-port",
            str(lang_metrics),
            "--alloc-timeout-s",
            "60",
        ),
    )
    try:
        stub = language_stub(pair.language.address)
        # Request 1: its (only) write is reported failed at once; the client hears it at once.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Generate(
                language_pb2.GenerateRequest(
                    request_id="fenced-1", synthetic_tokens=TOKENS, synthetic_seed=1
                ),
                timeout=30,
            )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert time.monotonic() - started < LATE_S, "the client waited for the late write"

        # Right after: blocks held on both sides, quarantined, while the write may still land.
        enc_pool, lang_pool = await _pools(pair)
        assert enc_pool.quarantined_blocks == ROUND_BLOCKS and enc_pool.used_blocks == 0, enc_pool
        assert lang_pool.quarantined_blocks == ROUND_BLOCKS and lang_pool.free_blocks == 0, (
            lang_pool
        )
        deadline = time.monotonic() + 5  # rank 1 ends its part just after rank 0 replied
        while not all(rp.quarantined_blocks == ROUND_BLOCKS for rp in lang_pool.rank_pools):
            assert time.monotonic() < deadline, lang_pool
            await asyncio.sleep(0.05)
            _, lang_pool = await _pools(pair)
        info = await encoder_stub(pair.encoder.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id="fenced-1")
        )
        assert info.state == common_pb2.TRANSFER_STATE_FAILED and info.error.writes_may_land, info
        assert _metric(enc_metrics, "epd_pool_blocks", state="quarantined") == ROUND_BLOCKS
        assert _metric(lang_metrics, "epd_pool_blocks", state="quarantined") == ROUND_BLOCKS
        # What `epd status ENCODER` prints of them (its own formatting of these replies).
        assert status_cli.error_text(info).startswith("[writes may land] transport:"), (
            status_cli.error_text(info)
        )
        enc_pool, _ = await _pools(pair)
        assert f"{ROUND_BLOCKS} quarantined" in status_cli.pool_text(enc_pool).splitlines()[0]

        # Request 2 needs exactly those blocks: it gets them once the late write landed, and its
        # consumer, holding the payload, sees it unchanged.
        sent = time.monotonic()
        reply = await stub.Generate(
            language_pb2.GenerateRequest(
                request_id="fenced-2", synthetic_tokens=TOKENS, synthetic_seed=2, want_digest=True
            ),
            timeout=60,
        )
        assert reply.payload_sha256 == expected_digest(TOKENS, 2, HIDDEN)
        assert all(r.payload_sha256 == reply.payload_sha256 for r in reply.ranks), reply.ranks
        assert time.monotonic() - sent >= HOLD_S
        # Every rank's consumer found its payload unchanged (rank R serves metrics on port + R; a
        # rank other than 0 consumes after rank 0 replied, so give it a moment).
        deadline = time.monotonic() + HOLD_S + 5
        while (
            sum(
                _metric(lang_metrics + r, "epd_requests_total", outcome="success")
                for r in range(tp)
            )
            < tp
        ):
            assert time.monotonic() < deadline, "not every rank consumed request 2"
            await asyncio.sleep(0.1)
        assert [_metric(lang_metrics + r, "epd_integrity_failures_total") for r in range(tp)] == [
            0
        ] * tp

        info = await encoder_stub(pair.encoder.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id="fenced-1")
        )
        assert not info.error.writes_may_land, info  # the encoder said the writes ended
        assert _metric(enc_metrics, "epd_fenced_transfers_total") == 1
        assert _metric(lang_metrics, "epd_fenced_transfers_total") == 1  # rank 0's endpoint
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


async def test_raw_write_is_answered_only_once_its_late_write_landed_fault_injected():
    """The bench path (MeasureLink -> RawWrite): the encoder answers only once no write of the
    measurement can land (ABORTED, not the transport's UNAVAILABLE, which an unreachable encoder
    would also give), holding its source blocks until then; the language then frees its blocks."""
    pair = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=ROUND_BLOCKS,
        initial_tokens=TOKENS,
        encoder_args=("--transport-fault", "late_nth=1,late_s=2", "--enable-bench"),
        language_args=("--enable-bench",),
    )
    try:
        stub = bench_pb2_grpc.BenchStub(grpc.aio.insecure_channel(pair.language.address))
        started = time.monotonic()
        call = asyncio.ensure_future(
            stub.MeasureLink(bench_pb2.MeasureLinkRequest(tokens=TOKENS, repeats=1), timeout=30)
        )
        await asyncio.sleep(0.5)
        enc_pool, lang_pool = await _pools(pair)
        assert not call.done() and enc_pool.quarantined_blocks == ROUND_BLOCKS, enc_pool
        assert lang_pool.used_blocks == ROUND_BLOCKS, lang_pool  # still the measurement's
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.ABORTED and "late_nth=1" in e.value.details(), (
            e.value.details()
        )
        assert time.monotonic() - started >= 2.0
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


async def test_shutdown_waits_for_writes_still_landing_fault_injected():
    """SIGTERM to both services while a write the encoder gave up on is still landing: the
    encoder keeps its source pool registered and the language its destination pool until the
    write ended (each within --shutdown-grace-s), then both exit cleanly."""
    pair = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=ROUND_BLOCKS,
        initial_tokens=TOKENS,
        encoder_args=("--transport-fault", "late_nth=1,late_s=3"),
    )
    try:
        stub = language_stub(pair.language.address)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(
                language_pb2.GenerateRequest(request_id="fenced-1", synthetic_tokens=TOKENS),
                timeout=30,
            )
        failed_at = time.monotonic()
        for service in (pair.encoder, pair.language):
            service.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(
            *(asyncio.to_thread(s.proc.wait, 30) for s in (pair.encoder, pair.language))
        )
        assert codes == [0, 0]
        assert time.monotonic() - failed_at >= 3.0 - 0.5  # they waited for the landing
        encoder_log, language_log = pair.encoder.stderr_tail(400), pair.language.stderr_tail(400)
        assert "waiting up to" in encoder_log and "every write ended" in encoder_log, encoder_log
        assert "every write into its quarantined blocks ended" in language_log, language_log
    finally:
        pair.stop()
