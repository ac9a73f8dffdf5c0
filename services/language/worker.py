"""One language TP rank: its pool, Mooncake engine, encoder link, and one task per request.

Every rank runs the same `RankWorker`. For each request admitted by the rank group it receives
the payload (data ranks) or just says "ready" (dummy ranks), publishes what it observed in its
`LocalView`, and then does what the group decided — deliver to the consumer, in the agreed
order, or drop and free everything. Rank 0 additionally serves the front door
(services/language/service.py), which reads the outcome of its own rank's task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

import torch

from common import errors
from common.config import LanguageConfig
from common.payload import Payload
from common.pool import BlockPool
from common.states import FailureReason, TransferState
from common.transfer_id import wire_name
from common.transport import MooncakeTransport, memory_location
from services.edge import exposure
from services.edge.metrics import Metrics
from services.edge.rpc import ClientSecurity
from services.language.admission import EarlyReservations
from services.language.consumers import ConsumerResult, NullConsumer, build_consumer  # noqa: F401 (re-exported)
from services.language.encoders import EncoderDirectory
from services.language.held_images import MAX_PROPOSED, HeldImages, ImageReuse
from services.language.rank_group import Decision, LocalView, RankGroup, RequestSpec
from services.language.receiver import Fence, ReceiveTask, StatusSource, release_when_safe
from services.parts import Parts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RankOutcome:
    """What one rank did with one request (rank 0's front door builds its reply from it)."""

    request_id: str
    decision: Decision
    receiver: ReceiveTask | None
    digest: str = ""
    consumer: ConsumerResult | None = None
    agreement_seconds: float = 0.0


class RankWorker:
    def __init__(
        self,
        config: LanguageConfig,
        rank: int,
        group: RankGroup,
        language_id: str,
        *,
        parts: Parts | None = None,
        dns_names: tuple[str, ...] = (),
    ):
        self.config = config
        self.rank = rank
        self.group = group
        self.language_id = language_id
        self.is_data_rank = rank in config.data_rank_list
        self.rank_count = len(config.data_rank_list)
        self.pool = BlockPool(
            config.record, config.block_size, config.pool_blocks_of(rank), config.device
        )
        self.metrics = Metrics("language", rank)
        self.telemetry = self.metrics
        self.metrics_port = 0
        self.parts = parts = parts or Parts()
        self.transport: MooncakeTransport | None = None
        # One link per encoder; rank 0 also watches them, looks their DNS names up again and
        # picks one per request. An admission names its encoder by address (and by rank 0's
        # index): another rank finds or adds its link by the address (`link_for`).
        self.encoders = EncoderDirectory(
            config.encoder,
            language_id,
            policy=config.encoder_policy,
            wrap=lambda link: parts.wrap_link(link, rank),
            dns_names=dns_names,
            sec=ClientSecurity.from_config(config),
            resolve=parts.resolve,
            resolve_every_s=parts.resolve_every_s,
        )
        self.consumer = parts.wrap_consumer(build_consumer(config, rank), rank)
        self.receivers: dict[str, ReceiveTask] = {}
        self._outcomes: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        # Blocks of transfers whose end the encoder could not confirm, until release_when_safe
        # returns them (receiver.py); cancelled at close, the blocks then go with the pool.
        self._quarantines: dict[asyncio.Task, ReceiveTask | None] = {}
        # Blocks reserved before a request's Encode returned (admission.py).
        self.early = EarlyReservations(self.pool, carry=config.carry_init)
        # Image rows kept from earlier requests (held_images.py); rank 0's front door claims a
        # request's before admitting it, the other ranks as they admit it.
        self.held = HeldImages(
            config.embedding_cache_bytes if self.is_data_rank else 0,
            self.pool.record,
            on_event=self.metrics.embedding_cache,
        )
        self._claims: dict[str, dict[str, torch.Tensor]] = {}
        # Status streams opened before their request was admitted (size-first, admission.py):
        # the request's receive task takes its own; whatever no task took is closed.
        self._opened_streams: dict[str, StatusSource] = {}
        self._consumer_log = (
            open(f"{config.consumer_log}.rank{rank}", "a")  # noqa: SIM115 - closed at stop()
            if config.consumer_log
            else None
        )

    async def start(self) -> None:
        """Register the pool with Mooncake (once, before serving) and with the encoder."""
        cfg = self.config
        self.transport = await asyncio.to_thread(
            self.parts.make_transport, cfg.host, cfg.protocol, cfg.rdma_device, purpose="pool"
        )
        self.transport.register(
            self.pool.registered_address, self.pool.registered_bytes, memory_location(cfg.device)
        )
        self.metrics.watch_pool(self.pool.allocator, self.pool.record.record_bytes)
        self.metrics.watch_inflight(lambda: len(self._tasks))
        self.metrics_port = self.metrics.serve(
            cfg.host, cfg.metrics_port
        )  # rank R's config has metrics_port + R
        self.metrics.watch_encoders(lambda: self.encoders.available)
        await self.encoders.start(
            self.rank,
            self.transport.session,
            self.pool.geometry,
            self.pool.proving,
            watch=self.rank == 0,
        )
        if self.rank:  # rank 0 reports with its gRPC port (LanguageService.start)
            exposure.report(
                f"language rank {self.rank}",
                cfg.host,
                {self.metrics_port: "metrics", self.transport.handshake_port: "Mooncake handshake"},
            )
        self.parts.on_rank_started(self)

    @property
    def link(self):
        """The first encoder's link (epd bench's MeasureLink)."""
        return self.encoders.links[0]

    @property
    def progress_tokens(self) -> int:
        """InitRequest.progress_tokens of this rank's Inits: progress statuses only pay with
        integrity checks."""
        return self.config.progress_tokens if self.config.integrity else 0

    def transfer_id(self, key: str) -> str:
        """The id the encoder knows the attempt admitted as `key` by (common/transfer_id.py)."""
        return wire_name(self.language_id, key)

    def pool_stats(self) -> tuple[int, ...]:
        """(used, free, waiters, quarantined blocks, *held image rows' EmbeddingCache.stats()):
        what rank 0 shows of every rank (RankGroup.rank_pools)."""
        a = self.pool.allocator
        return (a.used_count, a.free_count, a.waiters, a.quarantined_count, *self.held.rows.stats())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Live writes: blocks the encoder said a write of it may still land in. The pool stays
        # registered (and alive) until it says they ended, for at most the shutdown grace. Blocks
        # of an encoder that does not answer are not waited for: no word is coming before exit.
        live = [
            task
            for task, receiver in self._quarantines.items()
            if receiver is not None and receiver.fence is Fence.MAY_LAND
        ]
        if live:
            grace = self.config.shutdown_grace_s
            log.warning(
                "rank %d shutting down: waiting up to %.1f s for the writes still landing in the quarantined "
                "blocks of %d transfer(s)",
                self.rank,
                grace,
                len(live),
            )
            _done, pending = await asyncio.wait(live, timeout=grace)
            if pending:
                log.warning(
                    "rank %d shutting down with writes still landing in %d transfer(s)' quarantined blocks",
                    self.rank,
                    len(pending),
                )
            else:
                log.info(
                    "rank %d shutting down: every write into its quarantined blocks ended",
                    self.rank,
                )
        if self.pool.allocator.quarantined_count:
            log.warning(
                "rank %d shutting down with %d block(s) quarantined (their encoder did not say its writes "
                "ended); they go with the pool",
                self.rank,
                self.pool.allocator.quarantined_count,
            )
        for task in list(self._quarantines):
            task.cancel()
        if self._quarantines:
            await asyncio.gather(*self._quarantines, return_exceptions=True)
        await self.encoders.close()
        if self.transport is not None:
            self.transport.close()
        if self._consumer_log is not None:
            self._consumer_log.close()
        self.metrics.close()

    # ------------------------------------------------------------------ per request

    def outcome(self, request_id: str) -> asyncio.Future:
        """The future of this rank's outcome for a request (made on first ask)."""
        fut = self._outcomes.get(request_id)
        if fut is None:
            fut = self._outcomes[request_id] = asyncio.get_running_loop().create_future()
        return fut

    def on_admit(self, spec: RequestSpec) -> None:
        task = asyncio.get_running_loop().create_task(
            self._handle(spec), name=f"rank{self.rank}-{spec.request_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self.early.release(spec.request_id))
        task.add_done_callback(lambda _t: self.drop_claim(spec.request_id))
        task.add_done_callback(lambda _t: self.drop_stream(spec.request_id))

    def claim_images(self, key: str, fingerprint: str, digests: Sequence[bytes]) -> tuple[str, ...]:
        """Rank 0, before admitting `key`: claim the rows this rank holds of the request's images
        (by `image_digest`) under the encoder whose model has `fingerprint`. Returns the keys
        claimed (at most MAX_PROPOSED), which the admission proposes to the other ranks and the
        Init names."""
        if not self.held.enabled or not fingerprint or not digests:
            return ()
        claimed = self.held.claim(HeldImages.keys(fingerprint, digests))
        claimed = dict(list(claimed.items())[:MAX_PROPOSED])
        self._claims[key] = claimed
        return tuple(claimed)

    def drop_claim(self, key: str) -> None:
        """The claim of a request no receive took (refused before admission, or cancelled)."""
        self._claims.pop(key, None)

    def stream_ahead(self, key: str, stream: StatusSource) -> None:
        """Rank 0's Status stream of `key`, opened before its admission: its receive task takes
        it instead of opening one."""
        self._opened_streams[key] = stream

    def drop_stream(self, key: str) -> None:
        """Close the stream opened ahead for `key` if no receive task took it."""
        stream = self._opened_streams.pop(key, None)
        if stream is not None:
            stream.close()

    async def _handle(self, spec: RequestSpec) -> None:
        view = self.group.view(spec.request_id)
        fut = self.outcome(spec.request_id)
        receive: asyncio.Future | None = None
        receiver: ReceiveTask | None = None
        outcome: RankOutcome | None = None
        try:
            if self.is_data_rank:
                link = await self._link(spec, view)
                if link is not None:  # else the rank reported its failure to the others
                    receiver = self._receiver(spec, view, link)
                    receive = asyncio.ensure_future(self._receive(spec, receiver, view))
            else:
                self.early.init_sent(spec.request_id)  # a dummy rank sends no Init
                view.update(not_ready=0, state=int(TransferState.SUCCESS))
                self.group.changed()
            ready_at = time.monotonic()
            decision: Decision = await self.group.decision(spec.request_id)
            payload: Payload | None = None
            digest = ""
            if decision.deliver:
                if receive is not None:
                    assert receiver is not None  # made with receive
                    payload, digest = receive.result()  # ready was reported only after it finished
                    ready_at = receiver.finished_at or ready_at
                outcome = RankOutcome(
                    spec.request_id,
                    decision,
                    receiver,
                    digest,
                    agreement_seconds=max(0.0, decision.decided_at - ready_at),
                )
                try:
                    self._log_consumed(spec.request_id)
                    outcome.consumer = await self.consumer.consume(payload)
                finally:
                    if payload is not None:
                        payload.release()
            else:
                outcome = RankOutcome(spec.request_id, decision, receiver)
                if receive is not None:
                    assert receiver is not None  # made with receive
                    receiver.abort_with = _failure_of(outcome)  # what the encoder is told in Cancel
                    await _drop(receive)
        except BaseException as e:
            if receive is not None:
                await asyncio.shield(_drop(receive))
            if not fut.done():
                fut.set_exception(
                    e if isinstance(e, Exception) else errors.Cancelled("rank shutting down")
                )
            raise
        finally:
            if receiver is not None:
                await asyncio.shield(
                    receiver.close(
                        None if outcome and outcome.decision.deliver else _failure_of(outcome)
                    )
                )
            if receiver is not None:
                self._report(receiver, outcome)
            self.group.forget(spec.request_id)
            self._outcomes.pop(spec.request_id, None)
            self.receivers.pop(spec.request_id, None)
        if not fut.done():
            fut.set_result(outcome)

    async def _link(self, spec: RequestSpec, view: LocalView):
        """The link to the admission's encoder; None (and the failure reported to the other
        ranks) when this rank cannot reach it."""
        try:
            return await self.encoders.link_for(spec.encoder_address, spec.encoder)
        except errors.EpdError as e:
            log.warning("request %s rank %d: %s", spec.request_id, self.rank, e.message)
            view.update(
                failed=int(e.reason or FailureReason.PEER_LOST), state=int(TransferState.FAILED)
            )
            self.group.changed()
            return None

    def _receiver(self, spec: RequestSpec, view: LocalView, link) -> ReceiveTask:
        def progress(r: ReceiveTask) -> None:
            view.update(
                total=r.total_tokens,
                sent=r.sent_tokens,
                state=int(r.state),
                allocated=r.allocated_tokens,
                rounds=r.rounds,
            )
            self.group.changed()

        early_blocks, carried = self.early.take(spec.request_id)
        claimed = self._claims.pop(spec.request_id, None)
        if claimed is None:  # not rank 0: claim what rank 0 proposed
            claimed = self.held.claim(spec.held)
        receiver = ReceiveTask(
            spec.request_id,
            self.rank,
            self.rank_count,
            self.pool,
            link,
            transfer_id=self.transfer_id(spec.request_id),
            reserved_blocks=early_blocks,
            progress_tokens=self.progress_tokens,
            overlap_rounds=self.config.overlap_rounds,
            initial_tokens=min(spec.initial_tokens, self.pool.num_blocks * self.pool.block_size),
            alloc_timeout_s=self.config.alloc_timeout_s,
            integrity=self.config.integrity,
            on_progress=progress,
            telemetry=self.telemetry,
            on_quarantine=self._quarantined,
            on_init=functools.partial(self.early.init_sent, spec.request_id),
            carried=carried,
            reuse=ImageReuse(self.held, claimed),
            stream=self._opened_streams.pop(spec.request_id, None),
        )
        self.receivers[spec.request_id] = receiver
        return receiver

    def _quarantined(self, receiver: ReceiveTask) -> None:
        """A closed receive left blocks in quarantine: watch its encoder until they are safe to
        reuse (also while shutting down: close() waits for them, within the shutdown grace)."""
        self._watch(
            release_when_safe(
                receiver, self.config.quarantine_grace_s, max_s=self.config.quarantine_max_s
            ),
            f"quarantine-{receiver.request_id}",
            receiver,
        )

    def hold_unconfirmed(self, blocks: list[int], what: str) -> None:
        """Quarantine blocks an encoder may still write into with no way to ask it when it stops
        (a RawWrite that got no answer); they return after quarantine_max_s."""
        self.pool.allocator.quarantine(blocks)
        log.warning(
            "rank %d: %s got no answer from the encoder: %d block(s) quarantined for quarantine_max_s=%.0f s",
            self.rank,
            what,
            len(blocks),
            self.config.quarantine_max_s,
        )

        async def release() -> None:
            await asyncio.sleep(self.config.quarantine_max_s)
            self.pool.allocator.release_quarantine(blocks)

        self._watch(release(), f"quarantine-{what}")

    def _watch(self, coro, name: str, receiver: ReceiveTask | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._quarantines[task] = receiver
        task.add_done_callback(lambda t: self._quarantines.pop(t, None))

    async def _receive(
        self, spec: RequestSpec, receiver: ReceiveTask, view: LocalView
    ) -> tuple[Payload, str]:
        """Receive, then report ready; on failure close at once (free, Cancel on the encoder) and
        report the failure, so the other ranks learn it at the next step."""
        try:
            await receiver.start()
            payload = await receiver.receive()
            try:
                digest = await asyncio.to_thread(payload.sha256) if spec.want_digest else ""
                if receiver.integrity_verified:  # rows are kept only from a verified payload
                    await receiver.reuse.keep(payload)
            except BaseException:
                payload.release()
                raise
            view.update(
                total=receiver.total_tokens,
                sent=receiver.sent_tokens,
                state=int(TransferState.SUCCESS),
                allocated=0,
                rounds=receiver.rounds,
                not_ready=0,
                digest=bytes.fromhex(digest),
            )
            self.group.changed()
            return payload, digest
        except BaseException as e:
            await asyncio.shield(receiver.close(receiver.abort_with or e))
            reason = e.reason if isinstance(e, errors.EpdError) else FailureReason.CANCELLED
            if reason == FailureReason.UNSPECIFIED:
                reason = FailureReason.INVALID
            view.update(failed=int(reason), state=int(TransferState.FAILED))
            self.group.changed()
            log.info("request %s rank %d: %s", spec.request_id, self.rank, e)
            raise

    def _report(self, receiver: ReceiveTask, outcome: RankOutcome | None) -> None:
        """Metrics of a data rank's request (dummy ranks receive nothing and report nothing)."""
        if outcome is not None and outcome.decision.deliver:
            seconds = (
                receiver.finished_at - receiver.init_at
                if receiver.finished_at and receiver.init_at
                else None
            )
            self.telemetry.transfer_ended(
                TransferState.SUCCESS,
                FailureReason.UNSPECIFIED,
                seconds=seconds,
                rounds=receiver.rounds,
            )
            return
        reason = (
            receiver.reason
            if receiver.reason != FailureReason.UNSPECIFIED
            else outcome.decision.reason
            if outcome is not None
            else FailureReason.CANCELLED
        )
        self.telemetry.transfer_ended(
            TransferState.FAILED, reason, seconds=None, rounds=receiver.rounds
        )

    def _log_consumed(self, request_id: str) -> None:
        if self._consumer_log is not None:
            self._consumer_log.write(request_id + "\n")
            self._consumer_log.flush()

    def fail_local(self, request_id: str, reason: FailureReason) -> None:
        """Rank 0's front door gave up on a request (client cancel, deadline, refused Encode)."""
        view = self.group.views.get(request_id)
        if view is not None and not view.row.failed:
            view.update(failed=int(reason), state=int(TransferState.FAILED))
            self.group.changed()


def _failure_of(outcome: RankOutcome | None) -> BaseException:
    if outcome is None:
        return errors.Cancelled("cancelled")
    d = outcome.decision
    return errors.error_for_reason(
        d.reason, f"request {outcome.request_id} failed on another rank ({d.reason.label})"
    )


async def _drop(receive: asyncio.Future) -> None:
    """Stop a receive that will not be delivered; if it finished first (it raced the decision),
    release the payload it holds, whose blocks would otherwise stay used."""
    await cancel_and_wait(receive)
    if not receive.cancelled() and receive.exception() is None:
        payload, _digest = receive.result()
        payload.release()


async def cancel_and_wait(task: asyncio.Future) -> None:
    """Cancel a task (if still running) and wait until it has ended, whatever its outcome."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
