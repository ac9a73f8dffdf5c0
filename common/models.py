"""The vision-language model families the services run, described without loading anything.

A family says which transformers class holds its weights, how its images become tokens (patch
and merge sizes, the pixel bounds of its released checkpoints' preprocessor_config.json), which
consumer runs its language part, and whether it has deepstack features: the extra per-token
fields its payload carries (`common/layout.payload_fields`). A checkpoint's family comes from
the `model_type` of its config.json; the seeded tiny models name theirs.

The configuration (common/config.py) reads only this and a checkpoint's config.json, so a
setting is checked before torch or transformers are imported.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One family of Qwen vision-language models."""

    name: str
    """Our name for it, in logs and errors: 'qwen2-vl'."""
    model_types: tuple[str, ...]
    """`model_type` values of its checkpoints' config.json."""
    model_class: str
    """The transformers class of the whole model (vision tower, text model, lm_head)."""
    consumer: str
    """The `--consumer` that runs its language part on a received payload."""
    patch_size: int
    """Pixels per side of one vision patch; a token is `merge_size`² patches."""
    merge_size: int
    min_pixels: int
    """The image processor's lower bound of pixels after its resize (`size.shortest_edge`)."""
    max_pixels: int
    """Its upper bound (`size.longest_edge`)."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    deepstack: bool
    """Whether its vision tower also gives deepstack features, one [hidden] row per image token
    per level, which its text model adds to the hidden states of its first layers."""

    @property
    def pixels_per_token_side(self) -> int:
        return self.patch_size * self.merge_size


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

QWEN2_VL = ModelFamily(
    name="qwen2-vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    consumer="qwen2-vl-prefill",
    patch_size=14,
    merge_size=2,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 16384,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    deepstack=False,
)
QWEN2_5_VL = dataclasses.replace(
    QWEN2_VL,
    name="qwen2.5-vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    max_pixels=12845056,
)
QWEN3_VL = ModelFamily(
    name="qwen3-vl",
    model_types=("qwen3_vl",),
    model_class="Qwen3VLForConditionalGeneration",
    consumer="qwen3-vl-prefill",
    patch_size=16,
    merge_size=2,
    min_pixels=65536,
    max_pixels=16777216,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    deepstack=True,
)
QWEN3_VL_MOE = dataclasses.replace(
    QWEN3_VL,
    name="qwen3-vl-moe",
    model_types=("qwen3_vl_moe",),
    model_class="Qwen3VLMoeForConditionalGeneration",
)
FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE)

TINY_MODELS = {"tiny": QWEN2_VL, "tiny-qwen3": QWEN3_VL}
"""Models built from a config with seeded weights (no download), by `--model` name."""
TINY_DEEPSTACK_LEVELS = 3
"""Deepstack levels of `tiny-qwen3`: as many as the released Qwen3-VL checkpoints have."""


def family_of_model_type(model_type: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a `--model` setting is, read from its name or its checkpoint's config.json."""

    name: str
    family: ModelFamily
    hidden: int
    """The text model's hidden size: the width of the embeddings and deepstack fields."""
    deepstack_levels: int
    """Per-token deepstack fields the model fills (0 for a family without them)."""
