"""Prometheus metrics of one process (names fixed: docs/DESIGN.md): definitions, the RPC
interceptor, and the /metrics HTTP endpoint.

Every metric is defined here, in one place. Each process builds one `Metrics` for its role
(`encoder` or `language`; language ranks add a `rank` label) on a registry of its own, and
serves it on `--metrics-port`. A language instance with several TP ranks serves one endpoint per
rank process: rank R listens on `metrics_port + R` (no multiprocess collector: every rank is its
own scrape target, which keeps each rank's pool and failures visible on their own).

Domain code reports through `common.telemetry.Telemetry`, which `Metrics` implements; only this
module imports prometheus_client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from common.errors import Unavailable
from common.states import FailureReason, TransferState
from services.edge.rpc import MethodWrappingInterceptor

log = logging.getLogger(__name__)

ROLES = ("encoder", "language")

# Bucket edges, in the metric's unit. Transfers on loopback take milliseconds; a large payload
# through a small pool takes tens of seconds.
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
RPC_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
ALLOC_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
ROUNDS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 1024)

OUTCOMES = ("success", "failed", "cancelled")
# epd_size_first_admissions_total's labels: where a request's size came from, what was reserved.
SIZE_FROM = ("status", "encode_reply")
RESERVATIONS = ("exact", "default")


class Metrics:
    """The metrics of one process; implements `common.telemetry.Telemetry`."""

    def __init__(self, role: str, rank: int | None = None):
        if role not in ROLES:
            raise ValueError(f"role={role!r}: must be one of {ROLES}")
        self.role = role
        self.rank = rank
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        names = ["role"] + (["rank"] if rank is not None else [])
        values = [role] + ([str(rank)] if rank is not None else [])
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, [*names, *extra], registry=r)

        def histogram(name, doc, buckets, extra=()):
            return Histogram(name, doc, [*names, *extra], buckets=buckets, registry=r)

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, [*names, *extra], registry=r)

        self.requests = counter(
            "epd_requests",
            "Requests ended here, by outcome (success|failed|cancelled)",
            ["outcome"],
        )
        self.transfer_bytes = counter(
            "epd_transfer_bytes", "Payload bytes written (encoder) or received (language rank)"
        )
        self.transfer_seconds = histogram(
            "epd_transfer_seconds", "Init to SUCCESS of successful transfers", SECONDS_BUCKETS
        )
        self.rounds = histogram(
            "epd_rounds_per_request", "Rounds of successful transfers", ROUNDS_BUCKETS
        )
        self.resumes = counter(
            "epd_resumes", "Resume rounds begun (accepted by the encoder / sent by a rank)"
        )
        self.pool_blocks = gauge(
            "epd_pool_blocks",
            "Blocks of this process's pool, by state (used|free|quarantined)",
            ["state"],
        )
        self.pool_waiters = gauge("epd_pool_waiters", "Allocations waiting for free blocks")
        self.record_bytes = gauge(
            "epd_record_bytes",
            "Bytes of one token's record in this process's pool: every payload field "
            "(3 default fields, plus the model's deepstack fields), padded",
        )
        self.alloc_wait = histogram(
            "epd_alloc_wait_seconds",
            "How long allocations waited for pool blocks",
            ALLOC_WAIT_BUCKETS,
        )
        self.failures = counter(
            "epd_failures", "Failed requests by reason (lower-case FailureReason)", ["reason"]
        )
        self.inflight = gauge("epd_inflight_transfers", "Transfers in progress")
        self.integrity = counter(
            "epd_integrity_failures", "Rounds whose checksums or sizes did not match"
        )
        self.fenced = counter(
            "epd_fenced_transfers",
            "Transfers that ended while a write of theirs could still land: "
            "their blocks here were quarantined until the writes stopped (the write fence)",
        )
        self.fence_seconds = histogram(
            "epd_fence_seconds",
            "How long blocks stayed quarantined by the write fence",
            SECONDS_BUCKETS,
        )
        self.encode_seconds = histogram(
            "epd_encode_seconds", "Encoder model time per request (encoder only)", SECONDS_BUCKETS
        )
        self.failovers = counter(
            "epd_failovers",
            "Requests retried on another encoder after their first encoder "
            "failed before any byte arrived (language rank 0)",
        )
        self.overlapped_resumes = counter(
            "epd_overlapped_resumes",
            "Resumes a language rank sent before copying "
            "out and verifying the round just received (overlap_rounds: the next "
            "round is written meanwhile)",
        )
        self.early_inits = counter(
            "epd_early_inits",
            "Requests whose Init went out alongside their Encode (early_init; language rank 0)",
        )
        self.size_first = counter(
            "epd_size_first_admissions",
            "Requests admitted under --alloc-policy auto (language rank 0), by where their size "
            "came from (status: said on the Status stream before the model ran; encode_reply: "
            "the Encode returned first) and what was reserved (exact: the whole payload; "
            "default: --initial-tokens, the payload being larger than the pool)",
            ["size_from", "reservation"],
        )
        self.cache_hits = counter(
            "epd_embedding_cache_hits",
            "Images whose kept rows were found (encoder: no vision tower ran; language rank: held rows)",
        )
        self.cache_misses = counter(
            "epd_embedding_cache_misses", "Images looked up among kept rows and not found"
        )
        self.cache_evictions = counter(
            "epd_embedding_cache_evictions", "Kept image rows given up to make room"
        )
        self.cache_bytes = gauge("epd_embedding_cache_bytes", "Bytes of image rows kept")
        self.encoders_available = gauge(
            "epd_encoders_available",
            "Encoders in this language instance's rotation (SERVING, reachable, registered)",
        )
        self.rpc_seconds = Histogram(
            "epd_rpc_seconds",
            "gRPC server handling time by method and status code",
            ["service", "method", "code"],
            buckets=RPC_SECONDS_BUCKETS,
            registry=r,
        )
        self._labels = dict(zip(names, values))
        # Children that exist from the start, so dashboards see zeros rather than no series.
        for outcome in OUTCOMES:
            self.requests.labels(**self._labels, outcome=outcome)
        for reason in FailureReason:
            if reason != FailureReason.UNSPECIFIED:
                self.failures.labels(**self._labels, reason=reason.label)
        for size_from in SIZE_FROM:
            for reservation in RESERVATIONS:
                self.size_first.labels(**self._labels, size_from=size_from, reservation=reservation)
        self._bytes = self.transfer_bytes.labels(**self._labels)
        self._seconds = self.transfer_seconds.labels(**self._labels)
        self._rounds = self.rounds.labels(**self._labels)
        self._resumes = self.resumes.labels(**self._labels)
        self._overlapped = self.overlapped_resumes.labels(**self._labels)
        self._alloc_wait = self.alloc_wait.labels(**self._labels)
        self._integrity = self.integrity.labels(**self._labels)
        self._encode = self.encode_seconds.labels(**self._labels)
        self.fenced.labels(**self._labels)

    # ------------------------------------------------------------------ gauges read at scrape time

    def watch_pool(self, allocator, record_bytes: int) -> None:
        """Pool gauges read from a BlockAllocator when scraped, and the pool's record size."""
        self.record_bytes.labels(**self._labels).set(record_bytes)
        self.pool_blocks.labels(**self._labels, state="used").set_function(
            lambda: allocator.used_count
        )
        self.pool_blocks.labels(**self._labels, state="free").set_function(
            lambda: allocator.free_count
        )
        # Held back after a transfer the encoder could not confirm ended (services/language/receiver.py).
        self.pool_blocks.labels(**self._labels, state="quarantined").set_function(
            lambda: allocator.quarantined_count
        )
        self.pool_waiters.labels(**self._labels).set_function(lambda: allocator.waiters)

    def watch_inflight(self, count: Callable[[], int]) -> None:
        self.inflight.labels(**self._labels).set_function(count)

    def watch_encoders(self, count: Callable[[], int]) -> None:
        self.encoders_available.labels(**self._labels).set_function(count)

    def failed_over(self) -> None:
        self.failovers.labels(**self._labels).inc()

    def early_init(self) -> None:
        self.early_inits.labels(**self._labels).inc()

    def size_first_admitted(self, size_from: str, reservation: str) -> None:
        """A size-first admission (`SIZE_FROM` x `RESERVATIONS`)."""
        self.size_first.labels(**self._labels, size_from=size_from, reservation=reservation).inc()

    def embedding_cache(self, hits: int, misses: int, evictions: int, held: int) -> None:
        """An embedding cache event (services/models/embedding_cache.py's `CacheEvent`)."""
        if hits:
            self.cache_hits.labels(**self._labels).inc(hits)
        if misses:
            self.cache_misses.labels(**self._labels).inc(misses)
        if evictions:
            self.cache_evictions.labels(**self._labels).inc(evictions)
        self.cache_bytes.labels(**self._labels).set(held)

    # ------------------------------------------------------------------ Telemetry

    def transfer_ended(
        self, state: TransferState, reason: FailureReason, *, seconds: float | None, rounds: int
    ) -> None:
        if state == TransferState.SUCCESS:
            self.requests.labels(**self._labels, outcome="success").inc()
            if seconds is not None:
                self._seconds.observe(seconds)
            self._rounds.observe(rounds)
            return
        outcome = "cancelled" if reason == FailureReason.CANCELLED else "failed"
        self.requests.labels(**self._labels, outcome=outcome).inc()
        self.failures.labels(**self._labels, reason=reason.label).inc()

    def bytes_moved(self, nbytes: int) -> None:
        self._bytes.inc(nbytes)

    def resumed(self, overlapped: bool = False) -> None:
        self._resumes.inc()
        if overlapped:
            self._overlapped.inc()

    def alloc_waited(self, seconds: float) -> None:
        self._alloc_wait.observe(seconds)

    def integrity_failed(self) -> None:
        self._integrity.inc()

    def encoded(self, seconds: float) -> None:
        self._encode.observe(seconds)

    def write_fenced(self) -> None:
        self.fenced.labels(**self._labels).inc()

    def fence_released(self, seconds: float) -> None:
        self.fence_seconds.labels(**self._labels).observe(seconds)

    # ------------------------------------------------------------------ endpoint

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = do not serve); returns the port or 0."""
        if port == 0:
            return 0
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise Unavailable(
                f"cannot serve /metrics on {host}:{port} (metrics_port): {e.strerror or e}"
            ) from None
        self._http = server
        bound = server.server_address[1]
        log.info("%s metrics on http://%s:%d/metrics", self.role, host, bound)
        return bound

    def close(self) -> None:
        """Stop the endpoint (idempotent)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def interceptor(self) -> RpcMetricsInterceptor:
        return RpcMetricsInterceptor(self.rpc_seconds)


def exported_names(role: str, rank: int | None = None) -> set[str]:
    """Every sample name a process of this role exports (dashboards and tests check against it)."""
    m = Metrics(role, rank)
    m.rpc_seconds.labels(
        service="s", method="m", code="OK"
    )  # a labelled histogram exports no samples until used
    for metric in (
        m.transfer_bytes,
        m.transfer_seconds,
        m.rounds,
        m.resumes,
        m.alloc_wait,
        m.integrity,
        m.encode_seconds,
        m.inflight,
        m.pool_waiters,
        m.record_bytes,
        m.failovers,
        m.early_inits,
        m.overlapped_resumes,
        m.encoders_available,
        m.fenced,
        m.fence_seconds,
        m.cache_hits,
        m.cache_misses,
        m.cache_evictions,
        m.cache_bytes,
    ):
        metric.labels(**m._labels)
    for state in ("used", "free", "quarantined"):
        m.pool_blocks.labels(**m._labels, state=state)
    return {s.name for family in m.registry.collect() for s in family.samples}


class RpcMetricsInterceptor(MethodWrappingInterceptor):
    """epd_rpc_seconds{service,method,code} for every RPC this server handles, streams included
    (a Status stream's time is its whole life)."""

    def __init__(self, histogram: Histogram):
        super().__init__()
        self.histogram = histogram

    def _wrap(self, handler, full_method: str):
        service, _, method = full_method.lstrip("/").rpartition("/")
        observe = self._observer(service or "unknown", method)

        kw = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

        def timed(inner):
            """A handler with one reply (unary or stream request), its whole time observed."""

            async def run(request, context):
                started, raised = time.perf_counter(), True
                try:
                    reply = await inner(request, context)
                    raised = False
                    return reply
                finally:
                    observe(context, started, raised)

            return run

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(timed(handler.unary_unary), **kw)
        if (
            handler.stream_unary is not None
        ):  # e.g. the token check's refusal, which never reads the body
            return grpc.stream_unary_rpc_method_handler(timed(handler.stream_unary), **kw)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                started, raised = time.perf_counter(), True
                try:
                    async for item in inner_stream(request, context):
                        yield item
                    raised = False
                finally:
                    observe(context, started, raised)

            return grpc.unary_stream_rpc_method_handler(stream, **kw)
        return handler

    def _observer(self, service: str, method: str):
        histogram = self.histogram

        def observe(context, started: float, raised: bool) -> None:
            elapsed = time.perf_counter() - started
            code = context.code()  # set by context.abort / set_code
            if code is None:
                # None set: the client went away (CANCELLED), the handler raised something other
                # than an abort (gRPC answers UNKNOWN), or it returned normally (OK).
                code = (
                    grpc.StatusCode.CANCELLED
                    if context.cancelled()
                    else grpc.StatusCode.UNKNOWN
                    if raised
                    else grpc.StatusCode.OK
                )
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            histogram.labels(service=service, method=method, code=name).observe(elapsed)

        return observe
