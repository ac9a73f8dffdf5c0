"""The Qwen3-VL encoder model and its deepstack fields, in one process (no services, no transfer);
checkpoint directories of every family found by their config.json.

Oracles: the library itself (its image processor's grids, its full forward on input_ids +
pixel_values), the demo's independent token rule, and the payload the same model writes without a
cache. Real pools (CPU) hold what `encode_into` writes; every allocation is given back.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.config import ConfigError, EncoderConfig
from common.layout import RecordLayout, payload_fields
from common.models import FAMILIES, QWEN3_VL
from common.pool import BlockPool, field_of
from services.encoder.models import EncodeInputs, load_model
from services.language.consumers import QwenPrefill
from services.models import qwen, qwen_images, qwen_weights
from services.models.embedding_cache import EmbeddingCache
from services.tools import demo
from tests.qwen_oracle import library_forward

HIDDEN = 64
LEVELS = 3


@pytest.fixture(scope="module")
def full() -> qwen_weights.QwenVL:
    return qwen_weights.load_qwen("tiny-qwen3", HIDDEN)


@pytest.fixture(scope="module")
def enc() -> qwen.QwenEncoderModel:
    return qwen.load_encoder_model("tiny-qwen3", HIDDEN)


def image(w: int, h: int, seed: int = 0, fmt: str = "png") -> tuple[bytes, str]:
    return demo.make_image(w, h, fmt, seed), f"image/{fmt}"


def test_tiny_qwen3_is_a_qwen3_vl_with_three_deepstack_levels(full, enc):
    assert type(full.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert full.family is QWEN3_VL and full.deepstack_levels == LEVELS == enc.deepstack_levels
    assert list(full.config.vision_config.deepstack_visual_indexes) == [0, 1, 2]
    assert full.config.vision_config.out_hidden_size == HIDDEN == full.hidden
    assert full.processor.patch_size == 16 and enc.name == "qwen3-vl"
    # Both roles build the same weights (same config, same seed).
    text_only = qwen_weights.load_qwen("tiny-qwen3", HIDDEN, keep=("text",))
    assert torch.equal(
        text_only.model.model.language_model.embed_tokens.weight,
        enc.qwen.model.model.language_model.embed_tokens.weight,
    )


def test_the_prefill_on_the_fields_equals_the_librarys_forward(full, enc):
    inp = EncodeInputs((image(100, 70, 1), image(64, 300, 2, "jpeg")), "a <image> b <image> c")
    out = enc.encode(inp)
    prefill = QwenPrefill(full)
    got = prefill.prefill(out.embeddings, out.positions, out.token_ids, out.deepstack)
    ref = library_forward(full, enc, inp)[0]
    assert got.first_token_id == int(ref.argmax()) and prefill.name == "qwen3-vl-prefill"
    assert list(got.top_logits) == pytest.approx(ref[list(got.top_token_ids)].tolist(), abs=1e-4)
    # The deepstack rows sit on image tokens only, and they change the answer.
    on_images = out.token_ids == enc.image_token
    for level in out.deepstack:
        assert level[~on_images].eq(0).all() and level[on_images].abs().sum() > 0
    blind = prefill.prefill(
        out.embeddings, out.positions, out.token_ids, [torch.zeros_like(d) for d in out.deepstack]
    )
    assert max(abs(a - b) for a, b in zip(blind.top_logits, got.top_logits)) > 1e-3
    # Every level reaches the logits, the last one too (one decoder layer per level).
    for k in range(LEVELS):
        one_off = [d if j != k else torch.zeros_like(d) for j, d in enumerate(out.deepstack)]
        changed = prefill.prefill(out.embeddings, out.positions, out.token_ids, one_off)
        assert max(abs(a - b) for a, b in zip(changed.top_logits, got.top_logits)) > 1e-4, k
    with pytest.raises(ValueError, match="2 deepstack field"):
        prefill.prefill(out.embeddings, out.positions, out.token_ids, out.deepstack[:2])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=st.integers(32, 3000), h=st.integers(32, 3000))
def test_token_count_is_qwen3s_processor_count(enc, w, h):
    if max(w, h) / min(w, h) > 200:
        return
    n = qwen_images.image_tokens(w, h, QWEN3_VL)
    assert n == demo.qwen_image_tokens(w, h, demo.QWEN3_TOKENS)  # the independent rule
    batch = enc.qwen.processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    assert int(batch["image_grid_thw"].prod()) // 4 == n
    assert 64 <= n <= 16384


def test_encode_into_writes_every_deepstack_field(enc):
    inp = EncodeInputs((image(150, 90, 3),), "see <image> now")
    record = RecordLayout.pack(payload_fields(HIDDEN, "bfloat16", LEVELS))
    total = enc.token_count(inp)
    pool = BlockPool(record, 16, -(-total // 16) + 2, "cpu")
    blocks = pool.allocator.try_alloc(-(-total // 16))
    try:
        ref = enc.encode(EncodeInputs(inp.images, inp.text))
        enc.prepare(inp)
        enc.encode_into(inp, pool.runs(blocks, 0, total), record)
        runs = pool.runs(blocks, 0, total)
        got = {f.name: torch.cat([field_of(r, f) for r in runs]) for f in record.fields}
        assert torch.equal(got["embeddings"], ref.embeddings.to(torch.bfloat16))
        for k in range(LEVELS):
            assert torch.equal(got[f"deepstack_{k}"], ref.deepstack[k].to(torch.bfloat16))
    finally:
        pool.allocator.free(blocks)
    assert pool.allocator.used_count == 0 and pool.allocator.free_count == pool.num_blocks


def test_the_cache_keeps_every_deepstack_level(enc):
    cached = qwen.load_encoder_model("tiny-qwen3", HIDDEN, cache=EmbeddingCache(64 * 2**20))
    a = image(120, 120, 4)
    plain = enc.encode(EncodeInputs((a,), "<image>"))
    first = cached.encode(EncodeInputs((a,), "<image>"))
    second = cached.encode(EncodeInputs((a,), "again: <image>"))  # a hit: no vision tower
    assert cached.cache is not None and cached.cache.hits == 1
    image_rows = slice(1, 1 + qwen_images.image_tokens(120, 120, QWEN3_VL))
    shift = len(b"again: ")
    moved = slice(image_rows.start + shift, image_rows.stop + shift)
    assert torch.equal(second.embeddings[moved], plain.embeddings[image_rows])
    for k in range(LEVELS):
        assert torch.equal(first.deepstack[k], plain.deepstack[k])
        assert torch.equal(second.deepstack[k][moved], plain.deepstack[k][image_rows])


def _tiny_qwen25_config():
    from transformers import Qwen2_5_VLConfig

    ids = qwen_weights.TINY_SPECIAL_TOKENS
    return Qwen2_5_VLConfig(  # type: ignore[call-arg]
        text_config=dict(
            vocab_size=qwen_weights.TINY_VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _tiny_qwen3_moe_config():
    from transformers import Qwen3VLMoeConfig

    dense = qwen_weights.tiny_qwen3_config(HIDDEN).to_dict()
    text = dense["text_config"] | dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN, decoder_sparse_step=1
    )
    for key in ("model_type", "architectures", "dtype", "transformers_version"):
        text.pop(key, None)
    vision = {k: v for k, v in dense["vision_config"].items() if k != "model_type"}
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return Qwen3VLMoeConfig(  # type: ignore[call-arg]
        text_config=text, vision_config=vision, **{k: dense[k] for k in keys}
    )


BUILT = {"qwen2.5-vl": _tiny_qwen25_config, "qwen3-vl-moe": _tiny_qwen3_moe_config}


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl", "qwen3-vl-moe"])
def test_a_checkpoint_directory_is_loaded_as_its_config_says(tmp_path, full, family):
    """The architecture comes from config.json's model_type; the prefill of what the loaded
    encoder writes equals the library's forward of the same checkpoint."""
    if family == "qwen3-vl":
        full.model.save_pretrained(tmp_path)
        full.processor.save_pretrained(tmp_path)
    else:  # no preprocessor_config.json: the family's processor settings
        import transformers

        config = BUILT[family]()
        cls = getattr(transformers, next(f for f in FAMILIES if f.name == family).model_class)
        torch.manual_seed(0)
        cls(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] in (
        "qwen3_vl",
        "qwen2_5_vl",
        "qwen3_vl_moe",
    )
    config = EncoderConfig(model=str(tmp_path), hidden=HIDDEN)
    config.validate()
    assert config.model_info is not None and config.model_info.family.name == family
    levels = 0 if family == "qwen2.5-vl" else LEVELS
    assert [f.name for f in config.field_specs][3:] == [f"deepstack_{k}" for k in range(levels)]

    loaded = load_model(str(tmp_path), HIDDEN, "bfloat16")
    assert isinstance(loaded, qwen.QwenEncoderModel)
    assert loaded.name == family and loaded.deepstack_levels == levels
    whole = qwen_weights.load_qwen(str(tmp_path), HIDDEN)
    # The checkpoint has no tokenizer: text goes byte by byte, the specials by config ids.
    inp = EncodeInputs((image(90, 120, 5),), "<|vision_start|><|image_pad|><|vision_end|>")
    out = loaded.encode(inp)
    got = QwenPrefill(whole).prefill(out.embeddings, out.positions, out.token_ids, out.deepstack)
    ref = library_forward(whole, loaded, EncodeInputs(inp.images, inp.text))[0]
    assert got.first_token_id == int(ref.argmax())
    assert list(got.top_logits) == pytest.approx(ref[list(got.top_token_ids)].tolist(), abs=1e-4)


def test_an_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"model_type='llava'; known model types: \['qwen2_vl'"):
        EncoderConfig(model=str(tmp_path), hidden=HIDDEN).validate()


def test_a_processor_saved_whole_is_read_from_processor_config_json(tmp_path, full):
    """transformers 5 saves a whole processor as processor_config.json (the image processor's
    settings inside it): those settings are the checkpoint's, not the family's defaults."""
    full.model.save_pretrained(tmp_path)
    settings_ = full.processor.to_dict() | {"min_pixels": None, "max_pixels": None}
    settings_["size"] = {"shortest_edge": 4 * 32 * 32, "longest_edge": 64 * 32 * 32}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": settings_}))
    loaded = qwen.load_encoder_model(str(tmp_path), HIDDEN)
    assert (loaded.min_pixels, loaded.max_pixels) == (4 * 32 * 32, 64 * 32 * 32)
    # A 1000x1000 image is 64 tokens under these bounds (Qwen3-VL's own would give 961).
    assert loaded.token_count(EncodeInputs((image(1000, 1000),), "")) == 64 + 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["text_config"].pop("hidden_size"),
            r"has no integer hidden_size in text_config or at its top level \(found None\)",
        ),
        (
            lambda c: c["vision_config"].update(deepstack_visual_indexes=None),
            r"vision_config.deepstack_visual_indexes=None: must be a list of layer numbers",
        ),
        (
            lambda c: c["vision_config"].update(deepstack_visual_indexes=list(range(9))),
            r"has 9 deepstack levels, above the 8 a payload may carry",
        ),
    ],
    ids=["no-hidden-size", "indexes-not-a-list", "too-many-levels"],
)
def test_a_config_json_that_cannot_be_served_is_named(tmp_path, full, edit, message):
    config = json.loads(full.config.to_json_string())
    (tmp_path / "config.json").write_text(json.dumps(config))
    EncoderConfig(model=str(tmp_path), hidden=HIDDEN).validate()  # as written: fine
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.utime(tmp_path / "config.json", ns=(1, 1))  # another stamp: read again, not cached
    with pytest.raises(ConfigError, match=message):
        EncoderConfig(model=str(tmp_path), hidden=HIDDEN).validate()
