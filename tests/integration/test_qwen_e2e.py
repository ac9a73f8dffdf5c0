"""Disaggregated equals colocated: the tiny Qwen2-VL through real services and real Mooncake TCP.

encoder service (vision tower, embedding table, rope index) → Mooncake, in resume rounds → language
service → `qwen2-vl-prefill` must give the same first token and last-position logits as the same
seeded model run in this process with no transfer at all: exactly (to float rounding) when this
process also rounds the embeddings to the pool's bf16, and within bf16 tolerance of the library's
own end-to-end forward on input_ids + pixel_values. Bad images and oversize requests get
INVALID_ARGUMENT naming the image and why, and leave both pools free.
"""

from __future__ import annotations

import io
import math

import grpc
import pytest
import torch
from PIL import Image

from common.pb.epd.v1 import common_pb2, encoder_pb2, language_pb2
from services.encoder.models import EncodeInputs
from services.language.consumers import QwenPrefill
from services.models import qwen, qwen_weights
from services.tools import demo
from tests.conftest import Pair, ServiceProcess, assert_all_free, encoder_stub, language_stub
from tests.qwen_oracle import generated_images, library_forward

HIDDEN = 64
BLOCK = 128
LANGUAGE_BLOCKS = 4  # 512 tokens per round after the first
INITIAL_TOKENS = 256  # the default (fixed) allocation of these tests
MAX_TOKENS = 3000
BF16_TOLERANCE = 5e-2  # logits of bf16-rounded embeddings vs float32 ones (seen: < 1e-2)

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

CASES = {
    "one-image": ([(320, 240, "png")], "What is in <image>?"),
    "three-images": (
        [(200, 200, "jpeg"), (448, 160, "png"), (96, 640, "jpeg")],
        "Compare <image>, <image> and <image>.",
    ),
    "large-image": (
        [(1120, 980, "png")],
        "Describe this large picture.",
    ),  # 1,400 image tokens: 4 rounds
}


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL_TOKENS,
        encoder_args=["--model", "tiny", "--max-request-tokens", str(MAX_TOKENS)],
        language_args=["--consumer", "qwen2-vl-prefill", "--model", "tiny"],
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def colocated():
    """The same seeded model, whole, in this process: (encoder model, full model, prefill)."""
    full = qwen_weights.load_qwen("tiny", HIDDEN)
    return qwen.QwenEncoderModel(full), full, QwenPrefill(full)


def images_of(case: str) -> list[tuple[bytes, str]]:
    return generated_images(CASES[case][0])


def generate_request(request_id: str, images, text: str, **kw) -> language_pb2.GenerateRequest:
    return language_pb2.GenerateRequest(
        request_id=request_id,
        text=text,
        want_digest=True,
        images=[common_pb2.Image(data=d, mime_type=m) for d, m in images],
        **kw,
    )


@pytest.mark.parametrize("case", list(CASES))
async def test_disaggregated_equals_colocated(pair, colocated, case, unique_id):
    images, text = images_of(case), CASES[case][1]
    enc, _, prefill = colocated
    expected_tokens = enc.token_count(EncodeInputs(tuple(images), text))
    reply = await language_stub(pair.language.address).Generate(
        generate_request(unique_id(case), images, text)
    )

    assert reply.total_tokens == expected_tokens  # token_count, from the image sizes, was exact
    assert reply.integrity_verified and reply.consumer == "qwen2-vl-prefill"
    first_round = INITIAL_TOKENS
    assert reply.rounds == 1 + max(
        0, math.ceil((expected_tokens - first_round) / (LANGUAGE_BLOCKS * BLOCK))
    )
    if case == "large-image":
        assert reply.rounds >= 3
    lg = reply.logits
    assert (
        not lg.skipped
        and lg.prefill_tokens == expected_tokens
        and lg.vocab_size == qwen_weights.TINY_VOCAB
    )
    assert reply.first_token_id == lg.top_token_ids[0]

    # 1. No transfer at all, same rounding to the pool's bf16: the same numbers.
    embeds, ids, pos, delta, _ = enc.encode(EncodeInputs(tuple(images), text))
    local = prefill.prefill(embeds.to(torch.bfloat16), pos.to(torch.int32), ids)
    assert reply.first_token_id == local.first_token_id
    assert list(lg.top_token_ids) == list(local.top_token_ids)
    assert list(lg.top_logits) == pytest.approx(list(local.top_logits), abs=1e-5)
    assert lg.norm == pytest.approx(local.logits_norm, rel=1e-6) and lg.sum == pytest.approx(
        local.logits_sum, abs=1e-3
    )
    assert lg.mrope_position_delta == local.position_delta == delta

    # 2. The library's own end-to-end forward (float32, no payload at all): within bf16 tolerance.
    ref, ref_delta = library_forward(colocated[1], enc, EncodeInputs(tuple(images), text))
    # The same first token, up to bf16 rounding: the reference's argmax, or a token within the
    # tolerance of it (only possible when the reference's top two are that close).
    assert float(ref[reply.first_token_id]) >= float(ref.max()) - BF16_TOLERANCE
    if float(torch.topk(ref, 2).values.diff().abs()) > 2 * BF16_TOLERANCE:
        assert reply.first_token_id == int(ref.argmax())
    assert list(lg.top_logits) == pytest.approx(
        ref[list(lg.top_token_ids)].tolist(), abs=BF16_TOLERANCE
    )
    assert lg.norm == pytest.approx(float(ref.norm()), rel=1e-2)
    assert lg.mrope_position_delta == ref_delta
    await assert_all_free((pair.language.address, "language"), (pair.encoder.address, "encoder"))


async def test_token_count_is_an_exact_expected_tokens_hint(pair, colocated, unique_id):
    """With `--alloc-policy hint` and expected_tokens = token_count, the large image is one round
    into an allocation of exactly its blocks."""
    lang = ServiceProcess(
        "language",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "16",
        "--encoder",
        pair.encoder.address,
        "--initial-tokens",
        str(INITIAL_TOKENS),
        "--alloc-policy",
        "hint",
    )
    try:
        images, text = images_of("large-image"), CASES["large-image"][1]
        total = colocated[0].token_count(EncodeInputs(tuple(images), text))
        reply = await language_stub(lang.address).Generate(
            generate_request(unique_id("hint"), images, text, expected_tokens=total)
        )
        assert reply.total_tokens == total and reply.rounds == 1
        assert reply.initial_allocated_tokens == math.ceil(total / BLOCK) * BLOCK
        assert (
            reply.first_token_id == -1 and reply.consumer == "null" and not reply.HasField("logits")
        )
        await assert_all_free((lang.address, "language"), (pair.encoder.address, "encoder"))
    finally:
        lang.stop()


def _truncated_png() -> bytes:
    data = demo.make_image(300, 200, "png", 1)
    return data[: len(data) // 2]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "GIF")
    return buf.getvalue()


GOOD = (demo.make_image(64, 64, "png", 0), "image/png")
BAD = {
    "corrupt-png": ([GOOD, (_truncated_png(), "image/png")], "x", ("images[1]", "corrupt PNG")),
    "unsupported-gif": ([(_gif(), "image/gif")], "x", ("images[0]", "not a PNG or JPEG")),
    "below-minimum": (
        [GOOD, GOOD, (demo.make_image(16, 200, "jpeg"), "image/jpeg")],
        "x",
        ("images[2]", "16x200", "below the minimum"),
    ),
    "above-max-tokens": (
        [GOOD, (demo.make_image(2000, 2000, "jpeg"), "image/jpeg")],
        "x",
        ("above max_request_tokens=3000", "images[1] 2000x2000 -> 5041 tokens"),
    ),
    "placeholders": ([GOOD], "<image> and <image>", ("2 image placeholder", "1 image")),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_images_and_oversize_requests_are_invalid_argument(pair, case, unique_id):
    images, text, needles = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await language_stub(pair.language.address).Generate(
            generate_request(unique_id(case), images, text)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in needles:
        assert needle in info.value.details(), info.value.details()
    # The encoder's own Encode says the same, and nothing was allocated on either side.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await encoder_stub(pair.encoder.address).Encode(
            encoder_pb2.EncodeRequest(
                request_id=unique_id(case),
                text=text,
                rank_count=1,
                images=[common_pb2.Image(data=d, mime_type=m) for d, m in images],
            )
        )
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needles[0] in info.value.details()
    )
    await assert_all_free((pair.language.address, "language"), (pair.encoder.address, "encoder"))
