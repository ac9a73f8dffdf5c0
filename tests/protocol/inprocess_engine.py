"""A fake Mooncake transfer engine for the fast protocol tier (tests/protocol): memcpy in one process.

`InProcessEngine` has the part of Mooncake's `TransferEngine` Python API that
`common.transport.MooncakeTransport` calls (given as its `engine=`), and nothing more:

    get_rpc_port, register_memory, unregister_memory, batch_transfer_sync_write,
    transfer_submit_write, transfer_check_status, transfer_sync_read

Every engine made in the process is listed in one registry under its session "host:port", the
port being a fake one unique to it (no socket is opened). A write or read moves bytes with
`ctypes.memmove` between memory the two engines registered, after the address checks Mooncake
makes: every source range inside memory registered on the engine that issues the call, every
destination range inside memory registered by the target session (for a read, the other way
round). A call to an unknown session, or with any range outside registered memory, fails the way
the binding reports it (-1, or a batch whose status is FAILED) and copies nothing — not even the
pieces of the same call that were in bounds.

Return values follow the binding (mooncake-integration/transfer_engine/transfer_engine_py.cpp):
`transfer_submit_write` returns a batch id, or -1 as an unsigned 64-bit id ((1 << 64) - 1) when
the target session cannot be opened; `transfer_check_status` returns 1 (COMPLETED) or -1 (FAILED)
once, freeing the batch id — the binding asserts on an id it does not know, so checking a freed
id raises here; the sync calls return 0 or -1. A piece is copied when it is submitted, so its
first status check is final.

It is a fake for the fast tier only: it lives under tests/, nothing in common/ or services/
imports it, and only a `services.parts.Parts` built in test code hands it to a transport.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from collections.abc import Sequence

__all__ = ["InProcessEngine", "sessions"]

INVALID_BATCH = (1 << 64) - 1
"""What the binding's `transfer_submit_write` returns (-1 as a uint64 batch id) on failure."""
ERR_INVALID_ARGUMENT = -1
ERR_ADDRESS_NOT_REGISTERED = -3  # Mooncake's codes for register/unregister refusals
ERR_ADDRESS_OVERLAPPED = -7

_FIRST_PORT = 20000
_lock = threading.RLock()
"""Guards the registry, every engine's regions and every copy: memory is never unregistered
while a copy into or out of it runs."""
_engines: weakref.WeakValueDictionary[str, InProcessEngine] = weakref.WeakValueDictionary()
_ports = itertools.count(_FIRST_PORT)


def sessions() -> list[str]:
    """The sessions of the engines alive in this process."""
    with _lock:
        return sorted(_engines)


def _inside(regions: dict[int, int], address: int, length: int) -> bool:
    return any(a <= address and address + length <= a + n for a, n in regions.items())


class InProcessEngine:
    """One fake engine; see the module docstring. Thread-safe, like the binding."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        with _lock:
            port = next(_ports)
            while f"{host}:{port}" in _engines:
                port = next(_ports)
            self.port = port
            self.session = f"{host}:{port}"
            _engines[self.session] = self
        self._regions: dict[int, int] = {}  # registered address -> length
        self._batches: dict[int, int] = {}  # batch id not yet reported final -> its status
        self._batch_ids = itertools.count(1)
        self.writes = 0
        """Pieces copied by this engine's writes."""
        self.refused: list[str] = []
        """Why each refused call was refused, in order."""

    # ------------------------------------------------------------------ memory

    def get_rpc_port(self) -> int:
        return self.port

    def register_memory(self, address: int, length: int, location: str = "*") -> int:
        del location
        with _lock:
            if address <= 0 or length <= 0:
                return ERR_INVALID_ARGUMENT
            if any(a < address + length and address < a + n for a, n in self._regions.items()):
                return ERR_ADDRESS_OVERLAPPED
            self._regions[address] = length
            return 0

    def unregister_memory(self, address: int) -> int:
        with _lock:
            if self._regions.pop(address, None) is None:
                return ERR_ADDRESS_NOT_REGISTERED
            return 0

    @property
    def registered(self) -> dict[int, int]:
        """A copy of the registered regions (address -> length)."""
        with _lock:
            return dict(self._regions)

    # ------------------------------------------------------------------ data plane

    def _check(self, target: str, pieces: Sequence[tuple[int, int, int]], *, read: bool) -> str:
        """Why these (local, remote, length) pieces may not move, or "" when all may. Call with
        _lock held."""
        peer = _engines.get(target)
        if peer is None:
            return f"no session {target!r}"
        for local, remote, length in pieces:
            if length <= 0:
                return f"a piece of {length} bytes"
            if not _inside(self._regions, local, length):
                side = "destination" if read else "source"
                return (
                    f"{side} [0x{local:x}, +{length}) is not in memory registered by {self.session}"
                )
            if not _inside(peer._regions, remote, length):
                side = "source" if read else "destination"
                return f"{side} [0x{remote:x}, +{length}) is not in memory registered by {target}"
        return ""

    def _move(self, target: str, pieces: Sequence[tuple[int, int, int]], *, read: bool) -> bool:
        """Check every piece, then copy every piece (or none); False when refused."""
        with _lock:
            why = self._check(target, pieces, read=read)
            if why:
                self.refused.append(why)
                return False
            for local, remote, length in pieces:
                if read:
                    ctypes.memmove(local, remote, length)
                else:
                    ctypes.memmove(remote, local, length)
                    self.writes += 1
            return True

    def batch_transfer_sync_write(
        self,
        target: str,
        buffers: Sequence[int],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
    ) -> int:
        if not len(buffers) == len(peer_buffer_addresses) == len(lengths):
            return -1
        pieces = list(zip(buffers, peer_buffer_addresses, lengths))
        return 0 if self._move(target, pieces, read=False) else -1

    def transfer_submit_write(
        self, target: str, buffer: int, peer_buffer_address: int, length: int
    ) -> int:
        with _lock:
            if target not in _engines:
                self.refused.append(f"no session {target!r}")
                return INVALID_BATCH  # the binding cannot open the segment: nothing submitted
            ok = self._move(target, [(buffer, peer_buffer_address, length)], read=False)
            batch = next(self._batch_ids)
            self._batches[batch] = 1 if ok else -1
            return batch

    def transfer_check_status(self, batch: int) -> int:
        with _lock:
            status = self._batches.pop(batch, None)
        if status is None:
            # The binding LOG_ASSERTs (aborts) on a batch id it does not hold: a caller bug.
            raise AssertionError(
                f"transfer_check_status({batch}): unknown or already final batch id"
            )
        return status

    def transfer_sync_read(
        self, target: str, buffer: int, peer_buffer_address: int, length: int
    ) -> int:
        return 0 if self._move(target, [(buffer, peer_buffer_address, length)], read=True) else -1

    @property
    def open_batches(self) -> int:
        """Batch ids submitted and not yet reported final."""
        with _lock:
            return len(self._batches)

    def __repr__(self) -> str:
        return f"InProcessEngine({self.session}, {len(self._regions)} region(s))"
