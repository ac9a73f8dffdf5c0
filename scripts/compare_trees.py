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
from services.tools import demo


def start(tree: str, role: str, *args: str) -> demo.ServiceProcess:
    argv = [
        sys.executable,
        "-m",
        "services.tools.cli",
        role,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-level",
        "WARNING",
        *args,
    ]
    p = demo.ServiceProcess(role, argv, env={**os.environ, "MC_FORCE_TCP": "1", "PYTHONPATH": tree})
    p.start()
    p.wait_ready(120)
    return p


async def run(
    tree: str, lang_blocks: int, sizes: list[int], repeats: int
) -> dict[int, tuple[float, float, int]]:
    enc = start(tree, "encoder", "--hidden", "3584", "--pool-blocks", "200")
    lang = start(
        tree,
        "language",
        "--hidden",
        "3584",
        "--pool-blocks",
        str(lang_blocks),
        "--encoder",
        f"127.0.0.1:{enc.port}",
        "--initial-tokens",
        str(lang_blocks * 128),
    )
    out = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{lang.port}") as ch:
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
        lang.stop()
        enc.stop()
    return out


async def main(tree: str, label: str) -> None:
    single = await run(tree, 80, [64, 256, 1024, 4096, 8192], 15)
    multi = await run(tree, 8, [4096, 8192], 10)
    print(json.dumps({"label": label, "single": single, "multi": multi}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
