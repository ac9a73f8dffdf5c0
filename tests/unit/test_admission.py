"""Early reservations of a language rank (services/language/admission.py): the budget that keeps
early reservations from starving requests admitted after their Encode, the carried Init naming
exactly the reserved blocks, and what happens to a reservation no receive task took."""

from __future__ import annotations

import asyncio

import pytest

from common.layout import RecordLayout, default_fields
from common.pool import BlockPool
from services.language.admission import EarlyReservations

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
