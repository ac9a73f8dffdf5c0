"""Test-only fault injection for Mooncake writes (docs/DESIGN.md, "Failure semantics").

A healthy loopback Mooncake never fails a write, so the encoder's handling of a failed,
slow or silently corrupted write cannot be provoked from outside. `FaultyTransport` wraps the
process's `MooncakeTransport` with the same interface (`session`, `register`, `write`,
`write_sync`, `close`) and misbehaves on purpose. The test launcher (tests/faults/launch.py,
`--transport-fault SPEC`) puts it around the encoder's data-plane transport through the seam of
services/parts.py; production never runs this code.

Spec: comma-separated `key=value`, keys may be combined:
- `fail_nth=K`        the K-th write (1-based) fails: nothing is written and `TransportError` is
                      raised, exactly as when `batch_transfer_sync_write` returns non-zero;
- `fail_fraction=P`   each write fails with probability P (0..1), drawn from a seeded RNG;
- `seed=S`            seed of that RNG (default 0), so a run is reproducible;
- `delay_s=D`         every write sleeps D seconds before it starts (a slow network). The sleep
                      happens in the worker thread that runs the write, like a slow Mooncake
                      call: the event loop is never blocked, and a write whose caller is
                      cancelled still runs to completion, as a real in-flight write would;
- `corrupt_nth=K`     the K-th write really happens, then some bytes of what it wrote are
                      flipped at the destination (see below): the language's checksum
                      verification must catch it;
- `late_nth=K`        the K-th write is reported failed at once (`TransportError` whose
                      `in_flight` is still running), but its bytes really land `late_s` seconds
                      later: a write the encoder gave up on that goes on landing (see below);
- `late_s=S`          how long after the report the late bytes land (default 2; with late_nth);
- `misplan_nth=K`     the K-th planned write (one per data rank per round, counted like
                      writes) has its first piece moved past its own end at the destination, as a
                      planning bug would: the encoder's address check (common/bounds.py) must
                      refuse it before anything is written (the request fails with `invalid`).

"Write" means one non-empty `write`/`write_sync` call, i.e. one `batch_transfer_sync_write`
(the encoder issues one per data rank per round). Writes are counted across the process, in
the order the calls are made on the event loop (the fate of a write is decided before it is
handed to a worker thread, so concurrent writes are numbered deterministically by call order).

How a late write works: when the K-th write is handed to its worker thread, the wrapper copies
the source bytes of every piece into a buffer of its own, registers that buffer with the
transport, and reports the write failed at once with `in_flight` = a `LateWrites` handle. A timer
thread then waits `late_s` seconds, writes the copy to the original destinations with the inner
transport (a real Mooncake write, so the bytes really land), unregisters the buffer and settles
the handle. The copy makes the late bytes those of the failed request even if its source blocks
were reused meanwhile (as they were before the write fence). Source pools in host memory only.

How corruption works: the destination is another process's memory, reachable only through
Mooncake, so the wrapper issues a second, small Mooncake write to the first triple's
destination address from a scratch buffer of its own. The scratch buffer holds the bitwise
complement of the bytes just written (read from the source when the source is host memory,
otherwise a fixed 0xA5 pattern), so every one of those bytes really changes. The scratch buffer
is registered with the transport when the wrapper is built, i.e. at start-up with the pools:
Mooncake writes only from registered memory (an RDMA source needs a memory region; the TCP
transport resolves the source against the local segment too), and registering on the write
path would be slow and would race with writes in flight.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Sequence

from common.config import ConfigError
from common.errors import TransportError
from common.fence import LateWrites, WriteFence, run_tracked

log = logging.getLogger(__name__)

SCRATCH_BYTES = 64
"""How many bytes a corruption flips (at most; fewer when the first triple is shorter)."""


@dataclasses.dataclass(frozen=True)
class TransportFaultSpec:
    """A parsed `transport_fault` setting."""

    fail_nth: int = 0
    fail_fraction: float = 0.0
    seed: int = 0
    delay_s: float = 0.0
    corrupt_nth: int = 0
    misplan_nth: int = 0
    late_nth: int = 0
    late_s: float = 2.0

    @classmethod
    def parse(cls, text: str) -> TransportFaultSpec:
        """Parse 'fail_nth=3,delay_s=0.1'; raise ConfigError naming `transport_fault`."""
        what = f"transport_fault={text!r}"
        known = [f.name for f in dataclasses.fields(cls)]
        values: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, eq, raw = (s.strip() for s in item.partition("="))
            if key not in known:
                raise ConfigError(f"{what}: unknown key {key!r} (known: {', '.join(known)})")
            if not eq or not raw:
                raise ConfigError(f"{what}: {key!r} needs a value ({key}=...)")
            if key in values:
                raise ConfigError(f"{what}: {key!r} is given twice")
            try:
                values[key] = (
                    float(raw) if key in ("fail_fraction", "delay_s", "late_s") else int(raw)
                )
            except ValueError:
                raise ConfigError(f"{what}: bad value for {key!r}: {raw!r}") from None
        spec = cls(**values)
        if min(spec.fail_nth, spec.corrupt_nth, spec.misplan_nth, spec.late_nth) < 0:
            raise ConfigError(
                f"{what}: fail_nth, corrupt_nth, misplan_nth and late_nth count writes from 1 (0 = off)"
            )
        if not 0.0 <= spec.late_s <= 3600.0:
            raise ConfigError(f"{what}: late_s must be in 0..3600")
        if "late_s" in values and not spec.late_nth:
            raise ConfigError(f"{what}: late_s needs late_nth (which write lands late)")
        if not 0.0 <= spec.fail_fraction <= 1.0:
            raise ConfigError(f"{what}: fail_fraction must be in 0..1")
        if not 0.0 <= spec.delay_s <= 3600.0:
            raise ConfigError(f"{what}: delay_s must be in 0..3600")
        return spec

    @property
    def active(self) -> bool:
        return bool(
            self.fail_nth
            or self.fail_fraction
            or self.delay_s
            or self.corrupt_nth
            or self.misplan_nth
            or self.late_nth
        )


@dataclasses.dataclass(frozen=True)
class _Fate:
    """What happens to one write, decided when it is issued."""

    number: int
    fail: str = ""  # why it fails ("" = it does not)
    corrupt: bool = False
    late: bool = False  # reported failed at once, lands late_s later


class FaultyTransport:
    """A `MooncakeTransport` whose writes fail, lag or get corrupted as the spec says."""

    def __init__(self, inner, spec: TransportFaultSpec | str):
        self._inner = inner
        self.spec = TransportFaultSpec.parse(spec) if isinstance(spec, str) else spec
        self._rng = random.Random(self.spec.seed)
        self._lock = threading.Lock()
        self._corrupt_lock = threading.Lock()
        self._host_regions: list[
            tuple[int, int]
        ] = []  # registered host memory: readable with ctypes
        self.writes = 0
        """Non-empty writes issued so far (each one numbered 1, 2, ...)."""
        self.failed: list[int] = []
        self.corrupted: list[int] = []
        self.late: list[int] = []
        """Writes reported failed whose bytes land later (late_nth)."""
        self.plans = 0
        """Planned writes seen by `plan_fault` so far."""
        self._scratch = None
        self._scratch_address = 0
        if self.spec.corrupt_nth:
            self._scratch = ctypes.create_string_buffer(SCRATCH_BYTES)
            self._scratch_address = ctypes.addressof(self._scratch)
            inner.register(self._scratch_address, SCRATCH_BYTES, "cpu:0")
        log.warning("test-only Mooncake write fault injection is ON: %s", self.spec)

    # ------------------------------------------------------------------ the transport interface

    @property
    def session(self) -> str:
        return self._inner.session

    def __getattr__(self, name):  # host, protocol, ...
        return getattr(self._inner, name)

    def register(self, address: int, length: int, location: str = "*") -> None:
        self._inner.register(address, length, location)
        if location.startswith("cpu"):
            self._host_regions.append((address, length))

    def write_sync(
        self, session: str, triples: Sequence[tuple[int, int, int]], *, wait: str = ""
    ) -> None:
        if not triples:
            return self._inner.write_sync(session, triples, wait=wait)
        self._apply(self._decide(), session, triples, wait)

    async def write(
        self,
        session: str,
        triples: Sequence[tuple[int, int, int]],
        *,
        wait: str = "",
        fence: WriteFence | None = None,
    ) -> None:
        """Like `MooncakeTransport.write`: the (possibly delayed) write runs in a worker thread,
        tracked by `fence` (a late write until its bytes landed)."""
        if not triples:
            return await self._inner.write(session, triples, wait=wait, fence=fence)
        fate = self._decide()  # on the event loop: writes are numbered in call order
        await run_tracked(lambda: self._apply(fate, session, triples, wait), fence)

    @property
    def late_pieces(self) -> int:
        return self._inner.late_pieces

    def close(self, late_timeout_s: float = 5.0) -> None:
        self._inner.close(
            late_timeout_s
        )  # unregisters the scratch buffer too; it stays alive with self

    # ------------------------------------------------------------------ faults

    @property
    def plan_fault(self):
        """The encoder's hook for `misplan_nth` (None when it is off: plans stay untouched)."""
        return self._misplan if self.spec.misplan_nth else None

    def _misplan(self, triples: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        with self._lock:
            self.plans += 1
            n = self.plans
        if n != self.spec.misplan_nth or not triples:
            return triples
        src, dst, length = triples[0]
        log.warning(
            "injected fault: planned write #%d: first piece moved from 0x%x to 0x%x (misplan_nth=%d)",
            n,
            dst,
            dst + length,
            n,
        )
        return [(src, dst + length, length), *triples[1:]]

    def _decide(self) -> _Fate:
        spec = self.spec
        with self._lock:
            self.writes += 1
            n = self.writes
            why = ""
            if spec.fail_nth and n == spec.fail_nth:
                why = f"fail_nth={spec.fail_nth}"
            if spec.fail_fraction and self._rng.random() < spec.fail_fraction:
                why = why or f"fail_fraction={spec.fail_fraction}, seed={spec.seed}"
            corrupt = not why and spec.corrupt_nth == n
            late = not why and spec.late_nth == n
        return _Fate(n, why, corrupt, late)

    def _apply(
        self, fate: _Fate, session: str, triples: Sequence[tuple[int, int, int]], wait: str = ""
    ) -> None:
        if self.spec.delay_s:
            time.sleep(self.spec.delay_s)
        if fate.fail:
            self.failed.append(fate.number)
            nbytes = sum(t[2] for t in triples)
            log.warning(
                "injected fault: write #%d (%d bytes to %s) fails (%s)",
                fate.number,
                nbytes,
                session,
                fate.fail,
            )
            raise TransportError(
                f"Mooncake write of {nbytes} bytes in {len(triples)} pieces to {session} returned -1 "
                f"(injected fault: write #{fate.number}, {fate.fail})"
            )
        if fate.late:
            raise self._land_late(fate.number, session, triples)
        self._inner.write_sync(session, triples, wait=wait)
        if fate.corrupt:
            self._corrupt(fate.number, session, triples[0])

    def _land_late(
        self, number: int, session: str, triples: Sequence[tuple[int, int, int]]
    ) -> TransportError:
        """Copy the write's source now, land the copy late_s seconds later; the error reporting
        the write failed, with the late landing as its `in_flight`."""
        nbytes = sum(t[2] for t in triples)
        if not all(self._is_host(src, length) for src, _dst, length in triples):
            raise TransportError(
                f"late_nth={self.spec.late_nth}: write #{number} does not read host memory "
                f"(the late-write fault copies host pools only)"
            )
        copy = ctypes.create_string_buffer(nbytes)
        base = ctypes.addressof(copy)
        pieces, offset = [], 0
        for src, dst, length in triples:
            ctypes.memmove(base + offset, src, length)
            pieces.append((base + offset, dst, length))
            offset += length
        self._inner.register(base, nbytes, "cpu:0")
        late = LateWrites(1, nbytes, session)
        self.late.append(number)

        def land() -> None:
            ok = False
            try:
                self._inner.write_sync(session, pieces)
                ok = True
                log.warning(
                    "injected fault: write #%d (%d bytes to %s) landed %.1f s after it was reported failed "
                    "(late_nth=%d)",
                    number,
                    nbytes,
                    session,
                    self.spec.late_s,
                    number,
                )
            except Exception as e:  # noqa: BLE001 - the handle must settle whatever happens
                log.warning("injected fault: the late landing of write #%d failed: %s", number, e)
            finally:
                self._inner.unregister(base)
                late.piece_final(ok)
                del copy_alive[:]  # the buffer may go now

        copy_alive = [copy]  # kept alive until the landing is done
        timer = threading.Timer(self.spec.late_s, land)
        timer.daemon = True
        timer.start()
        log.warning(
            "injected fault: write #%d (%d bytes in %d pieces to %s) reported failed; its bytes land in "
            "%.1f s (late_nth=%d)",
            number,
            nbytes,
            len(triples),
            session,
            self.spec.late_s,
            number,
        )
        return TransportError(
            f"Mooncake write of {nbytes} bytes in {len(triples)} pieces to {session} returned -1 "
            f"(injected fault: write #{number}, late_nth={number}: its bytes land "
            f"{self.spec.late_s} s later)",
            in_flight=late,
        )

    def _corrupt(self, number: int, session: str, triple: tuple[int, int, int]) -> None:
        src, dst, length = triple
        k = min(SCRATCH_BYTES, length)
        with self._corrupt_lock:  # one scratch buffer: fill and write it one corruption at a time
            if self._is_host(src, k):
                garbage = bytes(b ^ 0xFF for b in ctypes.string_at(src, k))
            else:
                garbage = b"\xa5" * k
            ctypes.memmove(self._scratch_address, garbage, k)
            self._inner.write_sync(session, [(self._scratch_address, dst, k)])
        self.corrupted.append(number)
        log.warning(
            "injected fault: write #%d to %s corrupted: %d bytes flipped at 0x%x",
            number,
            session,
            k,
            dst,
        )

    def _is_host(self, address: int, length: int) -> bool:
        return any(a <= address and address + length <= a + n for a, n in self._host_regions)
