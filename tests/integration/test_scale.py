"""Several encoders per language instance, several language instances per encoder:
real processes, real Mooncake TCP on loopback. Failures are injected with the encoder's
test-only `--transport-fault` (named in the tests) or by killing a real process."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, language_pb2
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import ServiceProcess, assert_all_free, encoder_stub, language_stub
from tests.integration.test_inspection import epd

HIDDEN = 256
COMMON = ("--hidden", str(HIDDEN), "--block-size", "128")


def encoder(*args: str) -> ServiceProcess:
    return ServiceProcess("encoder", *COMMON, "--pool-blocks", "512", *args)


def encoders(*arg_lists: tuple[str, ...]) -> list[ServiceProcess]:
    """One encoder per argument list, started at the same time (`together`)."""
    return together(*(lambda args=args: encoder(*args) for args in arg_lists))


def together(*makers: Callable[[], ServiceProcess]) -> list[ServiceProcess]:
    """Start service processes at the same time (a start is ~2 s, most of it imports); if one
    cannot start, the others are stopped."""
    with ThreadPoolExecutor(len(makers)) as pool:
        futures = [pool.submit(make) for make in makers]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        stop(*started)
        raise failed[0]
    return started


def stop(*services: ServiceProcess | None) -> None:
    """Stop the language instances first (they still talk to their encoders), then the rest,
    each group at the same time (a graceful stop takes ~1.5 s)."""
    present = [s for s in services if s is not None]
    for group in (
        [s for s in present if s.role == "language"],
        [s for s in present if s.role != "language"],
    ):
        if group:
            with ThreadPoolExecutor(len(group)) as pool:
                list(pool.map(lambda s: s.stop(), group))


def language(*encoders: ServiceProcess | str, args=(), watch: bool = False) -> ServiceProcess:
    """`watch`: serve /metrics too, so that `in_rotation` can wait for the encoders to join.
    If it cannot start, the encoder processes given are stopped (the test's `finally` is not reached)."""
    flags = [x for e in encoders for x in ("--encoder", e if isinstance(e, str) else e.address)]
    if watch:
        tp = int(args[list(args).index("--tp") + 1]) if "--tp" in args else 1
        flags += ["--metrics-port", str(_free_ports(tp))]  # rank R serves on metrics_port + R
    try:
        return ServiceProcess(
            "language", *COMMON, "--pool-blocks", "32", "--initial-tokens", "1024", *flags, *args
        )
    except BaseException:
        stop(*(e for e in encoders if isinstance(e, ServiceProcess)))
        raise


async def unquarantined(lang: ServiceProcess, timeout: float = 30.0) -> None:
    """Wait until the language holds no quarantined blocks (a transfer whose Cancel its encoder
    did not answer keeps them until the encoder answers again and the grace has passed)."""
    stub = language_stub(lang.address)
    deadline = time.monotonic() + timeout
    while (pool := await stub.GetPool(common_pb2.GetPoolRequest())).quarantined_blocks:
        assert time.monotonic() < deadline, f"still quarantined after {timeout:.0f} s: {pool}"
        await asyncio.sleep(0.1)


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1."""
    for _ in range(100):
        first = free_port("127.0.0.1")
        try:
            for k in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + k))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


async def in_rotation(lang: ServiceProcess, count: int, timeout: float = 30.0) -> None:
    """Wait until `count` encoders are in the language instance's rotation (its
    `epd_encoders_available` gauge). A language is ready once ONE encoder registered; the others
    register in the background, so a request sent at once may find only that one."""
    url = f"http://127.0.0.1:{lang.info['metrics_port']}/metrics"

    def available() -> float:
        with urllib.request.urlopen(url, timeout=5) as r:
            found = re.search(r"^epd_encoders_available\{[^}]*\} (\S+)$", r.read().decode(), re.M)
        return float(found.group(1)) if found else -1.0

    deadline = time.monotonic() + timeout
    while (got := await asyncio.to_thread(available)) != count:
        assert time.monotonic() < deadline, (
            f"{got:.0f} encoder(s) in rotation after {timeout:.0f} s, expected {count}"
        )
        await asyncio.sleep(0.05)


async def generate(
    stub, tokens: int, seed: int, request_id: str = ""
) -> language_pb2.GenerateReply:
    reply = await stub.Generate(
        language_pb2.GenerateRequest(
            request_id=request_id, synthetic_tokens=tokens, synthetic_seed=seed, want_digest=True
        )
    )
    assert reply.payload_sha256 == expected_digest(tokens, seed, HIDDEN)
    return reply


async def free(*services: tuple[ServiceProcess, str]) -> None:
    await assert_all_free(*((s.address, kind) for s, kind in services))


@pytest.mark.parametrize("policy", ["least-loaded", "round-robin"])
async def test_requests_spread_over_two_encoders(policy):
    a, b = encoders((), ())
    lang = language(a, b, args=("--encoder-policy", policy), watch=True)
    try:
        stub = language_stub(lang.address)
        await in_rotation(
            lang, 2
        )  # else a burst sent at once may all go to the first one registered
        replies = await asyncio.gather(*(generate(stub, 2000 + 300 * i, i) for i in range(12)))
        used = {r.encoder for r in replies}
        assert len(used) == 2, [r.encoder for r in replies]
        assert all(r.attempts == 1 and not r.failed_over_from for r in replies)
        if policy == "round-robin":  # sequential requests alternate
            seq = [(await generate(stub, 500, 100 + i)).encoder for i in range(4)]
            assert seq[0] != seq[1] and seq[0] == seq[2] and seq[1] == seq[3], seq
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_failover_on_injected_round1_write_failure_uses_fresh_transfer_id():
    """Injected fault (fail_nth=1 on encoder A): round 1's write fails before any byte counts, so
    the request runs again on B as ID#2 and succeeds with the right bytes; A's attempt is FAILED."""
    a, b = encoders(("--transport-fault", "fail_nth=1"), ())
    lang = language(a, b, args=("--encoder-policy", "round-robin"), watch=True)
    try:
        stub = language_stub(lang.address)
        # Round-robin alternates between the encoders in rotation; which one a request gets first
        # is not promised (an encoder can leave the rotation for a poll), so requests that start
        # on B simply succeed there and the first one that starts on A must fail over.
        await in_rotation(lang, 2)
        for i in range(4):
            rid = f"fo-{i}"
            reply = await generate(stub, 5000, 7 + i, rid)
            if reply.attempts == 2:
                break
            assert reply.encoder.endswith(_port(b)) and not reply.failed_over_from, reply
        else:
            pytest.fail("no request went to encoder A first")
        assert reply.failed_over_from.endswith(_port(a)) and reply.encoder.endswith(_port(b)), reply
        assert reply.transfer_id.endswith(f"/{rid}#2"), reply.transfer_id
        first = await encoder_stub(a.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id=rid)
        )
        assert first.state == common_pb2.TRANSFER_STATE_FAILED
        assert first.error.reason == common_pb2.FAILURE_REASON_TRANSPORT
        second = await encoder_stub(b.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id=rid)
        )
        assert second.state == common_pb2.TRANSFER_STATE_SUCCESS and second.request_id == f"{rid}#2"
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_no_failover_after_bytes_were_delivered_injected_fault():
    """Injected fault (fail_nth=2 on encoder A): round 2 fails after round 1 was delivered: the
    failure (transport) is reported to the client and never retried on B."""
    a, b = encoders(("--transport-fault", "fail_nth=2"), ())
    lang = language(a, b, args=("--encoder-policy", "round-robin"), watch=True)
    try:
        stub = language_stub(lang.address)
        await in_rotation(lang, 2)
        # Round-robin alternates, but which encoder comes first depends on which one the live
        # view saw first: requests that land on B succeed; the first one on A must fail.
        failed = None
        for i in range(4):
            try:
                await generate(
                    stub, 20000, 3 + i, f"late-{i}"
                )  # 32 blocks x 128 = 4096 tokens per round
            except grpc.aio.AioRpcError as e:
                failed = (f"late-{i}", e)
                break
        assert failed is not None, "no request went to encoder A"
        rid, e = failed
        assert "round 2" in e.details(), e.details()
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.error.reason == common_pb2.FAILURE_REASON_TRANSPORT
        on_b = (
            await encoder_stub(b.address).ListTransfers(common_pb2.ListTransfersRequest())
        ).transfers
        assert rid not in [t.request_id for t in on_b], (
            "a request that had received bytes was retried on B"
        )
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_killed_encoder_leaves_the_rotation_and_a_restarted_one_rejoins():
    """Encoder A, in the rotation, is killed: every request succeeds (one picked before a poll saw
    A gone fails over to B; the blocks reserved for its Encode are quarantined, as A did not
    answer the Cancel, and return after the grace, 1 s here); A restarted on its address rejoins."""
    port = free_port("127.0.0.1")
    a, b = encoders(("--port", str(port)), ())
    lang = language(a, b, args=("--quarantine-grace-s", "1"), watch=True)
    try:
        stub = language_stub(lang.address)
        await in_rotation(lang, 2)
        a.kill()
        replies = [await generate(stub, 1500, i) for i in range(6)]  # none fails: B serves them all
        assert {r.encoder for r in replies} == {replies[-1].encoder} and replies[
            -1
        ].encoder.endswith(b.address.split(":")[1])
        a = encoder("--port", str(port))  # back on the same address: rejoins
        for _ in range(100):
            got = await asyncio.gather(*(generate(stub, 3000, 50 + i) for i in range(4)))
            if len({r.encoder for r in got}) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the restarted encoder never served a request")
        await unquarantined(lang)
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_encoder_down_at_startup_does_not_block_start():
    port = free_port("127.0.0.1")
    b = encoder()
    lang = language(f"127.0.0.1:{port}", b)
    a = None
    try:
        stub = language_stub(lang.address)
        assert (await generate(stub, 800, 1)).encoder.endswith(b.address.split(":")[1])
        a = encoder("--port", str(port))
        for _ in range(100):
            got = await asyncio.gather(*(generate(stub, 3000, 60 + i) for i in range(4)))
            if len({r.encoder for r in got}) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the late encoder never joined")
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, b, a)


async def test_two_language_instances_share_an_encoder_with_the_same_request_ids():
    enc = encoder()
    try:
        l1, l2 = together(lambda: language(enc), lambda: language(enc))
    except BaseException:
        stop(enc)
        raise
    try:
        s1, s2 = language_stub(l1.address), language_stub(l2.address)
        replies = await asyncio.gather(
            *(
                generate(s, 6000, seed, f"same-{i}")
                for i in range(3)
                for s, seed in ((s1, i), (s2, 10 + i))
            )
        )
        assert len({r.transfer_id for r in replies}) == 6
        assert {r.request_id for r in replies} == {"same-0", "same-1", "same-2"}
        info = await encoder_stub(enc.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id="same-1")
        )
        assert info.request_id == "same-1" and info.state == common_pb2.TRANSFER_STATE_SUCCESS
        await free((enc, "encoder"), (l1, "language"), (l2, "language"))
    finally:
        stop(l1, l2, enc)


# ------------------------------------------------------------------------------------ TP > 1


def _port(svc: ServiceProcess) -> str:
    return svc.address.rsplit(":", 1)[1]


def _check_ranks(reply: language_pb2.GenerateReply, tokens: int, seed: int) -> None:
    """Both ranks of a `--tp 2` instance received the whole payload, byte for byte."""
    assert [r.rank for r in reply.ranks] == [0, 1], reply.ranks
    for r in reply.ranks:
        assert r.data_rank and r.received_tokens == tokens, r
        assert r.payload_sha256 == expected_digest(tokens, seed, HIDDEN), (
            f"rank {r.rank}: wrong bytes"
        )


@pytest.mark.parametrize("how", ["refuses-encode", "round1-write-fault"])
async def test_tp2_failover_before_any_byte_succeeds_on_both_ranks(how):
    """A language with two ranks and two encoders; when the first encoder chosen fails before any
    byte was delivered to any rank, the request runs again on the other encoder as ID#2 and both
    ranks get the right bytes. `refuses-encode`: encoder A's source pool (8 blocks) can never hold
    the payload, so its Encode is refused (RESOURCE_EXHAUSTED) at once. `round1-write-fault`:
    injected fault (fail_nth=1 on A): round 1's write to one rank fails while the write to the
    other rank lands — the round is never delivered, and nothing of it may reach the second
    attempt, whose blocks are allocated only after A's attempt ended."""
    a, b = encoders(
        ("--pool-blocks", "8") if how == "refuses-encode" else ("--transport-fault", "fail_nth=1"),
        (),
    )
    lang = language(a, b, args=("--tp", "2", "--encoder-policy", "round-robin"), watch=True)
    try:
        stub = language_stub(lang.address)
        await in_rotation(lang, 2)
        # Round-robin: which encoder comes first depends on which one the live view saw first;
        # requests that start on B simply succeed there.
        for i in range(4):
            rid, seed = f"tpfo-{i}", 40 + i
            reply = await generate(stub, 5000, seed, rid)
            _check_ranks(reply, 5000, seed)
            if reply.attempts == 2:
                break
            assert reply.encoder.endswith(_port(b)) and not reply.failed_over_from, reply
        else:
            pytest.fail("no request went to encoder A first")
        assert reply.failed_over_from.endswith(_port(a)) and reply.encoder.endswith(_port(b)), reply
        assert reply.transfer_id.endswith(f"/{rid}#2"), reply.transfer_id
        second = await encoder_stub(b.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id=rid)
        )
        assert second.state == common_pb2.TRANSFER_STATE_SUCCESS and second.request_id == f"{rid}#2"
        assert len(second.ranks) == 2, second.ranks
        if how == "round1-write-fault":
            first = await encoder_stub(a.address).GetTransfer(
                common_pb2.GetTransferRequest(request_id=rid)
            )
            assert first.state == common_pb2.TRANSFER_STATE_FAILED and first.sent_tokens == 0, first
            assert first.error.reason == common_pb2.FAILURE_REASON_TRANSPORT, first.error
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == common_pb2.TRANSFER_STATE_SUCCESS, info
        # The instance goes on serving on both encoders' ranks afterwards.
        _check_ranks(await generate(stub, 3000, 60), 3000, 60)
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_tp2_no_failover_after_bytes_reached_the_ranks_injected_fault():
    """Injected fault (fail_nth=3 on encoder A): round 1 reaches both ranks (writes 1 and 2), a
    write of round 2 fails. Bytes were delivered, so the failure (transport) is the answer on every
    rank and the request is never retried on B; every pool of both ranks is free."""
    a, b = encoders(("--transport-fault", "fail_nth=3"), ())
    lang = language(a, b, args=("--tp", "2", "--encoder-policy", "round-robin"), watch=True)
    try:
        stub = language_stub(lang.address)
        await in_rotation(lang, 2)
        failed = None
        for i in range(4):
            rid, seed = f"tplate-{i}", 70 + i
            try:
                _check_ranks(
                    await generate(stub, 20000, seed, rid), 20000, seed
                )  # on B: 1024 + 4 x 4096 tokens
            except grpc.aio.AioRpcError as e:
                failed = (rid, e)
                break
        assert failed is not None, "no request went to encoder A"
        rid, e = failed
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "round 2" in e.details(), (
            e.code(),
            e.details(),
        )
        info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert info.state == common_pb2.TRANSFER_STATE_FAILED, info
        assert (
            info.error.reason == common_pb2.FAILURE_REASON_TRANSPORT and info.sent_tokens >= 1024
        ), info
        assert len(info.ranks) == 2 and all(
            r.state == common_pb2.TRANSFER_STATE_FAILED for r in info.ranks
        ), info.ranks
        on_a = await encoder_stub(a.address).GetTransfer(
            common_pb2.GetTransferRequest(request_id=rid)
        )
        assert on_a.state == common_pb2.TRANSFER_STATE_FAILED and on_a.rounds == 1, on_a
        on_b = (
            await encoder_stub(b.address).ListTransfers(common_pb2.ListTransfersRequest())
        ).transfers
        assert not [t for t in on_b if t.request_id.startswith(rid)], (
            "a request that had received bytes was retried on B"
        )
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b)


async def test_tp2_failover_from_a_frozen_encoder_then_it_recovers():
    """Encoder A is frozen (SIGSTOP: its sockets stay open, nothing answers — a hung host) right
    before two requests are sent; round-robin gives one of them to A. Its Encode is abandoned once
    A leaves the rotation (health polls time out), the Cancel on A times out, and the request
    runs again on B as ID#2 with the right bytes on both ranks. After SIGCONT, A drops what it
    had of the abandoned attempt (bootstrap timeout) and every pool is free."""
    import os
    import signal
    import time

    a, b = encoders(("--bootstrap-timeout-s", "5"), ())
    lang = language(a, b, args=("--tp", "2", "--encoder-policy", "round-robin"), watch=True)
    stopped = False
    try:
        stub = language_stub(lang.address)
        _check_ranks(await generate(stub, 2000, 80), 2000, 80)  # both ranks registered and serving
        await in_rotation(lang, 2)  # else both requests below may go to B, the first one registered
        os.kill(a.proc.pid, signal.SIGSTOP)
        stopped = True
        replies = await asyncio.wait_for(
            asyncio.gather(
                generate(stub, 5000, 81, "frozen-0"), generate(stub, 5000, 82, "frozen-1")
            ),
            60,
        )
        for seed, reply in zip((81, 82), replies):
            _check_ranks(reply, 5000, seed)
            assert reply.encoder.endswith(_port(b)), reply
        moved = [r for r in replies if r.attempts == 2]
        assert len(moved) == 1, [(r.attempts, r.encoder, r.failed_over_from) for r in replies]
        assert moved[0].failed_over_from.endswith(_port(a)) and moved[0].transfer_id.endswith(
            "#2"
        ), moved[0]
        os.kill(a.proc.pid, signal.SIGCONT)
        stopped = False
        deadline = time.monotonic() + 30
        while (
            pool := await encoder_stub(a.address).GetPool(common_pb2.GetPoolRequest())
        ).used_blocks:
            assert time.monotonic() < deadline, (
                f"encoder A kept {pool.used_blocks} blocks of the abandoned attempt"
            )
            await asyncio.sleep(0.2)
        await free((a, "encoder"), (b, "encoder"), (lang, "language"))
    finally:
        if stopped:
            os.kill(a.proc.pid, signal.SIGCONT)
        stop(lang, a, b)


async def test_tp2_picks_up_an_encoder_that_joins_its_dns_name(tmp_path):
    """A headless Service scaled from 2 encoders to 3, seen through the resolver seam (the test
    launcher's `--resolve-file`): rank 0 looks the name up again and the third encoder joins the
    rotation; rank 1, which started with two, adds it from the first admission that names it.
    Every request is delivered on both ranks with the reference digest."""
    a, b, c = encoders((), (), ())
    table = tmp_path / "dns.json"
    name = "encoders.epd.test:50051"
    table.write_text(json.dumps({name: [a.address, b.address]}))
    lang = language(
        name,
        args=("--tp", "2", "--encoder-policy", "round-robin", "--resolve-file", str(table)),
        watch=True,
    )
    try:
        stub = language_stub(lang.address)
        await in_rotation(lang, 2)
        table.write_text(json.dumps({name: [a.address, b.address, c.address]}))
        await in_rotation(lang, 3)
        ran = await epd("status", lang.address)  # an operator watches it join
        assert ran.returncode == 0 and "encoders: 3 of 3 in the rotation" in ran.stdout, ran
        assert c.address in ran.stdout
        replies = [await generate(stub, 3000, 40 + i, f"dns-{i}") for i in range(6)]
        assert any(r.encoder.endswith(_port(c)) for r in replies), [r.encoder for r in replies]
        for i, r in enumerate(replies):
            _check_ranks(r, 3000, 40 + i)
            assert r.attempts == 1
        await free((a, "encoder"), (b, "encoder"), (c, "encoder"), (lang, "language"))
    finally:
        stop(lang, a, b, c)
