"""Payloads with deepstack fields (`--deepstack-levels`, Qwen3-VL's extra per-token features)
between real processes over Mooncake TCP:

- both services with three levels: single-round, multi-round and larger-than-pool payloads
  arrive whole, their digests equal to the independent reference with the same levels (every
  field checked by each round's checksums on the way);
- services that disagree on the fields never register with each other: the language does not
  start, and names the fields that differ;
- a request the encoder's model cannot fill (no deepstack features) is FAILED_PRECONDITION;
- bad settings are named.

Pools end free after each scenario.
"""

from __future__ import annotations

import math

import grpc
import pytest

from common.config import ConfigError, EncoderConfig, LanguageConfig
from common.pb.epd.v1 import language_pb2
from services.tools.reference_payload import expected_digest
from services.tools.supervise import ServiceStartError
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 64
BLOCK = 16
LANGUAGE_BLOCKS = 32  # 512 tokens
INITIAL = 128
LEVELS = ("--deepstack-levels", "3")


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=256,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL,
        encoder_args=LEVELS,
        language_args=LEVELS,
    )
    yield p
    p.stop()


@pytest.mark.parametrize("n", [100, 600, 2000], ids=["one-round", "two-rounds", "past-the-pool"])
async def test_every_field_arrives_whole(pair, n):
    reply = await language_stub(pair.language.address).Generate(
        language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=n, want_digest=True)
    )
    assert reply.payload_sha256 == expected_digest(n, n, HIDDEN, deepstack_levels=3)
    assert reply.payload_sha256 != expected_digest(n, n, HIDDEN)
    assert reply.rounds == (
        1 if n <= INITIAL else 1 + math.ceil((n - INITIAL) / (LANGUAGE_BLOCKS * BLOCK))
    )
    assert reply.integrity_verified
    record = 2 * HIDDEN * 4 + 4 + 12  # bf16 embeddings + 3 deepstack levels, token id, positions
    assert reply.bytes == n * record
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


async def test_a_request_the_model_cannot_fill_is_failed_precondition(pair):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await language_stub(pair.language.address).Generate(
            language_pb2.GenerateRequest(text="no deepstack features in the byte model")
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert "deepstack_levels=3" in e.value.details()
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


def test_services_that_disagree_on_the_fields_never_pair():
    """The encoder refuses the language's Register (FAILED_PRECONDITION naming the fields), so a
    language whose every encoder refused it does not start, and says why."""
    with pytest.raises(ServiceStartError) as e:
        Pair(
            hidden=HIDDEN,
            block_size=BLOCK,
            encoder_blocks=64,
            language_blocks=LANGUAGE_BLOCKS,
            initial_tokens=INITIAL,
            encoder_args=LEVELS,  # the language has none
        )
    message = str(e.value)
    assert "every encoder refused this instance's registration" in message
    assert "'deepstack_0', 'deepstack_1', 'deepstack_2']" in message
    assert "deepstack levels 0 != 3: both services need the same count" in message


@pytest.mark.parametrize("levels", [-1, 9])
def test_bad_levels_are_named(levels):
    with pytest.raises(ConfigError, match=f"deepstack_levels={levels}: must be in 0..8"):
        EncoderConfig(deepstack_levels=levels).validate()


def test_the_qwen2_prefill_consumer_takes_no_deepstack_fields():
    with pytest.raises(
        ConfigError,
        match=r"deepstack_levels=3 but model 'tiny' \(qwen2-vl\) fills no deepstack fields",
    ):
        LanguageConfig(
            encoder=("127.0.0.1:1",), consumer="qwen2-vl-prefill", deepstack_levels=3
        ).validate()


@pytest.mark.parametrize(
    "config, levels",
    [
        (EncoderConfig(model="tiny-qwen3", hidden=64), 3),
        (EncoderConfig(model="tiny-qwen3", hidden=64, deepstack_levels=3), 3),
        (EncoderConfig(model="tiny", hidden=64), 0),
        (EncoderConfig(model="bytes", hidden=64), 0),
        (EncoderConfig(model="bytes", hidden=64, deepstack_levels=2), 2),
        (LanguageConfig(consumer="qwen3-vl-prefill", model="tiny-qwen3", hidden=64), 3),
        (LanguageConfig(consumer="null", model="tiny-qwen3", hidden=64), 0),  # model unused
        (LanguageConfig(consumer="null", hidden=64, deepstack_levels=3), 3),
    ],
)
def test_the_layout_takes_its_deepstack_fields_from_the_model(config, levels):
    config.validate()
    names = [f.name for f in config.field_specs]
    assert names == ["embeddings", "token_ids", "mrope_positions"] + [
        f"deepstack_{k}" for k in range(levels)
    ]


LANGUAGE = dict(hidden=64, encoder=("127.0.0.1:1",))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            LanguageConfig(
                **LANGUAGE, consumer="qwen3-vl-prefill", model="tiny-qwen3", deepstack_levels=2
            ),
            r"deepstack_levels=2 but model 'tiny-qwen3' \(qwen3-vl\) fills 3 deepstack fields: "
            r"leave it at 0 \(the model's\) or set 3",
        ),
        (
            LanguageConfig(**LANGUAGE, consumer="qwen2-vl-prefill", model="tiny-qwen3"),
            r"consumer='qwen2-vl-prefill' does not run model 'tiny-qwen3' \(qwen3-vl\): "
            r"use --consumer qwen3-vl-prefill",
        ),
        (
            LanguageConfig(**LANGUAGE, consumer="qwen3-vl-prefill", model="tiny"),
            r"consumer='qwen3-vl-prefill' does not run model 'tiny' \(qwen2-vl\): "
            r"use --consumer qwen2-vl-prefill",
        ),
        (
            EncoderConfig(model="tiny-qwen4", hidden=64),
            r"model='tiny-qwen4': must be one of \('tiny', 'tiny-qwen3'\) or a local checkpoint",
        ),
    ],
)
def test_a_model_and_a_consumer_or_levels_that_do_not_fit_are_named(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validate()
