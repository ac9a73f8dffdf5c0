"""Per-round, per-field checksums (DESIGN §5 "Integrity").

Computed with torch reductions so they run on the pool's device and never leave it except as
one integer per field. The value pairs a position-weighted sum over tokens (catches moved or
missing rows) with a column-weighted sum (catches swapped words inside a row); the sums wrap
modulo 2**32, which is exact and order-independent, so encoder and language agree bit for bit
however each splits the round into runs.
"""

from __future__ import annotations

import torch

from common.layout import FieldLayout, RecordLayout

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

