"""`epd demo` pieces: workload plan, percentiles, summary/table, ready lines, flags, and the whole
command against fake services (small scripts that print the ready line and answer Generate)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
import time

import numpy as np
import pytest

from services.tools import demo, supervise
from services.tools import reference_payload as ref

# ------------------------------------------------------------------------------------ plan

DEFAULTS = dict(
    block_size=128, initial_tokens=8192, language_pool_blocks=96, encoder_pool_blocks=4096
)


def test_plan_is_deterministic_and_seed_dependent():
    a = demo.plan_workload(24, seed=1, **DEFAULTS)
    b = demo.plan_workload(24, seed=1, **DEFAULTS)
    c = demo.plan_workload(24, seed=2, **DEFAULTS)
    assert a == b
    assert [p.tokens for p in a] != [p.tokens for p in c]
    assert [p.seed for p in a] != [p.seed for p in c]


@pytest.mark.parametrize("n", [4, 5, 7, 24, 100])
def test_plan_covers_every_kind(n):
    plan = demo.plan_workload(n, seed=3, **DEFAULTS)
    assert len(plan) == n
    assert {p.kind for p in plan} == set(demo.KINDS)
    assert len({p.seed for p in plan}) == n
    assert len({p.request_id for p in plan}) == n
    assert all(0 <= p.seed < 2**32 for p in plan)
    assert [p.index for p in plan] == list(range(n))


def test_plan_sizes_per_kind():
    pool = 96 * 128
    initial = 8192
    plan = demo.plan_workload(48, seed=1, **DEFAULTS)
    by_kind = {k: [p for p in plan if p.kind == k] for k in demo.KINDS}
    for p in by_kind["small"]:
        assert 1 <= p.tokens <= 500 and p.min_rounds == 1
    boundary = [p.tokens for p in by_kind["boundary"]]
    for t in (initial, initial + 1, initial + 5, initial - 1):
        assert t in boundary
    assert all(abs(t - initial) <= 128 for t in boundary)
    for p in by_kind["multi10"]:
        assert 10 * pool < p.tokens <= 12 * pool
        assert p.min_rounds >= 10
    for p in by_kind["medium"]:
        assert 2 <= p.min_rounds <= 4
    # a request over the initial allocation needs at least two rounds
    assert [p.min_rounds for p in by_kind["boundary"] if p.tokens > initial] == [2] * sum(
        t > initial for t in boundary
    )


def test_plan_caps_at_encoder_pool():
    plan = demo.plan_workload(
        8, seed=1, block_size=16, initial_tokens=64, language_pool_blocks=8, encoder_pool_blocks=40
    )
    assert max(p.tokens for p in plan) <= 40 * 16


def test_min_rounds():
    assert demo.min_rounds(1, 8192, 12288) == 1
    assert demo.min_rounds(8192, 8192, 12288) == 1
    assert demo.min_rounds(8193, 8192, 12288) == 2
    assert demo.min_rounds(8192 + 12288, 8192, 12288) == 2
    assert demo.min_rounds(8192 + 12288 + 1, 8192, 12288) == 3
    assert demo.initial_allocation_tokens(8000, 128, 96) == 8064
    assert demo.initial_allocation_tokens(10**6, 128, 96) == 96 * 128


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("values", [[5.0], [1.0, 2.0], list(range(24)), [3.5, 1.0, 9.0, 2.2, 7.7]])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert demo.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_empty():
    assert demo.percentile([], 50) == 0.0


def _result(i, kind, tokens, *, ok=True, rounds=1, latency=0.01, digest=None, code=""):
    p = demo.PlannedRequest(
        index=i, kind=kind, tokens=tokens, seed=i + 10, request_id=f"r{i}", min_rounds=1
    )
    r = demo.RequestResult(request=p, latency_s=latency)
    if ok:
        r.rpc_ok = True
        r.total_tokens = tokens
        r.rounds = rounds
        r.bytes = tokens * 100
        r.integrity_verified = True
        r.payload_sha256 = digest if digest is not None else ref.expected_digest(tokens, i + 10, 4)
    else:
        r.error_code = code or "UNAVAILABLE"
        r.error_message = "boom"
    return r


def test_check_reply():
    r = _result(0, "small", 10)
    assert demo.check_reply(r, ref.expected_digest(10, 10, 4)) == []
    assert r.status == "ok"
    r = _result(1, "small", 10, digest="00" * 32)
    assert "payload_sha256" in demo.check_reply(r, ref.expected_digest(10, 11, 4))[0]
    assert r.status == "mismatch"
    r = _result(2, "small", 10, digest="")
    r.total_tokens = 9
    r.integrity_verified = False
    assert len(demo.check_reply(r, "ab")) == 3


def test_summary_keys_and_table():
    results = [
        _result(0, "multi10", 1000, rounds=12, latency=0.5),
        _result(1, "small", 10, latency=0.01),
        _result(2, "boundary", 64, ok=False, code="RESOURCE_EXHAUSTED"),
        _result(3, "medium", 300, rounds=3, latency=0.1, digest="ff" * 32),
    ]
    for r in results:
        if r.rpc_ok:
            demo.check_reply(r, ref.expected_digest(r.request.tokens, r.request.seed, 4))
    s = demo.summarize(results, wall_seconds=2.0, config={"concurrency": 8, "hidden": 4})
    for key in (
        "requests",
        "succeeded",
        "failed",
        "mismatches",
        "tokens",
        "bytes",
        "rounds_max",
        "rounds_total",
        "gbps",
        "p50_ms",
        "p99_ms",
    ):
        assert key in s, key
    assert (s["requests"], s["succeeded"], s["failed"], s["mismatches"]) == (4, 2, 1, 1)
    assert s["tokens"] == 1310 and s["bytes"] == 131000
    assert s["rounds_max"] == 12 and s["rounds_total"] == 16
    assert s["gbps"] == pytest.approx(131000 / 2.0 / 1e9)
    assert s["p50_ms"] == pytest.approx(100.0)
    assert s["integrity"] == "MISMATCH"
    assert {e["request_id"] for e in s["errors"]} == {"r2", "r3"}
    assert s["kinds"]["multi10"]["rounds_max"] == 12
    json.dumps(s)  # serialisable
    table = demo.format_table(s)
    assert "MISMATCH" in table and "multi10" in table and "GB/s" in table
    fails = demo.format_failures(results)
    assert "r2" in fails and "RESOURCE_EXHAUSTED" in fails and "r3" in fails


def test_summary_all_ok():
    results = [_result(i, demo.KINDS[i % 4], 10 + i) for i in range(4)]
    for r in results:
        demo.check_reply(r, ref.expected_digest(r.request.tokens, r.request.seed, 4))
    s = demo.summarize(results, 1.0)
    assert s["integrity"] == "OK" and s["succeeded"] == 4 and s["errors"] == []


def test_progress_bar():
    out = io.StringIO()
    bar = demo.Progress(4, stream=out, enabled=True, width=8)
    bar.start()
    bar.advance()
    bar.advance(failed=True)
    bar.finish()
    text = out.getvalue()
    assert "\r[####....] 2/4  failed 1" in text and text.endswith("\n")
    quiet = io.StringIO()
    bar = demo.Progress(4, stream=quiet, enabled=False)
    bar.start()
    bar.advance()
    bar.finish()
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------------------ ready lines


def test_parse_ready_line():
    assert supervise.parse_ready_line('EPD_READY {"role": "encoder", "port": 5001}\n') == {
        "role": "encoder",
        "port": 5001,
    }
    assert supervise.parse_ready_line("hello") is None
    with pytest.raises(ValueError):
        supervise.parse_ready_line("EPD_READY {not json")
    with pytest.raises(ValueError):
        supervise.parse_ready_line('EPD_READY {"role": "encoder"}')


# ------------------------------------------------------------------------------ flags


def _parse(argv, monkeypatch=None, env=None):
    if monkeypatch is not None:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def test_flag_defaults():
    a = _parse([])
    assert (
        a.requests,
        a.tp,
        a.encoders,
        a.json,
        a.hidden,
        a.dtype,
        a.block_size,
        a.initial_tokens,
        a.language_pool_blocks,
        a.encoder_pool_blocks,
        a.concurrency,
        a.seed,
        a.model,
        a.image_requests,
    ) == (24, 1, 1, False, 256, "bfloat16", 128, 8192, 96, 4096, 8, 1, "tiny", 6)


def test_flags_from_env_and_cli_wins(monkeypatch):
    a = _parse([], monkeypatch, {"EPD_REQUESTS": "7", "EPD_JSON": "1", "EPD_HIDDEN": "64"})
    assert (a.requests, a.json, a.hidden) == (7, True, 64)
    a = _parse(["--requests", "3"], monkeypatch, {"EPD_REQUESTS": "7"})
    assert a.requests == 3


def test_unsupported_shapes_are_rejected(capsys):
    for argv, word, why in (
        (["--tp", "9"], "--tp 9", "1 to 8"),
        (["--encoders", "9"], "--encoders 9", "1 to 8"),
    ):
        args = _parse(argv)
        assert demo.run(args) == 2
        err = capsys.readouterr().err
        assert word in err and why in err


def test_service_command_lines():
    args = _parse(
        [
            "--hidden",
            "64",
            "--dtype",
            "bf16",
            "--block-size",
            "16",
            "--initial-tokens",
            "100",
            "--language-pool-blocks",
            "5",
        ]
    )
    enc = demo.encoder_argv(args)
    assert enc[:4] == [sys.executable, "-m", "services.tools.cli", "encoder"]
    assert enc[enc.index("--pool-blocks") + 1] == "4096"
    assert enc[enc.index("--dtype") + 1] == "bfloat16"
    lang = demo.language_argv(args, ["127.0.0.1:4242"])
    assert lang[lang.index("--encoder") + 1] == "127.0.0.1:4242"
    assert lang[lang.index("--pool-blocks") + 1] == "5"
    assert lang[lang.index("--initial-tokens") + 1] == "100"
    assert lang[lang.index("--port") + 1] == "0"
    env = supervise.child_env(
        {"PATH": "/bin", "EPD_REQUESTS": "4", "EPD_HIDDEN": "64", "EPD_LOG_LEVEL": "DEBUG"},
        drop=demo.demo_env_names(),
    )
    assert env["MC_FORCE_TCP"] == "1"
    assert "EPD_REQUESTS" not in env and "EPD_HIDDEN" not in env
    assert env["EPD_LOG_LEVEL"] == "DEBUG"  # a service setting the demo does not own


# ------------------------------------------------------------------------------ end to end

FAKE_SERVICE = textwrap.dedent('''
    """A stand-in for `python -m services.tools.cli encoder|language` (the demo's contract only)."""
    import argparse, asyncio, json, math, os, signal, sys, time
    role = sys.argv[1]
    mode = os.environ.get("FAKE_MODE", "ok")
    p = argparse.ArgumentParser()
    for f in ("--host", "--port", "--encoder", "--dtype"):
        p.add_argument(f)
    for f in ("--block-size", "--pool-blocks", "--hidden", "--initial-tokens"):
        p.add_argument(f, type=int)
    a = p.parse_args(sys.argv[2:])
    assert os.environ.get("MC_FORCE_TCP") == "1"
    print("starting " + role, file=sys.stderr, flush=True)
    if mode == f"crash-{role}":
        print("fatal: cannot register the pool with Mooncake", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == f"hang-{role}":
        time.sleep(600)
    if role == "encoder":
        print("some other stdout line", flush=True)
        print("EPD_READY " + json.dumps({"role": "encoder", "port": 1}), flush=True)
        signal.sigwait([signal.SIGTERM])
        sys.exit(0)

    import grpc
    from common.pb.epd.v1 import language_pb2, language_pb2_grpc
    from services.tools import reference_payload as ref

    seen = set()

    class Language(language_pb2_grpc.LanguageServicer):
        async def Generate(self, request, context):
            if request.request_id in seen:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, "dup")
            seen.add(request.request_id)
            n, s = request.synthetic_tokens, request.synthetic_seed
            if mode == "fail-multi10" and request.request_id.endswith("multi10"):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "pool too small")
            await asyncio.sleep(0.002)
            pool = a.block_size * a.pool_blocks
            init = min(math.ceil(a.initial_tokens / a.block_size), a.pool_blocks) * a.block_size
            rounds = 1 if n <= init else 1 + math.ceil((n - init) / pool)
            digest = ref.expected_digest(n, s, a.hidden, a.dtype)
            if mode == "corrupt-small" and request.request_id.endswith("small"):
                digest = "0" * 64
            return language_pb2.GenerateReply(
                request_id=request.request_id, total_tokens=n, rounds=rounds,
                bytes=ref.payload_bytes(n, a.hidden, a.dtype), integrity_verified=True,
                payload_sha256=digest, first_token_id=-1)

    async def main():
        server = grpc.aio.server()
        language_pb2_grpc.add_LanguageServicer_to_server(Language(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        assert a.encoder == "127.0.0.1:1", a.encoder
        print("EPD_READY " + json.dumps({"role": "language", "port": port}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_service.py"
    script.write_text(FAKE_SERVICE)

    def argvs():
        def enc(args):
            return [sys.executable, str(script), "encoder"] + demo.encoder_argv(args)[4:]

        def lang(args, addresses):
            return [sys.executable, str(script), "language"] + demo.language_argv(args, addresses)[
                4:
            ]

        return dict(encoder_argv=enc, language_argv=lang)

    return argvs()


SMALL = [
    "--model",
    "none",
    "--requests",
    "8",
    "--hidden",
    "16",
    "--block-size",
    "16",
    "--initial-tokens",
    "64",
    "--language-pool-blocks",
    "6",
    "--encoder-pool-blocks",
    "512",
    "--concurrency",
    "3",
    "--startup-timeout",
    "20",
]


def _run_fake(fake, argv, mode="ok"):
    args = _parse(argv)
    env = supervise.child_env()
    env["FAKE_MODE"] = mode
    return demo._run(args, env=env, **fake)


def test_demo_end_to_end_json(fake, capsys):
    assert _run_fake(fake, SMALL + ["--json"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert (s["requests"], s["succeeded"], s["failed"], s["mismatches"]) == (8, 8, 0, 0)
    assert s["rounds_max"] >= 10 and s["integrity"] == "OK"
    assert s["gbps"] > 0 and s["p99_ms"] >= s["p50_ms"] > 0
    assert set(s["kinds"]) == set(demo.KINDS)
    assert "encoder ready" in err and "language ready" in err


def test_demo_reports_rpc_failures(fake, capsys):
    assert _run_fake(fake, SMALL + ["--json"], mode="fail-multi10") == 1
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert s["failed"] == 2 and s["succeeded"] == 6
    assert all(e["code"] == "RESOURCE_EXHAUSTED" for e in s["errors"])
    assert "RESOURCE_EXHAUSTED" in err and "pool too small" in err


def test_demo_reports_mismatches_in_the_table(fake, capsys):
    assert _run_fake(fake, SMALL, mode="corrupt-small") == 1
    out, err = capsys.readouterr()
    assert "integrity   MISMATCH" in out and "multi10" in out and "GB/s" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("mismatches"))
    assert row.split()[-1] == "2"
    assert "MISMATCH: payload_sha256" in err


def test_demo_service_crash_before_ready(fake, capsys):
    t0 = time.monotonic()
    assert _run_fake(fake, SMALL, mode="crash-language") == 1
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err
    assert "language exited with code 3 before it was ready" in err
    assert "cannot register the pool with Mooncake" in err


def test_demo_service_startup_timeout(fake, capsys):
    t0 = time.monotonic()
    argv = SMALL[:-2] + ["--startup-timeout", "1"]
    assert _run_fake(fake, argv, mode="hang-encoder") == 1
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err
    assert "encoder did not report ready within 1 s" in err and "starting encoder" in err


def test_service_process_stop_kills_stubborn_child(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("EPD_READY {\\"role\\": \\"encoder\\", \\"port\\": 7}", flush=True)
        time.sleep(60)
    """)
    )
    svc = supervise.ServiceProcess("encoder", [sys.executable, str(script)])
    svc.start()
    assert svc.wait_ready(20)["port"] == 7
    t0 = time.monotonic()
    rc = svc.stop(timeout=0.5)
    svc.close()
    assert rc == -9 and time.monotonic() - t0 < 5
