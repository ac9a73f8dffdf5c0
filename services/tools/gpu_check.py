"""`make gpu-check`: the GPU path verified on a CUDA host in one command, in under ten minutes.

Run by scripts/gpu-check.sh, which finds the CUDA device and installs what is missing (never a
PyTorch over the host's). Each step below is bounded by its own time limit and by the whole
run's; a step that fails, or finds a part missing, is one line of the table, never a hang.

| step | what it proves |
|---|---|
| `environment` | a CUDA device and a CUDA PyTorch; Mooncake's version |
| `mooncake-cuda` | Mooncake registers CUDA memory (a build without CUDA support fails here) |
| `transfer-tcp` | both services with `--device` pools, over Mooncake TCP: a single-round, a multi-round and a larger-than-pool payload, digests equal to the independent reference |
| `transfer-unchecked` | the same with `--no-integrity` on both: no checksum reads the rows back before they are written out, so only the waits for the device (common/device.py) keep the digests equal |
| `integrity-gpu` | a write corrupted at the destination is refused by the checksums the language computes over its device pool (`DATA_LOSS`), and the next request passes |
| `transfer-rdma` | `transfer-tcp` over RDMA, when `/dev/infiniband` exists (else skipped) |
| `tp2-dummy-rank` | `--tp 2` on the one device, rank 1 a dummy rank: the ranks agree |
| `qwen-tiny` | the tiny Qwen2-VL encoder and prefill on the device: disaggregated == colocated |
| `qwen3-tiny` | the same with the tiny Qwen3-VL: its deepstack features filled on the device, sent as three more fields and injected by the prefill |
| `bench` | `epd bench --quick --cases single,multi,control` on device pools: the ratios |

Every step ends with every pool free (GetPool of both services).

`GPU_CHECK_DEVICE` (default `cuda:0`) picks the device; `cpu` rehearses every step on host
memory (how `make test` checks this module; the table then says it is no GPU check).
`GPU_CHECK_STEPS` runs a comma-separated subset. `GPU_CHECK_OUT` is where the JSON goes.
Exit status: 0 all passed (or skipped), 1 a step failed, 77 no CUDA device.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

NO_DEVICE = 77
TOTAL_BUDGET_S = 540.0  # the whole run, leaving room under ten minutes for set-up
HIDDEN = 256
BLOCK = 16
LANGUAGE_BLOCKS = 32  # 512 tokens
INITIAL_TOKENS = 128
SIZES = (100, 600, 2000)  # one round; two rounds; larger than the pool (several rounds)


@dataclass
class Check:
    check: str
    result: str = "pass"  # pass | fail | skip
    figure: str = ""
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Failed(Exception):
    """A step's finding: what failed, in one line."""


# ---------------------------------------------------------------------------- services


class Pair:
    """An encoder and a language process on 127.0.0.1 with pools on `device`."""

    def __init__(
        self,
        device: str,
        *,
        encoder: tuple[str, ...] = (),
        language: tuple[str, ...] = (),
        force_tcp: bool = True,
        fault_launcher: bool = False,
    ):
        from services.tools import supervise

        env = supervise.child_env()
        if not force_tcp:  # RDMA: Mooncake picks its transport by the protocol flag
            env.pop("MC_FORCE_TCP", None)

        common = ("--hidden", str(HIDDEN), "--block-size", str(BLOCK), "--device", device)
        module = "tests.faults.launch" if fault_launcher else supervise.SERVICE_MODULE
        self.group = supervise.ServiceGroup(
            [
                supervise.service_argv(
                    "encoder", *common, "--pool-blocks", "512", *encoder, module=module
                )
            ],
            lambda addresses: supervise.service_argv(
                "language",
                *common,
                "--pool-blocks",
                str(LANGUAGE_BLOCKS),
                "--initial-tokens",
                str(INITIAL_TOKENS),
                "--encoder",
                addresses[0],
                *language,
            ),
            env=env,
            ready_timeout=120,
        ).start()
        self.encoder = self.group.encoders[0].address
        assert self.group.language is not None
        self.language = self.group.language.address

    def stop(self) -> None:
        self.group.stop()


async def generate(address: str, n: int = 0, seed: int = 0, **fields: Any):
    import grpc

    from common.pb.epd.v1 import language_pb2, language_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await language_pb2_grpc.LanguageStub(channel).Generate(
            language_pb2.GenerateRequest(
                synthetic_tokens=n, synthetic_seed=seed, want_digest=True, **fields
            ),
            timeout=60,
        )


async def pools_free(pair: Pair) -> None:
    """Every pool of both services fully free (raises Failed naming the one that is not)."""
    import grpc

    from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2_grpc

    for address, stub_class in (
        (pair.encoder, encoder_pb2_grpc.EncoderStub),
        (pair.language, language_pb2_grpc.LanguageStub),
    ):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = stub_class(channel)
            for _ in range(50):  # blocks of a request that just ended come back promptly
                pool = await stub.GetPool(common_pb2.GetPoolRequest(), timeout=10)
                pools = [pool, *pool.rank_pools]
                if all(p.used_blocks == 0 and p.quarantined_blocks == 0 for p in pools):
                    break
                await asyncio.sleep(0.1)
            else:
                raise Failed(f"{address}: pool not free after the step: {pool}")


def rounds_for(n: int) -> int:
    return (
        1
        if n <= INITIAL_TOKENS
        else 1 + math.ceil((n - INITIAL_TOKENS) / (LANGUAGE_BLOCKS * BLOCK))
    )


async def transfers(pair: Pair, seed: int, integrity: bool = True) -> str:
    from services.tools.reference_payload import expected_digest

    rounds = []
    for n in SIZES:
        reply = await generate(pair.language, n, seed + n)
        if reply.payload_sha256 != expected_digest(n, seed + n, HIDDEN):
            raise Failed(f"{n} tokens: the payload differs from the reference")
        if reply.rounds != rounds_for(n) or reply.integrity_verified != integrity:
            raise Failed(f"{n} tokens: {reply.rounds} rounds, integrity {reply.integrity_verified}")
        rounds.append(reply.rounds)
    await pools_free(pair)
    return f"{len(SIZES)} payloads ({'/'.join(map(str, SIZES))} tokens) in {'/'.join(map(str, rounds))} rounds, digests equal"


# ---------------------------------------------------------------------------- steps


def step_environment(device: str, out: dict[str, Any]) -> str:
    import torch

    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda or ""
    out["mooncake"] = next(
        (
            v
            for d in ("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda")
            if (v := _version(d))
        ),
        "",
    )
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise Failed("torch.cuda.is_available() is False")
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        out["gpu"] = "none (rehearsal on host memory)"
    return f"torch {out['torch']} (CUDA {out['torch_cuda'] or '-'}), {out['gpu']}, Mooncake {out['mooncake'] or '?'}"


def _version(dist: str) -> str:
    """The installed version of a distribution, "" when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


PROBE = """
import sys, torch
from common.transport import MooncakeTransport, memory_location
device = sys.argv[1]
t = MooncakeTransport("127.0.0.1", "tcp")
buf = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
t.register(buf.data_ptr(), buf.numel(), memory_location(device))
t.close()
print("registered", memory_location(device))
"""


def step_mooncake(device: str) -> str:
    """In a child process: a Mooncake engine of a build without CUDA may crash or hang on
    CUDA memory, which must not take the check with it."""
    from services.tools import supervise

    done = subprocess.run(
        [sys.executable, "-c", PROBE, device],
        capture_output=True,
        text=True,
        timeout=60,
        env=supervise.child_env(),
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Failed(
            f"Mooncake cannot register {device} memory (a build without CUDA support?): "
            + " | ".join(tail)
        )
    return done.stdout.strip().splitlines()[-1]


async def step_transfer(device: str, protocol: str, integrity: bool = True) -> str:
    flags = ("--protocol", protocol, "--integrity" if integrity else "--no-integrity")
    pair = await asyncio.to_thread(
        Pair, device, encoder=flags, language=flags, force_tcp=protocol == "tcp"
    )
    try:
        return await transfers(pair, seed=1, integrity=integrity)
    finally:
        await asyncio.to_thread(pair.stop)


async def step_integrity(device: str) -> str:
    import grpc

    pair = await asyncio.to_thread(
        Pair,
        device,
        encoder=("--transport-fault", "corrupt_nth=1"),
        fault_launcher=True,
    )
    try:
        try:
            await generate(pair.language, 300, 7)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.DATA_LOSS:
                raise Failed(f"a corrupted write gave {e.code().name}: {e.details()}") from None
        else:
            raise Failed("a corrupted write was delivered")
        await pools_free(pair)
        await transfers(pair, seed=2)
        return f"corrupted write refused (DATA_LOSS) by checksums over the {device} pool; next payloads intact"
    finally:
        await asyncio.to_thread(pair.stop)


async def step_tp2(device: str) -> str:
    from services.tools.reference_payload import expected_digest

    pair = await asyncio.to_thread(Pair, device, language=("--tp", "2", "--data-ranks", "0"))
    try:
        for n in (300, 1000):
            reply = await generate(pair.language, n, n)
            want = expected_digest(n, n, HIDDEN)
            got = [(r.rank, r.data_rank, r.payload_sha256) for r in reply.ranks]
            if got != [(0, True, want), (1, False, "")]:
                raise Failed(f"{n} tokens: ranks reported {got}")
        await pools_free(pair)
        return "2 ranks on one device (rank 1 dummy) agreed; rank 0's payloads equal the reference"
    finally:
        await asyncio.to_thread(pair.stop)


QWEN_HIDDEN = 64
BF16_TOLERANCE = 5e-2


async def step_qwen(device: str, model: str = "tiny") -> str:
    """A tiny model's encoder and prefill consumer on the device, against a colocated run on the
    host (`tiny`: Qwen2-VL; `tiny-qwen3`: Qwen3-VL, whose deepstack fields travel too)."""
    import torch

    from common.config import describe_model
    from common.pb.epd.v1 import common_pb2
    from services.encoder.models import EncodeInputs
    from services.language.consumers import QwenPrefill
    from services.models import qwen, qwen_weights
    from services.tools.demo._images import make_image

    images = [(make_image(448, 160, "png", seed=1), "image/png")]
    text = "Describe <image>."
    flags = ("--hidden", str(QWEN_HIDDEN), "--model", model)
    consumer = describe_model("model", model, QWEN_HIDDEN).family.consumer
    pair = await asyncio.to_thread(
        Pair,
        device,
        encoder=(*flags, "--max-request-tokens", "4096"),
        language=(*flags, "--consumer", consumer),
    )
    try:
        reply = await generate(
            pair.language,
            images=[common_pb2.Image(data=d, mime_type=m) for d, m in images],
            text=text,
        )
        await pools_free(pair)
    finally:
        await asyncio.to_thread(pair.stop)

    def colocated():
        full = qwen_weights.load_qwen(model, QWEN_HIDDEN)
        enc, prefill = qwen.QwenEncoderModel(full), QwenPrefill(full)
        out = enc.encode(EncodeInputs(tuple(images), text))
        return prefill.prefill(
            out.embeddings.to(torch.bfloat16),
            out.positions.to(torch.int32),
            out.token_ids,
            [d.to(torch.bfloat16) for d in out.deepstack],
        )

    local = await asyncio.to_thread(colocated)
    lg = reply.logits
    far = max(abs(a - b) for a, b in zip(lg.top_logits, local.top_logits))
    if lg.prefill_tokens != reply.total_tokens or far > BF16_TOLERANCE:
        raise Failed(
            f"disaggregated top logits differ from colocated by {far:.3g} "
            f"(tolerance {BF16_TOLERANCE}); first token {reply.first_token_id} vs {local.first_token_id}"
        )
    return (
        f"{reply.total_tokens} tokens in {reply.rounds} round(s); first token {reply.first_token_id} "
        f"(colocated on the host: {local.first_token_id}); top logits within {far:.2g}"
    )


def step_bench(device: str, out: dict[str, Any]) -> str:
    from services.tools import supervise

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.tools.cli",
            "bench",
            "--quick",
            "--cases",
            "single,multi,control",
            "--sizes",
            "1024,8192",
            f"--encoder-arg=--device={device}",
            f"--language-arg=--device={device}",
            "--json",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=supervise.child_env(),
    )
    if done.returncode != 0:
        raise Failed("epd bench failed: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
    cases = json.loads(done.stdout)["cases"]
    out["bench_cases"] = cases
    shown = [
        c for c in cases if c["name"].startswith(("single_round_ratio", "round_extra", "control"))
    ]
    return "; ".join(f"{c['name']} {c['value']:.3g} ({c['goal']})" for c in shown)


# ---------------------------------------------------------------------------- the run


STEPS = (
    "environment",
    "mooncake-cuda",
    "transfer-tcp",
    "transfer-unchecked",
    "integrity-gpu",
    "transfer-rdma",
    "tp2-dummy-rank",
    "qwen-tiny",
    "qwen3-tiny",
    "bench",
)
STEP_LIMIT_S = {"qwen-tiny": 150.0, "qwen3-tiny": 150.0, "bench": 300.0}


def run(device: str, steps: list[str], out_path: str) -> int:
    started = time.monotonic()
    report: dict[str, Any] = {
        "device": device,
        "rehearsal": not device.startswith("cuda"),
        "checks": [],
    }
    rdma = os.path.exists("/dev/infiniband")
    actions: dict[str, Callable[[], Any]] = {
        "environment": lambda: step_environment(device, report),
        "mooncake-cuda": lambda: step_mooncake(device),
        "transfer-tcp": lambda: step_transfer(device, "tcp"),
        "transfer-unchecked": lambda: step_transfer(device, "tcp", integrity=False),
        "integrity-gpu": lambda: step_integrity(device),
        "transfer-rdma": lambda: step_transfer(device, "rdma"),
        "tp2-dummy-rank": lambda: step_tp2(device),
        "qwen-tiny": lambda: step_qwen(device),
        "qwen3-tiny": lambda: step_qwen(device, "tiny-qwen3"),
        "bench": lambda: step_bench(device, report),
    }
    for name in steps:
        check = Check(name)
        left = TOTAL_BUDGET_S - (time.monotonic() - started)
        limit = min(STEP_LIMIT_S.get(name, 120.0), left)
        t0 = time.monotonic()
        if name == "transfer-rdma" and not rdma:
            check.result, check.figure = "skip", "no /dev/infiniband: no RDMA NIC on this host"
        elif limit <= 5:
            check.result, check.figure = "fail", "not run: the ten-minute budget is spent"
        else:
            try:
                outcome = actions[name]()
                if isinstance(outcome, Awaitable):
                    outcome = asyncio.run(_bounded(outcome, limit))
                check.figure = str(outcome)
            except Failed as e:
                check.result, check.figure = "fail", str(e)
            except (TimeoutError, subprocess.TimeoutExpired):
                check.result, check.figure = "fail", f"no answer within {limit:.0f} s"
            except Exception as e:  # noqa: BLE001 - any surprise is this step's failure, on its line
                check.result, check.figure = "fail", f"{type(e).__name__}: {str(e)[:300]}"
        check.seconds = round(time.monotonic() - t0, 1)
        report["checks"].append(asdict(check))
        print_row(check)
        if name == "environment" and check.result == "fail":
            break  # nothing else can run
    failed = [c["check"] for c in report["checks"] if c["result"] == "fail"]
    report["ok"] = not failed
    report["seconds"] = round(time.monotonic() - started, 1)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"gpu-check: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"in {report['seconds']:.0f} s; results in {out_path}"
        + (" (rehearsal on host memory: not a GPU check)" if report["rehearsal"] else "")
    )
    return 1 if failed else 0


async def _bounded(work: Awaitable[Any], limit: float) -> Any:
    return await asyncio.wait_for(work, limit)


def print_row(check: Check) -> None:
    print(f"  {check.check:<18} {check.result:<5} {check.figure}", flush=True)


def main(argv: list[str] | None = None) -> int:
    device = os.environ.get("GPU_CHECK_DEVICE", "cuda:0")
    steps = [s for s in os.environ.get("GPU_CHECK_STEPS", ",".join(STEPS)).split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"gpu-check: unknown step(s) {unknown}; known: {list(STEPS)}", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device")
            return NO_DEVICE
    print(f"gpu-check on {device}" + (" (rehearsal on host memory)" if device == "cpu" else ""))
    print(f"  {'check':<18} {'result':<5} figure")
    return run(device, steps, os.environ.get("GPU_CHECK_OUT", "gpu-check.json"))


if __name__ == "__main__":
    sys.exit(main())
