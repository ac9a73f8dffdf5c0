"""Request size limits that both services enforce before allocating anything.

`check_images` is called by the language's front door (Generate, before any block is reserved)
and by the encoder (Encode, before any image is decoded or any source block allocated), with the
same settings (`max_images`, `max_image_bytes`). Pure: no grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import InvalidArgument


def check_images(
    what: str, image_sizes: Sequence[int], *, max_images: int, max_image_bytes: int
) -> None:
    """INVALID_ARGUMENT naming the count or the first image (`images[i]`) above a limit."""
    if len(image_sizes) > max_images:
        raise InvalidArgument(f"{what}: {len(image_sizes)} images, above max_images={max_images}")
    for i, size in enumerate(image_sizes):
        if size > max_image_bytes:
            raise InvalidArgument(
                f"{what}: images[{i}] has {size} bytes, above max_image_bytes={max_image_bytes}"
            )


IMAGE_KEY_HEX = 64  # an image key is a SHA-256 in lower-case hex


def check_held_images(what: str, keys: Sequence[str], max_images: int) -> frozenset[str]:
    """InitRequest.held_images as a set: at most `max_images` SHA-256 keys in lower-case hex;
    INVALID_ARGUMENT naming the first bad one (a request has no more images than that)."""
    if len(keys) > max_images:
        raise InvalidArgument(f"{what}: {len(keys)} held_images, above max_images={max_images}")
    for i, key in enumerate(keys):
        if len(key) != IMAGE_KEY_HEX or key.strip("0123456789abcdef"):
            raise InvalidArgument(
                f"{what}: held_images[{i}]={key[:80]!r} is not a SHA-256 key in lower-case hex"
            )
    return frozenset(keys)
