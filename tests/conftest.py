"""Shared test harness: real service processes on ephemeral loopback ports, real Mooncake TCP.

`ServiceProcess` runs `python -m services.tools.cli encoder|language ...` (through the fault
launcher when a test injects faults) and waits for its `EPD_READY {json}` line; `Pair` is an
encoder and a language started as one `supervise.ServiceGroup`. `TestRank`
(tests/integration/rank_harness.py) is a language rank living in the pytest process (its own
Mooncake engine and block pool) for driving the encoder's protocol by hand.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
import uuid

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from services.tools import supervise
from services.tools.supervise import SERVICE_MODULE, service_argv

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAULT_FLAGS = {"--fault", "--transport-fault", "--resolve-file"}
os.environ.setdefault("MC_FORCE_TCP", "1")


def service_module(args) -> str:
    """A service with injected faults starts through the test launcher (tests/faults/launch.py),
    which takes the fault flags; every other one is started as `epd` itself. The children's
    environment (`supervise.child_env`) has the repository importable, tests/ included."""
    return "tests.faults.launch" if FAULT_FLAGS.intersection(args) else SERVICE_MODULE


class ServiceProcess(supervise.ServiceProcess):
    """One `epd encoder` or `epd language` process on 127.0.0.1, started and ready."""

    def __init__(self, role: str, *args: str, ready_timeout: float = 60.0):
        super().__init__(
            role, service_argv(role, *args, module=service_module(args)), env=supervise.child_env()
        )
        self.start()
        try:
            self.wait_ready(ready_timeout)
        except supervise.ServiceStartError:
            self.stop()
            raise


class Pair:
    """An encoder and a language process wired together (`supervise.ServiceGroup`)."""

    def __init__(
        self,
        *,
        hidden=256,
        block_size=128,
        encoder_blocks=2048,
        language_blocks=96,
        initial_tokens=8192,
        encoder_args=(),
        language_args=(),
    ):
        self.hidden = hidden
        self.block_size = block_size
        self.language_blocks = language_blocks
        self.initial_tokens = initial_tokens
        common = ["--hidden", str(hidden), "--block-size", str(block_size)]
        encoder = [*common, "--pool-blocks", str(encoder_blocks), *encoder_args]
        language = [
            *common,
            "--pool-blocks",
            str(language_blocks),
            "--initial-tokens",
            str(initial_tokens),
            *language_args,
        ]
        self.group = supervise.ServiceGroup(
            [service_argv("encoder", *encoder, module=service_module(encoder))],
            lambda addresses: service_argv(
                "language", *language, "--encoder", addresses[0], module=service_module(language)
            ),
            env=supervise.child_env(),
        ).start()
        self.encoder = self.group.encoders[0]
        self.language = self.group.language

    def stop(self) -> None:
        self.group.stop()

    @property
    def language_pool_tokens(self) -> int:
        return self.language_blocks * self.block_size


def language_stub(address: str):
    return language_pb2_grpc.LanguageStub(grpc.aio.insecure_channel(address))


def encoder_stub(address: str):
    return encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(address))


async def connected_language_stub(address: str, connect_s: float = 10.0):
    """A language stub whose channel is connected and whose server has answered one call: a call
    with a short deadline on a fresh channel may spend it all connecting on a loaded machine, and
    never reach the server's handler."""
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), connect_s)
    stub = language_pb2_grpc.LanguageStub(channel)
    await stub.ListTransfers(common_pb2.ListTransfersRequest(limit=1), timeout=connect_s)
    return stub


LIVE_STATES = [1, 2, 3]


async def assert_all_free(
    *addresses_and_kinds: tuple[str, str],
    settle_s: float = 5.0,
    held: dict[int, int] | None = None,
    abandoned: bool = False,
) -> None:
    """Every pool fully free, no allocation waiting, no live transfer.

    Ranks 1..N-1 of a language instance release a request's blocks just after rank 0 replies,
    so their pools are given `settle_s` to get there (rank 0 and the encoder must be free at once).
    `held`: blocks a language rank holds for good by injected fault (`--fault hold_blocks`).
    `abandoned`: the last requests may have ended at the client (deadline, Cancel) before the
    encoder heard of it, so every pool is given `settle_s`."""
    held = held or {}
    for address, kind in addresses_and_kinds:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = (
                encoder_pb2_grpc.EncoderStub
                if kind == "encoder"
                else language_pb2_grpc.LanguageStub
            )(ch)
            deadline = asyncio.get_running_loop().time() + settle_s
            while True:
                pool = await stub.GetPool(common_pb2.GetPoolRequest())
                settling = pool.rank_pools if abandoned else pool.rank_pools[1:]
                busy = [
                    rp
                    for rp in settling
                    if rp.used_blocks != held.get(rp.rank, 0) or rp.waiters or rp.quarantined_blocks
                ]
                if abandoned and (pool.used_blocks or pool.quarantined_blocks or pool.waiters):
                    busy.append(pool)
                if not busy or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert pool.used_blocks == 0, f"{kind} {address}: {pool.used_blocks} blocks still used"
            assert pool.quarantined_blocks == 0, (
                f"{kind} {address}: {pool.quarantined_blocks} blocks quarantined"
            )
            assert pool.free_blocks == pool.layout.num_blocks
            assert pool.waiters == 0
            for rp in pool.rank_pools:  # language: every TP rank's pool
                assert rp.used_blocks == held.get(rp.rank, 0), (
                    f"{kind} rank {rp.rank}: {rp.used_blocks} blocks used"
                )
                assert rp.quarantined_blocks == 0, (
                    f"{kind} rank {rp.rank}: {rp.quarantined_blocks} blocks quarantined"
                )
                assert rp.waiters == 0
            live = await stub.ListTransfers(common_pb2.ListTransfersRequest(states=LIVE_STATES))
            assert not live.transfers, f"{kind} {address}: live transfers left: {live.transfers}"


async def wait_for_rounds(stub, request_id: str, rounds: int, timeout: float = 20.0) -> None:
    """Until the language shows the request with at least `rounds` rounds received."""

    async def poll():
        while True:
            try:
                if (
                    await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
                ).rounds >= rounds:
                    return
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND  # not admitted yet
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def generate_then_kill(
    stub, request_id: str, kill, *, tokens: int = 50000, rounds: int = 2, timeout: float = 30.0
) -> grpc.aio.AioRpcError:
    """Start a Generate of `tokens` synthetic tokens, call `kill()` once the language shows
    `rounds` rounds of it received, and return the error the Generate then ends with."""
    call = asyncio.ensure_future(
        stub.Generate(language_pb2.GenerateRequest(request_id=request_id, synthetic_tokens=tokens))
    )
    await wait_for_rounds(stub, request_id, rounds)
    kill()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call, timeout)
    return e.value


@pytest.fixture
def unique_id():
    return lambda prefix="req": f"{prefix}-{uuid.uuid4().hex[:10]}"


async def consumer_logs(
    prefix: pathlib.Path, tp: int, n: int, timeout: float = 10.0
) -> list[list[str]]:
    """Every rank's `--consumer-log` (PREFIX.rankR: one request id a line), once each holds n ids
    or after `timeout`. Rank 0 replies once it consumed a request; another rank consumes it after
    the same decision in its own process, so its line may come a moment after the reply."""

    def read() -> list[list[str]]:
        return [pathlib.Path(f"{prefix}.rank{r}").read_text().split() for r in range(tp)]

    deadline = time.monotonic() + timeout
    logs = read()
    while any(len(log) < n for log in logs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        logs = read()
    return logs
