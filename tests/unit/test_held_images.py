"""A language rank's held image rows (services/language/held_images.py).

- kept rows are stored with their M-RoPE positions moved to start at 0, and placed back moved to
  where the image sits in the new prompt; every other byte is as received;
- a receive fills the rows the encoder marked reused, then verifies the round against the
  encoder's checksums: right rows give the reference payload, wrong rows fail with `integrity`,
  and the pool ends free either way.

The encoder is a fake link (fault injection for the wrong rows): its Init writes the reference
payload into the rank's blocks around the reused span, as a real encoder's round would, and its
Status stream sends one SUCCESS with the reference's checksums and image spans.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from common import errors
from common.integrity import checksums
from common.layout import RecordLayout, default_fields
from common.plan import uncovered
from common.pool import BlockPool, field_of
from common.states import ImageSpan, StatusUpdate, TransferState
from services.language.held_images import HeldImages, ImageReuse
from services.language.receiver import ReceiveTask

RECORD = RecordLayout.pack(default_fields(8, "bfloat16"))
BLOCK = 8
POOL_BLOCKS = 8
TOTAL = 40
SPAN = (10, 16)  # the image's tokens [10, 26)
KEY = "ab" * 32


def reference(first_position: int) -> torch.Tensor:
    """A payload of TOTAL records whose image starts at M-RoPE position `first_position`."""
    gen = torch.Generator().manual_seed(5)
    records = torch.randint(0, 256, (TOTAL, RECORD.record_bytes), dtype=torch.uint8, generator=gen)
    field_of(records, RECORD.field("token_ids")).copy_(torch.arange(TOTAL, dtype=torch.int32))
    pos = field_of(records, RECORD.field("mrope_positions"))
    start, n = SPAN
    pos.copy_(torch.arange(TOTAL, dtype=torch.int32)[:, None].expand(TOTAL, 3))
    grid = torch.stack(
        [torch.zeros(n, dtype=torch.int32), torch.arange(n) // 4, torch.arange(n) % 4], dim=1
    ).to(torch.int32)
    pos[start : start + n] = grid + first_position
    return records


def image_rows(records: torch.Tensor) -> torch.Tensor:
    start, n = SPAN
    return records[start : start + n].clone()


def test_kept_rows_move_with_the_image():
    store = HeldImages(1 << 20, RECORD)
    before, after = reference(10), reference(57)
    store.keep(ImageSpan(0, SPAN[0], SPAN[1], KEY, (10, 10, 10)), image_rows(before))
    [rows] = store.claim([KEY]).values()
    assert field_of(rows, RECORD.field("mrope_positions"))[0].tolist() == [0, 0, 0]
    out = torch.zeros((SPAN[1], RECORD.record_bytes), dtype=torch.uint8)
    span = ImageSpan(0, SPAN[0], SPAN[1], KEY, (57, 57, 57), reused=True)
    store.place(span, rows, [out[:5], out[5:]], 0)
    for f in RECORD.fields:  # compared as bytes (random bytes make NaNs)
        cut = slice(f.offset, f.offset + f.bytes_per_token)
        assert torch.equal(out[:, cut], image_rows(after)[:, cut]), f.name


class EncoderFake:
    """Writes `payload` around the reused span at Init; one SUCCESS status with `sums`."""

    address = "fake-encoder"

    def __init__(self, pool: BlockPool, payload: torch.Tensor, sums: dict[str, int], first: int):
        self.pool, self.payload, self.sums, self.first = pool, payload, sums, first
        self.cancels = 0
        self.held: list[str] = []

    async def init(self, request_id, rank, rank_count, blocks, allocated_tokens, **kw):
        self.held = list(kw.get("held_images", ()))
        for a, b in uncovered(0, TOTAL, [(SPAN[0], SPAN[0] + SPAN[1])]):
            self.pool.copy_in(blocks, a, self.payload[a:b])

    def status(self, request_id, rank, await_transfer=False):
        span = ImageSpan(0, SPAN[0], SPAN[1], KEY, (self.first,) * 3, reused=True)
        status = StatusUpdate(
            request_id,
            TransferState.SUCCESS,
            sent_tokens=TOTAL,
            total_tokens=TOTAL,
            round=1,
            round_tokens=TOTAL,
            allocated_tokens=TOTAL,
            checksums=tuple(self.sums.items()),
            images=(span,),
        )
        return _OneStatus(status)

    async def resume(self, *a, **kw):
        raise AssertionError("one round")

    async def cancel(self, request_id, reason, failure=None):
        self.cancels += 1
        return True


class _OneStatus:
    def __init__(self, status):
        self.statuses = [status]

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.statuses:
            raise StopAsyncIteration
        return self.statuses.pop()

    def close(self):
        pass


@pytest.mark.parametrize("rows_right", [True, False], ids=["held-rows", "wrong-rows-injected"])
async def test_a_receive_fills_reused_rows_and_verifies_them(rows_right):
    pool = BlockPool(RECORD, BLOCK, POOL_BLOCKS)
    store = HeldImages(1 << 20, RECORD)
    kept = image_rows(reference(3))
    if not rows_right:
        kept[2, 1] ^= 0x40  # one byte of one embedding off
    store.keep(ImageSpan(0, SPAN[0], SPAN[1], KEY, (3, 3, 3)), kept)
    payload = reference(21)  # the same image, further into another prompt
    link = EncoderFake(pool, payload, checksums([payload], RECORD, 0), 21)
    task = ReceiveTask(
        "r",
        0,
        1,
        pool,
        link,
        initial_tokens=TOTAL,
        alloc_timeout_s=1.0,
        reuse=ImageReuse(store, store.claim([KEY])),
    )
    failure = got = None
    try:
        await task.start()
        got = await task.receive()
        assert torch.equal(got.records(0, TOTAL), payload)
        assert task.reuse.reused_tokens == SPAN[1]
    except errors.EpdError as e:
        failure = e
    finally:
        await task.close(failure)
        if got is not None:
            got.release()
    assert link.held == [KEY]  # the Init named the claimed rows
    if rows_right:
        assert failure is None and task.integrity_verified
        assert store.claim([KEY])
    else:
        assert isinstance(failure, errors.IntegrityError), failure
        assert "checksum of field 'embeddings'" in failure.message
        assert not store.claim([KEY])  # the rows that failed are given up: received next time
    assert pool.allocator.free_count == POOL_BLOCKS, "the rank's pool is not fully free"
