"""How an image becomes Qwen vision tokens, read from its header before any pixel is decoded.

The image processor's own smart resize (imported from transformers, not re-implemented) rounds
each side to a multiple of patch × merge pixels (28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL)
within the processor's pixel bounds; one token is then merge × merge patches. The encoder counts
a request's tokens this way, so it can say a payload's size before the vision tower runs.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from common.errors import InvalidArgument, shown
from common.models import QWEN2_VL, ModelFamily

MAX_ASPECT_RATIO = 200
"""The library's smart resize refuses images more elongated than this."""
MAX_DECODE_PIXELS = 1 << 28
"""Images above this many pixels are refused before they are decoded (decompression bombs)."""
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}


@dataclasses.dataclass
class ImageInfo:
    index: int
    format: str
    width: int
    height: int
    grid_h: int
    """Patch rows after the resize (resized height / patch size)."""
    grid_w: int
    merge_size: int = QWEN2_VL.merge_size

    @property
    def tokens(self) -> int:
        return (self.grid_h // self.merge_size) * (self.grid_w // self.merge_size)


def smart_resize(
    height: int,
    width: int,
    family: ModelFamily = QWEN2_VL,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """The image processor's own resize rule (imported, not re-implemented); the bounds default
    to the family's."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as rule

    return rule(
        height,
        width,
        factor=family.pixels_per_token_side,
        min_pixels=family.min_pixels if min_pixels is None else min_pixels,
        max_pixels=family.max_pixels if max_pixels is None else max_pixels,
    )


def image_tokens(
    width: int,
    height: int,
    family: ModelFamily = QWEN2_VL,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """Tokens one image of this size becomes: (H/s)·(W/s) after the smart resize, s = patch ×
    merge pixels (28 for Qwen2-VL, 32 for Qwen3-VL)."""
    h, w = smart_resize(height, width, family, min_pixels, max_pixels)
    side = family.pixels_per_token_side
    return (h // side) * (w // side)


def probe_image(
    index: int, data: bytes, mime: str, family: ModelFamily, min_pixels: int, max_pixels: int
) -> tuple[Any, ImageInfo]:
    """Read an image's header (no pixel decoding): its format, size and patch grid, or
    InvalidArgument naming the image and why."""
    from PIL import Image, UnidentifiedImageError

    what = f"images[{index}]"
    if not data:
        raise InvalidArgument(f"{what}: data is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"{what}: not a PNG or JPEG image (mime_type={shown(mime)}, first bytes {data[:8]!r})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any decoder complaint is the client's bad image
        raise InvalidArgument(f"{what}: corrupt image header: {e}") from None
    fmt = img.format or ""
    kind = FORMATS.get(fmt)
    if kind is None:
        raise InvalidArgument(f"{what}: unsupported image format {img.format} (PNG or JPEG only)")
    if mime and mime != kind:
        raise InvalidArgument(f"{what}: mime_type={shown(mime)} but the data is {kind}")
    width, height = img.size
    side = family.pixels_per_token_side
    if width < side or height < side:
        raise InvalidArgument(
            f"{what}: {width}x{height} pixels is below the minimum image size {side}x{side}"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidArgument(
            f"{what}: {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}"
        )
    if width * height > MAX_DECODE_PIXELS:
        raise InvalidArgument(
            f"{what}: {width}x{height} pixels is above the largest image accepted "
            f"({MAX_DECODE_PIXELS} pixels)"
        )
    h, w = smart_resize(height, width, family, min_pixels, max_pixels)
    patch = family.patch_size
    return img, ImageInfo(index, fmt, width, height, h // patch, w // patch, family.merge_size)


def decode_image(img, info: ImageInfo):
    """Decode every pixel (a truncated or corrupt file fails here) and convert to RGB."""
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise InvalidArgument(
            f"images[{info.index}]: corrupt {info.format} data ({info.width}x{info.height}): {e}"
        ) from None
