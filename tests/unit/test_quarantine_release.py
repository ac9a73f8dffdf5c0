"""The write fence on a language rank: the blocks of a transfer go back to the pool only when
the encoder positively said no write of it can land — a Cancel answered `writes_ended`, NOT_FOUND,
or a FAILED status without `writes_may_land`. Any other outcome quarantines them: a Cancel
without an answer (then a grace period follows the answer), a Cancel answered without
`writes_ended` or with an error that proves nothing (CANCELLED, UNKNOWN, PERMISSION_DENIED ...),
a FAILED status that says writes may still land.

The encoder is a fake link (fault injection: its Cancel fails as an unreachable encoder's does,
or answers as the test says; its Status stream says what the test puts in it); the pool and the
receive task are real. The cross-host test with a real cut link is tests/integration/test_netns.py;
real processes with a real late write: tests/integration/test_write_fence.py.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from common import errors
from common.layout import RecordLayout, default_fields
from common.pool import BlockPool
from common.states import FailureReason, StatusUpdate, TransferState
from services.language import receiver as receiver_mod
from services.language.receiver import ReceiveTask, release_when_safe

BLOCK = 16
POOL_BLOCKS = 8


class _SilentStream:
    """A Status stream that never says anything (the link is cut)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(3600)

    def close(self) -> None:
        pass


class _ScriptedStream:
    """A Status stream that delivers what the test puts in `queue`."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.queue.get()

    def close(self) -> None:
        self.closed = True


class CutLink:
    """A fake encoder link (fault injection): Cancel raises `failure` while the link is "down",
    else answers `writes_ended`; its Status stream says nothing, or what the test scripts."""

    address = "fake-encoder"

    def __init__(
        self,
        failure: BaseException | None,
        writes_ended: bool = True,
        scripted: bool = False,
        address: str = "",
    ):
        self.address = address or self.address
        self.failure = failure
        self.writes_ended = writes_ended
        self.cancels = 0
        self.stream = _ScriptedStream() if scripted else _SilentStream()

    async def init(self, *a, **kw):
        pass

    def status(self, request_id, rank, await_transfer=False):
        return self.stream

    async def cancel(self, request_id, reason, failure=None):
        self.cancels += 1
        if self.failure is not None:
            raise self.failure
        return self.writes_ended


def make(failure, writes_ended: bool = True, scripted: bool = False, address: str = ""):
    pool = BlockPool(RecordLayout.pack(default_fields(16, "bfloat16")), BLOCK, POOL_BLOCKS)
    link = CutLink(failure, writes_ended, scripted, address)
    seen = []
    task = ReceiveTask(
        "r",
        0,
        1,
        pool,
        link,
        initial_tokens=3 * BLOCK,
        alloc_timeout_s=1.0,
        on_quarantine=seen.append,
    )
    return pool, link, task, seen


async def started_then_failed(task):
    await task.start()
    receive = asyncio.ensure_future(task.receive())
    await asyncio.sleep(0.01)
    receive.cancel()
    await asyncio.gather(receive, return_exceptions=True)
    await task.close(errors.Unavailable("the link is gone", reason=FailureReason.PEER_LOST))


async def test_unanswered_cancel_quarantines_then_an_answer_and_the_grace_release_fault_injected(
    monkeypatch,
):
    monkeypatch.setattr(receiver_mod, "PROBE_TIMEOUT_S", 0.2)
    pool, link, task, seen = make(
        errors.Unavailable("Cancel on encoder fake-encoder: No route to host")
    )
    await started_then_failed(task)
    a = pool.allocator
    assert seen == [task] and len(task.quarantined_blocks) == 3
    assert (a.used_count, a.free_count, a.quarantined_count) == (0, POOL_BLOCKS - 3, 3)
    assert a.try_alloc(POOL_BLOCKS - 2) is None  # not allocatable

    grace = 0.3
    release = asyncio.ensure_future(release_when_safe(task, grace, probe_s=0.05))
    await asyncio.sleep(0.3)
    assert not release.done() and a.quarantined_count == 3  # still unreachable: held
    probes_down = link.cancels
    link.failure = None  # the link is back: Cancel answers
    back = time.monotonic()
    await asyncio.wait_for(release, 5)
    held = time.monotonic() - back
    # The grace, plus as long as the encoder had been unreachable since the quarantine (>= 0.3 s).
    assert held >= grace + 0.3 - 0.05, held
    assert link.cancels > probes_down
    assert (a.used_count, a.free_count, a.quarantined_count) == (0, POOL_BLOCKS, 0)
    assert task.quarantined_blocks == []


async def test_unreachable_again_during_the_grace_restarts_the_wait_fault_injected(monkeypatch):
    monkeypatch.setattr(receiver_mod, "PROBE_TIMEOUT_S", 0.2)
    pool, link, task, _ = make(TimeoutError())
    await started_then_failed(task)
    link.failure = None
    release = asyncio.ensure_future(release_when_safe(task, 0.5, probe_s=0.05))
    await asyncio.sleep(0.2)
    link.failure = errors.DeadlineExceeded("Cancel on encoder fake-encoder: deadline exceeded")
    await asyncio.sleep(0.6)
    assert not release.done() and pool.allocator.quarantined_count == 3
    link.failure = errors.NotFound("no such transfer")  # an answer: the encoder does not know it
    await asyncio.wait_for(release, 5)
    assert pool.allocator.free_count == POOL_BLOCKS


@pytest.mark.parametrize(
    "failure, writes_ended, freed",
    [
        (None, True, True),  # the encoder says its writes ended
        (errors.NotFound("no such transfer"), True, True),  # it holds nothing of the transfer
        (None, False, False),  # answered: a write may still land
        (
            errors.Cancelled("Cancel on encoder: cancelled"),
            True,
            False,
        ),  # prove nothing about its writes
        (errors.Internal("Cancel on encoder: unknown"), True, False),
        (errors.PermissionDenied("not yours"), True, False),
    ],
    ids=[
        "writes ended",
        "not found",
        "writes may land",
        "cancelled",
        "unknown",
        "permission denied",
    ],
)
async def test_only_a_positive_answer_frees_at_once_fault_injected(failure, writes_ended, freed):
    pool, link, task, seen = make(failure, writes_ended)
    await started_then_failed(task)
    assert link.cancels == 1
    if freed:
        assert (
            seen == []
            and task.quarantined_blocks == []
            and pool.allocator.free_count == POOL_BLOCKS
        )
    else:
        assert (
            seen == [task]
            and pool.allocator.quarantined_count == 3
            and pool.allocator.used_count == 0
        )


async def test_writes_may_land_then_ended_releases_without_a_grace_fault_injected():
    """The encoder was reachable all along: once it says the writes ended, the blocks return at
    once (no grace: its writes are final, acknowledged by the receiving side)."""
    pool, link, task, _ = make(None, writes_ended=False)
    await started_then_failed(task)
    assert pool.allocator.quarantined_count == 3
    release = asyncio.ensure_future(release_when_safe(task, 30.0, probe_s=0.05))
    await asyncio.sleep(0.3)
    assert not release.done() and pool.allocator.quarantined_count == 3
    link.writes_ended = True
    await asyncio.wait_for(release, 2)  # well under the 30 s grace
    assert pool.allocator.free_count == POOL_BLOCKS


async def test_failed_status_saying_writes_may_land_quarantines_until_the_stream_says_they_ended_fault_injected():
    """A FAILED status with writes_may_land: no Cancel is needed (the transfer ended), the blocks
    are quarantined, and the encoder's next status on the same stream (FAILED, writes ended)
    returns them, although every Cancel probe still says the writes may land."""
    pool, link, task, seen = make(None, writes_ended=False, scripted=True)
    await task.start()
    receive = asyncio.ensure_future(task.receive())
    link.stream.queue.put_nowait(
        StatusUpdate(
            "r",
            TransferState.FAILED,
            reason=FailureReason.TRANSPORT,
            message="write failed",
            writes_may_land=True,
        )
    )
    with pytest.raises(errors.TransportError):
        await receive
    await task.close(None)
    assert link.cancels == 0 and seen == [task] and pool.allocator.quarantined_count == 3
    assert not link.stream.closed  # kept open: the encoder says on it when the writes stopped
    release = asyncio.ensure_future(release_when_safe(task, 30.0, probe_s=0.05))
    await asyncio.sleep(0.3)
    assert not release.done() and pool.allocator.quarantined_count == 3 and link.cancels >= 1
    link.stream.queue.put_nowait(
        StatusUpdate(
            "r", TransferState.FAILED, reason=FailureReason.TRANSPORT, message="write failed"
        )
    )
    await asyncio.wait_for(release, 2)
    assert pool.allocator.free_count == POOL_BLOCKS and link.stream.closed


async def test_shutdown_drops_a_quarantine_fault_injected():
    pool, link, task, _ = make(errors.Unavailable("down"))
    await started_then_failed(task)
    release = asyncio.ensure_future(release_when_safe(task, 0.1, probe_s=0.05))
    await asyncio.sleep(0.1)
    release.cancel()
    await asyncio.gather(release, return_exceptions=True)
    assert pool.allocator.quarantined_count == 3  # goes with the pool


def test_epd_status_shows_quarantined_blocks():
    from common.pb.epd.v1 import common_pb2
    from services.tools.status import pool_text

    pool = common_pb2.PoolInfo(
        used_blocks=2,
        free_blocks=3,
        quarantined_blocks=3,
        rank_pools=[
            common_pb2.RankPool(
                rank=0,
                used_blocks=2,
                free_blocks=3,
                quarantined_blocks=3,
                embedding_cache=common_pb2.EmbeddingCacheInfo(
                    capacity_bytes=2**20, bytes=3 * 2**10, entries=2, hits=3, misses=1
                ),
            )
        ],
    )
    text = pool_text(pool)
    assert "pool: 2/8 blocks used, 3 free, 3 quarantined, 0 waiting" in text, text
    header, row = text.splitlines()[-2:]
    assert header.split() == [
        *("RANK", "USED", "FREE", "QUARANTINED", "WAITERS", "CACHED", "IMAGES", "HIT-RATE")
    ]
    assert row.split() == ["0", "2", "3", "3", "0", "3.0", "KiB", "2", "75.0", "%"]
    assert (
        "quarantined"
        not in pool_text(common_pb2.PoolInfo(used_blocks=1, free_blocks=7)).splitlines()[0]
    )


async def test_refused_connection_counts_as_an_answer_and_max_s_bounds_a_silent_encoder_fault_injected(
    monkeypatch,
):
    monkeypatch.setattr(receiver_mod, "PROBE_TIMEOUT_S", 0.2)
    # UNAVAILABLE, whatever its message says: the encoder's host itself is asked with a TCP connect.
    unavailable = errors.Unavailable("Cancel on encoder x: unavailable")
    with socket.socket() as s:  # a port where nothing listens: the host refuses the connect
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    pool, link, task, _ = make(unavailable, address=closed)
    await started_then_failed(task)
    assert (
        pool.allocator.quarantined_count == 3
    )  # quarantined at close: the kernel may still deliver
    await asyncio.wait_for(
        release_when_safe(task, 0.2, max_s=30, probe_s=0.05), 5
    )  # refused: the grace runs, then the blocks are back
    assert pool.allocator.free_count == POOL_BLOCKS

    # Something listens there (the link is cut, the host is not gone): no answer, max_s bounds it.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        pool, link, task, _ = make(unavailable, address=f"127.0.0.1:{listening.getsockname()[1]}")
        await started_then_failed(task)
        started = time.monotonic()
        await asyncio.wait_for(release_when_safe(task, 0.1, max_s=0.5, probe_s=0.05), 5)
        assert time.monotonic() - started >= 0.4 and pool.allocator.free_count == POOL_BLOCKS

    pool, link, task, _ = make(errors.DeadlineExceeded("Cancel on encoder x: deadline exceeded"))
    await started_then_failed(task)
    started = time.monotonic()
    await asyncio.wait_for(release_when_safe(task, 0.1, max_s=0.5, probe_s=0.05), 5)
    assert time.monotonic() - started >= 0.4 and pool.allocator.free_count == POOL_BLOCKS
