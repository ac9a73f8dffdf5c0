"""Mooncake Transfer Engine adapter: the only module that imports mooncake.

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

The write fence (common/fence.py; docs/DESIGN.md): a write whose caller stops waiting is not
over. What this module relies on from Mooncake (its Python binding, `transfer_engine_py.cpp`,
and the TCP transport, 0.3.12 and later):
- `transfer_check_status` is final only when it returns 1 (COMPLETED) or -1 (FAILED); both free
  the piece's batch id. -2 (TIMEOUT) says a slice is older than Mooncake's slice timeout and
  still in flight: it is not final and frees nothing. 0 is "still running".
- With the TCP transport's acknowledged framing (protocol v2, both ends 0.3.12+), COMPLETED means
  the bytes were applied at the destination.
- The binding offers no way to abort a submitted piece, nor to free a batch id whose piece is not
  final. So a polled write that reaches its deadline keeps its unfinished pieces tracked: they go
  to a watcher thread (`_LateWatch`) that polls them until final, which frees their batch ids,
  and the `TransportError` raised carries them as `in_flight` (a `LateWrites`).
- `batch_transfer_sync_write` frees its batch when any piece fails or times out, even while
  other pieces still run, and then returns -1: after a failed `spin` write nothing can be
  followed, so its `in_flight` is a `LateWrites` that never settles (the fence holds the blocks
  until its `quarantine_max_s` bound).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence

from common.config import WRITE_WAITS
from common.errors import TransportError
from common.fence import LateWrites, WriteFence, run_tracked

log = logging.getLogger(__name__)

MOONCAKE_PORTS = (15000, 17000)
"""The range Mooncake picks its handshake and data ports in (MC_MIN_RPC_PORT / MC_MAX_RPC_PORT move
it): what a firewall or a Kubernetes NetworkPolicy must open between EPD hosts, and only there."""

POLL_STEP_S = 30e-6
"""`poll`: the shortest sleep between status checks (Linux rounds it up to ~60-100 us)."""
POLL_MAX_S = 0.5e-3
"""`poll`: the longest sleep between status checks."""
LATE_POLL_S = 0.01
"""How often the pieces left in flight by a write that gave up are checked again."""
_BAD_BATCH = (0, (1 << 64) - 1)  # transfer_submit_write's failures (0, or -1 as an unsigned id)


class MooncakeTransport:
    """A process's Mooncake engine and the memory it registered."""

    def __init__(
        self,
        host: str,
        protocol: str = "tcp",
        device: str = "",
        *,
        write_timeout_s: float | None = None,
        wait: str = "poll",
        engine=None,
    ):
        """`engine`: an object with Mooncake's `TransferEngine` Python API, already initialised;
        None (production) builds and initialises Mooncake's own. Tests inject faults with one."""
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
        if engine is None:
            from mooncake.engine import TransferEngine  # imported late: heavy, and only at the edge

            engine = TransferEngine()
            rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device)
            if rc != 0:
                raise TransportError(
                    f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol!r}) returned {rc}"
                )
        self._engine = engine
        self.host = host
        self.protocol = protocol
        self.handshake_port = self._engine.get_rpc_port()
        """The engine's handshake (RPC) port; it listens on every interface (docs/SECURITY.md)."""
        self.session = f"{host}:{self.handshake_port}"
        self.wait = wait
        self.timeout_s = float(
            max(5, math.ceil(write_timeout_s))
            if write_timeout_s is not None
            else os.environ.get("MC_TRANSFER_TIMEOUT", 30)
        )
        """`poll` stops waiting for a write after this plus one second per GiB (Mooncake's own
        sync-write bound); its pieces still running stay tracked (`late_pieces`)."""
        self._registered: dict[int, int] = {}
        self._closed = False
        self._late = _LateWatch(self._engine)

    def register(self, address: int, length: int, location: str = "*") -> None:
        """Register [address, address+length) for remote writes; once per slab, before serving."""
        rc = self._engine.register_memory(address, length, location)
        if rc != 0:
            raise TransportError(f"Mooncake register_memory(0x{address:x}, {length}) returned {rc}")
        self._registered[address] = length

    def write_sync(
        self, session: str, triples: Sequence[tuple[int, int, int]], *, wait: str = ""
    ) -> None:
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
            # Mooncake freed the batch, maybe with pieces still running: nothing left to follow.
            raise TransportError(
                f"Mooncake write of {sum(lengths)} bytes in {len(triples)} pieces to {session} returned {rc}",
                in_flight=LateWrites(0, sum(lengths), session, known=False),
            )

    def _write_polled(self, session: str, triples: Sequence[tuple[int, int, int]]) -> None:
        total = sum(t[2] for t in triples)
        started = time.monotonic()
        deadline = started + self.timeout_s + total / (1 << 30)
        pending: list[tuple[int, int]] = []  # (batch id, bytes) of pieces not final yet
        problems: list[str] = []
        for src, dst, length in triples:
            batch = self._engine.transfer_submit_write(session, src, dst, length)
            if batch in _BAD_BATCH or batch < 0:
                problems.append(f"submitting {length} bytes failed")
                break  # nothing more is submitted; what was is still waited for below
            pending.append((batch, length))
        while pending:
            still = []
            for batch, length in pending:
                status = self._engine.transfer_check_status(batch)
                if status in (
                    0,
                    -2,
                ):  # running, or running past Mooncake's slice timeout: not final
                    still.append((batch, length))
                elif status < 0:
                    problems.append(f"a piece of {length} bytes failed")
            pending = still
            if not pending:
                break
            now = time.monotonic()
            if now > deadline:
                # Stop waiting, not tracking: the pieces may still land (and read our blocks),
                # so they go to the watcher, and the caller fences their blocks until it is done.
                late = LateWrites(len(pending), sum(n for _, n in pending), session)
                self._late.follow([b for b, _ in pending], late)
                raise TransportError(
                    f"Mooncake write of {total} bytes in {len(triples)} pieces to {session} failed: "
                    f"{'; '.join([*problems, f'{len(pending)} piece(s) still running after {now - started:.1f} s'])}",
                    in_flight=late,
                )
            time.sleep(min(POLL_MAX_S, max(POLL_STEP_S, (now - started) / 40)))
        if problems:
            raise TransportError(
                f"Mooncake write of {total} bytes in {len(triples)} pieces to {session} failed: "
                f"{'; '.join(problems)}"
            )

    async def write(
        self,
        session: str,
        triples: Sequence[tuple[int, int, int]],
        *,
        wait: str = "",
        fence: WriteFence | None = None,
    ) -> None:
        """`write_sync` in a worker thread, tracked by `fence` (if given) until every piece is
        final, even when this call is cancelled or gives up first."""
        await run_tracked(lambda: self.write_sync(session, triples, wait=wait), fence)

    def read_sync(self, session: str, local_address: int, remote_address: int, length: int) -> None:
        """Read `length` bytes at `remote_address` of `session`'s registered memory into our
        registered `local_address` (Register's proof of possession). TransportError when the peer
        cannot be reached or refuses: its engine answers a read outside its registered memory with
        an error, so nothing is read that the peer did not register."""
        rc = self._engine.transfer_sync_read(session, local_address, remote_address, length)
        if rc != 0:
            raise TransportError(
                f"Mooncake read of {length} bytes at 0x{remote_address:x} from {session} returned {rc}"
            )

    def unregister(self, address: int) -> None:
        """Unregister one slab registered with `register` (e.g. a test fault's copy buffer)."""
        if self._registered.pop(address, None) is None:
            raise ValueError(f"0x{address:x} is not registered")
        rc = self._engine.unregister_memory(address)
        if rc != 0:
            log.warning("Mooncake unregister_memory(0x%x) returned %d", address, rc)

    @property
    def late_pieces(self) -> int:
        """Pieces of writes that gave up which are not final yet."""
        return self._late.pieces

    def close(self, late_timeout_s: float = 5.0) -> None:
        """Unregister every slab; idempotent. Pieces of writes that gave up get `late_timeout_s`
        to become final first (the services wait for their fences before this)."""
        if self._closed:
            return
        self._closed = True
        if not self._late.stop(late_timeout_s):
            log.warning(
                "Mooncake: %d piece(s) of writes that gave up are still not final; unregistering the "
                "memory anyway",
                self._late.pieces,
            )
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


class _LateWatch:
    """One thread, started on first use, that polls the pieces writes left behind until each is
    final (which frees its batch id) and settles their `LateWrites`."""

    def __init__(self, engine):
        self._engine = engine
        self._lock = threading.Lock()
        self._pieces: list[tuple[int, LateWrites]] = []
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    @property
    def pieces(self) -> int:
        with self._lock:
            return len(self._pieces)

    def follow(self, batches: list[int], late: LateWrites) -> None:
        with self._lock:
            self._pieces.extend((b, late) for b in batches)
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mooncake-late-writes", daemon=True
                )
                self._thread.start()
        log.warning(
            "Mooncake: %d piece(s) (%d bytes to %s) still running after the write gave up; their blocks "
            "stay fenced until they are final",
            len(batches),
            late.nbytes,
            late.session,
        )

    def _run(self) -> None:
        while True:
            with self._lock:
                pieces = list(self._pieces)
            if not pieces:
                with self._lock:
                    if not self._pieces:
                        self._idle.set()
                        self._thread = None
                        return
                continue
            for batch, late in pieces:
                status = self._engine.transfer_check_status(batch)
                if status in (1, -1):  # final: the binding freed the batch id
                    with self._lock:
                        self._pieces.remove((batch, late))
                    late.piece_final(status == 1)
            time.sleep(LATE_POLL_S)

    def stop(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for every followed piece to be final; True when none is left."""
        return self._idle.wait(timeout_s)
