"""The write fence's bookkeeping (common/fence.py), with threads standing in for writes: what a
fence holds, what settles it, and how quarantined blocks come back (when the writes ended, or at
the bound with a WARNING). Real Mooncake writes: tests/integration/test_write_fence.py."""

from __future__ import annotations

import asyncio
import threading

from common.errors import TransportError
from common.fence import LateWrites, WriteFence, quarantine_until_landed, run_tracked
from common.pool import BlockAllocator


async def test_a_write_holds_the_fence_until_it_returns_even_when_its_caller_is_cancelled():
    fence = WriteFence()
    go = threading.Event()
    write = asyncio.ensure_future(run_tracked(lambda: go.wait(5), fence))
    await asyncio.sleep(0.05)
    write.cancel()
    await asyncio.gather(write, return_exceptions=True)
    assert fence.may_land  # the worker thread still runs the write
    go.set()
    assert await fence.wait(2) and not fence.may_land


async def test_a_write_that_never_started_is_not_held():
    fence = WriteFence()
    # Fill the default executor so the next write waits for a thread, then cancel it.
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    busy = [loop.run_in_executor(None, gate.wait, 5) for _ in range(64)]
    write = asyncio.ensure_future(run_tracked(lambda: None, fence))
    await asyncio.sleep(0.05)
    write.cancel()
    await asyncio.gather(write, return_exceptions=True)
    gate.set()
    await asyncio.gather(*busy)
    assert await fence.wait(2) and fence.late_writes == 0


async def test_what_a_failed_write_left_in_flight_is_held_until_it_settles():
    fence = WriteFence()
    late = LateWrites(2, 8192, "peer:1")

    def give_up():
        raise TransportError("gave up at the deadline", in_flight=late)

    try:
        await run_tracked(give_up, fence)
    except TransportError:
        pass
    assert fence.may_land and fence.late_writes == 1 and not fence.unknowable
    threading.Thread(target=late.piece_final, args=(True,)).start()
    assert not await fence.wait(0.1)  # one piece is still running
    threading.Thread(target=late.piece_final, args=(False,)).start()
    assert await fence.wait(2) and fence.failed_pieces == 1


async def test_blocks_come_back_when_the_writes_end_or_at_the_bound(caplog):
    allocator = BlockAllocator(8)
    blocks = allocator.try_alloc(4)
    fence = WriteFence()
    late = LateWrites(1, 100, "peer:1")
    fence.track(late.settled)
    released = []
    task = quarantine_until_landed(
        allocator, blocks, fence, 30.0, "request r", lambda *a: released.append(a)
    )
    assert allocator.quarantined_count == 4 and allocator.try_alloc(5) is None  # never handed out
    late.piece_final(True)
    await asyncio.wait_for(task, 2)
    assert allocator.free_count == 8 and allocator.quarantined_count == 0
    assert released[0][0] is True

    blocks = allocator.try_alloc(4)
    fence = WriteFence()

    def spin_failed():  # a failed batch_transfer_sync_write: nothing will ever settle what it left
        raise TransportError("returned -1", in_flight=LateWrites(0, 100, "peer:1", known=False))

    try:
        await run_tracked(spin_failed, fence)
    except TransportError:
        pass
    assert fence.unknowable
    task = quarantine_until_landed(
        allocator, blocks, fence, 0.2, "request s", lambda *a: released.append(a)
    )
    await asyncio.wait_for(task, 2)
    assert allocator.free_count == 8 and released[1][0] is False and released[1][1] >= 0.2
    assert "writes still not final after quarantine_max_s" in caplog.text
