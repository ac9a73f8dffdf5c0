"""A content-addressed, byte-bounded LRU cache of per-image vision-tower rows.

The key is a SHA-256 of the image's bytes and of everything that changes the rows: the model
(its identity, configuration and a fingerprint of its weights), the image processor's settings,
the dtype and the hidden size (`fingerprint`, computed once per model). An image's rows do not
depend on where it sits in a prompt (M-RoPE positions and text embeddings are computed per
request), so a hit skips the image's processing and vision tower and nothing else.

Rows are kept in host memory (a GPU's memory belongs to the pools and the model) and copied to
the model's device on a hit. Thread-safe: the encoder model runs in worker threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from common.states import ImageSpan

IMAGES = "images"
"""The `EncodeInputs.scratch` key under which a model leaves its `EncodedImages`."""


@dataclasses.dataclass(frozen=True)
class EncodedImages:
    """What encoding a request's images found: where their rows sit, and which came from the cache."""

    spans: tuple[ImageSpan, ...]
    cached: frozenset[int]
    """Indices of the images whose rows the cache held (no vision tower ran for them)."""

    @property
    def cached_tokens(self) -> int:
        return sum(s.tokens for s in self.spans if s.image in self.cached)


CacheEvent = Callable[[int, int, int, int], None]
"""(hits, misses, evictions, bytes held after the event): what the owner reports as metrics."""


def image_digest(data: bytes, scope: str = "") -> bytes:
    """SHA-256 of an image's bytes as sent, mixed with a cache scope (EncodeRequest.cache_scope)
    when there is one: what the image is, for whom, whatever model reads it."""
    digest = hashlib.sha256(data).digest()
    return hashlib.sha256(scope.encode() + b"\0" + digest).digest() if scope else digest


def partitioned(key: str, partition: str) -> str:
    """A key kept apart for one caller (the encoder's --embedding-cache-scope identity)."""
    return hashlib.sha256(f"{partition}\0{key}".encode()).hexdigest() if partition else key


def image_key(fingerprint: str, digest: bytes) -> str:
    """The key of an image's rows under one model: sha256(fingerprint, 0, image_digest), in
    lower-case hex. The encoder's cache, the spans it reports and the language's held rows all
    use it, so the same image under another model is another key."""
    return hashlib.sha256(fingerprint.encode() + b"\0" + digest).hexdigest()


class EmbeddingCache:
    """At most `capacity_bytes` of rows, the least recently used given up first; 0 keeps none."""

    def __init__(self, capacity_bytes: int, on_event: CacheEvent | None = None):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes}: must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._on_event = on_event or (lambda hits, misses, evictions, held: None)
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0  # since start (inspection)
        self._on_event(0, 0, 0, 0)  # the owner's metrics exist (at 0) from the start

    @property
    def nbytes(self) -> int:
        """Bytes of rows held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._rows)

    def stats(self) -> tuple[int, int, int, int, int, int]:
        """(capacity_bytes, bytes, entries, hits, misses, evictions): EmbeddingCacheInfo's fields."""
        with self._lock:
            return (
                self.capacity_bytes,
                self._bytes,
                len(self._rows),
                self.hits,
                self.misses,
                self.evictions,
            )

    def get(self, key: str) -> torch.Tensor | None:
        """The rows of `key` (host memory; do not modify), counted as a hit or a miss."""
        with self._lock:
            rows = self._rows.get(key)
            if rows is not None:
                self._rows.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            held = self._bytes
        self._on_event(int(rows is not None), int(rows is None), 0, held)
        return rows

    def discard(self, key: str) -> None:
        """Forget `key` (its rows stay valid for whoever holds them)."""
        with self._lock:
            gone = self._rows.pop(key, None)
            if gone is not None:
                self._bytes -= gone.numel() * gone.element_size()
            held = self._bytes
        if gone is not None:
            self._on_event(0, 0, 0, held)

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Keep a host copy of `rows`, giving up the least recently used entries to make room.
        Rows larger than the whole cache are not kept."""
        size = rows.numel() * rows.element_size()
        if size > self.capacity_bytes:
            return
        copy = rows.detach().to("cpu", copy=True).contiguous()
        evicted = 0
        with self._lock:
            old = self._rows.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            while self._rows and self._bytes + size > self.capacity_bytes:
                _, gone = self._rows.popitem(last=False)
                self._bytes -= gone.numel() * gone.element_size()
                evicted += 1
            self._rows[key] = copy
            self._bytes += size
            self.evictions += evicted
            held = self._bytes
        self._on_event(0, 0, evicted, held)
