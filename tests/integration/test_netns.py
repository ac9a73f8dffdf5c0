"""Encoder and language on two "hosts": network namespaces joined by a veth link, made by this
test (`ip netns`, iproute2; addresses from the benchmarking range 198.18.0.0/15). The services
talk gRPC and Mooncake TCP over 198.18.0.1 <-> 198.18.0.2 only, never loopback. The test process
reaches each namespace through a management veth of its own (so it can still inspect both pools
after the services' link is cut). Then the link is cut (`ip link set down`) between two rounds of
a transfer: the request fails cleanly on both sides (language: the encoder's calls break on
gRPC keepalive, peer_lost; encoder: no Resume within resume_timeout_s) and every pool is free.
The second test cuts the link in the middle of a round's Mooncake write (the link shaped with tc
so the write takes seconds): the encoder's write fails within --write-timeout-s (transport).
In both, the language's Cancel of the cut request gets no answer, so the blocks the encoder may
still write into are quarantined (not free) until the link is back, the encoder answered and
--quarantine-grace-s passed; then every pool is free. The namespaces are removed even when the
test fails."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, language_pb2
from services.tools import supervise
from services.tools.reference_payload import expected_digest
from tests.conftest import assert_all_free, encoder_stub, language_stub, service_module

pytestmark = [pytest.mark.system, pytest.mark.slow]

ENC_IP, LANG_IP = "198.18.0.1", "198.18.0.2"  # the services' link
ROOT_ENC, NS_ENC = "198.18.1.1", "198.18.1.2"  # management: test process <-> encoder ns
ROOT_LANG, NS_LANG = "198.18.2.1", "198.18.2.2"  # management: test process <-> language ns


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(("netns", "exec", ns, "ip") if ns else ()), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


def _usable() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    return ""


@pytest.fixture
def namespaces():
    # Not a skip: `make` installs iproute2 and the suite runs as root (as CI does); say so if not.
    assert not _usable(), f"the cross-host test {_usable()} (make installs iproute2; run as root)"
    tag = uuid.uuid4().hex[:6]
    enc_ns, lang_ns = f"epd-enc-{tag}", f"epd-lang-{tag}"
    v = {
        k: f"{k}{tag}" for k in ("ve", "vl", "me", "mr", "ml", "mq")
    }  # interface names <= 15 chars
    try:
        for ns in (enc_ns, lang_ns):
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
        # the services' link
        ip("link", "add", v["ve"], "type", "veth", "peer", "name", v["vl"])
        ip("link", "set", v["ve"], "netns", enc_ns)
        ip("link", "set", v["vl"], "netns", lang_ns)
        ip("addr", "add", f"{ENC_IP}/30", "dev", v["ve"], ns=enc_ns)
        ip("addr", "add", f"{LANG_IP}/30", "dev", v["vl"], ns=lang_ns)
        # management links from this (root) namespace
        for root_if, ns_if, ns, root_ip, ns_ip, service_ip in (
            (v["mr"], v["me"], enc_ns, ROOT_ENC, NS_ENC, ENC_IP),
            (v["mq"], v["ml"], lang_ns, ROOT_LANG, NS_LANG, LANG_IP),
        ):
            ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            ip("link", "set", ns_if, "netns", ns)
            ip("addr", "add", f"{root_ip}/30", "dev", root_if)
            ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, ns=ns)
            ip("link", "set", root_if, "up")
            ip("link", "set", ns_if, "up", ns=ns)
            ip(
                "route", "add", f"{service_ip}/32", "via", ns_ip
            )  # the service's address, via its ns
        ip("link", "set", v["ve"], "up", ns=enc_ns)
        ip("link", "set", v["vl"], "up", ns=lang_ns)
        yield enc_ns, lang_ns, v
    finally:
        for name in (v["mr"], v["mq"]):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)
        for ns in (enc_ns, lang_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def start_in(ns: str, role: str, *args: str) -> supervise.ServiceProcess:
    argv = [
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        service_module(args),
        role,
        "--port",
        "0",
        *args,
    ]
    svc = supervise.ServiceProcess(role, argv, env=supervise.child_env())
    svc.start()
    try:
        svc.wait_ready(60)
    except supervise.ServiceStartError:
        svc.stop()
        raise
    return svc


async def test_cross_namespace_transfer_then_link_cut_mid_transfer(namespaces):
    enc_ns, lang_ns, v = namespaces
    common = ("--hidden", "256", "--block-size", "128")
    services = []
    try:
        enc = start_in(
            enc_ns,
            "encoder",
            "--host",
            ENC_IP,
            *common,
            "--pool-blocks",
            "256",
            "--resume-timeout-s",
            "8",
        )
        services.append(enc)
        enc_addr = f"{ENC_IP}:{enc.port}"
        lang = start_in(
            lang_ns,
            "language",
            "--host",
            LANG_IP,
            *common,
            "--pool-blocks",
            "8",
            "--initial-tokens",
            "1024",
            "--encoder",
            enc_addr,
            "--fault",
            "status_lag_s=1.0",
            "--quarantine-grace-s",
            "2",
        )
        services.append(lang)
        lang_addr = f"{LANG_IP}:{lang.port}"
        assert lang.info["session"].startswith(LANG_IP), lang.info
        stub = language_stub(lang_addr)

        # Across the link: a request of 3 rounds arrives intact.
        reply = await stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=2500, synthetic_seed=2, want_digest=True),
            timeout=60,
        )
        assert reply.payload_sha256 == expected_digest(2500, 2, 256) and reply.rounds == 3

        # Mid-transfer: round 1 delivered (the language reads each status 1 s late), cut the link.
        rid = f"cut-{uuid.uuid4().hex[:8]}"
        call = asyncio.ensure_future(
            stub.Generate(
                language_pb2.GenerateRequest(
                    request_id=rid, synthetic_tokens=5000, synthetic_seed=3
                ),
                timeout=60,
            )
        )
        es = encoder_stub(enc_addr)
        deadline = time.monotonic() + 30
        while True:
            try:
                info = await es.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
                if info.rounds >= 1:
                    break
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() < deadline, "round 1 never happened"
            await asyncio.sleep(0.02)
        ip("link", "set", v["ve"], "down", ns=enc_ns)
        cut_at = time.monotonic()

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), (
            e.value
        )
        assert time.monotonic() - cut_at < 30
        linfo = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        assert linfo.state == common_pb2.TRANSFER_STATE_FAILED and linfo.sent_tokens >= 1024, linfo
        # The Cancel could not reach the encoder: the round's blocks are quarantined, not free.
        pool = await stub.GetPool(common_pb2.GetPoolRequest())
        assert pool.quarantined_blocks > 0 and pool.used_blocks == 0, pool
        assert (
            pool.free_blocks + pool.quarantined_blocks == 8
            and pool.rank_pools[0].quarantined_blocks == pool.quarantined_blocks
        ), pool

        # The encoder gives up on its own (no Resume within resume_timeout_s).
        while (
            await es.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        ).state != common_pb2.TRANSFER_STATE_FAILED:
            assert time.monotonic() - cut_at < 30, "the encoder never failed the cut transfer"
            await asyncio.sleep(0.1)
        await assert_all_free((enc_addr, "encoder"))
        assert (
            await stub.GetPool(common_pb2.GetPoolRequest())
        ).quarantined_blocks == pool.quarantined_blocks

        # Link back: the language's next probe gets an answer, and 2 s (plus the outage) later
        # the blocks return.
        ip("link", "set", v["ve"], "up", ns=enc_ns)
        released_s = await _wait_unquarantined(stub, 60)
        print(
            f"{pool.quarantined_blocks} blocks quarantined; back in the pool {released_s:.1f} s after the link "
            f"came back ({time.monotonic() - cut_at:.1f} s after the cut)"
        )
        assert released_s >= 2.0
        await assert_all_free((enc_addr, "encoder"), (lang_addr, "language"))
    except BaseException:
        for svc in services:
            print(f"--- {svc.role} stderr\n{svc.stderr_tail(60)}")
        raise
    finally:
        for svc in reversed(services):
            svc.stop()


async def _wait_unquarantined(stub, timeout: float) -> float:
    """Seconds until the language's pool has no quarantined block (AssertionError after `timeout`)."""
    started = time.monotonic()
    while (pool := await stub.GetPool(common_pb2.GetPoolRequest())).quarantined_blocks:
        assert time.monotonic() - started < timeout, (
            f"blocks still quarantined after {timeout} s: {pool}"
        )
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def _tx_bytes(ns: str, dev: str) -> int:
    """Bytes sent so far by interface `dev` of namespace `ns` (the kernel's counter)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return int(out)


def _unsent(ns: str, peer_ip: str) -> int:
    """Bytes that TCP sockets of namespace `ns` (closed ones too) still hold for `peer_ip`: sent
    but not acknowledged, or not sent yet (the Send-Q column of `ss`)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-tanH", "dst", peer_ip],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return sum(int(line.split()[2]) for line in out.splitlines() if line.strip())


def _tc(ns: str, *args: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, timeout=10
    )


async def test_link_cut_during_a_mooncake_write_fails_both_sides_then_recovers(namespaces):
    """The link is cut while round 1's Mooncake write is on the wire (the encoder's side of the
    link is shaped to 8 Mbit/s with tc, so the 4.2 MB write takes ~4 s; the cut comes once 1 MB of
    it went out and the encoder still shows 0 tokens sent). Mooncake does not hang: the write
    fails after --write-timeout-s (5 s here, 30 by default), so the encoder fails the request
    with `transport` and frees its source blocks; the language has already failed it with
    `peer_lost` (gRPC keepalive) and, its Cancel unanswered, quarantined the round's blocks. With
    the link back, what the encoder's kernel still held of the failed write drains into those
    quarantined blocks while requests sent at once get the other half of the pool and arrive
    intact; after --quarantine-grace-s (the default, 15 s) every pool is free."""
    enc_ns, lang_ns, v = namespaces
    common = ("--hidden", "256", "--block-size", "128")
    services = []
    try:
        enc = start_in(
            enc_ns,
            "encoder",
            "--host",
            ENC_IP,
            *common,
            "--pool-blocks",
            "256",
            "--resume-timeout-s",
            "8",
            "--write-timeout-s",
            "5",
        )
        services.append(enc)
        enc_addr = f"{ENC_IP}:{enc.port}"
        # 128 blocks: the cut request's 64 stay quarantined while the next requests use the others.
        lang = start_in(
            lang_ns,
            "language",
            "--host",
            LANG_IP,
            *common,
            "--pool-blocks",
            "128",
            "--initial-tokens",
            "8192",
            "--encoder",
            enc_addr,
        )
        services.append(lang)
        lang_addr = f"{LANG_IP}:{lang.port}"
        stub, es = language_stub(lang_addr), encoder_stub(enc_addr)
        reply = await stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=300, synthetic_seed=2, want_digest=True),
            timeout=60,
        )
        assert reply.payload_sha256 == expected_digest(
            300, 2, 256
        )  # sessions and connections are up

        _tc(
            enc_ns,
            "qdisc",
            "add",
            "dev",
            v["ve"],
            "root",
            "tbf",
            "rate",
            "8mbit",
            "burst",
            "32kb",
            "latency",
            "2s",
        )
        round_bytes = 8000 * 528  # one round: 8000 tokens of 528-byte records
        base = _tx_bytes(enc_ns, v["ve"])
        rid = f"cutw-{uuid.uuid4().hex[:8]}"
        call = asyncio.ensure_future(
            stub.Generate(
                language_pb2.GenerateRequest(
                    request_id=rid, synthetic_tokens=8000, synthetic_seed=3
                ),
                timeout=120,
            )
        )
        deadline = time.monotonic() + 30
        while _tx_bytes(enc_ns, v["ve"]) - base < 1_000_000:
            assert time.monotonic() < deadline and not call.done(), (
                "the round's write never started"
            )
            await asyncio.sleep(0.02)
        before = await es.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        ip("link", "set", v["ve"], "down", ns=enc_ns)
        cut_at = time.monotonic()
        on_wire = _tx_bytes(enc_ns, v["ve"]) - base
        # Inside the write: part of it is out, none of it is counted as sent.
        assert before.sent_tokens == 0 and before.rounds == 0, before
        assert before.state not in (
            common_pb2.TRANSFER_STATE_SUCCESS,
            common_pb2.TRANSFER_STATE_FAILED,
        ), before
        assert on_wire < round_bytes, (
            f"the write had finished ({on_wire} of {round_bytes} bytes out)"
        )

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        language_failed_s = time.monotonic() - cut_at
        assert language_failed_s < 20
        linfo = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        # (parts of round 1 may have landed and been verified: the round was never complete)
        assert linfo.state == common_pb2.TRANSFER_STATE_FAILED and linfo.sent_tokens < 8000, linfo
        assert linfo.error.reason == common_pb2.FAILURE_REASON_PEER_LOST, linfo.error
        # Its Cancel got no answer: the round's 64 blocks are quarantined, neither used nor free.
        pool = await stub.GetPool(common_pb2.GetPoolRequest())
        assert (pool.quarantined_blocks, pool.used_blocks, pool.free_blocks) == (64, 0, 64), pool

        # The encoder's write returns (fails) within write_timeout_s (+1 ns per byte): transport.
        while (
            einfo := await es.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
        ).state != common_pb2.TRANSFER_STATE_FAILED:
            assert time.monotonic() - cut_at < 20, (
                f"the encoder's write into the dead link never returned: {einfo}"
            )
            await asyncio.sleep(0.1)
        print(
            f"cut after {on_wire} of {round_bytes} bytes; language failed after {language_failed_s:.1f} s, "
            f"encoder after {time.monotonic() - cut_at:.1f} s"
        )
        assert einfo.error.reason == common_pb2.FAILURE_REASON_TRANSPORT, einfo.error
        assert "round 1 write failed" in einfo.error.message, einfo.error.message
        await assert_all_free((enc_addr, "encoder"))
        assert (await stub.GetPool(common_pb2.GetPoolRequest())).quarantined_blocks == 64

        # Link back (unshaped): Mooncake connects again. What the encoder's kernel still buffers
        # of the failed write (Mooncake dropped the connection, but a closed socket still delivers
        # what it holds) arrives some seconds later, into the quarantined blocks; requests sent at
        # once get the free half of the pool and arrive intact. (Before the quarantine, a request
        # that got those blocks could be overwritten after its checks: README, Several encoders.)
        stale = _unsent(enc_ns, LANG_IP)
        _tc(enc_ns, "qdisc", "del", "dev", v["ve"], "root")
        ip("link", "set", v["ve"], "up", ns=enc_ns)
        back_at = time.monotonic()
        drained: list[
            tuple[float, int]
        ] = []  # (seconds after the link came back, quarantined then)

        async def watch_drain() -> None:
            while _unsent(enc_ns, LANG_IP) > 0:
                await asyncio.sleep(0.05)
            quarantined = (await stub.GetPool(common_pb2.GetPoolRequest())).quarantined_blocks
            drained.append((time.monotonic() - back_at, quarantined))

        watcher = asyncio.ensure_future(watch_drain())
        for n in range(3):
            for attempt in range(20):
                try:
                    reply = await stub.Generate(
                        language_pb2.GenerateRequest(
                            synthetic_tokens=9000, synthetic_seed=4 + n, want_digest=True
                        ),
                        timeout=60,
                    )
                    break
                except (
                    grpc.aio.AioRpcError
                ) as err:  # the encoder rejoins the rotation within a poll or two
                    assert err.code() == grpc.StatusCode.UNAVAILABLE and attempt < 19, err
                    await asyncio.sleep(0.2)
            assert (
                reply.payload_sha256 == expected_digest(9000, 4 + n, 256) and reply.rounds == 2
            ), reply
        sent_s = time.monotonic() - back_at
        assert (
            await stub.GetPool(common_pb2.GetPoolRequest())
        ).quarantined_blocks == 64  # still held back
        await asyncio.wait_for(watcher, 60)
        released_s = time.monotonic() - back_at + await _wait_unquarantined(stub, 90)
        print(
            f"{stale} bytes of the failed write were still buffered at the encoder; drained {drained[0][0]:.1f} s "
            f"after the link came back, with {drained[0][1]} blocks still quarantined; 3 requests done "
            f"{sent_s:.1f} s after it; the quarantine ended {released_s:.1f} s after it"
        )
        assert drained[0][1] == 64, "the buffered bytes drained after the quarantine had ended"
        assert released_s >= 15.0
        await assert_all_free((enc_addr, "encoder"), (lang_addr, "language"))
    except BaseException:
        for svc in services:
            print(f"--- {svc.role} stderr\n{svc.stderr_tail(60)}")
        raise
    finally:
        for svc in reversed(services):
            svc.stop()
