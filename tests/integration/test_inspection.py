"""Inspection from outside: the real grpcurl binary through server reflection,
and the `epd status` / `epd health` commands run as processes, against a real encoder + language.

A transfer is held mid-round with the encoder's test-only `--transport-fault delay_s=D`: every
Mooncake write takes D seconds, so once the language has received round 1 and resumed, round 2's
write is in flight for D seconds and both sides show the request TRANSFERRING after one round,
with a destination allocation in place. Everything that must see it live runs concurrently in
that window; afterwards the request is cancelled, stays in both histories as FAILED (cancelled),
and both pools are fully free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import sys

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from services.tools import cli
from tests.conftest import (
    ROOT,
    Pair,
    ServiceProcess,
    assert_all_free,
    language_stub,
    wait_for_rounds,
)

GRPCURL = shutil.which("grpcurl") or str(pathlib.Path(sys.executable).parent / "grpcurl")
DELAY_S = 6.0  # every Mooncake write of the module's encoder takes this long
HIDDEN = 128
INITIAL = 1024  # tokens of the language's initial allocation
TOKENS = 3000  # two rounds: 1024, then 1976 into a 2048-token resume allocation
TRANSFERRING = "TRANSFER_STATE_TRANSFERRING"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        language_blocks=64,
        initial_tokens=INITIAL,
        encoder_args=("--transport-fault", f"delay_s={DELAY_S}"),
    )
    yield p
    p.stop()


# ---------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run(*argv: str, timeout: float = 30.0) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv} did not finish within {timeout} s") from None
    return Ran(proc.returncode, out.decode(), err.decode())


async def epd(*args: str) -> Ran:
    return await run(sys.executable, "-m", "services.tools.cli", *args)


async def grpcurl(*args: str) -> str:
    ran = await run(GRPCURL, "-plaintext", *args)
    assert ran.returncode == 0, (args, ran.stderr)
    return ran.stdout


async def grpcurl_call(address: str, method: str, body: dict | None = None) -> dict:
    """One unary call through reflection, every field printed (defaults too)."""
    return json.loads(
        await grpcurl("-emit-defaults", "-d", json.dumps(body or {}), address, method)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table_row(text: str, request_id: str) -> list[str]:
    """The cells of `request_id`'s row in an `epd status` table (cells are single words except ERROR)."""
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [request_id]]
    assert len(rows) == 1, text
    return rows[0]


def detail(text: str) -> dict[str, str]:
    """`key  value` lines of `epd status ADDR ID` (before the ranks table)."""
    head = text.split("\nranks:")[0]
    return {k: v.strip() for k, _, v in (line.partition(" ") for line in head.splitlines() if line)}


def rank_rows(text: str) -> list[list[str]]:
    lines = text.split("\nranks:\n", 1)[1].splitlines()
    return [line.split() for line in lines[1:] if line.strip()]


async def info_of(stub, request_id: str) -> common_pb2.TransferInfo:
    return await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))


async def wait_held(pair: Pair, request_id: str, timeout: float = 30.0) -> None:
    """Until round 1 is in and both ranks' resume allocations are in place (round 2 in flight)."""
    async with (
        grpc.aio.insecure_channel(pair.language.address) as lch,
        grpc.aio.insecure_channel(pair.encoder.address) as ech,
    ):
        lang, enc = language_pb2_grpc.LanguageStub(lch), encoder_pb2_grpc.EncoderStub(ech)
        await wait_for_rounds(lang, request_id, 1, timeout)

        async def held() -> None:
            while True:
                infos = [await info_of(lang, request_id), await info_of(enc, request_id)]
                if all(
                    i.state == common_pb2.TRANSFER_STATE_TRANSFERRING and i.allocated_tokens
                    for i in infos
                ):
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(held(), timeout)


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "bad", ["nohost", "50051", "host:", "host:port", "host:0", "host:70000", "::1:50051", "a b:1"]
)
def test_malformed_address_is_a_usage_error_in_process(bad, capsys):
    for command in ("status", "health"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, bad])
        assert e.value.code == 2
        assert repr(bad) in capsys.readouterr().err


async def test_malformed_arguments_exit_2():
    status, health, state = await asyncio.gather(
        epd("status", "nohost"),
        epd("health", "127.0.0.1:99999"),
        epd("status", "127.0.0.1:1", "--state", "NOPE"),
    )
    assert status.returncode == 2 and "'nohost' is not host:port" in status.stderr, status
    assert health.returncode == 2 and "'127.0.0.1:99999'" in health.stderr, health
    assert state.returncode == 2 and "'NOPE'" in state.stderr and "TRANSFERRING" in state.stderr, (
        state
    )


async def test_unreachable_address_exits_1_naming_it():
    address = f"127.0.0.1:{free_port()}"
    commands = (("status", address), ("status", address, "some-id"), ("health", address))
    for args, ran in zip(
        commands, await asyncio.gather(*(epd(*args, "--timeout", "3") for args in commands))
    ):
        assert ran.returncode == 1, (args, ran)
        assert f"cannot reach {address}" in ran.stderr, ran.stderr
        assert ran.stdout == ""


async def test_reflection_and_health_through_grpcurl(pair):
    for address, service in (
        (pair.language.address, "epd.v1.Language"),
        (pair.encoder.address, "epd.v1.Encoder"),
    ):
        assert {service, "grpc.health.v1.Health"} <= set((await grpcurl(address, "list")).split())
        described = await grpcurl(address, "describe", service)
        for method in ("GetTransfer", "ListTransfers", "Cancel", "GetPool"):
            assert f"rpc {method}" in described, described
        assert (await grpcurl_call(address, "grpc.health.v1.Health/Check"))["status"] == "SERVING"
    info = await grpcurl(pair.encoder.address, "describe", "epd.v1.TransferInfo")
    for field in (
        "rounds",
        "allocated_tokens",
        "ranks",
        "error",
        "age_seconds",
        "transfer_seconds",
        "bootstrap_seconds",
    ):
        assert field in info, info


async def test_health_command_exits_0_when_serving(pair):
    checks = [
        (pair.language.address,),
        (pair.encoder.address,),
        (pair.language.address, "--service", "epd.v1.Language"),
        (pair.encoder.address, "--service", "epd.v1.Encoder"),
    ]
    *serving, unknown = await asyncio.gather(
        *(epd("health", *args) for args in checks),
        epd("health", pair.encoder.address, "--service", "epd.v1.Nope"),
    )
    for args, ran in zip(checks, serving):
        assert (ran.returncode, ran.stdout.strip()) == (0, "SERVING"), (args, ran)
    assert unknown.returncode == 1 and "'epd.v1.Nope'" in unknown.stderr, unknown


async def test_unknown_request_id_exits_1_naming_it(pair, unique_id):
    rid = unique_id("never")
    for address in (pair.language.address, pair.encoder.address):
        ran = await epd("status", address, rid)
        assert ran.returncode == 1, ran
        assert rid in ran.stderr and address in ran.stderr, ran.stderr
    ran = await epd("status", pair.language.address, rid, "--state", "FAILED")
    assert ran.returncode == 2, ran


async def test_transfer_held_mid_round_is_visible_then_cancelled(pair, unique_id):
    lang, enc = pair.language.address, pair.encoder.address
    stub = language_stub(lang)
    rid = unique_id("held")
    call = asyncio.ensure_future(
        stub.Generate(
            language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=TOKENS, synthetic_seed=5)
        )
    )
    try:
        await wait_held(pair, rid)
        # Round 2's write is in flight for DELAY_S: look at it from everywhere at once.
        (
            l_list,
            e_list,
            l_one,
            e_one,
            l_status,
            e_status,
            l_detail,
            e_detail,
            l_filtered,
        ) = await asyncio.gather(
            grpcurl_call(lang, "epd.v1.Language/ListTransfers", {"states": [TRANSFERRING]}),
            grpcurl_call(enc, "epd.v1.Encoder/ListTransfers", {}),
            grpcurl_call(lang, "epd.v1.Language/GetTransfer", {"request_id": rid}),
            grpcurl_call(enc, "epd.v1.Encoder/GetTransfer", {"request_id": rid}),
            epd("status", lang),
            epd("status", enc),
            epd("status", lang, rid),
            epd("status", enc, rid),
            epd("status", lang, "--state", "TRANSFERRING", "--json"),
        )
        assert not call.done()

        # grpcurl: ListTransfers and GetTransfer on both services.
        assert [t["request_id"] for t in l_list["transfers"]] == [rid]
        assert rid in [t["request_id"] for t in e_list["transfers"]]
        for info, session_wanted in ((l_one, False), (e_one, True)):
            assert info["state"] == TRANSFERRING and info["rounds"] >= 1, info
            assert int(info["sent_tokens"]) == INITIAL < int(info["total_tokens"]) == TOKENS, info
            assert int(info["allocated_tokens"]) >= TOKENS - INITIAL, info
            assert (
                info["age_seconds"] > 0
                and info["bootstrap_seconds"] > 0
                and info["transfer_seconds"] == 0
            ), info
            assert info["peer"] and info["error"] is None, info
            [view] = info["ranks"]
            assert (
                view["rank"] == 0
                and view["state"] == TRANSFERRING
                and int(view["sent_tokens"]) == INITIAL
            ), view
            assert int(view["allocated_tokens"]) == int(info["allocated_tokens"]), view
            assert bool(view["session"]) == session_wanted, view

        # epd status ADDR: the table, then the pool.
        for ran, service in ((l_status, "epd.v1.Language"), (e_status, "epd.v1.Encoder")):
            assert ran.returncode == 0, ran
            assert ran.stdout.startswith(f"{service} at "), ran.stdout
            row = table_row(ran.stdout, rid)
            assert row[1:5] == [
                "TRANSFERRING",
                "1",
                f"{INITIAL}/{TOKENS}",
                str(int(l_one["allocated_tokens"])),
            ], row
            assert "\npool: " in ran.stdout and " waiting " in ran.stdout, ran.stdout
        assert any(  # the language lists every rank's pool
            line.split()
            == ["RANK", "USED", "FREE", "QUARANTINED", "WAITERS", "CACHED", "IMAGES", "HIT-RATE"]
            for line in l_status.stdout.splitlines()
        ), l_status.stdout

        # epd status ADDR ID: one transfer in detail, every rank's view.
        for ran, session_wanted in ((l_detail, False), (e_detail, True)):
            assert ran.returncode == 0, ran
            d = detail(ran.stdout)
            assert d["request"] == rid and d["state"] == "TRANSFERRING" and d["rounds"] == "1", d
            assert d["tokens"].startswith(f"{INITIAL} of {TOKENS} sent"), d
            assert d["error"] == "-" and d["transfer"].startswith("-"), d
            [view] = rank_rows(ran.stdout)
            assert view[:3] == ["0", "TRANSFERRING", str(INITIAL)], view
            assert (view[4] != "-") == session_wanted, view

        # --json: the raw messages, filtered by state on the server.
        filtered = json.loads(l_filtered.stdout)
        assert filtered["service"] == "epd.v1.Language" and filtered["address"] == lang, filtered
        [held] = filtered["transfers"]
        assert (
            held["request_id"] == rid and held["state"] == TRANSFERRING and held["rounds"] == 1
        ), held
        assert held["ranks"][0]["state"] == TRANSFERRING, held
        assert filtered["pool"]["used_blocks"] > 0, filtered["pool"]

        cancel = await stub.Cancel(
            common_pb2.CancelRequest(request_id=rid, reason="inspection test is done")
        )
        assert cancel.cancelled
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call, 30)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    finally:
        if not call.done():
            await stub.Cancel(common_pb2.CancelRequest(request_id=rid, reason="test failed"))
            await asyncio.gather(call, return_exceptions=True)

    # Afterwards: in both histories as FAILED (cancelled), pools free. (The encoder's record keeps
    # the rounds it sent; the language's record of a request cancelled by the client keeps only
    # state and error today, so its progress columns are not checked here.)
    l_status, e_status, e_detail, e_json, l_live, l_failed = await asyncio.gather(
        epd("status", lang),
        epd("status", enc),
        epd("status", enc, rid),
        epd("status", enc, rid, "--json"),
        epd("status", lang, "--state", "TRANSFERRING"),
        epd("status", lang, "--state", "FAILED", "--limit", "1", "--json"),
    )
    row = table_row(l_status.stdout, rid)
    assert row[1] == "FAILED" and "cancelled:" in row, row
    row = table_row(e_status.stdout, rid)
    assert row[1] == "FAILED" and int(row[2]) >= 1 and "cancelled:" in row, row
    d = detail(e_detail.stdout)
    assert (
        d["state"] == "FAILED" and d["error"].startswith("cancelled: ") and int(d["rounds"]) >= 1
    ), d
    assert float(d["transfer"].split()[0]) > 0, d
    parsed = json.loads(e_json.stdout)
    assert parsed["service"] == "epd.v1.Encoder" and parsed["transfer"]["request_id"] == rid, parsed
    assert parsed["transfer"]["error"]["reason"] == "FAILURE_REASON_CANCELLED", parsed
    assert parsed["transfer"]["ranks"][0]["session"], parsed
    assert rid not in l_live.stdout and "0 transfer(s)" in l_live.stdout, l_live.stdout
    [failed] = json.loads(l_failed.stdout)["transfers"]
    assert (
        failed["request_id"] == rid and failed["error"]["reason"] == "FAILURE_REASON_CANCELLED"
    ), failed
    await assert_all_free((enc, "encoder"), (lang, "language"))


async def test_health_not_serving_while_draining_after_sigterm(pair, unique_id):
    """SIGTERM with a transfer in flight: the language drains (NOT_SERVING, exit 1 from `epd
    health`) while `epd status` still answers; the transfer completes, the process exits 0."""
    language = ServiceProcess(
        "language",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        "128",
        "--pool-blocks",
        "16",
        "--encoder",
        pair.encoder.address,
        "--initial-tokens",
        str(INITIAL),
        "--shutdown-grace-s",
        "60",
    )
    try:
        stub = language_stub(language.address)
        rid = unique_id("drain")
        call = asyncio.ensure_future(
            stub.Generate(
                language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=500, synthetic_seed=6)
            )
        )
        await wait_for_rounds(stub, rid, 0)  # admitted: its one write takes DELAY_S
        language.proc.send_signal(signal.SIGTERM)
        for _ in range(50):
            ran = await epd("health", language.address)
            if ran.stdout.strip() != "SERVING":
                break
            await asyncio.sleep(0.05)
        assert (ran.returncode, ran.stdout.strip()) == (1, "NOT_SERVING"), ran
        status = await epd("status", language.address, rid)
        assert status.returncode == 0 and detail(status.stdout)["request"] == rid, status
        assert not call.done()
        reply = await asyncio.wait_for(call, 30)
        assert reply.total_tokens == 500
        assert await asyncio.to_thread(language.proc.wait, 30) == 0
        await assert_all_free((pair.encoder.address, "encoder"))
    finally:
        language.stop()


def test_state_names_and_shortened_errors_in_process():
    from services.tools import status as status_cli

    for text in ("TRANSFERRING", "transferring", "TRANSFER_STATE_TRANSFERRING"):
        assert status_cli.parse_state(text) == common_pb2.TRANSFER_STATE_TRANSFERRING
    info = common_pb2.TransferInfo(
        request_id="r",
        state=common_pb2.TRANSFER_STATE_FAILED,
        rounds=3,
        error=common_pb2.TransferError(
            reason=common_pb2.FAILURE_REASON_PEER_LOST, message="x" * 500 + "\nsecond line"
        ),
    )
    row = status_cli.transfer_row(info)
    assert row[:3] == ["r", "FAILED", "3"]
    assert (
        row[-1].startswith("peer_lost: xxx")
        and row[-1].endswith("...")
        and len(row[-1]) == status_cli.ERROR_WIDTH
    )
    assert status_cli.error_text(info).endswith(
        "x second line"
    )  # the detail view keeps all of it, on one line
