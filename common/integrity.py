"""Per-round, per-field checksums (docs/DESIGN.md, "Integrity").

Computed with torch reductions so they run on the pool's device and never leave it except as
one integer per field. The value pairs a position-weighted sum over tokens (catches moved or
missing rows) with a column-weighted sum (catches swapped words inside a row); the sums wrap
modulo 2**32, which is exact and order-independent, so encoder and language agree bit for bit
however each splits the round into runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import torch

from common.layout import FieldLayout, RecordLayout
from common.parallel import MEMORY_BOUND_SPLIT_BYTES, nbytes, run_split, run_split_async

_MASK32 = (1 << 32) - 1


_WORD_DTYPES = ((4, torch.int32, np.int32), (2, torch.int16, np.int16))


def _words(records, field: FieldLayout):
    """The field's bytes of every record (a torch tensor or a numpy array [n, record_bytes]) as
    integer words [n, w]: int32 where the field is whole int32 words, else int16, else bytes."""
    raw = records[:, field.offset : field.offset + field.bytes_per_token]
    numpy = isinstance(records, np.ndarray)
    for size, torch_dtype, np_dtype in _WORD_DTYPES:
        if field.bytes_per_token % size == 0 and field.offset % size == 0:
            return raw.view(np_dtype if numpy else torch_dtype)
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
    row = words.sum(dim=1, dtype=torch.int32).to(torch.int64)  # [n], wraps modulo 2**32
    pos = torch.arange(first_token + 1, first_token + n + 1, dtype=torch.int64, device=row.device)
    a = int((row * pos).sum()) & _MASK32
    col = words.sum(dim=0, dtype=torch.int32).to(torch.int64)  # [w]
    cpos = torch.arange(1, col.shape[0] + 1, dtype=torch.int64, device=col.device)
    b = int((col * cpos).sum()) & _MASK32
    return (a << 32) | b


def combine(x: int, y: int) -> int:
    """The checksum of two disjoint token ranges from the checksums of each."""
    return ((((x >> 32) + (y >> 32)) & _MASK32) << 32) | (((x & _MASK32) + (y & _MASK32)) & _MASK32)


def checksums(
    segments: list[torch.Tensor], record: RecordLayout, first_token: int
) -> dict[str, int]:
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
    return nbytes(segments) <= INLINE_MAX_BYTES


def _on_host(segments: list[torch.Tensor]) -> bool:
    return all(s.device.type == "cpu" for s in segments)


def fast_checksums(
    segments: list[torch.Tensor], record: RecordLayout, first_token: int
) -> dict[str, int]:
    """`checksums` by the fastest route: numpy for host-memory segments, torch on a device
    (blocking; big device rounds are split over threads)."""
    if _on_host(segments):
        return host_checksums(segments, record, first_token)
    if _is_small(segments):
        return checksums(segments, record, first_token)
    return parallel_checksums(segments, record, first_token)


async def checksums_off_loop(
    segments: list[torch.Tensor], record: RecordLayout, first_token: int
) -> dict[str, int]:
    """`fast_checksums`, on the loop when the segments are small (INLINE_MAX_BYTES), else in a
    worker thread, or — host rounds over MEMORY_BOUND_SPLIT_BYTES — in PARALLEL worker threads
    reached straight from the loop (one hand-off each, not two)."""
    if _is_small(segments):
        return fast_checksums(segments, record, first_token)
    if _on_host(segments) and nbytes(segments) > MEMORY_BOUND_SPLIT_BYTES:
        parts = await run_split_async(
            lambda segs, first: host_checksums(segs, record, first),
            segments,
            first_token,
            min_split_bytes=MEMORY_BOUND_SPLIT_BYTES,
        )
        return _combine_parts(parts)
    return await asyncio.to_thread(fast_checksums, segments, record, first_token)


def _combine_parts(parts: list[dict[str, int]]) -> dict[str, int]:
    out = parts[0]
    for more in parts[1:]:
        out = {name: combine(out[name], more[name]) for name in out}
    return out


def parallel_checksums(
    segments: list[torch.Tensor], record: RecordLayout, first_token: int
) -> dict[str, int]:
    """`checksums` split by tokens over PARALLEL threads and combined (blocking)."""
    return _combine_parts(
        run_split(lambda segs, first: checksums(segs, record, first), segments, first_token)
    )


def small_checksums(
    segments: list[torch.Tensor], record: RecordLayout, first_token: int
) -> dict[str, int]:
    """`checksums` of small host-memory segments with numpy: the same values (tested), without
    torch's per-operation overhead, which dominates below about 1 MiB."""
    out: dict[str, int] = {}
    for f in record.fields:
        a = b = 0
        pos = first_token
        for seg in segments:
            n = seg.shape[0]
            if n:
                words = _words(seg.numpy(), f)
                with np.errstate(over="ignore"):
                    row = words.sum(axis=1, dtype=np.int32).astype(
                        np.int64
                    )  # wraps modulo 2**32, as torch does
                    col = words.sum(axis=0, dtype=np.int32).astype(np.int64)
                    a += int((row * np.arange(pos + 1, pos + n + 1, dtype=np.int64)).sum())
                    b += int((col * np.arange(1, col.shape[0] + 1, dtype=np.int64)).sum())
            pos += n
        out[f.name] = ((a & _MASK32) << 32) | (b & _MASK32)
    return out


HOST_CHUNK_BYTES = 1 << 20
"""host_checksums reads this many bytes of records at a time: the row sums bring a chunk into
cache and the column sums then read it from there, so the two reductions cost about one pass
over memory, not two. Each chunk costs a handful of numpy calls that hold the GIL between their
loops, so bigger chunks also let two threads checking halves of a round overlap better. Measured
here (1 MiB L2 per core, 32 MiB L3), 58.8 MB of records: 256 KiB chunks 7.4-8.0 ms in one thread,
6.8-8.1 ms in two; 1 MiB chunks 6.2-7.1 ms in one, 4.3-4.7 ms in two; 7.4 MB: 0.83-0.96 ->
0.77-0.81 ms."""


def _word_columns(record: RecordLayout) -> list[tuple[str, int, int]] | None:
    """Each field as int32 word columns [lo, hi) of a whole record, when every field is made of
    whole int32 words (the checksum's words for it, see `_words`); None otherwise."""
    if record.record_bytes % 4:
        return None
    cols = []
    for f in record.fields:
        if f.offset % 4 or f.bytes_per_token % 4:
            return None
        cols.append((f.name, f.offset // 4, (f.offset + f.bytes_per_token) // 4))
    return cols


def host_checksums(
    segments: list[torch.Tensor],
    record: RecordLayout,
    first_token: int,
    *,
    chunk_bytes: int = HOST_CHUNK_BYTES,
) -> dict[str, int]:
    """`checksums` of host-memory segments, the same values (tested), in about one pass over
    memory for every field together: records are read in L2-sized chunks of whole records viewed
    as int32 words; each chunk's per-field row sums and its column sums (all fields at once) are
    taken while it is cached. Records whose fields are not all whole int32 words take the
    per-field numpy route (`small_checksums`). Blocking: a worker thread for big rounds."""
    fields = _word_columns(record)
    if fields is None:
        return small_checksums(segments, record, first_token)
    n_total = sum(s.shape[0] for s in segments)
    words_per_record = record.record_bytes // 4
    step = max(1, chunk_bytes // record.record_bytes)
    rows = {name: np.empty(n_total, dtype=np.int32) for name, _, _ in fields}
    cols = np.zeros(words_per_record, dtype=np.int32)
    chunk_cols = np.empty(words_per_record, dtype=np.int32)
    at = 0
    with np.errstate(over="ignore"):  # int32 sums wrap modulo 2**32, as the torch ones do
        for seg in segments:
            words = seg.numpy().view(np.int32)
            for lo_row in range(0, words.shape[0], step):
                chunk = words[lo_row : lo_row + step]
                k = chunk.shape[0]
                for name, lo, hi in fields:
                    if hi - lo == 1:
                        rows[name][at : at + k] = chunk[:, lo]
                    else:
                        np.add.reduce(
                            chunk[:, lo:hi], axis=1, dtype=np.int32, out=rows[name][at : at + k]
                        )
                np.add.reduce(chunk, axis=0, dtype=np.int32, out=chunk_cols)
                cols += chunk_cols
                at += k
        pos = np.arange(first_token + 1, first_token + n_total + 1, dtype=np.int64)
        out: dict[str, int] = {}
        for name, lo, hi in fields:
            a = int(np.dot(rows[name].astype(np.int64), pos)) & _MASK32
            b = (
                int(np.dot(cols[lo:hi].astype(np.int64), np.arange(1, hi - lo + 1, dtype=np.int64)))
                & _MASK32
            )
            out[name] = (a << 32) | b
    return out


def _host_sums(
    runs: list[torch.Tensor], record: RecordLayout, chunk: int
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """PayloadSums.build's per-run sums of host-memory runs, with numpy (fewer passes and no
    temporaries where torch makes them): per field, each token's row sum and each chunk's
    column sums, int32 wrapped, as int64 tensors."""
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        f.name: ([], []) for f in record.fields
    }
    with np.errstate(over="ignore"):
        for run in runs:
            host = run.numpy()
            k = host.shape[0]
            full = k // chunk * chunk
            for f in record.fields:
                words = _words(host, f)
                rows, cols = out[f.name]
                rows.append(
                    torch.from_numpy(np.add.reduce(words, axis=1, dtype=np.int32).astype(np.int64))
                )
                if full:
                    blocks = words[:full].reshape(full // chunk, chunk, words.shape[1])
                    cols.append(torch.from_numpy(np.add.reduce(blocks, axis=1, dtype=np.int32)))
                if k > full:
                    cols.append(
                        torch.from_numpy(
                            np.add.reduce(words[full:], axis=0, dtype=np.int32)[None, :]
                        )
                    )
    return out


class PayloadSums:
    """Per-token row sums and per-chunk column sums of one payload's fields, from which the
    checksums of any token range follow without reading the payload again (except at most two
    partial chunks at the range's edges).

    The encoder builds this once, at Encode, while the bytes are hot; each round's checksums
    then cost microseconds instead of a pass over the round that would compete with its write
    for the CPU. Values equal `checksums(...)` of the same range exactly (tested)."""

    def __init__(
        self,
        record: RecordLayout,
        chunk: int,
        total: int,
        rows: dict[str, torch.Tensor],
        cols: dict[str, torch.Tensor],
    ):
        self.record = record
        self.chunk = chunk
        self.total = total
        self._rows = rows  # field -> int64 [total]: each token's row sum (int32, wrapped)
        self._cols = cols  # field -> int64 [ceil(total / chunk), w]: column sums of each chunk

    @classmethod
    def build(cls, runs: list[torch.Tensor], record: RecordLayout, chunk: int) -> PayloadSums:
        """From the payload's records as consecutive runs, each starting at a multiple of `chunk`
        tokens (block runs of a pool whose block size is `chunk`). Blocking: a worker thread."""
        total = sum(r.shape[0] for r in runs)
        host = _on_host(list(runs))

        def sums_of(
            part: list[torch.Tensor], _first: int
        ) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
            if host:
                return _host_sums(part, record, chunk)
            out = {}
            for f in record.fields:
                row_parts, col_parts = [], []
                for run in part:
                    words = _words(run, f)
                    k = words.shape[0]
                    row_parts.append(words.sum(dim=1, dtype=torch.int32).to(torch.int64))
                    full = k // chunk * chunk
                    if full:
                        col_parts.append(
                            words[:full]
                            .reshape(full // chunk, chunk, -1)
                            .sum(dim=1, dtype=torch.int32)
                        )
                    if k > full:
                        col_parts.append(words[full:].sum(dim=0, dtype=torch.int32).unsqueeze(0))
                out[f.name] = (row_parts, col_parts)
            return out

        # Parts start at chunk boundaries, so each part's chunks are whole chunks of the payload.
        parts = run_split(sums_of, list(runs), 0, align=chunk)
        rows = {
            f.name: torch.cat([t for p in parts for t in p[f.name][0]]).cpu() for f in record.fields
        }
        cols = {
            f.name: torch.cat([t for p in parts for t in p[f.name][1]]).to(torch.int64).cpu()
            for f in record.fields
        }
        return cls(record, chunk, total, rows, cols)

    def checksums(
        self, start: int, n: int, records: Callable[[int, int], list[torch.Tensor]]
    ) -> dict[str, int]:
        """Checksums of tokens [start, start+n); `records(lo, hi)` gives the records of tokens
        [lo, hi) (needed only for partial chunks at the edges)."""
        end = start + n
        if not 0 <= start <= end <= self.total:
            raise ValueError(
                f"range [{start}, {end}) is outside the payload of {self.total} tokens"
            )
        first_full = -(-start // self.chunk)
        last_full = end // self.chunk
        edges = []
        if first_full > last_full:  # inside one chunk
            edges.append((start, end))
        else:
            if start < first_full * self.chunk:
                edges.append((start, first_full * self.chunk))
            if last_full * self.chunk < end:
                edges.append((last_full * self.chunk, end))
        edge_records = [(lo, records(lo, hi)) for lo, hi in edges if hi > lo]
        pos = torch.arange(start + 1, end + 1, dtype=torch.int64)
        out: dict[str, int] = {}
        for f in self.record.fields:
            a = int((self._rows[f.name][start:end] * pos).sum()) & _MASK32
            col = (
                self._cols[f.name][first_full:last_full].sum(dim=0)
                if last_full > first_full
                else torch.zeros(self._cols[f.name].shape[1], dtype=torch.int64)
            )
            for _lo, segments in edge_records:
                for seg in segments:
                    col = col + _words(seg, f).sum(dim=0, dtype=torch.int32).to(torch.int64).cpu()
            cpos = torch.arange(1, col.shape[0] + 1, dtype=torch.int64)
            b = int((col * cpos).sum()) & _MASK32
            out[f.name] = (a << 32) | b
        return out
