"""What domain code reports about transfers, without knowing how it is exported.

Transfers, receive tasks and pools call a `Telemetry`; services/edge/metrics.py implements it with
Prometheus metrics. Domain code never imports prometheus_client, and tests or tools that do not
export metrics use `NULL_TELEMETRY`.
"""

from __future__ import annotations

from typing import Protocol

from common.states import FailureReason, TransferState


class Telemetry(Protocol):
    """Events of one process's transfers (one role; one rank on the language side)."""

    def transfer_ended(
        self, state: TransferState, reason: FailureReason, *, seconds: float | None, rounds: int
    ) -> None:
        """A request ended here: SUCCESS (with Init→SUCCESS seconds and its rounds) or FAILED."""

    def bytes_moved(self, nbytes: int) -> None:
        """Payload bytes written (encoder) or received and accepted (language)."""

    def resumed(self, overlapped: bool = False) -> None:
        """A resume round began (a Resume accepted by the encoder / sent by a language rank);
        `overlapped`: sent before the round just received was copied out and verified (`overlap_rounds`)."""

    def alloc_waited(self, seconds: float) -> None:
        """How long one pool allocation waited for blocks (0 when they were free)."""

    def integrity_failed(self) -> None:
        """A round's checksums did not match, or a status contradicted the allocation."""

    def encoded(self, seconds: float) -> None:
        """The encoder model produced one request's payload in this many seconds."""

    def write_fenced(self) -> None:
        """A transfer ended while a write of it could still land: its blocks here are quarantined
        (encoder: source blocks; language rank: destination blocks) until the writes stop."""

    def fence_released(self, seconds: float) -> None:
        """Blocks a `write_fenced` quarantined went back to the pool after this many seconds."""


class NullTelemetry:
    """Reports nothing."""

    def transfer_ended(self, state, reason, *, seconds, rounds) -> None:
        pass

    def bytes_moved(self, nbytes) -> None:
        pass

    def resumed(self, overlapped: bool = False) -> None:
        pass

    def alloc_waited(self, seconds) -> None:
        pass

    def integrity_failed(self) -> None:
        pass

    def encoded(self, seconds) -> None:
        pass

    def write_fenced(self) -> None:
        pass

    def fence_released(self, seconds) -> None:
        pass


NULL_TELEMETRY: Telemetry = NullTelemetry()
