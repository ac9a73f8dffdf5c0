"""Checksums: equal for the same bytes however the tokens are split into runs; sensitive to
corruption, moved rows and swapped bytes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.integrity import (
    INLINE_MAX_BYTES,
    checksums,
    checksums_off_loop,
    host_checksums,
    parallel_checksums,
    small_checksums,
)
from common.layout import RecordLayout, default_fields
from common.parallel import MEMORY_BOUND_SPLIT_BYTES, split_tokens
from common.synthetic import fill_synthetic

RECORD = RecordLayout.pack(default_fields(64))


def records(n, seed=5, start=0):
    r = torch.zeros((n, RECORD.record_bytes), dtype=torch.uint8)
    fill_synthetic(r, RECORD, seed, start)
    return r


def test_split_into_runs_gives_the_same_checksums():
    r = records(300)
    whole = checksums([r], RECORD, 1000)
    assert checksums([r[:1], r[1:129], r[129:]], RECORD, 1000) == whole
    assert set(whole) == {"embeddings", "token_ids", "mrope_positions"}


def test_detects_corruption_moves_and_swaps():
    r = records(64)
    base = checksums([r], RECORD, 0)
    flipped = r.clone()
    flipped[10, 3] ^= 1
    assert checksums([flipped], RECORD, 0)["embeddings"] != base["embeddings"]
    swapped_rows = r.clone()
    swapped_rows[[3, 4]] = r[[4, 3]]
    assert checksums([swapped_rows], RECORD, 0) != base
    swapped_cols = r.clone()
    swapped_cols[:, [0, 2]] = r[:, [2, 0]]
    assert checksums([swapped_cols], RECORD, 0)["embeddings"] != base["embeddings"]
    assert checksums([r], RECORD, 1) != base  # position matters


@settings(max_examples=60, deadline=None)
@given(
    hidden=st.sampled_from([1, 7, 64, 255, 3584]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    n=st.integers(1, 300),
    cut=st.integers(0, 300),
    first=st.integers(0, 10**6),
    seed=st.integers(0, 2**31),
)
def test_small_numpy_checksums_equal_the_torch_ones(hidden, dtype, n, cut, first, seed):
    """The event-loop fast path (numpy, small host segments) is bit-for-bit the torch checksum."""
    record = RecordLayout.pack(default_fields(hidden, dtype))
    gen = torch.Generator().manual_seed(seed)
    records = torch.randint(0, 256, (n, record.record_bytes), dtype=torch.uint8, generator=gen)
    cut = min(cut, n)
    segments = [records[:cut], records[cut:]]
    assert small_checksums(segments, record, first) == checksums(segments, record, first)


@settings(max_examples=60, deadline=None)
@given(
    hidden=st.sampled_from([1, 7, 64, 255, 3584]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    n=st.integers(1, 300),
    cuts=st.lists(st.integers(0, 300), max_size=3),
    first=st.integers(0, 10**9),
    seed=st.integers(0, 2**31),
    chunk=st.sampled_from([1, 2, 5, 64]),
)
def test_host_checksums_equal_the_torch_ones(hidden, dtype, n, cuts, first, seed, chunk):
    """The host path (chunked numpy pass over whole records, or per field when a field is not
    whole int32 words) is bit-for-bit the torch checksum, for any split into runs and chunks."""
    record = RecordLayout.pack(default_fields(hidden, dtype))
    gen = torch.Generator().manual_seed(seed)
    records = torch.randint(0, 256, (n, record.record_bytes), dtype=torch.uint8, generator=gen)
    edges = sorted({0, n, *(min(c, n) for c in cuts)})
    segments = [records[a:b] for a, b in zip(edges, edges[1:])]
    assert host_checksums(
        segments, record, first, chunk_bytes=chunk * record.record_bytes
    ) == checksums([records], record, first)


async def test_checksums_off_loop_picks_a_path_by_size_with_equal_results():
    record = RecordLayout.pack(default_fields(3584, "bfloat16"))
    # inline, then one worker thread, then split over worker threads
    for n in (
        4,
        (INLINE_MAX_BYTES // record.record_bytes) + 10,
        MEMORY_BOUND_SPLIT_BYTES // record.record_bytes + 10,
    ):
        records = torch.randint(0, 256, (n, record.record_bytes), dtype=torch.uint8)
        assert await checksums_off_loop([records], record, 5) == checksums([records], record, 5)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    first=st.integers(0, 1000),
    parts=st.integers(1, 5),
)
def test_split_tokens_keeps_order_and_positions(lengths, first, parts):
    segments = [
        torch.arange(sum(lengths[:i]), sum(lengths[: i + 1])).view(-1, 1)
        for i in range(len(lengths))
    ]
    groups = split_tokens(segments, first, parts)
    assert len(groups) <= parts
    flat = [int(x) for segs, _ in groups for s in segs for x in s.flatten()]
    assert flat == list(range(sum(lengths)))
    for segs, start in groups:  # each group's first token is its absolute position
        got = [s for s in segs if s.shape[0]]
        if got:
            assert start == first + int(got[0][0, 0])


async def test_parallel_off_loop_checksums_equal_one_pass():
    record = RecordLayout.pack(default_fields(512, "bfloat16"))
    n = INLINE_MAX_BYTES // record.record_bytes * 3 + 7
    records = torch.randint(0, 256, (n, record.record_bytes), dtype=torch.uint8)
    segments = [records[: n // 3], records[n // 3 :]]
    assert await checksums_off_loop(segments, record, 11) == checksums(segments, record, 11)
    assert parallel_checksums(segments, record, 11) == checksums(segments, record, 11)


@settings(max_examples=60, deadline=None)
@given(
    hidden=st.sampled_from([1, 7, 64, 255]),
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    block=st.sampled_from([1, 4, 16]),
    blocks=st.lists(st.integers(0, 11), min_size=1, max_size=12, unique=True),
    cut=st.integers(0, 200),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_payload_sums_give_the_checksums_of_any_range(
    hidden, dtype, block, blocks, cut, seed, data
):
    """Rounds' checksums from the sums built at Encode equal a fresh pass over the round."""
    from common.integrity import PayloadSums
    from common.pool import BlockPool

    record = RecordLayout.pack(default_fields(hidden, dtype))
    pool = BlockPool(record, block, 12)
    gen = torch.Generator().manual_seed(seed)
    pool.slab.copy_(torch.randint(0, 256, pool.slab.shape, dtype=torch.uint8, generator=gen))
    total = max(1, len(blocks) * block - min(cut, block - 1))
    sums = PayloadSums.build(pool.runs(blocks, 0, total), record, block)
    start = data.draw(st.integers(0, total - 1))
    n = data.draw(st.integers(1, total - start))
    got = sums.checksums(start, n, lambda lo, hi: pool.runs(blocks, lo, hi - lo))
    assert got == checksums(pool.runs(blocks, start, n), record, start)


def test_payload_sums_of_a_payload_big_enough_to_be_built_in_parallel_parts():
    from common.integrity import PayloadSums
    from common.parallel import SPLIT_MIN_BYTES
    from common.pool import BlockPool

    record = RecordLayout.pack(default_fields(512, "bfloat16"))
    pool = BlockPool(record, 16, 400)
    pool.slab.random_(0, 255, generator=torch.Generator().manual_seed(5))
    blocks = [7, 8, 9, 30, 2, 3, 4, 5, *range(100, 380)]
    total = len(blocks) * 16 - 5
    assert total * record.record_bytes > 2 * SPLIT_MIN_BYTES  # really split
    sums = PayloadSums.build(pool.runs(blocks, 0, total), record, 16)
    for start, n in ((0, total), (5, 1000), (16, 32), (1000, total - 1000), (3, 7)):
        got = sums.checksums(start, n, lambda lo, hi: pool.runs(blocks, lo, hi - lo))
        assert got == checksums(pool.runs(blocks, start, n), record, start), (start, n)
