"""Before/after of a data-path change: the same workload against one source tree's services.

Usage (run it once per tree, alternately, so both see the same machine noise):

    cd TREE && MC_FORCE_TCP=1 /path/to/.venv/bin/python /path/to/scripts/compare_trees.py TREE LABEL

Starts an encoder and a language service from TREE (hidden 3584 bf16) and prints one JSON line:
p50 `transfer_seconds` and client latency (ms) and rounds for single-round requests of 64..8192
tokens (80-block language pool) and multi-round ones (8-block pool: 1024-token rounds).
docs/BENCHMARKS.md shows its output for the tree before and after the data-path work.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc

from common.pb.epd.v1 import language_pb2, language_pb2_grpc
from services.tools.supervise import ServiceGroup, service_argv


def _module(tree: str) -> str:
    """The `epd` entry module of TREE (older trees kept it at services/cli.py)."""
    new = pathlib.Path(tree, "services", "tools", "cli.py").exists()
    return "services.tools.cli" if new else "services.cli"


async def run(
    tree: str, lang_blocks: int, sizes: list[int], repeats: int
) -> dict[int, tuple[float, float, int]]:
    module = _module(tree)
    quiet = ("--log-level", "WARNING", "--hidden", "3584")
    services = ServiceGroup(
        [service_argv("encoder", *quiet, "--pool-blocks", "200", module=module)],
        lambda encoders: service_argv(
            "language",
            *quiet,
            "--pool-blocks",
            str(lang_blocks),
            "--encoder",
            encoders[0],
            "--initial-tokens",
            str(lang_blocks * 128),
            module=module,
        ),
        env={**os.environ, "MC_FORCE_TCP": "1", "PYTHONPATH": tree},
        ready_timeout=120,
    ).start()
    assert services.language is not None
    out = {}
    try:
        async with grpc.aio.insecure_channel(services.language.address) as ch:
            stub = language_pb2_grpc.LanguageStub(ch)
            for n in sizes:
                for _ in range(3):
                    await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=n))
                transfer, total = [], []
                for _ in range(repeats):
                    t = time.perf_counter()
                    r = await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=n))
                    total.append(time.perf_counter() - t)
                    transfer.append(r.transfer_seconds)
                out[n] = (
                    statistics.median(transfer) * 1e3,
                    statistics.median(total) * 1e3,
                    r.rounds,
                )
    finally:
        services.stop()
    return out


async def main(tree: str, label: str) -> None:
    single = await run(tree, 80, [64, 256, 1024, 4096, 8192], 15)
    multi = await run(tree, 8, [4096, 8192], 10)
    print(json.dumps({"label": label, "single": single, "multi": multi}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
