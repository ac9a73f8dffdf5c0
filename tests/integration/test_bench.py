"""`epd bench` and the raw-link RPC it divides by (MeasureLink -> RawWrite), on real processes.

No timing is asserted here (benchmarks measure, tests check outcomes): the raw writes really
move the bytes and leave both pools free, bad input is refused without side effects, and the
bench command produces its JSON with every documented key.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from common.pb.epd.v1 import bench_pb2, bench_pb2_grpc, encoder_pb2_grpc
from tests.conftest import ROOT, Pair, assert_all_free
from tests.integration.rank_harness import TestRank

pytestmark = pytest.mark.slow


def bench_stub(address: str):
    return bench_pb2_grpc.BenchStub(grpc.aio.insecure_channel(address))


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=256,
        language_blocks=32,
        encoder_blocks=256,
        encoder_args=("--enable-bench",),
        language_args=("--enable-bench",),
    )
    yield p
    p.stop()


@pytest.mark.parametrize("write_wait", ["", "spin", "poll"])
async def test_measure_link_moves_real_bytes_and_frees_both_pools(pair, write_wait):
    stub = bench_stub(pair.language.address)
    reply = await stub.MeasureLink(
        bench_pb2.MeasureLinkRequest(tokens=1000, repeats=3, concurrency=2, write_wait=write_wait)
    )
    assert len(reply.seconds) == 3 and all(s > 0 for s in reply.seconds)
    record_bytes = (
        256 * 2 + 4 + 12
    )  # hidden 256 bf16 + token id + 3 positions, packed (no padding here)
    assert reply.bytes == 2 * 1000 * record_bytes
    assert reply.descriptors >= 1 and reply.encoder
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


@pytest.mark.parametrize(
    "request_kw, code, named",
    [
        (dict(tokens=0, repeats=1), grpc.StatusCode.INVALID_ARGUMENT, "tokens=0"),
        (dict(tokens=100, repeats=0), grpc.StatusCode.INVALID_ARGUMENT, "repeats=0"),
        (
            dict(tokens=128 * 33, repeats=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "more than the pool's 32",
        ),
        (
            dict(tokens=128, repeats=1, concurrency=40),
            grpc.StatusCode.INVALID_ARGUMENT,
            "concurrency * tokens = 40 * 128",
        ),
        (
            dict(tokens=128, repeats=1, write_wait="busy"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "write_wait='busy'",
        ),
    ],
)
async def test_measure_link_bad_input_is_refused_and_changes_nothing(pair, request_kw, code, named):
    stub = bench_stub(pair.language.address)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.MeasureLink(bench_pb2.MeasureLinkRequest(**request_kw))
    assert e.value.code() == code and named in e.value.details(), e.value.details()
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_raw_write_is_validated_like_init(pair):
    """The encoder writes only into blocks of a registered pool, exactly as many as asked for."""
    rank = TestRank(hidden=256, block_size=128, num_blocks=8)
    try:
        async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
            enc, bench = encoder_pb2_grpc.EncoderStub(ch), bench_pb2_grpc.BenchStub(ch)
            unregistered = bench_pb2.RawWriteRequest(
                language_id="nobody", rank=0, dst_blocks=[0], tokens=128, repeats=1
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await bench.RawWrite(unregistered)
            assert (
                e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                and "has not called Register" in e.value.details()
            )
            await rank.register(enc)
            cases = [
                (dict(dst_blocks=[8], tokens=128), "dst block id 8 is out of range"),
                (dict(dst_blocks=[1, 1], tokens=256), "appears more than once"),
                (
                    dict(dst_blocks=[0, 1], tokens=128),
                    "2 dst_blocks, expected concurrency * ceil(tokens / block_size) = 1 * 1",
                ),
                (dict(dst_blocks=[0], tokens=128, repeats=5000), "repeats=5000"),
                (dict(dst_blocks=[0], tokens=128, write_wait="nap"), "write_wait='nap'"),
            ]
            for kw, named in cases:
                req = bench_pb2.RawWriteRequest(
                    language_id=rank.language_id, rank=0, **{"repeats": 1, **kw}
                )
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await bench.RawWrite(req)
                assert (
                    e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    and named in e.value.details()
                ), e.value.details()
            blocks = rank.alloc(2)
            ok = await bench.RawWrite(
                bench_pb2.RawWriteRequest(
                    language_id=rank.language_id, rank=0, dst_blocks=blocks, tokens=200, repeats=2
                )
            )
            assert len(ok.seconds) == 2 and ok.bytes == 200 * rank.record.record_bytes
            rank.free(blocks)
        await assert_all_free((pair.encoder.address, "encoder"))
    finally:
        rank.close()


def bench_json(*args: str) -> dict:
    """`epd bench ARGS --json -` in a process of its own; its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "services.tools.cli", "bench", *args, "--json", "-"],
        capture_output=True,
        timeout=300,
        cwd=ROOT,
        env={"MC_FORCE_TCP": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout)


def test_epd_bench_json_has_every_documented_key():
    r = bench_json(
        *("--quick", "--hidden", "256", "--cases", "single,multi,control"),
        *("--sizes", "256,2048", "--repeats", "3", "--small-requests", "30"),
    )
    assert {"config", "single", "multi", "control", "checks", "wall_s"} <= set(r)
    assert r["config"]["client_event_loop"] == "uvloop"  # like the services, when installed
    assert [x["tokens"] for x in r["single"]] == [256, 2048]
    for x in r["single"]:
        assert {
            "tokens",
            "bytes",
            "transfer_ms_p50",
            "raw_ms_p50",
            "gbps",
            "raw_gbps",
            "ratio",
            "raw_poll_ms_p50",
            "ratio_vs_raw_poll",
            "check_ms",
            "integrity_floor_ratio",
        } <= set(x)
        assert x["ratio"] > 0 and x["check_ms"] > 0 and 0 < x["integrity_floor_ratio"] < 1
    assert [x["rounds"] for x in r["multi"]] == [1, 2]  # 1024-token initial allocation
    for x in r["multi"]:
        assert {
            "extra_ms_per_round",
            "extra_ms_per_round_same_setup",
            "setup_ms",
            "raw_extra_ms_per_round",
            "goal_ms_per_round",
            "overlapped_rounds",
        } <= set(x)
    assert {"latency_ms_p50", "latency_ms_p99", "overhead_ms_p50", "raw_ms_p50"} <= set(
        r["control"]
    )
    assert all(v > 0 for v in r["control"]["cpu_ms_per_request"].values())
    assert set(r["control"]["cpu_ms_per_request"]) == {"encoder", "language"}
    figures = {c["figure"] for c in r["checks"]}
    assert {"single_round_ratio[256]", "round_extra_ms[2048]", "control_overhead_p50_ms"} <= figures
    # A fixed shape (docs/DESIGN.md, "Names other tools rely on"):
    # {"cases": [{"name", "ratio", "goal", "ok", ...}, ...]}, one per goal checked.
    assert [c["name"] for c in r["cases"]] == [c["figure"] for c in r["checks"]]
    for case in r["cases"]:
        assert {"name", "ratio", "goal", "ok"} <= set(case), case
        assert isinstance(case["ok"], bool) and "value" in case
        if case["goal"] != "-":  # "-": a figure to read (cpu_ms_per_request)
            assert case["ratio"] > 0 and case["goal"][:2] in (">=", "<="), case
    names = {c["name"] for c in r["cases"]}
    for n in (256, 2048):  # the honest yardsticks, next to the names that stay
        assert {
            f"single_round_efficiency[{n}]",
            f"cpu_ms_per_request[{n}][encoder]",
            f"cpu_ms_per_request[{n}][language]",
        } <= names
    for x in r["single"]:
        assert x["raw_best"] in ("sync", "poll")
        assert x["raw_best_ms_p50"] <= min(x["raw_ms_p50"], x["raw_poll_ms_p50"]) * 1.0001
        assert x["cpu_ms_per_request"]["encoder"] > 0 and x["cpu_ms_per_request"]["language"] > 0
    by_name = {c["name"]: c for c in r["cases"]}
    assert by_name["control_overhead_p50_ms"]["goal"] == "<= 2"
    extra = by_name["round_extra_ms[2048]"]
    assert {"copy_out_ms", "check_ms"} <= set(extra)
    assert extra["goal"] == f"<= {extra['copy_out_ms'] + extra['check_ms'] + 1:g}"
    single = {c["name"]: c for c in r["cases"]}["single_round_ratio[256]"]
    assert (
        single["ratio"] == single["value"] == r["single"][0]["ratio"] and single["goal"] == ">= 0.9"
    )


def test_epd_bench_policies_case_reports_auto_in_one_round_without_hints():
    r = bench_json(
        *("--quick", "--hidden", "256", "--cases", "policies", "--policy-requests", "30")
    )
    rows = {x["policy"]: x for x in r["policies"]}
    assert set(rows) == {"fixed", "hint", "adaptive", "auto"}
    for x in rows.values():
        assert x["requests"] == 30 and x["requests_fitting"] == 30  # the pool holds every size
    # Size-first with no hint reserves what `hint` reserves with one: every payload whole.
    assert rows["auto"]["rounds_mean_fitting"] == rows["hint"]["rounds_mean_fitting"] == 1.0
    case = {c["name"]: c for c in r["cases"]}["auto_rounds_per_request"]
    assert (case["value"], case["goal"], case["ok"], case["ratio"]) == (1.0, "<= 1", True, 1.0)


def test_epd_bench_reuse_case_sends_less_and_the_same_payloads():
    r = bench_json(
        *("--hidden", "256", "--cases", "reuse", "--reuse-requests", "4"),
        *("--reuse-image", "448x448"),
    )["reuse"]
    image_tokens = (448 // 28) ** 2  # Qwen2-VL: one token per 28x28 pixels
    assert r["same_payloads"] and len(r["on"]["digests"]) == 4
    assert r["on"]["cached_tokens_mean"] == image_tokens and r["off"]["cached_tokens_mean"] == 0
    tokens = r["on"]["tokens"]
    # Cache on: the first request sends everything, the 3 repeats only their text tokens.
    on_tokens, off_tokens = tokens + 3 * (tokens - image_tokens), 4 * tokens
    assert r["bytes_ratio"] == on_tokens / off_tokens
    assert r["speedup"] > 0
