"""The language service: the public front door (`Generate`), its pool, and inspection.

`LanguageService.start()` allocates the destination pool, registers it with Mooncake once,
registers the rank with the encoder, starts the gRPC server (Language + health + reflection)
and only then reports SERVING. One rank per instance in this release (DESIGN §7 comes later).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid


from common import errors
from common.config import LanguageConfig
from common.payload import Payload
from common.pb.epd.v1 import common_pb2, language_pb2, language_pb2_grpc
from common.pool import BlockPool
from common.states import TransferState
from common.table import TransferTable
from common.transport import MooncakeTransport, memory_location
from services import rpc
from services.language.encoder_link import GrpcEncoderLink
from services.language.policy import AllocationPolicy
from services.language.receiver import ReceiveTask

log = logging.getLogger(__name__)

SERVICE_NAME = "epd.v1.Language"
RANK = 0


@dataclasses.dataclass
class ConsumerResult:
    first_token_id: int = -1


class NullConsumer:
    """Accepts the payload and generates nothing (first_token_id = -1)."""

    name = "null"

    async def consume(self, payload: Payload) -> ConsumerResult:
        return ConsumerResult()


class GenerateRecord:
    """One Generate on this instance, as inspection shows it."""

    def __init__(self, request_id: str, encoder: str):
        self.request_id = request_id
        self.encoder = encoder
        self.receiver: ReceiveTask | None = None
        self.created = time.monotonic()
        self.task: asyncio.Future | None = None
        self.cancel_reason = ""

    @property
    def state(self) -> TransferState:
        if self.receiver is None or self.receiver.state == TransferState.UNSPECIFIED:
            return TransferState.BOOTSTRAPPING
        return self.receiver.state


class LanguageService:
    def __init__(self, config: LanguageConfig, *, transport: MooncakeTransport | None = None):
        config.validate()
        if not config.encoder:
            raise errors.InvalidArgument("encoder: at least one --encoder host:port is required")
        self.config = config
        self.language_id = config.language_id or f"lang-{uuid.uuid4().hex[:12]}"
        self.pool = BlockPool(config.record, config.block_size, config.pool_blocks, config.device)
        self.policy = AllocationPolicy(config.alloc_policy, config.initial_tokens,
                                       config.pool_blocks * config.block_size,
                                       min_tokens=config.adaptive_min_tokens, max_tokens=config.adaptive_max_tokens)
        self.consumer = NullConsumer()
        self.transport = transport
        self.link = GrpcEncoderLink(config.encoder[0], self.language_id)
        self.requests: TransferTable[GenerateRecord] = TransferTable(config.history_size)
        self.server: rpc.GrpcServer | None = None
        self.port = 0
        self._shutdown_done = False

    async def start(self, register_timeout: float = 60.0) -> None:
        cfg = self.config
        if self.transport is None:
            self.transport = await asyncio.to_thread(MooncakeTransport, cfg.host, cfg.protocol, cfg.rdma_device)
        self.transport.register(self.pool.base_address, self.pool.nbytes, memory_location(cfg.device))
        await self.link.register(RANK, self.transport.session, self.pool.geometry, timeout=register_timeout)
        self.server = rpc.GrpcServer(
            SERVICE_NAME, lambda server: language_pb2_grpc.add_LanguageServicer_to_server(LanguageServicer(self), server))
        self.port = await self.server.start(cfg.host, cfg.port)
        log.info("language %s serving on %s:%d, session %s, encoder %s (%s), pool %d x %d tokens",
                 self.language_id, cfg.host, self.port, self.transport.session, self.link.address,
                 self.link.encoder_id, cfg.pool_blocks, cfg.block_size)

    async def shutdown(self, grace: float = 5.0) -> None:
        if self._shutdown_done:
            return
        self._shutdown_done = True
        if self.server is not None:
            await self.server.set_not_serving()
            await self.server.stop(grace)
        tasks = [r.task for r in self.requests.live if r.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        await self.link.close()
        if self.transport is not None:
            self.transport.close()

    async def generate(self, request: language_pb2.GenerateRequest, deadline_s: float | None) -> language_pb2.GenerateReply:
        request_id = request.request_id or str(uuid.uuid4())
        if request.synthetic_tokens == 0 and not request.text and not request.images:
            raise errors.InvalidArgument(f"request {request_id!r}: no images, no text and synthetic_tokens=0")
        record = GenerateRecord(request_id, self.link.address)
        self.requests.add(request_id, record)  # ALREADY_EXISTS for an id in use
        timeout = min(deadline_s, self.config.generate_timeout_s) if deadline_s else self.config.generate_timeout_s
        # The work runs in a task of our own: Cancel and deadlines cancel it, never the gRPC
        # handler, which must stay alive to send the client its status.
        work = asyncio.ensure_future(self._generate(request_id, request, record))
        record.task = work
        try:
            done, _ = await asyncio.wait({work}, timeout=timeout)
            if not done:
                await _cancel_and_wait(work)
                raise errors.DeadlineExceeded(f"request {request_id!r} did not finish within {timeout:.3f} s")
            if work.cancelled():
                raise errors.Cancelled(f"request {request_id!r} was cancelled: {record.cancel_reason}")
            return work.result()
        except asyncio.CancelledError:  # the client went away
            await asyncio.shield(_cancel_and_wait(work))
            raise
        finally:
            self.requests.finish(request_id, record)

    async def _generate(self, request_id: str, request, record: GenerateRecord) -> language_pb2.GenerateReply:
        started = time.monotonic()
        receiver = ReceiveTask(
            request_id, RANK, 1, self.pool, self.link,
            initial_tokens=self.policy.initial_tokens(request.expected_tokens),
            alloc_timeout_s=self.config.alloc_timeout_s, integrity=self.config.integrity)
        record.receiver = receiver
        encode: asyncio.Future | None = None
        receive: asyncio.Future | None = None
        payload: Payload | None = None
        failure: BaseException | None = None
        try:
            await receiver.start()
            encode = asyncio.ensure_future(self.link.encode(
                request_id, [(im.data, im.mime_type) for im in request.images], request.text,
                request.synthetic_tokens, request.synthetic_seed, 1))
            receive = asyncio.ensure_future(receiver.receive())
            await asyncio.wait({encode, receive}, return_when=asyncio.FIRST_EXCEPTION)
            if encode.done() and encode.exception() is not None:
                raise encode.exception()  # a refused Encode says more than the failed transfer
            payload = await receive
            await encode
            self.policy.observe(payload.total_tokens)
            digest = await asyncio.to_thread(payload.sha256) if request.want_digest else ""
            result = await self.consumer.consume(payload)
            transfer_s = (receiver.finished_at or time.monotonic()) - (receiver.init_at or started)
            return language_pb2.GenerateReply(
                request_id=request_id, total_tokens=payload.total_tokens, rounds=receiver.rounds,
                bytes=payload.nbytes, transfer_seconds=transfer_s, total_seconds=time.monotonic() - started,
                integrity_verified=receiver.integrity_verified, encoder=self.link.encoder_id or self.link.address,
                payload_sha256=digest, first_token_id=result.first_token_id,
                initial_allocated_tokens=receiver.initial_allocated_tokens)
        except BaseException as e:
            failure = e
            raise
        finally:
            # Cleanup must finish even when this task is being cancelled.
            await asyncio.shield(self._cleanup(receiver, receive, encode, payload, failure))

    async def _cleanup(self, receiver: ReceiveTask, receive, encode, payload, failure) -> None:
        for task in (receive, encode):
            if task is not None:
                await _cancel_and_wait(task)
        if payload is None and receive is not None and receive.done() and not receive.cancelled() \
                and receive.exception() is None:
            payload = receive.result()
        if payload is not None:
            payload.release()
        await receiver.close(failure)

    async def cancel(self, request_id: str, reason: str) -> tuple[bool, TransferState]:
        record = self.requests.require(request_id)
        if self.requests.live_get(request_id) is None or record.task is None or record.task.done():
            return False, record.state
        record.cancel_reason = reason
        await _cancel_and_wait(record.task)
        return True, record.state


async def _cancel_and_wait(task: asyncio.Future) -> None:
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class LanguageServicer(language_pb2_grpc.LanguageServicer):
    def __init__(self, service: LanguageService):
        self.s = service

    @rpc.grpc_errors
    async def Generate(self, request, context):
        return await self.s.generate(request, context.time_remaining())

    @rpc.grpc_errors
    async def GetTransfer(self, request, context):
        if not request.request_id:
            raise errors.InvalidArgument("request_id is empty")
        return record_info(self.s.requests.require(request.request_id))

    @rpc.grpc_errors
    async def ListTransfers(self, request, context):
        states = []
        for v in request.states:
            try:
                states.append(TransferState(v))
            except ValueError:
                raise errors.InvalidArgument(f"states: unknown TransferState value {v}") from None
        return common_pb2.ListTransfersReply(
            transfers=[record_info(r) for r in self.s.requests.select(states, request.limit)])

    @rpc.grpc_errors
    async def Cancel(self, request, context):
        if not request.request_id:
            raise errors.InvalidArgument("request_id is empty")
        cancelled, state = await self.s.cancel(request.request_id, request.reason or "no reason given")
        return common_pb2.CancelReply(cancelled=cancelled, state=int(state))

    @rpc.grpc_errors
    async def GetPool(self, request, context):
        return rpc.pool_info(self.s.pool, self.s.transport.session, RANK)


def record_info(r: GenerateRecord) -> common_pb2.TransferInfo:
    rc = r.receiver
    info = common_pb2.TransferInfo(request_id=r.request_id, state=int(r.state), age_seconds=time.monotonic() - r.created,
                                   peer=r.encoder)
    if rc is not None:
        info.sent_tokens, info.total_tokens, info.rounds = rc.sent_tokens, rc.total_tokens, rc.rounds
        info.allocated_tokens = rc.allocated_tokens
        info.bytes = rc.sent_tokens * rc.pool.record.payload_bytes_per_token
        if rc.finished_at is not None and rc.init_at is not None:
            info.transfer_seconds = rc.finished_at - rc.init_at
        err = rpc.error_to_pb(rc.reason, rc.message)
        if err is not None:
            info.error.CopyFrom(err)
        info.ranks.append(common_pb2.RankView(rank=rc.rank, state=int(rc.state), sent_tokens=rc.sent_tokens,
                                              allocated_tokens=rc.allocated_tokens))
    return info

