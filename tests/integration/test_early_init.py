"""The Init sent alongside the Encode (`--early-init`, docs/DESIGN.md "Early and carried Init"):
used when the pool has room to spare, never when it has not, correct payloads either way,
nothing left behind when the Encode is refused after the Init went out, and no deadlock when
both pools are short of blocks. By default the Init travels inside the Encode (`--carry-init`,
EncodeRequest.init); an encoder that refuses it gets the rank's own Init instead."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, encoder_pb2, language_pb2
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, ServiceProcess, assert_all_free, encoder_stub, language_stub
from tests.integration.rank_harness import TestRank

HIDDEN = 64


async def _generate(stub, n: int, seed: int, **kw) -> language_pb2.GenerateReply:
    return await stub.Generate(
        language_pb2.GenerateRequest(
            synthetic_tokens=n, synthetic_seed=seed, want_digest=True, **kw
        )
    )


@pytest.fixture(scope="module")
def roomy():
    # Language: 32 blocks, fixed 1024-token (8-block) initial allocations: early reservations may
    # hold up to 24 blocks.
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=64,
        language_blocks=32,
        initial_tokens=1024,
        encoder_args=("--metrics-port", str(free_port("127.0.0.1"))),
    )
    yield p
    p.stop()


async def test_init_goes_out_alongside_the_encode_when_the_pool_has_room(roomy):
    stub = language_stub(roomy.language.address)
    for n, seed in ((64, 1), (1024, 2), (3000, 3)):  # one round, exactly the allocation, a resume
        reply = await _generate(stub, n, seed)
        assert reply.early_init, n
        assert reply.payload_sha256 == expected_digest(n, seed, HIDDEN)
        assert reply.rounds == (
            1 if n <= 1024 else 2
        )  # a resume takes what remains (the pool has room)
        # The transfer's clock starts once both the Init and the Encode are done.
        assert 0 < reply.transfer_seconds <= reply.total_seconds
    await assert_all_free((roomy.encoder.address, "encoder"), (roomy.language.address, "language"))
    # Each Init travelled inside its Encode (--carry-init, the default), and rank 0's statuses
    # came on the Encode's own call (--encode-stream): the encoder served no Init, no Status.
    assert _rpc_count(roomy.encoder, "Init") == 0
    assert _rpc_count(roomy.encoder, "Status") == 0
    assert _rpc_count(roomy.encoder, "EncodeStream") >= 3


def _rpc_count(process, method: str) -> float:
    """How many `method` RPCs the process served (epd_rpc_seconds_count, every status code)."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{process.info['metrics_port']}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    return sum(
        float(v)
        for v in re.findall(
            rf'^epd_rpc_seconds_count{{[^}}]*method="{method}"[^}}]*}} (\S+)$', text, re.M
        )
    )


async def test_an_encode_carrying_another_requests_init_is_refused_and_changes_nothing(roomy):
    enc = encoder_stub(roomy.encoder.address)
    request = encoder_pb2.EncodeRequest(
        request_id="carrier-1",
        language_id="lang-x",
        synthetic_tokens=64,
        init=encoder_pb2.InitRequest(
            request_id="carrier-2",
            language_id="lang-x",
            rank=0,
            rank_count=1,
            dst_blocks=[0],
            allocated_tokens=128,
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await enc.Encode(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'carrier-2'" in e.value.details() and "'carrier-1'" in e.value.details(), (
        e.value.details()
    )
    for rid in ("carrier-1", "carrier-2"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await enc.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    await assert_all_free((roomy.encoder.address, "encoder"))


async def test_a_refused_carried_init_leaves_the_encode_running(roomy):
    """An Init the encoder refuses (here: from a rank of the language that never registered) does
    not fail the Encode that carried it; the reply says why, so the rank can send the Init itself."""
    enc = encoder_stub(roomy.encoder.address)
    rank = TestRank(hidden=HIDDEN, language_id="carrier-lang")
    try:
        await rank.register(enc)  # rank 0 only
        reply = await enc.Encode(
            encoder_pb2.EncodeRequest(
                request_id="carried-refused",
                language_id="carrier-lang",
                synthetic_tokens=64,
                rank_count=2,
                init=encoder_pb2.InitRequest(
                    request_id="carried-refused",
                    language_id="carrier-lang",
                    rank=1,
                    rank_count=2,
                    dst_blocks=[0],
                    allocated_tokens=128,
                ),
            )
        )
        assert reply.total_tokens == 64 and not reply.init_applied
        assert "rank 1 has not called Register" in reply.init_error, reply.init_error
        await enc.Cancel(rank.cancel_request("carried-refused"))
        await assert_all_free((roomy.encoder.address, "encoder"))
    finally:
        rank.close()


async def test_after_an_encoder_restart_the_language_registers_again():
    """A restarted encoder no longer knows the language: it refuses the first Encode (and the Init
    inside it) with FAILED_PRECONDITION and the machine-readable reason NOT_REGISTERED; the rank
    registers again (with a fresh proof of possession) and sends the Encode once more."""
    port = free_port("127.0.0.1")
    enc_args = ("--hidden", str(HIDDEN), "--pool-blocks", "64", "--port", str(port))
    enc = ServiceProcess("encoder", *enc_args)
    lang = ServiceProcess(
        "language",
        "--hidden",
        str(HIDDEN),
        "--pool-blocks",
        "32",
        "--encoder",
        enc.address,
        "--initial-tokens",
        "1024",
    )
    try:
        stub = language_stub(lang.address)
        assert (await _generate(stub, 300, 1)).early_init
        enc.stop()
        enc = ServiceProcess("encoder", *enc_args)  # same address, no sessions
        reply = await _generate(stub, 300, 2)
        assert reply.early_init and reply.payload_sha256 == expected_digest(300, 2, HIDDEN)
        assert (
            "no longer knows this instance (NOT_REGISTERED): registering again"
            in lang.stderr_tail(max_lines=400)
        )
        await assert_all_free((enc.address, "encoder"), (lang.address, "language"))
    finally:
        lang.stop()
        enc.stop()


async def test_a_status_stream_may_wait_for_its_transfer():
    """StatusRequest.await_transfer: the language opens the Status stream right behind the Encode
    that carries its Init, so the encoder may see the stream first. It waits for the transfer (at
    most --bootstrap-timeout-s, then NOT_FOUND); without the flag an unknown id is NOT_FOUND at once."""
    import time

    enc = ServiceProcess(
        "encoder", "--hidden", str(HIDDEN), "--pool-blocks", "16", "--bootstrap-timeout-s", "1"
    )
    rank = TestRank(hidden=HIDDEN, language_id="lang-a")
    try:
        stub = encoder_stub(enc.address)
        await rank.register(stub)
        stream = stub.Status(
            encoder_pb2.StatusRequest(request_id="later", language_id="lang-a", await_transfer=True)
        )
        first = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0.2)
        assert not first.done()  # waiting, not NOT_FOUND
        await stub.Encode(
            encoder_pb2.EncodeRequest(
                request_id="later", language_id="lang-a", synthetic_tokens=64, rank_count=1
            )
        )
        status = await asyncio.wait_for(first, 5)
        assert (
            status.request_id == "later" and status.state == common_pb2.TRANSFER_STATE_BOOTSTRAPPING
        )
        await stub.Cancel(
            common_pb2.CancelRequest(request_id="later", language_id="lang-a", reason="test done")
        )
        while (status := await stream.read()) is not grpc.aio.EOF:
            last = status
        assert last.state == common_pb2.TRANSFER_STATE_FAILED

        for await_transfer, at_least, at_most in ((True, 0.9, 5.0), (False, 0.0, 0.5)):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Status(
                    encoder_pb2.StatusRequest(
                        request_id="never", language_id="lang-a", await_transfer=await_transfer
                    )
                ):
                    pass
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'never'" in e.value.details()
            assert at_least <= time.monotonic() - started < at_most, await_transfer
        await assert_all_free((enc.address, "encoder"))
    finally:
        enc.stop()
        rank.close()


async def test_with_no_carry_init_the_early_init_is_its_own_rpc():
    pair = Pair(
        hidden=HIDDEN,
        encoder_blocks=64,
        language_blocks=32,
        initial_tokens=1024,
        encoder_args=("--metrics-port", str(free_port("127.0.0.1"))),
        language_args=("--no-carry-init",),
    )
    try:
        stub = language_stub(pair.language.address)
        for n, seed in ((64, 1), (3000, 3)):
            reply = await _generate(stub, n, seed)
            assert reply.early_init and reply.payload_sha256 == expected_digest(n, seed, HIDDEN)
        assert _rpc_count(pair.encoder, "Init") == 2
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


async def test_refused_encode_after_an_early_init_leaves_nothing_behind(roomy):
    """The Init may reach the encoder before, with or after the Encode's refusal; every order
    ends with both pools free and no transfer waiting on the encoder."""
    stub = language_stub(roomy.language.address)
    for i in range(12):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(
                language_pb2.GenerateRequest(
                    request_id=f"bad-image-{i}",
                    images=[common_pb2.Image(data=b"not an image", mime_type="image/png")],
                )
            )
        assert e.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        ), e.value.details()
        assert "images[0]" in e.value.details()
    await assert_all_free((roomy.encoder.address, "encoder"), (roomy.language.address, "language"))
    reply = await _generate(stub, 500, 9)  # and the pair still works
    assert reply.early_init and reply.payload_sha256 == expected_digest(500, 9, HIDDEN)


async def test_no_early_init_without_room_to_spare_or_when_turned_off():
    # 8 blocks, 8-block initial allocations: an early reservation could hold the blocks a request
    # admitted after its Encode waits for, so every Init waits for its Encode.
    tight = Pair(hidden=HIDDEN, encoder_blocks=32, language_blocks=8, initial_tokens=1024)
    off = Pair(
        hidden=HIDDEN,
        encoder_blocks=32,
        language_blocks=32,
        initial_tokens=1024,
        language_args=("--no-early-init",),
    )
    try:
        for pair in (tight, off):
            stub = language_stub(pair.language.address)
            reply = await _generate(stub, 700, 4)
            assert not reply.early_init
            assert reply.payload_sha256 == expected_digest(700, 4, HIDDEN)
            await assert_all_free(
                (pair.encoder.address, "encoder"), (pair.language.address, "language")
            )
    finally:
        tight.stop()
        off.stop()


async def test_no_deadlock_when_both_pools_are_short():
    """Many concurrent requests through a small encoder pool and a small language pool, with
    allocation timeouts far beyond the watchdog: a deadlock between early reservations and
    encoder source blocks would hang here instead of failing fast."""
    pair = Pair(
        hidden=HIDDEN,
        encoder_blocks=24,
        language_blocks=24,
        initial_tokens=512,
        encoder_args=("--alloc-timeout-s", "300"),
        language_args=("--alloc-timeout-s", "300"),
    )
    try:
        stub = language_stub(pair.language.address)
        sizes = [(i * 733) % 2900 + 40 for i in range(40)]  # up to 23 source blocks each
        replies = await asyncio.wait_for(
            asyncio.gather(*(_generate(stub, n, i) for i, n in enumerate(sizes))), 150
        )  # watchdog
        for i, (n, reply) in enumerate(zip(sizes, replies)):
            assert reply.payload_sha256 == expected_digest(n, i, HIDDEN)
        assert any(r.early_init for r in replies) and not all(r.early_init for r in replies)
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


@pytest.mark.parametrize("carried_in", ["Encode", "EncodeStream"])
async def test_a_cancel_that_overtakes_its_encode_keeps_the_encode_from_running(roomy, carried_in):
    """The language sends an Encode carrying rank 0's Init, gives up, and Cancels; the encoder may
    handle the Cancel first (NOT_FOUND: it knows no such transfer), and the language then frees the
    blocks the Init named. The Encode arriving after it must be refused, or it would write into
    blocks that now hold another request's payload (seen in the soak as DATA_LOSS on the request
    that got them next, and as an encoder transfer left waiting for its bootstrap timeout)."""
    enc = encoder_stub(roomy.encoder.address)
    rank = TestRank(hidden=HIDDEN, language_id="overtaken-lang")
    rid = f"overtaken-lang/overtaken-{carried_in}"
    try:
        await rank.register(enc)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await enc.Cancel(rank.cancel_request(rid))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        blocks = rank.alloc(2)  # the freed blocks, now another request's: zeroed
        tokens = 2 * rank.block_size
        request = rank.encode_request(rid, tokens, seed=5)
        request.init.CopyFrom(rank.init_request(rid, blocks))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if carried_in == "Encode":
                await enc.Encode(request)
            else:
                async for _ in enc.EncodeStream(request):
                    pass
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "cancelled the request before it began here" in e.value.details()
        # An Init of its own is refused the same way, and nothing was written.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await enc.Init(rank.init_request(rid, blocks))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await asyncio.sleep(0.3)
        assert not rank.read(blocks, tokens).any(), (
            "a write landed in blocks freed after the Cancel"
        )
        rank.free(blocks)
        await assert_all_free((roomy.encoder.address, "encoder"))
    finally:
        rank.close()
