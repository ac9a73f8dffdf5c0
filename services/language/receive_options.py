"""The optional strategies of a language rank's receive (receiver.py keeps the core loop:
reserve, Init, statuses, copy-out, Resume, verify, finish):

- `CarriedInit`: an early Init handed to the Encode to carry (one message instead of two);
- `OverlappedRounds` (`--overlap-rounds`): a round whose successor fits in blocks free right now
  is double-buffered: the Resume goes out at once, and the round is read while the encoder writes
  the next one;
- `ProgressParts` (`--progress-tokens`): progress statuses inside a round; what landed is
  verified, and for a round that is not the last copied out, while the rest is written.

Each works on its `ReceiveTask` through the task's own steps (`read_round`, `checksums_to`,
`copy_range`, `reject`), so the protocol's checks stay in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from common.plan import blocks_for_tokens
from common.states import StatusUpdate

if TYPE_CHECKING:
    from services.language.receiver import ReceiveTask


class CarriedInit:
    """An early Init for the Encode to carry (EncodeRequest.init: one message instead of two),
    and what became of it: `sent` is done once the Encode carrying it was issued; `outcome` is
    True once the encoder took it, False when it was refused or not carried (the rank then sends
    its own Init). Both stay pending when the Encode failed: the request is then abandoned, which
    ends the receive."""

    def __init__(
        self,
        request_id: str,
        rank: int,
        rank_count: int,
        blocks: Sequence[int],
        allocated_tokens: int,
        progress_tokens: int,
        held_images: Sequence[str] = (),
    ):
        self.request_id = request_id
        self.rank = rank
        self.rank_count = rank_count
        self.blocks = list(blocks)
        self.allocated_tokens = allocated_tokens
        self.progress_tokens = progress_tokens
        self.held_images = list(held_images)
        loop = asyncio.get_running_loop()
        self.sent: asyncio.Future[None] = loop.create_future()
        self.outcome: asyncio.Future[bool] = loop.create_future()

    async def follow(self, task: ReceiveTask) -> bool:
        """The receive task whose early blocks this Init names: open its Status stream right
        behind the Encode carrying the Init; True once the encoder took the Init (False: the task
        sends its own)."""
        # Behind the Encode, not after its reply: the encoder holds the stream until the carried
        # Init opened the transfer (await_transfer), and the stream's set-up and first status
        # then overlap the encoding, not the write.
        await self.sent
        task.open_status(await_transfer=True)  # before the next await: close() must see it
        return await self.outcome

    def issued(self) -> None:
        if not self.sent.done():
            self.sent.set_result(None)

    def settle(self, applied: bool) -> None:
        self.issued()
        if not self.outcome.done():
            self.outcome.set_result(applied)


class OverlappedRounds:
    """Double-buffered rounds of one receive."""

    def __init__(self, task: ReceiveTask):
        self.task = task

    def spare_blocks(self, remaining: int) -> list[int] | None:
        """Blocks for the next round that are free right now, or None: at least as many as this
        round holds, and only when no other allocation waits (try_alloc never jumps the queue).
        Never waits, so holding this round's blocks meanwhile cannot deadlock with anyone.

        None when the next round could be the last (the free blocks and ours together hold all
        that is left): then the encoder could end the transfer as a success before our verdict on
        this round arrives, and a round that fails its check must fail the transfer there too."""
        task = self.task
        assert task.blocks is not None  # the round just received is in them
        need = blocks_for_tokens(remaining, task.pool.block_size)
        free = task.pool.allocator.free_count
        if free < len(task.blocks) or free + len(task.blocks) >= need:
            return None
        return task.pool.allocator.try_alloc(free)

    async def read_while_resuming(
        self, st: StatusUpdate, handled: int, n: int, spare: list[int]
    ) -> None:
        """Resume into `spare` at once and read the round while the encoder writes the next one
        (never the last: `spare_blocks`). A round that fails its check still fails the request on
        both sides: close() cancels it on the encoder (reason integrity), which then waits for a
        Resume, before any of its blocks are reused."""
        task = self.task
        task.next_blocks = spare
        allocated = len(spare) * task.pool.block_size
        # The Resume goes out first: the encoder's next write then runs beside our reading.
        resumed = asyncio.get_running_loop().create_task(
            task.link.resume(task.transfer_id, task.rank, st.sent_tokens, spare, allocated)
        )
        await asyncio.sleep(0)
        outcomes = await asyncio.gather(
            task.read_round(st, handled, n), resumed, return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        assert task.blocks is not None  # the round just read
        task.pool.allocator.free(task.blocks)
        task.blocks, task.next_blocks, task.allocated_tokens = spare, None, allocated
        task.overlapped_rounds += 1
        task._progress()


class ProgressParts:
    """Progress inside a round (InitRequest.progress_tokens) of one receive. `landed`: tokens of
    the current round whose check is under way; `check`: that check (our checksums of them, once
    it passed). A round that is not the last is copied out as its parts land, too: `copy` is the
    round's segment, tokens [0, `copied`) of it copied (or being copied) by `copying`."""

    def __init__(self, task: ReceiveTask):
        self.task = task
        self.landed = 0
        self.check: asyncio.Future | None = None
        self.copy: torch.Tensor | None = None
        self.copied = 0
        self.copying: asyncio.Future | None = None

    def take_check(self) -> tuple[asyncio.Future | None, int]:
        """The check of what landed of the round so far, and up to where: the round's own status
        checks the rest."""
        check, lo = self.check, self.landed
        self.check, self.landed = None, 0
        return check, lo

    def take_copy(self) -> tuple[torch.Tensor | None, int, asyncio.Future | None]:
        """The round's segment as copied so far (None: not started), up to where, and the copy
        still under way."""
        segment, lo, before = self.copy, self.copied, self.copying
        self.copy, self.copied, self.copying = None, 0, None
        return segment, lo, before

    def on_landed(self, st: StatusUpdate, handled: int) -> None:
        """A progress status: the round's first st.landed_tokens tokens are in our blocks. Check
        them (beside the rest of the write) against st.landed_checksums; the round's own status
        then leaves only the part after them to check."""
        task = self.task
        landed = st.landed_tokens
        if landed == self.landed:
            return  # a repeat
        if (
            landed < self.landed
            or landed > task.allocated_tokens
            or (st.total_tokens and handled + landed >= st.total_tokens)
        ):
            task.reject(
                f"request {task.request_id} rank {task.rank}: progress status with landed_tokens={landed} "
                f"(before: {self.landed}; allocated_tokens={task.allocated_tokens}, {handled} of "
                f"{st.total_tokens} tokens received)"
            )
        if not (task.integrity and task.progress_tokens and st.landed_checksums):
            return
        self.check = asyncio.ensure_future(
            self._check_landed(
                self.check,
                self.landed,
                landed,
                handled,
                st.round + 1,
                dict(st.landed_checksums),
            )
        )
        self.landed = landed
        # Not the last round (even if every rank's allocation were as big as ours): its records
        # must leave the pool before the next round, so start copying what landed.
        round_at_most = min(st.total_tokens - handled, task.allocated_tokens)
        if handled + round_at_most < st.total_tokens:
            if self.copy is None:
                self.copy = torch.empty(
                    (round_at_most, task.pool.record.record_bytes),
                    dtype=torch.uint8,
                    device=task.pool.slab.device,
                )
            self.copying = asyncio.ensure_future(
                self._copy_part(self.copying, self.copy, self.copied, landed)
            )
            self.copied = landed

    async def _check_landed(
        self,
        before: asyncio.Future | None,
        lo: int,
        hi: int,
        handled: int,
        round_no: int,
        expected: dict[str, int],
    ) -> dict[str, int]:
        """Our checksums of the round's tokens [0, hi), given the check of [0, lo) (`before`),
        compared with the encoder's; IntegrityError naming the field."""
        task = self.task
        have = await task.checksums_to(before, lo, hi, handled)
        task.compare(have, expected, round_no, handled, handled + hi)
        return have

    async def _copy_part(
        self, before: asyncio.Future | None, segment: torch.Tensor, lo: int, hi: int
    ) -> None:
        if before is not None:
            await before
        await self.task.copy_range(segment, lo, hi)
