"""TransferTable (common/table.py): live entries, bounded history, and `appear`, the wait a
Status stream with await_transfer makes for a transfer its Encode has not opened yet."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from common.errors import AlreadyExists, NotFound
from common.states import TransferState
from common.table import TransferTable


@dataclass
class Entry:
    request_id: str
    state: TransferState = TransferState.BOOTSTRAPPING


def test_live_then_history_bounded():
    table: TransferTable[Entry] = TransferTable(history_size=2)
    entries = [Entry(f"r{i}") for i in range(3)]
    for e in entries:
        table.add(e.request_id, e)
    with pytest.raises(AlreadyExists):
        table.add("r0", Entry("r0"))
    for e in entries:
        table.finish(e.request_id, e)
    assert table.live == [] and [e.request_id for e in table.history] == ["r1", "r2"]
    with pytest.raises(NotFound, match="'r0'"):
        table.require("r0")


async def test_appear_returns_once_the_id_is_added():
    table: TransferTable[Entry] = TransferTable(history_size=4)
    waiting = asyncio.ensure_future(table.appear("later", timeout=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    table.add("later", Entry("later"))
    await asyncio.wait_for(waiting, 1)
    assert table._awaited == {}
    await asyncio.wait_for(table.appear("later", timeout=5), 0.1)  # known: at once


async def test_appear_gives_up_after_its_timeout_or_when_cancelled_and_leaves_nothing():
    table: TransferTable[Entry] = TransferTable(history_size=4)
    started = time.monotonic()
    await table.appear("never", timeout=0.05)
    assert 0.04 <= time.monotonic() - started < 1
    cancelled = asyncio.ensure_future(table.appear("never", timeout=5))
    kept = asyncio.ensure_future(table.appear("never", timeout=5))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert len(table._awaited["never"]) == 1  # the other waiter still waits
    table.add("never", Entry("never"))
    await asyncio.wait_for(kept, 1)
    assert table._awaited == {}
