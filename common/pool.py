"""Block pool: one slab of token records and the asyncio allocator handing out its blocks
(docs/DESIGN.md, 'Pools and token records').

`BlockAllocator` is pure bookkeeping over block ids (no torch): FIFO waiters, exact or partial
requests, timeouts and cancellation that never leak blocks, and a preference for contiguous runs
of free blocks so that rounds coalesce into few (src, dst, bytes) triples.

Blocks a peer may still write into (a transfer whose end could not be confirmed with the
encoder) can be put in quarantine: neither free nor handed out, counted apart, until the caller
releases them into the pool (services/language/receiver.py decides when).

`BlockPool` owns the slab, shaped [num_blocks, block_size, record_bytes] uint8, allocated once
(it is registered with the transfer engine before serving), and offers typed per-field views and
run-wise copies in and out of an allocation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import torch

from common.errors import ResourceExhausted
from common.layout import (
    PROOF_AREA_BYTES,
    PROOF_LANE_BYTES,
    PROOF_LANES,
    FieldLayout,
    PoolGeometry,
    RecordLayout,
)
from common.plan import token_runs

log = logging.getLogger(__name__)

OnChange = Callable[[int, int], None]
"""Called as on_change(used, free) after every allocation, free or quarantine change (quarantined
blocks count as neither)."""


class _Waiter:
    __slots__ = ("n", "partial_ok", "future", "priority")

    def __init__(
        self, n: int, partial_ok: bool, future: asyncio.Future[list[int]], priority: bool = False
    ):
        self.n = n
        self.partial_ok = partial_ok
        self.future = future
        self.priority = priority

    @property
    def min_blocks(self) -> int:
        """Fewest free blocks that let this waiter proceed."""
        return 1 if self.partial_ok else self.n


class BlockAllocator:
    """Allocator over block ids 0..num_blocks-1 with FIFO waiters.

    Free space is kept as runs of consecutive free blocks ([start, end) in two dicts), so best-fit
    and greedy choices cost O(number of runs), and a free merges with its neighbours in O(1) per
    freed run. Must be used from a single event loop thread.
    """

    def __init__(self, num_blocks: int, *, on_change: OnChange | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self._num_blocks = num_blocks
        self._on_change = on_change
        self._is_free = bytearray(b"\x01") * num_blocks  # per-block flag, for validating frees
        self._free_count = num_blocks
        self._quarantined: set[int] = (
            set()
        )  # taken out of the pool: a late write may still land there
        self._run_end: dict[int, int] = {0: num_blocks}  # start -> end (exclusive)
        self._run_start: dict[int, int] = {num_blocks: 0}  # end -> start
        self._waiters: collections.deque[_Waiter] = collections.deque()

    # -- state ---------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def free_count(self) -> int:
        return self._free_count

    @property
    def used_count(self) -> int:
        """Blocks handed out (quarantined blocks are not counted: see `quarantined_count`)."""
        return self._num_blocks - self._free_count - len(self._quarantined)

    @property
    def quarantined_count(self) -> int:
        return len(self._quarantined)

    @property
    def waiters(self) -> int:
        """Number of queued alloc() calls (not counting ones cancelled but not yet cleaned up)."""
        return sum(1 for w in self._waiters if not w.future.done())

    def free_runs(self) -> list[tuple[int, int]]:
        """Runs of free blocks as sorted (start, length) pairs (for tests and diagnostics)."""
        return sorted((s, e - s) for s, e in self._run_end.items())

    # -- allocation ----------------------------------------------------------------------------

    def try_alloc(self, n: int) -> list[int] | None:
        """Exactly n blocks now, or None (also None while others wait: never jump the queue)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._serve()  # drops cancelled heads so they do not block this call
        if self._waiters or n > self._free_count:
            return None
        return self._take(n)

    async def alloc(
        self,
        n: int,
        *,
        timeout: float | None,
        partial_ok: bool = False,
        label: str = "",
        priority: bool = False,
    ) -> list[int]:
        """Wait (FIFO) for n blocks; with partial_ok, for at least one, taking min(n, free).

        `priority` waiters (resumes of transfers already under way) queue ahead of the others
        (FIFO among themselves): a big initial allocation at the head must not stall the
        transfers whose progress is what frees blocks.

        Raises ResourceExhausted at once if n can never be satisfied, or after `timeout` seconds.
        Cancellation while waiting leaves no trace: the waiter is removed and any blocks already
        handed to it are returned to the pool.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > self._num_blocks and not partial_ok:
            raise ResourceExhausted(
                f"{label or 'alloc'}: {n} blocks requested but the pool has only {self._num_blocks} blocks"
            )
        waiter = _Waiter(n, partial_ok, asyncio.get_running_loop().create_future(), priority)
        self._serve()
        ahead = sum(1 for w in self._waiters if w.priority or not priority)
        if not ahead and self._free_count >= waiter.min_blocks:
            return self._take(min(n, self._free_count))

        if priority:
            self._waiters.insert(sum(1 for w in self._waiters if w.priority), waiter)
        else:
            self._waiters.append(waiter)
        timer = None
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                max(timeout, 0.0), self._expire, waiter, label, timeout
            )
        try:
            return await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Blocks were handed over just before the cancel landed: give them back.
                self._release(fut.result())
            self._leave(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: _Waiter, label: str, timeout: float) -> None:
        if waiter.future.done():
            return
        waiter.future.set_exception(
            ResourceExhausted(
                f"{label or 'alloc'}: timed out after {timeout}s waiting for {waiter.n} blocks "
                f"({self._free_count} free of {self._num_blocks}, {self.waiters} other waiters"
                f"{f', {len(self._quarantined)} quarantined' if self._quarantined else ''})"
            )
        )
        self._leave(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        """Drop a waiter from the queue and re-check the others (it may have blocked the head)."""
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # already served and popped
        self._serve()

    def _serve(self) -> None:
        """Hand blocks to waiters in FIFO order while the head can be satisfied."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled/expired but not yet removed
                self._waiters.popleft()
                continue
            if self._free_count < head.min_blocks:
                break
            self._waiters.popleft()
            head.future.set_result(self._take(min(head.n, self._free_count)))

    # -- freeing -------------------------------------------------------------------------------

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks; all are validated first, so a bad call changes nothing."""
        blocks = list(blocks)
        self._validate_held(blocks, "free")
        if not blocks:
            return
        self._release(blocks)

    def _validate_held(self, blocks: list[int], what: str) -> None:
        """Every id a block handed out (not free, not quarantined), no repeats; else ValueError."""
        seen: set[int] = set()
        for b in blocks:
            if not isinstance(b, int) or isinstance(b, bool):
                raise ValueError(f"{what}: block id {b!r} is not an int")
            if not 0 <= b < self._num_blocks:
                raise ValueError(
                    f"{what}: block id {b} is outside the pool (0..{self._num_blocks - 1})"
                )
            if self._is_free[b] or b in seen:
                raise ValueError(
                    f"{what}: block {b} is free" + (" (double free)" if what == "free" else "")
                )
            if b in self._quarantined:
                raise ValueError(
                    f"{what}: block {b} is already quarantined"
                    + (" (release_quarantine returns it)" if what == "free" else "")
                )
            seen.add(b)

    # -- quarantine ----------------------------------------------------------------------------

    def quarantine(self, blocks: Iterable[int]) -> None:
        """Take allocated blocks out of circulation instead of freeing them: a peer may still
        write into them, so they must not be handed to anyone else. They stay neither free nor
        used until `release_quarantine`. All ids are validated first (a bad call changes nothing)."""
        blocks = list(blocks)
        self._validate_held(blocks, "quarantine")
        self._quarantined.update(blocks)
        if blocks:
            self._notify()

    def release_quarantine(self, blocks: Iterable[int]) -> None:
        """Return quarantined blocks to the pool (waiters are served). Validated first."""
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"release_quarantine: repeated block ids in {sorted(blocks)}")
        for b in blocks:
            if b not in self._quarantined:
                raise ValueError(f"release_quarantine: block {b!r} is not quarantined")
        if not blocks:
            return
        self._quarantined.difference_update(blocks)
        self._release(blocks)

    def _release(self, blocks: list[int]) -> None:
        """Free validated blocks, then wake waiters."""
        for start, length in _consecutive_runs(sorted(blocks)):
            self._insert_run(start, start + length)
        self._notify()
        self._serve()

    # -- free-run bookkeeping ------------------------------------------------------------------

    def _insert_run(self, start: int, end: int) -> None:
        self._is_free[start:end] = b"\x01" * (end - start)
        self._free_count += end - start
        # Coalesce with the free runs touching either side.
        left = self._run_start.pop(start, None)
        if left is not None:
            del self._run_end[left]
            start = left
        right = self._run_end.pop(end, None)
        if right is not None:
            del self._run_start[right]
            end = right
        self._run_end[start] = end
        self._run_start[end] = start

    def _take_from_run(self, start: int, k: int) -> list[int]:
        """Take the lowest k blocks of the free run beginning at `start`."""
        end = self._run_end.pop(start)
        del self._run_start[end]
        if start + k < end:
            self._run_end[start + k] = end
            self._run_start[end] = start + k
        self._is_free[start : start + k] = bytes(k)
        self._free_count -= k
        return list(range(start, start + k))

    def _take(self, n: int) -> list[int]:
        """Take n free blocks (caller checked n <= free), preferring contiguous runs."""
        # Best fit: the smallest run that holds all n, lowest start on ties.
        best: tuple[int, int] | None = None
        for start, end in self._run_end.items():
            length = end - start
            if length >= n and (best is None or (length, start) < best):
                best = (length, start)
        if best is not None:
            out = self._take_from_run(best[1], n)
        else:
            # No single run is big enough: take the largest runs first, so the allocation has
            # as few runs as possible.
            out = []
            for length, neg_start in sorted(
                ((e - s, -s) for s, e in self._run_end.items()), reverse=True
            ):
                k = min(length, n - len(out))
                out.extend(self._take_from_run(-neg_start, k))
                if len(out) == n:
                    break
        self._notify()
        return out

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.used_count, self._free_count)
        except Exception:  # a metrics hook must never corrupt allocator state
            log.exception("BlockAllocator on_change hook failed")


def _consecutive_runs(sorted_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive ids in an ascending list."""
    runs: list[tuple[int, int]] = []
    for b in sorted_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


class BlockPool:
    """The slab of token records for one process, and the allocator over its blocks."""

    def __init__(
        self,
        record: RecordLayout,
        block_size: int,
        num_blocks: int,
        device: str = "cpu",
        *,
        on_change: OnChange | None = None,
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self._record = record
        self._block_size = block_size
        self._num_blocks = num_blocks
        # Allocated once: the transfer engine registers this exact memory before serving. A
        # proof area on each side of the blocks (Register's proof of possession, common/layout.py).
        slab_bytes = num_blocks * block_size * record.record_bytes
        self._memory = torch.zeros(
            PROOF_AREA_BYTES + slab_bytes + PROOF_AREA_BYTES, dtype=torch.uint8, device=device
        )
        end = PROOF_AREA_BYTES + slab_bytes
        self.slab = self._memory[PROOF_AREA_BYTES:end].view(
            num_blocks, block_size, record.record_bytes
        )
        self._proofs = (
            self._memory[:PROOF_AREA_BYTES].view(PROOF_LANES, PROOF_LANE_BYTES),
            self._memory[end:].view(PROOF_LANES, PROOF_LANE_BYTES),
        )
        self._proof_lock: asyncio.Lock | None = None  # made on first use, in the running loop
        self._flat = self.slab.view(num_blocks * block_size, record.record_bytes)
        self.allocator = BlockAllocator(num_blocks, on_change=on_change)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def record(self) -> RecordLayout:
        return self._record

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def device(self) -> torch.device:
        return self.slab.device

    @property
    def base_address(self) -> int:
        return self.slab.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.slab.numel()

    @property
    def registered_address(self) -> int:
        """Where the memory the transfer engine registers starts: the head proof area."""
        return self._memory.data_ptr()

    @property
    def registered_bytes(self) -> int:
        """What the transfer engine registers: the blocks and the proof areas around them."""
        return self._memory.numel()

    @property
    def geometry(self) -> PoolGeometry:
        return PoolGeometry(
            self._record, self._block_size, self._num_blocks, base_address=self.base_address
        )

    # -- proof area ----------------------------------------------------------------------------

    def write_proof(self, lane: int, data: bytes) -> None:
        """Put `data` (at most PROOF_LANE_BYTES) at the start of a proof lane of both proof
        areas, zero the rest."""
        if len(data) > PROOF_LANE_BYTES:
            raise ValueError(f"proof data of {len(data)} bytes exceeds a lane's {PROOF_LANE_BYTES}")
        row = torch.zeros(PROOF_LANE_BYTES, dtype=torch.uint8)
        if data:
            row[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for area in self._proofs:
            area[lane].copy_(row)
        if self._memory.is_cuda:
            torch.cuda.synchronize(
                self._memory.device
            )  # visible to the engine's reads before we answer

    @contextlib.asynccontextmanager
    async def proving(self, nonce: bytes) -> AsyncIterator[None]:
        """Register's proof of possession on the language side: the nonce sits in lane 0 of both
        proof areas while the encoder reads it back, one registration at a time (a rank registers
        with every encoder at once)."""
        if self._proof_lock is None:
            self._proof_lock = asyncio.Lock()
        async with self._proof_lock:
            self.write_proof(0, nonce)
            try:
                yield
            finally:
                self.write_proof(0, b"")

    # -- views ---------------------------------------------------------------------------------

    def field_view(self, name: str) -> torch.Tensor:
        """Typed strided view of one field over the whole pool: [num_blocks, block_size, *shape]."""
        field = self._record.field(name)
        view = _typed(self.slab[..., field.offset : field.offset + field.bytes_per_token], field)
        return view.view(self._num_blocks, self._block_size, *field.spec.per_token_shape)

    def runs(self, blocks: Sequence[int], start: int, n_tokens: int) -> list[torch.Tensor]:
        """uint8 [k, record_bytes] views (no copy) of tokens [start, start+n_tokens), one per slab run."""
        self._check_blocks(blocks)
        return [
            self._flat[rec : rec + k]
            for rec, k in token_runs(blocks, self._block_size, start, n_tokens)
        ]

    def copy_out(self, blocks: Sequence[int], start: int, n_tokens: int, out: torch.Tensor) -> None:
        """Copy tokens [start, start+n_tokens) into `out` (uint8 [n_tokens, record_bytes], any device)."""
        self._check_records(out, n_tokens, "out")
        pos = 0
        for run in self.runs(blocks, start, n_tokens):
            out[pos : pos + run.shape[0]].copy_(run)
            pos += run.shape[0]

    def copy_in(self, blocks: Sequence[int], start: int, records: torch.Tensor) -> None:
        """Copy `records` (uint8 [n, record_bytes]) into tokens [start, start+n) of the allocation."""
        n_tokens = records.shape[0] if records.dim() >= 1 else -1
        self._check_records(records, n_tokens, "records")
        pos = 0
        for run in self.runs(blocks, start, n_tokens):
            run.copy_(records[pos : pos + run.shape[0]])
            pos += run.shape[0]

    def _check_blocks(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if not 0 <= b < self._num_blocks:
                raise ValueError(f"block id {b} is outside the pool (0..{self._num_blocks - 1})")

    def _check_records(self, t: torch.Tensor, n_tokens: int, what: str) -> None:
        want = (n_tokens, self._record.record_bytes)
        if t.dtype != torch.uint8 or tuple(t.shape) != want:
            raise ValueError(
                f"{what} must be a uint8 tensor of shape {list(want)}, got {t.dtype} {list(t.shape)}"
            )

    # -- allocator delegation ------------------------------------------------------------------

    def try_alloc(self, n: int) -> list[int] | None:
        return self.allocator.try_alloc(n)

    async def alloc(
        self,
        n: int,
        *,
        timeout: float | None,
        partial_ok: bool = False,
        label: str = "",
        priority: bool = False,
    ) -> list[int]:
        return await self.allocator.alloc(
            n, timeout=timeout, partial_ok=partial_ok, label=label, priority=priority
        )

    def free(self, blocks: Iterable[int]) -> None:
        self.allocator.free(blocks)


def field_of(records: torch.Tensor, field: FieldLayout) -> torch.Tensor:
    """Typed view [k, *per_token_shape] of one field of uint8 [k, record_bytes] records.

    A view when the records' memory allows it; otherwise (e.g. a misaligned slice) a copy.
    """
    k = records.shape[0]
    raw = records[:, field.offset : field.offset + field.bytes_per_token]
    try:
        typed = _typed(raw, field)
    except ValueError:
        typed = _typed(raw.contiguous(), field)
    return typed.view(k, *field.spec.per_token_shape)


def _typed(raw: torch.Tensor, field: FieldLayout) -> torch.Tensor:
    """Reinterpret the last (byte) dimension of `raw` as the field's dtype."""
    dtype = getattr(torch, field.spec.dtype)
    try:
        return raw.view(dtype)
    except RuntimeError as e:
        # E.g. an 8-byte dtype at an offset that is only 4-aligned.
        raise ValueError(
            f"field {field.name!r} (offset {field.offset}, {field.spec.dtype}) cannot be viewed in place: {e}"
        ) from e
