"""Soak: many mixed requests with random cancellations, client deadlines,
injected Mooncake write failures and a write that lands after it was reported failed (the write
fence). Every fault kind must have fired (the services' own metrics say so), every successful
request's digest matches the formula, and afterwards pools are fully free, inspection holds only
the bounded history, no asyncio task, thread or Status stream is left over, and resident memory
grew after the first requests by no more than a bounded warm-up plus 4 KiB a request (a leak grows
with the requests; the warm-up levels off).

`make soak` runs 5,000 requests (SOAK_REQUESTS); `make test` runs a short version."""

from __future__ import annotations

import asyncio
import os
import random
import urllib.request

import grpc
import pytest

from common.parallel import PARALLEL
from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

pytestmark = pytest.mark.slow

HIDDEN = 64
HISTORY = 64
POOL_THREADS = min(32, (os.cpu_count() or 1) + 4) + PARALLEL
"""Threads a service may still start after the baseline: its worker-thread pools (asyncio's
default executor, common.parallel's) start threads lazily, up to these sizes."""
PERIODIC_TASKS = 2
"""asyncio tasks that may be running at one reading and not the other (polls, probes)."""
WARM_UP_BYTES = 32 << 20
"""Resident memory a service may still gain after the baseline whatever the request count:
allocator arenas, buffers and caches that fill once. Measured here, from request 100: +12 MiB
after 500 requests, +21 MiB after 2,000, +25 MiB after 5,000 (it levels off)."""
LEAK_BYTES_PER_REQUEST = 4 << 10
"""What a leak adds per request grows with the requests; this much per request is allowed on
top of the warm-up. A leaked payload (tens to hundreds of KiB here) passes it by far in 400
requests; a leak of 4 KiB a request shows in `make soak`'s 5,000 (+20 MiB beyond warm-up)."""


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of a metric's samples with these labels, scraped from a service's /metrics."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5
    ) as r:  # 127.0.0.1 only
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in r.read().decode().splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        )


async def diagnostics(address: str, kind: str) -> common_pb2.Diagnostics:
    from common.pb.epd.v1 import language_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = (
            encoder_pb2_grpc.EncoderStub if kind == "encoder" else language_pb2_grpc.LanguageStub
        )(ch)
        return await stub.GetDiagnostics(common_pb2.GetDiagnosticsRequest())


@pytest.mark.soak
async def test_soak_with_cancellations_and_injected_faults():
    total = int(os.environ.get("SOAK_REQUESTS", "500"))
    enc_metrics, lang_metrics = free_port("127.0.0.1"), free_port("127.0.0.1")
    pair = Pair(
        hidden=HIDDEN,
        encoder_blocks=1024,
        language_blocks=32,
        initial_tokens=512,
        encoder_args=(
            "--transport-fault",
            "fail_fraction=0.01,seed=3,late_nth=40,late_s=1",
            "--history-size",
            str(HISTORY),
            "--metrics-port",
            str(enc_metrics),
        ),
        language_args=("--history-size", str(HISTORY), "--metrics-port", str(lang_metrics)),
    )
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    stub = language_stub(pair.language.address)
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        n = rng.choice([1, 50, 300, 512, 513, 2000, 4500, 9000])
        kind = rng.random()
        rid = f"soak-{i}"
        async with sem:
            request = language_pb2.GenerateRequest(
                request_id=rid, synthetic_tokens=n, synthetic_seed=i, want_digest=True
            )
            try:
                if kind < 0.05:  # a client whose deadline passes mid-transfer
                    reply = await stub.Generate(request, timeout=rng.uniform(0.005, 0.1))
                elif kind < 0.10:  # a client that cancels through the Cancel RPC
                    call = asyncio.ensure_future(stub.Generate(request))
                    await asyncio.sleep(rng.uniform(0, 0.05))
                    try:
                        await stub.Cancel(common_pb2.CancelRequest(request_id=rid, reason="soak"))
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND  # not admitted yet, or done
                    reply = await call
                else:
                    reply = await stub.Generate(request)
                # Every payload that arrives is the formula's, whatever happened around it.
                assert reply.payload_sha256 == expected_digest(n, i, HIDDEN), rid
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except grpc.aio.AioRpcError as e:
                assert e.code() in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ), (e.code(), e.details())
                outcomes[e.code().name] = outcomes.get(e.code().name, 0) + 1

    try:
        settle_at = min(100, total // 5)  # the baseline: the first requests (history full by then)
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(settle_at))), 600)
        settled = {
            k: await diagnostics(a, k)
            for a, k in ((pair.encoder.address, "encoder"), (pair.language.address, "language"))
        }
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(settle_at, total))), 3600)
        # The last requests may have been abandoned (deadline, Cancel): the encoder learns of
        # it after the client had its answer, and a late write lands a second later.
        await assert_all_free(
            (pair.encoder.address, "encoder"),
            (pair.language.address, "language"),
            settle_s=15,
            abandoned=True,
        )
        fired = {
            "transport failure (fail_fraction)": metric(
                enc_metrics, "epd_failures_total", reason="transport"
            ),
            "late write (late_nth)": metric(enc_metrics, "epd_fenced_transfers_total"),
            "quarantine on the language": metric(lang_metrics, "epd_fenced_transfers_total"),
            "cancelled mid-transfer (Cancel, deadline)": metric(
                lang_metrics, "epd_failures_total", reason="cancelled"
            ),
        }
        print(f"\nsoak: {total} requests: {dict(sorted(outcomes.items()))}; faults fired: {fired}")
        assert all(fired.values()), f"a fault kind never fired: {fired}"
        assert outcomes.get("DEADLINE_EXCEEDED", 0) and outcomes.get("CANCELLED", 0), outcomes
        for address, kind in (
            (pair.encoder.address, "encoder"),
            (pair.language.address, "language"),
        ):
            end = await diagnostics(address, kind)
            s = settled[kind]
            print(
                f"soak: {kind}: rss {s.rss_bytes / 2**20:.1f} MiB after {settle_at} requests -> "
                f"{end.rss_bytes / 2**20:.1f} MiB after {total} ({(end.rss_bytes / s.rss_bytes - 1) * 100:+.1f} %), "
                f"tasks {s.asyncio_tasks} -> {end.asyncio_tasks}, threads {s.threads} -> {end.threads}, "
                f"history {end.history_transfers}"
            )
            assert end.live_transfers == 0 and end.status_streams == 0
            assert end.history_transfers <= HISTORY
            # Periodic tasks (health and load polls, a quarantine's probes) come and go: one may
            # be running at either reading. A leak grows with the requests (400 more here).
            assert end.asyncio_tasks <= s.asyncio_tasks + PERIODIC_TASKS, (
                f"{kind}: asyncio tasks left over"
            )
            # A leak grows with the requests (400 more here); the pools stop at their sizes.
            assert end.threads <= s.threads + POOL_THREADS, f"{kind}: threads left over"
            allowed = WARM_UP_BYTES + LEAK_BYTES_PER_REQUEST * (total - settle_at)
            assert end.rss_bytes - s.rss_bytes <= allowed, (
                f"{kind}: resident memory grew {(end.rss_bytes - s.rss_bytes) / 2**20:.1f} MiB, "
                f"more than warm-up + {LEAK_BYTES_PER_REQUEST} B a request ({allowed / 2**20:.1f} MiB)"
            )
        assert outcomes.get("ok", 0) > total // 2
        assert sum(outcomes.values()) == total
    finally:
        pair.stop()
