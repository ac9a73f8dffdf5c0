"""Tests of common.plan: round triples equal a naive per-token copy and are maximal."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.plan import blocks_for_tokens, plan_round, token_runs, uncovered

SRC_BASE = 0x10_0000
DST_BASE = 0x90_0000


def addr(base: int, blocks: list[int], bs: int, rb: int, t: int) -> int:
    return base + (blocks[t // bs] * bs + t % bs) * rb


@st.composite
def allocations(draw, max_pool_blocks: int = 12):
    """A pool size, block size and an allocation (distinct ids, random order) inside it."""
    bs = 1 << draw(st.integers(0, 4))
    pool_blocks = draw(st.integers(1, max_pool_blocks))
    ids = draw(st.permutations(range(pool_blocks)))
    n = draw(st.integers(0, pool_blocks))
    blocks = list(ids[:n])
    if draw(st.booleans()):
        blocks.sort()  # contiguous-ish allocations are the common case; make merges likely
    return pool_blocks, bs, blocks


@st.composite
def rounds(draw):
    src_pool, src_bs, src_blocks = draw(allocations())
    dst_pool, dst_bs, dst_blocks = draw(allocations())
    rb = draw(st.integers(1, 40))
    src_cap, dst_cap = len(src_blocks) * src_bs, len(dst_blocks) * dst_bs
    n = draw(st.integers(0, min(src_cap, dst_cap)))
    src_start = draw(st.integers(0, src_cap - n))
    dst_start = draw(st.integers(0, dst_cap - n))
    return dict(
        src_pool=src_pool,
        src_bs=src_bs,
        src_blocks=src_blocks,
        src_start=src_start,
        dst_pool=dst_pool,
        dst_bs=dst_bs,
        dst_blocks=dst_blocks,
        dst_start=dst_start,
        n=n,
        rb=rb,
    )


@settings(max_examples=400, deadline=None)
@given(rounds(), st.integers(0, 2**32))
def test_plan_matches_naive_copy_and_is_maximal(r, seed):
    rnd = random.Random(seed)
    rb, n = r["rb"], r["n"]
    src_mem = rnd.randbytes(r["src_pool"] * r["src_bs"] * rb)
    dst_size = r["dst_pool"] * r["dst_bs"] * rb
    dst_init = rnd.randbytes(dst_size)

    triples = plan_round(
        src_base=SRC_BASE,
        src_blocks=r["src_blocks"],
        src_block_size=r["src_bs"],
        src_start=r["src_start"],
        dst_base=DST_BASE,
        dst_blocks=r["dst_blocks"],
        dst_block_size=r["dst_bs"],
        dst_start=r["dst_start"],
        n_tokens=n,
        record_bytes=rb,
    )

    # Apply the triples to simulated memories of the two pools.
    got = bytearray(dst_init)
    for s, d, nb in triples:
        assert nb > 0
        assert s >= SRC_BASE and s - SRC_BASE + nb <= len(src_mem)
        assert d >= DST_BASE and d - DST_BASE + nb <= dst_size
        got[d - DST_BASE : d - DST_BASE + nb] = src_mem[s - SRC_BASE : s - SRC_BASE + nb]

    # Naive per-token copy.
    want = bytearray(dst_init)
    src_addrs, dst_addrs = [], []
    for i in range(n):
        s = addr(SRC_BASE, r["src_blocks"], r["src_bs"], rb, r["src_start"] + i)
        d = addr(DST_BASE, r["dst_blocks"], r["dst_bs"], rb, r["dst_start"] + i)
        src_addrs.append(s)
        dst_addrs.append(d)
        want[d - DST_BASE : d - DST_BASE + rb] = src_mem[s - SRC_BASE : s - SRC_BASE + rb]

    assert got == want
    assert sum(nb for _, _, nb in triples) == n * rb
    # Maximal: no triple continues into its successor on both sides...
    for (s1, d1, n1), (s2, d2, _n2) in zip(triples, triples[1:]):
        assert not (s1 + n1 == s2 and d1 + n1 == d2)
    # ...and the count equals 1 + the number of places where the per-token copy breaks.
    breaks = sum(
        1
        for i in range(1, n)
        if src_addrs[i] != src_addrs[i - 1] + rb or dst_addrs[i] != dst_addrs[i - 1] + rb
    )
    assert len(triples) == (breaks + 1 if n else 0)
    # Triples are in token order.
    if n:
        assert triples[0][:2] == (src_addrs[0], dst_addrs[0])


def _plan(**over):
    args = dict(
        src_base=1000,
        src_blocks=[0, 1],
        src_block_size=4,
        src_start=0,
        dst_base=5000,
        dst_blocks=[0, 1],
        dst_block_size=4,
        dst_start=0,
        n_tokens=8,
        record_bytes=16,
    )
    args.update(over)
    return plan_round(**args)


def test_zero_tokens_is_empty():
    assert _plan(n_tokens=0) == []
    assert _plan(n_tokens=0, src_blocks=[], dst_blocks=[]) == []


def test_fully_contiguous_is_one_triple():
    assert _plan() == [(1000, 5000, 8 * 16)]
    # Different block sizes, both sides contiguous.
    t = _plan(
        src_blocks=[3, 4, 5, 6],
        src_block_size=2,
        dst_blocks=[7],
        dst_block_size=8,
        src_start=1,
        n_tokens=7,
    )
    assert t == [(1000 + (3 * 2 + 1) * 16, 5000 + 7 * 8 * 16, 7 * 16)]


def test_splits_where_either_side_breaks():
    # src contiguous, dst blocks reversed: one triple per dst block.
    t = _plan(dst_blocks=[1, 0])
    assert t == [(1000, 5000 + 4 * 16, 64), (1000 + 64, 5000, 64)]


@pytest.mark.parametrize(
    "over, needle",
    [
        (dict(n_tokens=-1), "n_tokens"),
        (dict(n_tokens=9), "src"),
        (dict(src_start=1), "src"),
        (dict(dst_start=1), "dst"),
        (dict(dst_blocks=[0]), "dst"),
        (dict(src_start=-1, n_tokens=1), "src start"),
        (dict(dst_start=-2, n_tokens=1), "dst start"),
        (dict(record_bytes=0), "record_bytes"),
        (dict(src_block_size=0), "block_size"),
    ],
)
def test_out_of_range_raises(over, needle):
    with pytest.raises(ValueError, match=needle):
        _plan(**over)


def test_blocks_for_tokens():
    assert blocks_for_tokens(0, 128) == 0
    assert blocks_for_tokens(1, 128) == 1
    assert blocks_for_tokens(128, 128) == 1
    assert blocks_for_tokens(129, 128) == 2
    with pytest.raises(ValueError):
        blocks_for_tokens(-1, 4)
    with pytest.raises(ValueError):
        blocks_for_tokens(1, 0)


def test_token_runs_merges_consecutive_blocks():
    assert token_runs([3, 4, 1], 4, 2, 8) == [(14, 6), (4, 2)]
    assert token_runs([3, 4, 1], 4, 0, 0) == []


def test_large_round_is_fast():
    rnd = random.Random(1)
    src = list(range(1000))
    rnd.shuffle(src)
    dst = list(range(2000, 2800))
    t0 = time.perf_counter()
    triples = plan_round(
        src_base=0,
        src_blocks=src,
        src_block_size=128,
        src_start=17,
        dst_base=1 << 40,
        dst_blocks=dst,
        dst_block_size=128,
        dst_start=0,
        n_tokens=100_000,
        record_bytes=7184,
    )
    assert time.perf_counter() - t0 < 0.5
    assert sum(nb for _, _, nb in triples) == 100_000 * 7184


@pytest.mark.parametrize(
    "lo, hi, covered, expected",
    [
        (0, 10, [], [(0, 10)]),
        (0, 10, [(0, 10)], []),
        (0, 10, [(2, 4), (6, 8)], [(0, 2), (4, 6), (8, 10)]),
        (5, 15, [(0, 7), (12, 20)], [(7, 12)]),
        (5, 15, [(0, 3), (20, 30)], [(5, 15)]),
        (0, 10, [(3, 4), (4, 5)], [(0, 3), (5, 10)]),
    ],
)
def test_uncovered_is_what_a_round_writes_around_reused_rows(lo, hi, covered, expected):
    assert uncovered(lo, hi, covered) == expected
    # Written and covered together are the range, once each.
    inside = [(max(a, lo), min(b, hi)) for a, b in covered if min(b, hi) > max(a, lo)]
    tokens = sorted(t for a, b in [*expected, *inside] for t in range(a, b))
    assert tokens == list(range(lo, hi))
