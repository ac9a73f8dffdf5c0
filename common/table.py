"""Live transfers plus a bounded history of finished ones, for lookups and inspection.

Entries are any object with `request_id` and `state`; a finished entry moves to the history,
which keeps the last `history_size` and forgets older ones, so nothing outlives its request
except this bounded record.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from common.errors import AlreadyExists, NotFound, shown
from common.states import TransferState


class Entry(Protocol):
    """What the table reads of an entry (the key it is filed under is given separately)."""

    @property
    def state(self) -> TransferState: ...


T = TypeVar("T", bound=Entry)


class TransferTable(Generic[T]):
    def __init__(self, history_size: int):
        self._live: dict[str, T] = {}
        self._history: collections.OrderedDict[str, T] = collections.OrderedDict()
        self._history_size = history_size
        self._awaited: dict[str, list[asyncio.Future]] = {}  # `appear` calls waiting for an id

    def add(self, request_id: str, entry: T) -> None:
        if request_id in self._live:
            raise AlreadyExists(f"request_id {shown(request_id)} is already in use")
        # A finished request's id may be reused; the new transfer replaces the old record.
        self._history.pop(request_id, None)
        self._live[request_id] = entry
        for fut in self._awaited.pop(request_id, ()):
            if not fut.done():
                fut.set_result(None)

    async def appear(self, request_id: str, timeout: float) -> None:
        """Return once `request_id` is known (at once if it is), or after `timeout` seconds."""
        if self.get(request_id) is not None:
            return
        fut = asyncio.get_running_loop().create_future()
        waiting = self._awaited.setdefault(request_id, [])
        waiting.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:  # timed out or cancelled: leave nothing behind
            if fut in waiting:
                waiting.remove(fut)
                if not waiting and self._awaited.get(request_id) is waiting:
                    del self._awaited[request_id]

    def live_get(self, request_id: str) -> T | None:
        return self._live.get(request_id)

    def get(self, request_id: str) -> T | None:
        return self._live.get(request_id) or self._history.get(request_id)

    def require(self, request_id: str) -> T:
        entry = self.get(request_id)
        if entry is None:
            raise NotFound(f"unknown request_id {shown(request_id)}")
        return entry

    def finish(self, request_id: str, entry: T) -> None:
        """Move a finished entry from the live table to the bounded history."""
        if self._live.get(request_id) is entry:
            del self._live[request_id]
        if self._history_size > 0:
            self._history[request_id] = entry
            self._history.move_to_end(request_id)
            while len(self._history) > self._history_size:
                self._history.popitem(last=False)

    @property
    def live(self) -> list[T]:
        return list(self._live.values())

    @property
    def history(self) -> list[T]:
        return list(self._history.values())

    def select(self, states: Iterable[TransferState] = (), limit: int = 0) -> list[T]:
        """Live entries first (oldest first), then history (newest first), filtered by state."""
        wanted = set(states)
        out = []
        for entry in [*self._live.values(), *reversed(self._history.values())]:
            if wanted and entry.state not in wanted:
                continue
            out.append(entry)
            if limit and len(out) >= limit:
                break
        return out
