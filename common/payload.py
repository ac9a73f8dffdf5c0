"""A received payload: token records in one or more segments, typed per field, releasable.

A single-round request is a view of the language pool (no copy) whose blocks go back to the pool
on `release()`; a multi-round request lives in a stash buffer. Consumers see the same interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from common.layout import RecordLayout


class Payload:
    """Records [total_tokens, record_bytes] of one request, as a list of segments."""

    def __init__(
        self,
        record: RecordLayout,
        segments: list[torch.Tensor],
        on_release: Callable[[], None] | None = None,
    ):
        self.record = record
        self.segments = segments
        self.total_tokens = sum(s.shape[0] for s in segments)
        self._on_release = on_release
        self.released = False

    def field(self, name: str) -> torch.Tensor:
        """The field as one [total_tokens, *per_token_shape] tensor (a copy when segmented)."""
        from common.pool import field_of

        f = self.record.field(name)
        parts = [field_of(s, f) for s in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def records(self, start: int, n_tokens: int) -> torch.Tensor:
        """A host copy of tokens [start, start + n_tokens) (uint8 [n_tokens, record_bytes])."""
        if start < 0 or n_tokens < 0 or start + n_tokens > self.total_tokens:
            raise ValueError(
                f"tokens [{start}, {start + n_tokens}) outside a payload of {self.total_tokens}"
            )
        out = torch.empty((n_tokens, self.record.record_bytes), dtype=torch.uint8)
        at, filled = 0, 0
        for seg in self.segments:
            a, b = max(start, at), min(start + n_tokens, at + seg.shape[0])
            if a < b:
                out[filled : filled + b - a].copy_(seg[a - at : b - at])
                filled += b - a
            at += seg.shape[0]
        return out

    def field_bytes(self, name: str):
        """Yield the field's bytes, C-contiguous little-endian, segment by segment."""
        f = self.record.field(name)
        for seg in self.segments:
            raw = seg[:, f.offset : f.offset + f.bytes_per_token]
            yield raw.contiguous().cpu().numpy().tobytes()

    def sha256(self) -> str:
        """The digest: every field in layout order, as contiguous [total, *shape] bytes."""
        h = hashlib.sha256()
        for f in self.record.fields:
            for chunk in self.field_bytes(f.name):
                h.update(chunk)
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return self.total_tokens * self.record.payload_bytes_per_token

    def release(self) -> None:
        """Give pool blocks back (idempotent)."""
        if self.released:
            return
        self.released = True
        self.segments = []
        if self._on_release is not None:
            cb, self._on_release = self._on_release, None
            cb()
