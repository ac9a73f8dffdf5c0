"""CPU work on token records split over a few threads.

The services run torch single-threaded (`torch_threads`, common/config.py): OpenMP's spinning
worker threads stall the many small tensor operations of a transfer when cores are shared. Big
per-token work (filling a synthetic payload, checksumming a round, copying a round out) gets
its parallelism here instead: the token range is cut into `PARALLEL` consecutive parts, each
processed in a worker thread of one shared pool. torch and numpy release the GIL in these
loops, so the parts really run side by side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from typing import TypeVar

import torch

PARALLEL = max(1, min(4, os.cpu_count() or 1))
"""How many parts big work is split into (and the pool's size)."""

SPLIT_MIN_BYTES = 1 << 20
"""Work on fewer bytes than this stays in one piece: handing it to threads costs more."""

MEMORY_BOUND_SPLIT_BYTES = 32 << 20
"""Work bound by memory bandwidth (checksums of a received round, copying a round out) stays in
one worker thread up to this many bytes: a second thread adds little bandwidth, and each
hand-off costs 0.2-0.5 ms on a busy 2-vCPU host (measured: checksums of 1024 tokens of hidden
3584, 7.4 MB, took 0.5 ms in one thread and 0.7-0.9 ms in two)."""

T = TypeVar("T")
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="epd-split")


def nbytes(segments: list[torch.Tensor]) -> int:
    """Bytes in a list of tensors."""
    return sum(s.numel() * s.element_size() for s in segments)


def split_tokens(
    segments: list[torch.Tensor], first_token: int, parts: int, align: int = 1
) -> list[tuple[list[torch.Tensor], int]]:
    """Cut consecutive token segments into at most `parts` groups of about equal token counts,
    each (but the last) a multiple of `align` tokens: [(segments, first token of the group)]
    (views, no copies)."""
    total = sum(s.shape[0] for s in segments)
    per = max(1, -(-total // max(1, parts)))
    per = -(-per // align) * align
    groups: list[tuple[list[torch.Tensor], int]] = []
    current: list[torch.Tensor] = []
    room, start, pos = per, first_token, first_token
    for seg in segments:
        offset = 0
        while offset < seg.shape[0]:
            take = min(room, seg.shape[0] - offset)
            current.append(seg[offset : offset + take])
            offset += take
            pos += take
            room -= take
            if room == 0:
                groups.append((current, start))
                current, room, start = [], per, pos
    if current:
        groups.append((current, start))
    return groups


def run_split(
    work: Callable[[list[torch.Tensor], int], T],
    segments: list[torch.Tensor],
    first_token: int,
    parts: int = PARALLEL,
    align: int = 1,
) -> list[T]:
    """`work(group, first_token_of_group)` for each part, in parallel; results in token order.
    Blocking: call it from a worker thread, never from the event loop."""
    if nbytes(segments) < SPLIT_MIN_BYTES:
        parts = 1
    groups = split_tokens(segments, first_token, parts, align)
    if len(groups) <= 1:
        return [work(segs, first) for segs, first in groups]
    futures = [_pool.submit(work, segs, first) for segs, first in groups]
    return [f.result() for f in futures]


async def run_split_async(
    work: Callable[[list[torch.Tensor], int], T],
    segments: list[torch.Tensor],
    first_token: int,
    parts: int = PARALLEL,
    align: int = 1,
    min_split_bytes: int = SPLIT_MIN_BYTES,
) -> list[T]:
    """`run_split` from the event loop: the parts go straight to the worker threads (one hand-off
    each, where `asyncio.to_thread(run_split, ...)` makes two); one part below min_split_bytes."""
    if nbytes(segments) <= min_split_bytes:
        parts = 1
    groups = split_tokens(segments, first_token, parts, align)
    loop = asyncio.get_running_loop()
    return list(
        await asyncio.gather(
            *(loop.run_in_executor(_pool, work, segs, first) for segs, first in groups)
        )
    )
