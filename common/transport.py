"""Mooncake Transfer Engine adapter (DESIGN §5): the only module that imports mooncake.

One `MooncakeTransport` per process: initialise with P2P handshake, register each pool slab once
at start-up, and write (src, dst, bytes) triples to a peer session in a worker thread (Mooncake
releases the GIL), so the event loop never blocks. A failed write raises `TransportError`.

Two ways to wait for a write (`wait`):
- `spin`: one `batch_transfer_sync_write`. Mooncake's binding busy-polls the batch's status until it
  completes, so the calling thread keeps a core at 100 % for the whole write (measured: 33 ms of
  CPU for a 25 ms, 58 MB write over TCP).
- `poll`: each triple is submitted with `transfer_submit_write` and its status checked with
  `transfer_check_status`, sleeping in between for a fortieth of the time the write has taken so
  far (at least POLL_STEP_S, at most POLL_MAX_S), so waking late costs a write at most ~2.5 % and
  a few wake-ups. The same write cost 19 ms of CPU. On hosts
  where cores are scarce (the TCP copy, checksums and the next request's encode share them) the
  core a spinning wait burns is taken from the write itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Sequence

from common.config import WRITE_WAITS
from common.errors import TransportError

log = logging.getLogger(__name__)

POLL_STEP_S = 30e-6
"""`poll`: the shortest sleep between status checks (Linux rounds it up to ~60-100 us)."""
POLL_MAX_S = 0.5e-3
"""`poll`: the longest sleep between status checks."""
_BAD_BATCH = (0, (1 << 64) - 1)  # transfer_submit_write's failures (0, or -1 as an unsigned id)


class MooncakeTransport:
    """A process's Mooncake engine and the memory it registered."""

    def __init__(self, host: str, protocol: str = "tcp", device: str = "", *, write_timeout_s: float | None = None,
                 wait: str = "poll"):
        if wait not in WRITE_WAITS:
            raise ValueError(f"wait={wait!r}: must be one of {WRITE_WAITS}")
        if protocol == "tcp":
            # Mooncake picks RDMA whenever a NIC is present unless told otherwise.
            os.environ["MC_FORCE_TCP"] = "1"
        if write_timeout_s is not None:
            # Read by the engine's constructor (sync write timeout, at least 5 s) and by its TCP
            # sessions (a connection with no progress for that long is dropped). The connection
            # must go first: a write that timed out must not still read from blocks we free.
            os.environ["MC_TRANSFER_TIMEOUT"] = str(max(5, math.ceil(write_timeout_s)))
            os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"] = str(max(1, math.floor(write_timeout_s / 2)))
        from mooncake.engine import TransferEngine  # imported late: heavy, and only at the edge

        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransportError(f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol!r}) returned {rc}")
        self.host = host
        self.protocol = protocol
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self.wait = wait
        # `poll` gives up on a write after this (Mooncake's own sync-write bound: the transfer
        # timeout plus one second per GiB); the TCP connection drops first (see above).
        self._timeout_s = float(max(5, math.ceil(write_timeout_s)) if write_timeout_s is not None
                                else os.environ.get("MC_TRANSFER_TIMEOUT", 30))
        self._registered: dict[int, int] = {}
        self._closed = False

    def register(self, address: int, length: int, location: str = "*") -> None:
        """Register [address, address+length) for remote writes; once per slab, before serving."""
        rc = self._engine.register_memory(address, length, location)
        if rc != 0:
            raise TransportError(f"Mooncake register_memory(0x{address:x}, {length}) returned {rc}")
        self._registered[address] = length

    def write_sync(self, session: str, triples: Sequence[tuple[int, int, int]], *, wait: str = "") -> None:
        """Write every (src, dst, bytes) triple to `session`, waiting as `wait` (default: the
        transport's) says; raise TransportError on failure, once no piece is in flight."""
        if not triples:
            return
        if (wait or self.wait) == "poll":
            return self._write_polled(session, triples)
        src = [t[0] for t in triples]
        dst = [t[1] for t in triples]
        lengths = [t[2] for t in triples]
        rc = self._engine.batch_transfer_sync_write(session, src, dst, lengths)
        if rc != 0:
            raise TransportError(f"Mooncake write of {sum(lengths)} bytes in {len(triples)} pieces to {session} returned {rc}")

    def _write_polled(self, session: str, triples: Sequence[tuple[int, int, int]]) -> None:
        total = sum(t[2] for t in triples)
        started = time.monotonic()
        deadline = started + self._timeout_s + total / (1 << 30)
        pending: list[int] = []
        problems: list[str] = []
        for src, dst, length in triples:
            batch = self._engine.transfer_submit_write(session, src, dst, length)
            if batch in _BAD_BATCH or batch < 0:
                problems.append(f"submitting {length} bytes failed")
                break  # nothing more is submitted; what was is still waited for below
            pending.append(batch)
        while pending:
            still = []
            for batch in pending:
                status = self._engine.transfer_check_status(batch)
                if status == 0:
                    still.append(batch)
                elif status < 0:
                    problems.append("a piece failed" if status == -1 else "a piece timed out")
            pending = still
            if not pending:
                break
            now = time.monotonic()
            if now > deadline:
                # Mooncake's own sync write gives up the same way: its TCP connection, dropped
                # after MC_TCP_PROGRESS_TIMEOUT_SEC without progress, no longer reads our blocks.
                problems.append(f"{len(pending)} piece(s) still running after {now - started:.1f} s")
                break
            time.sleep(min(POLL_MAX_S, max(POLL_STEP_S, (now - started) / 40)))
        if problems:
            raise TransportError(f"Mooncake write of {total} bytes in {len(triples)} pieces to {session} failed: "
                                 f"{'; '.join(problems)}")

    async def write(self, session: str, triples: Sequence[tuple[int, int, int]], *, wait: str = "") -> None:
        """`write_sync` in a worker thread."""
        await asyncio.to_thread(self.write_sync, session, triples, wait=wait)

    def close(self) -> None:
        """Unregister every slab; idempotent."""
        if self._closed:
            return
        self._closed = True
        for address in list(self._registered):
            rc = self._engine.unregister_memory(address)
            if rc != 0:
                log.warning("Mooncake unregister_memory(0x%x) returned %d", address, rc)
            del self._registered[address]


def memory_location(device: str) -> str:
    """Mooncake's location string for a pool on `device` ("cpu:0" or "cuda:N")."""
    if device.startswith("cuda"):
        return device if ":" in device else "cuda:0"
    return "cpu:0"
