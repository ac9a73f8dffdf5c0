"""Early reservations of a language rank (services/language/admission.py): the budget that keeps
early reservations from starving requests admitted after their Encode, the carried Init naming
exactly the reserved blocks, and what happens to a reservation no receive task took; and the
size-first read-ahead (`AnnouncedSize`): the size said, and every status kept for the receive."""

from __future__ import annotations

import asyncio

import pytest

from common import errors
from common.layout import RecordLayout, default_fields
from common.pool import BlockPool
from common.states import StatusUpdate, TransferState
from services.language.admission import AnnouncedSize, EarlyReservations

BLOCK = 16
POOL_BLOCKS = 10


def pool() -> BlockPool:
    return BlockPool(RecordLayout.pack(default_fields(16, "bfloat16")), BLOCK, POOL_BLOCKS)


@pytest.mark.parametrize(
    "bound_blocks, requests, reserved",
    [
        (0, [4, 4, 4], [True, True, False]),  # the pool itself is the limit
        (4, [4, 4], [True, False]),  # 6 blocks may be held early: 4 fit, 4 more do not
        (6, [4, 1], [True, False]),  # exactly pool - bound
        (10, [1], [False]),  # a late request may need the whole pool: nothing early
    ],
    ids=["pool", "bound", "exact", "no-room"],
)
async def test_early_reservations_leave_room_for_the_largest_late_request(
    bound_blocks, requests, reserved
):
    p = pool()
    early = EarlyReservations(p)
    got = [early.reserve(f"r{i}", n * BLOCK, bound_blocks * BLOCK) for i, n in enumerate(requests)]
    assert got == reserved
    held = sum(n for n, ok in zip(requests, got) if ok)
    assert p.allocator.free_count == POOL_BLOCKS - held
    for i, ok in enumerate(got):
        if ok:
            early.encode_returned(f"r{i}")  # no longer counts against the budget
    assert early.reserve("again", BLOCK, bound_blocks * BLOCK) == (
        p.allocator.free_count >= 1 and bound_blocks < POOL_BLOCKS
    )


async def test_the_carried_init_names_the_reserved_blocks_and_goes_with_them():
    p = pool()
    early = EarlyReservations(p)
    assert early.reserve("r", 3 * BLOCK, 0)
    carried = early.carry_init("r", "lang/r", 0, 1, progress_tokens=0)
    blocks, taken = early.take("r")
    assert taken is carried and carried.blocks == blocks and len(blocks) == 3
    assert carried.allocated_tokens == 3 * BLOCK and carried.request_id == "lang/r"
    assert early.take("r") == (None, None)  # taken once
    early.release("r")  # the task ended: it owned them, nothing left here
    assert p.allocator.free_count == POOL_BLOCKS - 3
    p.allocator.free(blocks)


@pytest.mark.parametrize(
    "carry, init_unsent, quarantined",
    [
        (True, False, True),  # an Encode may carry the Init: nobody can fence the blocks
        (True, True, False),  # no Encode will carry it (its admission failed)
        (False, False, False),  # the Init is the task's own: it was never sent
    ],
    ids=["carried", "carried-unsent", "own-init"],
)
async def test_a_reservation_no_task_took(carry, init_unsent, quarantined):
    p = pool()
    early = EarlyReservations(p, carry=carry)
    assert early.reserve("r", 2 * BLOCK, 0)
    if carry:
        early.carry_init("r", "lang/r", 0, 1, progress_tokens=0)
    early.release("r", init_unsent=init_unsent)
    assert p.allocator.quarantined_count == (2 if quarantined else 0)
    assert p.allocator.free_count == POOL_BLOCKS - (2 if quarantined else 0)
    await early.init_issued("r")  # nothing left to wait for


async def test_an_own_init_is_waited_for_until_the_task_issues_it():
    p = pool()
    early = EarlyReservations(p, carry=False)
    assert early.reserve("r", BLOCK, 0)
    waiting = asyncio.ensure_future(early.init_issued("r"))
    await asyncio.sleep(0)
    assert not waiting.done()
    early.init_sent("r")
    await waiting
    early.release("r")
    assert p.allocator.free_count == POOL_BLOCKS


# ------------------------------------------------------------------ size-first: AnnouncedSize


class ScriptedStream:
    """Test double of a Status stream: yields `items` in order (an exception is raised where it
    stands), then ends; records whether it was closed."""

    def __init__(self, items):
        self.items = list(items)
        self.read = 0
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        self.read += 1
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.closed = True


def _st(state: TransferState, total: int = 0, sent: int = 0) -> StatusUpdate:
    return StatusUpdate("r", state, total_tokens=total, sent_tokens=sent, round=1 if sent else 0)


BOOT, WAIT, DONE = (
    TransferState.BOOTSTRAPPING,
    TransferState.WAITING_FOR_INPUT,
    TransferState.SUCCESS,
)
FAILED = TransferState.FAILED

ANNOUNCED = [
    # (id, what the encoder sends, the size said, statuses read ahead)
    ("said-while-bootstrapping", [_st(BOOT), _st(BOOT, 300), _st(DONE, 300, 300)], 300, 2),
    ("said-while-waiting", [_st(WAIT, 70), _st(DONE, 70, 70)], 70, 1),
    ("ended-before-saying", [_st(BOOT)], 0, 1),
    ("failed-before-saying", [_st(BOOT), _st(FAILED)], 0, 2),
    ("a-round-before-any-size", [_st(BOOT), _st(DONE, 10, 10)], 0, 2),
    ("stream-error", [_st(BOOT), errors.Unavailable("gone")], 0, 2),
]


@pytest.mark.parametrize(
    "items, size, ahead", [c[1:] for c in ANNOUNCED], ids=[c[0] for c in ANNOUNCED]
)
async def test_announced_size_reads_ahead_and_loses_nothing(items, size, ahead):
    stream = ScriptedStream(items)
    announced = AnnouncedSize(stream)
    assert await announced.size() == size
    assert stream.read == ahead  # it stopped reading where the size (or the end) was
    got, raised = [], None
    try:
        async for st in announced:  # the receive task sees every status, in order, then the end
            got.append(st)
    except errors.EpdError as e:
        raised = e
    assert got == [x for x in items if isinstance(x, StatusUpdate)]
    stream_errors = [x for x in items if isinstance(x, BaseException)]
    assert raised is (stream_errors[0] if stream_errors else None)
    announced.close()
    assert stream.closed


async def test_giving_up_on_the_size_loses_no_status():
    """The front door stops waiting for the size when the Encode returns first: whatever was read
    meanwhile still reaches the receive task."""
    gate = asyncio.Event()

    class Slow(ScriptedStream):
        async def __anext__(self):
            if self.read == 1:
                await gate.wait()
            return await super().__anext__()

    stream = Slow([_st(BOOT), _st(BOOT, 40), _st(DONE, 40, 40)])
    announced = AnnouncedSize(stream)
    waiting = asyncio.ensure_future(announced.size())
    await asyncio.sleep(0.01)
    waiting.cancel()  # the Encode's reply came first
    gate.set()
    assert [st.total_tokens async for st in announced] == [0, 40, 40]
    announced.close()
