"""A rank whose early Init is carried by the Encode: whatever ends its receive while it waits
for the encoder's answer to the carried Init, `close()` closes the Status stream it opened and
frees its blocks. The encoder is a fake link that counts open streams (a real encoder counts
them in GetDiagnostics.status_streams, which the soak test checks)."""

from __future__ import annotations

import asyncio

from common.layout import RecordLayout, default_fields
from common.pool import BlockPool
from services.language.receive_options import CarriedInit
from services.language.receiver import ReceiveTask

BLOCK = 16
POOL_BLOCKS = 8


class _Stream:
    def __init__(self, link: CountingLink):
        self.link = link
        self.closed = False
        link.open += 1

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()  # nothing to say: the test ends the receive first

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.link.open -= 1


class CountingLink:
    """A fake encoder link: Status streams that say nothing, counted while open."""

    address = "fake-encoder"

    def __init__(self):
        self.open = 0
        self.cancels = 0

    async def init(self, *a, **kw):
        raise AssertionError("the Init was handed over to be carried, not sent")

    def status(self, request_id, rank, await_transfer=False):
        return _Stream(self)

    async def cancel(self, request_id, reason, failure=None):
        self.cancels += 1
        return True  # no write of it can land


async def test_a_receive_cancelled_while_its_carried_init_is_pending_closes_its_stream():
    pool = BlockPool(RecordLayout.pack(default_fields(16, "bfloat16")), BLOCK, POOL_BLOCKS)
    link = CountingLink()
    blocks = pool.allocator.try_alloc(2)  # reserved early: the Init may be carried
    carried = CarriedInit("r", 0, 1, blocks, 2 * BLOCK, 0)  # as the admission builds it
    task = ReceiveTask(
        "r",
        0,
        1,
        pool,
        link,
        initial_tokens=2 * BLOCK,
        alloc_timeout_s=1.0,
        reserved_blocks=blocks,
        carried=carried,
    )
    start = asyncio.ensure_future(task.start())
    carried.issued()  # the Encode carrying it went out: the stream follows it
    while link.open == 0:
        await asyncio.sleep(0)
    start.cancel()  # the Generate's deadline, say, before the encoder answered the Encode
    await asyncio.gather(start, return_exceptions=True)
    await task.close(asyncio.CancelledError())
    assert link.open == 0, "the Status stream outlived its receive"
    assert link.cancels == 1  # the transfer may exist on the encoder: it is cancelled there
    assert pool.allocator.free_count == POOL_BLOCKS
