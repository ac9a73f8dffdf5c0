"""The demo's workload plan: seeded synthetic requests of every kind (one round, around the
initial allocation, several rounds, larger than 10 pools) and image requests."""

from __future__ import annotations

import dataclasses
import math
import random

from services.tools.demo._flags import BOUNDARY_OFFSETS, KINDS
from services.tools.demo._images import (
    QWEN2_TOKENS,
    TokenRule,
    expected_image_request_tokens,
    make_image,
)


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of the demo workload."""

    index: int
    kind: str
    """One of KINDS."""
    tokens: int
    """synthetic_tokens."""
    seed: int
    """synthetic_seed (distinct per request)."""
    request_id: str
    min_rounds: int
    """Fewest rounds the transfer can take: round 1 is at most the initial allocation and
    every later round at most the whole language pool. Without contention it is exact."""
    images: tuple[tuple[int, int, str], ...] = ()
    """Image requests (kind ``image``): (width, height, format) of each generated image."""
    text: str = ""
    """Image requests: the prompt (``<image>`` marks where an image goes)."""
    name: str = ""
    """Image requests: which entry of IMAGE_SET."""
    exact_tokens: bool = True
    """Whether `tokens` is exact (tiny model: byte-level text) or an estimate (a checkpoint)."""


def initial_allocation_tokens(initial_tokens: int, block_size: int, pool_blocks: int) -> int:
    """Tokens of the language's initial allocation: whole blocks, at most the whole pool."""
    blocks = min(max(1, math.ceil(initial_tokens / block_size)), pool_blocks)
    return blocks * block_size


def min_rounds(tokens: int, initial_alloc: int, pool_tokens: int) -> int:
    """Lower bound on the rounds of a `tokens` transfer (exact when nothing else competes)."""
    if tokens <= initial_alloc:
        return 1
    return 1 + math.ceil((tokens - initial_alloc) / pool_tokens)


def plan_workload(
    requests: int,
    *,
    seed: int = 1,
    block_size: int = 128,
    initial_tokens: int = 8192,
    language_pool_blocks: int = 96,
    encoder_pool_blocks: int | None = None,
) -> list[PlannedRequest]:
    """The deterministic (by `seed`) demo workload of `requests` requests.

    Request `i` is of kind ``KINDS[i % 4]``:

    - ``small``: 1..500 tokens, far below the initial allocation (one round);
    - ``boundary``: exactly at, just over and just under the initial allocation
      (offsets 0, +1, +5, -1, +2, +block_size, cycled);
    - ``multi10``: between 10x and 11x the whole language pool, so that it needs >= 10 rounds
      even though every round could use the whole pool;
    - ``medium``: 2..3 rounds without contention (at most 4 with some).

    Sizes are capped at the encoder pool's capacity (a request must fit in it at once).
    Every request gets a distinct synthetic seed.
    """
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    if block_size <= 0 or initial_tokens <= 0 or language_pool_blocks <= 0:
        raise ValueError("block_size, initial_tokens and language_pool_blocks must be > 0")
    rng = random.Random(f"epd-demo:{seed}")
    pool_tokens = language_pool_blocks * block_size
    initial = initial_allocation_tokens(initial_tokens, block_size, language_pool_blocks)
    cap = encoder_pool_blocks * block_size if encoder_pool_blocks else None
    seeds = rng.sample(range(2**32), requests)
    plan: list[PlannedRequest] = []
    boundary_count = 0
    for i in range(requests):
        kind = KINDS[i % len(KINDS)]
        if kind == "small":
            tokens = rng.randint(1, min(500, initial))
        elif kind == "boundary":
            off = BOUNDARY_OFFSETS[boundary_count % len(BOUNDARY_OFFSETS)]
            boundary_count += 1
            tokens = max(1, initial + (block_size if isinstance(off, str) else off))  # "block"
        elif kind == "multi10":
            tokens = rng.randint(10 * pool_tokens + 1, 11 * pool_tokens)
        else:  # medium
            tokens = rng.randint(initial + max(1, pool_tokens // 4), initial + 2 * pool_tokens)
        if cap is not None:
            tokens = min(tokens, cap)
        plan.append(
            PlannedRequest(
                index=i,
                kind=kind,
                tokens=tokens,
                seed=seeds[i],
                request_id=f"demo-{seed}-{i:04d}-{kind}",
                min_rounds=min_rounds(tokens, initial, pool_tokens),
            )
        )
    return plan


IMAGE_SET: tuple[tuple[str, tuple[tuple[int, int, str], ...], str], ...] = (
    ("thumbnail", ((224, 160, "png"),), "What is in this thumbnail?"),
    ("photo", ((1280, 720, "jpeg"),), "Describe the photo <image> in one sentence."),
    (
        "three",
        ((640, 480, "png"), (480, 640, "jpeg"), (1024, 256, "png")),
        "First <image>, then <image>, and a banner <image>: describe them.",
    ),
    ("panorama", ((3584, 1008, "jpeg"),), "A panorama <image> - which city is this?"),
    ("gallery", ((2240, 1260, "jpeg"),) * 3, "Compare these three pictures."),
    ("comic", ((1568, 1568, "png"),) * 4, "Tell the story of this four-panel comic."),
    ("album", ((1792, 1344, "png"),) * 7, "Seven photos: which one is the odd one out?"),
)
"""The image requests, cycled: from a few dozen tokens (thumbnail) to many thousands (gallery,
comic: 2 rounds with the default allocation; album, the 7th: 7 x 3,072 image tokens, 3 rounds),
PNG and JPEG, landscape, portrait, square and panorama aspect ratios. The default 6 leave the
album out: its prefill alone takes 6-12 s on 2 CPU cores. (`_run` sends the largest first.)"""


def plan_images(
    requests: int,
    *,
    seed: int = 1,
    first_index: int = 0,
    block_size: int = 128,
    initial_tokens: int = 8192,
    language_pool_blocks: int = 96,
    exact_tokens: bool = True,
    rule: TokenRule = QWEN2_TOKENS,
) -> list[PlannedRequest]:
    """`requests` image requests, cycling through IMAGE_SET (seeded image contents); `rule` is
    the model family's token count."""
    pool_tokens = language_pool_blocks * block_size
    initial = initial_allocation_tokens(initial_tokens, block_size, language_pool_blocks)
    plan = []
    for i in range(requests):
        name, images, text = IMAGE_SET[i % len(IMAGE_SET)]
        tokens = expected_image_request_tokens(images, text, rule)
        plan.append(
            PlannedRequest(
                index=first_index + i,
                kind="image",
                tokens=tokens,
                seed=(seed * 1000 + i) % 2**32,
                request_id=f"demo-{seed}-{first_index + i:04d}-image-{name}",
                min_rounds=min_rounds(tokens, initial, pool_tokens),
                images=images,
                text=text,
                name=name,
                exact_tokens=exact_tokens,
            )
        )
    return plan


def image_payloads(request: PlannedRequest) -> list[tuple[bytes, str]]:
    """(bytes, mime type) of a planned image request's images."""
    return [
        (
            make_image(w, h, fmt, seed=request.seed + k),
            "image/jpeg" if fmt == "jpeg" else "image/png",
        )
        for k, (w, h, fmt) in enumerate(request.images)
    ]
