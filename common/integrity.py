"""Per-round, per-field checksums (DESIGN §5 "Integrity").

Computed with torch reductions so they run on the pool's device and never leave it except as
one integer per field. The value pairs a position-weighted sum over tokens (catches moved or
missing rows) with a column-weighted sum (catches swapped words inside a row); the sums wrap
modulo 2**32, which is exact and order-independent, so encoder and language agree bit for bit
however each splits the round into runs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from common.layout import FieldLayout, RecordLayout
from common.parallel import PARALLEL, run_split  # noqa: F401 (PARALLEL: for callers splitting copies)

_MASK32 = (1 << 32) - 1


def _words(records: torch.Tensor, field: FieldLayout) -> torch.Tensor:
    """The field's bytes of every record as integer words [n, w] (a view where possible)."""
    raw = records[:, field.offset: field.offset + field.bytes_per_token]
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if field.bytes_per_token % size == 0 and field.offset % size == 0:
            return raw.view(dtype)
    return raw


def field_checksum(records: torch.Tensor, field: FieldLayout, first_token: int) -> int:
    """Checksum of one field over records [n, record_bytes]; `first_token` is the absolute index
    of records[0] in the payload, so equal bytes at different positions give different values.

    High 32 bits: sum over tokens of (position * row sum); low 32 bits: sum over columns of
    (column index * column sum); both modulo 2**32, which is what makes per-run parts add up
    (component-wise) to the checksum of the whole, and lets the big reductions run in int32."""
    n = records.shape[0]
    if n == 0:
        return 0
    words = _words(records, field)
    row = words.sum(dim=1, dtype=torch.int32).to(torch.int64)      # [n], wraps modulo 2**32
    pos = torch.arange(first_token + 1, first_token + n + 1, dtype=torch.int64, device=row.device)
    a = int((row * pos).sum()) & _MASK32
    col = words.sum(dim=0, dtype=torch.int32).to(torch.int64)      # [w]
    cpos = torch.arange(1, col.shape[0] + 1, dtype=torch.int64, device=col.device)
    b = int((col * cpos).sum()) & _MASK32
    return (a << 32) | b


def combine(x: int, y: int) -> int:
    """The checksum of two disjoint token ranges from the checksums of each."""
    return ((((x >> 32) + (y >> 32)) & _MASK32) << 32) | (((x & _MASK32) + (y & _MASK32)) & _MASK32)


def checksums(segments: list[torch.Tensor], record: RecordLayout, first_token: int) -> dict[str, int]:
    """Checksums of every field over consecutive record segments (the runs of one round)."""
    out: dict[str, int] = {}
    for f in record.fields:
        total = 0
        pos = first_token
        for seg in segments:
            # Per-run parts add up to the whole: the encoder (source runs) and the language
            # (destination runs) agree.
            total = combine(total, field_checksum(seg, f, pos))
            pos += seg.shape[0]
        out[f.name] = total
    return out



INLINE_MAX_BYTES = 1 << 20
"""Checksums over at most this many bytes run on the event loop: below it, a worker-thread hop
costs more than the work (about 0.1 ms for 1 MiB on one CPU core), and the loop is never held
for long. Larger rounds go to a worker thread."""


def _is_small(segments: list[torch.Tensor]) -> bool:
    return sum(s.numel() * s.element_size() for s in segments) <= INLINE_MAX_BYTES


def fast_checksums(segments: list[torch.Tensor], record: RecordLayout, first_token: int) -> dict[str, int]:
    """`checksums` by the fastest route: numpy for small host-memory segments, torch otherwise."""
    if _is_small(segments):
        if all(s.device.type == "cpu" for s in segments):
            return small_checksums(segments, record, first_token)
        return checksums(segments, record, first_token)
    return parallel_checksums(segments, record, first_token)


async def checksums_off_loop(segments: list[torch.Tensor], record: RecordLayout, first_token: int) -> dict[str, int]:
    """`fast_checksums`, on the loop when the segments are small (INLINE_MAX_BYTES), else in a
    worker thread (split over PARALLEL threads)."""
    if _is_small(segments):
        return fast_checksums(segments, record, first_token)
    return await asyncio.to_thread(fast_checksums, segments, record, first_token)


def parallel_checksums(segments: list[torch.Tensor], record: RecordLayout, first_token: int) -> dict[str, int]:
    """`checksums` split by tokens over PARALLEL threads and combined (blocking)."""
    parts = run_split(lambda segs, first: checksums(segs, record, first), segments, first_token)
    out = parts[0]
    for more in parts[1:]:
        out = {name: combine(out[name], more[name]) for name in out}
    return out


def small_checksums(segments: list[torch.Tensor], record: RecordLayout, first_token: int) -> dict[str, int]:
    """`checksums` of small host-memory segments with numpy: the same values (tested), without
    torch's per-operation overhead, which dominates below about 1 MiB."""
    out: dict[str, int] = {}
    for f in record.fields:
        a = b = 0
        pos = first_token
        for seg in segments:
            n = seg.shape[0]
            if n:
                raw = seg.numpy()[:, f.offset: f.offset + f.bytes_per_token]
                words = raw
                for dtype, size in ((np.int32, 4), (np.int16, 2)):
                    if f.bytes_per_token % size == 0 and f.offset % size == 0:
                        words = raw.view(dtype)
                        break
                with np.errstate(over="ignore"):
                    row = words.sum(axis=1, dtype=np.int32).astype(np.int64)  # wraps modulo 2**32, as torch does
                    col = words.sum(axis=0, dtype=np.int32).astype(np.int64)
                    a += int((row * np.arange(pos + 1, pos + n + 1, dtype=np.int64)).sum())
                    b += int((col * np.arange(1, col.shape[0] + 1, dtype=np.int64)).sum())
            pos += n
        out[f.name] = ((a & _MASK32) << 32) | (b & _MASK32)
    return out
