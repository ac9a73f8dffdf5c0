"""Transfer states and failure reasons (docs/DESIGN.md, 'Transfer states'): the domain mirror of
the proto enums.

Values equal the proto enum numbers, so the edge converts with a plain int().
"""

from __future__ import annotations

import dataclasses
import enum


class TransferState(enum.IntEnum):
    UNSPECIFIED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4
    FAILED = 5

    @property
    def terminal(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class FailureReason(enum.IntEnum):
    UNSPECIFIED = 0
    TIMEOUT = 1
    CANCELLED = 2
    TRANSPORT = 3
    INTEGRITY = 4
    RESOURCE_EXHAUSTED = 5
    PEER_LOST = 6
    INVALID = 7

    @property
    def label(self) -> str:
        """The lower-case name used in metrics and logs (`resource_exhausted`)."""
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """Where one image's rows sit in a payload (the domain mirror of the proto ImageSpan)."""

    image: int
    """Index into the request's images."""
    start: int
    """First token of its rows (its image-pad tokens)."""
    tokens: int
    key: str
    """sha256(model fingerprint, 0, image bytes) in lower-case hex: the same rows anywhere."""
    first_position: tuple[int, ...] = ()
    """M-RoPE (t, h, w) position of its first token; rows kept for reuse are moved to start at 0."""
    reused: bool = False
    """Not written by the encoder: every data rank holds these rows and fills them itself."""

    @property
    def end(self) -> int:
        return self.start + self.tokens


def reused_in(spans: tuple[ImageSpan, ...] | list[ImageSpan], lo: int, hi: int) -> int:
    """Tokens of [lo, hi) inside spans marked reused: what neither side writes or receives."""
    return sum(max(0, min(hi, s.end) - max(lo, s.start)) for s in spans if s.reused)


@dataclasses.dataclass(frozen=True)
class StatusUpdate:
    """What a Status stream carries (the domain mirror of TransferStatus)."""

    request_id: str
    state: TransferState
    sent_tokens: int = 0
    total_tokens: int = 0
    round: int = 0
    round_tokens: int = 0
    allocated_tokens: int = 0
    checksums: tuple[tuple[str, int], ...] = ()
    reason: FailureReason = FailureReason.UNSPECIFIED
    message: str = ""
    landed_tokens: int = 0
    """Progress inside the round being written: its first landed_tokens tokens have landed."""
    landed_checksums: tuple[tuple[str, int], ...] = ()
    """Checksums over exactly those landed tokens."""
    writes_may_land: bool = False
    """FAILED only: a write of the transfer that the encoder gave up on may still land in the
    destination blocks (the write fence): keep them quarantined until a FAILED status without it."""
    images: tuple[ImageSpan, ...] = ()
    """The payload's images, in token order, once the payload exists (empty before, and for a
    payload without images)."""
