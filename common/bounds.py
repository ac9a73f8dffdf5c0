"""Address validation of a planned round before any byte is written (docs/SECURITY.md).

The encoder writes into another process's memory through Mooncake, at addresses it computes
from what that process described at Register (base address, block count, record size) and the
blocks it sent at Init/Resume. A bug in planning, or a plan built from state that changed
underneath it, must fail the request, never write outside the request's blocks. `check_plan`
is the last gate before a write is submitted: every (src, dst, nbytes) triple must lie inside
the registered slab *and* inside the blocks allocated to this round, on both sides; the triples
must not overlap at the destination and must add up to exactly the round's bytes.

Pure integers (no torch, grpc or mooncake), so it is tested exhaustively and with hypothesis.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from common.plan import Triple


class OutOfBounds(ValueError):
    """A planned write (or a block id) outside what the peer registered or allocated."""


@dataclasses.dataclass(frozen=True)
class Slab:
    """A registered pool as addresses: `num_blocks` blocks of `block_bytes` bytes from `base`."""

    base: int
    num_blocks: int
    block_bytes: int
    name: str = "slab"
    """What the slab is in messages: 'source pool', 'destination pool of language X rank 0'."""

    @property
    def end(self) -> int:
        return self.base + self.num_blocks * self.block_bytes

    def describe(self) -> str:
        return f"{self.name} [0x{self.base:x}, 0x{self.end:x})"


def block_ranges(slab: Slab, blocks: Sequence[int]) -> list[tuple[int, int]]:
    """The byte ranges [lo, hi) of `blocks` in `slab`, sorted and merged where adjacent.
    OutOfBounds for a block id outside 0..num_blocks-1 (or a repeated one)."""
    ids = sorted(blocks)
    for i, b in enumerate(ids):
        if not 0 <= b < slab.num_blocks:
            raise OutOfBounds(
                f"block id {b} is outside the {slab.num_blocks} blocks of the {slab.name}"
            )
        if i and ids[i - 1] == b:
            raise OutOfBounds(
                f"block id {b} appears more than once in the {slab.name}'s allocation"
            )
    ranges: list[tuple[int, int]] = []
    for b in ids:
        lo = slab.base + b * slab.block_bytes
        hi = lo + slab.block_bytes
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def _inside(ranges: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one of the merged ranges."""
    i = bisect.bisect_right(starts, lo) - 1
    return i >= 0 and ranges[i][0] <= lo and hi <= ranges[i][1]


def check_plan(
    triples: Sequence[Triple],
    *,
    src: Slab,
    src_blocks: Sequence[int],
    dst: Slab,
    dst_blocks: Sequence[int],
    expected_bytes: int,
) -> None:
    """Raise OutOfBounds unless every triple reads inside `src_blocks` of `src` and writes inside
    `dst_blocks` of `dst`, no two triples write the same destination byte, and the triples move
    exactly `expected_bytes` bytes. The message names the triple and the range it left."""
    src_ranges, dst_ranges = block_ranges(src, src_blocks), block_ranges(dst, dst_blocks)
    src_starts, dst_starts = [r[0] for r in src_ranges], [r[0] for r in dst_ranges]
    total = 0
    # The common case costs a few comparisons per triple (it runs before every round's write);
    # the message is built only for a triple that fails.
    for i, triple in enumerate(triples):
        try:
            s, d, n = triple
        except (TypeError, ValueError):
            _explain(i, triples, src, src_ranges, src_starts, dst, dst_ranges, dst_starts)
        if not (
            type(s) is int
            and type(d) is int
            and type(n) is int
            and n > 0
            and _inside(src_ranges, src_starts, s, s + n)
            and _inside(dst_ranges, dst_starts, d, d + n)
        ):
            _explain(i, triples, src, src_ranges, src_starts, dst, dst_ranges, dst_starts)
        total += n
    if total != expected_bytes:
        raise OutOfBounds(
            f"the {len(triples)} writes move {total} bytes, the round has {expected_bytes}"
        )
    spans = sorted((d, d + n) for _, d, n in triples)
    for (_lo1, hi1), (lo2, _hi2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise OutOfBounds(f"two writes overlap in the {dst.describe()} at 0x{lo2:x}")


def _explain(
    i: int,
    triples: Sequence[Triple],
    src: Slab,
    src_ranges,
    src_starts,
    dst: Slab,
    dst_ranges,
    dst_starts,
) -> None:
    """Raise the OutOfBounds that says why triple i failed."""
    triple = triples[i]
    if (
        not isinstance(triple, tuple)
        or len(triple) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in triple)
    ):
        raise OutOfBounds(f"write {i}: {triple!r} is not an integer (src, dst, nbytes) triple")
    s, d, n = triple
    what = f"write {i} of {len(triples)} ({n} bytes from 0x{s:x} to 0x{d:x})"
    if n <= 0:
        raise OutOfBounds(f"{what}: its length must be > 0")
    for lo, hi, slab, ranges, starts, side in (
        (s, s + n, src, src_ranges, src_starts, "reads"),
        (d, d + n, dst, dst_ranges, dst_starts, "writes"),
    ):
        if lo < slab.base or hi > slab.end:
            raise OutOfBounds(f"{what} {side} [0x{lo:x}, 0x{hi:x}) outside the {slab.describe()}")
        if not _inside(ranges, starts, lo, hi):
            raise OutOfBounds(
                f"{what} {side} [0x{lo:x}, 0x{hi:x}) outside the round's blocks of the "
                f"{slab.describe()}"
            )
    raise OutOfBounds(f"{what}: refused")  # not reached: the fast check and this one agree
