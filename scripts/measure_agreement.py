"""Per-request cost of the ranks' agreement step, for 1, 2 and 3 language ranks.

Starts an encoder and a language instance per TP size (real processes, Mooncake TCP on
loopback), sends N sequential small requests (64 tokens: the transfer itself is negligible),
and prints p50/p99 of `GenerateReply.agreement_seconds` (rank 0 holding the payload -> agreed
decision) and of the client-side latency.

Usage: MC_FORCE_TCP=1 python scripts/measure_agreement.py [--requests 200] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from common.pb.epd.v1 import language_pb2
from tests.conftest import Pair, language_stub


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def measure(address: str, requests: int, tokens: int) -> tuple[list[float], list[float]]:
    stub = language_stub(address)
    agree, latency = [], []
    for i in range(requests + 10):
        t = time.perf_counter()
        reply = await stub.Generate(
            language_pb2.GenerateRequest(synthetic_tokens=tokens, synthetic_seed=i)
        )
        if i >= 10:  # warm-up
            latency.append((time.perf_counter() - t) * 1000)
            agree.append(reply.agreement_seconds * 1000)
    return agree, latency


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print(
        f"{'ranks':>5} {'agree p50 ms':>13} {'agree p99 ms':>13} {'latency p50 ms':>15} {'latency p99 ms':>15}"
    )
    for tp in (1, 2, 3):
        pair = Pair(
            hidden=1024,
            language_blocks=64,
            initial_tokens=1024,
            encoder_blocks=256,
            language_args=("--tp", str(tp)),
        )
        try:
            agree, latency = asyncio.run(measure(pair.language.address, args.requests, args.tokens))
        finally:
            pair.stop()
        print(
            f"{tp:>5} {statistics.median(agree):>13.2f} {pct(agree, 99):>13.2f} "
            f"{statistics.median(latency):>15.2f} {pct(latency, 99):>15.2f}"
        )


if __name__ == "__main__":
    main()
