"""The encoder's per-request transfer state machine (docs/DESIGN.md, 'Transfer states' and 'Rounds
and the resume rule').

One `EncoderTransfer` per request id, driven by one asyncio task (`run`). Init, Encode and
Resume only record facts and wake the task; the task decides when a round starts, plans it,
writes it to every data rank and publishes the new status — after the writes returned, never
before. Status subscribers read a single feed, so every rank sees identical statuses.

The write fence (common/fence.py): every write is tracked by the transfer's `WriteFence` until
the engine reports each of its pieces final. A transfer that ends while one may still land
publishes FAILED with `writes_may_land`, keeps its source blocks quarantined, and publishes a
second FAILED status without it once the writes stopped (or after `quarantine_max_s`); only then
does it leave the live table.

Domain code: no grpc, no mooncake. What it needs from the service comes in a `TransferEnv`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from common.bounds import OutOfBounds, Slab, check_plan
from common.errors import (
    TRANSFER_ENDED,
    AlreadyExists,
    EpdError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    shown,
)
from common.fence import WriteFence, quarantine_until_landed
from common.integrity import PayloadSums
from common.layout import PoolGeometry
from common.plan import blocks_for_tokens, plan_round, uncovered
from common.pool import BlockPool
from common.states import FailureReason, ImageSpan, StatusUpdate, TransferState, reused_in
from common.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PeerSession:
    """A language rank as registered with this encoder."""

    language_id: str
    rank: int
    session: str
    """Mooncake session `host:rpc_port` of the rank."""
    geometry: PoolGeometry
    """The rank's pool: block size, block count, base address, record layout."""
    generation: int = 0
    """Bumped on every re-registration, so a transfer can tell a stale session."""
    principal: str = ""
    """Who registered it, as the transport authenticated the call (`services.edge.security.peer_identity`:
    `cert:<CN>` under mutual TLS, else `token` or `anonymous`): only the same may replace it."""

    def slab(self) -> Slab:
        """The registered pool as addresses, for the last check before a write (common/bounds.py)."""
        geo = self.geometry
        return Slab(
            geo.base_address,
            geo.num_blocks,
            geo.block_size * geo.record.record_bytes,
            f"destination pool of language {self.language_id} rank {self.rank}",
        )


class TransferEnv(Protocol):
    """What a transfer needs from the encoder service."""

    pool: BlockPool
    bootstrap_timeout_s: float
    resume_timeout_s: float
    integrity: bool
    telemetry: Telemetry
    quarantine_max_s: float
    """How long source blocks stay quarantined, at most, for writes that never report final."""

    async def write(
        self, session: str, triples: Sequence[tuple[int, int, int]], fence: WriteFence
    ) -> None:
        """One Mooncake write, tracked by `fence` until every piece is final."""

    async def round_checksums(
        self, blocks: Sequence[int], start: int, n_tokens: int
    ) -> dict[str, int]: ...

    def on_finished(self, transfer: EncoderTransfer) -> None: ...


def _individual(principal: str) -> bool:
    """Whether an authenticated identity names one peer: a client certificate (`cert:<name>`,
    services.edge.security.peer_identity). `token` and `anonymous` are shared by every caller."""
    return principal.startswith("cert:")


class _Failure(Exception):
    def __init__(self, reason: FailureReason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass
class RankSlot:
    """One data rank's part in a transfer."""

    peer: PeerSession
    blocks: list[int] | None
    """Destination blocks for the next round; None while a Resume is awaited."""
    allocated_tokens: int
    for_sent: int
    """The sent_tokens the current allocation was given for (0 at Init)."""
    sent_tokens: int = 0
    progress_tokens: int = 0
    """The rank asked for a progress status every this many tokens of a round (0 = none)."""
    held: frozenset[str] = frozenset()
    """Keys of the image rows the rank said it holds (InitRequest.held_images)."""


def validate_allocation(
    peer: PeerSession, blocks: Sequence[int], allocated_tokens: int, what: str
) -> None:
    """Init/Resume allocations must be whole blocks inside the peer's pool; raise InvalidArgument."""
    geo = peer.geometry
    if not blocks:
        raise InvalidArgument(f"{what}: dst_blocks is empty")
    if len(blocks) > geo.num_blocks:
        raise InvalidArgument(
            f"{what}: {len(blocks)} dst_blocks for a pool of {geo.num_blocks} blocks"
        )
    if allocated_tokens != len(blocks) * geo.block_size:
        raise InvalidArgument(
            f"{what}: allocated_tokens={allocated_tokens} must equal len(dst_blocks) * block_size = "
            f"{len(blocks)} * {geo.block_size} = {len(blocks) * geo.block_size}"
        )
    seen: set[int] = set()
    for b in blocks:
        if b >= geo.num_blocks:
            raise InvalidArgument(
                f"{what}: dst block id {b} is out of range for a pool of {geo.num_blocks} blocks"
            )
        if b in seen:
            raise InvalidArgument(f"{what}: dst block id {b} appears more than once")
        seen.add(b)


class EncoderTransfer:
    """State of one request on the encoder, plus the task that moves it along."""

    def __init__(
        self,
        request_id: str,
        env: TransferEnv,
        *,
        language_id: str = "",
        rank_count: int = 0,
        principal: str = "",
    ):
        self.request_id = request_id
        self.env = env
        self.language_id = language_id
        """The owner: the language instance that first used the request id ("" until one does)."""
        self.principal = principal
        """The owner's authenticated identity (see PeerSession.principal)."""
        self.rank_count = rank_count
        self.created = time.monotonic()
        self.finished_at: float | None = None
        self.init_at: float | None = None
        self.state = TransferState.BOOTSTRAPPING
        self.ranks: dict[int, RankSlot] = {}
        self.src_blocks: list[int] | None = None
        self.payload_checksums: tuple[tuple[str, int], ...] | None = (
            None  # a small payload's, from Encode
        )
        self.payload_sums: PayloadSums | None = None  # from Encode: any round's checksums
        self.total_tokens = 0
        self.sent_tokens = 0
        self.images: tuple[ImageSpan, ...] = ()
        """The payload's images (from Encode); those every data rank holds are marked reused
        before the first round and never written."""
        self.rounds = 0
        self.encoding = False
        self.reason = FailureReason.UNSPECIFIED
        self.message = ""
        self._failure: _Failure | None = None
        self._wakeup = asyncio.Event()
        self._status = StatusUpdate(request_id, TransferState.BOOTSTRAPPING)
        self._published = asyncio.Event()
        self.done = asyncio.Event()
        self.encode_finished = asyncio.Event()  # no Encode is filling source blocks
        self.encode_finished.set()
        self.task: asyncio.Task | None = None
        self.fence = WriteFence()
        """Every write of this transfer until the engine reported it final (common/fence.py)."""
        self.quarantined_blocks: list[int] = []
        """Source blocks held back after the end: a write that reads them may still run."""
        self.fence_task: asyncio.Task | None = None
        """Gives the quarantined source blocks back once the writes stopped."""
        self._fence_over = False
        self._ended_fenced = False  # FAILED while a write may still land (set by _finish_failed)

    # ----------------------------------------------------------------- facts from RPCs

    def owned_by(self, language_id: str, principal: str) -> bool:
        """Whether a caller is the owner. A transfer opened by an Encode without a language_id
        has no owner yet: the first caller with one claims it — unless that Encode came with a
        client certificate, which then binds the transfer (only callers presenting it may claim
        it, so no other certificate holder can pre-seed a payload under someone's transfer id)."""
        if not self.language_id:
            return not _individual(self.principal) or principal == self.principal
        return language_id == self.language_id and principal == self.principal

    def check_owner(self, language_id: str, principal: str, what: str) -> None:
        """PermissionDenied naming the request (never the owner's id or identity)."""
        if not self.owned_by(language_id, principal):
            # The client's request id: the transfer id would carry the owner's language_id.
            raise PermissionDenied(
                f"{what}: request {shown(self.client_request_id)} belongs to another language instance "
                f"(caller language_id {shown(language_id)})"
            )

    def add_rank(
        self,
        rank: int,
        rank_count: int,
        peer: PeerSession,
        blocks: list[int],
        allocated_tokens: int,
        *,
        progress_tokens: int = 0,
        held: frozenset[str] = frozenset(),
    ) -> None:
        """Record an Init (already validated against the peer's pool)."""
        what = f"Init of request {shown(self.request_id)} rank {rank}"
        if self.state.terminal:
            raise self._ended(what)
        if rank in self.ranks:
            raise AlreadyExists(f"{what}: rank {rank} has already sent Init for this request")
        if self.rank_count and rank_count != self.rank_count:
            raise InvalidArgument(
                f"{what}: rank_count={rank_count} differs from the request's rank_count={self.rank_count}"
            )
        self.check_owner(peer.language_id, peer.principal, what)
        self.rank_count = rank_count
        self.language_id = peer.language_id
        self.principal = peer.principal
        self.ranks[rank] = RankSlot(
            peer,
            list(blocks),
            allocated_tokens,
            for_sent=0,
            progress_tokens=progress_tokens,
            held=held,
        )
        self.init_at = self.init_at or time.monotonic()
        if len(self.ranks) == self.rank_count:
            self._set_state(TransferState.WAITING_FOR_INPUT)
        self._wake()

    def begin_encode(self, rank_count: int, language_id: str, principal: str = "") -> None:
        what = f"Encode of request {shown(self.request_id)}"
        self.check_owner(language_id, principal, what)
        if self.state.terminal:
            raise self._ended(what)
        if self.encoding or self.src_blocks is not None:
            raise AlreadyExists(f"{what}: request_id {shown(self.request_id)} was already encoded")
        if rank_count and self.rank_count and rank_count != self.rank_count:
            raise InvalidArgument(
                f"{what}: rank_count={rank_count} differs from the request's rank_count={self.rank_count}"
            )
        self.rank_count = self.rank_count or rank_count
        if not self.language_id and language_id:
            self.language_id, self.principal = language_id, principal
        self.encoding = True
        self.encode_finished.clear()

    def attach_payload(
        self,
        blocks: list[int],
        total_tokens: int,
        checksums: tuple[tuple[str, int], ...] | None = None,
        sums: PayloadSums | None = None,
        images: tuple[ImageSpan, ...] = (),
    ) -> bool:
        """Hand the encoded source blocks (and, if computed, the whole payload's checksums and the
        sums any round's checksums follow from) to the transfer; False (caller frees) if it ended
        meanwhile."""
        self.payload_checksums = checksums
        self.payload_sums = sums
        self.encoding = False
        self.encode_finished.set()
        if self.state.terminal or self._failure is not None:
            self._wake()
            return False
        self.src_blocks = blocks
        self.total_tokens = total_tokens
        self.images = images
        self._wake()
        return True

    def sized(self, total_tokens: int) -> None:
        """The payload being encoded will have `total_tokens` (EncodeRequest.announce_size): say
        so on the status feed now, before the model runs, so the ranks can reserve exactly that
        while it does. The state does not change."""
        if self.state.terminal or self._failure is not None:
            return
        self.total_tokens = total_tokens
        self._publish()

    def encode_failed(self, error: EpdError) -> None:
        self.encoding = False
        self.encode_finished.set()
        self.fail(error.reason, f"Encode failed: {error.message}")

    def resume(self, rank: int, sent_tokens: int, blocks: list[int], allocated_tokens: int) -> bool:
        """Record a Resume; returns True when it is a duplicate (a no-op)."""
        what = f"Resume of request {shown(self.request_id)} rank {rank}"
        slot = self.ranks.get(rank)
        if slot is None:
            raise FailedPrecondition(f"{what}: rank {rank} never sent Init for this request")
        if sent_tokens > self.sent_tokens:
            raise FailedPrecondition(
                f"{what}: sent_tokens={sent_tokens} is ahead of the {self.sent_tokens} tokens the encoder has sent"
            )
        if sent_tokens < self.sent_tokens or (
            slot.blocks is not None and slot.for_sent == sent_tokens
        ):
            return True
        if self.state.terminal:
            raise self._ended(what)
        validate_allocation(slot.peer, blocks, allocated_tokens, what)
        slot.blocks = list(blocks)
        slot.allocated_tokens = allocated_tokens
        slot.for_sent = sent_tokens
        self._wake()
        return False

    def _ended(self, what: str) -> FailedPrecondition:
        """The refusal of a call that came after the transfer ended: it carries the reason the
        transfer ended with, so a rank that learns of the end this way fails with that reason
        (the ranks agree on the worst one) rather than blaming its own call."""
        ended_with = self.reason if self.state == TransferState.FAILED else None
        return FailedPrecondition(
            f"{what}: the request already ended ({self.state.name})",
            reason=ended_with if ended_with != FailureReason.UNSPECIFIED else None,
            error_reason=TRANSFER_ENDED,
        )

    def fail(self, reason: FailureReason, message: str) -> None:
        """Ask the task to fail the request; it does so once no write is in flight."""
        if self.state.terminal or self._failure is not None:
            return
        self._failure = _Failure(reason, message)
        self._wake()

    async def cancel(self, message: str, reason: FailureReason = FailureReason.CANCELLED) -> bool:
        """Fail the request and wait until it ended (no write in flight); False if it had ended
        (or was failing) already. A write that fails while the cancel waits may still give the
        request its own reason: the cancel came first all the same."""
        live = not self.state.terminal and self._failure is None
        if self.state.terminal:
            return False
        self.fail(reason, message)
        await self.done.wait()
        await self.encode_finished.wait()  # an Encode in progress gives its blocks back first
        return live

    # ----------------------------------------------------------------- the task

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"transfer-{self.request_id}"
        )

    async def run(self) -> None:
        try:
            await self._until(
                self._ready_to_send,
                self.created + self.env.bootstrap_timeout_s,
                self._bootstrap_what,
            )
            self._mark_reused()
            while True:
                n = min(
                    self.total_tokens - self.sent_tokens,
                    *(s.allocated_tokens for s in self.ranks.values()),
                )
                checksums = await self._send_round(n)
                written = n - reused_in(self.images, self.sent_tokens, self.sent_tokens + n)
                self.env.telemetry.bytes_moved(
                    written * len(self.ranks) * self.env.pool.record.payload_bytes_per_token
                )
                self.sent_tokens += n
                self.rounds += 1
                for slot in self.ranks.values():
                    slot.sent_tokens = self.sent_tokens
                if self._failure is not None:
                    raise self._failure
                last = self.sent_tokens >= self.total_tokens
                if not last:
                    for slot in self.ranks.values():
                        slot.blocks = None
                self.state = TransferState.SUCCESS if last else TransferState.TRANSFERRING
                self._publish(round_tokens=n, allocated_tokens=n, checksums=checksums)
                log.debug(
                    "request %s: round %d sent %d/%d tokens",
                    self.request_id,
                    self.rounds,
                    self.sent_tokens,
                    self.total_tokens,
                )
                if last:
                    break
                await self._until(
                    self._all_resumed,
                    time.monotonic() + self.env.resume_timeout_s,
                    lambda: (
                        f"no Resume from rank(s) {self._missing_resumes()} within "
                        f"resume_timeout_s={self.env.resume_timeout_s}"
                    ),
                )
                self.env.telemetry.resumed()
        except _Failure as f:
            self._finish_failed(f.reason, f.message)
        except asyncio.CancelledError:
            self._finish_failed(FailureReason.CANCELLED, "encoder shutting down")
            raise
        except Exception as e:  # a bug must still end the request cleanly
            log.exception("request %s: transfer task crashed", self.request_id)
            self._finish_failed(FailureReason.UNSPECIFIED, f"internal error: {e!r}")
        finally:
            self._release()

    def _mark_reused(self) -> None:
        """Agree, before the first round, on the images no rank needs written: those every data
        rank holds (each said so in its Init). One rank without them means they go to all, so
        every data rank fills exactly the same rows."""
        if not self.images or len(self.ranks) != self.rank_count:
            return
        held = frozenset.intersection(*(slot.held for slot in self.ranks.values()))
        if held:
            self.images = tuple(
                dataclasses.replace(span, reused=span.key in held) for span in self.images
            )

    @property
    def reused_spans(self) -> list[tuple[int, int]]:
        """Token ranges [start, end) the ranks fill themselves, in order."""
        return [(s.start, s.end) for s in self.images if s.reused]

    async def _send_round(self, n: int) -> tuple[tuple[str, int], ...]:
        """Write the round's n tokens to every rank; returns its checksums (empty without integrity).

        A rank that asked for progress (InitRequest.progress_tokens) gets the round in parts: after
        each part but the last has landed on every rank, a status with landed_tokens and the
        checksums of what landed (from the payload's sums, no pass over the bytes) lets the ranks
        verify it while the rest is written."""
        part = self._part_tokens(n)
        checksums: tuple[tuple[str, int], ...] = ()
        for lo in range(0, n, part):
            hi = min(n, lo + part)
            checksums = await self._write_part(lo, hi, n)
            if self._failure is not None:  # cancelled meanwhile: write no further part
                raise self._failure
            if hi < n:
                self._publish(
                    landed_tokens=hi, landed_checksums=self._sums_checksums(self.sent_tokens, hi)
                )
        return checksums

    def _part_tokens(self, n: int) -> int:
        """Tokens per write of a round: the smallest progress step the ranks asked for, rounded up
        to whole blocks on both sides (descriptors stay coalesced); n when none asked, or when the
        checksums of a part would need a pass over its bytes (no payload sums)."""
        steps = [s.progress_tokens for s in self.ranks.values() if s.progress_tokens]
        if not steps or not self.env.integrity or self.payload_sums is None:
            return n
        block = max(
            self.env.pool.block_size, *(s.peer.geometry.block_size for s in self.ranks.values())
        )
        return min(n, -(-min(steps) // block) * block)

    def _sums_checksums(self, start: int, count: int) -> tuple[tuple[str, int], ...]:
        pool, src, sums = self.env.pool, self.src_blocks, self.payload_sums
        # Only used with payload sums (see _part_tokens), once Encode gave the source blocks.
        assert src is not None and sums is not None
        return tuple(
            sums.checksums(start, count, lambda lo, hi: pool.runs(src, lo, hi - lo)).items()
        )

    async def _write_part(self, lo: int, hi: int, n: int) -> tuple[tuple[str, int], ...]:
        """Write tokens [lo, hi) of the round (of n tokens) to every rank; the round's checksums
        once the last part is written, else ()."""
        assert self.src_blocks is not None  # _ready_to_send: Encode gave them before any round
        pool = self.env.pool
        src_geo = pool.geometry
        record_bytes = src_geo.record.record_bytes
        src_slab = Slab(
            src_geo.base_address,
            src_geo.num_blocks,
            src_geo.block_size * record_bytes,
            "source pool",
        )
        first, count = self.sent_tokens + lo, hi - lo
        # The blocks holding these tokens on each side: writes may touch nothing else.
        src_part = self.src_blocks[
            first // src_geo.block_size : blocks_for_tokens(first + count, src_geo.block_size)
        ]
        # Rows every rank holds are not written (`_mark_reused`): the ranks fill them.
        parts = uncovered(first, first + count, self.reused_spans)
        plans = []
        for slot in self.ranks.values():
            geo = slot.peer.geometry
            assert slot.blocks is not None  # the round's allocation: None only between rounds
            triples = [
                triple
                for a, b in parts
                for triple in plan_round(
                    src_base=src_geo.base_address,
                    src_blocks=self.src_blocks,
                    src_block_size=src_geo.block_size,
                    src_start=a,
                    dst_base=geo.base_address,
                    dst_blocks=slot.blocks,
                    dst_block_size=geo.block_size,
                    dst_start=a - self.sent_tokens,
                    n_tokens=b - a,
                    record_bytes=record_bytes,
                )
            ]
            try:
                # Every rank's plan is checked before any write is submitted: a planning bug
                # fails the request, it never writes outside the blocks the peer gave us.
                check_plan(
                    triples,
                    src=src_slab,
                    src_blocks=src_part,
                    dst=slot.peer.slab(),
                    dst_blocks=slot.blocks[
                        lo // geo.block_size : blocks_for_tokens(hi, geo.block_size)
                    ],
                    expected_bytes=sum(b - a for a, b in parts) * record_bytes,
                )
            except OutOfBounds as e:
                log.error(
                    "request %s: round %d refused before writing: %s",
                    self.request_id,
                    self.rounds + 1,
                    e,
                )
                where = (
                    "any write"
                    if lo == 0
                    else f"writing tokens [{lo}, {hi}) of it (earlier parts were written)"
                )
                raise _Failure(
                    FailureReason.INVALID,
                    f"round {self.rounds + 1} to rank {slot.peer.rank} refused before {where}: {e}",
                ) from None
            plans.append((slot.peer.session, triples))
        # The writes start first; the round's checksums are worked out while they run.
        loop = asyncio.get_running_loop()
        writes: list[asyncio.Task[Any]] = [
            loop.create_task(self.env.write(session, triples, self.fence))
            for session, triples in plans
            if triples  # a part made only of reused rows writes nothing
        ]
        sums: asyncio.Task[dict[str, int]] | None = None
        try:
            await asyncio.sleep(0)  # let the writes reach their worker threads
            # Checksums come from what Encode computed (no pass over the round beside its write);
            # computed here only when Encode did not (a small payload sent in several rounds).
            precomputed = None
            last = hi == n
            if self.env.integrity and last:
                if (
                    self.sent_tokens == 0
                    and n == self.total_tokens
                    and self.payload_checksums is not None
                ):
                    precomputed = self.payload_checksums
                elif self.payload_sums is not None:
                    precomputed = self._sums_checksums(self.sent_tokens, n)
                else:
                    # A task like the writes: cancelled with them below if need be.
                    sums = loop.create_task(
                        self.env.round_checksums(self.src_blocks, self.sent_tokens, n)
                    )
                    writes.append(sums)
        except BaseException:
            # Cancelled while the writes started: they run on in their threads, tracked by the
            # fence, which keeps their blocks out of use on both sides until they are final.
            for w in writes:
                w.cancel()
            raise
        # Every write is waited for, even when one fails, except one that gave up at its
        # deadline: its pieces still running are held by the fence (the request fails at once,
        # its blocks stay quarantined until they are final).
        results = await asyncio.gather(*writes, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            err = errors[0]
            if isinstance(err, asyncio.CancelledError):
                raise err
            reason = (
                err.reason
                if isinstance(err, EpdError) and err.reason != FailureReason.UNSPECIFIED
                else FailureReason.TRANSPORT
            )
            raise _Failure(reason, f"round {self.rounds + 1} write failed: {err}")
        if not (self.env.integrity and last):
            return ()
        if precomputed is not None:
            return precomputed
        assert sums is not None  # integrity, the round's last part, nothing precomputed
        return tuple(sums.result().items())

    def _ready_to_send(self) -> bool:
        return (
            bool(self.rank_count)
            and len(self.ranks) == self.rank_count
            and self.src_blocks is not None
        )

    def _bootstrap_what(self) -> str:
        if not self.rank_count or len(self.ranks) < self.rank_count:
            have = sorted(self.ranks)
            return (
                f"no Init from every data rank within bootstrap_timeout_s={self.env.bootstrap_timeout_s} "
                f"(have ranks {have} of rank_count={self.rank_count or '?'})"
            )
        return f"no Encode within bootstrap_timeout_s={self.env.bootstrap_timeout_s}"

    def _all_resumed(self) -> bool:
        return all(
            s.blocks is not None and s.for_sent == self.sent_tokens for s in self.ranks.values()
        )

    def _missing_resumes(self) -> list[int]:
        return sorted(
            r for r, s in self.ranks.items() if s.blocks is None or s.for_sent != self.sent_tokens
        )

    async def _until(
        self, predicate: Callable[[], bool], deadline: float, what: Callable[[], str]
    ) -> None:
        """Wait (on wake-ups, not by polling) until predicate holds; fail on failure or deadline.
        An Encode in progress suspends the deadline: its own allocation has alloc_timeout_s."""
        while True:
            if self._failure is not None:
                raise self._failure
            if predicate():
                return
            timeout = None if self.encoding else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise _Failure(FailureReason.TIMEOUT, what())
            self._wakeup.clear()
            try:
                # asyncio.timeout, not wait_for: no extra task, so a wake-up resumes this task on
                # the loop's next pass (an Encode's round starts ~0.1 ms sooner).
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    def _finish_failed(self, reason: FailureReason, message: str) -> None:
        self.state = TransferState.FAILED
        self.reason = reason
        self.message = message
        # Writes only ever read the source blocks: with none held, nothing of ours is in flight.
        # Decided once: the status and the quarantine (_release) must agree.
        self._ended_fenced = self.src_blocks is not None and self.fence.may_land
        log.info(
            "request %s: FAILED (%s)%s: %s",
            self.request_id,
            reason.label,
            ", writes may still land" if self._ended_fenced else "",
            message,
        )
        self._publish(reason=reason, message=message, writes_may_land=self._ended_fenced)

    @property
    def writes_may_land(self) -> bool:
        """Whether a write of this transfer may still land (its fence is not clear)."""
        return self.fence.may_land

    def _release(self) -> None:
        if self.src_blocks is not None:
            if self._ended_fenced:
                # A write still running reads these blocks: nobody else may fill them before it ends.
                self.quarantined_blocks = self.src_blocks
                self.fence_task = quarantine_until_landed(
                    self.env.pool.allocator,
                    self.src_blocks,
                    self.fence,
                    self.env.quarantine_max_s,
                    f"request {self.request_id}",
                    self._fence_cleared,
                )
                self.env.telemetry.write_fenced()
            else:
                self.env.pool.allocator.free(self.src_blocks)
            self.src_blocks = None
        for slot in self.ranks.values():
            slot.blocks = None
        self.finished_at = time.monotonic()
        if self.state == TransferState.SUCCESS:
            self.env.telemetry.transfer_ended(
                self.state, self.reason, seconds=self.transfer_seconds, rounds=self.rounds
            )
        else:
            if self.reason == FailureReason.INTEGRITY:
                self.env.telemetry.integrity_failed()  # a language rank found the mismatch and cancelled
            self.env.telemetry.transfer_ended(
                TransferState.FAILED, self.reason, seconds=None, rounds=self.rounds
            )
        self.done.set()
        if self.fence_task is None:
            self.env.on_finished(self)

    def _fence_cleared(self, writes_ended: bool, seconds: float) -> None:
        """The fence's writes stopped (or its bound passed): tell every rank, leave the live table."""
        self.quarantined_blocks = []
        self._fence_over = True
        self.env.telemetry.fence_released(seconds)
        # The ranks' Status streams are still open (statuses() goes on while writes may land): a
        # FAILED status without writes_may_land lets them release their blocks. Past the bound
        # the writes did not end: the streams end still saying so (each rank has its own bound).
        self._publish(reason=self.reason, message=self.message, writes_may_land=not writes_ended)
        self.env.on_finished(self)

    # ----------------------------------------------------------------- status feed

    def _wake(self) -> None:
        self._wakeup.set()

    def _set_state(self, state: TransferState) -> None:
        if state != self.state:
            self.state = state
            self._publish()

    def _publish(self, **extra) -> None:
        self._status = StatusUpdate(
            self.request_id,
            self.state,
            sent_tokens=self.sent_tokens,
            total_tokens=self.total_tokens,
            round=self.rounds,
            images=self.images,
            **extra,
        )
        event, self._published = self._published, asyncio.Event()
        event.set()

    @property
    def status(self) -> StatusUpdate:
        return self._status

    async def statuses(self) -> AsyncIterator[StatusUpdate]:
        """The current status first, then every change, until a terminal state that says no write
        may still land (a FAILED with writes_may_land is followed by one without, once they stop)."""
        seen: StatusUpdate | None = None
        while True:
            event, status = self._published, self._status
            if status is not seen:
                seen = status
                yield status
                if status.state.terminal and (not status.writes_may_land or self._fence_over):
                    return
            else:
                await event.wait()

    # ----------------------------------------------------------------- inspection

    @property
    def client_request_id(self) -> str:
        """The id as the language's client knows it: a language instance sends
        `LANGUAGE_ID/REQUEST_ID` (unique per instance by construction); inspection shows
        `REQUEST_ID` (`REQUEST_ID#2` for a failed-over attempt), with the language as `peer`."""
        prefix = f"{self.language_id}/"
        if (
            self.language_id
            and self.request_id.startswith(prefix)
            and len(self.request_id) > len(prefix)
        ):
            return self.request_id[len(prefix) :]
        return self.request_id

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self.created

    @property
    def transfer_seconds(self) -> float:
        if self.finished_at is None or self.init_at is None:
            return 0.0
        return self.finished_at - self.init_at
