"""Errors between the services travel as structured data: a real grpc.aio server on loopback
raises domain errors through `rpc.grpc_errors`, and the client side reads the code, the
`google.rpc.ErrorInfo` reason and the failure reason from the status details, never from the
message. The oracle is the `google.rpc` wire format itself (read here with grpcio-status's own
parser), not our reader."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from common import errors
from common.states import FailureReason
from services.edge import rpc

SERVICE = "epd.test.Errors"


class Raiser:
    """Raises the error the test put in `next` (a servicer method wrapped like the services')."""

    next: errors.EpdError

    @rpc.grpc_errors
    async def Fail(self, request, context):
        raise self.next


@pytest.fixture
async def call():
    raiser = Raiser()

    async def fail(request, context):
        return await raiser.Fail(request, context)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {"Fail": grpc.unary_unary_rpc_method_handler(fail)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = channel.unary_unary(f"/{SERVICE}/Fail")

    async def fail_with(error: errors.EpdError) -> grpc.aio.AioRpcError:
        raiser.next = error
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await method(b"")
        return e.value

    yield fail_with
    await channel.close()
    await server.stop(None)


def _info(e: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo as any google.rpc client would read it (grpcio-status's parser)."""
    status = rpc_status.from_call(e)
    assert status is not None, "no google.rpc.Status in the trailers"
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


@pytest.mark.parametrize(
    "error, code, reason, failure",
    [
        (
            errors.FailedPrecondition("who are you?", error_reason=errors.NOT_REGISTERED),
            grpc.StatusCode.FAILED_PRECONDITION,
            "NOT_REGISTERED",
            "INVALID",  # what a refused precondition ends a transfer with
        ),
        (
            errors.IntegrityError("round 2: checksum"),
            grpc.StatusCode.DATA_LOSS,
            "DATA_LOSS",
            "INTEGRITY",
        ),
        (
            errors.Unavailable("write failed", reason=FailureReason.TRANSPORT),
            grpc.StatusCode.UNAVAILABLE,
            "UNAVAILABLE",
            "TRANSPORT",
        ),
    ],
    ids=["not-registered", "integrity", "transport"],
)
async def test_error_details_are_structured_and_read_back(call, error, code, reason, failure):
    e = await call(error)
    assert e.code() == code
    info = _info(e)
    assert (info.domain, info.reason) == ("epd.v1", reason)
    assert info.metadata.get("failure_reason", "") == failure
    # Our reader acts on the details, whatever the message says.
    back = rpc.error_from_rpc(e, "Fail")
    assert back.code == error.code
    assert back.error_reason == (reason if reason in errors.ERROR_REASONS else "")
    assert back.reason == FailureReason[failure]


async def test_rewording_a_message_changes_nothing(call):
    a = rpc.error_from_rpc(
        await call(errors.FailedPrecondition("x", error_reason=errors.NOT_REGISTERED))
    )
    b = rpc.error_from_rpc(
        await call(
            errors.FailedPrecondition("NOT_REGISTERED, or so", error_reason="")
        )  # the word in the text means nothing
    )
    assert a.error_reason == errors.NOT_REGISTERED and b.error_reason == ""
