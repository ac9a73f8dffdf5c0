"""Domain errors, one class per gRPC status code (docs/DESIGN.md, "Failure semantics").

Domain code raises these; the gRPC edge (services/edge/rpc.py) maps `code` to `grpc.StatusCode` in
one place. No grpc import here, so pool, plan and the state machines stay transport-free.
"""

from __future__ import annotations

from common.states import FailureReason


def shown(value: str, limit: int = 80) -> str:
    """A client-supplied string for an error message: its repr, shortened when long, so a huge
    id cannot crowd out the part of the message that says what is wrong."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


class EpdError(Exception):
    """Base of every error that should reach a client with a specific status code."""

    code: str = "UNKNOWN"
    """Name of the matching `grpc.StatusCode` member."""
    reason: FailureReason = FailureReason.UNSPECIFIED
    """The transfer failure reason this error maps to when it ends a transfer."""
    error_reason: str = ""
    """A machine-readable cause (one of the ERROR_REASONS below), sent as the reason of the
    status's `google.rpc.ErrorInfo` (services/edge/rpc.py), so the other service acts on it
    without reading the message."""

    def __init__(
        self, message: str, *, reason: FailureReason | None = None, error_reason: str = ""
    ):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if error_reason:
            self.error_reason = error_reason


# Machine-readable error causes (EpdError.error_reason).
NOT_REGISTERED = "NOT_REGISTERED"
"""The encoder does not know this language rank (it restarted): Register again, then retry."""
TRANSFER_ENDED = "TRANSFER_ENDED"
"""The transfer had already ended: the error's failure reason is the one it ended with (another
rank's integrity failure, say), not a fault of this call."""
ERROR_REASONS = frozenset({NOT_REGISTERED, TRANSFER_ENDED})


class InvalidArgument(EpdError):
    code = "INVALID_ARGUMENT"
    reason = FailureReason.INVALID


class NotFound(EpdError):
    code = "NOT_FOUND"
    reason = FailureReason.INVALID


class AlreadyExists(EpdError):
    code = "ALREADY_EXISTS"
    reason = FailureReason.INVALID


class FailedPrecondition(EpdError):
    code = "FAILED_PRECONDITION"
    reason = FailureReason.INVALID


class ResourceExhausted(EpdError):
    code = "RESOURCE_EXHAUSTED"
    reason = FailureReason.RESOURCE_EXHAUSTED


class DeadlineExceeded(EpdError):
    code = "DEADLINE_EXCEEDED"
    reason = FailureReason.TIMEOUT


class Cancelled(EpdError):
    code = "CANCELLED"
    reason = FailureReason.CANCELLED


class Unavailable(EpdError):
    code = "UNAVAILABLE"
    reason = FailureReason.PEER_LOST


class Aborted(EpdError):
    code = "ABORTED"
    reason = FailureReason.UNSPECIFIED


class PermissionDenied(EpdError):
    """The caller is authenticated (or claims a language_id) but the object belongs to another
    language instance: a request id, a registered session (docs/SECURITY.md)."""

    code = "PERMISSION_DENIED"
    reason = FailureReason.INVALID


class Unauthenticated(EpdError):
    """The caller did not prove who it is (missing or wrong token, see services/edge/security.py)."""

    code = "UNAUTHENTICATED"
    reason = FailureReason.INVALID


class Internal(EpdError):
    code = "INTERNAL"
    reason = FailureReason.UNSPECIFIED


class TransportError(EpdError):
    """A Mooncake write returned non-zero or raised. `in_flight` (a `common.fence.LateWrites`)
    holds the pieces of it that were not final when the writer stopped waiting: they may still
    land, and the blocks they touch stay fenced until it settles (None: nothing is in flight)."""

    code = "UNAVAILABLE"
    reason = FailureReason.TRANSPORT

    def __init__(self, message: str, *, reason: FailureReason | None = None, in_flight=None):
        super().__init__(message, reason=reason)
        self.in_flight = in_flight


class IntegrityError(EpdError):
    """A received round does not match the checksums the encoder sent."""

    code = "DATA_LOSS"
    reason = FailureReason.INTEGRITY


# How a transfer that FAILED with a given reason surfaces to a client of Generate.
REASON_TO_ERROR: dict[FailureReason, type[EpdError]] = {
    FailureReason.TIMEOUT: DeadlineExceeded,
    FailureReason.CANCELLED: Cancelled,
    FailureReason.TRANSPORT: TransportError,
    FailureReason.INTEGRITY: IntegrityError,
    FailureReason.RESOURCE_EXHAUSTED: ResourceExhausted,
    FailureReason.PEER_LOST: Unavailable,
    FailureReason.INVALID: InvalidArgument,
    FailureReason.UNSPECIFIED: Internal,
}


def error_for_reason(reason: FailureReason, message: str) -> EpdError:
    """The domain error a client sees for a transfer that failed with `reason`."""
    return REASON_TO_ERROR.get(reason, Internal)(message, reason=reason)
