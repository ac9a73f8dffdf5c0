"""Mooncake Transfer Engine adapter (DESIGN §5): the only module that imports mooncake.

One `MooncakeTransport` per process: initialise with P2P handshake, register each pool slab once
at start-up, and write (src, dst, bytes) triples to a peer session with one
`batch_transfer_sync_write` in a worker thread (it releases the GIL), so the event loop never
blocks. A non-zero return raises `TransportError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from typing import Sequence

from common.errors import TransportError

log = logging.getLogger(__name__)


class MooncakeTransport:
    """A process's Mooncake engine and the memory it registered."""

    def __init__(self, host: str, protocol: str = "tcp", device: str = "", *, write_timeout_s: float | None = None):
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
        self._registered: dict[int, int] = {}
        self._closed = False

    def register(self, address: int, length: int, location: str = "*") -> None:
        """Register [address, address+length) for remote writes; once per slab, before serving."""
        rc = self._engine.register_memory(address, length, location)
        if rc != 0:
            raise TransportError(f"Mooncake register_memory(0x{address:x}, {length}) returned {rc}")
        self._registered[address] = length

    def write_sync(self, session: str, triples: Sequence[tuple[int, int, int]]) -> None:
        """Write every (src, dst, bytes) triple to `session`; raise TransportError on failure."""
        if not triples:
            return
        src = [t[0] for t in triples]
        dst = [t[1] for t in triples]
        lengths = [t[2] for t in triples]
        rc = self._engine.batch_transfer_sync_write(session, src, dst, lengths)
        if rc != 0:
            raise TransportError(f"Mooncake write of {sum(lengths)} bytes in {len(triples)} pieces to {session} returned {rc}")

    async def write(self, session: str, triples: Sequence[tuple[int, int, int]]) -> None:
        """`write_sync` in a worker thread."""
        await asyncio.to_thread(self.write_sync, session, triples)

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
