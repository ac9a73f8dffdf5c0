"""Quarantine across TP ranks (real processes on 127.0.0.1): the encoder is killed (SIGKILL) in
the middle of a transfer to a two-rank language instance. Each rank's Cancel is refused, so each
rank quarantines the blocks the encoder was writing into: GetPool's `rank_pools`, `epd status`
and `epd_pool_blocks{state="quarantined"}` show them, and they are not handed to the next request.
Once the encoder is back on its address and the grace has passed, every pool is free. (The
cut-link case with real network namespaces is tests/integration/test_netns.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import grpc

from common.pb.epd.v1 import common_pb2, language_pb2
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import ServiceProcess, assert_all_free, generate_then_kill, language_stub


def _gauge(port: int, state: str) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5
    ) as r:  # 127.0.0.1 only
        for line in r.read().decode().splitlines():
            if line.startswith("epd_pool_blocks{") and f'state="{state}"' in line:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no epd_pool_blocks{{state={state!r}}} on :{port}")


async def test_tp2_encoder_killed_mid_transfer_quarantines_on_every_rank_until_it_is_back(
    unique_id,
):
    port, metrics = free_port("127.0.0.1"), free_port("127.0.0.1")
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
        "--tp",
        "2",
        "--initial-tokens",
        "512",
        "--fault",
        "status_lag_s=0.05",
        "--quarantine-grace-s",
        "6",
        "--metrics-port",
        str(metrics),
    )
    try:
        stub = language_stub(lang.address)
        rid = unique_id("quar")
        error = await generate_then_kill(stub, rid, enc.kill)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()

        deadline = time.monotonic() + 10  # rank 1 ends its part just after rank 0 replied
        while True:
            pool = await stub.GetPool(common_pb2.GetPoolRequest())
            if all(rp.quarantined_blocks for rp in pool.rank_pools):
                break
            assert time.monotonic() < deadline, f"not quarantined on every rank: {pool}"
            await asyncio.sleep(0.05)
        for rp in pool.rank_pools:
            assert rp.used_blocks == 0 and rp.free_blocks + rp.quarantined_blocks == 16, pool
        assert pool.quarantined_blocks == pool.rank_pools[0].quarantined_blocks
        held = [rp.quarantined_blocks for rp in pool.rank_pools]
        assert (
            _gauge(metrics, "quarantined") == held[0]
            and _gauge(metrics + 1, "quarantined") == held[1]
        )
        status = subprocess.run(
            [sys.executable, "-m", "services.tools.cli", "status", lang.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "QUARANTINED" in status.stdout and f"{held[0]} quarantined" in status.stdout, (
            status.stdout
        )

        # The refused Cancel counts as an answer: after the grace (6 s here) the blocks return,
        # encoder or not; a request on the restarted encoder arrives intact on both ranks.
        enc = ServiceProcess("encoder", *args)  # restarted on the same address
        reply = await stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=3000, synthetic_seed=9, want_digest=True),
            timeout=60,
        )
        assert reply.payload_sha256 == expected_digest(3000, 9, 256)
        assert all(r.payload_sha256 == reply.payload_sha256 for r in reply.ranks), reply.ranks
        deadline = time.monotonic() + 30
        while any(
            rp.quarantined_blocks
            for rp in (await stub.GetPool(common_pb2.GetPoolRequest())).rank_pools
        ):
            assert time.monotonic() < deadline, (
                "blocks still quarantined 30 s after the encoder came back"
            )
            await asyncio.sleep(0.1)
        assert _gauge(metrics, "quarantined") == 0 and _gauge(metrics + 1, "quarantined") == 0
        await assert_all_free((enc.address, "encoder"), (lang.address, "language"))
    finally:
        lang.stop()
        enc.stop()
