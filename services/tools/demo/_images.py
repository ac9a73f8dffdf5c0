"""The demo's images and the Qwen token-count rules, recomputed here independently of the
model code so the demo checks the services' answer rather than repeating it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass(frozen=True)
class TokenRule:
    """How a Qwen family's image processor sizes an image: each side resized to a multiple of
    `factor` pixels (patch size x merge size) within [min_pixels, max_pixels] in all; one token
    per factor x factor pixels."""

    factor: int
    min_pixels: int
    max_pixels: int
    consumer: str
    """The language's prefill consumer for this family."""


QWEN2_TOKENS = TokenRule(28, 56 * 56, 28 * 28 * 16384, "qwen2-vl-prefill")
"""Qwen2-VL and Qwen2.5-VL: 14-pixel patches merged 2x2; Qwen2-VL-7B's preprocessor bounds."""
QWEN3_TOKENS = TokenRule(32, 65536, 16777216, "qwen3-vl-prefill")
"""Qwen3-VL: 16-pixel patches merged 2x2; Qwen3-VL-8B's preprocessor bounds."""


def token_rule(model: str) -> TokenRule:
    """The rule of a `--model`: `tiny-qwen3` or a checkpoint whose config.json says qwen3_vl*
    is Qwen3-VL's, anything else Qwen2-VL's."""
    if model == "tiny-qwen3":
        return QWEN3_TOKENS
    try:
        with open(os.path.join(model, "config.json")) as f:
            model_type = json.load(f).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return QWEN2_TOKENS
    return QWEN3_TOKENS if str(model_type).startswith("qwen3_vl") else QWEN2_TOKENS


def qwen_image_tokens(width: int, height: int, rule: TokenRule = QWEN2_TOKENS) -> int:
    """Tokens of one image: resize to multiples of `rule.factor` within the pixel bounds, so
    (H/f)·(W/f) — recomputed here independently of the services (as `reference_payload` is for
    synthetic payloads)."""
    f = rule.factor
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > rule.max_pixels:
        beta = math.sqrt(height * width / rule.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < rule.min_pixels:
        beta = math.sqrt(rule.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return (h_bar // f) * (w_bar // f)


def expected_image_request_tokens(
    images: Sequence[tuple[int, int, str]], text: str, rule: TokenRule = QWEN2_TOKENS
) -> int:
    """Payload tokens of an image request with a tiny model: one per UTF-8 byte of the text
    (placeholders removed), vision-start + image tokens + vision-end per image."""
    text_tokens = len(text.replace(IMAGE_PLACEHOLDER, "").encode("utf-8"))
    return text_tokens + sum(qwen_image_tokens(w, h, rule) + 2 for w, h, _ in images)


def make_image(width: int, height: int, fmt: str = "png", seed: int = 0) -> bytes:
    """A synthetic picture (smooth gradients, rings and a little noise) as PNG or JPEG bytes."""
    import io  # keep `epd demo --help` light

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Drawn at a quarter of the size and scaled up (cheap), with a little noise on top.
    w, h = max(1, width // 4), max(1, height // 4)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rings = np.sin(np.hypot(x - cx, y - cy) / rng.uniform(2, 10)) * 127 + 128
    rgb = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), rings], axis=-1)
    rgb += rng.normal(0, 8, size=rgb.shape).astype(np.float32)
    buf = io.BytesIO()
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    if fmt.lower() in ("jpg", "jpeg"):
        image.save(buf, "JPEG", quality=88)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
