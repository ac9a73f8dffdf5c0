"""Image rows a language rank keeps after a request, so a repeated image is not sent again.

`HeldImages` is a rank's store: the records of each image's span in a verified payload, keyed by
the image's key (sha256 of the encoder's model fingerprint and the image bytes, the same key the
encoder computes), bounded by --embedding-cache-bytes (least recently used given up first). Its
M-RoPE positions are kept moved to start at 0: an image's rows do not depend on where it sits in
a prompt, its positions only by an offset (ImageSpan.first_position).

`ImageReuse` is one receive's part in it:
- before the Init, the rank claims the rows it holds of the request's images (`HeldImages.claim`):
  the claim holds references, so an eviction after it cannot take rows from a request in flight,
  and an eviction before it means the rank did not claim them and receives them;
- the Init names the claimed keys; the encoder writes none of the rows that every data rank
  claimed and marks them reused in its statuses (ImageSpan.reused);
- before a round (or a part of one) is verified, the rank fills the reused rows that fall into it
  from its claim, positions moved to the request's, and verifies the whole round against the
  encoder's checksums as always: a wrong fill fails the request like a wrong write;
- after a verified payload, the rows of every image it received are kept (`ImageReuse.keep`).
Nothing is kept from a payload that failed or was not verified, and a receive that fails its
integrity check gives up the rows it reused (`ImageReuse.forget_reused`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from common.layout import RecordLayout
from common.payload import Payload
from common.pool import field_of
from common.states import ImageSpan, StatusUpdate, reused_in
from services.models.embedding_cache import CacheEvent, EmbeddingCache, image_key

if TYPE_CHECKING:
    from services.language.receiver import ReceiveTask

log = logging.getLogger(__name__)

POSITIONS = "mrope_positions"  # the one field whose values depend on where an image sits
MAX_PROPOSED = 8
"""Images of one request whose reuse rank 0 proposes to the other ranks (the admission carries
their keys; the rest of a request's images are received)."""


class HeldImages:
    """One rank's kept image rows (host memory), at most `capacity_bytes`; 0 keeps none."""

    def __init__(
        self, capacity_bytes: int, record: RecordLayout, on_event: CacheEvent | None = None
    ):
        self.record = record
        self.rows = EmbeddingCache(capacity_bytes, on_event)
        self._positions = next((f for f in record.fields if f.name == POSITIONS), None)

    @property
    def enabled(self) -> bool:
        return self.rows.capacity_bytes > 0

    @staticmethod
    def keys(fingerprint: str, digests: Sequence[bytes]) -> list[str]:
        """The key of each image (by its `image_digest`) under the encoder whose model has
        `fingerprint` ("" when that encoder has no vision model: no key, nothing to reuse)."""
        return [image_key(fingerprint, d) for d in digests] if fingerprint else []

    def claim(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The rows held of `keys` (each looked up once, counted as a hit or a miss)."""
        claimed: dict[str, torch.Tensor] = {}
        if not self.enabled:
            return claimed
        for key in dict.fromkeys(keys):
            rows = self.rows.get(key)
            if rows is not None:
                claimed[key] = rows
        return claimed

    def keep(self, span: ImageSpan, records: torch.Tensor) -> None:
        """Keep an image's records (uint8 [tokens, record_bytes], a copy this store may change),
        positions moved to start at 0."""
        if self._positions is not None and span.first_position:
            pos = field_of(records, self._positions)
            pos -= torch.tensor(span.first_position, dtype=pos.dtype)
        self.rows.put(span.key, records)

    def place(
        self, span: ImageSpan, rows: torch.Tensor, runs: Sequence[torch.Tensor], at: int
    ) -> None:
        """Write rows[at : at + len(runs)] of a held image into pool runs (uint8 views), positions
        moved to the span's."""
        for run in runs:
            k = run.shape[0]
            run.copy_(rows[at : at + k])
            if self._positions is not None and span.first_position:
                pos = field_of(run, self._positions)
                pos += torch.tensor(span.first_position, dtype=pos.dtype)
            at += k


class ImageReuse:
    """One receive's claimed rows: what its Init names, and the fill of reused rows per round."""

    def __init__(self, store: HeldImages, claimed: dict[str, torch.Tensor]):
        self.store = store
        self.claimed = claimed
        self.spans: tuple[ImageSpan, ...] | None = None
        self._filled_to = 0  # tokens before this are filled (or not reused)

    @property
    def keys(self) -> list[str]:
        return list(self.claimed)

    @property
    def reused_tokens(self) -> int:
        return sum(s.tokens for s in self.spans or () if s.reused)

    def reused_in(self, lo: int, hi: int) -> int:
        """Reused tokens among payload tokens [lo, hi)."""
        return reused_in(self.spans or (), lo, hi)

    def check(self, task: ReceiveTask, st: StatusUpdate) -> None:
        """The encoder's image spans, checked once (and held to afterwards): in order, inside the
        payload, and reused only where this rank claimed the rows, of the same length."""
        if self.spans is not None:
            if st.images and st.images != self.spans:
                task.reject(f"request {task.request_id} rank {task.rank}: the image spans changed")
            return
        end = 0
        for span in st.images:
            problem = ""
            if span.start < end or span.end > st.total_tokens or span.tokens < 1:
                problem = (
                    f"tokens [{span.start}, {span.end}) overlap an earlier image or leave the "
                    f"payload of {st.total_tokens} tokens"
                )
            elif span.reused and span.key not in self.claimed:
                problem = f"marked reused, but this rank did not say it holds key {span.key[:16]}"
            elif span.reused and self.claimed[span.key].shape[0] != span.tokens:
                problem = (
                    f"marked reused with {span.tokens} tokens, the rows held have "
                    f"{self.claimed[span.key].shape[0]}"
                )
            elif span.first_position and len(span.first_position) != 3:
                problem = f"first_position {list(span.first_position)} is not (t, h, w)"
            if problem:
                task.reject(
                    f"request {task.request_id} rank {task.rank}: images[{span.image}]: {problem}"
                )
            end = span.end
        self.spans = st.images

    async def fill(self, task: ReceiveTask, st: StatusUpdate, handled: int, upto: int) -> None:
        """Fill the reused rows among the round's tokens [0, upto) (payload tokens handled + ...)
        into the round's blocks, before anything of them is verified or copied out."""
        self.check(task, st)
        lo, hi = max(self._filled_to, handled), handled + upto
        self._filled_to = max(self._filled_to, hi)
        work = [
            (span, a, b)
            for span in self.spans or ()
            if span.reused
            for a, b in [(max(lo, span.start), min(hi, span.end))]
            if a < b
        ]
        if not work:
            return
        assert task.blocks is not None  # the round's blocks

        def place() -> None:
            for span, a, b in work:
                runs = task.pool.runs(task.blocks or [], a - handled, b - a)
                self.store.place(span, self.claimed[span.key], runs, a - span.start)

        await asyncio.to_thread(place)

    def forget_reused(self) -> None:
        """The receive failed its integrity check: give up the rows it reused, in case they were
        what was wrong (the next request with the image receives them again)."""
        for span in self.spans or ():
            if span.reused:
                self.store.rows.discard(span.key)

    async def keep(self, payload: Payload) -> None:
        """Keep the rows of every image this verified payload brought (the reused ones are held)."""
        fresh = [s for s in self.spans or () if not s.reused and s.key]
        if not fresh or not self.store.enabled:
            return

        def keep() -> None:
            for span in fresh:
                self.store.keep(span, payload.records(span.start, span.tokens))

        await asyncio.to_thread(keep)
