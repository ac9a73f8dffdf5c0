"""The demo's images and the Qwen2-VL token-count rule, recomputed here independently of the
model code so the demo checks the services' answer rather than repeating it."""

from __future__ import annotations

import math
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"


QWEN_FACTOR = 28


QWEN_MIN_PIXELS = 56 * 56


QWEN_MAX_PIXELS = 28 * 28 * 16384


def qwen_image_tokens(
    width: int, height: int, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> int:
    """Tokens of one image by Qwen2-VL's rule — resize to multiples of 28 within min/max pixels,
    14x14 patches merged 2x2, so (H/28)·(W/28) — recomputed here independently of the services
    (as `reference_payload` is for synthetic payloads)."""
    f = QWEN_FACTOR
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return (h_bar // f) * (w_bar // f)


def expected_image_request_tokens(images: Sequence[tuple[int, int, str]], text: str) -> int:
    """Payload tokens of an image request with the tiny model: one per UTF-8 byte of the text
    (placeholders removed), vision-start + image tokens + vision-end per image."""
    text_tokens = len(text.replace(IMAGE_PLACEHOLDER, "").encode("utf-8"))
    return text_tokens + sum(qwen_image_tokens(w, h) + 2 for w, h, _ in images)


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
