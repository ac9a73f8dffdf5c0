"""Test-only fault injection for language ranks (the launcher's `--fault`, tests/faults/launch.py),
so tests can provoke what cannot be arranged from outside: a lagging or repeating Status stream,
a nearly full pool, a consumer that holds its payload.

Spec: comma-separated `key=value`; `rank=N` limits it to one rank (default: every rank).
- `status_lag_s=0.05`  deliver every status this much later (a rank whose view lags);
- `status_dup=1`       deliver every status twice (repeats must be no-ops);
- `hold_blocks=90`     take this many pool blocks at start-up and never give them back;
- `forget_images=1`    the rank keeps no image rows (as if each was evicted just before it
                       claimed it): rank 0's proposal to reuse them finds it without them;
- `hold_payload_s=3`   the consumer holds each delivered payload this long (a view of the pool,
                       as a prefill would), then hashes it again: a payload that changed meanwhile
                       (a late write landed in its blocks) fails the request with DATA_LOSS.
"""

from __future__ import annotations

import asyncio
import dataclasses

from common import errors
from common.config import ConfigError


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    rank: int | None = None
    status_lag_s: float = 0.0
    status_dup: bool = False
    hold_blocks: int = 0
    hold_payload_s: float = 0.0
    forget_images: bool = False

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        values: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, raw = item.partition("=")
            try:
                if key == "rank":
                    values["rank"] = int(raw)
                elif key == "status_lag_s":
                    values["status_lag_s"] = float(raw)
                elif key == "status_dup":
                    values["status_dup"] = raw not in ("0", "false", "")
                elif key == "hold_blocks":
                    values["hold_blocks"] = int(raw)
                elif key == "hold_payload_s":
                    values["hold_payload_s"] = float(raw)
                elif key == "forget_images":
                    values["forget_images"] = raw not in ("0", "false", "")
                else:
                    raise ConfigError(f"fault={text!r}: unknown key {key!r}")
            except ValueError:
                raise ConfigError(f"fault={text!r}: bad value for {key!r}: {raw!r}") from None
        return cls(**values)

    def applies_to(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank


class LaggingStatus:
    """Wraps a Status stream: every status later, and/or twice."""

    def __init__(self, inner, lag_s: float, dup: bool):
        self._inner = inner
        self._lag_s = lag_s
        self._dup = dup
        self._repeat = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._repeat is not None:
            st, self._repeat = self._repeat, None
            return st
        st = await self._inner.__anext__()
        if self._lag_s:
            await asyncio.sleep(self._lag_s)
        if self._dup:
            self._repeat = st
        return st

    def close(self) -> None:
        self._inner.close()


class FaultyLink:
    """An EncoderLink whose Status streams lag or repeat."""

    def __init__(self, inner, spec: FaultSpec):
        self._inner = inner
        self._spec = spec

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def status(self, request_id: str, rank: int, await_transfer: bool = False):
        return LaggingStatus(
            self._inner.status(request_id, rank, await_transfer),
            self._spec.status_lag_s,
            self._spec.status_dup,
        )

    def encode_exchange(self, request, init=None):
        """Rank 0's statuses on its Encode's own call lag or repeat too."""
        exchange = self._inner.encode_exchange(request, init)
        exchange.statuses = LaggingStatus(
            exchange.statuses, self._spec.status_lag_s, self._spec.status_dup
        )
        return exchange


class HoldingConsumer:
    """A prefill consumer that holds each payload `hold_s` seconds first, as a long prefill
    would, and fails the request (DATA_LOSS) if the payload's bytes changed meanwhile."""

    def __init__(self, inner, hold_s: float, rank: int):
        self._inner = inner
        self._hold_s = hold_s
        self._rank = rank

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def consume(self, payload):
        if payload is not None:
            before = await asyncio.to_thread(payload.sha256)
            await asyncio.sleep(self._hold_s)
            after = await asyncio.to_thread(payload.sha256)
            if after != before:
                raise errors.IntegrityError(
                    f"rank {self._rank}: the payload changed while the consumer held it for "
                    f"{self._hold_s} s (sha256 {before[:16]}... -> {after[:16]}...)"
                )
        return await self._inner.consume(payload)
