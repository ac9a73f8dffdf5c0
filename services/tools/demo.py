"""`epd demo`: start an encoder and a language service on loopback, send a mixed workload in
which some requests need many transfer rounds, verify every byte, print a summary (DESIGN §12).

With `--model tiny` (the default) both services run a small seeded Qwen2-VL (the encoder its
vision tower, the language its prefill, `--consumer qwen2-vl-prefill`) and the workload adds
requests with real images the demo generates (PNG and JPEG, from a thumbnail of a few dozen
tokens to an album of seven photos that needs three rounds); their token counts are checked
against the image-size rule recomputed here, and the first generated token is reported.

The payload check uses `services.tools.reference_payload`, an independent numpy implementation of the
§14 synthetic payload and digest, so the demo checks the services' code rather than repeating it.

Entry points used by `services/tools/cli.py`: ``add_arguments(parser)`` and ``run(args) -> int``.
Everything else here is split into small pieces (workload plan, percentiles, summary, table,
process handling) so that tests can exercise them without the real services.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from services.tools import reference_payload

# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------

KINDS = ("multi10", "small", "boundary", "medium")
"""Request kinds, in the order the workload cycles through them (longest first, so the big
requests start early and the wall time stays short)."""

KIND_DESCRIPTIONS = {
    "small": "far below the initial allocation (1-500 tokens)",
    "boundary": "at / just around the initial allocation",
    "multi10": "larger than 10x the language pool (>= 10 rounds)",
    "medium": "2-4 rounds",
}

DTYPE_CHOICES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
BOUNDARY_OFFSETS = (0, 1, 5, -1, 2, "block")
"""Offsets from the initial allocation, cycled through by the `boundary` requests."""


def _env_default(flag: str, default: Any) -> Any:
    """`EPD_<FLAG_NAME>` from the environment, else `default` (§14: every flag reads its env
    variable; a command-line flag wins). argparse converts string defaults with `type=`."""
    return os.environ.get("EPD_" + flag.lstrip("-").replace("-", "_").upper(), default)


def _env_flag(flag: str) -> bool:
    value = os.environ.get("EPD_" + flag.lstrip("-").replace("-", "_").upper(), "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `epd demo` flags to `parser`. Every flag also reads `EPD_<FLAG>`."""
    d = _env_default
    parser.add_argument(
        "--requests",
        type=_positive_int,
        default=d("--requests", 24),
        help="number of requests to send (default 24); any value >= 4 covers every request kind",
    )
    parser.add_argument(
        "--tp",
        type=_positive_int,
        default=d("--tp", 1),
        help="language tensor-parallel ranks (only 1 for now)",
    )
    parser.add_argument(
        "--encoders",
        type=_positive_int,
        default=d("--encoders", 1),
        help="number of encoder instances (1 to 8); the language spreads requests over them",
    )
    parser.add_argument(
        "--kill-encoder-after",
        type=float,
        default=d("--kill-encoder-after", 0.0),
        metavar="S",
        help="SIGKILL the last encoder S seconds into the workload (0 = never; needs --encoders >= 2): "
        "requests fail over to the others, the summary counts failed-over and failed requests",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=_env_flag("--json"),
        help="print one JSON object on stdout instead of the table",
    )
    parser.add_argument(
        "--hidden",
        type=_positive_int,
        default=d("--hidden", 256),
        help="embedding width = the tiny model's hidden size (default 256, so the "
        "prefill of many-thousand-token image requests stays fast on a CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=d("--dtype", "bfloat16"),
        help="embeddings dtype (default bfloat16)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int,
        default=d("--block-size", 128),
        help="tokens per block (default 128)",
    )
    parser.add_argument(
        "--initial-tokens",
        type=_positive_int,
        default=d("--initial-tokens", 8192),
        help="language initial allocation in tokens (default 8192)",
    )
    parser.add_argument(
        "--language-pool-blocks",
        type=_positive_int,
        default=d("--language-pool-blocks", 96),
        help="language pool size in blocks (default 96 = 12288 tokens at "
        "block size 128, so the big requests exceed the whole pool)",
    )
    parser.add_argument(
        "--encoder-pool-blocks",
        type=_positive_int,
        default=d("--encoder-pool-blocks", 4096),
        help="encoder source pool size in blocks (default 4096)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=d("--concurrency", 8),
        help="requests in flight at once (default 8)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=d("--seed", 1),
        help="seed of the workload mix and the synthetic payload seeds",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=d("--startup-timeout", 60.0),
        help="seconds to wait for each service to report ready (default 60)",
    )
    parser.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=d("--request-timeout", 300.0),
        help="deadline of each Generate call in seconds (default 300)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        default=_env_flag("--no-progress"),
        help="no progress bar (it is only drawn when stderr is a terminal)",
    )
    parser.add_argument(
        "--log-dir",
        default=d("--log-dir", None),
        help="keep the services' stderr logs in this directory "
        "(default: temporary files, shown on failure)",
    )
    parser.add_argument(
        "--model",
        default=d("--model", "tiny"),
        help="'tiny' (default): both services run a small seeded Qwen2-VL and image "
        "requests are added; 'none': synthetic requests only (null consumer); "
        "PATH: a local Qwen2-VL checkpoint (GPU hosts; --hidden must match it)",
    )
    parser.add_argument(
        "--image-requests",
        type=_non_negative_int,
        default=d("--image-requests", 6),
        help="requests with generated images (default 6; none with --model none)",
    )
    add_process_arguments(
        parser, encoder_example="--model=tiny", language_example="--alloc-policy=fixed"
    )
    from services.edge import security

    security.add_client_arguments(parser)  # used by the demo's client and passed to both services


# --------------------------------------------------------------------------------------------
# Workload plan (pure)
# --------------------------------------------------------------------------------------------


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
            tokens = max(1, initial + (block_size if off == "block" else off))
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


# --------------------------------------------------------------------------------------------
# Image requests (pure, except make_image)
# --------------------------------------------------------------------------------------------

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

KIND_DESCRIPTIONS["image"] = "generated PNG/JPEG images, tiny Qwen2-VL + prefill"
IMAGE_PLACEHOLDER = "<image>"
# Qwen2-VL's image processor (and the tiny model): 4 .. 16384 tokens per image.
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


def plan_images(
    requests: int,
    *,
    seed: int = 1,
    first_index: int = 0,
    block_size: int = 128,
    initial_tokens: int = 8192,
    language_pool_blocks: int = 96,
    exact_tokens: bool = True,
) -> list[PlannedRequest]:
    """`requests` image requests, cycling through IMAGE_SET (seeded image contents)."""
    pool_tokens = language_pool_blocks * block_size
    initial = initial_allocation_tokens(initial_tokens, block_size, language_pool_blocks)
    plan = []
    for i in range(requests):
        name, images, text = IMAGE_SET[i % len(IMAGE_SET)]
        tokens = expected_image_request_tokens(images, text)
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
        (width, height), Image.BILINEAR
    )
    if fmt.lower() in ("jpg", "jpeg"):
        image.save(buf, "JPEG", quality=88)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def image_payloads(request: PlannedRequest) -> list[tuple[bytes, str]]:
    """(bytes, mime type) of a planned image request's images."""
    return [
        (
            make_image(w, h, fmt, seed=request.seed + k),
            "image/jpeg" if fmt == "jpeg" else "image/png",
        )
        for k, (w, h, fmt) in enumerate(request.images)
    ]


# --------------------------------------------------------------------------------------------
# Results, verification, summary (pure)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestResult:
    """What happened to one planned request."""

    request: PlannedRequest
    latency_s: float = 0.0
    """Client-side wall time of the Generate call."""
    rpc_ok: bool = False
    error_code: str = ""
    """gRPC status code name when the call failed (e.g. ``RESOURCE_EXHAUSTED``)."""
    error_message: str = ""
    total_tokens: int = 0
    rounds: int = 0
    bytes: int = 0
    transfer_seconds: float = 0.0
    total_seconds: float = 0.0
    integrity_verified: bool = False
    payload_sha256: str = ""
    rank_sha256: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """(rank, digest) of every data rank's own payload (tp > 1: each rank is checked)."""
    expected_sha256: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    """Why a reply does not match the request (empty when it does)."""
    first_token_id: int = -1
    """The consumer's first generated token (-1: none, e.g. the null consumer or a synthetic payload)."""
    consumer: str = ""
    top_token_ids: list[int] = dataclasses.field(default_factory=list)
    top_logits: list[float] = dataclasses.field(default_factory=list)
    logits_norm: float = 0.0
    prefill_seconds: float = 0.0
    prefill_skipped: str = ""
    position_delta: int = 0
    encoder: str = ""
    """The encoder that served it (GenerateReply.encoder)."""
    attempts: int = 0
    failed_over_from: str = ""

    @property
    def status(self) -> str:
        """``ok``, ``failed`` (the RPC failed) or ``mismatch`` (a reply with wrong content)."""
        if not self.rpc_ok:
            return "failed"
        return "mismatch" if self.problems else "ok"


def check_reply(result: RequestResult, expected_sha256: str) -> list[str]:
    """Compare a successful reply with the request and the reference digest; set and return
    `result.problems`."""
    req = result.request
    problems = []
    result.expected_sha256 = expected_sha256
    if result.total_tokens != req.tokens:
        problems.append(f"total_tokens {result.total_tokens} != requested {req.tokens}")
    if not result.integrity_verified:
        problems.append("integrity_verified is false")
    if not result.payload_sha256:
        problems.append("no payload_sha256 in the reply")
    elif result.payload_sha256.lower() != expected_sha256.lower():
        problems.append(f"payload_sha256 {result.payload_sha256} != reference {expected_sha256}")
    for rank, digest in result.rank_sha256:
        if digest.lower() != expected_sha256.lower():
            problems.append(
                f"rank {rank} payload_sha256 {digest or '(none)'} != reference {expected_sha256}"
            )
    result.problems = problems
    return problems


def check_image_reply(result: RequestResult, expect_first_token: bool = True) -> list[str]:
    """An image request's reply: the token count the size rule predicts (when exact), every data
    rank holding the same payload, and a first token from the prefill consumer."""
    req = result.request
    problems = []
    if req.exact_tokens and result.total_tokens != req.tokens:
        problems.append(
            f"total_tokens {result.total_tokens} != {req.tokens} predicted from the image sizes"
        )
    if not result.integrity_verified:
        problems.append("integrity_verified is false")
    digests = {d.lower() for _, d in result.rank_sha256}
    if len(digests) > 1:
        problems.append(f"data ranks hold different payloads: {sorted(result.rank_sha256)}")
    if expect_first_token:
        if result.first_token_id < 0:
            problems.append(
                f"no first token (consumer {result.consumer or '?'}"
                f"{': ' + result.prefill_skipped if result.prefill_skipped else ''})"
            )
        elif result.top_token_ids and result.top_token_ids[0] != result.first_token_id:
            problems.append(
                f"first_token_id {result.first_token_id} is not the top logit {result.top_token_ids[0]}"
            )
    result.problems = problems
    return problems


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between closest ranks (as
    numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _group_stats(results: Sequence[RequestResult]) -> dict[str, Any]:
    answered = [r for r in results if r.rpc_ok]
    latencies = [r.latency_s * 1000.0 for r in answered]
    rounds = [r.rounds for r in answered]
    return {
        "requests": len(results),
        "succeeded": sum(r.status == "ok" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "mismatches": sum(r.status == "mismatch" for r in results),
        "tokens": sum(r.total_tokens for r in answered),
        "bytes": sum(r.bytes for r in answered),
        "rounds_max": max(rounds, default=0),
        "rounds_total": sum(rounds),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
    }


def summarize(
    results: Sequence[RequestResult], wall_seconds: float, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The demo's result object (what `--json` prints). Keys fixed by §14: requests, succeeded,
    failed, mismatches, tokens, bytes, rounds_max, rounds_total, gbps, p50_ms, p99_ms."""
    out = _group_stats(results)
    out["gbps"] = float(f"{out['bytes'] / wall_seconds / 1e9:.6g}") if wall_seconds > 0 else 0.0
    out["wall_seconds"] = round(wall_seconds, 6)
    out["requested_tokens"] = sum(r.request.tokens for r in results)
    if out["mismatches"]:
        out["integrity"] = "MISMATCH"
    elif out["succeeded"]:
        out["integrity"] = "OK"
    else:
        out["integrity"] = "UNVERIFIED"
    kinds: dict[str, Any] = {}
    for kind in (*KINDS, "image"):
        group = [r for r in results if r.request.kind == kind]
        if not group:
            continue
        stats = _group_stats(group)
        answered = [r for r in group if r.rpc_ok]
        stats["description"] = KIND_DESCRIPTIONS[kind]
        stats["tokens_min"] = min((r.request.tokens for r in group), default=0)
        stats["tokens_max"] = max((r.request.tokens for r in group), default=0)
        stats["rounds_min"] = min((r.rounds for r in answered), default=0)
        stats["expected_min_rounds"] = min(r.request.min_rounds for r in group)
        kinds[kind] = stats
    out["kinds"] = kinds
    out["errors"] = [
        {
            "request_id": r.request.request_id,
            "kind": r.request.kind,
            "tokens": r.request.tokens,
            "seed": r.request.seed,
            "status": r.status,
            "code": r.error_code or None,
            "message": r.error_message if r.status == "failed" else "; ".join(r.problems),
        }
        for r in results
        if r.status != "ok"
    ]
    out["synthetic_requests"] = sum(1 for r in results if r.request.kind != "image")
    out["digests_matched"] = sum(
        1 for r in results if r.request.kind != "image" and r.status == "ok"
    )
    out["per_request"] = [
        {
            "request_id": r.request.request_id,
            "kind": r.request.kind,
            "tokens": r.total_tokens or r.request.tokens,
            "rounds": r.rounds,
            "first_token_id": r.first_token_id,
            "latency_ms": round(r.latency_s * 1000.0, 3),
            "status": r.status,
        }
        for r in results
    ]
    out["image_requests"] = [
        {
            "request_id": r.request.request_id,
            "name": r.request.name,
            "images": [f"{w}x{h} {fmt}" for w, h, fmt in r.request.images],
            "expected_tokens": r.request.tokens if r.request.exact_tokens else None,
            "tokens": r.total_tokens,
            "rounds": r.rounds,
            "first_token_id": r.first_token_id,
            "top_token_ids": r.top_token_ids,
            "top_logits": [round(v, 4) for v in r.top_logits],
            "logits_norm": round(r.logits_norm, 4),
            "mrope_position_delta": r.position_delta,
            "prefill_ms": round(r.prefill_seconds * 1000.0, 3),
            "latency_ms": round(r.latency_s * 1000.0, 3),
            "prefill_skipped": r.prefill_skipped,
            "status": r.status,
        }
        for r in results
        if r.request.kind == "image"
    ]
    per_encoder: dict[str, int] = {}
    for r in results:
        if r.rpc_ok and r.encoder:
            per_encoder[r.encoder] = per_encoder.get(r.encoder, 0) + 1
    out["per_encoder"] = dict(sorted(per_encoder.items()))
    out["failed_over"] = sum(1 for r in results if r.rpc_ok and r.failed_over_from)
    out["failed_over_requests"] = [
        {"request_id": r.request.request_id, "from": r.failed_over_from, "to": r.encoder}
        for r in results
        if r.rpc_ok and r.failed_over_from
    ]
    if config:
        out["config"] = dict(config)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout (without --json)."""
    s = summary
    cfg = s.get("config") or {}
    lines = []
    if cfg:
        lines.append(
            f"epd demo: {s['requests']} requests, concurrency {cfg.get('concurrency')}, "
            f"hidden {cfg.get('hidden')} {cfg.get('dtype')}, block {cfg.get('block_size')} tokens, "
            f"{cfg.get('tp', 1)} language rank(s)"
        )
        lines.append(
            f"          language pool {cfg.get('language_pool_blocks')} blocks "
            f"({cfg.get('language_pool_tokens', 0):,} tokens), initial allocation "
            f"{cfg.get('initial_allocation_tokens', 0):,} tokens, encoder pool "
            f"{cfg.get('encoder_pool_blocks')} blocks"
        )
        lines.append("")
    synthetic = s.get("synthetic_requests", s["requests"])
    verified = f"{s.get('digests_matched', s['succeeded'])}/{synthetic} digests match the reference"
    if int(cfg.get("tp") or 1) > 1:
        verified += f", on every data rank of {cfg.get('tp')}"
    images = s.get("image_requests") or []
    if images:
        good = sum(1 for r in images if r["status"] == "ok")
        verified += (
            f"; {good}/{len(images)} image requests with the predicted tokens and a first token"
        )
    rows = [
        ("requests", f"{s['requests']}"),
        ("succeeded", f"{s['succeeded']}"),
        ("failed", f"{s['failed']}"),
        ("mismatches", f"{s['mismatches']}"),
        ("tokens", f"{s['tokens']:,}"),
        ("bytes", f"{s['bytes']:,}  ({_fmt_bytes(s['bytes'])})"),
        ("rounds", f"max {s['rounds_max']}, total {s['rounds_total']}"),
        ("wall time", f"{s['wall_seconds']:.2f} s"),
        ("aggregate", f"{s['gbps']:.3f} GB/s"),
        ("latency", f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms"),
        ("integrity", f"{s['integrity']} ({verified})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    kinds = s.get("kinds") or {}
    if kinds:
        lines.append("")
        header = (
            f"  {'kind':<9} {'n':>4} {'ok':>4} {'fail':>4} {'mism':>4} "
            f"{'tokens':>17} {'rounds':>8} {'p50 ms':>9} {'p99 ms':>9}  what"
        )
        lines.append(header)
        for kind, k in kinds.items():
            tokens = (
                f"{k['tokens_min']:,}"
                if k["tokens_min"] == k["tokens_max"]
                else f"{k['tokens_min']:,}..{k['tokens_max']:,}"
            )
            rounds = (
                f"{k['rounds_min']}"
                if k["rounds_min"] == k["rounds_max"]
                else f"{k['rounds_min']}..{k['rounds_max']}"
            )
            lines.append(
                f"  {kind:<9} {k['requests']:>4} {k['succeeded']:>4} {k['failed']:>4} "
                f"{k['mismatches']:>4} {tokens:>17} {rounds:>8} {k['p50_ms']:>9.1f} "
                f"{k['p99_ms']:>9.1f}  {k['description']}"
            )
    if images:
        lines.append("")
        lines.append(
            f"  image requests (model {cfg.get('model', '?')}: vision tower on the encoder, "
            f"qwen2-vl-prefill on the language)"
        )
        lines.append(
            f"  {'request':<10} {'images':<28} {'tokens':>7} {'rounds':>6} {'first token':>11} "
            f"{'top logit':>9} {'prefill ms':>10} {'latency ms':>10}"
        )
        for r in images:
            shapes = r["images"]
            what = (
                shapes[0]
                if len(shapes) == 1
                else f"{len(shapes)} x {shapes[0]}"
                if len(set(shapes)) == 1
                else ",".join(x.split()[0] for x in shapes)
            )
            top = f"{r['top_logits'][0]:.3f}" if r["top_logits"] else "-"
            first = str(r["first_token_id"]) if r["first_token_id"] >= 0 else "-"
            lines.append(
                f"  {r['name']:<10} {what[:28]:<28} {r['tokens']:>7,} {r['rounds']:>6} {first:>11} "
                f"{top:>9} {r['prefill_ms']:>10.1f} {r['latency_ms']:>10.1f}"
                + ("" if r["status"] == "ok" else f"  {r['status'].upper()}")
            )
        skipped = [r for r in s.get("per_request", []) if r["kind"] != "image"]
        if skipped:
            lines.append(
                f"  (the {len(skipped)} synthetic payloads are no model input: the prefill skips "
                f"them, first token -1)"
            )
    if len(s.get("per_encoder", {})) > 1 or s.get("failed_over") or cfg.get("killed_encoder"):
        lines.append("")
        spread = ", ".join(f"{name}: {n}" for name, n in s.get("per_encoder", {}).items())
        lines.append(f"  encoders: {spread or '-'} requests served")
        if cfg.get("killed_encoder"):
            lines.append(f"  killed mid-run: {cfg['killed_encoder']}")
        lines.append(
            f"  failed over: {s.get('failed_over', 0)} request(s) (retried once on another encoder), "
            f"failed: {s.get('failed', 0)}"
        )
    return "\n".join(lines) + "\n"


def format_failures(results: Sequence[RequestResult], limit: int = 20) -> str:
    """One line per failed or mismatched request (for stderr)."""
    bad = [r for r in results if r.status != "ok"]
    lines = []
    for r in bad[:limit]:
        q = r.request
        what = (
            f"FAILED {r.error_code}: {r.error_message}"
            if r.status == "failed"
            else "MISMATCH: " + "; ".join(r.problems)
        )
        lines.append(
            f"epd demo: request {q.request_id} ({q.kind}, {q.tokens} tokens, seed {q.seed}): {what}"
        )
    if len(bad) > limit:
        lines.append(f"epd demo: ... and {len(bad) - limit} more")
    return "\n".join(lines) + ("\n" if lines else "")


# --------------------------------------------------------------------------------------------
# Progress bar (stderr)
# --------------------------------------------------------------------------------------------


class Progress:
    """``\\r[#####.....] 12/24 ...`` on a stream, redrawn in place; a no-op when disabled."""

    def __init__(
        self,
        total: int,
        stream: IO[str] | None = None,
        enabled: bool = True,
        width: int = 30,
        label: str = "",
        fail_label: str = "failed",
    ) -> None:
        self.total = total
        self.fail_label = fail_label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.label = label
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._drawn = False

    def start(
        self, label: str | None = None, total: int | None = None, fail_label: str | None = None
    ) -> None:
        if label is not None:
            self.label = label
        if fail_label is not None:
            self.fail_label = fail_label
        if total is not None:
            self.total = total
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.draw()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        self.draw()

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = min(self.width, int(round(frac * self.width)))
        bar = "#" * filled + "." * (self.width - filled)
        extra = f"  {self.fail_label} {self.failed}" if self.failed else ""
        label = f"{self.label} " if self.label else ""
        return (
            f"{label}[{bar}] {self.done}/{self.total}{extra}  "
            f"{time.monotonic() - self.started:.1f} s"
        )

    def draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + self.render() + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --------------------------------------------------------------------------------------------
# Service processes
# --------------------------------------------------------------------------------------------

READY_PREFIX = "EPD_READY"


class ServiceStartError(RuntimeError):
    """A service exited or timed out before it reported ready."""


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """The JSON object of an ``EPD_READY {...}`` line, None for any other line; ValueError
    when the line is a malformed ready line."""
    text = line.strip()
    if not text.startswith(READY_PREFIX):
        return None
    body = text[len(READY_PREFIX) :].strip()
    try:
        info = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed ready line {text!r}: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("port"), int) or info["port"] <= 0:
        raise ValueError(f"ready line without a valid port: {text!r}")
    return info


class ServiceProcess:
    """One service child process: started with stdout piped (for the ready line) and stderr in
    a file (so a chatty child never blocks on a full pipe)."""

    def __init__(
        self,
        role: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.role = role
        self.argv = list(argv)
        self.env = env
        self.log_dir = Path(log_dir) if log_dir else None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None
        self._log: IO[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stdout_seen: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def port(self) -> int:
        if not self.info:
            raise RuntimeError(f"{self.role} is not ready")
        return int(self.info["port"])

    def start(self) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.log_dir / f"{self.role}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        else:
            self._log = tempfile.TemporaryFile(prefix=f"epd-demo-{self.role}-")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=self.env,
            close_fds=True,
        )
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"{self.role}-stdout", daemon=True
        )
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:  # keeps draining after READY
                self._lines.put(raw.decode("utf-8", errors="replace"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the ``EPD_READY`` line; ServiceStartError on exit, bad line or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceStartError(
                    self._describe(f"{self.role} did not report ready within {timeout:g} s")
                )
            try:
                line = self._lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is exiting
                try:
                    rc = self.proc.wait(timeout=5)
                    msg = f"{self.role} exited with code {rc} before it was ready"
                except subprocess.TimeoutExpired:
                    msg = f"{self.role} closed its stdout before it was ready"
                raise ServiceStartError(self._describe(msg))
            try:
                info = parse_ready_line(line)
            except ValueError as e:
                raise ServiceStartError(self._describe(f"{self.role}: {e}")) from None
            if info is None:
                self._stdout_seen.append(line.rstrip("\n"))
                del self._stdout_seen[:-10]
                continue
            if info.get("role") not in (None, self.role):
                raise ServiceStartError(
                    self._describe(f"{self.role}: ready line reports role {info.get('role')!r}")
                )
            self.info = info
            return info

    def stderr_tail(self, max_lines: int = 40, max_bytes: int = 16384) -> str:
        if self._log is None or self._log.closed:
            return ""
        try:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            start = max(0, size - max_bytes)
            data = os.pread(fd, size - start, start)  # pread: the child's offset is untouched
        except OSError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        if start > 0 and lines:
            lines = lines[1:]  # first line is probably cut
        return "\n".join(lines[-max_lines:])

    def _describe(self, msg: str) -> str:
        parts = [msg, "  command: " + " ".join(self.argv)]
        if self._stdout_seen:
            parts.append("  stdout:\n" + "\n".join("    " + s for s in self._stdout_seen))
        tail = self.stderr_tail()
        parts.append(
            ("  stderr (last lines):\n" + "\n".join("    " + s for s in tail.splitlines()))
            if tail
            else "  stderr: (empty)"
        )
        if self.log_path is not None:
            parts.append(f"  full log: {self.log_path}")
        return "\n".join(parts)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        rc = None
        proc = self.proc
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            finally:
                if proc.poll() is None:  # interrupted while waiting: do not leave it behind
                    with contextlib.suppress(OSError):
                        proc.kill()
            rc = proc.poll()
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return rc

    def close(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


def project_root() -> Path:
    """The directory that holds the `services` and `common` packages."""
    return Path(__file__).resolve().parents[2]


def demo_env_names() -> set[str]:
    """The `EPD_*` variables that `epd demo`'s own flags read."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {
        "EPD_" + opt[2:].replace("-", "_").upper()
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the service children: Mooncake over TCP (§5), the project importable,
    unbuffered stdout (belt and braces for the ready line)."""
    env = dict(os.environ if base is None else base)
    # The services reject unknown EPD_* variables; the demo's own ones (EPD_REQUESTS, ...) are
    # meant for the demo, and the settings it shares with them are passed as flags anyway.
    for name in demo_env_names():
        env.pop(name, None)
    env["MC_FORCE_TCP"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    root = str(project_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def add_process_arguments(
    parser: argparse.ArgumentParser, *, encoder_example: str, language_example: str
) -> None:
    """--encoder-arg / --language-arg: extra arguments for every encoder / language process started."""
    for role, example in (("encoder", encoder_example), ("language", language_example)):
        parser.add_argument(
            f"--{role}-arg",
            action="append",
            default=[],
            metavar="ARG",
            help=f"extra argument for every {role} process (repeatable), e.g. --{role}-arg={example}",
        )


def encoder_argv(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.tools.cli",
        "encoder",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--block-size",
        str(args.block_size),
        "--pool-blocks",
        str(args.encoder_pool_blocks),
        "--hidden",
        str(args.hidden),
        "--dtype",
        _dtype(args),
        *(["--model", args.model] if _uses_model(args) else []),
        *_security_argv(args),
        *getattr(args, "encoder_arg", []),
    ]


def language_argv(args: argparse.Namespace, encoder_port: int | Sequence[int]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.tools.cli",
        "language",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *(
            x
            for port in ([encoder_port] if isinstance(encoder_port, int) else encoder_port)
            for x in ("--encoder", f"127.0.0.1:{port}")
        ),
        "--block-size",
        str(args.block_size),
        "--pool-blocks",
        str(args.language_pool_blocks),
        "--hidden",
        str(args.hidden),
        "--dtype",
        _dtype(args),
        "--initial-tokens",
        str(args.initial_tokens),
        *(["--tp", str(args.tp)] if getattr(args, "tp", 1) > 1 else []),
        *(["--consumer", "qwen2-vl-prefill", "--model", args.model] if _uses_model(args) else []),
        *_security_argv(args, language=True),
        *getattr(args, "language_arg", []),
    ]


def _security_argv(args: argparse.Namespace, *, language: bool = False) -> list[str]:
    """The demo's --tls-* / --auth-token-file flags, for the services it starts (issue 9)."""
    from services.edge import security

    return security.service_argv(args, language=language)


def _uses_model(args: argparse.Namespace) -> bool:
    """Whether the services run a Qwen2-VL (`--model tiny` or a checkpoint), not just synthetic payloads."""
    return getattr(args, "model", "none") not in ("none", "", "bytes")


def _dtype(args: argparse.Namespace) -> str:
    return reference_payload.canonical_dtype(args.dtype)


# --------------------------------------------------------------------------------------------
# Workload (grpc.aio)
# --------------------------------------------------------------------------------------------


class _BlockBudget:
    """Keeps the blocks of in-flight requests within the encoder's source pool, so the demo does
    not overcommit the encoder with several 10x-pool requests at once (one request is always
    admitted when nothing else is in flight)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int):
        if not self.capacity:
            yield
            return
        amount = min(amount, self.capacity)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + amount <= self.capacity)
            self.used += amount
        try:
            yield
        finally:
            async with self._cond:
                self.used -= amount
                self._cond.notify_all()


async def run_workload(
    address: str,
    plan: Sequence[PlannedRequest],
    *,
    concurrency: int = 8,
    request_timeout: float = 300.0,
    block_size: int = 128,
    encoder_pool_blocks: int | None = None,
    progress: Progress | None = None,
    connect_timeout: float = 30.0,
    images: dict[str, list[tuple[bytes, str]]] | None = None,
    sec=None,
) -> tuple[list[RequestResult], float]:
    """Send every planned request to the language service at `address` with up to
    `concurrency` in flight. Returns the results (in plan order) and the wall time in seconds
    from the first send to the last reply. Does not verify digests (see `verify_results`)."""
    import grpc

    from common.pb.epd.v1 import language_pb2, language_pb2_grpc

    results = [RequestResult(request=p) for p in plan]
    sem = asyncio.Semaphore(max(1, concurrency))
    budget = _BlockBudget(encoder_pool_blocks)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    from services.edge.security import ClientSecurity

    # `sec`: TLS / the token of the demo's --tls-* / --auth-token-file flags (plaintext when None).
    async with (sec or ClientSecurity()).aio_channel(address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=connect_timeout)
        stub = language_pb2_grpc.LanguageStub(channel)

        async def one(result: RequestResult) -> None:
            p = result.request
            if p.kind == "image":
                from common.pb.epd.v1 import common_pb2

                data = (images or {}).get(p.request_id) or image_payloads(p)
                request = language_pb2.GenerateRequest(
                    request_id=p.request_id,
                    text=p.text,
                    want_digest=True,
                    images=[common_pb2.Image(data=d, mime_type=m) for d, m in data],
                )
            else:
                request = language_pb2.GenerateRequest(
                    request_id=p.request_id,
                    synthetic_tokens=p.tokens,
                    synthetic_seed=p.seed,
                    want_digest=True,
                )
            async with sem, budget.hold(math.ceil(p.tokens / block_size)):
                t0 = time.perf_counter()
                try:
                    reply = await stub.Generate(request, timeout=request_timeout)
                except grpc.aio.AioRpcError as e:
                    result.latency_s = time.perf_counter() - t0
                    result.error_code = e.code().name if e.code() is not None else "UNKNOWN"
                    result.error_message = e.details() or ""
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any client-side failure is a failure
                    result.latency_s = time.perf_counter() - t0
                    result.error_code = "CLIENT_ERROR"
                    result.error_message = f"{type(e).__name__}: {e}"
                else:
                    result.latency_s = time.perf_counter() - t0
                    result.rpc_ok = True
                    result.total_tokens = int(reply.total_tokens)
                    result.rounds = int(reply.rounds)
                    result.bytes = int(reply.bytes)
                    result.transfer_seconds = float(reply.transfer_seconds)
                    result.total_seconds = float(reply.total_seconds)
                    result.integrity_verified = bool(reply.integrity_verified)
                    result.payload_sha256 = reply.payload_sha256
                    result.rank_sha256 = [
                        (r.rank, r.payload_sha256) for r in reply.ranks if r.data_rank
                    ]
                    result.first_token_id = int(reply.first_token_id)
                    result.encoder = reply.encoder
                    result.attempts = int(reply.attempts)
                    result.failed_over_from = reply.failed_over_from
                    result.consumer = reply.consumer
                    if reply.HasField("logits"):
                        lg = reply.logits
                        result.top_token_ids = list(lg.top_token_ids)
                        result.top_logits = list(lg.top_logits)
                        result.logits_norm = lg.norm
                        result.prefill_seconds = lg.prefill_seconds
                        result.prefill_skipped = lg.skipped
                        result.position_delta = lg.mrope_position_delta
            if progress is not None:
                progress.advance(failed=not result.rpc_ok)

        async def tick() -> None:  # keep the elapsed time moving during long requests
            while True:
                await asyncio.sleep(0.5)
                progress.draw()

        ticker = asyncio.create_task(tick()) if progress is not None and progress.enabled else None
        t_start = time.perf_counter()
        try:
            await asyncio.gather(*(one(r) for r in results))
        finally:
            wall = time.perf_counter() - t_start
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
    return results, wall


def verify_results(
    results: Sequence[RequestResult],
    hidden: int,
    dtype: str,
    progress: Progress | None = None,
    digest: Callable[[int, int, int, str], str] | None = None,
    workers: int | None = None,
) -> int:
    """Check every answered reply against the reference digest (in a thread pool: hashlib and
    numpy release the GIL). Returns the number of mismatches."""
    digest = digest or reference_payload.expected_digest
    for r in results:
        if r.rpc_ok and r.request.kind == "image":
            check_image_reply(r, expect_first_token=bool(r.consumer and r.consumer != "null"))
            if progress is not None:
                progress.advance(failed=bool(r.problems))
    answered = [r for r in results if r.rpc_ok and r.request.kind != "image"]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(digest, r.request.tokens, r.request.seed, hidden, dtype): r
            for r in answered
        }
        for fut in concurrent.futures.as_completed(futures):
            r = futures[fut]
            check_reply(r, fut.result())
            if progress is not None:
                progress.advance(failed=bool(r.problems))
    return sum(1 for r in results if r.rpc_ok and r.problems)


def event_loop_runner() -> asyncio.Runner:
    """A runner on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def validate_args(args: argparse.Namespace) -> str | None:
    """An error message for flags the demo cannot run with, else None."""
    if not 1 <= args.tp <= 8:
        return f"--tp {args.tp}: the demo runs 1 to 8 language ranks"
    if not 1 <= args.encoders <= 8:
        return f"--encoders {args.encoders}: the demo runs 1 to 8 encoders"
    if getattr(args, "kill_encoder_after", 0) and args.encoders < 2:
        return "--kill-encoder-after needs --encoders 2 or more (someone must take over)"
    try:
        reference_payload.canonical_dtype(args.dtype)
    except ValueError as e:
        return str(e)
    return None


def _note(msg: str) -> None:
    sys.stderr.write(f"epd demo: {msg}\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Run `epd demo`; returns the exit code (0 only when every request succeeded and every
    payload matches the reference, 1 otherwise, 2 for unsupported flags, 130 on Ctrl-C)."""
    return _run(args, encoder_argv=encoder_argv, language_argv=language_argv)


def _run(
    args: argparse.Namespace,
    *,
    encoder_argv: Callable[[argparse.Namespace], list[str]],
    language_argv: Callable[[argparse.Namespace, int], list[str]],
    env: dict[str, str] | None = None,
) -> int:
    error = validate_args(args)
    if error:
        _note(error)
        return 2
    from services.edge import security

    try:
        sec = security.client_from_args(args) if hasattr(args, "tls_ca") else None
    except ValueError as e:
        _note(str(e))
        return 2
    dtype = reference_payload.canonical_dtype(args.dtype)
    pool_tokens = args.language_pool_blocks * args.block_size
    initial = initial_allocation_tokens(
        args.initial_tokens, args.block_size, args.language_pool_blocks
    )
    plan = plan_workload(
        args.requests,
        seed=args.seed,
        block_size=args.block_size,
        initial_tokens=args.initial_tokens,
        language_pool_blocks=args.language_pool_blocks,
        encoder_pool_blocks=args.encoder_pool_blocks,
    )
    n_images = getattr(args, "image_requests", 0) if _uses_model(args) else 0
    image_plan = plan_images(
        n_images,
        seed=args.seed,
        first_index=len(plan),
        block_size=args.block_size,
        initial_tokens=args.initial_tokens,
        language_pool_blocks=args.language_pool_blocks,
        exact_tokens=args.model == "tiny",
    )
    # The slow image requests start first, the largest first, so the wall time stays short.
    plan = sorted(image_plan, key=lambda p: -p.tokens) + plan
    config = {
        "concurrency": args.concurrency,
        "hidden": args.hidden,
        "dtype": dtype,
        "block_size": args.block_size,
        "language_pool_blocks": args.language_pool_blocks,
        "language_pool_tokens": pool_tokens,
        "initial_tokens": args.initial_tokens,
        "initial_allocation_tokens": initial,
        "encoder_pool_blocks": args.encoder_pool_blocks,
        "seed": args.seed,
        "tp": args.tp,
        "encoders": args.encoders,
        "model": getattr(args, "model", "none"),
        "image_requests": n_images,
    }
    show_progress = not args.no_progress and sys.stderr.isatty()
    env = child_env() if env is None else env

    services: list[ServiceProcess] = []
    old_sigterm = None
    if threading.current_thread() is threading.main_thread():

        def _on_sigterm(signum, frame):
            raise KeyboardInterrupt

        old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # ---- services
        t0 = time.monotonic()
        encoders = []
        for _i in range(args.encoders):
            encoder = ServiceProcess("encoder", encoder_argv(args), env, args.log_dir)
            services.append(encoder)
            encoders.append(encoder)
            encoder.start()
        for encoder in encoders:
            encoder.wait_ready(args.startup_timeout)
            _note(f"encoder ready on 127.0.0.1:{encoder.port} ({time.monotonic() - t0:.1f} s)")
        t0 = time.monotonic()
        ports = [e.port for e in encoders]
        language = ServiceProcess(
            "language",
            language_argv(args, ports[0] if len(ports) == 1 else ports),
            env,
            args.log_dir,
        )
        services.append(language)
        language.start()
        language.wait_ready(args.startup_timeout)
        _note(f"language ready on 127.0.0.1:{language.port} ({time.monotonic() - t0:.1f} s)")

        # ---- workload
        images = {}
        if image_plan:
            t0 = time.monotonic()
            images = {p.request_id: image_payloads(p) for p in image_plan}
            _note(
                f"generated {sum(len(v) for v in images.values())} images for {len(image_plan)} image requests "
                f"({sum(len(d) for v in images.values() for d, _ in v) / 1e6:.1f} MB, "
                f"{time.monotonic() - t0:.1f} s)"
            )
        kinds = ", ".join(
            f"{sum(p.kind == k for p in plan)} {k}"
            for k in (*KINDS, "image")
            if any(p.kind == k for p in plan)
        )
        _note(
            f"sending {len(plan)} requests ({kinds}), {args.concurrency} in flight, "
            f"{sum(p.tokens for p in plan):,} tokens in all"
        )
        progress = Progress(len(plan), enabled=show_progress, label="requests")
        progress.start()
        killer = None
        if getattr(args, "kill_encoder_after", 0) and len(encoders) > 1:
            victim = encoders[-1]

            def kill() -> None:
                if victim.proc is not None and victim.proc.poll() is None:
                    victim.proc.kill()
                    config["killed_encoder"] = f"127.0.0.1:{victim.port}"
                    _note(
                        f"killed the encoder on 127.0.0.1:{victim.port} {args.kill_encoder_after:g} s into the workload"
                    )

            killer = threading.Timer(args.kill_encoder_after, kill)
            killer.daemon = True
            killer.start()
        with event_loop_runner() as runner:
            results, wall = runner.run(
                run_workload(
                    f"127.0.0.1:{language.port}",
                    plan,
                    concurrency=args.concurrency,
                    request_timeout=args.request_timeout,
                    block_size=args.block_size,
                    encoder_pool_blocks=args.encoder_pool_blocks,
                    progress=progress,
                    connect_timeout=args.startup_timeout,
                    images=images,
                    sec=sec,
                )
            )
        progress.finish()
        if killer is not None:
            killer.cancel()

        # ---- verification (after the workload, so it does not skew the timings)
        answered = sum(r.rpc_ok for r in results)
        progress.start(label="verify  ", total=answered, fail_label="mismatches")
        verify_results(results, args.hidden, dtype, progress=progress)
        progress.finish()
        for r in results:
            if r.rpc_ok and r.rounds and r.rounds < r.request.min_rounds:
                _note(
                    f"warning: {r.request.request_id} reports {r.rounds} rounds, fewer than "
                    f"the {r.request.min_rounds} its size needs"
                )
        for svc in services:
            if not svc.running():
                _note(
                    f"warning: {svc.role} exited during the demo "
                    f"(code {svc.proc.returncode if svc.proc else '?'})"
                )

        summary = summarize(results, wall, config)
        if args.json:
            sys.stdout.write(json.dumps(summary, sort_keys=False) + "\n")
        else:
            sys.stdout.write(format_table(summary))
        sys.stdout.flush()
        ok = summary["succeeded"] == summary["requests"]
        if config.get("killed_encoder") and not summary["mismatches"]:
            # Requests that had received bytes from the killed encoder fail (never retried): expected.
            ok = all(r.rpc_ok or r.error_code == "UNAVAILABLE" for r in results)
        if not ok:
            sys.stderr.write(format_failures(results))
            for svc in services:
                tail = svc.stderr_tail(max_lines=15)
                if tail:
                    sys.stderr.write(
                        f"epd demo: {svc.role} stderr (last lines):\n"
                        + "\n".join("    " + s for s in tail.splitlines())
                        + "\n"
                    )
            sys.stderr.flush()
        return 0 if ok else 1
    except ServiceStartError as e:
        _note(str(e))
        return 1
    except KeyboardInterrupt:
        if show_progress:
            sys.stderr.write("\n")
        _note("interrupted; stopping the services")
        return 130
    except TimeoutError:
        _note(f"could not connect to the language service within {args.startup_timeout:g} s")
        return 1
    finally:
        for svc in reversed(services):  # language first, then the encoder
            try:
                svc.stop()
            except BaseException:  # noqa: BLE001 - keep stopping the others
                with contextlib.suppress(Exception):
                    if svc.proc is not None:
                        svc.proc.kill()
            svc.close()
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
