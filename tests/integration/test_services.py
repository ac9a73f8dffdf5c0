"""Service surface over real processes: health, reflection through the real grpcurl binary,
Encode's images + text fields, cancellation, graceful stop."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.epd.v1 import common_pb2, language_pb2
from tests.conftest import Pair, assert_all_free, language_stub

GRPCURL = shutil.which("grpcurl") or str(pathlib.Path(sys.executable).parent / "grpcurl")
PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def pair():
    p = Pair(hidden=128, language_blocks=64, initial_tokens=1024)
    yield p
    p.stop()


def grpcurl(*args: str) -> str:
    out = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reflection_and_health_with_real_grpcurl(pair):
    listing = grpcurl(pair.encoder.address, "list")
    assert {"epd.v1.Encoder", "grpc.health.v1.Health"} <= set(listing.split())
    assert "epd.v1.Language" in grpcurl(pair.language.address, "list").split()
    described = grpcurl(pair.encoder.address, "describe", "epd.v1.Encoder")
    for rpc in (
        "Encode",
        "Register",
        "Init",
        "Resume",
        "Status",
        "GetTransfer",
        "ListTransfers",
        "Cancel",
    ):
        assert f"rpc {rpc}" in described
    for address in (pair.encoder.address, pair.language.address):
        assert json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))["status"] == "SERVING"
    reply = json.loads(
        grpcurl(
            "-d",
            '{"synthetic_tokens": 3000, "want_digest": true}',
            pair.language.address,
            "epd.v1.Language/Generate",
        )
    )
    assert reply["total_tokens"] == "3000" and reply["rounds"] == 2, reply


async def test_health_per_service_name(pair):
    async with grpc.aio.insecure_channel(pair.encoder.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "epd.v1.Encoder"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_text_request_through_the_bytes_model(pair):
    stub = language_stub(pair.language.address)
    text = "héllo " * 500  # 3500 UTF-8 bytes: 1024 tokens, then the rest in one resume round
    reply = await stub.Generate(language_pb2.GenerateRequest(text=text, want_digest=True))
    assert (
        reply.total_tokens == len(text.encode()) and reply.rounds == 2 and reply.integrity_verified
    )
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


@pytest.mark.parametrize(
    "image, code, needle",
    [
        (
            common_pb2.Image(data=b"GIF89a....", mime_type="image/gif"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0]",
        ),
        (
            common_pb2.Image(data=b"", mime_type="image/png"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[0]",
        ),
        (
            common_pb2.Image(data=PNG_1PX, mime_type="image/jpeg"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "mime_type='image/jpeg'",
        ),
        (
            common_pb2.Image(data=PNG_1PX, mime_type="image/png"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "vision tower",
        ),
    ],
)
async def test_images_are_validated_and_refused_without_a_vision_model(pair, image, code, needle):
    stub = language_stub(pair.language.address)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(language_pb2.GenerateRequest(images=[image], text="describe"))
    assert e.value.code() == code and needle in e.value.details()
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_client_deadline_and_cancel_free_both_sides(pair, unique_id):
    stub = language_stub(pair.language.address)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=200000), timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    rid = unique_id()
    call = asyncio.ensure_future(
        stub.Generate(language_pb2.GenerateRequest(request_id=rid, synthetic_tokens=200000))
    )
    while (await stub.ListTransfers(common_pb2.ListTransfersRequest(states=[3]))).transfers == []:
        await asyncio.sleep(0.01)
    cancel = await stub.Cancel(common_pb2.CancelRequest(request_id=rid, reason="test"))
    assert cancel.cancelled
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.CANCELLED
    info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=rid))
    assert (
        info.state == common_pb2.TRANSFER_STATE_FAILED
        and info.error.reason == common_pb2.FAILURE_REASON_CANCELLED
    )
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


def test_sigterm_exits_zero():
    p = Pair(hidden=64, language_blocks=8, encoder_blocks=16)
    assert p.language.stop() == 0
    assert p.encoder.stop() == 0
