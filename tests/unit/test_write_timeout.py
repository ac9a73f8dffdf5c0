"""The write deadline and the write fence in the Mooncake adapter (common/transport.py).

A polled write stops *waiting* at its deadline (`write_timeout_s`, plus a second per GiB) but not
*tracking*: the request fails at once, the pieces still running go to the transport's watcher,
and the fence holds their blocks until Mooncake reports each one final — which is also when the
binding frees its batch id. A Mooncake TIMEOUT status (-2: a slice older than Mooncake's slice
timeout, still in flight) is not final. Real Mooncake never keeps a loopback write running past a
deadline, so the engine here is a fake (fault injection) that answers `transfer_check_status` as
the test says and counts what the binding would free; the transport, the watcher thread and the
fence are the real ones. A cut link between real processes: tests/integration/test_netns.py; a
late write between real processes: tests/integration/test_write_fence.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from common.config import ConfigError, EncoderConfig
from common.errors import TransportError
from common.fence import WriteFence
from common.transport import MooncakeTransport


@pytest.mark.parametrize("bad", [4.9, 0, -1, 3601])
def test_out_of_range_write_timeout_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=rf"write_timeout_s={bad}: must be in 5\.\.3600"):
        EncoderConfig(write_timeout_s=bad).validate()


def test_default_is_mooncakes_own():
    cfg = EncoderConfig()
    cfg.validate()
    assert cfg.write_timeout_s == 30.0


def test_an_unknown_write_wait_is_refused_by_name():
    with pytest.raises(ConfigError, match="write_wait='busy'"):
        EncoderConfig(write_wait="busy").validate()
    EncoderConfig(write_wait="spin").validate()


class StallingEngine:
    """Fault injection: Mooncake's Python API, where every submitted piece keeps running (status
    0, or -2 once `timeout_reported`) until the test sets its outcome in `finish` (1 COMPLETED, -1
    FAILED). Like the binding, it frees a batch id when it reports it final, and a check of a
    freed id is a bug (counted in `after_free`)."""

    def __init__(self, sync_rc: int = 0):
        self.next_batch = 100
        self.finish: dict[int, int] = {}
        self.timeout_reported = False
        self.freed: list[int] = []
        self.after_free = 0
        self.submitted: list[int] = []
        self.sync_rc = sync_rc
        self._lock = threading.Lock()

    def get_rpc_port(self) -> int:
        return 1

    def transfer_submit_write(self, session, src, dst, length) -> int:
        with self._lock:
            self.next_batch += 1
            self.submitted.append(self.next_batch)
            return self.next_batch

    def transfer_check_status(self, batch: int) -> int:
        with self._lock:
            if batch in self.freed:
                self.after_free += 1
                return -1
            outcome = self.finish.get(batch, 0)
            if outcome in (1, -1):
                self.freed.append(batch)
                return outcome
            return -2 if self.timeout_reported else 0

    def batch_transfer_sync_write(self, session, src, dst, lengths) -> int:
        return self.sync_rc

    def register_memory(self, address, length, location) -> int:
        return 0

    def unregister_memory(self, address) -> int:
        return 0


def _transport(engine, timeout_s: float = 0.3, wait: str = "poll") -> MooncakeTransport:
    t = MooncakeTransport("127.0.0.1", "tcp", engine=engine, wait=wait)
    t.timeout_s = timeout_s
    return t


TRIPLES = [(0x1000, 0x9000, 4096), (0x2000, 0xA000, 4096)]


async def test_a_write_past_its_deadline_fails_at_once_and_its_pieces_stay_fenced_until_final_fault_injected():
    engine = StallingEngine()
    t = _transport(engine)
    fence = WriteFence()
    started = time.monotonic()
    with pytest.raises(TransportError, match="2 piece\\(s\\) still running") as e:
        await t.write("peer:1", TRIPLES, fence=fence)
    waited = time.monotonic() - started
    assert 0.3 <= waited < 1.5, (
        waited
    )  # the caller hears it at the deadline, not when the pieces end
    assert e.value.in_flight is not None and e.value.in_flight.pieces == 2
    assert fence.may_land and t.late_pieces == 2 and engine.freed == []
    engine.timeout_reported = True  # Mooncake's TIMEOUT: still in flight, not final, nothing freed
    assert not await fence.wait(0.2) and t.late_pieces == 2 and engine.freed == []
    first, second = engine.submitted
    engine.finish[first] = 1
    assert not await fence.wait(0.2)  # one piece is still running
    engine.finish[second] = -1
    assert await fence.wait(2)
    assert t.late_pieces == 0 and sorted(engine.freed) == [first, second] and engine.after_free == 0
    assert fence.late_writes == 1 and fence.failed_pieces == 1
    t.close()


async def test_a_cancelled_caller_does_not_end_the_write_fault_injected():
    """The transfer task is cancelled (shutdown, Cancel) while the write runs: the fence still
    holds it until its worker thread returned and its pieces are final."""
    engine = StallingEngine()
    t = _transport(engine, timeout_s=30)
    fence = WriteFence()
    write = asyncio.ensure_future(t.write("peer:1", TRIPLES, fence=fence))
    await asyncio.sleep(0.1)
    write.cancel()
    await asyncio.gather(write, return_exceptions=True)
    assert write.cancelled() and fence.may_land
    for batch in engine.submitted:
        engine.finish[batch] = 1
    assert await fence.wait(2) and sorted(engine.freed) == sorted(engine.submitted)
    t.close()


async def test_a_failed_spin_write_cannot_be_followed_so_the_fence_holds_until_its_bound_fault_injected():
    """batch_transfer_sync_write frees its batch when a piece fails, even with others running:
    after it returns non-zero nothing can say when they end."""
    t = _transport(StallingEngine(sync_rc=-1), wait="spin")
    fence = WriteFence()
    with pytest.raises(TransportError) as e:
        await t.write("peer:1", TRIPLES, fence=fence)
    assert e.value.in_flight is not None and not e.value.in_flight.known
    assert fence.may_land and fence.unknowable and not await fence.wait(0.2)
    t.close()


async def test_a_write_that_completes_leaves_nothing_behind_fault_injected():
    engine = StallingEngine()
    t = _transport(engine, timeout_s=30)
    fence = WriteFence()
    write = asyncio.ensure_future(t.write("peer:1", TRIPLES, fence=fence))
    await asyncio.sleep(0.05)
    for batch in engine.submitted:
        engine.finish[batch] = 1
    await write
    assert not fence.may_land and fence.late_writes == 0 and t.late_pieces == 0
    assert sorted(engine.freed) == sorted(engine.submitted)
    t.close()
