"""A language rank refuses a Status that does not match the allocation it sent.

The encoder is replaced by a fake link that sends scripted, forged statuses (fault injection:
a healthy encoder never sends them): sent_tokens beyond the allocation, an allocated_tokens it
was never given, going backwards, a skipped round, the wrong checksums, a SUCCESS without a new
round, a state going back. Each is rejected with `integrity`, the transfer is cancelled on the
"encoder" with that reason, and the rank's pool ends fully free.
"""

from __future__ import annotations

import asyncio

import pytest

from common import errors
from common.layout import RecordLayout, default_fields
from common.pool import BlockPool
from common.states import FailureReason, ImageSpan, StatusUpdate, TransferState
from services.language.receiver import ReceiveTask

BLOCK = 16
POOL_BLOCKS = 8
T, S, B = TransferState.TRANSFERRING, TransferState.SUCCESS, TransferState.BOOTSTRAPPING
FIELDS = ("embeddings", "token_ids", "mrope_positions")


class _Stream:
    def __init__(self, statuses):
        self._it = iter(statuses)

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        pass


class ForgingLink:
    """A fake encoder link whose Status stream plays a script (fault injection)."""

    address = "fake-encoder"

    def __init__(self, statuses):
        self.statuses = statuses
        self.cancels: list[str] = []
        self.resumes: list[tuple[int, int]] = []

    async def init(self, request_id, rank, rank_count, blocks, allocated_tokens, **kw):
        pass

    async def resume(self, request_id, rank, sent_tokens, blocks, allocated_tokens, **kw):
        self.resumes.append((sent_tokens, allocated_tokens))
        return False

    def status(self, request_id, rank, await_transfer=False):
        return _Stream(self.statuses)

    async def cancel(self, request_id, reason, failure=None):
        self.cancels.append(failure)
        return True  # the encoder says no write of the transfer can land


def st(state, sent, total, rnd, round_tokens=None, allocated=None, checksums=(), images=()):
    n = round_tokens if round_tokens is not None else 0
    return StatusUpdate(
        "r",
        state,
        sent_tokens=sent,
        total_tokens=total,
        round=rnd,
        round_tokens=n,
        allocated_tokens=n if allocated is None else allocated,
        checksums=checksums,
        images=images,
    )


def span(start, tokens, reused=False, image=0, key="ab" * 32):
    return ImageSpan(image, start, tokens, key, (start, start, start), reused)


def round_(state, sent, total, rnd, handled, **kw):
    """A well-formed round status (round_tokens = allocated_tokens = sent - handled) unless overridden."""
    n = sent - handled
    return st(state, sent, total, rnd, kw.pop("round_tokens", n), kw.pop("allocated", n), **kw)


async def run(statuses, initial_tokens=2 * BLOCK):
    pool = BlockPool(RecordLayout.pack(default_fields(16, "bfloat16")), BLOCK, POOL_BLOCKS)
    link = ForgingLink(statuses)
    task = ReceiveTask("r", 0, 1, pool, link, initial_tokens=initial_tokens, alloc_timeout_s=1.0)
    failure = None
    payload = None
    try:
        await task.start()
        payload = await task.receive()
    except errors.EpdError as e:
        failure = e
    finally:
        await task.close(failure)
    if payload is not None:
        payload.release()
    assert pool.allocator.free_count == POOL_BLOCKS, "the rank's pool is not fully free"
    return failure, link


FORGED = {
    "sent beyond the allocation": ([round_(T, 48, 100, 1, 0)], "allocated_tokens=32"),
    "allocated_tokens never given": (
        [round_(T, 32, 100, 1, 0, allocated=64)],
        "allocated_tokens=64 does not match",
    ),
    "allocated_tokens below the round": (
        [round_(T, 32, 100, 1, 0, allocated=16)],
        "allocated_tokens=16",
    ),
    "round_tokens lie": ([round_(T, 32, 100, 1, 0, round_tokens=16)], "inconsistent status"),
    "going backwards": (
        [round_(T, 32, 100, 1, 0), round_(T, 16, 100, 1, 0)],
        "sent_tokens=16 round 1 after 32",
    ),
    "an earlier round again": (
        [round_(T, 32, 100, 1, 0), round_(T, 32, 100, 0, 0)],
        "round 0 after 32",
    ),
    "a skipped round number": ([round_(T, 32, 100, 2, 0)], "round number 2 after round 0"),
    "SUCCESS without a new round": (
        [round_(T, 32, 100, 1, 0), round_(S, 32, 32, 1, 0)],
        "SUCCESS status",
    ),
    "TRANSFERRING with nothing left": (
        [round_(T, 32, 32, 1, 0)],
        "TRANSFERRING with sent_tokens=32 >= total_tokens",
    ),
    "total changes": ([round_(T, 32, 100, 1, 0), round_(T, 64, 90, 2, 32)], "total_tokens changed"),
    "too few checksums": (
        [round_(S, 20, 20, 1, 0, checksums=(("embeddings", 1),))],
        "checksums for fields",
    ),
    "a duplicated checksum": (
        [round_(S, 20, 20, 1, 0, checksums=(("embeddings", 1),) * 3)],
        "checksums for fields",
    ),
    "an unknown field's checksum": (
        [
            round_(
                S, 20, 20, 1, 0, checksums=tuple((f, 1) for f in FIELDS[:2]) + (("deepstack", 1),)
            )
        ],
        "checksums for fields",
    ),
    "rows marked reused that the rank never claimed": (
        [round_(S, 20, 20, 1, 0, images=(span(4, 8, reused=True),))],
        "did not say it holds",
    ),
    "image spans overlapping": (
        [round_(S, 20, 20, 1, 0, images=(span(2, 8), span(6, 4, image=1)))],
        "overlap an earlier image",
    ),
    "an image span beyond the payload": (
        [round_(S, 20, 20, 1, 0, images=(span(16, 8),))],
        "leave the payload of 20 tokens",
    ),
    "image spans changing between rounds": (
        [
            round_(T, 32, 100, 1, 0, images=(span(40, 8),)),
            round_(T, 64, 100, 2, 32, images=(span(48, 8),)),
        ],
        "the image spans changed",
    ),
    "state going back": (
        [round_(T, 32, 100, 1, 0), st(B, 0, 0, 0)],
        "state BOOTSTRAPPING after round 1",
    ),
}


@pytest.mark.parametrize("case", list(FORGED))
async def test_forged_status_is_integrity_fault_injected(case):
    statuses, needle = FORGED[case]
    failure, link = await run(statuses)
    assert isinstance(failure, errors.IntegrityError), f"{case}: {failure!r}"
    assert needle in failure.message, f"{case}: {failure.message!r}"
    assert link.cancels == [FailureReason.INTEGRITY], link.cancels  # the encoder fails it so too


async def test_exact_repeats_are_ignored_and_a_true_transfer_completes_fault_injected():
    """The control: the same script shape, well formed, with every status sent twice, succeeds."""
    script = [
        round_(T, 32, 100, 1, 0),
        round_(T, 32, 100, 1, 0),
        round_(T, 64, 100, 2, 32),
        round_(T, 64, 100, 2, 32),
        round_(S, 100, 100, 3, 64),
        round_(S, 100, 100, 3, 64),
    ]
    failure, link = await run(script)
    assert failure is None
    assert link.resumes == [(32, 68 // BLOCK * BLOCK + BLOCK), (64, 48)]
    assert link.cancels == []
