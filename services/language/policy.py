"""Initial allocation policies (docs/DESIGN.md, 'Reservation policies'): how many tokens to reserve
before the size is known.

- `fixed`: always `initial_tokens` (8192 by default);
- `hint`: the client's `expected_tokens` when given, else `initial_tokens`;
- `adaptive`: a running high quantile (p90) of recent request totals, clamped to
  [adaptive_min_tokens, adaptive_max_tokens]; `initial_tokens` until enough history exists;
- `auto` (size-first): nothing is reserved until the encoder says the payload's size
  (EncodeRequest.announce_size), then exactly that (`sized_tokens`); a payload larger than the
  pool gets `initial_tokens` and resume rounds.
Every answer is clamped to the pool's capacity, so the first allocation can always succeed.
"""

from __future__ import annotations

import collections
import math

from common.config import ALLOC_POLICIES


class AllocationPolicy:
    def __init__(
        self,
        kind: str,
        initial_tokens: int,
        pool_tokens: int,
        *,
        min_tokens: int = 1,
        max_tokens: int = 1 << 62,
        window: int = 256,
        quantile: float = 0.9,
    ):
        if kind not in ALLOC_POLICIES:
            raise ValueError(f"alloc_policy={kind!r}: must be one of {', '.join(ALLOC_POLICIES)}")
        self.kind = kind
        self.initial = initial_tokens
        self.pool_tokens = pool_tokens
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.quantile = quantile
        self._recent: collections.deque[int] = collections.deque(maxlen=window)

    def initial_tokens(self, expected_tokens: int = 0) -> int:
        want = self.initial
        if self.kind == "hint" and expected_tokens > 0:
            want = expected_tokens
        elif self.kind == "adaptive" and len(self._recent) >= 8:
            ordered = sorted(self._recent)
            q = ordered[min(len(ordered) - 1, math.ceil(self.quantile * len(ordered)) - 1)]
            want = max(self.min_tokens, min(self.max_tokens, q))
        return max(1, min(want, self.pool_tokens))

    @property
    def size_first(self) -> bool:
        """Reserve only once the encoder said the payload's size (`auto`)."""
        return self.kind == "auto"

    def sized_tokens(self, total_tokens: int) -> int:
        """What `auto` reserves for a payload of `total_tokens`: all of it when the pool can hold
        it, else the default reservation (the rest comes in resume rounds)."""
        if 0 < total_tokens <= self.pool_tokens:
            return total_tokens
        return max(1, min(self.initial, self.pool_tokens))

    def max_initial_tokens(self) -> int:
        """The largest answer `initial_tokens` or `sized_tokens` can give (the bound of early
        reservations)."""
        if self.kind in ("hint", "auto"):
            return self.pool_tokens
        want = max(self.initial, self.max_tokens) if self.kind == "adaptive" else self.initial
        return max(1, min(want, self.pool_tokens))

    def observe(self, total_tokens: int) -> None:
        """Feed the size of a finished request (used by `adaptive`)."""
        self._recent.append(total_tokens)
