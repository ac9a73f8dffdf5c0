"""Disaggregated equals colocated for Qwen3-VL: the tiny Qwen3-VL (`tiny-qwen3`, 3 deepstack
levels) through real services and real Mooncake TCP, in one round, in several rounds, and with
tp=2.

encoder service (vision tower with its deepstack mergers, embedding table, rope index) →
Mooncake, in resume rounds, six fields per token → language service → `qwen3-vl-prefill` must
give the same first token and last-position logits as the same seeded model run in this process:
exactly (to float rounding) when this process rounds every [hidden] field to the pool's bf16, and
within bf16 tolerance of the library's own end-to-end forward on input_ids + pixel_values (which
computes and injects the deepstack features itself). Every scenario ends with every pool free.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from common.models import QWEN3_VL
from common.pb.epd.v1 import common_pb2, language_pb2
from services.encoder.models import EncodeInputs
from services.language.consumers import QwenPrefill
from services.models import qwen, qwen_images, qwen_weights
from services.tools import demo
from tests.conftest import Pair, assert_all_free, language_stub
from tests.qwen_oracle import generated_images, library_forward

HIDDEN = 64
BLOCK = 128
LANGUAGE_BLOCKS = 4  # 512 tokens per round after the first
INITIAL_TOKENS = 256
BF16_TOLERANCE = 5e-2
BYTES_PER_TOKEN = 4 * HIDDEN * 2 + 4 + 12  # embeddings + 3 deepstack levels (bf16), ids, positions

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CASES = {
    "one-round": ([(160, 120, "png")], "What is in <image>?"),  # 64 image tokens (the minimum)
    "several-rounds": (
        [(200, 200, "jpeg"), (1120, 980, "png")],
        "Compare <image> and <image>.",
    ),  # 64 + 1,085 image tokens: 4 rounds
}


def pair_of(tp: int) -> Pair:
    return Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL_TOKENS,
        encoder_args=["--model", "tiny-qwen3", "--max-request-tokens", "3000"],
        language_args=[
            "--consumer",
            "qwen3-vl-prefill",
            "--model",
            "tiny-qwen3",
            *(["--tp", str(tp)] if tp > 1 else []),
        ],
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def pair(request):
    p = pair_of(request.param)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def colocated():
    """The same seeded model, whole, in this process: (encoder model, full model, prefill)."""
    full = qwen_weights.load_qwen("tiny-qwen3", HIDDEN)
    return qwen.QwenEncoderModel(full), full, QwenPrefill(full)


def images_of(case: str) -> list[tuple[bytes, str]]:
    return generated_images(CASES[case][0])


@pytest.mark.parametrize("case", list(CASES))
async def test_disaggregated_equals_colocated(pair, colocated, case, unique_id):
    images, text = images_of(case), CASES[case][1]
    enc, _, prefill = colocated
    # The token count is Qwen3-VL's processor rule: 32-pixel tokens, at least 64 per image.
    expected_tokens = len(text.replace("<image>", "").encode()) + sum(
        demo.qwen_image_tokens(w, h, demo.QWEN3_TOKENS) + 2 for w, h, _ in CASES[case][0]
    )
    assert expected_tokens == enc.token_count(EncodeInputs(tuple(images), text))
    reply = await language_stub(pair.language.address).Generate(
        language_pb2.GenerateRequest(
            request_id=unique_id(case),
            text=text,
            want_digest=True,
            images=[common_pb2.Image(data=d, mime_type=m) for d, m in images],
        )
    )
    assert reply.total_tokens == expected_tokens
    assert reply.integrity_verified and reply.consumer == "qwen3-vl-prefill"
    assert reply.bytes == expected_tokens * BYTES_PER_TOKEN
    assert reply.rounds == 1 + max(
        0, math.ceil((expected_tokens - INITIAL_TOKENS) / (LANGUAGE_BLOCKS * BLOCK))
    )
    assert (reply.rounds == 1) == (case == "one-round")
    lg = reply.logits
    assert not lg.skipped and lg.prefill_tokens == expected_tokens
    assert reply.first_token_id == lg.top_token_ids[0]

    # 1. No transfer, every field rounded to the pool's bf16 as the pool does: the same numbers.
    out = enc.encode(EncodeInputs(tuple(images), text))
    bf16 = [d.to(torch.bfloat16) for d in out.deepstack]
    local = prefill.prefill(
        out.embeddings.to(torch.bfloat16), out.positions.to(torch.int32), out.token_ids, bf16
    )
    assert list(lg.top_token_ids) == list(local.top_token_ids)
    assert list(lg.top_logits) == pytest.approx(list(local.top_logits), abs=1e-5)
    assert lg.mrope_position_delta == local.position_delta == out.delta

    # 2. The library's own forward, deepstack computed and injected by the model itself.
    ref, ref_delta = library_forward(colocated[1], enc, EncodeInputs(tuple(images), text))
    assert ref_delta == out.delta
    assert float(ref[reply.first_token_id]) >= float(ref.max()) - BF16_TOLERANCE
    assert list(lg.top_logits) == pytest.approx(
        ref[list(lg.top_token_ids)].tolist(), abs=BF16_TOLERANCE
    )
    # 3. The deepstack fields carry weight: without them the model's answer is another one.
    blind = prefill.prefill(
        out.embeddings.to(torch.bfloat16),
        out.positions.to(torch.int32),
        out.token_ids,
        [torch.zeros_like(d) for d in bf16],
    )
    assert max(abs(a - b) for a, b in zip(blind.top_logits, local.top_logits)) > 1e-3
    await assert_all_free((pair.language.address, "language"), (pair.encoder.address, "encoder"))


async def test_an_image_below_qwen3s_minimum_is_invalid_argument(pair, unique_id):
    side = QWEN3_VL.pixels_per_token_side
    small = (demo.make_image(side - 2, 300, "png"), "image/png")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await language_stub(pair.language.address).Generate(
            language_pb2.GenerateRequest(
                request_id=unique_id("small"),
                text="x",
                images=[common_pb2.Image(data=small[0], mime_type=small[1])],
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"images[0]: {side - 2}x300 pixels is below the minimum image size 32x32" in (
        info.value.details()
    )
    assert qwen_images.image_tokens(side, side, QWEN3_VL) == 64  # min_pixels 65536: 8 x 8 tokens
    await assert_all_free((pair.language.address, "language"), (pair.encoder.address, "encoder"))
