"""The write fence: which Mooncake writes of one transfer may still land, and when they stop.

The invariant (docs/DESIGN.md, "The write fence"): a block, on either side, goes back to the free
list only when no write that touches it can still land. A writer that stops waiting for a write
(its deadline passed, its caller was cancelled, the service shuts down) has not stopped the
write: the engine goes on reading the source blocks and writing the destination blocks until
every piece reports a final status. So every write is *tracked* by the `WriteFence` of what it
writes for, from the moment it is handed to a worker thread until the engine says each of its
pieces is final:

- `LateWrites` is what a write leaves behind when its caller stops waiting: the pieces that
  were not final then. The transport (common/transport.py) settles it once the engine reports
  every one of them final; a `TransportError` carries it as `in_flight`.
- `WriteFence` holds the worker-thread futures of a transfer's writes and the `LateWrites` they
  leave. `may_land` is True while any of them is unsettled; `wait()` returns once none is.

Domain code: no grpc, no mooncake. Settlement happens on worker threads; the fence is read and
waited on from the event loop that made it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LateWrites:
    """Pieces of one write that were not final when its caller stopped waiting for them.

    `settled` resolves (from the thread that watches them) once the engine reported every piece
    final; its result is how many of them failed. A handle made with `pieces=0` and
    `known=False` stands for a write whose pieces the engine gave us no way to follow (a failed
    `batch_transfer_sync_write`): it never settles, and the fence holds it until its bound."""

    def __init__(self, pieces: int, nbytes: int, session: str, *, known: bool = True):
        self.pieces = pieces
        self.nbytes = nbytes
        self.session = session
        self.known = known
        """False: nothing will ever settle it (the engine gave no handle on the pieces)."""
        self.settled: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._failed = 0

    def piece_final(self, ok: bool) -> None:
        """One piece reported final (any thread); the last one settles the handle."""
        with self._lock:
            if not ok:
                self._failed += 1
            self.pieces -= 1
            done = self.pieces <= 0
        if done and not self.settled.done():
            self.settled.set_result(self._failed)

    def __repr__(self) -> str:
        what = f"{self.pieces} piece(s)" if self.known else "pieces the engine cannot report on"
        return f"LateWrites({what}, {self.nbytes} bytes to {self.session})"


class WriteFence:
    """Every write of one transfer (or one RawWrite) that may still land.

    Used from one event loop (the one that first tracks a write). `track` takes a worker
    thread's future of a write; when that write raised an error carrying `in_flight` (a
    `LateWrites`), the fence goes on holding those pieces until they settle."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: set[concurrent.futures.Future] = set()
        self._late: dict[
            concurrent.futures.Future, LateWrites
        ] = {}  # LateWrites.settled -> its handle
        self._changed = asyncio.Event()
        self.late_writes = 0
        """How many writes left pieces behind (for logs and tests)."""
        self.failed_pieces = 0
        """How many of those pieces the engine reported failed once final."""

    def track(self, future: concurrent.futures.Future) -> None:
        """Hold the fence open until `future` (a write on a worker thread) and whatever it leaves
        in flight are final."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._open.add(future)
        future.add_done_callback(self._from_thread)

    def _from_thread(self, _future: concurrent.futures.Future) -> None:
        loop = self._loop
        assert loop is not None  # track() set it before adding this callback
        try:
            loop.call_soon_threadsafe(self._sweep)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _sweep(self) -> None:
        """Drop what is final; follow what a finished write left in flight."""
        while done := [f for f in self._open if f.done()]:
            self._sweep_done(done)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _sweep_done(self, done: list[concurrent.futures.Future]) -> None:
        for future in done:
            self._open.discard(future)
            was_late = self._late.pop(future, None) is not None
            if future.cancelled():
                continue  # never started: nothing was submitted
            if was_late:
                self.failed_pieces += future.result()
                continue
            late = getattr(future.exception(), "in_flight", None)
            if isinstance(late, LateWrites):
                self.late_writes += 1
                self._late[late.settled] = late
                self.track(late.settled)

    @property
    def may_land(self) -> bool:
        """Whether a write tracked here may still land (checked now, not at the last wake-up)."""
        self._sweep()
        return bool(self._open)

    @property
    def unknowable(self) -> bool:
        """Whether a write held here is one the engine will never report on (see LateWrites)."""
        self._sweep()
        return any(not late.known for late in self._late.values())

    async def wait(self, timeout: float | None = None) -> bool:
        """Until no tracked write may land (True), or `timeout` seconds passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.may_land:
            changed = self._changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass
        return True


def quarantine_until_landed(
    allocator,
    blocks: list[int],
    fence: WriteFence,
    max_s: float,
    what: str,
    on_released: Callable[[bool, float], None] | None = None,
) -> asyncio.Task:
    """Quarantine `blocks` now (a `common.pool.BlockAllocator`'s blocks the fence's writes touch)
    and return the task that gives them back once no write of the fence may land. After `max_s`
    without that, they go back anyway, with a WARNING: an engine that never reports on a piece
    must not cost the pool its blocks forever. `on_released(writes_ended, seconds_held)` is called
    when they are back (not when the task is cancelled: the blocks then stay with the pool)."""
    allocator.quarantine(blocks)
    held_since = time.monotonic()

    async def release() -> None:
        ended = await fence.wait(max_s)
        held = time.monotonic() - held_since
        if ended:
            log.info(
                "%s: every write ended; %d quarantined block(s) back in the pool after %.1f s",
                what,
                len(blocks),
                held,
            )
        else:
            log.warning(
                "%s: writes still not final after quarantine_max_s=%.0f s; %d quarantined block(s) back in "
                "the pool anyway",
                what,
                max_s,
                len(blocks),
            )
        allocator.release_quarantine(blocks)
        if on_released is not None:
            on_released(ended, held)

    return asyncio.get_running_loop().create_task(release(), name=f"fence-{what}")


def _run_into(future: concurrent.futures.Future, work: Callable[[], T]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled before a worker thread took it: the write never starts
    try:
        future.set_result(work())
    except BaseException as e:  # noqa: BLE001 - handed to whoever awaits the future
        future.set_exception(e)


async def run_tracked(work: Callable[[], T], fence: WriteFence | None) -> T:
    """Run a blocking write in a worker thread (the loop's default executor, like
    asyncio.to_thread), tracked by `fence` from before it starts until it is final. Cancelling
    the caller does not stop a write that started: the fence goes on holding it."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    if fence is not None:
        fence.track(future)
    asyncio.get_running_loop().run_in_executor(None, _run_into, future, work)
    return await asyncio.wrap_future(future)
