"""Encoder-link wrappers for the fast protocol tier (fault injection through `Parts.wrap_link`).

A language rank reaches its encoder through a link (services/language/encoder_link.py); the
tier wraps the real gRPC link of each rank:

- `ForgingLink` rewrites the rank's Status stream (rank 0's: on its Encode's call) with a
  `Forgery`: statuses the encoder never sent, or sent differently (a forger on the control
  plane; a healthy encoder never does this);
- `PausingLink` holds the rank's K-th Resume until the test releases it, so a request can be
  caught between two rounds.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from common.states import StatusUpdate

Forgery = Callable[[StatusUpdate, list[StatusUpdate]], list[StatusUpdate]]
"""(the status the encoder sent, the statuses delivered so far) -> what the rank gets instead."""


class _ForgedStream:
    def __init__(self, inner, forge: Forgery, delivered: list[StatusUpdate]):
        self._inner = inner
        self._forge = forge
        self._delivered = delivered
        self._pending: collections.deque[StatusUpdate] = collections.deque()

    def __aiter__(self):
        return self

    async def __anext__(self) -> StatusUpdate:
        while not self._pending:
            st = await self._inner.__anext__()
            self._pending.extend(self._forge(st, list(self._delivered)))
        st = self._pending.popleft()
        self._delivered.append(st)
        return st

    def close(self) -> None:
        self._inner.close()


class _Wrapped:
    """Forwards everything it does not override to the real link."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ForgingLink(_Wrapped):
    """A link whose Status streams go through `forge` (see `Forgery`); `forge = None` leaves
    the streams opened from then on alone."""

    def __init__(self, inner, forge: Forgery | None):
        super().__init__(inner)
        self.forge = forge
        self.delivered: list[StatusUpdate] = []
        """Every status the rank was given on a forged stream, forged or not, in order."""

    def status(self, request_id: str, rank: int, await_transfer: bool = False):
        stream = self._inner.status(request_id, rank, await_transfer)
        if self.forge is None:
            return stream
        self.delivered.clear()
        return _ForgedStream(stream, self.forge, self.delivered)

    def encode_exchange(self, request, init=None):
        """Rank 0's statuses on its Encode's own call go through `forge` too."""
        exchange = self._inner.encode_exchange(request, init)
        if self.forge is not None:
            self.delivered.clear()
            exchange.statuses = _ForgedStream(exchange.statuses, self.forge, self.delivered)
        return exchange


class PausingLink(_Wrapped):
    """A link whose `pause_at`-th Resume (1-based) waits until `release` is set."""

    def __init__(self, inner, pause_at: int = 1):
        super().__init__(inner)
        self.pause_at = pause_at
        self.resumes = 0
        self.reached = asyncio.Event()
        """Set when the paused Resume is reached (the round before it was received)."""
        self.release = asyncio.Event()

    async def resume(self, *args: Any, **kwargs: Any) -> bool:
        self.resumes += 1
        if self.resumes == self.pause_at:
            self.reached.set()
            await self.release.wait()
        return await self._inner.resume(*args, **kwargs)
