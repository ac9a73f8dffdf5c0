"""Pure round planning: which byte ranges to copy for one round.

A pool is a slab of token-major records cut into blocks of `block_size` records, so token t of an
allocation (block list B) lives at record index ``B[t // S] * S + t % S`` of its slab. A round
copies a token range of a source allocation onto a token range of a destination allocation; it
becomes one (src_address, dst_address, nbytes) triple per run that is contiguous on both sides.

No torch, grpc or mooncake here: these are plain integers, so the planner can be tested
exhaustively and shared by the transfer path (addresses) and the pool (slab views).
"""

from __future__ import annotations

from collections.abc import Sequence

Triple = tuple[int, int, int]
"""(src_address, dst_address, nbytes)."""

Run = tuple[int, int]
"""(first record index in the slab, number of records)."""


def blocks_for_tokens(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens (ceil division)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-tokens // block_size)


def token_runs(
    blocks: Sequence[int], block_size: int, start: int, n_tokens: int, *, side: str = ""
) -> list[Run]:
    """Maximal slab-contiguous runs of tokens [start, start+n_tokens) of an allocation.

    Returns (record_index, length) pairs in token order; consecutive block ids are merged, so a
    fully contiguous allocation yields one run. Cost is per block touched, not per token.
    """
    where = f"{side} " if side else ""
    if block_size < 1:
        raise ValueError(f"{where}block_size must be >= 1, got {block_size}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if start < 0:
        raise ValueError(f"{where}start must be >= 0, got {start}")
    capacity = len(blocks) * block_size
    if start + n_tokens > capacity:
        raise ValueError(
            f"{where}token range [{start}, {start + n_tokens}) exceeds the allocation's capacity "
            f"{capacity} ({len(blocks)} blocks x {block_size})"
        )
    runs: list[Run] = []
    t, end = start, start + n_tokens
    while t < end:
        bi, off = divmod(t, block_size)
        k = min(block_size - off, end - t)
        rec = blocks[bi] * block_size + off
        if runs and runs[-1][0] + runs[-1][1] == rec:
            # Next block id follows the previous one in the slab: extend instead of splitting.
            runs[-1] = (runs[-1][0], runs[-1][1] + k)
        else:
            runs.append((rec, k))
        t += k
    return runs


def plan_round(
    *,
    src_base: int,
    src_blocks: Sequence[int],
    src_block_size: int,
    src_start: int,
    dst_base: int,
    dst_blocks: Sequence[int],
    dst_block_size: int,
    dst_start: int,
    n_tokens: int,
    record_bytes: int,
) -> list[Triple]:
    """Triples copying src tokens [src_start, +n_tokens) onto dst tokens [dst_start, +n_tokens).

    One triple per maximal run contiguous on both sides; total bytes == n_tokens * record_bytes.
    """
    if record_bytes < 1:
        raise ValueError(f"record_bytes must be >= 1, got {record_bytes}")
    src = token_runs(src_blocks, src_block_size, src_start, n_tokens, side="src")
    dst = token_runs(dst_blocks, dst_block_size, dst_start, n_tokens, side="dst")
    triples: list[Triple] = []
    # Two-pointer walk: each piece ends at whichever side's run ends first.
    i = j = 0
    si, sn = src[0] if src else (0, 0)
    di, dn = dst[0] if dst else (0, 0)
    while i < len(src):
        k = min(sn, dn)
        s_addr = src_base + si * record_bytes
        d_addr = dst_base + di * record_bytes
        nbytes = k * record_bytes
        # Each side's runs are already maximal, so this merge rarely fires; it keeps the
        # "maximal on both sides" guarantee independent of how the runs were cut.
        if (
            triples
            and triples[-1][0] + triples[-1][2] == s_addr
            and triples[-1][1] + triples[-1][2] == d_addr
        ):
            ps, pd, pn = triples[-1]
            triples[-1] = (ps, pd, pn + nbytes)
        else:
            triples.append((s_addr, d_addr, nbytes))
        si, sn, di, dn = si + k, sn - k, di + k, dn - k
        if sn == 0:
            i += 1
            if i < len(src):
                si, sn = src[i]
        if dn == 0:
            j += 1
            if j < len(dst):
                di, dn = dst[j]
    return triples


def uncovered(lo: int, hi: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [lo, hi) outside every [a, b) of `covered` (sorted, non-overlapping), in order:
    the token ranges a round writes when some of its tokens are filled by the receiver itself."""
    parts: list[tuple[int, int]] = []
    at = lo
    for a, b in covered:
        if b <= at or a >= hi:
            continue
        if a > at:
            parts.append((at, a))
        at = max(at, b)
    if at < hi:
        parts.append((at, hi))
    return parts
