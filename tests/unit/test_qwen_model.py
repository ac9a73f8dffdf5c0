"""The Qwen2-VL encoder model and the prefill consumer, in one process (no services, no transfer).

Checked against the library itself: token ids and M-RoPE positions against the image processor's
grids and `get_rope_index`, the prefill against `Qwen2VLForConditionalGeneration.forward` on the
same inputs, `token_count` against real payload lengths for many image sizes (hypothesis).
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.config import ConfigError, EncoderConfig, LanguageConfig
from common.errors import InvalidArgument
from common.layout import RecordLayout, default_fields
from common.pool import BlockPool, field_of
from services.encoder.models import EncodeInputs, load_model
from services.language.consumers import NullConsumer, QwenPrefill, build_consumer
from services.models import qwen, qwen_images, qwen_weights
from services.tools import demo
from tests.qwen_oracle import library_forward

HIDDEN = 64
PNG, JPEG = "image/png", "image/jpeg"


@pytest.fixture(scope="module")
def enc() -> qwen.QwenEncoderModel:
    return qwen.load_encoder_model("tiny", HIDDEN)


@pytest.fixture(scope="module")
def full() -> qwen_weights.QwenVL:
    """The whole tiny model (vision + text), as one process would run it with no transfer."""
    return qwen_weights.load_qwen("tiny", HIDDEN)


@pytest.fixture(scope="module")
def prefill() -> QwenPrefill:
    return QwenPrefill(qwen_weights.load_qwen("tiny", HIDDEN, keep=("text",)))


def image(w: int, h: int, fmt: str = "png", seed: int = 0) -> tuple[bytes, str]:
    return demo.make_image(w, h, fmt, seed), JPEG if fmt == "jpeg" else PNG


def inputs(images, text: str = "") -> EncodeInputs:
    return EncodeInputs(tuple(images), text)


# ---------------------------------------------------------------------------- the model itself


def test_both_services_build_the_same_tiny_model(enc, prefill):
    a = enc.qwen.model.model.language_model.embed_tokens.weight
    b = prefill.qwen.model.model.language_model.embed_tokens.weight
    assert torch.equal(a, b)
    again = qwen_weights.load_qwen("tiny", HIDDEN)
    for (name, p), (_, q) in zip(
        again.model.named_parameters(),
        qwen_weights.load_qwen("tiny", HIDDEN).model.named_parameters(),
    ):
        assert torch.equal(p, q), name
    assert enc.qwen.hidden == HIDDEN and prefill.qwen.config.text_config.hidden_size == HIDDEN


def test_token_ids_and_mrope_positions_of_text_image_text(enc, full):
    imgs = [image(200, 300, "jpeg", 1), image(500, 120, "png", 2)]
    inp = inputs(imgs, "look <image> then <image> end")
    embeds, ids, pos, delta, _ = enc.encode(inp)
    # The library's image processor decides the grids ...
    batch = full.processor(
        images=[Image.open(io.BytesIO(d)).convert("RGB") for d, _ in imgs], return_tensors="pt"
    )
    grid = batch["image_grid_thw"]
    n = [int(g.prod()) // 4 for g in grid]
    cfg = full.config
    vs, ve, pad = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id
    expected = [*b"look ", vs, *[pad] * n[0], ve, *b" then ", vs, *[pad] * n[1], ve, *b" end"]
    assert ids.tolist() == expected
    assert n == [qwen_images.image_tokens(200, 300), qwen_images.image_tokens(500, 120)]
    # ... and the model's own rope-index rule the positions.
    ref, ref_delta = full.model.model.get_rope_index(
        ids[None], mm_token_type_ids=(ids == pad)[None].int(), image_grid_thw=grid
    )
    assert torch.equal(pos, ref[:, 0, :].T)
    assert delta == int(ref_delta) == int(pos.max()) + 1 - len(ids)
    # The rule spelled out for the first image: text 0..4 on all three axes, then (t, h, w) =
    # (5, 5 + row, 5 + col) over the merged grid, then text from 5 + max(rows, cols).
    rows, cols = int(grid[0][1]) // 2, int(grid[0][2]) // 2
    assert pos[:5].tolist() == [[i, i, i] for i in range(5)]
    assert pos[5].tolist() == [5, 5, 5]  # vision-start is text
    img0 = pos[6 : 6 + n[0]]
    assert img0[:, 0].eq(6).all() and img0[:, 1].tolist() == [
        6 + r for r in range(rows) for _ in range(cols)
    ]
    assert img0[:, 2].tolist() == [6 + c for _ in range(rows) for c in range(cols)]
    assert pos[6 + n[0]].tolist() == [6 + max(rows, cols)] * 3  # vision-end
    assert embeds.shape == (len(ids), HIDDEN)


def test_images_without_placeholders_go_before_the_text(enc):
    plan = enc.plan(inputs([image(64, 64)], "hi"))
    cfg = enc.qwen.config
    assert plan.token_ids.tolist() == [
        cfg.vision_start_token_id,
        *[cfg.image_token_id] * 4,
        cfg.vision_end_token_id,
        *b"hi",
    ]
    with pytest.raises(InvalidArgument, match="2 image placeholder"):
        enc.token_count(inputs([image(64, 64)], "<image> and <image>"))


def test_text_only_and_special_tokens(enc):
    embeds, ids, pos, delta, _ = enc.encode(inputs([], "<|im_start|>user\nhé<|im_end|>"))
    sp = qwen_weights.TINY_SPECIAL_TOKENS
    assert ids.tolist() == [sp["<|im_start|>"], *"user\nhé".encode(), sp["<|im_end|>"]]
    assert pos.tolist() == [[i, i, i] for i in range(len(ids))] and delta == 0
    table = enc.qwen.model.get_input_embeddings().weight
    assert torch.equal(embeds, table[ids])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=st.integers(28, 2400), h=st.integers(28, 2400))
def test_token_count_is_the_processors_count(enc, w, h):
    if max(w, h) / min(w, h) > 200:
        return
    n = qwen_images.image_tokens(w, h)
    assert n == demo.qwen_image_tokens(
        w, h
    )  # the demo's independent rule agrees with the library's
    # What the library's processor makes of such an image (blank pixels: only the size matters).
    batch = enc.qwen.processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    assert int(batch["image_grid_thw"].prod()) // 4 == n
    assert 4 <= n <= 16384


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(
        st.tuples(st.integers(28, 700), st.integers(28, 700), st.sampled_from(["png", "jpeg"])),
        min_size=1,
        max_size=3,
    ),
    text=st.text(alphabet="ab é<>", max_size=12),
)
def test_token_count_equals_the_payload_written(enc, sizes, text):
    """token_count (image sizes only, before the model runs) == the rows encode_into writes."""
    record = RecordLayout.pack(default_fields(HIDDEN))
    inp = inputs(
        [image(w, h, f, k) for k, (w, h, f) in enumerate(sizes)], text.replace("<image>", "")
    )
    total = enc.token_count(inp)
    assert total == len(text.replace("<image>", "").encode()) + sum(
        qwen_images.image_tokens(w, h) + 2 for w, h, _ in sizes
    )
    pool = BlockPool(record, 16, -(-total // 16) + 3, "cpu")
    blocks = pool.allocator.try_alloc(-(-total // 16))
    try:
        ref_embeds, ref_ids, ref_pos, _, _ = enc.encode(inputs(inp.images, inp.text))
        enc.prepare(inp)
        enc.encode_into(inp, pool.runs(blocks, 0, total), record)
        runs = pool.runs(blocks, 0, total)
        got = {f.name: torch.cat([field_of(r, f) for r in runs]) for f in record.fields}
        assert got["token_ids"].shape[0] == total == ref_ids.shape[0]
        assert torch.equal(got["token_ids"], ref_ids.to(torch.int32))
        assert torch.equal(got["mrope_positions"], ref_pos.to(torch.int32))
        assert torch.equal(got["embeddings"], ref_embeds.to(torch.bfloat16))
    finally:
        pool.allocator.free(blocks)


# ---------------------------------------------------------------------------- bad images


def _truncated(fmt: str) -> bytes:
    data, _ = image(300, 200, fmt, 5)
    return data[: len(data) // 2]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "GIF")
    return buf.getvalue()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad, needles",
    [
        ((b"", PNG), ("images[1]", "empty")),
        ((_gif(), "image/gif"), ("images[1]", "not a PNG or JPEG")),
        ((_bmp(), PNG), ("images[1]", "not a PNG or JPEG")),
        ((image(20, 300)[0], PNG), ("images[1]", "20x300", "below the minimum")),
        ((image(28, 5700)[0], PNG), ("images[1]", "aspect ratio")),
        ((image(64, 64, "jpeg")[0], PNG), ("images[1]", "mime_type", "image/jpeg")),
        ((_truncated("png"), PNG), ("images[1]", "corrupt PNG")),
        ((_truncated("jpeg"), JPEG), ("images[1]", "corrupt JPEG")),
        ((b"\x89PNG\r\n\x1a\n" + b"\0" * 40, PNG), ("images[1]",)),
    ],
    ids=[
        "empty",
        "gif",
        "bmp",
        "too-small",
        "aspect",
        "mime",
        "truncated-png",
        "truncated-jpeg",
        "garbage-png",
    ],
)
def test_bad_images_are_refused_naming_the_image(enc, bad, needles):
    inp = inputs([image(64, 64), bad], "x")
    with pytest.raises(InvalidArgument) as info:
        enc.token_count(inp)
        enc.prepare(inp)  # what the service runs before it allocates anything
    for needle in needles:
        assert needle in info.value.message, info.value.message


# ---------------------------------------------------------------------------- the prefill


def test_prefill_equals_the_models_own_forward(enc, full, prefill):
    """encode (vision tower + embedding table + rope index) then prefill on inputs_embeds ==
    the library's Qwen2VLForConditionalGeneration.forward on input_ids + pixel_values."""
    for imgs, text in (
        ([image(320, 240, "png", 7)], "What is <image>?"),
        ([image(200, 200, "jpeg", 8), image(448, 160, "png", 9)], "a <image> b <image> c"),
        ([], "just text"),
    ):
        ref = library_forward(full, enc, inputs(imgs, text))[0]
        embeds, ids, pos, delta, _ = enc.encode(inputs(imgs, text))
        exact = prefill.prefill(embeds, pos, ids)  # float32 embeddings: same numbers
        assert exact.first_token_id == int(ref.argmax())
        assert torch.allclose(
            torch.tensor(exact.top_logits), ref[list(exact.top_token_ids)], atol=1e-4
        )
        assert exact.logits_norm == pytest.approx(float(ref.norm()), rel=1e-5)
        assert (
            exact.position_delta == delta and exact.prefill_tokens == len(ids) and not exact.skipped
        )
        pooled = prefill.prefill(
            embeds.to(torch.bfloat16), pos.to(torch.int32), ids.to(torch.int32)
        )  # as pooled
        assert pooled.first_token_id == exact.first_token_id
        assert torch.allclose(
            torch.tensor(pooled.top_logits), ref[list(pooled.top_token_ids)], atol=5e-2
        )
        assert pooled.logits_norm == pytest.approx(exact.logits_norm, rel=1e-2)


def test_prefill_skips_payloads_that_are_no_model_input(prefill):
    emb = torch.zeros(10, HIDDEN, dtype=torch.bfloat16)
    pos = torch.arange(10, dtype=torch.int32)[:, None].expand(10, 3)
    r = prefill.prefill(emb, pos, torch.arange(1000, 1010, dtype=torch.int32))
    assert r.first_token_id == -1 and "vocabulary" in r.skipped and "1009" in r.skipped
    long = qwen_weights.TINY_MAX_POSITIONS + 1
    r = prefill.prefill(torch.zeros(long, HIDDEN), torch.zeros(long, 3, dtype=torch.int32))
    assert r.first_token_id == -1 and "context" in r.skipped


# ---------------------------------------------------------------------------- weights and settings


def test_a_checkpoint_directory_loads_like_tiny(tmp_path, enc, full):
    full.model.save_pretrained(tmp_path)
    full.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), HIDDEN, "bfloat16")
    assert loaded.name == "qwen2-vl" and loaded.source == str(tmp_path)
    inp = ([image(120, 90, "png", 3)], "tiny <image> from disk")
    a = enc.encode(inputs(*inp))
    b = loaded.encode(inputs(*inp))
    assert all(
        torch.equal(x, y) for x, y in zip(a[:3], b[:3])
    )  # no tokenizer file: byte-level fallback
    EncoderConfig(model=str(tmp_path), hidden=HIDDEN).validate()
    with pytest.raises(ConfigError, match=rf"hidden size {HIDDEN} but hidden=128"):
        EncoderConfig(model=str(tmp_path), hidden=128).validate()
    with pytest.raises(ConfigError, match=rf"hidden size {HIDDEN} but hidden=3584"):
        LanguageConfig(
            encoder=("h:1",), consumer="qwen2-vl-prefill", model=str(tmp_path)
        ).validate()


def test_model_settings_are_validated():
    EncoderConfig(model="tiny", hidden=96).validate()
    with pytest.raises(ConfigError, match="multiple of 16"):
        EncoderConfig(model="tiny", hidden=100).validate()
    with pytest.raises(ConfigError, match="checkpoint directory"):
        EncoderConfig(model="/no/such/dir").validate()
    with pytest.raises(ConfigError, match="consumer"):
        LanguageConfig(encoder=("h:1",), consumer="nope").validate()
    with pytest.raises(ConfigError, match="rank 0 must be a data rank"):
        LanguageConfig(
            encoder=("h:1",), consumer="qwen2-vl-prefill", tp=2, data_ranks="1"
        ).validate()
    LanguageConfig(encoder=("h:1",), consumer="null", model="/ignored/by/null").validate()


def test_build_consumer_by_rank():
    cfg = LanguageConfig(encoder=("h:1",), consumer="qwen2-vl-prefill", hidden=HIDDEN, tp=2)
    assert isinstance(build_consumer(cfg, 1), NullConsumer)  # the model runs on rank 0 only
    assert isinstance(build_consumer(cfg, 0), QwenPrefill)
    assert isinstance(build_consumer(LanguageConfig(encoder=("h:1",)), 0), NullConsumer)
