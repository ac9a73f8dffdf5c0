"""The language service: rank 0's public front door (`Generate`) and inspection.

`LanguageService.start()` starts ranks 1..tp-1 as processes (services/language/ranks.py), joins
the rank group, allocates and registers rank 0's pool (Mooncake, then the encoder), waits until
every rank has done the same, and only then starts the gRPC server (Language + health +
reflection) and reports SERVING. A Generate is admitted to the rank group, so every rank
receives it; rank 0 also sends the Encode, and replies once the ranks agreed on the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable

from common import errors
from common.config import WRITE_WAITS, LanguageConfig
from common.limits import check_images
from common.pb.epd.v1 import bench_pb2, bench_pb2_grpc, common_pb2, language_pb2, language_pb2_grpc
from common.plan import blocks_for_tokens
from common.states import FailureReason, TransferState
from common.table import TransferTable
from common.transfer_id import TransferId
from common.transport import MooncakeTransport
from services.edge import exposure, rpc
from services.language import encoders, ranks
from services.language.admission import Admission, AnnouncedSize
from services.language.encoder_link import Encoded, EncodeExchange
from services.language.policy import AllocationPolicy
from services.language.rank_group import (
    MAX_REQUEST_ID_BYTES,
    DistributedGroup,
    LocalGroup,
    RankGroup,
    RankRow,
)
from services.language.receive_options import CarriedInit
from services.language.receiver import StatusSource
from services.language.worker import RankOutcome, RankWorker, cancel_and_wait
from services.models.embedding_cache import image_digest
from services.parts import Parts

log = logging.getLogger(__name__)

HASH_ON_LOOP_BYTES = 256 * 1024  # image bytes hashed on the event loop; more go to a worker thread

SERVICE_NAME = "epd.v1.Language"


class GenerateRecord:
    """One Generate on this instance, as inspection shows it."""

    def __init__(self, request_id: str, encoder: str, principal: str = ""):
        self.request_id = request_id
        self.encoder = encoder
        self.principal = (
            principal  # who called Generate: only it (or an admin) may inspect or cancel it
        )
        self.encoder_address = ""
        self.key = request_id  # the current attempt's admission key (ID, or ID#2 after a failover)
        self.attempts = 0
        self.encoded_at = 0.0  # when the current attempt's Encode returned
        self.early_init = False  # the current attempt's Init went out alongside its Encode
        self.failed_over_from = ""
        self.created = time.monotonic()
        self.finished_at: float | None = None
        self.task: asyncio.Future | None = None
        self.cancel_reason = ""
        self.outcome: RankOutcome | None = None
        self.failure: errors.EpdError | None = None
        self.worker: RankWorker | None = None

    @property
    def state(self) -> TransferState:
        if self.outcome is not None:
            return TransferState.SUCCESS if self.outcome.decision.deliver else TransferState.FAILED
        if self.failure is not None or (self.finished_at is not None):
            return TransferState.FAILED
        receiver = self.worker.receivers.get(self.key) if self.worker else None
        if receiver is None or receiver.state == TransferState.UNSPECIFIED:
            return TransferState.BOOTSTRAPPING
        return receiver.state


class LanguageService:
    def __init__(self, config: LanguageConfig, *, parts: Parts | None = None):
        config.validate()
        addresses = config.encoder_addresses()
        if not addresses:
            raise errors.InvalidArgument(
                "encoder: at least one --encoder host:port (or --encoder-file) is required"
            )
        # DNS names with several addresses (a headless Service, a scaled compose service) become
        # one entry per address, here: the rank processes get the expanded list. Rank 0 looks
        # the names up again (EncoderDirectory._resolve_loop), and an admission names its encoder
        # by address too, so the other ranks pick up encoders that joined since (link_for).
        parts = parts or Parts()
        resolved, dns_names = encoders.resolve_addresses(addresses, parts.resolve)
        config = dataclasses.replace(config, encoder=tuple(resolved), encoder_file="")
        self.config = config
        self.language_id = config.language_id or f"lang-{uuid.uuid4().hex[:12]}"
        self.dist_init = config.dist_init or (
            f"tcp://{config.host}:{ranks.free_port(config.host)}" if config.tp > 1 else ""
        )
        self.group: RankGroup = (
            DistributedGroup(0, config.tp, self.dist_init) if config.tp > 1 else LocalGroup()
        )
        self.worker = RankWorker(
            config,
            0,
            self.group,
            self.language_id,
            parts=parts,
            dns_names=tuple(dns_names),
        )
        self.pool = self.worker.pool
        self.policy = AllocationPolicy(
            config.alloc_policy,
            config.initial_tokens,
            min(config.pool_blocks_of(r) for r in config.data_rank_list) * config.block_size,
            min_tokens=config.adaptive_min_tokens,
            max_tokens=config.adaptive_max_tokens,
        )
        # Early Inits need the Encode's return and the rank's reservation in one process (see _attempt).
        self.early_init = config.early_init and config.tp == 1
        self.requests: TransferTable[GenerateRecord] = TransferTable(config.history_size)
        # Each attempt's Encode call when it carries rank 0's statuses (EncodeExchange), until
        # the attempt ends: an abandoned one's call is ended after its Cancel (`_attempt`).
        self._exchanges: dict[str, EncodeExchange] = {}
        self.server: rpc.GrpcServer | None = None
        self.children: list = []
        self.port = 0
        self.draining = False
        self._shutdown_done = False

    @property
    def transport(self) -> MooncakeTransport | None:
        return self.worker.transport

    @property
    def metrics_port(self) -> int:
        return self.worker.metrics_port

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self.children]

    async def start(self) -> None:
        cfg = self.config
        self.group.bind(self.worker.on_admit, self._group_broken, pool_stats=self.worker.pool_stats)
        if cfg.tp > 1:
            self.children = ranks.spawn(
                cfg, self.language_id, self.dist_init, self.worker.parts.rank_command
            )
        try:
            await self.group.start()
            await self.worker.start()
            await self.group.begin()  # every rank registered with the encoder
        except BaseException:
            ranks.stop(self.children)
            raise
        sec = rpc.ServerSecurity.from_config(cfg)
        self.server = rpc.GrpcServer(
            SERVICE_NAME,
            lambda server: language_pb2_grpc.add_LanguageServicer_to_server(
                LanguageServicer(self, sec), server
            ),
            interceptors=[self.worker.metrics.interceptor()],
            sec=sec,
            bench=LanguageBenchServicer(self) if cfg.enable_bench else None,
        )  # off in production
        self.port = await self.server.start(cfg.host, cfg.port)
        assert self.transport is not None  # the worker's start() made it
        known = {
            self.port: "gRPC",
            self.metrics_port: "metrics",
            self.transport.handshake_port: "Mooncake handshake",
        }
        if self.dist_init.startswith("tcp://"):
            known[int(self.dist_init.rpartition(":")[2])] = "torch.distributed rendezvous"
        exposure.report("language rank 0", cfg.host, known)
        log.info(
            "language %s serving on %s:%d, %d rank(s) (data ranks %s), session %s, encoders %s (%s, %d available)",
            self.language_id,
            cfg.host,
            self.port,
            cfg.tp,
            list(cfg.data_rank_list),
            self.transport.session,
            [v.address for v in self.worker.encoders.views],
            cfg.encoder_policy,
            self.worker.encoders.available,
        )
        if self.children:
            asyncio.get_running_loop().create_task(self._watch_children())

    async def _watch_children(self) -> None:
        """A rank process that exits breaks the instance (the collective notices too)."""
        waits = {asyncio.ensure_future(asyncio.to_thread(c.wait)): c for c in self.children}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not self._shutdown_done:
            exited = {waits[t].pid: waits[t].returncode for t in done}
            self._group_broken(f"rank process exited (pid: exit code) {exited}")

    def _group_broken(self, why: str) -> None:
        log.error("language %s is unhealthy: %s", self.language_id, why)
        self.group._break(why)
        if self.server is not None:
            asyncio.get_running_loop().create_task(self.server.set_not_serving())

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful and idempotent: NOT_SERVING, new Generates get UNAVAILABLE, in-flight ones
        get `shutdown_grace_s` to finish and are then cancelled (freeing both sides), the ranks
        are told to stop, memory is unregistered."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.draining = True
        if self.server is not None:
            await self.server.set_not_serving()
        tasks = [r.task for r in self.requests.live if r.task is not None]
        if tasks:
            log.info(
                "language shutting down: waiting up to %.1f s for %d request(s)", grace, len(tasks)
            )
            await asyncio.wait(tasks, timeout=grace)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self.server is not None:
            await self.server.stop(1.0)
        await self.group.close()  # tells ranks 1..N-1 to shut down
        await asyncio.to_thread(ranks.stop, self.children, 15)
        await self.worker.close()

    # ------------------------------------------------------------------ Generate

    async def generate(
        self, request: language_pb2.GenerateRequest, deadline_s: float | None, principal: str = ""
    ) -> language_pb2.GenerateReply:
        request_id = request.request_id or str(uuid.uuid4())
        if len(request_id.encode("utf-8")) > MAX_REQUEST_ID_BYTES:
            raise errors.InvalidArgument(
                f"request_id is {len(request_id.encode())} bytes, above {MAX_REQUEST_ID_BYTES}"
            )
        if request.synthetic_tokens == 0 and not request.text and not request.images:
            raise errors.InvalidArgument(
                f"request {errors.shown(request_id)}: no images, no text and synthetic_tokens=0"
            )
        # Before any block is reserved (the encoder checks the same limits again at Encode).
        check_images(
            f"request {errors.shown(request_id)}",
            [len(im.data) for im in request.images],
            max_images=self.config.max_images,
            max_image_bytes=self.config.max_image_bytes,
        )
        self._refuse_when_unhealthy(f"Generate of request {errors.shown(request_id)}")
        record = GenerateRecord(request_id, "", principal)
        record.worker = self.worker
        self.requests.add(request_id, record)  # ALREADY_EXISTS for an id in use
        timeout = (
            min(deadline_s, self.config.generate_timeout_s)
            if deadline_s
            else self.config.generate_timeout_s
        )
        # The work runs in a task of our own: Cancel and deadlines cancel it, never the gRPC
        # handler, which must stay alive to send the client its status.
        work = asyncio.ensure_future(self._generate(request_id, request, record))
        record.task = work
        try:
            done, _ = await asyncio.wait({work}, timeout=timeout)
            if not done:
                record.cancel_reason = f"no result within the deadline of {timeout:.3f} s"
                await cancel_and_wait(work)
                raise errors.DeadlineExceeded(
                    f"request {errors.shown(request_id)} did not finish within {timeout:.3f} s"
                )
            if work.cancelled():
                raise errors.Cancelled(
                    f"request {errors.shown(request_id)} was cancelled: {record.cancel_reason}"
                )
            return work.result()
        except asyncio.CancelledError:  # the client went away
            record.cancel_reason = record.cancel_reason or "the client cancelled the call"
            await asyncio.shield(cancel_and_wait(work))
            raise
        except errors.EpdError as e:
            record.failure = e
            raise
        finally:
            record.finished_at = time.monotonic()
            self.requests.finish(request_id, record)

    def _refuse_when_unhealthy(self, what: str) -> None:
        if self.group.broken:
            raise errors.Unavailable(f"{what}: language instance is unhealthy: {self.group.broken}")
        if self.draining:
            raise errors.Unavailable(f"{what}: language {self.language_id} is shutting down")

    async def _generate(
        self, request_id: str, request, record: GenerateRecord
    ) -> language_pb2.GenerateReply:
        """Pick an encoder and run the request there (`_attempt`). When that encoder fails before
        any byte reached any rank (Encode refused as unavailable or out of source blocks, the
        encoder lost before round 1), run it once more on another encoder under a fresh transfer
        id (`ID#2`); once bytes were delivered, the failure is the answer."""
        started = time.monotonic()
        tried: list[int] = []
        first_error: errors.EpdError | None = None
        scope = self._cache_scope(record.principal)
        digests = await self._image_digests(request, scope)
        while True:
            if first_error is None:
                view = await self._pick_encoder(request_id, tried, digests)
            else:
                view = self.worker.encoders.pick(exclude=tried, images=digests)
                if view is None:  # nowhere else to go: the first failure is the answer
                    raise first_error
                record.failed_over_from = record.encoder
                self.worker.telemetry.failed_over()
                log.warning(
                    "request %s: failing over from encoder %s to %s: %s",
                    request_id,
                    record.encoder,
                    self.worker.encoders.name(view.index),
                    first_error.message,
                )
            tried.append(view.index)
            attempt = len(tried)
            name = TransferId(self.language_id, request_id, attempt)
            while attempt > 1 and (
                name.key in self.group.views or self.requests.live_get(name.key) is not None
            ):  # a client's own request id already looks like this attempt's: take the next
                name = dataclasses.replace(name, attempt=name.attempt + 1)
            record.key = name.key
            record.attempts = attempt
            record.encoder = self.worker.encoders.name(view.index)
            record.encoder_address = view.address
            record.outcome = None
            view.inflight += 1
            view.picked += 1
            try:
                return await self._attempt(
                    request_id,
                    request,
                    record,
                    view,
                    started,
                    digests,
                    scope,
                    may_retry=attempt < MAX_ATTEMPTS,
                )
            except _RetryElsewhere as retry:
                first_error = retry.error
            finally:
                view.inflight -= 1

    def _cache_scope(self, principal: str) -> str:
        """EncodeRequest.cache_scope of a caller's requests: under --embedding-cache-scope
        identity a hash of its identity (the encoder needs to tell callers apart, not to know
        them), else "" (shared)."""
        if self.config.cache_scope != "identity":
            return ""
        return hashlib.sha256(f"epd-cache-scope\0{principal}".encode()).hexdigest()

    @staticmethod
    async def _image_digests(request, scope: str) -> list[bytes]:
        """Each image's `image_digest` under the caller's scope (what the encoder choice and the
        held rows go by); big images are hashed in a worker thread."""
        images = [im.data for im in request.images]
        if sum(len(data) for data in images) <= HASH_ON_LOOP_BYTES:
            return [image_digest(data, scope) for data in images]
        return await asyncio.to_thread(lambda: [image_digest(data, scope) for data in images])

    async def _pick_encoder(self, request_id: str, tried: list[int], digests: list[bytes]):
        """An available encoder, preferring one that holds the request's images (selection.py);
        waits up to CONNECT_WAIT_S for one (e.g. a restarting encoder), then UNAVAILABLE naming
        each encoder's state."""
        deadline = time.monotonic() + CONNECT_WAIT_S
        while True:
            view = self.worker.encoders.pick(exclude=tried, images=digests)
            if view is not None:
                return view
            if time.monotonic() > deadline:
                states = "; ".join(
                    f"{v.address}: {v.last_error or ('not registered' if not v.registered else 'unavailable')}"
                    for v in self.worker.encoders.views
                )
                raise errors.Unavailable(
                    f"request {errors.shown(request_id)}: no encoder available ({states})",
                    reason=FailureReason.PEER_LOST,
                )
            await asyncio.sleep(0.05)

    async def _attempt(
        self,
        request_id: str,
        request,
        record: GenerateRecord,
        view,
        started: float,
        digests: list[bytes],
        scope: str,
        *,
        may_retry: bool,
    ) -> language_pb2.GenerateReply:
        """Encode, and admit the request to every rank, which reserve destination blocks (blind
        to the size: the allocation policy decides) and Init (admission.py). A single-rank
        instance admits it alongside the Encode when its pool has room to spare (`early_init`),
        so the Init's round trip overlaps the encoding; otherwise after the Encode returned."""
        link = self.worker.encoders.links[view.index]
        transfer_id = self.worker.transfer_id(record.key)
        admission = Admission(
            self.worker,
            self.group,
            record.key,
            initial_tokens=self.policy.initial_tokens(request.expected_tokens),
            want_digest=request.want_digest,
            encoder=view.index,
            early_allowed=self.early_init and not self.policy.size_first,
            bound_tokens=self.policy.max_initial_tokens(),
            fingerprint=link.model_fingerprint,
            images=digests,
        )
        try:
            carried = await admission.early()  # the Init just ahead of the Encode, or inside it
            record.early_init = admission.is_early
            try:
                encoded = await self._encode(
                    link, view, transfer_id, request, scope, carried, admission
                )
            except errors.EpdError as e:
                if may_retry and _encoder_unusable(e):
                    raise _RetryElsewhere(e) from None
                raise
            finally:
                admission.encode_returned()
            record.encoded_at = encoded.returned_at or time.monotonic()
            self.worker.encoders.affinity.remember(view.index, digests)
            total = encoded.total_tokens
            if self.policy.size_first and admission.spec is None:  # the Encode said it first
                admission.late(self._sized(total, "encode_reply"))
            admission.late()
            outcome: RankOutcome = await admission.outcome()
            record.outcome = outcome
            if not outcome.decision.deliver:
                error = errors.error_for_reason(
                    outcome.decision.reason, _failure_message(request_id, outcome)
                )
                if (
                    may_retry
                    and _nothing_delivered(outcome)
                    and outcome.decision.reason in RETRY_REASONS
                    and not self.group.broken
                ):
                    raise _RetryElsewhere(error)
                raise error
            self.policy.observe(total)
            assert admission.spec is not None  # admitted
            return self._reply(
                request_id, admission.spec.initial_tokens, outcome, encoded, started, record
            )
        except BaseException as e:
            self.worker.drop_claim(record.key)
            if admission.spec is None:  # never admitted: no receive task will take the stream
                self.worker.drop_stream(record.key)
            # One shielded clean-up: the Generate's own deadline and the client's cancellation
            # can both cancel this task, and a second cancel must not skip the Cancel on the
            # encoder (its source blocks would wait for the bootstrap timeout). For a retry it
            # also means: the first encoder answered our Cancel (no write of this attempt is in
            # flight) or cannot be reached, before the second attempt allocates anything.
            retry = isinstance(e, _RetryElsewhere)
            await asyncio.shield(
                self._abandon(
                    record,
                    link,
                    transfer_id,
                    admission.outcome_future,
                    e.error if isinstance(e, _RetryElsewhere) else e,
                    final=not retry,
                )
            )
            # The encoder has the Cancel (or cannot be reached): the Encode's call may end now
            # without the encoder taking it for a lost rank 0.
            exchange = self._exchanges.pop(record.key, None)
            if exchange is not None:
                exchange.cancel()
            raise
        finally:
            self._exchanges.pop(record.key, None)

    async def _encode(
        self,
        link,
        view,
        transfer_id: str,
        request,
        scope: str,
        carried: CarriedInit | None,
        admission: Admission,
    ) -> Encoded:
        """The Encode, carrying the rank's early Init, if any. When rank 0 receives data (and
        `--encode-stream`), rank 0's statuses come on the Encode's own call (EncodeExchange),
        and its receive task takes them (`stream_ahead`): one call per request fewer.
        Size-first (`--alloc-policy auto`): the request is admitted, with exactly the payload's
        size reserved, as soon as the encoder says the size, while its model still runs
        (admission.py)."""
        size_first = self.policy.size_first
        encode_request = link.encode_request(
            transfer_id,
            [(im.data, im.mime_type) for im in request.images],
            request.text,
            request.synthetic_tokens,
            request.synthetic_seed,
            self.worker.rank_count,
            init=carried,
            cache_scope=scope,
            announce_size=size_first,
        )
        exchange = None
        stream: StatusSource | None = None
        # Not behind an early Init sent on its own: that went first, with rank 0's stream.
        own_init_first = admission.is_early and carried is None
        if self.worker.is_data_rank and self.config.encode_stream and not own_init_first:
            exchange = link.encode_exchange(encode_request, carried)
            self._exchanges[admission.key] = exchange
            stream, replied = exchange.statuses, exchange.encoded()
        else:
            if size_first:
                stream = link.status(transfer_id, self.worker.rank, await_transfer=True)
            replied = link.encode(encode_request, carried)
        announced = AnnouncedSize(stream) if size_first and stream is not None else None
        if stream is not None:
            self.worker.stream_ahead(admission.key, announced or stream)
        encoding = asyncio.ensure_future(self._until_encoded(view, replied))
        sizing = asyncio.ensure_future(announced.size()) if announced is not None else None
        try:
            if sizing is not None:
                await asyncio.wait({encoding, sizing}, return_when=asyncio.FIRST_COMPLETED)
                if sizing.done() and sizing.result() and not encoding.done():
                    admission.late(self._sized(sizing.result(), "status"))
            return await encoding
        except BaseException:
            # Not admitted: nobody else reads the call. Admitted: the call ends once the attempt
            # is abandoned (`_attempt`), after the Cancel reached the encoder, which would record
            # an earlier end of rank 0's statuses as a lost peer.
            if exchange is not None and admission.spec is None:
                exchange.cancel()
            raise
        finally:
            if sizing is not None:
                sizing.cancel()
            if not encoding.done():
                await cancel_and_wait(encoding)

    def _sized(self, total_tokens: int, size_from: str) -> int:
        """What a size-first request reserves, counted by where its size came from."""
        tokens = self.policy.sized_tokens(total_tokens)
        exact = "exact" if tokens == total_tokens else "default"
        self.worker.telemetry.size_first_admitted(size_from, exact)
        return tokens

    @staticmethod
    async def _until_encoded(view, replied: Awaitable[Encoded]) -> Encoded:
        """The Encode's reply; given up (UNAVAILABLE) when the encoder leaves the rotation
        meanwhile, so a call waiting for a dead encoder's channel does not wait for the whole
        deadline."""
        call = asyncio.ensure_future(replied)
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=encoders.POLL_S)
                if done:
                    return call.result()
                if not view.available:
                    await cancel_and_wait(call)
                    raise errors.Unavailable(
                        f"Encode on encoder {view.address}: the encoder left the rotation "
                        f"({view.last_error or 'unavailable'})",
                        reason=FailureReason.PEER_LOST,
                    )
        finally:
            await cancel_and_wait(call)

    async def _abandon(
        self,
        record: GenerateRecord,
        link,
        transfer_id: str,
        outcome_fut: asyncio.Future | None,
        e: BaseException,
        *,
        final: bool = True,
    ) -> None:
        """End a failed or cancelled attempt on every rank and on its encoder."""
        reason = e.reason if isinstance(e, errors.EpdError) else FailureReason.CANCELLED
        if outcome_fut is None:  # never admitted (Encode refused, cancelled): no rank reports it
            if final:
                self.worker.telemetry.transfer_ended(
                    TransferState.FAILED,
                    reason if reason else FailureReason.INVALID,
                    seconds=None,
                    rounds=0,
                )
        else:
            if not outcome_fut.done():
                self.worker.fail_local(record.key, reason)
                # Bounded: a rank group that broke meanwhile may never report this request.
                done, _ = await asyncio.wait({outcome_fut}, timeout=ABANDON_WAIT_S)
                if not done:
                    log.warning(
                        "request %s: no rank outcome within %.0f s of abandoning it (%s)",
                        record.request_id,
                        ABANDON_WAIT_S,
                        self.group.broken or "rank group still running",
                    )
            if (
                record.outcome is None
                and outcome_fut.done()
                and not outcome_fut.cancelled()
                and outcome_fut.exception() is None
            ):
                record.outcome = outcome_fut.result()  # inspection shows every rank's part
        # End the transfer on the encoder too (the Encode opened it), and wait until its source
        # blocks are free.
        why = (
            str(e)
            or (record.cancel_reason if isinstance(e, asyncio.CancelledError) else "")
            or type(e).__name__
        )
        await self._cancel_on_encoder(link, transfer_id, why, reason)

    async def _cancel_on_encoder(
        self, link, transfer_id: str, why: str, failure: FailureReason = FailureReason.CANCELLED
    ) -> None:
        try:
            await link.cancel(transfer_id, why, failure)
        except errors.NotFound:
            pass
        except errors.EpdError as e:
            log.info("transfer %s: Cancel on encoder %s: %s", transfer_id, link.address, e)

    def _reply(
        self,
        request_id: str,
        initial_tokens: int,
        outcome: RankOutcome,
        encoded: Encoded,
        started: float,
        record: GenerateRecord,
    ) -> language_pb2.GenerateReply:
        rows = outcome.decision.rows
        receiver = outcome.receiver
        total = encoded.total_tokens
        # Every data rank fills the same reused rows: the encoder skips only what all of them hold.
        spans = (receiver.reuse.spans or ()) if receiver else ()
        reused = sum(s.tokens for s in spans if s.reused)
        cached = sum(s.tokens for s in spans if s.reused or s.image in encoded.cached_images)
        rounds = receiver.rounds if receiver else max((r.rounds for r in rows), default=0)
        # From the Init, or from the Encode's return when the Init went out alongside it (the
        # transfer cannot start before both).
        transfer_s = (
            (receiver.finished_at - max(receiver.init_at, record.encoded_at))
            if receiver and receiver.init_at and receiver.finished_at
            else time.monotonic() - started
        )
        reports = [
            language_pb2.RankReport(
                rank=r,
                data_rank=r in self.config.data_rank_list,
                payload_sha256=row.digest.hex(),
                received_tokens=row.sent,
                rounds=row.rounds,
                transferred_tokens=row.sent - reused if row.sent else 0,
                reused_tokens=reused if row.sent else 0,
            )
            for r, row in enumerate(rows)
        ]
        return language_pb2.GenerateReply(
            request_id=request_id,
            total_tokens=total,
            rounds=rounds,
            bytes=total * self.pool.record.payload_bytes_per_token,
            transfer_seconds=transfer_s,
            total_seconds=time.monotonic() - started,
            integrity_verified=receiver.integrity_verified if receiver else self.config.integrity,
            encoder=record.encoder,
            attempts=record.attempts,
            failed_over_from=record.failed_over_from,
            transfer_id=self.worker.transfer_id(record.key),
            early_init=record.early_init,
            overlapped_rounds=receiver.overlapped_rounds if receiver else 0,
            payload_sha256=outcome.digest or next((r.digest.hex() for r in rows if r.digest), ""),
            first_token_id=outcome.consumer.first_token_id if outcome.consumer else -1,
            initial_allocated_tokens=receiver.initial_allocated_tokens
            if receiver
            else initial_tokens,
            ranks=reports,
            agreement_seconds=outcome.agreement_seconds,
            logits=_logits_summary(outcome.consumer),
            consumer=self.worker.consumer.name,
            cached_tokens=cached,
            transferred_tokens=total - reused,
        )

    async def measure_link(
        self, tokens: int, repeats: int, concurrency: int, write_wait: str = ""
    ) -> bench_pb2.MeasureLinkReply:
        """epd bench's baseline: the encoder writes plain Mooncake writes into blocks of rank 0's
        pool reserved for the measurement (so no transfer can be hurt), then they are freed."""
        if tokens < 1 or repeats < 1 or concurrency < 1:
            raise errors.InvalidArgument(
                f"tokens={tokens}, repeats={repeats}, concurrency={concurrency}: each must be >= 1"
            )
        if write_wait not in ("", *WRITE_WAITS):
            raise errors.InvalidArgument(
                f"write_wait={errors.shown(write_wait)}: must be '', 'spin' or 'poll'"
            )
        self._refuse_when_unhealthy("MeasureLink")
        n = concurrency * blocks_for_tokens(tokens, self.pool.block_size)
        if n > self.pool.num_blocks:
            raise errors.InvalidArgument(
                f"concurrency * tokens = {concurrency} * {tokens} needs {n} blocks, more than the pool's {self.pool.num_blocks}"
            )
        blocks = await self.pool.allocator.alloc(
            n, timeout=self.config.alloc_timeout_s, label="MeasureLink"
        )
        answered = False
        try:
            reply = await self.worker.link.raw_write(
                0, blocks, tokens, repeats, concurrency, write_wait
            )
            answered = True
        except errors.EpdError as e:
            # The encoder answers RawWrite (reply or error) only once no write of it can land;
            # an unreachable or interrupted call proves nothing of the sort.
            answered = not isinstance(
                e, (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled, errors.Internal)
            )
            raise
        finally:
            if answered:
                self.pool.allocator.free(blocks)
            else:
                self.worker.hold_unconfirmed(blocks, "MeasureLink")
        return bench_pb2.MeasureLinkReply(
            seconds=reply.seconds,
            bytes=reply.bytes,
            descriptors=reply.descriptors,
            encoder=self.worker.link.encoder_id or self.worker.link.address,
        )

    async def cancel(
        self,
        request_id: str,
        reason: str,
        principal: str = "",
        sec: rpc.ServerSecurity | None = None,
    ) -> tuple[bool, TransferState]:
        record = self.owned(request_id, principal, sec)
        if self.requests.live_get(request_id) is None or record.task is None or record.task.done():
            return False, record.state
        record.cancel_reason = reason
        await cancel_and_wait(record.task)
        return True, record.state

    def owned(
        self, request_id: str, principal: str, sec: rpc.ServerSecurity | None
    ) -> GenerateRecord:
        """The Generate, when `principal` made it or is an admin; another identity's is NOT_FOUND,
        like an unknown id (its existence is not confirmed either)."""
        record = self.requests.require(request_id)
        if sec is not None and not sec.may_see(principal, record.principal):
            raise errors.NotFound(f"request {errors.shown(request_id)} is not known")
        return record


MAX_ATTEMPTS = 2  # the first encoder, then one other
ABANDON_WAIT_S = 15.0  # longest an abandoned attempt waits for its ranks' outcome
CONNECT_WAIT_S = 10.0  # how long a Generate waits for some encoder to be available
# Decided failures that may mean "the encoder, not the request": retried elsewhere when no rank
# received a byte.
RETRY_REASONS = (FailureReason.PEER_LOST, FailureReason.TRANSPORT)


class _RetryElsewhere(Exception):
    """An attempt failed before any byte was delivered, in a way another encoder may not."""

    def __init__(self, error: errors.EpdError):
        super().__init__(error.message)
        self.error = error


def _encoder_unusable(e: errors.EpdError) -> bool:
    """An Encode failure that says nothing about the request: the encoder is unreachable,
    draining, or out of source blocks."""
    return (
        isinstance(e, (errors.Unavailable, errors.ResourceExhausted))
        or e.reason == FailureReason.PEER_LOST
    )


def _nothing_delivered(outcome: RankOutcome) -> bool:
    rows = outcome.decision.rows
    receiver = outcome.receiver
    return all(row.sent == 0 and row.rounds == 0 for row in rows) and (
        receiver is None or receiver.sent_tokens == 0
    )


def _logits_summary(result) -> language_pb2.LogitsSummary | None:
    """GenerateReply.logits from a consumer's result (unset when the consumer computes none)."""
    if result is None or not (result.vocab_size or result.skipped):
        return None
    return language_pb2.LogitsSummary(
        top_token_ids=result.top_token_ids,
        top_logits=result.top_logits,
        norm=result.logits_norm,
        sum=result.logits_sum,
        vocab_size=result.vocab_size,
        mrope_position_delta=result.position_delta,
        prefill_tokens=result.prefill_tokens,
        prefill_seconds=result.prefill_seconds,
        skipped=result.skipped,
    )


def _failure_message(request_id: str, outcome: RankOutcome) -> str:
    receiver = outcome.receiver
    if receiver is not None and receiver.message:
        return f"request {request_id}: {receiver.message}"
    failed = [r for r, row in enumerate(outcome.decision.rows) if row.failed]
    return (
        f"request {request_id} failed ({outcome.decision.reason.label}) on rank(s) {failed or '?'}"
    )


class LanguageServicer(language_pb2_grpc.LanguageServicer):
    """The Language service. A caller sees and cancels only the Generates its own identity made
    (admins: all), and sees this instance's Mooncake session and pool address only when it is
    this instance's identity (or an admin)."""

    def __init__(self, service: LanguageService, sec: rpc.ServerSecurity | None = None):
        self.s = service
        self.sec = sec or rpc.ServerSecurity()

    @rpc.grpc_errors
    async def Generate(self, request, context):
        return await self.s.generate(request, context.time_remaining(), rpc.peer_identity(context))

    @rpc.grpc_errors
    async def GetTransfer(self, request, context):
        if not request.request_id:
            raise errors.InvalidArgument("request_id is empty")
        return record_info(
            self.s, self.s.owned(request.request_id, rpc.peer_identity(context), self.sec)
        )

    @rpc.grpc_errors
    async def ListTransfers(self, request, context):
        states = []
        for v in request.states:
            try:
                states.append(TransferState(v))
            except ValueError:
                raise errors.InvalidArgument(f"states: unknown TransferState value {v}") from None
        caller = rpc.peer_identity(context)
        mine = [
            r for r in self.s.requests.select(states, 0) if self.sec.may_see(caller, r.principal)
        ]
        if request.limit:
            mine = mine[: request.limit]
        return common_pb2.ListTransfersReply(transfers=[record_info(self.s, r) for r in mine])

    @rpc.grpc_errors
    async def Cancel(self, request, context):
        if not request.request_id:
            raise errors.InvalidArgument("request_id is empty")
        cancelled, state = await self.s.cancel(
            request.request_id,
            request.reason or "no reason given",
            rpc.peer_identity(context),
            self.sec,
        )
        return common_pb2.CancelReply(cancelled=cancelled, state=rpc.state_to_pb(state))

    @rpc.grpc_errors
    async def GetPool(self, request, context):
        shown_to = self.sec.may_see(rpc.peer_identity(context), self.sec.own_identity)
        assert self.s.transport is not None  # serving implies started
        info = rpc.pool_info(self.s.pool, self.s.transport.session, 0, addresses=shown_to)
        if not self.s.group.broken:
            await self.s.group.refresh()
        info.embedding_cache.CopyFrom(rpc.cache_info(self.s.worker.held.rows.stats()))
        for rank, stats in enumerate(self.s.group.rank_pools):
            used, free, waiters, quarantined = stats[:4]
            info.rank_pools.append(
                common_pb2.RankPool(
                    rank=rank,
                    used_blocks=used,
                    free_blocks=free,
                    waiters=waiters,
                    quarantined_blocks=quarantined,
                    embedding_cache=rpc.cache_info(stats[4:]),
                )
            )
        return info

    @rpc.grpc_errors
    async def GetDiagnostics(self, request, context):
        info = rpc.diagnostics(self.s.requests)
        shown_to = self.sec.may_see(rpc.peer_identity(context), self.sec.own_identity)
        directory = self.s.worker.encoders
        for view in directory.views:
            info.encoders.append(
                common_pb2.EncoderState(
                    address=view.address if shown_to else "",
                    encoder_id=directory.links[view.index].encoder_id,
                    available=view.available,
                    registered=view.registered,
                    retired=view.retired,
                    in_flight=view.inflight,
                    live_transfers=view.live_transfers,
                    picked=view.picked,
                    last_error=view.last_error,
                )
            )
        return info


class LanguageBenchServicer(bench_pb2_grpc.BenchServicer):
    """epd.v1.Bench on the language (MeasureLink), served only with --enable-bench."""

    def __init__(self, service: LanguageService):
        self.s = service

    @rpc.grpc_errors
    async def MeasureLink(self, request, context):
        return await self.s.measure_link(
            request.tokens, request.repeats, request.concurrency or 1, request.write_wait
        )


def record_info(service: LanguageService, r: GenerateRecord) -> common_pb2.TransferInfo:
    """Rank 0's record plus every rank's view (the latest rows of the rank group)."""
    info = common_pb2.TransferInfo(
        request_id=r.request_id,
        state=rpc.state_to_pb(r.state),
        peer=r.encoder_address,
        age_seconds=time.monotonic() - r.created,
    )
    rows: tuple[RankRow, ...] = ()
    if r.outcome is not None:
        rows = r.outcome.decision.rows
    elif r.key in service.group.rows:
        rows = service.group.rows[r.key]
    elif r.key in service.group.views:
        rows = (service.group.views[r.key].row,)
    receiver = r.outcome.receiver if r.outcome else service.worker.receivers.get(r.key)
    if receiver is not None:
        info.sent_tokens, info.total_tokens, info.rounds = (
            receiver.sent_tokens,
            receiver.total_tokens,
            receiver.rounds,
        )
        info.allocated_tokens = receiver.allocated_tokens
        if receiver.init_at is not None:
            info.bootstrap_seconds = receiver.init_at - r.created
        if receiver.finished_at is not None and receiver.init_at is not None:
            info.transfer_seconds = receiver.finished_at - receiver.init_at
    elif rows:
        info.sent_tokens = max(row.sent for row in rows)
        info.total_tokens = max(row.total for row in rows)
        info.rounds = max(row.rounds for row in rows)
    info.bytes = info.sent_tokens * service.pool.record.payload_bytes_per_token
    failure = r.failure
    if failure is not None:
        info.error.CopyFrom(
            common_pb2.TransferError(
                reason=rpc.reason_to_pb(failure.reason), message=failure.message
            )
        )
    elif r.outcome is not None and not r.outcome.decision.deliver:
        info.error.CopyFrom(
            common_pb2.TransferError(
                reason=rpc.reason_to_pb(r.outcome.decision.reason),
                message=_failure_message(r.request_id, r.outcome),
            )
        )
    failed = r.outcome is not None and not r.outcome.decision.deliver
    for rank, row in enumerate(rows):
        # Rows are what each rank had observed when they agreed; a failed request failed on all.
        state = TransferState.FAILED if failed else row.state
        info.ranks.append(
            common_pb2.RankView(
                rank=rank,
                state=rpc.state_to_pb(state),
                sent_tokens=row.sent,
                allocated_tokens=0 if r.outcome else row.allocated,
            )
        )
    return info
