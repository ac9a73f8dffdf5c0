"""The encoder service: its pool, Mooncake engine, sessions, transfers, and the gRPC servicer.

`EncoderService.start()` allocates the source pool, registers it with Mooncake once, starts the
gRPC server (Encoder + health + reflection) and only then reports SERVING. `shutdown()` is
idempotent: health NOT_SERVING, stop accepting, fail live transfers, stop the server,
unregister memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from common import errors
from common.bounds import OutOfBounds, Slab, check_plan
from common.config import WRITE_WAITS, EncoderConfig
from common.device import settle
from common.fence import WriteFence, quarantine_until_landed
from common.integrity import INLINE_MAX_BYTES, PayloadSums, checksums_off_loop, fast_checksums
from common.layout import PoolGeometry
from common.limits import check_held_images, check_images
from common.pb.epd.v1 import bench_pb2, bench_pb2_grpc, common_pb2, encoder_pb2, encoder_pb2_grpc
from common.plan import blocks_for_tokens, plan_round
from common.pool import BlockPool
from common.states import FailureReason, StatusUpdate, TransferState
from common.table import TransferTable
from common.telemetry import Telemetry
from common.transfer_id import TransferId
from common.transport import MooncakeTransport, memory_location
from services.edge import exposure, rpc
from services.edge.metrics import Metrics
from services.encoder.models import EncodeInputs, SyntheticModel, load_model, validate_images
from services.encoder.possession import CHALLENGE_TTL_S, Challenges, ProofReader
from services.encoder.transfer import EncoderTransfer, PeerSession, validate_allocation
from services.models.embedding_cache import IMAGES, EmbeddingCache, EncodedImages
from services.parts import Parts

log = logging.getLogger(__name__)

MAX_CACHE_SCOPE_CHARS = 128  # EncodeRequest.cache_scope (the language sends a 64-character hash)
CANCELLED_UNKNOWN_KEPT = 4096  # ids cancelled before they began here, kept to refuse them later

SERVICE_NAME = "epd.v1.Encoder"
MAX_RAW_REPEATS = 1000
MAX_RAW_CONCURRENCY = 256
_PUMP_DONE = object()  # EncodeStream: one of its two parts ended
BENCH_FILL_BYTE = 0xA5  # what a RawWrite sends: a pattern the bench wrote, never leftover payloads


class EncoderService:
    """Everything one encoder process owns."""

    def __init__(self, config: EncoderConfig, *, parts: Parts | None = None):
        config.validate()
        self.config = config
        self.bootstrap_timeout_s = config.bootstrap_timeout_s
        self.resume_timeout_s = config.resume_timeout_s
        self.quarantine_max_s = config.quarantine_max_s
        self.integrity = config.integrity
        self.pool = BlockPool(config.record, config.block_size, config.pool_blocks, config.device)
        self.metrics = Metrics("encoder")
        self.telemetry: Telemetry = self.metrics  # what transfers report to (TransferEnv)
        self.metrics_port = 0
        self.parts = parts or Parts()
        self.transport: MooncakeTransport | None = None
        self.synthetic = SyntheticModel()
        self.embedding_cache = EmbeddingCache(
            config.embedding_cache_bytes, on_event=self.metrics.embedding_cache
        )
        self.model = load_model(
            config.model, config.hidden, config.dtype, config.device, self.embedding_cache
        )
        self.sessions: dict[tuple[str, int], PeerSession] = {}
        self._session_used: dict[
            tuple[str, int], float
        ] = {}  # last Register or Init of each registration
        self.transfers: TransferTable[EncoderTransfer] = TransferTable(config.history_size)
        # Ids their owner cancelled before this encoder knew them: (request_id, language_id) ->
        # the caller. Bounded; see `cancelled_before_begun`.
        self._cancelled_unknown: collections.OrderedDict[tuple[str, str], str] = (
            collections.OrderedDict()
        )
        self.server: rpc.GrpcServer | None = None
        self.port = 0
        self.encoder_id = config.encoder_id
        self.draining = False
        self._shutdown_done = False
        self._raw_fences: set[asyncio.Task] = set()  # RawWrite source blocks held by the fence
        self.challenges = Challenges(config.max_sessions_per_identity)
        self.proofs: ProofReader | None = None  # made by start(), with its own engine
        self.proof_transport: MooncakeTransport | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        self.transport = await asyncio.to_thread(
            self.parts.make_transport,
            cfg.host,
            cfg.protocol,
            cfg.rdma_device,
            purpose="writes",
            write_timeout_s=cfg.write_timeout_s,
            wait=cfg.write_wait,
        )
        # Registered once, before any peer can open our segment (peers cache descriptors).
        self.transport.register(
            self.pool.registered_address, self.pool.registered_bytes, memory_location(cfg.device)
        )
        self.metrics.watch_pool(self.pool.allocator, self.pool.record.record_bytes)
        self.metrics.watch_inflight(lambda: len(self.transfers.live))
        # Register's proofs are read by an engine of their own (services/encoder/possession.py).
        self.proof_transport = await asyncio.to_thread(
            self.parts.make_transport, cfg.host, cfg.protocol, cfg.rdma_device, purpose="proofs"
        )
        lanes = ProofReader.new_lanes()
        self.proof_transport.register(lanes.data_ptr(), lanes.numel(), memory_location("cpu"))
        self.proofs = ProofReader(self.proof_transport.read_sync, lanes)
        self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        sec = rpc.ServerSecurity.from_config(cfg)
        self.server = rpc.GrpcServer(
            SERVICE_NAME,
            lambda server: encoder_pb2_grpc.add_EncoderServicer_to_server(
                EncoderServicer(self, sec), server
            ),
            interceptors=[self.metrics.interceptor()],
            sec=sec,
            bench=EncoderBenchServicer(self) if cfg.enable_bench else None,
        )  # off in production
        self.port = await self.server.start(cfg.host, cfg.port)
        self.encoder_id = cfg.encoder_id or f"{socket.gethostname()}:{self.port}"
        exposure.report(
            "encoder",
            cfg.host,
            {
                self.port: "gRPC",
                self.metrics_port: "metrics",
                self.transport.handshake_port: "Mooncake handshake",
                self.proof_transport.handshake_port: "Mooncake handshake (proofs)",
            },
        )
        log.info(
            "encoder %s serving on %s:%d, session %s, pool %d x %d tokens x %d B on %s",
            self.encoder_id,
            cfg.host,
            self.port,
            self.transport.session,
            cfg.pool_blocks,
            cfg.block_size,
            self.pool.record.record_bytes,
            cfg.device,
        )

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful and idempotent: NOT_SERVING, refuse new requests (UNAVAILABLE), give live
        transfers `shutdown_grace_s` to finish, fail the rest, stop the server, unregister memory."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.draining = True
        if self.server is not None:
            await self.server.set_not_serving()
        live = [t.done for t in self.transfers.live]
        if live:
            log.info(
                "encoder shutting down: waiting up to %.1f s for %d live transfer(s)",
                grace,
                len(live),
            )
            await asyncio.wait([asyncio.ensure_future(ev.wait()) for ev in live], timeout=grace)
        for t in self.transfers.live:
            t.fail(FailureReason.CANCELLED, "encoder shutting down")
        tasks = [t.task for t in self.transfers.live if t.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._wait_for_fences(grace)
        if self.server is not None:
            await self.server.stop(1.0)
        if self.transport is not None:
            self.transport.close()
        if self.proof_transport is not None:
            self.proof_transport.close()
        self.metrics.close()

    async def _wait_for_fences(self, timeout: float) -> None:
        """Shutdown: writes that may still land keep reading the source pool, which must stay
        registered until they are final: wait for them (at most `timeout`), then say what is left.
        (The language ranks quarantine their side on their own.)"""
        fences = [
            t.fence_task
            for t in self.transfers.live
            if t.fence_task is not None and not t.fence_task.done()
        ]
        fences += [task for task in self._raw_fences if not task.done()]
        if not fences:
            return
        log.warning(
            "encoder shutting down: waiting up to %.1f s for %d transfer(s) with writes still running",
            timeout,
            len(fences),
        )
        _done, pending = await asyncio.wait(fences, timeout=timeout)
        if pending:
            log.warning(
                "encoder shutting down with %d transfer(s) whose writes are still running (%d quarantined "
                "source block(s)); the language ranks keep their blocks quarantined",
                len(pending),
                self.pool.allocator.quarantined_count,
            )
        else:
            log.info("encoder shutting down: every write ended")

    # ------------------------------------------------------------------ TransferEnv

    async def write(
        self, session: str, triples: Sequence[tuple[int, int, int]], fence: WriteFence
    ) -> None:
        assert self.transport is not None  # start() made it before serving
        await self.transport.write(session, triples, fence=fence)

    async def round_checksums(
        self, blocks: Sequence[int], start: int, n_tokens: int
    ) -> dict[str, int]:
        runs = self.pool.runs(blocks, start, n_tokens)
        return await checksums_off_loop(runs, self.pool.record, start)

    def on_finished(self, transfer: EncoderTransfer) -> None:
        self.transfers.finish(transfer.request_id, transfer)

    # ------------------------------------------------------------------ operations

    def _refuse_when_draining(self, what: str) -> None:
        if self.draining:
            raise errors.Unavailable(f"{what}: encoder {self.encoder_id} is shutting down")

    def cancelled_before_begun(self, request_id: str, language_id: str, principal: str) -> None:
        """Its owner cancelled an id this encoder does not know. An Encode or Init of it may still
        be on its way: the language sent it before the Cancel, but calls are handled in no fixed
        order (an EncodeStream carrying the rank's Init, still queued behind the Cancel). Once
        the Cancel said NOT_FOUND, the language frees the blocks that Init names, so the id is
        kept and its Encode and Init refused: nothing of it may ever run here."""
        if not request_id or not language_id:
            return
        key = (request_id, language_id)
        self._cancelled_unknown[key] = principal
        self._cancelled_unknown.move_to_end(key)
        while len(self._cancelled_unknown) > CANCELLED_UNKNOWN_KEPT:
            self._cancelled_unknown.popitem(last=False)

    def _refuse_cancelled(self, request_id: str, language_id: str, principal: str, what: str):
        if self._cancelled_unknown.get((request_id, language_id)) == principal:
            raise errors.FailedPrecondition(
                f"{what}: its owner cancelled the request before it began here",
                reason=FailureReason.CANCELLED,
                error_reason=errors.TRANSFER_ENDED,
            )

    def challenge(self, language_id: str, rank: int, principal: str = "") -> bytes:
        """A one-time nonce for Register's proof of possession (services/encoder/possession.py)."""
        self._refuse_when_draining("Challenge")
        if not language_id:
            raise errors.InvalidArgument("language_id is empty")
        return self.challenges.issue(principal, language_id, rank)  # bounded per identity itself

    async def register(
        self,
        language_id: str,
        rank: int,
        session: str,
        geometry: PoolGeometry,
        principal: str = "",
        proof_nonce: bytes = b"",
    ) -> None:
        self._refuse_when_draining("Register")
        if not language_id:
            raise errors.InvalidArgument("language_id is empty")
        what = f"Register of language_id {errors.shown(language_id)} rank {rank}"
        host, _, port = session.rpartition(":")
        if (
            not host
            or not (port.isascii() and port.isdigit())
            or not 1 <= int(port) <= 65535
            or any(c.isspace() for c in session)
        ):
            raise errors.InvalidArgument(
                f"session={errors.shown(session)}: must be the Mooncake session 'host:port' (port 1..65535)"
            )
        diffs = self.pool.record.differences(geometry.record)
        if diffs:
            raise errors.FailedPrecondition(
                "layout does not match the encoder's: "
                + "; ".join(diffs)
                + f" (language {errors.shown(language_id)} rank {rank})"
            )
        key = (language_id, rank)
        # A registration belongs to the identity that made it: only the same instance may replace
        # it (a restart keeps its language_id and certificate).
        self._check_replaceable(key, principal, what)
        # The pool itself: only its owner can have put our nonce at its end (possession.py). This
        # holds whatever the session is called (aliases, LAN addresses, DNS names).
        self.challenges.take(principal, language_id, rank, proof_nonce, what)
        assert self.proofs is not None  # start() made it before serving
        await self.proofs.verify(session, geometry, proof_nonce, what, principal)
        self._refuse_when_draining("Register")
        self._check_replaceable(key, principal, what)  # again: the read awaited
        old = self.sessions.get(key)
        if old is not None and old.session == session and old.geometry == geometry:
            self._session_used[key] = time.monotonic()
            return  # idempotent
        generation = old.generation + 1 if old else 0
        self._check_session_room(
            language_id, rank, principal, what
        )  # only now: a failed proof evicts nobody
        self.sessions[key] = PeerSession(
            language_id, rank, session, geometry, generation, principal
        )
        self._session_used[key] = time.monotonic()
        if old is not None:
            log.info(
                "language %s rank %d re-registered: session %s -> %s",
                language_id,
                rank,
                old.session,
                session,
            )
            # Transfers bound to the old session must not write into memory that is no longer
            # that rank's pool (a restarted process): they fail instead.
            for t in self.transfers.live:
                slot = t.ranks.get(rank)
                if slot is not None and slot.peer is old:
                    t.fail(
                        FailureReason.PEER_LOST,
                        f"language {errors.shown(language_id)} rank {rank} re-registered (session {old.session} -> {session})",
                    )

    def _check_replaceable(self, key: tuple[str, int], principal: str, what: str) -> None:
        old = self.sessions.get(key)
        if old is not None and old.principal != principal:
            raise errors.PermissionDenied(
                f"{what}: this session is registered by another identity; only the "
                f"language instance that registered it may replace it"
            )

    def _check_session_room(self, language_id: str, rank: int, principal: str, what: str) -> None:
        """Room for a new (language_id, rank) within the per-identity and the total bound: at the
        bound, the least recently used registration that no live transfer uses is forgotten (its
        language registers again on its next Init: NOT_REGISTERED), else RESOURCE_EXHAUSTED.
        Re-registering an existing one always has room."""
        if (language_id, rank) in self.sessions:
            return
        cfg = self.config
        mine = [k for k, p in self.sessions.items() if p.principal == principal]
        if len(mine) >= cfg.max_sessions_per_identity and not self._forget_idle(mine):
            raise errors.ResourceExhausted(
                f"{what}: this identity already holds {len(mine)} registrations, each in "
                f"use (max_sessions_per_identity={cfg.max_sessions_per_identity})"
            )
        if len(self.sessions) >= cfg.max_sessions and not self._forget_idle(list(self.sessions)):
            raise errors.ResourceExhausted(
                f"{what}: this encoder holds {len(self.sessions)} registrations, each in "
                f"use (max_sessions={cfg.max_sessions})"
            )

    def _forget_idle(self, keys: list[tuple[str, int]]) -> bool:
        """Forget the least recently used of `keys` that no live transfer writes to; False if none."""
        busy = {id(slot.peer) for t in self.transfers.live for slot in t.ranks.values()}
        idle = [k for k in keys if id(self.sessions[k]) not in busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda k: self._session_used.get(k, 0.0))
        log.info(
            "forgetting the registration of language %s rank %d (least recently used, at the bound)",
            *oldest,
        )
        del self.sessions[oldest]
        self._session_used.pop(oldest, None)
        return True

    def registered_by(self, language_id: str, principal: str) -> bool:
        """Whether `principal` registered some rank of `language_id` here."""
        return any(
            p.language_id == language_id and p.principal == principal
            for p in self.sessions.values()
        )

    def _check_transfer_id(
        self, request_id: str, language_id: str, principal: str, what: str
    ) -> None:
        """A new transfer's id and owner: the caller's own registered language. An id shaped like
        `LANGUAGE_ID/...` (how language instances name transfers) must carry such a language, so
        no one can pre-create a transfer id under another instance's prefix."""
        if language_id and not self.registered_by(language_id, principal):
            raise errors.FailedPrecondition(
                f"{what}: language_id {errors.shown(language_id)} has not called Register "
                f"with this identity",
                error_reason=errors.NOT_REGISTERED,
            )
        prefix = TransferId.language_of(request_id)
        if prefix is not None and not self.registered_by(prefix, principal):
            raise errors.PermissionDenied(
                f"{what}: the transfer id's prefix {errors.shown(prefix)} is not a language "
                f"registered by the caller"
            )

    def init(
        self,
        request_id: str,
        language_id: str,
        rank: int,
        rank_count: int,
        blocks: list[int],
        allocated_tokens: int,
        principal: str = "",
        *,
        progress_tokens: int = 0,
        held_images: Sequence[str] = (),
    ) -> EncoderTransfer:
        what = f"Init of request {errors.shown(request_id)} rank {rank}"
        self._refuse_when_draining(what)
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        if rank_count < 1:
            raise errors.InvalidArgument(f"{what}: rank_count={rank_count} must be >= 1")
        if not language_id:
            raise errors.InvalidArgument(f"{what}: language_id is empty")
        peer = self.sessions.get((language_id, rank))
        if peer is None:
            raise errors.FailedPrecondition(
                f"{what}: language_id {errors.shown(language_id)} rank {rank} has not called Register",
                error_reason=errors.NOT_REGISTERED,
            )
        if peer.principal != principal:
            raise errors.PermissionDenied(
                f"{what}: language_id {errors.shown(language_id)} rank {rank} was registered "
                f"by another identity"
            )
        validate_allocation(
            peer, blocks, allocated_tokens, what
        )  # the length first: bounded by the pool
        held = check_held_images(what, held_images, self.config.max_images)
        blocks = list(blocks)
        self._session_used[(language_id, rank)] = time.monotonic()
        existing = self.transfers.live_get(request_id)
        if existing is not None:
            existing.check_owner(language_id, principal, what)
        else:
            self._refuse_cancelled(request_id, language_id, principal, what)
            ended = self.transfers.get(request_id)
            if ended is not None:
                ended.check_owner(
                    language_id, principal, what
                )  # an id stays its owner's while it is known
            self._check_transfer_id(request_id, language_id, principal, what)
            self._check_peer_limit(language_id, principal, what)
            if ended is not None and ended.language_id == language_id and rank in ended.ranks:
                raise errors.AlreadyExists(
                    f"{what}: request already ran ({ended.state.name}); use a new request_id"
                )
            if ended is not None and ended.language_id == language_id and ended.total_tokens:
                # Encoded and ended (e.g. timed out while this rank waited for blocks): a late Init
                # must fail at once, not open a fresh transfer that waits for an Encode.
                raise errors.FailedPrecondition(
                    f"{what}: the request already ended ({ended.state.name}: {ended.message or 'done'})",
                    reason=ended.reason if ended.state == TransferState.FAILED else None,
                    error_reason=errors.TRANSFER_ENDED,
                )
        t = existing or EncoderTransfer(
            request_id, self, language_id=language_id, rank_count=rank_count, principal=principal
        )
        t.add_rank(
            rank,
            rank_count,
            peer,
            blocks,
            allocated_tokens,  # raises before anything is stored
            progress_tokens=progress_tokens,
            held=held,
        )
        if existing is None:
            self.transfers.add(request_id, t)
            t.start()
        return t

    async def encode(
        self,
        request_id: str,
        inputs: EncodeInputs,
        rank_count: int,
        language_id: str,
        principal: str = "",
        *,
        announce_size: bool = False,
    ) -> tuple[int, float, EncodedImages | None]:
        """Encode into source blocks and hand them to the transfer: (tokens, seconds, what the
        model found of the images: where their rows sit, which came from the embedding cache).
        `announce_size`: publish the token count on the transfer's status feed once the source
        blocks are held, before the model runs (EncodeRequest.announce_size)."""
        started = time.monotonic()
        what = f"Encode of request {errors.shown(request_id)}"
        self._refuse_when_draining(what)
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        check_images(
            what,
            [len(data) for data, _mime in inputs.images],
            max_images=self.config.max_images,
            max_image_bytes=self.config.max_image_bytes,
        )
        # Ownership and the per-peer limit before the (possibly slow) validation: a foreign or
        # excess request costs no decoding.
        known = self.transfers.get(request_id)
        if known is not None:
            known.check_owner(language_id, principal, what)
        if self.transfers.live_get(request_id) is None:
            self._refuse_cancelled(request_id, language_id, principal, what)
            self._check_transfer_id(request_id, language_id, principal, what)
            self._check_peer_limit(language_id, principal, what)
        # Bad input changes nothing, not even a transfer an Init already opened: the language
        # gets this error from Encode and cancels the transfer itself.
        if inputs.synthetic_tokens > 0:
            model, total = self._validate_inputs(request_id, inputs)
        else:  # a model may decode images here: off the event loop
            model, total = await asyncio.to_thread(self._validate_inputs, request_id, inputs)
        existing = self.transfers.live_get(request_id)
        if existing is not None:
            existing.begin_encode(rank_count, language_id, principal)
            t = existing
        else:
            ended = self.transfers.get(request_id)
            if ended is not None:
                ended.check_owner(language_id, principal, what)
            if ended is not None and (
                ended.src_blocks is not None or ended.total_tokens or ended.encoding
            ):
                raise errors.AlreadyExists(
                    f"request_id {errors.shown(request_id)} was already encoded ({ended.state.name})"
                )
            self._check_peer_limit(
                language_id, principal, what
            )  # again: the validation above awaited
            t = EncoderTransfer(
                request_id,
                self,
                language_id=language_id,
                rank_count=rank_count,
                principal=principal,
            )
            t.begin_encode(rank_count, language_id, principal)
            self.transfers.add(request_id, t)
            t.start()
        blocks: list[int] | None = None
        try:
            alloc_started = time.monotonic()
            blocks = await self.pool.allocator.alloc(
                blocks_for_tokens(total, self.pool.block_size),
                timeout=self.config.alloc_timeout_s,
                label=f"encoder source pool for request {request_id}",
            )
            self.telemetry.alloc_waited(time.monotonic() - alloc_started)
            if announce_size:
                # Only now: a rank that reserves on this may wait for its blocks, and a request
                # holding source blocks always gets them once the transfers under way end.
                t.sized(total)
            runs = self.pool.runs(blocks, 0, total)
            fill_started = time.monotonic()
            record = self.pool.record

            small = total * record.record_bytes <= INLINE_MAX_BYTES

            def fill() -> tuple[tuple[tuple[str, int], ...] | None, PayloadSums | None]:
                model.encode_into(inputs, runs, record)
                # Checksums while the bytes are hot, so rounds send them without a pass over the
                # round beside their write: a small payload's whole checksums (one round, the
                # common case), a big payload's sums that any round's checksums follow from.
                sums: tuple[tuple[tuple[str, int], ...] | None, PayloadSums | None] = (None, None)
                if self.integrity and small:
                    sums = tuple(fast_checksums(runs, record, 0).items()), None
                elif self.integrity:
                    sums = None, PayloadSums.build(runs, record, self.pool.block_size)
                settle(self.pool.slab)  # on a GPU: the rows are written before any write reads them
                return sums

            if model is self.synthetic and small and not self.pool.slab.is_cuda:
                payload_checksums, payload_sums = fill()  # small: cheaper than a thread hop
            else:
                filling = asyncio.ensure_future(asyncio.to_thread(fill))
                try:
                    payload_checksums, payload_sums = await asyncio.shield(filling)
                except asyncio.CancelledError:
                    # The worker thread writes into these blocks until it returns: only then free
                    # them, even through a second cancellation while we wait.
                    while not filling.done():
                        try:
                            await asyncio.shield(filling)
                        except BaseException:  # noqa: BLE001 - still waiting for the thread
                            continue
                    raise
            self.telemetry.encoded(time.monotonic() - fill_started)
        except errors.EpdError as e:
            if blocks is not None:
                self.pool.allocator.free(blocks)
            t.encode_failed(e)
            raise
        except BaseException as e:
            if blocks is not None:
                self.pool.allocator.free(blocks)
            t.encode_failed(errors.Cancelled(f"Encode interrupted: {e!r}"))
            raise
        encoded = inputs.scratch.pop(IMAGES, None)
        images = encoded.spans if encoded is not None else ()
        if not t.attach_payload(blocks, total, payload_checksums, payload_sums, images):
            self.pool.allocator.free(blocks)
            raise errors.FailedPrecondition(
                f"request {errors.shown(request_id)} ended while encoding: {t.message}"
            )
        return total, time.monotonic() - started, encoded

    def _validate_inputs(self, request_id: str, inputs: EncodeInputs):
        """The model for the inputs and their token count; InvalidArgument before any allocation."""
        model = self.synthetic if inputs.synthetic_tokens > 0 else self.model
        if model is not self.synthetic:
            levels = getattr(model, "deepstack_levels", 0)
            pool_levels = self.pool.record.deepstack_levels
            if levels != pool_levels:
                raise errors.FailedPrecondition(
                    f"request {errors.shown(request_id)}: the encoder's model fills {levels} "
                    f"deepstack field(s), its pool has deepstack_levels="
                    f"{pool_levels}: only synthetic requests can be served"
                )
            validate_images(inputs.images)
        total = model.token_count(inputs)
        if total < 1:
            raise errors.InvalidArgument(
                f"request {errors.shown(request_id)} has no tokens (empty text, no images, synthetic_tokens=0)"
            )
        if total > self.config.max_request_tokens:
            describe = getattr(model, "describe", None)  # e.g. which image brings how many tokens
            raise errors.InvalidArgument(
                f"request {errors.shown(request_id)} has {total} tokens{describe(inputs) if describe else ''}, "
                f"above max_request_tokens={self.config.max_request_tokens}"
            )
        prepare = getattr(model, "prepare", None)
        if prepare is not None:
            prepare(
                inputs
            )  # e.g. decode every image: a corrupt one is refused before any allocation
        return model, total

    async def raw_write(
        self,
        language_id: str,
        rank: int,
        dst_blocks: list[int],
        tokens: int,
        repeats: int,
        concurrency: int,
        principal: str = "",
        write_wait: str = "",
    ) -> tuple[list[float], int, int]:
        """epd bench's baseline: `repeats` timed rounds of `concurrency` plain Mooncake writes of
        `tokens` records each, from our pool into blocks the language allocated for it, planned
        like a transfer round but with no protocol around them. Returns (seconds per repeat,
        bytes per repeat, descriptors per write). `write_wait` "" or "spin": Mooncake's own
        batch_transfer_sync_write, whatever this encoder's --write-wait; "poll": the polled wait."""
        what = f"RawWrite from language_id {errors.shown(language_id)} rank {rank}"
        if write_wait not in ("", *WRITE_WAITS):
            raise errors.InvalidArgument(
                f"{what}: write_wait={errors.shown(write_wait)} must be '', 'spin' or 'poll'"
            )
        self._refuse_when_draining(what)
        if not 1 <= tokens <= self.config.max_request_tokens:
            raise errors.InvalidArgument(
                f"{what}: tokens={tokens} must be in 1..{self.config.max_request_tokens}"
            )
        if not 1 <= repeats <= MAX_RAW_REPEATS:
            raise errors.InvalidArgument(
                f"{what}: repeats={repeats} must be in 1..{MAX_RAW_REPEATS}"
            )
        concurrency = concurrency or 1
        if not 1 <= concurrency <= MAX_RAW_CONCURRENCY:
            raise errors.InvalidArgument(
                f"{what}: concurrency={concurrency} must be in 1..{MAX_RAW_CONCURRENCY}"
            )
        peer = self.sessions.get((language_id, rank))
        if peer is None:
            raise errors.FailedPrecondition(
                f"{what}: language_id {errors.shown(language_id)} rank {rank} has not called Register"
            )
        if peer.principal != principal:
            raise errors.PermissionDenied(
                f"{what}: language_id {errors.shown(language_id)} rank {rank} was registered "
                f"by another identity"
            )
        per_write = blocks_for_tokens(tokens, peer.geometry.block_size)
        if len(dst_blocks) != concurrency * per_write:
            raise errors.InvalidArgument(
                f"{what}: {len(dst_blocks)} dst_blocks, expected concurrency * "
                f"ceil(tokens / block_size) = {concurrency} * {per_write}"
            )
        validate_allocation(peer, dst_blocks, len(dst_blocks) * peer.geometry.block_size, what)
        dst_blocks = list(dst_blocks)
        src_per_write = blocks_for_tokens(tokens, self.pool.block_size)
        src = await self.pool.allocator.alloc(
            concurrency * src_per_write, timeout=self.config.alloc_timeout_s, label=what
        )
        fence = WriteFence()
        try:
            # Only bytes the bench wrote itself leave this process: freed blocks still hold what
            # earlier requests (of any instance) left there.
            filling = asyncio.ensure_future(
                asyncio.to_thread(self._fill_bench_pattern, src, tokens, src_per_write, concurrency)
            )
            try:
                await asyncio.shield(filling)
            except asyncio.CancelledError:
                await asyncio.gather(
                    filling, return_exceptions=True
                )  # it writes into src until it returns
                raise
            geo, src_geo = peer.geometry, self.pool.geometry
            plans = [
                plan_round(
                    src_base=src_geo.base_address,
                    src_blocks=src[i * src_per_write : (i + 1) * src_per_write],
                    src_block_size=src_geo.block_size,
                    src_start=0,
                    dst_base=geo.base_address,
                    dst_blocks=dst_blocks[i * per_write : (i + 1) * per_write],
                    dst_block_size=geo.block_size,
                    dst_start=0,
                    n_tokens=tokens,
                    record_bytes=src_geo.record.record_bytes,
                )
                for i in range(concurrency)
            ]
            src_slab = Slab(
                src_geo.base_address,
                src_geo.num_blocks,
                src_geo.block_size * src_geo.record.record_bytes,
                "source pool",
            )
            try:
                for i, plan in enumerate(plans):
                    check_plan(
                        plan,
                        src=src_slab,
                        src_blocks=src[i * src_per_write : (i + 1) * src_per_write],
                        dst=peer.slab(),
                        dst_blocks=dst_blocks[i * per_write : (i + 1) * per_write],
                        expected_bytes=tokens * src_geo.record.record_bytes,
                    )
            except OutOfBounds as e:
                raise errors.InvalidArgument(f"{what}: refused before any write: {e}") from None
            seconds = []
            transport = self.transport
            assert transport is not None  # start() made it before serving
            try:
                for _ in range(repeats):
                    started = time.perf_counter()
                    # The baseline is Mooncake's own batch_transfer_sync_write, whatever --write-wait says.
                    wait = write_wait or "spin"
                    await asyncio.gather(
                        *(
                            transport.write(peer.session, plan, wait=wait, fence=fence)
                            for plan in plans
                        )
                    )
                    seconds.append(time.perf_counter() - started)
            except errors.TransportError as e:
                # ABORTED, not the transport's UNAVAILABLE: this answer comes once no write of the
                # measurement can land (below), which an unreachable encoder could not say.
                raise errors.Aborted(f"{what}: {e.message}") from None
        finally:
            if not fence.may_land:
                self.pool.allocator.free(src)
            else:
                # A write still runs: the source blocks stay quarantined until it is final, and the
                # caller is answered only then, so an answer means no write of it can land.
                held = quarantine_until_landed(
                    self.pool.allocator, src, fence, self.quarantine_max_s, what
                )
                self._raw_fences.add(held)
                held.add_done_callback(self._raw_fences.discard)
                await asyncio.shield(held)
        nbytes = sum(length for plan in plans for _, _, length in plan)
        return seconds, nbytes, len(plans[0])

    def _fill_bench_pattern(
        self, src: list[int], tokens: int, per_write: int, concurrency: int
    ) -> None:
        for i in range(concurrency):
            for run in self.pool.runs(src[i * per_write : (i + 1) * per_write], 0, tokens):
                run.fill_(BENCH_FILL_BYTE)

    def resume(
        self,
        request_id: str,
        language_id: str,
        rank: int,
        sent_tokens: int,
        blocks: list[int],
        allocated_tokens: int,
        principal: str = "",
    ) -> bool:
        what = f"Resume of request {errors.shown(request_id)} rank {rank}"
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        self.transfers.require(request_id)  # NotFound first, as for every call naming a request
        if not language_id:
            raise errors.InvalidArgument(f"{what}: language_id is empty")
        t = self.owned(request_id, language_id, principal, what)
        return t.resume(rank, sent_tokens, blocks, allocated_tokens)

    def owned(
        self, request_id: str, language_id: str, principal: str, what: str
    ) -> EncoderTransfer:
        """The transfer, when the caller owns it: NotFound for an unknown id, PermissionDenied for
        another instance's (a caller without a language_id owns only transfers nobody claimed)."""
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        t = self.transfers.require(request_id)
        t.check_owner(language_id, principal, what)
        return t

    def find_owned(
        self, request_id: str, language_id: str, principal: str, what: str
    ) -> EncoderTransfer:
        """Cancel's lookup: like `find` (the transfer id, else the client's request id), but among
        the caller's own transfers first, so two instances' equal request ids never mix."""
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        if language_id and self.transfers.get(request_id) is None:
            mine = self.transfers.get(f"{language_id}/{request_id}")
            if mine is None:
                mine = self._find_client_id(
                    request_id, lambda t: t.owned_by(language_id, principal) and t.language_id
                )
            if mine is not None:
                return self.owned(mine.request_id, language_id, principal, what)
        t = self.find(request_id)
        t.check_owner(language_id, principal, what)
        return t

    def _check_peer_limit(self, language_id: str, principal: str, what: str) -> None:
        """RESOURCE_EXHAUSTED before anything is allocated when this language instance already has
        max_transfers_per_peer live transfers here, its identity max_transfers_per_identity (over
        every language_id it uses), or the encoder max_live_transfers."""
        cfg = self.config
        live = self.transfers.live
        mine = sum(1 for t in live if t.language_id == language_id and t.principal == principal)
        if mine >= cfg.max_transfers_per_peer:
            peer = (
                f"language_id {errors.shown(language_id)}"
                if language_id
                else "callers without a language_id"
            )
            if principal.startswith("cert:"):
                peer += f" ({principal})"
            raise errors.ResourceExhausted(
                f"{what}: {peer} already has {mine} live transfers on this encoder "
                f"(max_transfers_per_peer={cfg.max_transfers_per_peer})"
            )
        identity = sum(1 for t in live if t.principal == principal)
        if identity >= cfg.max_transfers_per_identity:
            raise errors.ResourceExhausted(
                f"{what}: this identity already has {identity} live transfers on this "
                f"encoder (max_transfers_per_identity={cfg.max_transfers_per_identity})"
            )
        if len(live) >= cfg.max_live_transfers:
            raise errors.ResourceExhausted(
                f"{what}: this encoder has {len(live)} live transfers "
                f"(max_live_transfers={cfg.max_live_transfers})"
            )

    def find(self, request_id: str) -> EncoderTransfer:
        """A transfer by its id or, failing that, by a language's client request id: a language
        instance sends `LANGUAGE_ID/REQUEST_ID` (`LANGUAGE_ID/REQUEST_ID#2` for a failed-over
        attempt), so GetTransfer (and `epd status ENCODER ID`) also finds it by the id its client
        used — the live one first, else the newest."""
        if not request_id:
            raise errors.InvalidArgument("request_id is empty")
        exact = self.transfers.get(request_id)
        if exact is not None:
            return exact
        found = self._find_client_id(request_id)
        if found is not None:
            return found
        return self.transfers.require(request_id)  # NotFound naming the id

    def _find_client_id(self, request_id: str, keep=lambda t: True) -> EncoderTransfer | None:
        def matches(t: EncoderTransfer) -> bool:
            if t.client_request_id == t.request_id:
                return False
            rest = t.client_request_id
            return (rest == request_id or rest.startswith(request_id + "#")) and bool(keep(t))

        for group in (self.transfers.live, self.transfers.history[::-1]):
            found = sorted((t for t in group if matches(t)), key=lambda t: t.created, reverse=True)
            if found:
                return found[0]
        return None


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Thin gRPC adapter over EncoderService. Inspection shows a caller only what its own identity
    made (admins everything): other identities' transfers are left out, and Mooncake sessions and
    pool addresses are blanked where they are not the caller's."""

    def __init__(self, service: EncoderService, sec: rpc.ServerSecurity | None = None):
        self.s = service
        self.sec = sec or rpc.ServerSecurity()
        self.status_streams = 0
        self._streams_by: collections.Counter[str] = collections.Counter()

    @rpc.grpc_errors
    async def Encode(self, request, context):
        return await self._encode(request, context)

    @rpc.grpc_errors
    async def EncodeStream(self, request, context):
        """Encode, and meanwhile and after it the transfer's statuses as rank 0's Status stream
        would send them (await_transfer): one call where there were two. It takes a Status
        stream's room for its whole life."""
        principal = rpc.peer_identity(context)
        what = f"EncodeStream of request {errors.shown(request.request_id)}"
        self._check_stream_room(principal, what)
        self.status_streams += 1
        self._streams_by[principal] += 1
        updates: asyncio.Queue[Any] = asyncio.Queue()
        follow = encoder_pb2.StatusRequest(
            request_id=request.request_id,
            rank=0,
            language_id=request.language_id,
            await_transfer=True,
        )

        async def encode() -> None:
            reply = await self._encode(request, context)
            updates.put_nowait(encoder_pb2.EncodeUpdate(encoded=reply))

        async def statuses() -> None:
            async for st in self._status(follow, principal, what):
                updates.put_nowait(encoder_pb2.EncodeUpdate(status=st))

        async def pump(work) -> None:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - any end of a part must reach the loop below
                updates.put_nowait(e)
            else:
                updates.put_nowait(_PUMP_DONE)

        if not request.announce_size:
            # Nothing to say before the Encode's reply (the statuses before it are only the
            # current state, which the first status after it gives): one after the other, with
            # no task or queue of their own.
            try:
                reply = await self._encode(request, context)
                yield encoder_pb2.EncodeUpdate(encoded=reply)
                async for st in self._status(follow, principal, what):
                    yield encoder_pb2.EncodeUpdate(status=st)
            finally:
                self._stream_closed(principal)
            return
        pumps = [asyncio.ensure_future(pump(encode)), asyncio.ensure_future(pump(statuses))]
        try:
            ended = 0
            while ended < len(pumps):
                item = await updates.get()
                if item is _PUMP_DONE:
                    ended += 1
                elif isinstance(item, BaseException):
                    raise item  # the Encode's refusal (with its code) or failure; or the stream's
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._stream_closed(principal)

    def _stream_closed(self, principal: str) -> None:
        """A Status stream (or an EncodeStream) of `principal` ended: its room is free again."""
        self.status_streams -= 1
        self._streams_by[principal] -= 1
        if not self._streams_by[principal]:
            del self._streams_by[principal]

    async def _encode(self, request, context) -> encoder_pb2.EncodeReply:
        if len(request.cache_scope) > MAX_CACHE_SCOPE_CHARS:
            raise errors.InvalidArgument(
                f"Encode of request {errors.shown(request.request_id)}: cache_scope has "
                f"{len(request.cache_scope)} characters, above {MAX_CACHE_SCOPE_CHARS}"
            )
        principal = rpc.peer_identity(context)
        inputs = EncodeInputs(
            tuple((im.data, im.mime_type) for im in request.images),
            request.text,
            request.synthetic_tokens,
            request.synthetic_seed,
            scope=request.cache_scope,
            partition=principal if self.s.config.cache_scope == "identity" else "",
        )
        init_applied, init_error = (
            self._carried_init(request, context) if request.HasField("init") else (False, "")
        )
        total, seconds, encoded = await self.s.encode(
            request.request_id,
            inputs,
            request.rank_count,
            request.language_id,
            rpc.peer_identity(context),
            announce_size=request.announce_size,
        )
        if context.cancelled():
            # The caller gave up while we encoded (a small payload is encoded without a pause in
            # which the cancellation could land): it will never Init, and its Cancel may have
            # come and gone before this Encode ran, so end the transfer here.
            t = self.s.transfers.live_get(request.request_id)
            if t is not None:
                await t.cancel("Encode was cancelled by its caller")
        return encoder_pb2.EncodeReply(
            request_id=request.request_id,
            total_tokens=total,
            encode_seconds=seconds,
            init_applied=init_applied,
            init_error=init_error,
            cached_tokens=encoded.cached_tokens if encoded is not None else 0,
            cached_images=sorted(encoded.cached) if encoded is not None else [],
        )

    def _carried_init(self, request, context) -> tuple[bool, str]:
        """EncodeRequest.init, handled as its own Init RPC would be, before the Encode: (applied,
        why not). A refusal does not fail the Encode: the rank sends the Init again on its own
        and gets the error there, with its code (or registers again first, as after a restart)."""
        init = request.init
        if (init.request_id, init.language_id) != (request.request_id, request.language_id):
            raise errors.InvalidArgument(
                f"Encode of request {errors.shown(request.request_id)}: init is for request_id "
                f"{errors.shown(init.request_id)} language_id {errors.shown(init.language_id)}, the Encode for "
                f"request_id {errors.shown(request.request_id)} language_id {errors.shown(request.language_id)}"
            )
        try:
            self.s.init(
                init.request_id,
                init.language_id,
                init.rank,
                init.rank_count,
                list(init.dst_blocks),
                init.allocated_tokens,
                rpc.peer_identity(context),
                progress_tokens=init.progress_tokens,
                held_images=init.held_images,
            )
        except errors.EpdError as e:
            log.info(
                "request %s: the Init carried by its Encode was refused: %s", request.request_id, e
            )
            return False, f"{type(e).__name__}: {e}"
        return True, ""

    @rpc.grpc_errors
    async def Challenge(self, request, context):
        nonce = self.s.challenge(request.language_id, request.rank, rpc.peer_identity(context))
        return encoder_pb2.ChallengeReply(nonce=nonce, expires_in_s=CHALLENGE_TTL_S)

    @rpc.grpc_errors
    async def Register(self, request, context):
        if not request.HasField("layout"):
            raise errors.InvalidArgument("layout is missing")
        await self.s.register(
            request.language_id,
            request.rank,
            request.session,
            rpc.geometry_from_pb(request.layout),
            rpc.peer_identity(context),
            request.proof_nonce,
        )
        layout = rpc.geometry_to_pb(self.s.pool.geometry)
        layout.base_address = (
            0  # the encoder's memory is nobody else's business (the data plane is open)
        )
        return encoder_pb2.RegisterReply(
            encoder_id=self.s.encoder_id,
            layout=layout,
            model_fingerprint=getattr(self.s.model, "fingerprint", ""),
        )

    @rpc.grpc_errors
    async def Init(self, request, context):
        # The block ids stay a protobuf sequence until their count was checked against the pool.
        t = self.s.init(
            request.request_id,
            request.language_id,
            request.rank,
            request.rank_count,
            request.dst_blocks,
            request.allocated_tokens,
            rpc.peer_identity(context),
            progress_tokens=request.progress_tokens,
            held_images=request.held_images,
        )
        return encoder_pb2.InitReply(state=rpc.state_to_pb(t.state))

    @rpc.grpc_errors
    async def Resume(self, request, context):
        dup = self.s.resume(
            request.request_id,
            request.language_id,
            request.rank,
            request.sent_tokens,
            request.dst_blocks,
            request.allocated_tokens,
            rpc.peer_identity(context),
        )
        return encoder_pb2.ResumeReply(duplicate=dup)

    def _check_stream_room(self, principal: str, what: str) -> None:
        cfg = self.s.config
        if self._streams_by[principal] >= cfg.max_status_streams_per_identity:
            raise errors.ResourceExhausted(
                f"{what}: this identity has {self._streams_by[principal]} Status streams "
                f"open (max_status_streams_per_identity={cfg.max_status_streams_per_identity})"
            )
        if self.status_streams >= cfg.max_status_streams:
            raise errors.ResourceExhausted(
                f"{what}: {self.status_streams} Status streams are open "
                f"(max_status_streams={cfg.max_status_streams})"
            )

    @rpc.grpc_errors
    async def Status(self, request, context):
        principal = rpc.peer_identity(context)
        what = f"Status of request {errors.shown(request.request_id)} rank {request.rank}"
        self._check_stream_room(principal, what)  # a waiting stream counts as soon as it waits
        self.status_streams += 1
        self._streams_by[principal] += 1
        try:
            async for st in self._status(request, principal, what):
                yield st
        finally:
            self._stream_closed(principal)

    async def _status(self, request, principal: str, what: str):
        if request.await_transfer and request.request_id:
            await self.s.transfers.appear(request.request_id, self.s.bootstrap_timeout_s)
        t = self.s.owned(request.request_id, request.language_id, principal, what)
        terminal_seen = False
        try:
            async for st in t.statuses():
                terminal_seen = st.state.terminal
                yield status_to_pb(st)
        except asyncio.CancelledError:
            # The rank went away mid-transfer: its blocks may be gone, so the request cannot finish.
            if not terminal_seen and request.rank in t.ranks:
                t.fail(
                    FailureReason.PEER_LOST,
                    f"Status stream of rank {request.rank} closed before the transfer ended",
                )
            raise

    def _visible(self, t: EncoderTransfer, caller: str) -> bool:
        return self.sec.may_see(caller, t.principal)

    @rpc.grpc_errors
    async def GetTransfer(self, request, context):
        caller = rpc.peer_identity(context)
        t = self.s.find(request.request_id)
        if not self._visible(t, caller):
            # As if it did not exist: another identity's transfer ids are not confirmed either.
            raise errors.NotFound(f"request {errors.shown(request.request_id)} is not known")
        return transfer_info(t)

    @rpc.grpc_errors
    async def ListTransfers(self, request, context):
        caller = rpc.peer_identity(context)
        states = [_state_arg(s) for s in request.states]
        mine = [t for t in self.s.transfers.select(states, 0) if self._visible(t, caller)]
        if request.limit:
            mine = mine[: request.limit]
        return common_pb2.ListTransfersReply(transfers=[transfer_info(t) for t in mine])

    @rpc.grpc_errors
    async def Cancel(self, request, context):
        caller = rpc.peer_identity(context)
        what = f"Cancel of request {errors.shown(request.request_id)}"
        if caller in self.sec.admin_identities:
            t = self.s.find(request.request_id)  # an operator may end any transfer
        else:
            try:
                t = self.s.find_owned(request.request_id, request.language_id, caller, what)
            except errors.NotFound:
                self.s.cancelled_before_begun(request.request_id, request.language_id, caller)
                raise
        cancelled = await t.cancel(
            f"cancelled by peer: {request.reason or 'no reason given'}",
            cancel_failure(request.failure),
        )
        # Answered once the transfer ended; whether its writes did is the fence's to say.
        return common_pb2.CancelReply(
            cancelled=cancelled, state=rpc.state_to_pb(t.state), writes_ended=not t.writes_may_land
        )

    @rpc.grpc_errors
    async def GetPool(self, request, context):
        # Our session and address only to whom they belong (see ServerSecurity.own_identity).
        shown_to = self.sec.may_see(rpc.peer_identity(context), self.sec.own_identity)
        assert self.s.transport is not None  # serving implies started
        info = rpc.pool_info(self.s.pool, self.s.transport.session, addresses=shown_to)
        info.embedding_cache.CopyFrom(rpc.cache_info(self.s.embedding_cache.stats()))
        return info

    @rpc.grpc_errors
    async def GetDiagnostics(self, request, context):
        return rpc.diagnostics(self.s.transfers, self.status_streams)


class EncoderBenchServicer(bench_pb2_grpc.BenchServicer):
    """epd.v1.Bench on the encoder (RawWrite), served only with --enable-bench."""

    def __init__(self, service: EncoderService):
        self.s = service

    @rpc.grpc_errors
    async def RawWrite(self, request, context):
        seconds, nbytes, descriptors = await self.s.raw_write(
            request.language_id,
            request.rank,
            request.dst_blocks,
            request.tokens,
            request.repeats,
            request.concurrency,
            rpc.peer_identity(context),
            request.write_wait,
        )
        return bench_pb2.RawWriteReply(seconds=seconds, bytes=nbytes, descriptors=descriptors)


def cancel_failure(value: int) -> FailureReason:
    """The reason a Cancel fails its transfer with: CancelRequest.failure, CANCELLED when unset."""
    try:
        failure = FailureReason(value)
    except ValueError:
        raise errors.InvalidArgument(f"failure: unknown FailureReason value {value}") from None
    return FailureReason.CANCELLED if failure == FailureReason.UNSPECIFIED else failure


def _state_arg(value: int) -> TransferState:
    try:
        state = TransferState(value)
    except ValueError:
        raise errors.InvalidArgument(f"states: unknown TransferState value {value}") from None
    return state


def status_to_pb(st: StatusUpdate) -> common_pb2.TransferStatus:
    return common_pb2.TransferStatus(
        request_id=st.request_id,
        state=rpc.state_to_pb(st.state),
        sent_tokens=st.sent_tokens,
        total_tokens=st.total_tokens,
        round=st.round,
        round_tokens=st.round_tokens,
        allocated_tokens=st.allocated_tokens,
        checksums=[common_pb2.Checksum(field=name, value=value) for name, value in st.checksums],
        error=rpc.error_to_pb(st.reason, st.message, st.writes_may_land),
        landed_tokens=st.landed_tokens,
        landed_checksums=[
            common_pb2.Checksum(field=name, value=value) for name, value in st.landed_checksums
        ],
        images=[rpc.image_span_to_pb(span) for span in st.images],
    )


def transfer_info(t: EncoderTransfer) -> common_pb2.TransferInfo:
    record_bytes = t.env.pool.record.payload_bytes_per_token
    return common_pb2.TransferInfo(
        request_id=t.client_request_id,
        state=rpc.state_to_pb(t.state),
        sent_tokens=t.sent_tokens,
        total_tokens=t.total_tokens,
        rounds=t.rounds,
        age_seconds=t.age_seconds,
        peer=t.language_id,
        transfer_seconds=t.transfer_seconds,
        bootstrap_seconds=t.init_at - t.created if t.init_at is not None else 0.0,
        bytes=t.sent_tokens * record_bytes,
        error=rpc.error_to_pb(t.reason, t.message, t.state.terminal and t.writes_may_land),
        allocated_tokens=sum(s.allocated_tokens for s in t.ranks.values() if s.blocks is not None),
        ranks=[
            common_pb2.RankView(
                rank=r,
                state=rpc.state_to_pb(t.state),
                sent_tokens=s.sent_tokens,
                allocated_tokens=s.allocated_tokens if s.blocks is not None else 0,
                session=s.peer.session,
            )
            for r, s in sorted(t.ranks.items())
        ],
    )
