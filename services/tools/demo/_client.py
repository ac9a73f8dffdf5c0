"""The demo's client: sends the workload to the language over gRPC (grpc.aio), bounded in flight."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence

from services.tools.demo._report import Progress
from services.tools.demo._results import RequestResult
from services.tools.demo._workload import PlannedRequest, image_payloads


class _BlockBudget:
    """Keeps the blocks of in-flight requests within the encoder's source pool, so the demo does
    not overcommit the encoder with several 10x-pool requests at once (one request is always
    admitted when nothing else is in flight)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int):
        if not self.capacity:
            yield
            return
        capacity = self.capacity
        amount = min(amount, capacity)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + amount <= capacity)
            self.used += amount
        try:
            yield
        finally:
            async with self._cond:
                self.used -= amount
                self._cond.notify_all()


async def run_workload(
    address: str,
    plan: Sequence[PlannedRequest],
    *,
    concurrency: int = 8,
    request_timeout: float = 300.0,
    block_size: int = 128,
    encoder_pool_blocks: int | None = None,
    progress: Progress | None = None,
    connect_timeout: float = 30.0,
    images: dict[str, list[tuple[bytes, str]]] | None = None,
    sec=None,
) -> tuple[list[RequestResult], float]:
    """Send every planned request to the language service at `address` with up to
    `concurrency` in flight. Returns the results (in plan order) and the wall time in seconds
    from the first send to the last reply. Does not verify digests (see `verify_results`)."""
    import grpc

    from common.pb.epd.v1 import language_pb2, language_pb2_grpc

    results = [RequestResult(request=p) for p in plan]
    sem = asyncio.Semaphore(max(1, concurrency))
    budget = _BlockBudget(encoder_pool_blocks)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    from services.edge.security import ClientSecurity

    # `sec`: TLS / the token of the demo's --tls-* / --auth-token-file flags (plaintext when None).
    async with (sec or ClientSecurity()).aio_channel(address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=connect_timeout)
        stub = language_pb2_grpc.LanguageStub(channel)

        async def one(result: RequestResult) -> None:
            p = result.request
            if p.kind == "image":
                from common.pb.epd.v1 import common_pb2

                data = (images or {}).get(p.request_id) or image_payloads(p)
                request = language_pb2.GenerateRequest(
                    request_id=p.request_id,
                    text=p.text,
                    want_digest=True,
                    images=[common_pb2.Image(data=d, mime_type=m) for d, m in data],
                )
            else:
                request = language_pb2.GenerateRequest(
                    request_id=p.request_id,
                    synthetic_tokens=p.tokens,
                    synthetic_seed=p.seed,
                    want_digest=True,
                )
            async with sem, budget.hold(math.ceil(p.tokens / block_size)):
                t0 = time.perf_counter()
                try:
                    reply = await stub.Generate(request, timeout=request_timeout)
                except grpc.aio.AioRpcError as e:
                    result.latency_s = time.perf_counter() - t0
                    result.error_code = e.code().name if e.code() is not None else "UNKNOWN"
                    result.error_message = e.details() or ""
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any client-side failure is a failure
                    result.latency_s = time.perf_counter() - t0
                    result.error_code = "CLIENT_ERROR"
                    result.error_message = f"{type(e).__name__}: {e}"
                else:
                    result.latency_s = time.perf_counter() - t0
                    result.rpc_ok = True
                    result.total_tokens = int(reply.total_tokens)
                    result.rounds = int(reply.rounds)
                    result.bytes = int(reply.bytes)
                    result.transfer_seconds = float(reply.transfer_seconds)
                    result.total_seconds = float(reply.total_seconds)
                    result.integrity_verified = bool(reply.integrity_verified)
                    result.payload_sha256 = reply.payload_sha256
                    result.rank_sha256 = [
                        (r.rank, r.payload_sha256) for r in reply.ranks if r.data_rank
                    ]
                    result.first_token_id = int(reply.first_token_id)
                    result.encoder = reply.encoder
                    result.attempts = int(reply.attempts)
                    result.failed_over_from = reply.failed_over_from
                    result.consumer = reply.consumer
                    if reply.HasField("logits"):
                        lg = reply.logits
                        result.top_token_ids = list(lg.top_token_ids)
                        result.top_logits = list(lg.top_logits)
                        result.logits_norm = lg.norm
                        result.prefill_seconds = lg.prefill_seconds
                        result.prefill_skipped = lg.skipped
                        result.position_delta = lg.mrope_position_delta
            if progress is not None:
                progress.advance(failed=not result.rpc_ok)

        async def tick(progress: Progress) -> None:  # the elapsed time moves during long requests
            while True:
                await asyncio.sleep(0.5)
                progress.draw()

        ticker = (
            asyncio.create_task(tick(progress))
            if progress is not None and progress.enabled
            else None
        )
        t_start = time.perf_counter()
        try:
            await asyncio.gather(*(one(r) for r in results))
        finally:
            wall = time.perf_counter() - t_start
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
    return results, wall


def event_loop_runner() -> asyncio.Runner:
    """A runner on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
