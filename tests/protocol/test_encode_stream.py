"""Rank 0's statuses on its Encode's own call (Encoder.EncodeStream, `--encode-stream`), in one
process (the fast tier).

Counted at the language's encoder links (an independent oracle: the calls the ranks made), with
payloads checked against the independent reference:

- with it on, rank 0 opens no Status stream and sends no unary Encode (Init carried in the
  Encode, Init after the Encode, size-first), single- and multi-round; with it off, and with an
  early Init sent on its own ahead of the Encode, one of each per request;
- tp=2: rank 1 still opens its own Status stream;
- an encoder that does not serve EncodeStream (UNIMPLEMENTED) gets the two calls, and the link
  stops asking;
- a refused Encode on EncodeStream keeps its code and message, and nothing is left behind.
"""

from __future__ import annotations

import collections

import grpc
import pytest

from services.encoder.service import EncoderServicer
from services.language.encoder_link import GrpcEncoderLink
from services.tools.reference_payload import expected_digest
from tests.protocol.harness import protocol_tier

pytestmark = pytest.mark.protocol


@pytest.fixture
def calls(monkeypatch) -> collections.Counter:
    """How many Status streams each rank opened and unary Encodes it sent (link level)."""
    counted: collections.Counter = collections.Counter()
    status, encode = GrpcEncoderLink.status, GrpcEncoderLink.encode

    def counting_status(self, request_id, rank, await_transfer=False):
        counted[f"status[{rank}]"] += 1
        return status(self, request_id, rank, await_transfer)

    async def counting_encode(self, request, init=None):
        counted["encode"] += 1
        return await encode(self, request, init)

    monkeypatch.setattr(GrpcEncoderLink, "status", counting_status)
    monkeypatch.setattr(GrpcEncoderLink, "encode", counting_encode)
    return counted


PATHS = {
    "init-carried-in-the-encode": {},
    "init-on-its-own-first": {"carry_init": False},
    "init-after-the-encode": {"early_init": False},
    "size-first": {"alloc_policy": "auto"},
}
SIZES = (50, 1000)  # one round; five rounds through the 256-token pool


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("stream", [True, False], ids=["encode-stream", "two-calls"])
async def test_rank_0_follows_its_statuses_on_the_encode_call(calls, path, stream):
    async with protocol_tier(language={**PATHS[path], "encode_stream": stream}) as tier:
        for n in SIZES:
            reply = await tier.generate(n, seed=n, request_id=f"{path}-{n}")
            assert reply.payload_sha256 == expected_digest(n, n, tier.hidden)
    # An early Init sent on its own goes before the Encode, and rank 0's stream with it: that
    # path keeps the two calls.
    each = 0 if stream and path != "init-on-its-own-first" else len(SIZES)
    assert (calls["status[0]"], calls["encode"]) == (each, each), calls


async def test_tp2_rank_1_opens_its_own_stream(calls):
    async with protocol_tier(language={"tp": 2}) as tier:
        for n in SIZES:
            reply = await tier.generate(n, seed=n)
            want = expected_digest(n, n, tier.hidden)
            assert [r.payload_sha256 for r in reply.ranks] == [want, want]
    assert (calls["status[0]"], calls["status[1]"], calls["encode"]) == (0, len(SIZES), 0)


async def test_an_encoder_without_encode_stream_gets_two_calls(calls, monkeypatch):
    # Answered as an encoder that predates the method is: UNIMPLEMENTED.
    async def unimplemented(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield

    monkeypatch.setattr(EncoderServicer, "EncodeStream", unimplemented)
    async with protocol_tier() as tier:
        for n in SIZES:
            reply = await tier.generate(n, seed=n)
            assert reply.payload_sha256 == expected_digest(n, n, tier.hidden)
        links = tier.language.worker.encoders.links
        assert [link.streams_encode for link in links] == [False]
    assert (calls["status[0]"], calls["encode"]) == (len(SIZES), len(SIZES))


async def test_a_refused_encode_on_the_stream_keeps_its_code_and_leaves_nothing():
    async with protocol_tier(encoder={"max_request_tokens": 500}) as tier:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tier.generate(501, seed=1, request_id="refused")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "501 tokens" in e.value.details() and "max_request_tokens=500" in e.value.details()
        assert tier.language.worker._opened_streams == {}
        reply = await tier.generate(300, seed=2)  # the next one runs as usual
        assert reply.payload_sha256 == expected_digest(300, 2, tier.hidden)
