"""gRPC adapter: one language rank's view of one encoder (the `EncoderLink` of receiver.py).

One channel and stub per encoder, reused by every request. gRPC errors become domain errors
(`services.edge.rpc.error_from_rpc`); Status messages become `StatusUpdate`s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import errors
from common.layout import PoolGeometry
from common.pb.epd.v1 import bench_pb2, bench_pb2_grpc, common_pb2, encoder_pb2, encoder_pb2_grpc
from common.states import FailureReason, StatusUpdate, TransferState
from services.edge import rpc
from services.language.receive_options import CarriedInit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """What an Encode returned."""

    total_tokens: int
    cached_images: frozenset[int] = frozenset()
    """Images whose rows came from the encoder's embedding cache (EncodeReply.cached_images)."""
    returned_at: float = 0.0
    """time.monotonic() when the reply was read off the call: on an EncodeStream rank 0's receive
    may finish before the front door gets to the reply, so the reply's own arrival dates it."""


class GrpcEncoderLink:
    def __init__(self, address: str, language_id: str, sec: rpc.ClientSecurity | None = None):
        self.address = address
        self.language_id = language_id
        # TLS (mutual with a client certificate), the bearer token on every call and the message
        # size limit all come with `sec` (services/edge/security.py); plaintext when None.
        self.channel = (sec or rpc.ClientSecurity()).aio_channel(address, options=RECONNECT_OPTIONS)
        self.stub = encoder_pb2_grpc.EncoderStub(self.channel)
        self.bench = bench_pb2_grpc.BenchStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.encoder_id = ""
        self.model_fingerprint = ""  # RegisterReply.model_fingerprint: keys the image rows it makes
        self._registration: tuple[int, str, PoolGeometry, Prove] | None = None
        # Whether the encoder serves EncodeStream (None: not known yet; False after UNIMPLEMENTED).
        self.streams_encode: bool | None = None
        self._registering: asyncio.Lock | None = None  # made on first use, in the running loop

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, what: str, coro):
        try:
            return await coro
        except grpc.aio.AioRpcError as e:
            raise rpc.error_from_rpc(e, f"{what} on encoder {self.address}") from None

    async def register(
        self, rank: int, session: str, geometry: PoolGeometry, prove: Prove, timeout: float = 10.0
    ) -> None:
        """Challenge, put the nonce into the pool's proof areas (`prove`), Register with it: the
        encoder reads it back through Mooncake before it accepts the pool
        (services/encoder/possession.py)."""
        # Remembered before the call: an Init to an encoder this rank could not reach at start-up
        # registers then (NOT_REGISTERED below).
        self._registration = (rank, session, geometry, prove)
        self.streams_encode = None  # a restarted encoder may be another version: ask again
        if self._registering is None:
            self._registering = asyncio.Lock()
        try:
            # One at a time: a second Challenge for the same rank replaces the first's nonce (the
            # background registration and a request's re-registration may meet here).
            async with self._registering:
                challenge = await self._call(
                    "Challenge",
                    self.stub.Challenge(
                        encoder_pb2.ChallengeRequest(language_id=self.language_id, rank=rank),
                        timeout=timeout,
                        wait_for_ready=True,
                    ),
                )
                async with prove(challenge.nonce):
                    reply = await self._call(
                        "Register",
                        self.stub.Register(
                            encoder_pb2.RegisterRequest(
                                language_id=self.language_id,
                                rank=rank,
                                session=session,
                                layout=rpc.geometry_to_pb(geometry),
                                proof_nonce=challenge.nonce,
                            ),
                            timeout=timeout,
                            wait_for_ready=True,
                        ),
                    )
        except (
            errors.DeadlineExceeded
        ) as e:  # say why it could not connect (e.g. a TLS handshake refused)
            raise errors.DeadlineExceeded(e.message + await self._connect_problem()) from None
        self.encoder_id = reply.encoder_id
        self.model_fingerprint = reply.model_fingerprint

    async def _connect_problem(self) -> str:
        """Why the channel cannot connect, as ' (cannot connect: ...)', or '' when it can. A call
        without wait_for_ready fails at once with the reason (a wait_for_ready call only times out)."""
        try:
            await self.health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return ""
        except grpc.aio.AioRpcError as e:
            return (
                f" (cannot connect: {e.details()})"
                if e.code() == grpc.StatusCode.UNAVAILABLE
                else ""
            )

    async def load(self, timeout: float = 1.0) -> tuple[bool, int, int, int, int]:
        """(serving, free source blocks, used, waiters, live transfers): the live view's poll.
        Raises a domain error when the encoder cannot be reached within `timeout`."""
        check = await self._call(
            "Health.Check",
            self.health.Check(
                health_pb2.HealthCheckRequest(service="epd.v1.Encoder"), timeout=timeout
            ),
        )
        if check.status != health_pb2.HealthCheckResponse.SERVING:
            return False, 0, 0, 0, 0
        pool, diag = await asyncio.gather(
            self._call("GetPool", self.stub.GetPool(common_pb2.GetPoolRequest(), timeout=timeout)),
            self._call(
                "GetDiagnostics",
                self.stub.GetDiagnostics(common_pb2.GetDiagnosticsRequest(), timeout=timeout),
            ),
        )
        return True, pool.free_blocks, pool.used_blocks, pool.waiters, diag.live_transfers

    def encode_request(
        self,
        request_id: str,
        images: Sequence[tuple[bytes, str]],
        text: str,
        synthetic_tokens: int,
        synthetic_seed: int,
        rank_count: int,
        init: CarriedInit | None = None,
        cache_scope: str = "",
        announce_size: bool = False,
    ) -> encoder_pb2.EncodeRequest:
        """The EncodeRequest, carrying `init` (EncodeRequest.init) when given; `announce_size`:
        EncodeRequest.announce_size (the size-first `auto` policy)."""
        request = encoder_pb2.EncodeRequest(
            request_id=request_id,
            images=[common_pb2.Image(data=d, mime_type=m) for d, m in images],
            text=text,
            synthetic_tokens=synthetic_tokens,
            synthetic_seed=synthetic_seed,
            rank_count=rank_count,
            language_id=self.language_id,
            cache_scope=cache_scope,
            announce_size=announce_size,
        )
        if init is not None:
            request.init.CopyFrom(
                self._init_request(
                    init.request_id,
                    init.rank,
                    init.rank_count,
                    init.blocks,
                    init.allocated_tokens,
                    init.progress_tokens,
                    init.held_images,
                )
            )
        return request

    async def encode(
        self, request: encoder_pb2.EncodeRequest, init: CarriedInit | None = None
    ) -> Encoded:
        """The Encode (`encode_request`): settles `init`, the Init it carries, with whether the
        encoder took it once the Encode returned (left pending when the Encode fails)."""
        call = self.stub.Encode(request, wait_for_ready=True)  # bounded by the Generate and by Init
        if init is not None:
            init.issued()  # the rank may open its Status stream now (StatusRequest.await_transfer)
        try:
            reply = await self._call("Encode", call)
        except errors.FailedPrecondition as e:
            await self._register_again(e, request.request_id)
            reply = await self._call("Encode", self.stub.Encode(request))
        return self.encoded(reply, init)

    def encoded(self, reply: encoder_pb2.EncodeReply, init: CarriedInit | None) -> Encoded:
        """What an Encode's reply says, its carried Init settled."""
        if init is not None:
            if reply.init_error:
                log.info(
                    "request %s: encoder %s refused the Init carried by the Encode (%s); sending it on its own",
                    reply.request_id,
                    self.address,
                    reply.init_error,
                )
            init.settle(reply.init_applied)
        return Encoded(reply.total_tokens, frozenset(reply.cached_images), time.monotonic())

    def encode_exchange(
        self, request: encoder_pb2.EncodeRequest, init: CarriedInit | None = None
    ) -> EncodeExchange:
        """The Encode and rank 0's Status stream in one call (Encoder.EncodeStream), or in two
        (Encode, then Status) with an encoder that does not serve it."""
        return EncodeExchange(self, request, init)

    def _init_request(
        self,
        request_id: str,
        rank: int,
        rank_count: int,
        blocks: Sequence[int],
        allocated_tokens: int,
        progress_tokens: int,
        held_images: Sequence[str] = (),
    ) -> encoder_pb2.InitRequest:
        return encoder_pb2.InitRequest(
            request_id=request_id,
            language_id=self.language_id,
            rank=rank,
            rank_count=rank_count,
            dst_blocks=list(blocks),
            allocated_tokens=allocated_tokens,
            progress_tokens=progress_tokens,
            held_images=list(held_images),
        )

    async def init(
        self,
        request_id: str,
        rank: int,
        rank_count: int,
        blocks: Sequence[int],
        allocated_tokens: int,
        progress_tokens: int = 0,
        held_images: Sequence[str] = (),
    ) -> None:
        request = self._init_request(
            request_id, rank, rank_count, blocks, allocated_tokens, progress_tokens, held_images
        )
        try:
            # The first call of a request waits (boundedly) for a reconnecting channel, e.g. to
            # an encoder that was just restarted; the calls after it find the channel ready.
            await self._call(
                "Init", self.stub.Init(request, wait_for_ready=True, timeout=CONNECT_TIMEOUT_S)
            )
        except (
            errors.DeadlineExceeded
        ) as e:  # the encoder never became reachable: it is lost, not slow
            raise errors.Unavailable(e.message, reason=FailureReason.PEER_LOST) from None
        except errors.FailedPrecondition as e:
            await self._register_again(e, request_id)
            await self._call("Init", self.stub.Init(request))

    async def _register_again(self, e: errors.FailedPrecondition, request_id: str) -> None:
        """A restarted encoder has forgotten this instance (the error's machine-readable reason
        says so, whatever its message): register again, so the caller retries once. Re-raises
        any other refusal."""
        if e.error_reason != errors.NOT_REGISTERED or self._registration is None:
            raise e
        log.info(
            "request %s: encoder %s no longer knows this instance (NOT_REGISTERED): registering again",
            request_id,
            self.address,
        )
        await self.register(*self._registration)

    async def resume(
        self,
        request_id: str,
        rank: int,
        sent_tokens: int,
        blocks: Sequence[int],
        allocated_tokens: int,
    ) -> bool:
        reply = await self._call(
            "Resume",
            self.stub.Resume(
                encoder_pb2.ResumeRequest(
                    request_id=request_id,
                    language_id=self.language_id,
                    rank=rank,
                    sent_tokens=sent_tokens,
                    dst_blocks=list(blocks),
                    allocated_tokens=allocated_tokens,
                )
            ),
        )
        return reply.duplicate

    def status(self, request_id: str, rank: int, await_transfer: bool = False) -> StatusStream:
        return StatusStream(
            self.stub.Status(
                encoder_pb2.StatusRequest(
                    request_id=request_id,
                    rank=rank,
                    language_id=self.language_id,
                    await_transfer=await_transfer,
                )
            ),
            f"Status of request {request_id} on encoder {self.address}",
        )

    async def cancel(
        self, request_id: str, reason: str, failure: FailureReason = FailureReason.CANCELLED
    ) -> bool:
        """Cancel the transfer on the encoder, which then fails it with `failure`; its answer's
        `writes_ended` (the write fence)."""
        reply = await self._call(
            "Cancel",
            self.stub.Cancel(
                common_pb2.CancelRequest(
                    request_id=request_id,
                    reason=reason,
                    language_id=self.language_id,
                    failure=rpc.reason_to_pb(failure),
                ),
                timeout=10,
            ),
        )
        return reply.writes_ended

    async def raw_write(
        self,
        rank: int,
        blocks: Sequence[int],
        tokens: int,
        repeats: int,
        concurrency: int,
        write_wait: str = "",
    ) -> bench_pb2.RawWriteReply:
        """epd bench: the encoder writes into `blocks` with plain Mooncake writes, timed."""
        return await self._call(
            "RawWrite",
            self.bench.RawWrite(
                bench_pb2.RawWriteRequest(
                    language_id=self.language_id,
                    rank=rank,
                    dst_blocks=list(blocks),
                    tokens=tokens,
                    repeats=repeats,
                    concurrency=concurrency,
                    write_wait=write_wait,
                ),
                timeout=300,
            ),
        )


CONNECT_TIMEOUT_S = 5.0
# Reconnect to a restarted encoder within ~2 s instead of gRPC's default backoff of up to 120 s.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.min_reconnect_backoff_ms", 200),
    # A cut network link breaks a call within ~5 s (HTTP/2 pings while calls are
    # open) instead of leaving a Status stream or Resume hanging until TCP gives up.
    # The encoder's server allows these pings (services/edge/rpc.py SERVER_OPTIONS).
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
]
_END = object()
# Register's proof: given the Challenge nonce, an async context inside which the nonce sits in
# the pool's proof area (common/pool.py BlockPool.proving).
Prove = Callable[[bytes], AbstractAsyncContextManager[None]]


class _QueuedStatuses:
    """Statuses that a reader task puts on a queue, as a StatusSource: TransferStatus messages
    (or StatusUpdates), then _END, the call's AioRpcError or an EpdError."""

    def __init__(self, queue: asyncio.Queue, what: str):
        self._queue = queue
        self._what = what
        self._ended = False

    def __aiter__(self) -> _QueuedStatuses:
        return self

    async def __anext__(self) -> StatusUpdate:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, grpc.aio.AioRpcError):
            self._ended = True
            raise rpc.error_from_rpc(item, self._what, stream=True)
        if isinstance(item, errors.EpdError):
            self._ended = True
            raise item
        if isinstance(item, StatusUpdate):
            return item
        return status_from_pb(item)


class StatusStream(_QueuedStatuses):
    """A Status stream read by its own task, so that cancelling the consumer (the receive task)
    does not cancel the RPC: the receiver first sends Cancel, then closes the stream, and the
    encoder records `cancelled` rather than a lost peer."""

    def __init__(self, call, what: str):
        super().__init__(asyncio.Queue(), what)
        self._call = call
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for pb in self._call:
                self._queue.put_nowait(pb)
            self._queue.put_nowait(_END)
        except grpc.aio.AioRpcError as e:
            self._queue.put_nowait(e)

    def close(self) -> None:
        self._ended = True
        self._reader.cancel()
        self._call.cancel()


class EncodeExchange:
    """One Encode and rank 0's statuses of its transfer, on one EncodeStream call read by its own
    task: `encoded()` is the Encode's reply; `statuses` is rank 0's Status stream (a
    StatusSource, which a link wrapper may replace). `statuses.close()` before the reply came
    lets the call run until it comes; `cancel()` ends everything.

    An encoder that does not serve EncodeStream (UNIMPLEMENTED, before anything came) gets the
    two calls instead, and the link remembers not to ask again. A restarted encoder that no
    longer knows this instance (NOT_REGISTERED) is registered with again, and the call made once
    more, as for Encode."""

    def __init__(
        self,
        link: GrpcEncoderLink,
        request: encoder_pb2.EncodeRequest,
        init: CarriedInit | None,
    ):
        self._link = link
        self._request = request
        self._init = init
        loop = asyncio.get_running_loop()
        self._encoded: asyncio.Future[Encoded] = loop.create_future()
        self._encoded.add_done_callback(_retrieved)
        self._what = f"EncodeStream of request {request.request_id} on encoder {link.address}"
        self._queue: asyncio.Queue = asyncio.Queue()
        self._calls: list[Any] = []
        self._statuses = _ExchangeStatuses(self)
        self.statuses: Any = self._statuses
        """Rank 0's statuses: what Status(request_id, rank 0, await_transfer) would stream (a
        StatusSource; a link wrapper may put its own around it)."""
        self._reader = asyncio.ensure_future(self._read())

    async def encoded(self) -> Encoded:
        return await asyncio.shield(self._encoded)

    def cancel(self) -> None:
        self._reader.cancel()
        for call in self._calls:
            call.cancel()
        if not self._encoded.done():
            self._encoded.cancel()
        # A receive still reading the statuses learns that none will come.
        self._queue.put_nowait(errors.Cancelled(f"{self._what}: given up"))

    async def _read(self) -> None:
        link, request = self._link, self._request
        registered_again = False
        try:
            while True:
                if link.streams_encode is False:
                    return await self._two_calls()
                call = link.stub.EncodeStream(request, wait_for_ready=True)
                self._calls.append(call)
                if self._init is not None:
                    self._init.issued()
                try:
                    async for update in call:
                        if update.HasField("encoded"):
                            link.streams_encode = True
                            self._encoded.set_result(link.encoded(update.encoded, self._init))
                            if self._statuses.closed:
                                return  # nobody reads the statuses any more
                        else:
                            self._queue.put_nowait(update.status)
                    self._queue.put_nowait(_END)
                except grpc.aio.AioRpcError as e:
                    if not self._encoded.done():
                        error = rpc.error_from_rpc(e, f"Encode on encoder {link.address}")
                        if e.code() == grpc.StatusCode.UNIMPLEMENTED and self._queue.empty():
                            log.info(
                                "encoder %s does not serve EncodeStream: Encode and Status",
                                link.address,
                            )
                            link.streams_encode = False
                            continue
                        if (
                            isinstance(error, errors.FailedPrecondition)
                            and error.error_reason == errors.NOT_REGISTERED
                            and not registered_again
                            and self._queue.empty()
                        ):
                            registered_again = True
                            await link._register_again(error, request.request_id)
                            continue
                        self._encoded.set_exception(error)
                    self._queue.put_nowait(e)
                    return
                if not self._encoded.done():
                    self._encoded.set_exception(
                        errors.Unavailable(
                            f"{self._what}: the call ended without the Encode's reply",
                            reason=FailureReason.PEER_LOST,
                        )
                    )
                return
        except errors.EpdError as e:  # registering again failed
            if not self._encoded.done():
                self._encoded.set_exception(e)
            self._queue.put_nowait(e)
        except Exception as e:  # a bug here must not leave the Encode or the receive waiting
            log.exception("%s: reading the call failed", self._what)
            failure = errors.Unavailable(f"{self._what}: {e!r}", reason=FailureReason.PEER_LOST)
            if not self._encoded.done():
                self._encoded.set_exception(failure)
            self._queue.put_nowait(failure)
        finally:
            for call in self._calls:
                call.cancel()  # a no-op once it ended

    async def _two_calls(self) -> None:
        """Encode, and rank 0's Status stream behind it, for an encoder without EncodeStream.
        The stream is closed on every way out, cancellation included."""
        stream = self._link.status(self._request.request_id, 0, await_transfer=True)
        try:
            try:
                self._encoded.set_result(await self._link.encode(self._request, self._init))
            except errors.EpdError as e:
                self._encoded.set_exception(e)
                self._queue.put_nowait(e)
                return
            if self._statuses.closed:
                return  # nobody reads the statuses any more
            try:
                async for st in stream:
                    self._queue.put_nowait(st)
                self._queue.put_nowait(_END)
            except errors.EpdError as e:
                self._queue.put_nowait(e)
        finally:
            stream.close()


class _ExchangeStatuses(_QueuedStatuses):
    """An EncodeExchange's status side, as a StatusSource (its queue is the exchange's)."""

    def __init__(self, exchange: EncodeExchange):
        super().__init__(exchange._queue, exchange._what)
        self._exchange = exchange
        self.closed = False

    def close(self) -> None:
        self._ended = self.closed = True
        if self._exchange._encoded.done():
            self._exchange.cancel()


def _retrieved(fut: asyncio.Future) -> None:
    """An Encode's error nobody awaited (the attempt ended another way) is not worth a warning."""
    if not fut.cancelled():
        fut.exception()


def status_from_pb(pb: common_pb2.TransferStatus) -> StatusUpdate:
    try:
        state = TransferState(pb.state)
        reason = FailureReason(pb.error.reason)
    except ValueError:
        raise errors.IntegrityError(
            f"request {pb.request_id}: status with unknown state {pb.state} or reason"
        ) from None
    return StatusUpdate(
        pb.request_id,
        state,
        sent_tokens=pb.sent_tokens,
        total_tokens=pb.total_tokens,
        round=pb.round,
        round_tokens=pb.round_tokens,
        allocated_tokens=pb.allocated_tokens,
        checksums=tuple((c.field, c.value) for c in pb.checksums),
        reason=reason,
        message=pb.error.message,
        landed_tokens=pb.landed_tokens,
        landed_checksums=tuple((c.field, c.value) for c in pb.landed_checksums),
        writes_may_land=pb.error.writes_may_land,
        images=tuple(rpc.image_span_from_pb(span) for span in pb.images),
    )
