"""Checksums: equal for the same bytes however the tokens are split into runs; sensitive to
corruption, moved rows and swapped bytes."""

from __future__ import annotations

import torch

from common.integrity import checksums
from common.layout import RecordLayout, default_fields
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
