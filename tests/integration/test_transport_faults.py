"""Mooncake write faults, injected into the encoder by the test launcher's `--transport-fault`
(tests/faults/transport.py, tests/faults/launch.py): a failed write fails its request with reason `transport` on every
rank and nothing else; a slow write delays but does not break, and a Cancel during it frees
both sides only once the write returned; a write corrupted after it landed is caught by the
language's checksums (reason `integrity`). After every scenario both pools are fully free and no
request hangs (every gather runs under a watchdog)."""

from __future__ import annotations

import asyncio
import ctypes
import time

import grpc
import pytest

from common.config import ConfigError, EncoderConfig
from common.errors import TransportError
from common.fence import WriteFence, run_tracked
from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2
from services.tools import cli
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, consumer_logs, language_stub
from tests.faults import launch
from tests.faults.transport import SCRATCH_BYTES, FaultyTransport, TransportFaultSpec

HIDDEN = 128
INITIAL = 1024  # tokens of the initial allocation: larger requests take several rounds
LANG_BLOCKS = 64  # 8192 tokens per rank
WATCHDOG_S = 60.0  # no scenario may hang: far above what any of them needs

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- spec and wrapper, in process


def test_spec_parses_combinations_and_the_launcher_rejects_bad_specs(capsys):
    assert TransportFaultSpec.parse("fail_nth=3") == TransportFaultSpec(fail_nth=3)
    assert TransportFaultSpec.parse(" fail_fraction=0.3 , seed=7 ") == TransportFaultSpec(
        fail_fraction=0.3, seed=7
    )
    assert TransportFaultSpec.parse("delay_s=0.2,corrupt_nth=2,fail_nth=5") == TransportFaultSpec(
        fail_nth=5, delay_s=0.2, corrupt_nth=2
    )
    assert not TransportFaultSpec.parse("seed=3").active
    assert TransportFaultSpec.parse("late_nth=1,late_s=6") == TransportFaultSpec(
        late_nth=1, late_s=6.0
    )
    assert TransportFaultSpec.parse("late_nth=3").active
    for bad in (
        "fail_nth",
        "fail_nth=x",
        "nope=1",
        "fail_fraction=1.5",
        "fail_nth=-1",
        "delay_s=-1",
        "fail_nth=1,fail_nth=2",
        "late_nth=-1",
        "late_s=3",
        "late_nth=1,late_s=-1",
    ):
        with pytest.raises(ConfigError, match="transport_fault="):
            launch.build_parts(transport_fault=bad)
    # The launcher exits 2 naming the bad spec, before starting anything.
    assert launch.main(["--transport-fault", "fail_nth=zero", "encoder"]) == 2
    assert "fail_nth=zero" in capsys.readouterr().err
    # Production's `epd` has no fault setting at all: neither a flag nor an environment variable.
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["encoder", "--transport-fault", "corrupt_nth=2"])
    with pytest.raises(SystemExit):
        cli.make_parser().parse_args(["language", "--fault", "rank=1,status_dup=1"])
    args = cli.make_parser().parse_args(["encoder"])
    with pytest.raises(ConfigError, match="EPD_TRANSPORT_FAULT"):
        cli.build_config(EncoderConfig, args, {"EPD_TRANSPORT_FAULT": "fail_nth=1"})


class FakeTransport:
    """Stands in for MooncakeTransport: performs writes as local memmoves and records them."""

    session = "127.0.0.1:1"

    def __init__(self):
        self.registered: list[tuple[int, int, str]] = []
        self.writes: list[list[tuple[int, int, int]]] = []
        self.closed = False

    def register(self, address, length, location="*"):
        self.registered.append((address, length, location))

    def write_sync(self, session, triples, *, wait=""):
        self.writes.append(list(triples))
        for src, dst, n in triples:
            ctypes.memmove(dst, src, n)

    async def write(self, session, triples, *, wait="", fence=None):
        await run_tracked(lambda: self.write_sync(session, triples, wait=wait), fence)

    def unregister(self, address):
        self.registered = [r for r in self.registered if r[0] != address]

    def close(self, late_timeout_s=5.0):
        self.closed = True


def _buffers(n=256):
    src = ctypes.create_string_buffer(bytes(range(256)) * (n // 256), n)
    dst = ctypes.create_string_buffer(n)
    return src, dst, [(ctypes.addressof(src), ctypes.addressof(dst), n)]


async def test_late_write_is_reported_failed_at_once_and_lands_the_submitted_bytes_later():
    """late_nth: the write raises TransportError at once, carrying what is still in flight; the
    bytes of the source as it was at submission land late_s later (through a registered copy,
    written by the inner transport), and only then does the fence clear."""
    inner = FakeTransport()
    t = FaultyTransport(inner, "late_nth=2,late_s=0.5")
    src, dst, triples = _buffers()
    t.register(ctypes.addressof(src), 256, "cpu:0")
    submitted = src.raw
    fence = WriteFence()
    await t.write(t.session, triples, fence=fence)
    assert dst.raw == submitted and not fence.may_land
    ctypes.memset(dst, 0, 256)
    started = time.monotonic()
    with pytest.raises(TransportError, match="late_nth=2") as e:
        await t.write(t.session, triples, fence=fence)
    assert time.monotonic() - started < 0.3 and e.value.in_flight is not None
    assert fence.may_land and t.late == [2] and dst.raw == bytes(256)
    ctypes.memset(src, 0x5A, 256)  # the source blocks are reused meanwhile
    assert await fence.wait(5)
    assert time.monotonic() - started >= 0.5
    assert dst.raw == submitted  # the old request's bytes landed, late
    assert fence.late_writes == 1 and fence.failed_pieces == 0
    assert [r[0] for r in inner.registered] == [
        ctypes.addressof(src)
    ]  # the copy was unregistered again


async def test_wrapper_fails_delays_and_corrupts_as_specified():
    # fail_nth: the 2nd write raises TransportError and writes nothing; the others go through.
    inner = FakeTransport()
    t = FaultyTransport(inner, "fail_nth=2")
    src, dst, triples = _buffers()
    await t.write(t.session, triples)
    ctypes.memset(dst, 0, 256)
    with pytest.raises(TransportError, match="injected fault: write #2"):
        await t.write(t.session, triples)
    assert dst.raw == bytes(256) and len(inner.writes) == 1
    await t.write(t.session, [])  # an empty write is not counted
    t.write_sync(t.session, triples)
    assert t.writes == 3 and t.failed == [2] and [len(w) for w in inner.writes] == [1, 0, 1]
    # corrupt_nth: the write lands, then its first bytes are flipped through a registered scratch buffer.
    inner = FakeTransport()
    t = FaultyTransport(inner, "corrupt_nth=1")
    assert [(n, loc) for _, n, loc in inner.registered] == [
        (SCRATCH_BYTES, "cpu:0")
    ]  # at construction
    src, dst, triples = _buffers()
    t.register(ctypes.addressof(src), 256, "cpu:0")
    await t.write(t.session, triples)
    assert dst.raw[:SCRATCH_BYTES] == bytes(b ^ 0xFF for b in src.raw[:SCRATCH_BYTES])
    assert dst.raw[SCRATCH_BYTES:] == src.raw[SCRATCH_BYTES:] and t.corrupted == [1]
    await t.write(t.session, triples)
    assert dst.raw == src.raw
    t.close()
    assert inner.closed
    # fail_fraction: reproducible with its seed.
    fates = []
    for _ in range(2):
        t = FaultyTransport(FakeTransport(), "fail_fraction=0.5,seed=11")
        for _ in range(20):
            try:
                t.write_sync(t.session, triples)
            except TransportError:
                pass
        fates.append(t.failed)
    assert fates[0] == fates[1] and 0 < len(fates[0]) < 20
    # delay_s: the write sleeps in its worker thread, never on the event loop.
    t = FaultyTransport(FakeTransport(), "delay_s=0.3")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick = asyncio.ensure_future(ticker())
    started = time.monotonic()
    await t.write(t.session, triples)
    tick.cancel()
    assert time.monotonic() - started >= 0.3 and ticks >= 10


# ---------------------------------------------------------------------------- real processes


def make_pair(fault: str, *language_args: str) -> Pair:
    return Pair(
        hidden=HIDDEN,
        language_blocks=LANG_BLOCKS,
        initial_tokens=INITIAL,
        encoder_blocks=1024,
        encoder_args=("--transport-fault", fault),
        language_args=language_args,
    )


async def encoder_info(pair: Pair, request_id: str) -> common_pb2.TransferInfo:
    async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
        return await encoder_pb2_grpc.EncoderStub(ch).GetTransfer(
            common_pb2.GetTransferRequest(request_id=request_id)
        )


async def all_free(pair: Pair) -> None:
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def attempt(stub, request_id: str, n: int, seed: int):
    """One Generate: ("ok", reply) with the digest checked, or ("error", the gRPC error)."""
    try:
        reply = await stub.Generate(
            language_pb2.GenerateRequest(
                request_id=request_id, synthetic_tokens=n, synthetic_seed=seed, want_digest=True
            )
        )
    except grpc.aio.AioRpcError as e:
        return "error", e
    assert reply.total_tokens == n and reply.payload_sha256 == expected_digest(n, seed, HIDDEN), (
        request_id
    )
    for r in reply.ranks:  # every data rank holds the encoder's bytes
        assert r.payload_sha256 == reply.payload_sha256
    return "ok", reply


async def assert_failed(
    pair: Pair,
    stub,
    request_id: str,
    error: grpc.aio.AioRpcError,
    code: grpc.StatusCode,
    reason: int,
    ranks: int | None = 1,
) -> common_pb2.TransferInfo:
    """The client got `code`; the language and the encoder both recorded FAILED with `reason`."""
    assert error.code() == code, (error.code(), error.details())
    info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    assert info.state == common_pb2.TRANSFER_STATE_FAILED
    assert info.error.reason == reason, info.error
    if ranks is not None:
        assert [v.rank for v in info.ranks] == list(range(ranks))
    enc = await encoder_info(pair, request_id)
    assert enc.state == common_pb2.TRANSFER_STATE_FAILED
    assert enc.error.reason == reason, enc.error
    return enc


async def test_fail_nth_fails_only_the_request_that_hit_it(unique_id):
    pair = make_pair("fail_nth=3")
    try:
        stub = language_stub(pair.language.address)
        # Concurrent requests, some of several rounds: write #3 is one round of exactly one of them.
        sizes = [700, 3000, 5000, 64, 2500, 9000]
        ids = [unique_id(f"n{i}") for i in range(len(sizes))]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(attempt(stub, rid, n, 100 + i) for i, (rid, n) in enumerate(zip(ids, sizes)))
            ),
            WATCHDOG_S,
        )
        failed = [(rid, res) for rid, (kind, res) in zip(ids, results) if kind == "error"]
        assert len(failed) == 1, [(rid, e.code(), e.details()) for rid, e in failed]
        rid, error = failed[0]
        enc = await assert_failed(
            pair, stub, rid, error, grpc.StatusCode.UNAVAILABLE, common_pb2.FAILURE_REASON_TRANSPORT
        )
        assert "injected fault: write #3" in enc.error.message, enc.error.message
        await all_free(pair)
        # Only the 3rd write fails: the service goes on serving.
        kind, _ = await asyncio.wait_for(attempt(stub, unique_id(), 4000, 7), WATCHDOG_S)
        assert kind == "ok"
        await all_free(pair)
    finally:
        pair.stop()


async def test_fail_nth_mid_transfer_fails_on_every_rank(tmp_path, unique_id):
    # Two ranks: round 1 is writes #1 and #2, round 2 writes #3 and #4; #4 fails (one rank's
    # write of round 2, while the other rank's write of that round succeeds).
    pair = make_pair("fail_nth=4", "--tp", "2", "--consumer-log", str(tmp_path / "consumed"))
    try:
        stub = language_stub(pair.language.address)
        rid = unique_id()
        kind, error = await asyncio.wait_for(attempt(stub, rid, INITIAL + 1500, 3), WATCHDOG_S)
        assert kind == "error"
        enc = await assert_failed(
            pair,
            stub,
            rid,
            error,
            grpc.StatusCode.UNAVAILABLE,
            common_pb2.FAILURE_REASON_TRANSPORT,
            ranks=2,
        )
        assert "round 2 write failed" in enc.error.message, enc.error.message
        await all_free(pair)
        ok_id = unique_id()
        kind, reply = await asyncio.wait_for(attempt(stub, ok_id, INITIAL + 1500, 4), WATCHDOG_S)
        assert kind == "ok" and reply.rounds == 2 and len(reply.ranks) == 2
        await all_free(pair)
        # No rank handed the failed request to its consumer; both consumed the good one.
        consumed = await consumer_logs(tmp_path / "consumed", 2, 1)
        assert consumed == [[ok_id], [ok_id]], consumed
    finally:
        pair.stop()


async def test_fail_fraction_each_request_succeeds_intact_or_fails_with_transport(unique_id):
    pair = make_pair("fail_fraction=0.3,seed=7")
    try:
        stub = language_stub(pair.language.address)
        sizes = [1 + (i * 977) % 6000 for i in range(24)]
        ids = [unique_id(f"f{i}") for i in range(len(sizes))]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(attempt(stub, rid, n, 200 + i) for i, (rid, n) in enumerate(zip(ids, sizes)))
            ),
            WATCHDOG_S,
        )
        ok = [rid for rid, (kind, _) in zip(ids, results) if kind == "ok"]
        failed = [(rid, res) for rid, (kind, res) in zip(ids, results) if kind == "error"]
        for rid, error in failed:
            await assert_failed(
                pair,
                stub,
                rid,
                error,
                grpc.StatusCode.UNAVAILABLE,
                common_pb2.FAILURE_REASON_TRANSPORT,
            )
        for rid in ok:
            assert (await encoder_info(pair, rid)).state == common_pb2.TRANSFER_STATE_SUCCESS
        assert ok and failed, (len(ok), len(failed))
        await all_free(pair)
    finally:
        pair.stop()


async def test_slow_writes_succeed_and_cancel_waits_for_the_write_in_flight(unique_id):
    delay = 0.5
    pair = make_pair(f"delay_s={delay}")
    try:
        stub = language_stub(pair.language.address)
        kind, reply = await asyncio.wait_for(
            attempt(stub, unique_id(), INITIAL + 500, 1), WATCHDOG_S
        )
        assert kind == "ok" and reply.rounds == 2 and reply.transfer_seconds >= 2 * delay
        await all_free(pair)

        # Cancel while round 1's write is in flight: Init done on every rank and the payload
        # encoded (total_tokens known) but no round published yet means the write is under way.
        rid = unique_id()
        call = asyncio.ensure_future(attempt(stub, rid, 3000, 2))
        seen_at, deadline = None, time.monotonic() + WATCHDOG_S
        while seen_at is None and time.monotonic() < deadline:
            try:
                enc = await encoder_info(pair, rid)
            except grpc.aio.AioRpcError:
                enc = None  # not there yet
            if (
                enc is not None
                and enc.state == common_pb2.TRANSFER_STATE_WAITING_FOR_INPUT
                and enc.total_tokens
            ):
                seen_at = time.monotonic()
            else:
                await asyncio.sleep(0.01)
        assert enc.rounds == 0 and not call.done()
        cancel = await stub.Cancel(
            common_pb2.CancelRequest(request_id=rid, reason="client gave up")
        )
        cancel_s = time.monotonic() - seen_at
        assert cancel.cancelled
        # Neither side frees or publishes until the write returned (it cannot be recalled).
        assert cancel_s >= delay * 0.6, cancel_s
        kind, error = await asyncio.wait_for(call, WATCHDOG_S)
        assert kind == "error"
        # (A request cancelled before the ranks decided has no rank views on the language: not checked.)
        await assert_failed(
            pair,
            stub,
            rid,
            error,
            grpc.StatusCode.CANCELLED,
            common_pb2.FAILURE_REASON_CANCELLED,
            ranks=None,
        )
        await all_free(pair)
        # The blocks the cancelled request held are handed out again and come back intact.
        kind, _ = await asyncio.wait_for(attempt(stub, unique_id(), 900, 3), WATCHDOG_S)
        assert kind == "ok"
        await all_free(pair)
    finally:
        pair.stop()


async def test_corrupted_write_is_caught_by_checksums(unique_id):
    pair = make_pair("corrupt_nth=1")
    try:
        stub = language_stub(pair.language.address)
        # Round 1 of a two-round request is corrupted after it landed: the language's check of
        # that round fails it, and its Cancel (failure=INTEGRITY) fails it on the encoder too.
        rid = unique_id()
        kind, error = await asyncio.wait_for(attempt(stub, rid, INITIAL + 700, 5), WATCHDOG_S)
        assert kind == "error"
        enc = await assert_failed(
            pair, stub, rid, error, grpc.StatusCode.DATA_LOSS, common_pb2.FAILURE_REASON_INTEGRITY
        )
        assert enc.rounds == 1, enc
        assert "checksum" in error.details(), error.details()
        await all_free(pair)
        kind, _ = await asyncio.wait_for(attempt(stub, unique_id(), INITIAL + 700, 6), WATCHDOG_S)
        assert kind == "ok"
        await all_free(pair)
    finally:
        pair.stop()
