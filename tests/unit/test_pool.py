"""Tests of common.pool: the block allocator (policy, FIFO waiters, no leaks) and the slab views."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.errors import ResourceExhausted
from common.layout import FieldSpec, RecordLayout, default_fields
from common.pool import BlockAllocator, BlockPool, field_of


def runs_of(ids) -> list[tuple[int, int]]:
    """(start, length) of the runs of consecutive ids in a set."""
    out: list[tuple[int, int]] = []
    for b in sorted(ids):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def expected_take(free: set[int], n: int) -> list[int]:
    """Reference model of the contiguity policy: best fit, else largest runs first."""
    runs = runs_of(free)
    fitting = [(length, start) for start, length in runs if length >= n]
    if fitting:
        _, start = min(fitting)
        return list(range(start, start + n))
    out: list[int] = []
    for start, length in sorted(runs, key=lambda r: (-r[1], r[0])):
        k = min(length, n - len(out))
        out.extend(range(start, start + k))
        if len(out) == n:
            break
    return out


def make_holes(a: BlockAllocator, keep_free: list[int]) -> None:
    """Allocate everything, then free exactly `keep_free`."""
    assert a.try_alloc(a.num_blocks) == list(range(a.num_blocks))
    a.free(keep_free)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- synchronous basics ----------------------------------------------------------------------------


def test_try_alloc_and_free_basics():
    changes = []
    a = BlockAllocator(10, on_change=lambda used, free: changes.append((used, free)))
    assert (a.num_blocks, a.free_count, a.used_count, a.waiters) == (10, 10, 0, 0)
    assert a.try_alloc(3) == [0, 1, 2]
    assert (a.free_count, a.used_count) == (7, 3)
    assert a.try_alloc(8) is None
    assert a.try_alloc(11) is None
    b = a.try_alloc(7)
    assert b == list(range(3, 10))
    a.free([1, 0, 2])
    a.free(b)
    assert a.free_count == 10
    assert a.free_runs() == [(0, 10)]
    assert changes == [(3, 7), (10, 0), (7, 3), (0, 10)]
    with pytest.raises(ValueError, match="n must be >= 1"):
        a.try_alloc(0)
    a.free([])  # no-op


def test_on_change_failure_does_not_corrupt():
    def boom(used, free):
        raise RuntimeError("metrics down")

    a = BlockAllocator(4, on_change=boom)
    assert a.try_alloc(2) == [0, 1]
    a.free([0, 1])
    assert a.free_count == 4


def test_best_fit_prefers_smallest_fitting_run():
    a = BlockAllocator(16)
    make_holes(a, [0, 1, 2, 5, 6, 9, 10, 11, 12, 13, 14])  # runs: 0+3, 5+2, 9+6
    assert a.try_alloc(2) == [5, 6]
    assert a.try_alloc(4) == [9, 10, 11, 12]  # only the 6-run fits; take its low end
    assert a.try_alloc(2) == [13, 14]  # 2-run at 13 beats 3-run at 0
    assert a.try_alloc(3) == [0, 1, 2]


def test_best_fit_ties_take_lowest_start():
    a = BlockAllocator(8)
    make_holes(a, [6, 7, 0, 1, 3, 4])
    assert a.try_alloc(2) == [0, 1]
    assert a.try_alloc(2) == [3, 4]
    assert a.try_alloc(2) == [6, 7]


def test_greedy_takes_largest_runs_first():
    a = BlockAllocator(16)
    make_holes(a, [0, 1, 2, 5, 6, 9, 10, 11, 12])  # runs: 0+3, 5+2, 9+4
    assert a.try_alloc(8) == [9, 10, 11, 12, 0, 1, 2, 5]
    assert a.free_runs() == [(6, 1)]


def test_freed_runs_coalesce():
    a = BlockAllocator(8)
    x = a.try_alloc(8)
    a.free(x[0:2])
    a.free(x[5:8])
    a.free(x[2:5])
    assert a.free_runs() == [(0, 8)]
    assert a.try_alloc(8) == list(range(8))


@pytest.mark.parametrize("bad", [[3, 3], [1, 99], [1, -1], [1, "2"], [1, 2.0], [1, True], [1, 0]])
def test_bad_free_raises_and_changes_nothing(bad):
    a = BlockAllocator(8)
    make_holes(a, [0])  # blocks 1..7 used, 0 free
    before = (a.free_count, a.free_runs())
    with pytest.raises(ValueError):
        a.free(bad)
    assert (a.free_count, a.free_runs()) == before
    a.free(range(1, 8))
    assert a.free_count == 8


def test_double_free_message_names_block():
    a = BlockAllocator(4)
    with pytest.raises(ValueError, match="block 2"):
        a.free([2])
    with pytest.raises(ValueError, match="7"):
        a.free([7])


class AllocatorPolicy(RuleBasedStateMachine):
    """Random try_alloc/free sequences against a reference model of free ids and policy."""

    def __init__(self):
        super().__init__()
        self.n = 24
        self.a = BlockAllocator(self.n)
        self.free_ids = set(range(self.n))
        self.owned: list[list[int]] = []

    @rule(n=st.integers(1, 30))
    def try_alloc(self, n):
        got = self.a.try_alloc(n)
        if n > len(self.free_ids):
            assert got is None
            return
        assert got == expected_take(self.free_ids, n)
        self.free_ids -= set(got)
        self.owned.append(got)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free_some(self, data):
        i = data.draw(st.integers(0, len(self.owned) - 1))
        blocks = self.owned[i]
        k = data.draw(st.integers(1, len(blocks)))
        part = data.draw(st.permutations(blocks))[:k]
        self.a.free(part)
        rest = [b for b in blocks if b not in set(part)]
        if rest:
            self.owned[i] = rest
        else:
            self.owned.pop(i)
        self.free_ids |= set(part)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def double_free_rejected(self, data):
        if not self.free_ids:
            return
        b = data.draw(st.sampled_from(sorted(self.free_ids)))
        owned_b = self.owned[0][0]
        with pytest.raises(ValueError):
            self.a.free([owned_b, b])

    @invariant()
    def consistent(self):
        used = [b for blocks in self.owned for b in blocks]
        assert len(used) == len(set(used))
        assert not set(used) & self.free_ids
        assert self.a.free_count + self.a.used_count == self.n
        assert self.a.free_count == len(self.free_ids)
        assert self.a.free_runs() == runs_of(self.free_ids)


TestAllocatorPolicy = AllocatorPolicy.TestCase
TestAllocatorPolicy.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- async waiters ---------------------------------------------------------------------------------


async def test_alloc_fast_path_and_too_big():
    a = BlockAllocator(4)
    assert await a.alloc(3, timeout=None) == [0, 1, 2]
    with pytest.raises(ResourceExhausted, match=r"5 blocks.*only 4 blocks"):
        await a.alloc(5, timeout=1.0)
    assert a.free_count == 1 and a.waiters == 0
    with pytest.raises(ValueError):
        await a.alloc(0, timeout=None)


async def test_fifo_order_and_no_queue_jumping():
    a = BlockAllocator(5)
    held = a.try_alloc(5)
    order = []

    async def want(name, n):
        blocks = await a.alloc(n, timeout=None, label=name)
        order.append((name, blocks))
        return blocks

    ta = asyncio.create_task(want("A", 2))
    await settle()
    tb = asyncio.create_task(want("B", 1))
    await settle()
    tc = asyncio.create_task(want("C", 2))
    await settle()
    assert a.waiters == 3

    a.free([held[0]])  # B could fit, but A is ahead
    await settle()
    assert order == [] and a.free_count == 1
    assert a.try_alloc(1) is None  # try_alloc never jumps the queue either
    a.free([held[1]])
    await settle()
    assert order == [("A", [0, 1])]
    a.free(held[2:])  # enough for both B and C, served in queue order
    await settle()
    assert order == [("A", [0, 1]), ("B", [2]), ("C", [3, 4])]
    await asyncio.gather(ta, tb, tc)
    assert a.free_count == 0 and a.waiters == 0


async def test_fifo_waits_for_exact_amount():
    a = BlockAllocator(4)
    held = a.try_alloc(4)
    t = asyncio.create_task(a.alloc(3, timeout=None))
    await settle()
    a.free(held[:2])
    await settle()
    assert not t.done()
    a.free(held[2:3])
    assert await t == [0, 1, 2]
    assert a.free_count == 0


async def test_partial_ok():
    a = BlockAllocator(4)
    held = a.try_alloc(3)
    # Something free: take min(n, free) at once.
    got = await a.alloc(5, timeout=None, partial_ok=True)
    assert got == [3]
    # Nothing free: wait for the first block(s).
    t = asyncio.create_task(a.alloc(3, timeout=None, partial_ok=True))
    await settle()
    assert not t.done()
    a.free(held[:2])
    assert await t == [0, 1]
    # n > num_blocks is fine with partial_ok.
    a.free([0, 1, 3])  # block 2 still held: runs 0+2 and 3+1, largest first
    assert await a.alloc(10, timeout=0.1, partial_ok=True) == [0, 1, 3]


async def test_timeout_raises_and_frees_nothing():
    a = BlockAllocator(4)
    held = a.try_alloc(3)
    with pytest.raises(ResourceExhausted) as ei:
        await a.alloc(2, timeout=0.05, label="req-42")
    msg = str(ei.value)
    assert "req-42" in msg and "2 blocks" in msg and "0.05" in msg and "1 free" in msg
    assert a.free_count == 1 and a.waiters == 0
    a.free(held)
    assert a.free_count == 4


async def test_timed_out_big_head_unblocks_small_waiters():
    a = BlockAllocator(4)
    a.try_alloc(3)  # one free
    big = asyncio.create_task(a.alloc(4, timeout=0.05, label="big"))
    await settle()
    small = asyncio.create_task(a.alloc(1, timeout=None, label="small"))
    await settle()
    assert not small.done()
    with pytest.raises(ResourceExhausted, match="big"):
        await big
    assert await asyncio.wait_for(small, 1.0) == [3]
    assert a.waiters == 0


async def test_cancelled_head_unblocks_small_waiters():
    a = BlockAllocator(4)
    a.try_alloc(3)
    big = asyncio.create_task(a.alloc(4, timeout=None))
    await settle()
    small = asyncio.create_task(a.alloc(1, timeout=None))
    await settle()
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    assert await asyncio.wait_for(small, 1.0) == [3]


async def test_cancel_while_waiting_leaks_nothing():
    a = BlockAllocator(4)
    held = a.try_alloc(4)
    t = asyncio.create_task(a.alloc(2, timeout=10.0))
    await settle()
    assert a.waiters == 1
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert a.waiters == 0
    a.free(held)
    assert a.free_count == 4


async def test_resolved_then_cancelled_gives_blocks_back():
    a = BlockAllocator(4)
    held = a.try_alloc(4)
    t = asyncio.create_task(a.alloc(2, timeout=10.0))
    await settle()
    a.free(held[:2])  # hands the blocks to t's future synchronously...
    assert a.free_count == 0
    t.cancel()  # ...but the task is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await t
    assert a.free_count == 2 and a.waiters == 0
    a.free(held[2:])
    assert a.free_count == 4 and a.free_runs() == [(0, 4)]


async def test_resolved_then_cancelled_blocks_go_to_next_waiter():
    a = BlockAllocator(2)
    held = a.try_alloc(2)
    t1 = asyncio.create_task(a.alloc(2, timeout=None))
    await settle()
    t2 = asyncio.create_task(a.alloc(2, timeout=None))
    await settle()
    a.free(held)
    t1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t1
    assert await asyncio.wait_for(t2, 1.0) == [0, 1]


@pytest.mark.parametrize("seed", range(8))
async def test_random_async_ops_keep_invariants(seed):
    rnd = random.Random(seed)
    n_blocks = 32
    a = BlockAllocator(n_blocks)
    owned: dict[int, list[int]] = {}
    tasks: dict[int, asyncio.Task] = {}
    next_id = 0

    async def waiter(key, n, partial, timeout):
        try:
            blocks = await a.alloc(n, timeout=timeout, partial_ok=partial, label=f"w{key}")
        except ResourceExhausted:
            return
        assert (len(blocks) == n) if not partial else (1 <= len(blocks) <= n)
        owned[key] = blocks

    def check(exact: bool = False):
        # Between steps a resolved waiter may not have resumed yet, so its blocks are used but
        # not yet in `owned`; once everything has settled the accounting must be exact.
        used = [b for blocks in owned.values() for b in blocks]
        assert len(used) == len(set(used)), "block owned twice"
        assert a.free_count + a.used_count == n_blocks
        free_ids = {b for start, k in a.free_runs() for b in range(start, start + k)}
        assert len(free_ids) == a.free_count
        assert not free_ids & set(used), "owned block is also free"
        if exact:
            assert len(used) == a.used_count

    for _ in range(300):
        op = rnd.random()
        if op < 0.25:
            got = a.try_alloc(rnd.randint(1, 12))
            if got is not None:
                owned[next_id] = got
                next_id += 1
        elif op < 0.5:
            n = rnd.randint(1, 40)
            partial = rnd.random() < 0.4
            timeout = rnd.choice([None, 0.0, 0.001, 0.01])
            tasks[next_id] = asyncio.create_task(waiter(next_id, n, partial, timeout))
            next_id += 1
        elif op < 0.75 and owned:
            key = rnd.choice(list(owned))
            blocks = owned.pop(key)
            k = rnd.randint(1, len(blocks))
            a.free(blocks[:k])
            if blocks[k:]:
                owned[key] = blocks[k:]
        elif op < 0.85 and tasks:
            key = rnd.choice(list(tasks))
            tasks[key].cancel()
        else:
            await asyncio.sleep(rnd.choice([0, 0, 0.002]))
        check()
        if rnd.random() < 0.1:
            # A timer (a waiter's timeout) can hand blocks to the next waiter at any loop turn;
            # that waiter records them a turn later. Give the loop turns until it has.
            for _ in range(200):
                await settle()
                if sum(len(b) for b in owned.values()) == a.used_count:
                    break
            check(exact=True)
        for key in [k for k, t in tasks.items() if t.done()]:
            tasks.pop(key)

    for t in tasks.values():
        t.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    check(exact=True)
    for blocks in owned.values():
        a.free(blocks)
    assert a.free_count == n_blocks and a.waiters == 0
    assert a.free_runs() == [(0, n_blocks)]


async def test_large_pool_is_fast():
    a = BlockAllocator(100_000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    allocs = [a.try_alloc(37) for _ in range(2000)]
    for x in allocs[::2]:
        a.free(x)
    for _ in range(200):
        a.free(a.try_alloc(100))
    for x in allocs[1::2]:
        a.free(x)
    assert a.free_runs() == [(0, 100_000)]
    assert loop.time() - t0 < 5.0


# -- BlockPool -------------------------------------------------------------------------------------


LAYOUT = RecordLayout.pack(default_fields(hidden=64))


def test_pool_validates_settings():
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(LAYOUT, 3, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(LAYOUT, 0, 4)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(LAYOUT, 4, 0)


def test_pool_geometry_and_field_views():
    pool = BlockPool(LAYOUT, 4, 6)
    g = pool.geometry
    assert g.base_address == pool.base_address == pool.slab.data_ptr()
    assert (g.block_size, g.num_blocks, g.record) == (4, 6, LAYOUT)
    assert pool.nbytes == g.slab_bytes == 6 * 4 * LAYOUT.record_bytes
    assert pool.device == torch.device("cpu")
    assert pool.slab.shape == (6, 4, LAYOUT.record_bytes)

    emb = pool.field_view("embeddings")
    ids = pool.field_view("token_ids")
    pos = pool.field_view("mrope_positions")
    assert emb.shape == (6, 4, 64) and emb.dtype == torch.bfloat16
    assert ids.shape == (6, 4) and ids.dtype == torch.int32
    assert pos.shape == (6, 4, 3) and pos.dtype == torch.int32

    # Views share the slab's memory.
    off = LAYOUT.field("token_ids").offset
    ids[2, 3] = 0x01020304
    assert bytes(pool.slab[2, 3, off : off + 4].tolist()) == (0x01020304).to_bytes(4, "little")
    pos[1, 0] = torch.tensor([7, 8, 9], dtype=torch.int32)
    emb[1, 0] = 1.5
    rec = pool.slab[1, 0]
    assert field_of(rec.unsqueeze(0), LAYOUT.field("mrope_positions")).tolist() == [[7, 8, 9]]
    assert torch.all(field_of(rec.unsqueeze(0), LAYOUT.field("embeddings")) == 1.5)
    with pytest.raises(KeyError):
        pool.field_view("nope")


def test_runs_are_views_merged_over_consecutive_blocks():
    pool = BlockPool(LAYOUT, 4, 6)
    rb = LAYOUT.record_bytes
    runs = pool.runs([3, 4, 1], 2, 8)  # tokens 2..9: block 3 [2,4), block 4, block 1 [0,2)
    assert [r.shape for r in runs] == [(6, rb), (2, rb)]
    assert runs[0].data_ptr() == pool.base_address + (3 * 4 + 2) * rb
    assert runs[1].data_ptr() == pool.base_address + (1 * 4) * rb
    assert pool.runs([0], 0, 0) == []
    with pytest.raises(ValueError):
        pool.runs([3, 4], 2, 7)
    with pytest.raises(ValueError):
        pool.runs([6], 0, 1)


def make_records(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    recs = torch.zeros((n, LAYOUT.record_bytes), dtype=torch.uint8)
    field_of(recs, LAYOUT.field("embeddings"))[:] = torch.randn((n, 64), generator=g).to(
        torch.bfloat16
    )
    field_of(recs, LAYOUT.field("token_ids"))[:] = torch.arange(n, dtype=torch.int32) + 1000
    field_of(recs, LAYOUT.field("mrope_positions"))[:] = torch.randint(
        0, 1 << 20, (n, 3), generator=g, dtype=torch.int32
    )
    return recs


async def test_copy_round_trip_between_pools():
    src = BlockPool(LAYOUT, 8, 16)
    dst = BlockPool(LAYOUT, 4, 32)
    # Fragment both pools so allocations are scattered.
    src_hold = src.try_alloc(16)
    src.free(src_hold[1::3])
    src.free(src_hold[0::3])
    sb = await src.alloc(6, timeout=1.0)
    dst_hold = dst.try_alloc(7)
    db = await dst.alloc(14, timeout=1.0)

    n, s0, d0 = 37, 5, 3
    recs = make_records(n, seed=1)
    src.copy_in(sb, s0, recs)

    staged = torch.empty((n, LAYOUT.record_bytes), dtype=torch.uint8)
    src.copy_out(sb, s0, n, staged)
    assert torch.equal(staged, recs)
    dst.copy_in(db, d0, staged)

    back = torch.empty_like(recs)
    dst.copy_out(db, d0, n, back)
    assert torch.equal(back, recs)
    assert field_of(back, LAYOUT.field("token_ids")).tolist() == list(range(1000, 1000 + n))

    # The pool-wide field view sees the same token where the allocation maps it.
    t = 11
    blk, off = db[(d0 + t) // 4], (d0 + t) % 4
    assert dst.field_view("token_ids")[blk, off].item() == 1000 + t
    assert torch.equal(
        dst.field_view("mrope_positions")[blk, off],
        field_of(recs, LAYOUT.field("mrope_positions"))[t],
    )

    with pytest.raises(ValueError, match="records"):
        dst.copy_in(db, 0, recs[:, :16])
    with pytest.raises(ValueError, match="out"):
        src.copy_out(sb, 0, 3, torch.empty((4, LAYOUT.record_bytes), dtype=torch.uint8))

    src.free(sb)
    src.free([b for b in src_hold[2::3]])
    dst.free(db)
    dst.free(dst_hold)
    assert src.allocator.free_count == 16 and dst.allocator.free_count == 32


def test_int64_field_is_aligned_to_its_element_size():
    layout = RecordLayout.pack([FieldSpec("a", "int32", ()), FieldSpec("b", "int64", (2,))])
    assert layout.field("b").offset == 8  # not 4: every field can be viewed in place as its dtype
    pool = BlockPool(layout, 2, 2)
    assert pool.field_view("a").shape == (2, 2)
    assert pool.field_view("b").shape == (2, 2, 2)
    recs = torch.zeros((3, layout.record_bytes), dtype=torch.uint8)
    recs[1, 8:16] = torch.tensor(list((5).to_bytes(8, "little")), dtype=torch.uint8)
    assert field_of(recs, layout.field("b")).tolist() == [[0, 0], [5, 0], [0, 0]]


async def test_priority_waiters_go_ahead_of_a_big_head_waiter():
    """A resume (priority, partial) must not queue behind an initial allocation that needs
    blocks only resumed transfers can free (head-of-line deadlock)."""
    a = BlockAllocator(8)
    held = a.try_alloc(6)
    big = asyncio.ensure_future(a.alloc(8, timeout=None))  # initial allocation: waits for all 8
    await asyncio.sleep(0)
    resume = await asyncio.wait_for(a.alloc(4, timeout=None, partial_ok=True, priority=True), 1)
    assert len(resume) == 2  # took what was free at once, ahead of the big waiter
    later = asyncio.ensure_future(a.alloc(1, timeout=None, partial_ok=True, priority=True))
    first = asyncio.ensure_future(a.alloc(1, timeout=None))
    await asyncio.sleep(0)
    a.free(resume)
    await asyncio.sleep(0)
    assert (
        later.done() and not first.done() and not big.done()
    )  # priority served first, FIFO otherwise
    a.free(later.result())
    a.free(held)
    await asyncio.sleep(0)
    assert big.done() and len(big.result()) == 8 and not first.done()
    a.free(big.result())
    await asyncio.sleep(0)
    assert first.done()
    a.free(first.result())
    assert a.free_count == 8


# -- quarantine (blocks a late write may still land in) ---------------------------------------


def test_quarantine_blocks_are_neither_free_nor_used_nor_allocatable():
    changes = []
    a = BlockAllocator(8, on_change=lambda used, free: changes.append((used, free)))
    blocks = a.try_alloc(5)
    a.quarantine(blocks[:3])
    assert (a.used_count, a.free_count, a.quarantined_count) == (2, 3, 3)
    assert changes[-1] == (2, 3)
    assert a.try_alloc(4) is None  # the quarantined blocks are not handed out
    got = a.try_alloc(3)
    assert not set(got) & set(blocks)
    a.free(got)
    a.free(blocks[3:])
    assert (a.used_count, a.free_count, a.quarantined_count) == (0, 5, 3)
    a.release_quarantine(blocks[:3])
    assert (a.used_count, a.free_count, a.quarantined_count) == (0, 8, 0)
    assert a.free_runs() == [(0, 8)]  # merged back with their neighbours


@pytest.mark.parametrize("bad", [[99], [-1], ["x"], [True]])
def test_bad_quarantine_raises_and_changes_nothing(bad):
    a = BlockAllocator(4)
    blocks = a.try_alloc(2)
    with pytest.raises(ValueError):
        a.quarantine([blocks[0], *bad])
    assert (a.used_count, a.free_count, a.quarantined_count) == (2, 2, 0)


def test_quarantine_refuses_free_repeated_or_already_quarantined_blocks():
    a = BlockAllocator(4)
    blocks = a.try_alloc(2)
    with pytest.raises(ValueError, match="block 3 is free"):
        a.quarantine([3])
    with pytest.raises(ValueError, match="is free"):
        a.quarantine([blocks[0], blocks[0]])
    a.quarantine(blocks[:1])
    with pytest.raises(ValueError, match="already quarantined"):
        a.quarantine(blocks[:1])
    # A quarantined block is not freed by free(): only release_quarantine returns it.
    with pytest.raises(ValueError, match="quarantined"):
        a.free([blocks[1], blocks[0]])
    assert (a.used_count, a.free_count, a.quarantined_count) == (1, 2, 1)
    with pytest.raises(ValueError, match="not quarantined"):
        a.release_quarantine([blocks[1]])
    with pytest.raises(ValueError, match="repeated"):
        a.release_quarantine([blocks[0], blocks[0]])
    assert (a.used_count, a.free_count, a.quarantined_count) == (1, 2, 1)
    a.quarantine([])
    a.release_quarantine([])
    assert (a.used_count, a.free_count, a.quarantined_count) == (1, 2, 1)


async def test_release_quarantine_serves_waiters():
    a = BlockAllocator(4)
    blocks = a.try_alloc(4)
    a.quarantine(blocks)
    waiter = asyncio.ensure_future(a.alloc(3, timeout=5))
    await settle()
    assert not waiter.done()
    a.release_quarantine(blocks)
    got = await waiter
    assert len(got) == 3 and (a.used_count, a.free_count, a.quarantined_count) == (3, 1, 0)


async def test_alloc_timeout_message_counts_quarantined_blocks():
    a = BlockAllocator(4)
    a.quarantine(a.try_alloc(3))
    with pytest.raises(ResourceExhausted, match=r"1 free of 4, \d+ other waiters, 3 quarantined"):
        await a.alloc(2, timeout=0.01)


async def test_the_proof_nonce_sits_at_both_ends_of_the_pool_inside_its_registered_memory():
    """Register's proof (services/encoder/possession.py) reads the nonce at the claimed pool's
    `head_proof_address` and `proof_address`: both must be inside the memory the engine
    registers, around the blocks, and hold the nonce exactly while `proving` runs."""
    import ctypes

    from common.layout import PROOF_AREA_BYTES

    pool = BlockPool(RecordLayout.pack(default_fields(16, "bfloat16")), 4, 8)
    geo = pool.geometry
    start, size = pool.registered_address, pool.registered_bytes
    assert (start, size) == (geo.head_proof_address, geo.slab_bytes + 2 * PROOF_AREA_BYTES)
    assert geo.proof_address + PROOF_AREA_BYTES == start + size
    assert pool.base_address == start + PROOF_AREA_BYTES  # the blocks between the two areas

    def at(address: int, n: int) -> bytes:
        return ctypes.string_at(address, n)

    nonce = b"n" * 32
    async with pool.proving(nonce):
        assert at(geo.head_proof_address, 32) == at(geo.proof_address, 32) == nonce
        assert pool.slab.count_nonzero() == 0  # no block was touched
    assert at(geo.head_proof_address, 32) == at(geo.proof_address, 32) == bytes(32)
