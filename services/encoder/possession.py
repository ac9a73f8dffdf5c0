"""Register's proof of possession: a language rank proves, through the transfer engine itself,
that it controls the memory it asks the encoder to write into.

Without it a caller could describe any pool it read about (another instance's session and base
address from inspection, spelt as an alias of the same listener) and have the encoder write into
it. Comparing session spellings cannot close that; reading memory back can:

1. `Challenge` hands the caller a one-time random nonce for (identity, language_id, rank),
   valid for CHALLENGE_TTL_S (`Challenges`).
2. The rank puts the nonce into lane 0 of both of its pool's proof areas, right before its
   first block and right after its last, inside the memory it registered with the engine
   (common/layout.py `head_proof_address`, `proof_address`), and calls Register with it.
3. The encoder reads those bytes back with transfer-engine reads from the claimed session at
   both proof addresses of the claimed pool (`ProofReader`) and accepts the pool only when both
   match. A read never changes the claimed memory; a mismatch is PERMISSION_DENIED. Both ends,
   because one would let a caller stretch its claim from its own pool over a neighbouring pool
   of the same process (the end it owns proves, the other end lies in the neighbour).

The reads go through a transfer engine of their own (`proof_transport`), never the one that
writes payloads: Mooncake's TCP transport leaves a pooled connection unusable for the next
request after the peer rejected a read (an address outside its registered memory), and a
caller could otherwise make a victim's writes fail by registering bogus claims on its session
(measured: 10 of 120 writes failed after rejected reads on the same engine, 0 on a separate one).
The same quirk is why a failed read is tried PROOF_READ_ATTEMPTS times before it counts.

Only someone who can put bytes at that address in that process passes: the process itself, or
whoever can already write there through the unauthenticated data plane (docs/SECURITY.md).

Domain code: no grpc, no mooncake; the transport's `read_sync` is handed in.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence

import torch

from common.errors import (
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    TransportError,
    Unavailable,
    shown,
)
from common.layout import PROOF_AREA_BYTES, PROOF_LANE_BYTES, PROOF_LANES, PoolGeometry

log = logging.getLogger(__name__)

NONCE_BYTES = 32
CHALLENGE_TTL_S = 30.0
PROOF_READ_TIMEOUT_S = 10.0
"""A read whose peer accepts the connection but never answers blocks the engine's thread for
about a minute (its handshake timeout); Register gives up on it sooner, and the lane stays taken
until the thread returns."""
PROOF_READ_ATTEMPTS = 3
PROOF_LANES_PER_IDENTITY = 4
"""One identity cannot take every lane (each held up to a minute by a peer that never answers)."""


class Challenges:
    """Nonces handed out and not yet used, at most `per_identity` per identity (old ones expire)."""

    def __init__(
        self,
        per_identity: int,
        ttl_s: float = CHALLENGE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._per_identity = per_identity
        self._ttl_s = ttl_s
        self._clock = clock
        self._pending: dict[tuple[str, str, int], tuple[bytes, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, until) in self._pending.items() if until <= now]:
            del self._pending[key]

    def issue(self, principal: str, language_id: str, rank: int) -> bytes:
        """A fresh nonce for (principal, language_id, rank), replacing an unused older one."""
        self._expire()
        key = (principal, language_id, rank)
        if (
            key not in self._pending
            and sum(1 for p, _, _ in self._pending if p == principal) >= self._per_identity
        ):
            raise ResourceExhausted(
                f"Challenge for language_id {shown(language_id)} rank {rank}: this identity has "
                f"{self._per_identity} challenges outstanding (max_sessions_per_identity)"
            )
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._pending[key] = (nonce, self._clock() + self._ttl_s)
        return nonce

    def take(self, principal: str, language_id: str, rank: int, nonce: bytes, what: str) -> None:
        """Use up the nonce for (principal, language_id, rank): FailedPrecondition when none is
        outstanding or it expired, PermissionDenied when `nonce` is not it. Used once either way."""
        self._expire()
        entry = self._pending.pop((principal, language_id, rank), None)
        if not nonce:
            raise FailedPrecondition(
                f"{what}: proof_nonce is empty: call Challenge first, put its nonce into the "
                f"pool's proof area and send it with Register"
            )
        if entry is None:
            raise FailedPrecondition(
                f"{what}: no Challenge outstanding for this identity, language_id and rank "
                f"(none was asked for, it was used, or it expired after {self._ttl_s:.0f} s)"
            )
        if not hmac.compare_digest(entry[0], nonce):
            raise PermissionDenied(f"{what}: proof_nonce is not the nonce this encoder handed out")


class ProofReader:
    """Reads a claimed pool's proof lane back into one of its own lanes and compares. `lanes` is
    host memory registered with the engine behind `read_sync` (uint8 [PROOF_LANES, PROOF_LANE_BYTES])."""

    def __init__(
        self,
        read_sync: Callable[[str, int, int, int], None],
        lanes: torch.Tensor,
        timeout_s: float = PROOF_READ_TIMEOUT_S,
    ):
        if tuple(lanes.shape) != (PROOF_LANES, PROOF_LANE_BYTES) or lanes.dtype != torch.uint8:
            raise ValueError(f"proof lanes must be uint8 [{PROOF_LANES}, {PROOF_LANE_BYTES}]")
        self._lanes = lanes
        self._read_sync = read_sync
        self._timeout_s = timeout_s
        self._free_lanes = list(range(PROOF_LANES))
        self._lanes_by: collections.Counter[str] = collections.Counter()

    @staticmethod
    def new_lanes() -> torch.Tensor:
        """Host memory for the lanes, to be registered with the proof engine."""
        return torch.zeros((PROOF_LANES, PROOF_LANE_BYTES), dtype=torch.uint8)

    def _release(self, lane: int, principal: str) -> None:
        self._free_lanes.append(lane)
        self._lanes_by[principal] -= 1
        if not self._lanes_by[principal]:
            del self._lanes_by[principal]

    def _read(self, session: str, lane: int, remotes: Sequence[int], length: int) -> list[bytes]:
        """In a worker thread: read each of `remotes` into `lane` in turn, return what landed
        (copied while the lane is ours)."""
        local = self._lanes.data_ptr() + lane * PROOF_LANE_BYTES
        found = []
        for remote in remotes:
            self._lanes[lane].zero_()
            for attempt in range(PROOF_READ_ATTEMPTS):
                try:
                    self._read_sync(session, local, remote, length)
                    break
                except TransportError:
                    if attempt == PROOF_READ_ATTEMPTS - 1:
                        raise
                except (TypeError, ValueError, OverflowError) as e:  # the binding refused them
                    raise TransportError(
                        f"the engine refused the read: {type(e).__name__}"
                    ) from None
            found.append(bytes(self._lanes[lane, :length].numpy().tobytes()))
        return found

    async def verify(
        self, session: str, geometry: PoolGeometry, nonce: bytes, what: str, principal: str = ""
    ) -> None:
        """Returns when the nonce is at both `geometry.proof_address` (the pool's end) and
        `geometry.head_proof_address` (right before its start) in `session`'s memory;
        PermissionDenied when something else is there, Unavailable when it cannot be read."""
        ends = (("end", geometry.proof_address), ("start", geometry.head_proof_address))
        if geometry.head_proof_address < 0:
            raise PermissionDenied(
                f"{what}: base_address 0x{geometry.base_address:x} leaves no room for the "
                f"{PROOF_AREA_BYTES}-byte proof area before the pool: no memory of Mooncake "
                f"session {shown(session)} can hold its nonce there"
            )
        if self._lanes_by[principal] >= PROOF_LANES_PER_IDENTITY:
            raise Unavailable(
                f"{what}: this identity has {PROOF_LANES_PER_IDENTITY} proofs being read already; "
                f"try again"
            )
        if not self._free_lanes:
            raise Unavailable(f"{what}: {PROOF_LANES} proofs are being read already; try again")
        lane = self._free_lanes.pop()
        self._lanes_by[principal] += 1
        reading = asyncio.ensure_future(
            asyncio.to_thread(self._read, session, lane, [a for _, a in ends], len(nonce))
        )
        # The lane is ours until the engine's thread returns, even when we stop waiting for it.
        reading.add_done_callback(lambda _f: self._release(lane, principal))
        try:
            found = await asyncio.wait_for(asyncio.shield(reading), self._timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"{what}: reading the proof from Mooncake session {shown(session)} took longer than "
                f"{self._timeout_s:.0f} s"
            ) from None
        except TransportError as e:
            # The engine says the same (-1) for an unreachable session and for an address outside
            # the peer's registered memory: either way the pool cannot be confirmed.
            raise PermissionDenied(
                f"{what}: cannot read the proof back from Mooncake session {shown(session)} at "
                f"0x{geometry.proof_address:x} (the pool's end) and 0x{geometry.head_proof_address:x} "
                f"(right before its start): {e.message}"
            ) from None
        for (end, address), got in zip(ends, found):
            if not hmac.compare_digest(got, nonce):
                log.warning(
                    "%s: the proof at 0x%x (the pool's %s) of session %s does not match",
                    what,
                    address,
                    end,
                    session,
                )
                raise PermissionDenied(
                    f"{what}: the memory at Mooncake session {shown(session)}, address "
                    f"0x{address:x} (the claimed pool's {end}) does not hold this "
                    f"registration's nonce: the caller does not control that pool"
                )
