"""One language rank's receive of one request (docs/DESIGN.md, 'Rounds and the resume rule'): one
asyncio task, no polling.

    alloc -> Status + Init -> for each status: TRANSFERRING -> copy out and verify (side by
    side), free, alloc the rest (partial if short), Resume; SUCCESS -> verify in place, payload =
    earlier rounds' copies + a view of the last round's blocks; FAILED -> raise the mapped error.

This is the core loop. The optional strategies live in receive_options.py and plug into it:
overlapped rounds (a round read while the encoder writes the next one into blocks free right
now), progress parts (a round verified and copied out as its parts land) and the carried Init
(the early Init handed to the Encode instead of sent on its own).

The encoder is reached through an `EncoderLink` (services/language/encoder_link.py adapts gRPC),
so this module imports neither grpc nor mooncake. `close()` always runs: it frees every block
this task holds and, when the transfer may still be live on the encoder, cancels it there.

The write fence (docs/DESIGN.md): the blocks this task gave the encoder go back to the pool only
once the encoder positively said no write of the transfer can still land — a terminal status
without `writes_may_land`, or a Cancel answered `writes_ended` (or NOT_FOUND: it holds nothing of
it). Otherwise they are quarantined (`BlockAllocator.quarantine`), neither free nor handed out:
- a FAILED status says `writes_may_land` (the encoder gave up on a write still running);
- the Cancel is answered without `writes_ended`, or with any error but NOT_FOUND (CANCELLED,
  UNKNOWN, INTERNAL ... prove nothing about the encoder's writes);
- the Cancel gets no answer (the encoder or the link is down): its write may finish late, and
  even a failed write leaves bytes in its kernel that arrive once the link is back — Mooncake's
  receiving side accepts them whenever they come.
`release_when_safe` returns them once the encoder says its writes ended (on the Status stream,
which it keeps open for that, or in a Cancel's answer), plus a grace period when it had been
unreachable; `quarantine_max_s` bounds the wait.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import torch

from common import errors
from common.device import settle
from common.integrity import checksums_off_loop, combine
from common.parallel import MEMORY_BOUND_SPLIT_BYTES, run_split_async
from common.payload import Payload
from common.plan import blocks_for_tokens
from common.pool import BlockPool
from common.states import FailureReason, StatusUpdate, TransferState
from common.telemetry import NULL_TELEMETRY, Telemetry
from services.language.held_images import HeldImages, ImageReuse
from services.language.receive_options import CarriedInit, OverlappedRounds, ProgressParts

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 10.0  # close(): how long the Cancel on the encoder may take
PROBE_S = 1.0  # release_when_safe(): how often a quarantined transfer's encoder is asked again
PROBE_TIMEOUT_S = 2.0
MAX_OUTAGE_EXTRA_S = 120.0  # Linux's TCP_RTO_MAX: no retransmission waits longer than this
# Failures of a Cancel that mean "no answer from the encoder": it may still be writing.
UNREACHABLE = (errors.Unavailable, errors.DeadlineExceeded, asyncio.TimeoutError)


class StatusSource(Protocol):
    """A Status stream: statuses in order; `close()` ends it (idempotent)."""

    def __aiter__(self) -> AsyncIterator[StatusUpdate]: ...

    def close(self) -> None: ...


class Fence(enum.Enum):
    """What a rank knows of the encoder's writes into its blocks when a receive closes."""

    ENDED = "ended"
    """The encoder said no write of the transfer can land: the blocks may be freed."""
    MAY_LAND = "may_land"
    """The encoder answered, but a write of the transfer may still land."""
    UNANSWERED = "unanswered"
    """No answer from the encoder: it may still be writing, and its kernel may hold bytes."""


class EncoderLink(Protocol):
    """The encoder as one language rank sees it."""

    address: str

    async def init(
        self,
        request_id: str,
        rank: int,
        rank_count: int,
        blocks: Sequence[int],
        allocated_tokens: int,
        progress_tokens: int = 0,
        held_images: Sequence[str] = (),
    ) -> None: ...

    async def resume(
        self,
        request_id: str,
        rank: int,
        sent_tokens: int,
        blocks: Sequence[int],
        allocated_tokens: int,
    ) -> bool: ...

    def status(self, request_id: str, rank: int, await_transfer: bool = False) -> StatusSource: ...

    async def cancel(
        self, request_id: str, reason: str, failure: FailureReason = FailureReason.CANCELLED
    ) -> bool:
        """Cancel the transfer (`failure`: the reason it fails with on the encoder, `reason`:
        text for people); returns CancelReply.writes_ended (True: no write of it can land)."""


class ReceiveTask:
    """Receives one request's payload into one rank's pool."""

    def __init__(
        self,
        request_id: str,
        rank: int,
        rank_count: int,
        pool: BlockPool,
        link: EncoderLink,
        *,
        initial_tokens: int,
        transfer_id: str = "",
        alloc_timeout_s: float,
        integrity: bool = True,
        reserved_blocks: list[int] | None = None,
        progress_tokens: int = 0,
        overlap_rounds: bool = False,
        on_progress: Callable[[ReceiveTask], None] | None = None,
        telemetry: Telemetry = NULL_TELEMETRY,
        on_quarantine: Callable[[ReceiveTask], None] | None = None,
        on_init: Callable[[], None] | None = None,
        carried: CarriedInit | None = None,
        reuse: ImageReuse | None = None,
        stream: StatusSource | None = None,
    ):
        self.request_id = request_id
        self.transfer_id = transfer_id or request_id  # the encoder's name for it
        self.rank = rank
        self.rank_count = rank_count
        self.pool = pool
        self.link = link
        self.initial_tokens = initial_tokens
        # Blocks reserved before the Encode returned (admission.py): the Init then
        # goes out alongside the Encode, and this task owns the blocks from the start.
        self.blocks: list[int] | None = reserved_blocks
        self.early = reserved_blocks is not None
        self.alloc_timeout_s = alloc_timeout_s
        self.integrity = integrity
        # The optional strategies (receive_options.py): progress inside a round
        # (InitRequest.progress_tokens; its statuses are checked even when it is off) and
        # double-buffered rounds.
        self.progress_tokens = progress_tokens if integrity else 0
        self.parts = ProgressParts(self)
        self.overlap = OverlappedRounds(self) if overlap_rounds else None
        # The next round's blocks while the current round's are still read (double buffering).
        self.next_blocks: list[int] | None = None
        self.overlapped_rounds = 0
        self.on_progress = on_progress
        self.on_quarantine = (
            on_quarantine  # close() quarantined blocks: the owner arranges their release
        )
        # Called as the Init is issued (its call is created before our next await). `carried`:
        # the Init the admission built from the early blocks, for the Encode to carry.
        self.on_init = on_init
        self.carried = carried
        # Image rows this rank holds and claimed for the request (held_images.py); without a
        # claim, a status marking rows reused is refused like any other forged status.
        self.reuse = reuse or ImageReuse(HeldImages(0, pool.record), {})
        self.quarantined_blocks: list[int] = []
        self.quarantined_at: float | None = None
        self.fence = Fence.ENDED
        """Set by close(): what the encoder said of its writes into our blocks."""
        self.telemetry = telemetry
        self.abort_with: BaseException | None = None  # set before cancelling: the reason to report
        self.state = TransferState.UNSPECIFIED
        self.allocated_tokens = 0
        self.initial_allocated_tokens = 0
        self.sent_tokens = 0
        self.total_tokens = 0
        self.rounds = 0
        self.verified_rounds = 0
        self.reason = FailureReason.UNSPECIFIED
        self.message = ""
        self.created = time.monotonic()
        self.init_at: float | None = None
        self.finished_at: float | None = None
        self._segments: list[torch.Tensor] = []  # copies of the rounds before the last
        # The request's Status stream when it was opened before the admission (size-first).
        self._stream: StatusSource | None = stream
        self._round_tokens = 0
        self._initialised = False
        self._terminal_seen = False
        self._closed = False

    # ------------------------------------------------------------------ protocol

    async def start(self) -> None:
        """Reserve the initial allocation and Init the transfer on the encoder."""
        bs = self.pool.block_size
        if self.blocks is None:
            self.blocks = await self._alloc(
                blocks_for_tokens(self.initial_tokens, bs),
                label=f"initial allocation of request {self.request_id} rank {self.rank}",
            )
        self.allocated_tokens = self.initial_allocated_tokens = len(self.blocks) * bs
        self.state = TransferState.BOOTSTRAPPING
        self._progress()
        self.init_at = time.monotonic()
        self._initialised = True  # from here on the encoder may hold state: close() cancels it
        if not self.early and self._stream is None:
            # The Encode opened the transfer on the encoder, so its Status stream can be opened
            # alongside the Init: the first round's status then never waits for a stream set-up.
            # An early Init may reach the encoder before the Encode and opens the transfer
            # itself, so its stream follows it (the write waits for the Encode anyway).
            self.open_status()
        if self.carried is not None:
            if await self.carried.follow(self):
                return
        elif self.on_init is not None:
            self.on_init()
        await self.link.init(
            self.transfer_id,
            self.rank,
            self.rank_count,
            self.blocks,
            self.allocated_tokens,
            progress_tokens=self.progress_tokens,
            held_images=self.reuse.keys,
        )
        if self._stream is None:
            self.open_status()

    def open_status(self, await_transfer: bool = False) -> StatusSource:
        """Open the transfer's Status stream, unless one is open (e.g. the one rank 0 follows on
        its Encode's call); close() closes it, whatever happens after."""
        if self._stream is None:
            self._stream = self.link.status(
                self.transfer_id, self.rank, await_transfer=await_transfer
            )
        return self._stream

    async def receive(self) -> Payload:
        """Follow the Status stream to the end; return the payload or raise the mapped error."""
        handled = 0
        stream = self._stream if self._stream is not None else self.open_status()
        async for st in stream:
            if st.state == TransferState.FAILED:
                self._terminal_seen = True
                if st.writes_may_land:
                    self.fence = (
                        Fence.MAY_LAND
                    )  # close() quarantines; the stream will say when they stop
                self.state = TransferState.FAILED
                self.reason, self.message = st.reason, st.message
                raise errors.error_for_reason(st.reason, f"request {self.request_id}: {st.message}")
            if st.landed_tokens and st.sent_tokens == handled and not st.state.terminal:
                await self.reuse.fill(
                    self, st, handled, min(st.landed_tokens, self.allocated_tokens)
                )
                self.parts.on_landed(st, handled)
                continue
            if (
                st.state in (TransferState.TRANSFERRING, TransferState.SUCCESS)
                and st.sent_tokens > handled
            ):
                self._accept_round(st, handled)
                n = st.sent_tokens - handled
                await self.reuse.fill(self, st, handled, n)  # before anything of it is read
                written = n - self.reuse.reused_in(handled, st.sent_tokens)
                self.telemetry.bytes_moved(written * self.pool.record.payload_bytes_per_token)
                if st.state == TransferState.SUCCESS:
                    self._terminal_seen = True
                    # The last round is verified in place and handed over as a view of the pool.
                    await self._verify(st, handled, n)
                    return await self._finish()
                remaining = self.total_tokens - st.sent_tokens
                spare = self.overlap.spare_blocks(remaining) if self.overlap else None
                if spare is not None and self.overlap is not None:
                    await self.overlap.read_while_resuming(st, handled, n, spare)
                else:
                    # Copy the round out and verify it side by side (both only read the blocks),
                    # then give the blocks back and ask for the next round.
                    await self.read_round(st, handled, n)
                    assert self.blocks is not None  # held from start() until the end
                    self.pool.allocator.free(self.blocks)
                    self.blocks, self.allocated_tokens = None, 0
                    self.blocks = await self._alloc(
                        blocks_for_tokens(remaining, self.pool.block_size),
                        partial_ok=True,
                        priority=True,
                        label=f"resume of request {self.request_id} rank {self.rank}",
                    )
                    self.allocated_tokens = len(self.blocks) * self.pool.block_size
                    self._progress()
                    await self.link.resume(
                        self.transfer_id,
                        self.rank,
                        st.sent_tokens,
                        self.blocks,
                        self.allocated_tokens,
                    )
                self.telemetry.resumed(overlapped=spare is not None)
                handled = st.sent_tokens
            elif st.state in (TransferState.BOOTSTRAPPING, TransferState.WAITING_FOR_INPUT):
                if self.rounds:  # states only move forward: a peer that says otherwise is lying
                    self.reject(
                        f"request {self.request_id} rank {self.rank}: state {st.state.name} after round "
                        f"{self.rounds} was received"
                    )
                self.state = st.state
                self._progress()
            elif not (
                st.state == TransferState.TRANSFERRING
                and st.sent_tokens == handled > 0
                and st.round == self.rounds
            ):
                # Only an exact repeat of the round just handled is ignored; a status going back
                # (fewer tokens, an earlier round) or a SUCCESS without a new round is refused.
                self.reject(
                    f"request {self.request_id} rank {self.rank}: {st.state.name} status with sent_tokens="
                    f"{st.sent_tokens} round {st.round} after {handled} tokens in {self.rounds} round(s) "
                    f"were received"
                )
        raise errors.Unavailable(
            f"request {self.request_id}: the encoder's Status stream ended before the transfer did",
            reason=FailureReason.PEER_LOST,
        )

    async def read_round(self, st: StatusUpdate, handled: int, n: int) -> None:
        """Copy the round (n tokens) out of self.blocks and verify it, side by side: both only read."""
        copied, verified = await asyncio.gather(
            self._copy_out(n), self._verify(st, handled, n), return_exceptions=True
        )
        for outcome in (verified, copied):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _alloc(
        self, n_blocks: int, *, label: str, partial_ok: bool = False, priority: bool = False
    ) -> list[int]:
        started = time.monotonic()
        blocks = await self.pool.allocator.alloc(
            n_blocks,
            timeout=self.alloc_timeout_s,
            partial_ok=partial_ok,
            priority=priority,
            label=label,
        )
        self.telemetry.alloc_waited(time.monotonic() - started)
        return blocks

    def _accept_round(self, st: StatusUpdate, handled: int) -> None:
        """Check that the status describes exactly what our allocation could hold."""
        what = f"request {self.request_id} rank {self.rank} round {st.round}"
        n = st.sent_tokens - handled
        problem = ""
        if self.total_tokens and st.total_tokens != self.total_tokens:
            problem = f"total_tokens changed from {self.total_tokens} to {st.total_tokens}"
        elif st.sent_tokens > st.total_tokens or n != st.round_tokens or n > self.allocated_tokens:
            problem = (
                f"inconsistent status (sent_tokens={st.sent_tokens}, round_tokens={st.round_tokens}, "
                f"previously received {handled}, allocated_tokens={self.allocated_tokens})"
            )
        elif st.state == TransferState.SUCCESS and st.sent_tokens != st.total_tokens:
            problem = f"SUCCESS with sent_tokens={st.sent_tokens} < total_tokens={st.total_tokens}"
        elif st.state == TransferState.TRANSFERRING and st.sent_tokens >= st.total_tokens:
            problem = (
                f"TRANSFERRING with sent_tokens={st.sent_tokens} >= total_tokens={st.total_tokens}"
            )
        elif st.round != self.rounds + 1:
            problem = f"round number {st.round} after round {self.rounds}"
        elif not n <= st.allocated_tokens <= self.allocated_tokens:
            # The encoder reports the allocation it wrote the round into: at least the round,
            # at most what this rank gave it.
            problem = (
                f"allocated_tokens={st.allocated_tokens} does not match this rank's allocation of "
                f"{self.allocated_tokens} tokens for a round of {n}"
            )
        elif st.checksums and sorted(name for name, _ in st.checksums) != sorted(
            f.name for f in self.pool.record.fields
        ):
            problem = (
                f"checksums for fields {[name for name, _ in st.checksums]}, the pool has fields "
                f"{[f.name for f in self.pool.record.fields]}"
            )
        if problem:
            self.reject(f"{what}: {problem}")
        self.total_tokens = st.total_tokens
        self.sent_tokens = st.sent_tokens
        self._round_tokens = n
        self.rounds = st.round
        self.state = st.state

    def reject(self, message: str) -> None:
        """A status that does not match what this rank allocated, or a round that does not match
        its checksums: the request fails (integrity), and the held rows it reused are given up
        in case they were what was wrong."""
        self.telemetry.integrity_failed()
        self.reuse.forget_reused()
        raise errors.IntegrityError(message)

    async def checksums_to(
        self, before: asyncio.Future | None, lo: int, hi: int, handled: int
    ) -> dict[str, int]:
        """Our checksums of the round's tokens [0, hi): those of [0, lo) (the result of `before`,
        a `ProgressParts.check`, or none when lo is 0) combined with a pass over [lo, hi)."""
        have = await before if before is not None else {}
        assert self.blocks is not None  # the round is read in them
        got = await checksums_off_loop(
            self.pool.runs(self.blocks, lo, hi - lo), self.pool.record, handled + lo
        )
        return {name: combine(have.get(name, 0), value) for name, value in got.items()}

    async def _verify(self, st: StatusUpdate, handled: int, n: int) -> None:
        """Compare the round's checksums with what we hold; IntegrityError naming the field. What
        progress statuses reported landed was checked already (`ProgressParts`): only the rest is
        read here."""
        check, lo = self.parts.take_check()
        if not (self.integrity and st.checksums):
            return
        have = await self.checksums_to(check, lo, n, handled)
        self.compare(have, dict(st.checksums), st.round, handled, st.sent_tokens)
        self.verified_rounds += 1

    def compare(
        self, got: dict[str, int], expected: dict[str, int], round_no: int, lo: int, hi: int
    ) -> None:
        for name, value in expected.items():
            if got.get(name) != value:
                self.reject(
                    f"request {self.request_id} rank {self.rank} round {round_no}: checksum of field {name!r} "
                    f"over tokens [{lo}, {hi}) is {got.get(name)}, the encoder sent {value}"
                )

    async def _copy_out(self, n: int) -> torch.Tensor:
        """The round's records, copied out of the pool (so its blocks can serve the next round);
        the parts that progress statuses reported were copied as they landed (`ProgressParts`)."""
        segment, lo, before = self.parts.take_copy()
        if segment is None:
            segment, lo = (
                torch.empty(
                    (n, self.pool.record.record_bytes),
                    dtype=torch.uint8,
                    device=self.pool.slab.device,
                ),
                0,
            )
        segment = segment[:n]  # another rank's smaller allocation may have made the round shorter
        if before is not None:
            await before
        await self.copy_range(segment, lo, n)
        self._segments.append(segment)
        return segment

    async def copy_range(self, segment: torch.Tensor, lo: int, hi: int) -> None:
        """Copy the round's tokens [lo, hi) from the pool into segment[lo:hi]."""
        if hi <= lo:
            return

        def copy(runs: list[torch.Tensor], first: int) -> None:
            for run in runs:
                segment[first : first + run.shape[0]].copy_(run)
                first += run.shape[0]
            settle(segment)  # a CUDA copy is queued: done before the blocks can be freed

        # Big rounds are split over worker threads, like big checksums (torch runs single-threaded here).
        assert self.blocks is not None  # the round is read in them
        await run_split_async(
            copy,
            self.pool.runs(self.blocks, lo, hi - lo),
            lo,
            min_split_bytes=MEMORY_BOUND_SPLIT_BYTES,
        )

    async def _finish(self) -> Payload:
        blocks, self.blocks = self.blocks, None
        assert blocks is not None  # the last round is in them
        self.allocated_tokens = 0
        segments, self._segments = self._segments, []
        # The last round stays in the pool (no copy); its blocks return on release().
        payload = Payload(
            self.pool.record,
            [*segments, *self.pool.runs(blocks, 0, self._round_tokens)],
            on_release=lambda: self.pool.allocator.free(blocks),
        )
        self.state = TransferState.SUCCESS
        self.finished_at = time.monotonic()
        return payload

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self)

    @property
    def integrity_verified(self) -> bool:
        return self.integrity and self.rounds > 0 and self.verified_rounds == self.rounds

    # ------------------------------------------------------------------ cleanup

    async def close(self, failure: BaseException | None = None) -> None:
        """Free every block held; if the encoder may still be working on the request, cancel it
        there first and wait for its answer, so no write can land in blocks we hand out again.
        Without an answer the blocks the encoder may still write are quarantined instead
        (`on_quarantine` is told; see `release_when_safe`)."""
        if self._closed:
            return
        self._closed = True
        if failure is not None and self.state != TransferState.FAILED:
            self.state = TransferState.FAILED
            if isinstance(failure, errors.EpdError):
                self.reason, self.message = failure.reason, failure.message
            elif isinstance(failure, asyncio.CancelledError):
                self.reason, self.message = FailureReason.CANCELLED, "cancelled"
            else:
                self.reason, self.message = FailureReason.UNSPECIFIED, repr(failure)
        if self._initialised and not self._terminal_seen:
            self.fence = await self._cancel_on_encoder()
        if self._stream is not None and self.fence is not Fence.MAY_LAND:
            # Closed after Cancel, so the encoder records why the request ended. While writes may
            # land the stream stays open: the encoder's next status says when they stopped.
            self._stream.close()
        check, _ = self.parts.take_check()
        _, _, copying = self.parts.take_copy()
        for part in (check, copying):  # work on parts that landed, moot now
            if part is not None:
                part.cancel()
                await asyncio.gather(part, return_exceptions=True)
        if self.next_blocks is not None:  # a Resume went out for them: the encoder may write there
            self.blocks = [*(self.blocks or []), *self.next_blocks]
            self.next_blocks = None
        if self.blocks is not None:
            if self.fence is Fence.ENDED:
                self.pool.allocator.free(self.blocks)
            else:
                self.pool.allocator.quarantine(self.blocks)
                self.quarantined_blocks, self.quarantined_at = self.blocks, time.monotonic()
                self.telemetry.write_fenced()
                why = (
                    "says a write of it may still land"
                    if self.fence is Fence.MAY_LAND
                    else "did not confirm the end of"
                )
                log.warning(
                    "request %s rank %d: encoder %s %s transfer %s: %d block(s) quarantined until it says "
                    "its writes ended",
                    self.request_id,
                    self.rank,
                    self.link.address,
                    why,
                    self.transfer_id,
                    len(self.blocks),
                )
            self.blocks, self.allocated_tokens = None, 0
            if self.quarantined_blocks and self.on_quarantine is not None:
                self.on_quarantine(self)
        if self._stream is not None and not self.quarantined_blocks:
            self._stream.close()
        self._segments = []
        self.finished_at = self.finished_at or time.monotonic()

    async def _cancel_on_encoder(self) -> Fence:
        """Cancel the transfer on the encoder and wait for its answer (it answers once the
        transfer ended): ENDED only when it says no write of it can land (or does not know it)."""
        try:
            ended = await asyncio.wait_for(
                self.link.cancel(self.transfer_id, self.message, self.reason),
                timeout=CANCEL_TIMEOUT_S,
            )
        except errors.NotFound:
            return (
                Fence.ENDED
            )  # the encoder does not know the transfer (any more): nothing of it is in flight
        except UNREACHABLE as e:
            log.info(
                "request %s rank %d: Cancel on encoder %s got no answer: %s",
                self.request_id,
                self.rank,
                self.link.address,
                e,
            )
            return Fence.UNANSWERED
        except errors.EpdError as e:  # an answer that says nothing about its writes
            log.info(
                "request %s rank %d: Cancel on encoder %s: %s",
                self.request_id,
                self.rank,
                self.link.address,
                e,
            )
            return Fence.MAY_LAND
        return Fence.ENDED if ended else Fence.MAY_LAND

    async def fence_news(self) -> None:
        """Return once the Status stream kept open by close() says the writes ended (a FAILED
        status without writes_may_land); never, when it ends or breaks without saying so."""
        stream = self._stream
        if stream is not None:
            try:
                async for st in stream:
                    if st.state.terminal and not st.writes_may_land:
                        return
            except errors.EpdError:
                pass
        await asyncio.Event().wait()

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()


async def _refused(e: BaseException, address: str) -> bool:
    """After an UNAVAILABLE: whether the encoder's host answers that nothing listens at `address`
    (the encoder process is gone, so it starts no write; what its kernel still held goes out over
    a path that works). Asked of the host itself with one TCP connect, whose refusal is a typed
    error; a connect that times out or reaches a listener is no such answer."""
    if not isinstance(e, errors.Unavailable):
        return False
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), PROBE_TIMEOUT_S
        )
    except ConnectionRefusedError:
        return True
    except (TimeoutError, OSError, ValueError):
        return False
    writer.close()
    return False


async def release_when_safe(
    task: ReceiveTask, grace_s: float, *, max_s: float = 600.0, probe_s: float = PROBE_S
) -> None:
    """Return a closed task's quarantined blocks to the pool once no write of its transfer can
    land in them: the encoder said its writes ended — a FAILED status without writes_may_land on
    the Status stream close() kept open, or a Cancel answered writes_ended (or NOT_FOUND, or a
    refused connection: the encoder process is gone, see `_refused`), asked every `probe_s`.

    When the encoder had been unreachable at some point (the Cancel got no answer, or a probe
    did not), the blocks stay out `grace_s` longer, plus as long as it had been unreachable
    (capped at MAX_OUTAGE_EXTRA_S), with the encoder answering all along: TCP retransmissions
    back off, so bytes a failed write left in the encoder's kernel come later after a longer
    outage (measured: ~4.5 s after the link came back from a 3.3 s cut). A probe without an
    answer starts that wait again. Without a word that the writes ended, the blocks return after
    `max_s` anyway (WARNING): by then the encoder's write timeout and TCP's retransmission
    limits ended anything of the write. Cancelled at shutdown: the blocks then go with the pool."""
    blocks, since = task.quarantined_blocks, task.quarantined_at or time.monotonic()
    unreachable_since = since if task.fence is Fence.UNANSWERED else None
    was_unreachable = unreachable_since is not None
    ended_at: float | None = None
    hold = 0.0
    news = asyncio.ensure_future(task.fence_news())
    try:
        while True:
            if news.done():
                reachable, ended = True, True
            else:
                reachable, ended = await _probe(task)
            now = time.monotonic()
            if not reachable:
                if unreachable_since is None:
                    unreachable_since = now
                was_unreachable = True
                if ended_at is not None:
                    log.info(
                        "request %s rank %d: encoder %s stopped answering again; quarantine of %d block(s) goes "
                        "on",
                        task.request_id,
                        task.rank,
                        task.link.address,
                        len(blocks),
                    )
                ended_at = None
            elif ended and ended_at is None:
                ended_at = now
                outage = (now - unreachable_since) if unreachable_since is not None else 0.0
                hold = grace_s + min(outage, MAX_OUTAGE_EXTRA_S) if was_unreachable else 0.0
                unreachable_since = None
                log.info(
                    "request %s rank %d: encoder %s says the writes of transfer %s ended; its %d quarantined "
                    "block(s) return in %.1f s",
                    task.request_id,
                    task.rank,
                    task.link.address,
                    task.transfer_id,
                    len(blocks),
                    hold,
                )
            elif reachable:
                unreachable_since = None
            if ended_at is not None and now - ended_at >= hold:
                break
            if ended_at is None and now - since >= max_s:
                log.warning(
                    "request %s rank %d: encoder %s has not said the writes of transfer %s ended within "
                    "quarantine_max_s=%.0f s; its %d quarantined block(s) return to the pool",
                    task.request_id,
                    task.rank,
                    task.link.address,
                    task.transfer_id,
                    max_s,
                    len(blocks),
                )
                break
            wait = probe_s if ended_at is None else min(probe_s, max(0.0, hold - (now - ended_at)))
            await asyncio.wait([news], timeout=wait)
    finally:
        news.cancel()
        task.close_stream()
    task.pool.allocator.release_quarantine(blocks)
    task.quarantined_blocks = []
    held = time.monotonic() - since
    task.telemetry.fence_released(held)
    log.warning(
        "request %s rank %d: %d quarantined block(s) back in the pool (%.1f s after the transfer ended)",
        task.request_id,
        task.rank,
        len(blocks),
        held,
    )


async def _probe(task: ReceiveTask) -> tuple[bool, bool]:
    """Ask the encoder again (a Cancel of the transfer): (it answered, its writes ended)."""
    try:
        ended = await asyncio.wait_for(
            task.link.cancel(task.transfer_id, f"quarantine check of request {task.request_id}"),
            timeout=PROBE_TIMEOUT_S,
        )
        return True, bool(ended)
    except errors.NotFound:
        return True, True  # it holds nothing of the transfer
    except UNREACHABLE as e:
        refused = await _refused(e, task.link.address)
        return refused, refused
    except errors.EpdError:  # an answer that says nothing of its writes
        return True, False
    except Exception as e:  # noqa: BLE001 - the loop must go on (max_s bounds it)
        log.warning(
            "request %s rank %d: quarantine check on encoder %s: %r",
            task.request_id,
            task.rank,
            task.link.address,
            e,
        )
        return False, False
