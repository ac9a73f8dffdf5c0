"""Which encoder serves a request: the language instance's live view of its encoders
and the selection policy. Domain code: no grpc, no mooncake — services/language/encoders.py
feeds the views from health checks and GetPool/GetDiagnostics polls.

- `least-loaded` (default): among the available encoders, the one with the fewest transfers in
  flight — the larger of what the encoder itself reports (every language instance's transfers)
  and what this instance has sent it since (its own, counted at once, so a burst between two
  polls spreads too) — then the fewest allocations waiting for source blocks, then the largest
  free share of the source pool; ties go round-robin.
  With images, an encoder that holds some of the request's images comes first (the most of
  them; among equals, the least loaded), unless it has more than AFFINITY_MAX_EXTRA_LOAD
  transfers in flight beyond the least-loaded candidate: a popular image must not pile every
  request onto one encoder. What an encoder holds is this instance's own record
  (`ImageAffinity`): every encoder caches each image it encodes, so the images this instance
  had encoded there recently, up to a bound, stand for what it holds. The record can be wrong
  (the encoder evicted them, restarted, or another instance filled it); a wrong guess costs one
  vision-tower pass, never a wrong payload.
- `round-robin`: the next available encoder after the last one picked.

An encoder is available when its last health check said SERVING, it was reachable, and it is
not draining. `pick(exclude=...)` leaves out encoders already tried (failover).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Sequence

POLICIES = ("least-loaded", "round-robin")
AFFINITY_MAX_EXTRA_LOAD = 4
"""How many more transfers in flight than the least-loaded candidate an encoder holding the
request's images may have and still be preferred."""
AFFINITY_IMAGES = 4096
"""Images `ImageAffinity` remembers (least recently sent forgotten first)."""


@dataclasses.dataclass
class EncoderView:
    """What this language instance knows of one encoder."""

    index: int
    address: str
    available: bool = False
    """SERVING and reachable at the last look."""
    registered: bool = False
    """This rank's Register succeeded (rank 0: the front door only picks registered encoders)."""
    refused: bool = False
    """The encoder refused our Register (a layout mismatch): it is never used."""
    free_blocks: int = 0
    used_blocks: int = 0
    waiters: int = 0
    live_transfers: int = 0
    """Transfers live on the encoder at the last poll (every language instance's)."""
    inflight: int = 0
    """This instance's requests on the encoder right now (updated at once, not polled)."""
    inflight_at_poll: int = 0
    """`inflight` when `live_transfers` was polled: the part of it that was ours."""
    retired: bool = False
    """A DNS name that turned into several addresses, each now an encoder of its own: never picked again."""
    last_error: str = ""
    picked: int = 0
    """Requests sent to it (inspection, demo summary)."""

    @property
    def load(self) -> int:
        """Transfers in flight on the encoder: the polled count, corrected by what we started or
        ended since the poll (never below what we ourselves have in flight)."""
        return max(self.inflight, self.live_transfers + self.inflight - self.inflight_at_poll)

    @property
    def free_share(self) -> float:
        total = self.free_blocks + self.used_blocks
        return self.free_blocks / total if total else 0.0

    @property
    def selectable(self) -> bool:
        return self.available and self.registered and not self.retired


class ImageAffinity:
    """Which encoders this instance recently had encode which images (by `image_digest`)."""

    def __init__(self, capacity: int = AFFINITY_IMAGES):
        self.capacity = capacity
        self._where: OrderedDict[bytes, set[int]] = OrderedDict()

    def remember(self, encoder: int, digests: Iterable[bytes]) -> None:
        """`encoder` encoded these images (its cache now holds their rows)."""
        for digest in digests:
            self._where.setdefault(digest, set()).add(encoder)
            self._where.move_to_end(digest)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)

    def held(self, digests: Sequence[bytes]) -> dict[int, int]:
        """Encoder index -> how many of these images it is thought to hold."""
        counts: dict[int, int] = {}
        for digest in dict.fromkeys(digests):
            for encoder in self._where.get(digest, ()):
                counts[encoder] = counts.get(encoder, 0) + 1
        return counts


class EncoderSelector:
    """Picks an encoder for each request; see the module docstring."""

    def __init__(self, policy: str = "least-loaded"):
        if policy not in POLICIES:
            raise ValueError(f"encoder_policy={policy!r}: must be one of {POLICIES}")
        self.policy = policy
        self._next = 0  # round-robin cursor (also the tie-break of least-loaded)

    def pick(
        self,
        views: Sequence[EncoderView],
        exclude: Iterable[int] = (),
        held: dict[int, int] | None = None,
    ) -> EncoderView | None:
        """The encoder for the next request, or None when none is available. `held`: encoder
        index -> images of the request it holds (`ImageAffinity.held`)."""
        excluded = set(exclude)
        n = len(views)
        if n == 0:
            return None
        # Candidates in round-robin order starting at the cursor.
        order = [views[(self._next + k) % n] for k in range(n)]
        candidates = [v for v in order if v.selectable and v.index not in excluded]
        if not candidates:
            return None
        if self.policy == "round-robin":
            chosen = candidates[0]
        else:
            # min() keeps the first of equals: the round-robin order breaks ties.
            chosen = min(candidates, key=lambda v: (v.load, v.waiters, -v.free_share))
            holders = [
                v
                for v in candidates
                if (held or {}).get(v.index) and v.load <= chosen.load + AFFINITY_MAX_EXTRA_LOAD
            ]
            if holders:
                chosen = min(
                    holders,
                    key=lambda v: (-(held or {})[v.index], v.load, v.waiters, -v.free_share),
                )
        self._next = (views.index(chosen) + 1) % n
        return chosen
