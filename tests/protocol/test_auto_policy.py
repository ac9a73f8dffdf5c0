"""Size-first reservation (`--alloc-policy auto`), in one process (the fast tier).

The encoder says the payload's size on the Status stream once its source blocks are held and
before its model runs (EncodeRequest.announce_size); the language then reserves exactly that and
sends every rank's Init while the model still runs. Checked here by outcome:

- with the model held (a fault-injecting `GatedModel` around the synthetic model), every rank's
  Init reaches the encoder with exactly the payload's blocks before the model fills anything;
- a payload the pool can hold arrives in one round, its digest equal to the independent
  reference (services/tools/reference_payload.py);
- a payload larger than the pool falls back to --initial-tokens and resume rounds;
- an encoder that says nothing: the size comes with the Encode's reply, still one round;
- tp=2: both ranks reserve exactly and agree;
- a model failing after the size was said fails the request with its code, and leaves nothing.

The harness checks every pool free after each scenario.
"""

from __future__ import annotations

import asyncio
import math
import threading

import grpc
import pytest

from common import errors
from common.pb.epd.v1 import common_pb2
from services.encoder.transfer import EncoderTransfer
from services.tools.reference_payload import expected_digest
from tests.protocol.harness import (
    BLOCK,
    INITIAL_TOKENS,
    LANGUAGE_BLOCKS,
    STEP_TIMEOUT_S,
    Tier,
    protocol_tier,
)

pytestmark = pytest.mark.protocol

POOL_TOKENS = LANGUAGE_BLOCKS * BLOCK  # 256
AUTO = {"alloc_policy": "auto"}


def reserved(n: int) -> int:
    """What a rank reserves for an n-token payload it can hold: whole blocks."""
    return math.ceil(n / BLOCK) * BLOCK


class GatedModel:
    """Fault injection: the encoder's model, held before it fills a payload's rows until
    `release` is set (a vision tower still running), and then failing with `fail` if set."""

    def __init__(self, inner):
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: BaseException | None = None

    def token_count(self, inputs) -> int:
        return self.inner.token_count(inputs)

    def encode_into(self, inputs, runs, record) -> None:
        self.entered.set()
        if not self.release.wait(STEP_TIMEOUT_S):
            raise TimeoutError("GatedModel was never released")
        if self.fail is not None:
            raise self.fail
        self.inner.encode_into(inputs, runs, record)


def gate(tier: Tier, monkeypatch) -> GatedModel:
    """Run the tier encoder's synthetic payloads through a `GatedModel` (in a worker thread, as a
    real model runs)."""
    model = GatedModel(tier.encoder.synthetic)
    validate = tier.encoder._validate_inputs

    def gated(request_id, inputs):
        _model, total = validate(request_id, inputs)
        return model, total

    monkeypatch.setattr(tier.encoder, "_validate_inputs", gated)
    return model


async def _inits_while_held(tier: Tier, model: GatedModel, request_id: str, ranks: list[int]):
    """Wait until every rank in `ranks` has its Init in, the model still held; their views."""
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT_S
    while True:
        try:
            info = await tier.encoder_transfer(request_id)
        except grpc.aio.AioRpcError as e:  # the Encode has not opened the transfer yet
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        else:
            if sorted(r.rank for r in info.ranks) == ranks:
                assert not model.release.is_set()
                return info
        assert asyncio.get_running_loop().time() < deadline, "the Inits never came"
        await asyncio.sleep(0.005)


def _size_first_count(tier: Tier, size_from: str, reservation: str) -> float:
    metric = tier.language.worker.telemetry.size_first
    return metric.labels(
        **tier.language.worker.telemetry._labels, size_from=size_from, reservation=reservation
    )._value.get()


async def test_every_init_goes_out_with_the_exact_size_while_the_model_runs(monkeypatch):
    async with protocol_tier(language=AUTO) as tier:
        model = gate(tier, monkeypatch)
        n = 200  # above the 64-token default reservation, within the 256-token pool
        call = asyncio.ensure_future(tier.generate(n, seed=5, request_id="sized-200"))
        info = await _inits_while_held(tier, model, "sized-200", [0])
        assert info.total_tokens == n and info.state == common_pb2.TRANSFER_STATE_WAITING_FOR_INPUT
        assert [r.allocated_tokens for r in info.ranks] == [reserved(n)]
        model.release.set()
        reply = await asyncio.wait_for(call, STEP_TIMEOUT_S)
        assert reply.payload_sha256 == expected_digest(n, 5, tier.hidden)
        assert (reply.rounds, reply.initial_allocated_tokens) == (1, reserved(n))
        assert not reply.early_init
        assert _size_first_count(tier, "status", "exact") == 1


@pytest.mark.parametrize("n", [1, 63, 64, 65, 255, 256])
async def test_what_the_pool_can_hold_arrives_in_one_round(n):
    async with protocol_tier(language=AUTO) as tier:
        reply = await tier.generate(n, seed=n, request_id=f"one-round-{n}")
        assert reply.payload_sha256 == expected_digest(n, n, tier.hidden)
        assert (reply.rounds, reply.initial_allocated_tokens) == (1, reserved(n))


async def test_a_payload_larger_than_the_pool_falls_back_to_the_default_and_resumes():
    async with protocol_tier(language=AUTO) as tier:
        n = 1000
        reply = await tier.generate(n, seed=9, request_id="too-big")
        assert reply.payload_sha256 == expected_digest(n, 9, tier.hidden)
        assert reply.initial_allocated_tokens == INITIAL_TOKENS
        assert reply.rounds == 1 + math.ceil((n - INITIAL_TOKENS) / POOL_TOKENS)
        defaulted = _size_first_count(tier, "status", "default") + _size_first_count(
            tier, "encode_reply", "default"
        )
        assert defaulted == 1


async def test_an_encoder_that_says_nothing_gives_the_size_in_its_encode_reply(monkeypatch):
    """An encoder that predates EncodeRequest.announce_size ignores it: the language sizes the
    reservation from the Encode's reply and admits then."""
    monkeypatch.setattr(EncoderTransfer, "sized", lambda self, total: None)
    async with protocol_tier(language=AUTO) as tier:
        for n in (40, 250):
            reply = await tier.generate(n, seed=n, request_id=f"silent-{n}")
            assert reply.payload_sha256 == expected_digest(n, n, tier.hidden)
            assert (reply.rounds, reply.initial_allocated_tokens) == (1, reserved(n))
        assert _size_first_count(tier, "encode_reply", "exact") == 2
        assert _size_first_count(tier, "status", "exact") == 0


async def test_tp2_every_rank_reserves_exactly_and_they_agree(monkeypatch):
    async with protocol_tier(language={**AUTO, "tp": 2}) as tier:
        model = gate(tier, monkeypatch)
        n = 150
        call = asyncio.ensure_future(tier.generate(n, seed=3, request_id="tp-sized"))
        info = await _inits_while_held(tier, model, "tp-sized", [0, 1])
        assert [r.allocated_tokens for r in info.ranks] == [reserved(n)] * 2
        model.release.set()
        reply = await asyncio.wait_for(call, STEP_TIMEOUT_S)
        want = expected_digest(n, 3, tier.hidden)
        assert reply.payload_sha256 == want and reply.rounds == 1
        assert [(r.payload_sha256, r.rounds) for r in reply.ranks] == [(want, 1)] * 2


async def test_a_model_failing_after_the_size_was_said_fails_cleanly(monkeypatch):
    async with protocol_tier(language=AUTO) as tier:
        model = gate(tier, monkeypatch)
        model.fail = errors.InvalidArgument("the image could not be decoded (injected)")
        call = asyncio.ensure_future(tier.generate(100, seed=1, request_id="fails-late"))
        await _inits_while_held(tier, model, "fails-late", [0])
        model.release.set()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call, STEP_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "could not be decoded" in e.value.details()
        lang = await tier.language_transfer("fails-late")
        assert lang.state == common_pb2.TRANSFER_STATE_FAILED
        # The next request runs as usual (nothing was left behind: the harness checks the pools).
        model.fail = None
        reply = await tier.generate(80, seed=2)
        assert reply.payload_sha256 == expected_digest(80, 2, tier.hidden)


async def test_bad_input_under_auto_is_refused_before_anything_is_reserved():
    async with protocol_tier(language=AUTO, encoder={"max_request_tokens": 500}) as tier:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tier.generate(501, seed=1, request_id="too-many")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "501" in e.value.details()
        assert tier.language.worker._opened_streams == {}


async def test_a_model_crashing_after_the_size_was_said_ends_the_call_at_once(monkeypatch):
    """Not an EpdError (a model's RuntimeError): the Encode's half of the call still ends it, so
    the Generate fails now rather than at its deadline."""
    async with protocol_tier(language=AUTO) as tier:
        model = gate(tier, monkeypatch)
        model.fail = RuntimeError("the vision tower crashed (injected)")
        call = asyncio.ensure_future(tier.generate(100, seed=1, request_id="crashes"))
        await _inits_while_held(tier, model, "crashes", [0])
        model.release.set()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call, STEP_TIMEOUT_S / 2)
        assert e.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        model.fail = None


async def test_a_cancelled_request_is_cancelled_on_the_encoder_not_a_lost_peer(monkeypatch):
    """The Generate is cancelled while the model runs and every Init is in: the encoder hears
    the Cancel before rank 0's statuses (on the Encode's call) end, so it records CANCELLED."""
    async with protocol_tier(language=AUTO) as tier:
        model = gate(tier, monkeypatch)
        call = asyncio.ensure_future(tier.generate(100, seed=1, request_id="cancelled"))
        await _inits_while_held(tier, model, "cancelled", [0])
        # The encoder's Cancel (and so the language's) waits for the running model to give its
        # blocks back: the model goes on a little after the Cancel.
        asyncio.get_running_loop().call_later(0.3, model.release.set)
        await tier.stub.Cancel(common_pb2.CancelRequest(request_id="cancelled"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call, STEP_TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.CANCELLED, e.value.details()
        deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT_S
        while (
            info := await tier.encoder_transfer("cancelled")
        ).state != common_pb2.TRANSFER_STATE_FAILED:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert info.error.reason == common_pb2.FAILURE_REASON_CANCELLED, info.error
