"""Tests of common.bounds.check_plan: every plan the planner makes passes; every write that leaves
the registered slab or the round's blocks, on either side, is refused before it is submitted."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bounds import OutOfBounds, Slab, block_ranges, check_plan
from common.plan import plan_round

SRC_BASE = 0x10_0000
DST_BASE = 0x90_0000


def plan(
    src_blocks, dst_blocks, *, bs=4, rb=8, src_start=0, n=None, src_base=SRC_BASE, dst_base=DST_BASE
):
    n = len(dst_blocks) * bs if n is None else n
    return plan_round(
        src_base=src_base,
        src_blocks=src_blocks,
        src_block_size=bs,
        src_start=src_start,
        dst_base=dst_base,
        dst_blocks=dst_blocks,
        dst_block_size=bs,
        dst_start=0,
        n_tokens=n,
        record_bytes=rb,
    )


def slabs(src_pool=8, dst_pool=8, bs=4, rb=8):
    return (
        Slab(SRC_BASE, src_pool, bs * rb, "source pool"),
        Slab(DST_BASE, dst_pool, bs * rb, "destination pool"),
    )


def check(triples, src_blocks, dst_blocks, expected, **kw):
    src, dst = slabs(**kw)
    check_plan(
        triples,
        src=src,
        src_blocks=src_blocks,
        dst=dst,
        dst_blocks=dst_blocks,
        expected_bytes=expected,
    )


# ---------------------------------------------------------------------------------- block_ranges


def test_block_ranges_merge_adjacent_blocks_in_any_order():
    slab = Slab(1000, 10, 10)
    assert block_ranges(slab, [3, 1, 2, 7]) == [(1010, 1040), (1070, 1080)]
    assert block_ranges(slab, []) == []


@pytest.mark.parametrize(
    "blocks, needle", [([10], "block id 10"), ([-1], "block id -1"), ([2, 2], "more than once")]
)
def test_block_ranges_refuse_bad_ids(blocks, needle):
    with pytest.raises(OutOfBounds, match=needle):
        block_ranges(Slab(1000, 10, 10, "destination pool"), blocks)


# ---------------------------------------------------------------------------------- exhaustive


def test_every_plan_of_small_pools_passes_exhaustively():
    """Every allocation pair (up to 3 of 4 blocks each side, every order) and every round length."""
    bs, rb, pool = 2, 4, 4
    allocations = [
        list(p)
        for k in range(1, 4)
        for c in itertools.combinations(range(pool), k)
        for p in itertools.permutations(c)
    ]
    count = 0
    for src_blocks in allocations:
        for dst_blocks in allocations:
            for n in range(1, min(len(src_blocks), len(dst_blocks)) * bs + 1):
                triples = plan(src_blocks, dst_blocks, bs=bs, rb=rb, n=n)
                check(
                    triples,
                    src_blocks,
                    dst_blocks,
                    n * rb,
                    src_pool=pool,
                    dst_pool=pool,
                    bs=bs,
                    rb=rb,
                )
                count += 1
    assert count == 6944  # every case above was checked


def test_every_single_byte_shift_of_a_write_is_refused_exhaustively():
    """Moving any write's destination (or source) by any amount that leaves the allocation fails:
    the allocation is blocks 2 and 3 of a 6-block pool, the plan one contiguous write."""
    bs, rb = 2, 4
    block_bytes = bs * rb
    src_blocks, dst_blocks = [0, 1], [2, 3]
    ((s, d, n),) = plan(src_blocks, dst_blocks, bs=bs, rb=rb)
    for shift in range(-4 * block_bytes, 4 * block_bytes + 1):
        for side in ("src", "dst"):
            moved = (s + shift, d, n) if side == "src" else (s, d + shift, n)
            if shift == 0:
                check([moved], src_blocks, dst_blocks, n, src_pool=6, dst_pool=6, bs=bs, rb=rb)
                continue
            with pytest.raises(OutOfBounds, match="reads" if side == "src" else "writes"):
                check([moved], src_blocks, dst_blocks, n, src_pool=6, dst_pool=6, bs=bs, rb=rb)


# ---------------------------------------------------------------------------------- each rule


def test_write_past_the_end_of_the_slab_names_the_slab():
    triples = [(SRC_BASE, DST_BASE + 7 * 32, 64)]  # starts in the last block, ends past the slab
    with pytest.raises(
        OutOfBounds, match=r"writes .* outside the destination pool \[0x900000, 0x900100\)"
    ):
        check(triples, [0, 1], [7], 64)


def test_write_below_the_base_is_refused():
    with pytest.raises(OutOfBounds, match="outside the destination pool"):
        check([(SRC_BASE, DST_BASE - 32, 32)], [0], [0], 32)


def test_write_inside_the_slab_but_into_another_requests_block_is_refused():
    with pytest.raises(OutOfBounds, match="outside the round's blocks"):
        check([(SRC_BASE, DST_BASE + 5 * 32, 32)], [0], [4], 32)


def test_read_outside_the_source_blocks_is_refused():
    with pytest.raises(OutOfBounds, match="reads .* outside the round's blocks of the source pool"):
        check([(SRC_BASE + 3 * 32, DST_BASE, 32)], [0], [0], 32)


def test_write_spanning_two_non_adjacent_blocks_is_refused():
    # blocks 1 and 3 are allocated, 2 is not: one 64-byte write from block 1 would cross block 2.
    with pytest.raises(OutOfBounds, match="outside the round's blocks"):
        check([(SRC_BASE, DST_BASE + 32, 64)], [0, 1], [1, 3], 64)


def test_overlapping_writes_are_refused():
    with pytest.raises(OutOfBounds, match="overlap"):
        check([(SRC_BASE, DST_BASE, 32), (SRC_BASE + 32, DST_BASE + 16, 16)], [0, 1], [0], 48)


def test_byte_count_must_match_the_round():
    with pytest.raises(OutOfBounds, match="move 32 bytes, the round has 64"):
        check([(SRC_BASE, DST_BASE, 32)], [0, 1], [0, 1], 64)


@pytest.mark.parametrize(
    "triple",
    [
        (SRC_BASE, DST_BASE, 0),
        (SRC_BASE, DST_BASE, -8),
        (SRC_BASE, DST_BASE),
        (SRC_BASE, DST_BASE, 8.0),
        (SRC_BASE, True, 8),
    ],
)
def test_malformed_triples_are_refused(triple):
    with pytest.raises(OutOfBounds):
        check([triple], [0], [0], 8)


def test_out_of_range_block_ids_in_the_allocation_are_refused():
    with pytest.raises(
        OutOfBounds, match="block id 8 is outside the 8 blocks of the destination pool"
    ):
        check([(SRC_BASE, DST_BASE, 32)], [0], [8], 32)


# ---------------------------------------------------------------------------------- hypothesis


@st.composite
def planned_rounds(draw):
    bs = 1 << draw(st.integers(0, 3))
    rb = draw(st.integers(1, 24))
    src_pool, dst_pool = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    src_blocks = list(draw(st.permutations(range(src_pool)))[: draw(st.integers(1, src_pool))])
    dst_blocks = list(draw(st.permutations(range(dst_pool)))[: draw(st.integers(1, dst_pool))])
    src_start = draw(st.integers(0, (len(src_blocks) - 1) * bs))
    n = draw(st.integers(1, min(len(src_blocks) * bs - src_start, len(dst_blocks) * bs)))
    triples = plan_round(
        src_base=SRC_BASE,
        src_blocks=src_blocks,
        src_block_size=bs,
        src_start=src_start,
        dst_base=DST_BASE,
        dst_blocks=dst_blocks,
        dst_block_size=bs,
        dst_start=0,
        n_tokens=n,
        record_bytes=rb,
    )
    src = Slab(SRC_BASE, src_pool, bs * rb, "source pool")
    dst = Slab(DST_BASE, dst_pool, bs * rb, "destination pool")
    return triples, src, src_blocks, dst, dst_blocks, n * rb


@settings(max_examples=400, deadline=None)
@given(planned_rounds())
def test_planner_output_always_passes(case):
    triples, src, src_blocks, dst, dst_blocks, expected = case
    check_plan(
        triples,
        src=src,
        src_blocks=src_blocks,
        dst=dst,
        dst_blocks=dst_blocks,
        expected_bytes=expected,
    )


@settings(max_examples=400, deadline=None)
@given(planned_rounds(), st.data())
def test_a_corrupted_write_passes_only_if_it_stays_inside_the_allocation(case, data):
    """Corrupt one triple at random (move either side, grow it); the check accepts the plan only
    when every byte still lies inside the allocated blocks and nothing overlaps or goes missing,
    which a naive byte-by-byte model of the allocation decides independently."""
    triples, src, src_blocks, dst, dst_blocks, expected = case
    i = data.draw(st.integers(0, len(triples) - 1))
    s, d, n = triples[i]
    ds = data.draw(st.integers(-3 * src.block_bytes, 3 * src.block_bytes))
    dd = data.draw(st.integers(-3 * dst.block_bytes, 3 * dst.block_bytes))
    dn = data.draw(st.integers(-n + 1, 2 * dst.block_bytes))
    bad = list(triples)
    bad[i] = (s + ds, d + dd, n + dn)
    # Byte-level model: sets of allowed bytes on each side, and destination bytes written.
    src_ok = {
        a
        for b in src_blocks
        for a in range(src.base + b * src.block_bytes, src.base + (b + 1) * src.block_bytes)
    }
    dst_ok = {
        a
        for b in dst_blocks
        for a in range(dst.base + b * dst.block_bytes, dst.base + (b + 1) * dst.block_bytes)
    }
    written: list[int] = [a for _, dd_, nn in bad for a in range(dd_, dd_ + nn)]
    read: list[int] = [a for ss, _, nn in bad for a in range(ss, ss + nn)]
    valid = (
        set(read) <= src_ok
        and set(written) <= dst_ok
        and len(written) == len(set(written))
        and len(written) == expected
    )
    if valid:
        check_plan(
            bad,
            src=src,
            src_blocks=src_blocks,
            dst=dst,
            dst_blocks=dst_blocks,
            expected_bytes=expected,
        )
    else:
        with pytest.raises(OutOfBounds):
            check_plan(
                bad,
                src=src,
                src_blocks=src_blocks,
                dst=dst,
                dst_blocks=dst_blocks,
                expected_bytes=expected,
            )
