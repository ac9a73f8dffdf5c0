"""A rank whose payload is complete when the ranks decide to drop the request gives its blocks
back (the receive raced the decision and won).

Fault injection (test-only `--fault`): rank 1's statuses lag by 1 s, so rank 0 holds the whole
payload — a view of its pool — while the group still waits for rank 1; the client's deadline
then fails the request on every rank.
"""

from __future__ import annotations

import grpc
import pytest

from common.pb.epd.v1 import common_pb2, language_pb2
from tests.conftest import Pair, assert_all_free, connected_language_stub


@pytest.fixture(scope="module")
def lagging_pair():
    pair = Pair(
        hidden=128,
        language_blocks=32,
        encoder_blocks=256,
        language_args=("--tp", "2", "--fault", "rank=1,status_lag_s=1.0"),
    )
    yield pair
    pair.stop()


@pytest.mark.parametrize(
    "tokens", [300, 2500]
)  # one round held in place; several rounds (copies + the last in place)
async def test_payload_complete_on_rank0_then_dropped_by_deadline_fault_injected(
    lagging_pair, unique_id, tokens
):
    pair = lagging_pair
    # Connected first: the 0.6 s deadline is for the request, and a cold channel could spend it
    # connecting, so that the language never sees the request (NOT_FOUND below).
    stub = await connected_language_stub(pair.language.address)
    rid = unique_id("race")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(
            language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=tokens), timeout=0.6
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    await assert_all_free(
        (pair.encoder.address, "encoder"), (pair.language.address, "language"), settle_s=10
    )
    info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
    assert info.state == common_pb2.TRANSFER_STATE_FAILED
