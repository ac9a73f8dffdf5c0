"""The gRPC edge shared by both services: error mapping, pb <-> domain conversion, server set-up.

Domain code raises `common.errors.EpdError` subclasses; `grpc_errors` turns them into
`context.abort(code, message)` here, in one place. Clients use `error_from_rpc` for the reverse.
`GrpcServer` also applies transport security and the bearer-token check (`AuthInterceptor`;
TLS material and the policy come from services/edge/security.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import errors
from common.layout import PROOF_AREA_BYTES, FieldLayout, FieldSpec, PoolGeometry, RecordLayout
from common.pb.epd.v1 import bench_pb2_grpc, common_pb2
from common.states import FailureReason, ImageSpan, TransferState
from services.edge import security
from services.edge.security import ClientSecurity, ServerSecurity, peer_identity  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.EpdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


def status_code(err: errors.EpdError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)


STREAM_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
"""How a server stream ends when its peer went away rather than answered."""


def error_from_rpc(e: grpc.RpcError, what: str = "", *, stream: bool = False) -> errors.EpdError:
    """The domain error for a failed client call; connection problems become peer_lost. A
    server `stream` that broke (STREAM_BROKEN) is UNAVAILABLE, peer_lost: its peer is gone."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    message = f"{what}: {details}" if what else str(details)
    if stream and code in STREAM_BROKEN:
        return errors.Unavailable(message, reason=FailureReason.PEER_LOST)
    err = _CODE_TO_ERROR.get(code, errors.Internal)(message)
    info = error_info(e)
    failure = info.metadata.get(FAILURE_REASON_KEY, "") if info is not None else ""
    if info is not None and info.reason in errors.ERROR_REASONS:
        err.error_reason = info.reason
    if failure in FailureReason.__members__ and failure != "UNSPECIFIED":
        err.reason = FailureReason[failure]  # the reason the other service ended the transfer with
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        err.reason = FailureReason.PEER_LOST
    return err


def error_info(e: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The `google.rpc.ErrorInfo` of our domain in a failed call's status details, if any."""
    try:
        trailing = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never got trailers has none
        trailing = ()
    for key, value in trailing:
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # noqa: BLE001 - not ours to trust: ignored, the code still counts
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info
    return None


MAX_MESSAGE_CHARS = 1024


def abort_message(err: errors.EpdError) -> str:
    """The error's message, shortened: messages echo client values (ids, sessions), and gRPC
    turns status details above its metadata limit into RESOURCE_EXHAUSTED."""
    m = err.message
    if len(m) <= MAX_MESSAGE_CHARS:
        return m
    return m[:MAX_MESSAGE_CHARS] + f"... ({len(m)} characters in all)"


BENCH_SERVICE_NAME = "epd.v1.Bench"
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # google.rpc.Status, as grpcio-status sends it
ERROR_DOMAIN = "epd.v1"
"""`ErrorInfo.domain` of the errors our services raise."""
FAILURE_REASON_KEY = "failure_reason"
"""`ErrorInfo.metadata` key: the FailureReason (its name) the error ends a transfer with."""


def error_status(e: errors.EpdError) -> status_pb2.Status:
    """The error as a `google.rpc.Status` with one `ErrorInfo`: `reason` is the machine-readable
    cause (`EpdError.error_reason`, else the code's name), `metadata[failure_reason]` the
    transfer failure reason. The other service acts on these, never on the message."""
    info = error_details_pb2.ErrorInfo(reason=e.error_reason or e.code, domain=ERROR_DOMAIN)
    if e.reason != FailureReason.UNSPECIFIED:
        info.metadata[FAILURE_REASON_KEY] = e.reason.name
    detail = any_pb2.Any()
    detail.Pack(info)
    code = status_code(e).value[0]
    return status_pb2.Status(code=code, message=abort_message(e), details=[detail])


async def abort(context, e: errors.EpdError) -> None:
    """End the call with the error's status code, message and structured details."""
    status = error_status(e)
    await context.abort(
        status_code(e),
        status.message,
        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def grpc_errors(method: Callable) -> Callable:
    """Servicer decorator: EpdError -> context.abort(code, message); works for streams too."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.EpdError as e:
                await abort(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except errors.EpdError as e:
            await abort(context, e)

    return unary


# ---------------------------------------------------------------------------- conversions


def geometry_to_pb(geo: PoolGeometry) -> common_pb2.PoolLayout:
    return common_pb2.PoolLayout(
        block_size=geo.block_size,
        num_blocks=geo.num_blocks,
        record_bytes=geo.record.record_bytes,
        base_address=geo.base_address,
        fields=[
            common_pb2.FieldLayout(
                name=f.name,
                dtype=f.spec.dtype,
                per_token_shape=list(f.spec.per_token_shape),
                bytes_per_token=f.bytes_per_token,
                offset=f.offset,
            )
            for f in geo.record.fields
        ],
    )


def geometry_from_pb(pb: common_pb2.PoolLayout) -> PoolGeometry:
    """A peer's pool layout; InvalidArgument naming the first inconsistent value."""
    if pb.block_size < 1 or pb.block_size & (pb.block_size - 1):
        raise errors.InvalidArgument(
            f"layout.block_size={pb.block_size}: must be a power of two >= 1"
        )
    if pb.num_blocks < 1:
        raise errors.InvalidArgument(f"layout.num_blocks={pb.num_blocks}: must be >= 1")
    if pb.base_address == 0:
        raise errors.InvalidArgument(
            "layout.base_address=0: the pool's registered address is required"
        )
    if not pb.fields:
        raise errors.InvalidArgument("layout.fields is empty")
    fields = []
    for i, f in enumerate(pb.fields):
        try:
            spec = FieldSpec(f.name, f.dtype, tuple(int(d) for d in f.per_token_shape))
            declared = spec.bytes_per_token
        except KeyError:
            raise errors.InvalidArgument(
                f"layout.fields[{i}] ({f.name!r}): unknown dtype {f.dtype!r}"
            ) from None
        if declared != f.bytes_per_token:
            raise errors.InvalidArgument(
                f"layout.fields[{i}] ({f.name!r}): bytes_per_token={f.bytes_per_token} but dtype and shape give {declared}"
            )
        if f.offset + declared > pb.record_bytes:
            raise errors.InvalidArgument(
                f"layout.fields[{i}] ({f.name!r}): offset {f.offset} + {declared} bytes exceeds record_bytes={pb.record_bytes}"
            )
        fields.append(FieldLayout(spec, int(f.offset)))
    geometry = PoolGeometry(
        RecordLayout(tuple(fields), int(pb.record_bytes)),
        pb.block_size,
        pb.num_blocks,
        pb.base_address,
    )
    end = geometry.proof_address + PROOF_AREA_BYTES
    if end > 2**64:
        raise errors.InvalidArgument(
            f"layout: base_address 0x{pb.base_address:x} + num_blocks {pb.num_blocks} x block_size {pb.block_size} x "
            f"record_bytes {pb.record_bytes} + the {PROOF_AREA_BYTES}-byte proof area ends past the 64-bit address "
            f"space (0x{end:x})"
        )
    return geometry


def error_to_pb(
    reason: FailureReason, message: str, writes_may_land: bool = False
) -> common_pb2.TransferError | None:
    if reason == FailureReason.UNSPECIFIED and not message and not writes_may_land:
        return None
    return common_pb2.TransferError(
        reason=reason_to_pb(reason), message=message, writes_may_land=writes_may_land
    )


def cache_info(stats: Sequence[int]) -> common_pb2.EmbeddingCacheInfo:
    """EmbeddingCacheInfo from `EmbeddingCache.stats()` (or a rank's share of the collective)."""
    capacity, nbytes, entries, hits, misses, evictions = stats
    return common_pb2.EmbeddingCacheInfo(
        capacity_bytes=capacity,
        bytes=nbytes,
        entries=entries,
        hits=hits,
        misses=misses,
        evictions=evictions,
    )


def image_span_to_pb(span: ImageSpan) -> common_pb2.ImageSpan:
    return common_pb2.ImageSpan(
        image=span.image,
        start_token=span.start,
        tokens=span.tokens,
        key=span.key,
        first_position=list(span.first_position),
        reused=span.reused,
    )


def image_span_from_pb(pb: common_pb2.ImageSpan) -> ImageSpan:
    return ImageSpan(
        pb.image, pb.start_token, pb.tokens, pb.key, tuple(pb.first_position), pb.reused
    )


# The domain enums (common/states.py) carry the proto enums' numbers, so converting is int(); the
# casts only tell mypy, since the generated stubs type an enum value as its own int subclass.
# A plain int is accepted too: rank rows carry a state as its number (RankRow.state).


def state_to_pb(state: TransferState | int) -> common_pb2.TransferState:
    return cast("common_pb2.TransferState", int(state))


def reason_to_pb(reason: FailureReason | int) -> common_pb2.FailureReason:
    return cast("common_pb2.FailureReason", int(reason))


# ---------------------------------------------------------------------------- servers


class HealthService:
    """grpc.health.v1 for the whole server ("") and each named service."""

    def __init__(self, server: grpc.aio.Server, service_names: list[str]):
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


def bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise errors.Unavailable(f"cannot bind gRPC server to {host}:{port}")
    return bound


class MethodWrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once (handlers are per method), not
    once per call; subclasses say how in `_wrap`."""

    def __init__(self):
        self._wrapped: dict[str, tuple] = {}  # method -> (inner handler, wrapped handler)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, method: str):
        raise NotImplementedError


PARSE_OFF_LOOP_BYTES = 1 << 20


class ParseErrorInterceptor(MethodWrappingInterceptor):
    """Undecodable request bytes are bad input: INVALID_ARGUMENT naming the method, not the
    UNKNOWN that gRPC answers when its own deserializer raises. The handler gets raw bytes and
    parses them itself."""

    def _wrap(self, handler, method: str):
        parse = handler.request_deserializer
        if parse is None:
            return handler

        async def parsed(raw: bytes, context):
            try:
                # A big message (an Init with millions of block ids) is parsed off the event loop.
                return (
                    parse(raw)
                    if len(raw) < PARSE_OFF_LOOP_BYTES
                    else await asyncio.to_thread(parse, raw)
                )
            except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{method}: request is not a valid message: {e}",
                )

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(raw, context):
                return await inner(await parsed(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream
            if not inspect.isasyncgenfunction(
                inner_stream
            ):  # writes with context.write() (health's Watch)

                async def write(raw, context):
                    return await inner_stream(await parsed(raw, context), context)

                return grpc.unary_stream_rpc_method_handler(
                    write, response_serializer=handler.response_serializer
                )

            async def stream(raw, context):
                async for item in inner_stream(await parsed(raw, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer
            )
        return handler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The one place the bearer token is checked (services/edge/security.py says which methods need
    it), from the call's metadata alone, before its request message is read: a refused call is
    answered UNAUTHENTICATED by a handler that never reads the body, so an unauthenticated caller
    cannot make the server buffer large messages, and it changes nothing. The message never
    contains the secret. A call that passes is marked for `peer_identity`."""

    def __init__(self, sec: ServerSecurity):
        self._sec = sec
        self._marked: dict[
            str, tuple
        ] = {}  # method -> (inner handler, handler marking the token verified)
        self._refusals: dict[tuple[str, str], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        if not self._sec.token:
            return await continuation(details)
        ok, why = security.token_matches(self._sec.token, details.invocation_metadata)
        if not ok and self._sec.needs_token(details.method):
            key = (details.method, why)
            if key not in self._refusals:
                self._refusals[key] = _refusal(details.method, why)
            return self._refusals[key]
        handler = await continuation(details)
        if handler is None or not ok:
            return handler  # open method: an absent or wrong token does not matter
        cached = self._marked.get(details.method)
        if cached is None or cached[0] is not handler:

            async def mark(context) -> None:
                security.mark_token_verified()

            cached = (handler, _guarded(handler, mark))
            self._marked[details.method] = cached
        return cached[1]


def _refusal(method: str, why: str):
    """A handler answering UNAUTHENTICATED without reading the request: a stream-request handler
    (gRPC reads a unary request in full before its handler runs, a stream only when iterated)."""
    name = method.lstrip("/")
    if why == "missing":
        text = (
            f"{name} needs authentication: send the shared secret of the server's --auth-token-file "
            f"as call metadata '{security.AUTH_METADATA_KEY}: Bearer <token>'"
        )
    elif why == "wrong":
        text = f"{name}: the bearer token in '{security.AUTH_METADATA_KEY}' metadata is not the server's token"
    else:
        text = f"{name}: '{security.AUTH_METADATA_KEY}' metadata must be 'Bearer <token>'"

    async def refuse(request_iterator, context):
        log.warning("refused %s from %s: %s token", name, context.peer(), why)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, text)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _guarded(handler, check):
    """`handler` with `await check(context)` run first, for each of the four kinds of method."""
    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )

    def stream_of(inner):
        if not inspect.isasyncgenfunction(inner):  # writes with context.write() (health's Watch)

            async def write(request, context):
                await check(context)
                return await inner(request, context)

            return write

        async def run(request, context):
            await check(context)
            async for item in inner(request, context):
                yield item

        return run

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request, context):
            await check(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream_of(handler.unary_stream), **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator, context):
            await check(context)
            return await inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_of(handler.stream_stream), **kw)
    return handler


class GrpcServer:
    """A grpc.aio server with one epd service, health and reflection; SERVING only once started.
    `sec` (services/edge/security.py) adds TLS (mutual with a CA), the token check and the message
    size limit; the default is plaintext with no token. `bench`, when given (--enable-bench),
    serves epd.v1.Bench beside the service; without it the Bench calls answer UNIMPLEMENTED."""

    def __init__(
        self,
        service_name: str,
        add_servicer: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        sec: ServerSecurity | None = None,
        bench: bench_pb2_grpc.BenchServicer | None = None,
    ):
        self.security = sec or ServerSecurity()
        # Given interceptors run outermost (metrics see every call, refused and undecodable ones
        # included); then the token check, before any request is parsed.
        self.server = grpc.aio.server(
            options=server_options(self.security.max_message_bytes),
            interceptors=[*interceptors, AuthInterceptor(self.security), ParseErrorInterceptor()],
            maximum_concurrent_rpcs=self.security.max_concurrent_rpcs,
        )
        add_servicer(self.server)
        names = [service_name]
        if bench is not None:
            bench_pb2_grpc.add_BenchServicer_to_server(bench, self.server)
            names.append(BENCH_SERVICE_NAME)
        self.health = HealthService(self.server, names)
        add_reflection(self.server, names)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.port = bind(self.server, host, port, self.security.credentials())
        log.info("gRPC server on %s:%d: %s", host, self.port, self.security.describe())
        await self.server.start()
        await self.health.set(True)
        return self.port

    async def set_not_serving(self) -> None:
        await self.health.set(False)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def announce_ready(**info: Any) -> None:
    """The one stdout line scripts wait for: `EPD_READY {json}`."""
    sys.stdout.write("EPD_READY " + json.dumps(info, sort_keys=True) + "\n")
    sys.stdout.flush()


def termination_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT; install it before announcing readiness, so a signal
    that follows the EPD_READY line at once is a graceful stop, not the default kill."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
SERVER_OPTIONS = CLIENT_OPTIONS + [
    # Clients ping every 2 s while calls are open (encoder links: detect a cut link); allow it.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def server_options(
    max_message_bytes: int = security.DEFAULT_MAX_MESSAGE_BYTES,
) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with `--max-message-bytes` both ways: a larger request is refused by gRPC
    with RESOURCE_EXHAUSTED ("Received message larger than max (N vs. M)") before any handler."""
    sizes = {"grpc.max_receive_message_length", "grpc.max_send_message_length"}
    return [(k, v) for k, v in SERVER_OPTIONS if k not in sizes] + [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def pool_info(pool, session: str, rank: int = 0, *, addresses: bool = True) -> common_pb2.PoolInfo:
    """Inspection view of a BlockPool (GetPool on both services). `addresses=False` blanks the
    Mooncake session and the pool's base address: for a caller who is not this instance (nor an
    admin), they are the way to the unauthenticated data plane (docs/SECURITY.md)."""
    a = pool.allocator
    layout = geometry_to_pb(pool.geometry)
    if not addresses:
        layout.base_address = 0
        session = ""
    return common_pb2.PoolInfo(
        layout=layout,
        used_blocks=a.used_count,
        free_blocks=a.free_count,
        waiters=a.waiters,
        device=str(pool.device),
        session=session,
        rank=rank,
        quarantined_blocks=a.quarantined_count,
    )


def diagnostics(table, status_streams: int = 0) -> common_pb2.Diagnostics:
    """Process diagnostics (GetDiagnostics on both services)."""
    import threading

    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    return common_pb2.Diagnostics(
        asyncio_tasks=len(tasks),
        threads=threading.active_count(),
        rss_bytes=_rss_bytes(),
        live_transfers=len(table.live),
        history_transfers=len(table.history),
        status_streams=status_streams,
    )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
