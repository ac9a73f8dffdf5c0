"""The demo's multi-turn conversation: the same images on every turn, as a chat sends them.

Each turn is sent twice, one after the other:
- the conversation's own request: the same image bytes every turn, so from the second turn on
  the encoder's cache serves their rows and the language ranks still hold them (nothing sent);
- a cold twin: the same text and the same pixels, re-encoded as PNG with a different text chunk,
  so the bytes (and every cache key) are new and nothing is found anywhere.
The twin is the yardstick and the oracle: its payload must be byte-identical (same digest), and
its latency minus the turn's is the time the caches saved.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from typing import Any

from services.tools.demo._images import QWEN2_TOKENS, TokenRule, qwen_image_tokens

CONVERSATION_IMAGES = ((448, 336), (336, 448))
"""(width, height) of the conversation's images (PNG): 192 image tokens each for Qwen2-VL,
140 for Qwen3-VL."""
QUESTIONS = (
    "What do these two pictures <image> and <image> show?",
    "Which of the two is brighter?",
    "Describe the rings in the first one.",
    "And in the second one?",
    "What do they have in common?",
    "Which would you print?",
    "Give each a title.",
    "Summarise our conversation.",
)


def turn_texts(turns: int) -> list[str]:
    """The prompt of every turn: the conversation so far (a short answer stands in for the
    model's), then the next question. The images sit where the first question puts them."""
    texts, history = [], ""
    for k in range(turns):
        question = QUESTIONS[k % len(QUESTIONS)]
        texts.append(f"{history}User: {question}\nAssistant:")
        history += f"User: {question}\nAssistant: (answer {k + 1})\n"
    return texts


def conversation_images(seed: int, variant: int = 0) -> list[tuple[bytes, str]]:
    """The conversation's images; `variant` > 0: the same pixels in other PNG bytes."""
    from PIL import Image, PngImagePlugin

    from services.tools.demo._images import make_image

    out = []
    for k, (w, h) in enumerate(CONVERSATION_IMAGES):
        data = make_image(w, h, "png", seed=seed + k)
        if variant:
            info = PngImagePlugin.PngInfo()
            info.add_text("epd-demo-variant", str(variant))
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, "PNG", pnginfo=info, compress_level=1)
            data = buf.getvalue()
        out.append((data, "image/png"))
    return out


def image_tokens(rule: TokenRule = QWEN2_TOKENS) -> int:
    return sum(qwen_image_tokens(w, h, rule) for w, h in CONVERSATION_IMAGES)


@dataclasses.dataclass
class TurnResult:
    turn: int
    image_tokens: int
    """The conversation's image tokens a turn, by the model family's rule."""
    warm: dict[str, Any] = dataclasses.field(default_factory=dict)
    cold: dict[str, Any] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)


async def run_conversation(
    address: str,
    turns: int,
    *,
    seed: int,
    request_timeout: float,
    sec=None,
    rule: TokenRule = QWEN2_TOKENS,
) -> list[TurnResult]:
    """Send the conversation's turns (each with its cold twin) one after the other."""
    import grpc

    from common.pb.epd.v1 import common_pb2, language_pb2, language_pb2_grpc
    from services.edge.security import ClientSecurity

    images = await asyncio.to_thread(conversation_images, seed)
    results = []
    async with (sec or ClientSecurity()).aio_channel(address) as channel:
        stub = language_pb2_grpc.LanguageStub(channel)

        async def ask(request_id: str, data, text: str) -> dict[str, Any]:
            request = language_pb2.GenerateRequest(
                request_id=request_id,
                text=text,
                want_digest=True,
                images=[common_pb2.Image(data=d, mime_type=m) for d, m in data],
            )
            t0 = time.perf_counter()
            try:
                reply = await stub.Generate(request, timeout=request_timeout)
            except grpc.aio.AioRpcError as e:
                code = e.code().name if e.code() is not None else "UNKNOWN"
                return {"error": f"{code}: {e.details()}"}
            return {
                "latency_ms": 1000 * (time.perf_counter() - t0),
                "total_tokens": reply.total_tokens,
                "cached_tokens": reply.cached_tokens,
                "transferred_tokens": reply.transferred_tokens,
                "bytes_per_token": reply.bytes / reply.total_tokens if reply.total_tokens else 0,
                "payload_sha256": reply.payload_sha256,
                "encoder": reply.encoder,
            }

        for k, text in enumerate(turn_texts(turns)):
            twin = await asyncio.to_thread(conversation_images, seed, k + 1)
            result = TurnResult(k + 1, image_tokens=image_tokens(rule))
            result.warm = await ask(f"demo-{seed}-chat-{k + 1}", images, text)
            result.cold = await ask(f"demo-{seed}-chat-{k + 1}-cold", twin, text)
            result.problems = check_turn(result)
            results.append(result)
    return results


def check_turn(result: TurnResult) -> list[str]:
    """The turn's payload equals its cold twin's; from the second turn on every image token was
    cached and none of them was sent; the twin found nothing."""
    warm, cold = result.warm, result.cold
    problems = [
        f"{name}: {r['error']}" for name, r in (("turn", warm), ("twin", cold)) if "error" in r
    ]
    if problems:
        return problems
    if warm["payload_sha256"] != cold["payload_sha256"]:
        problems.append(
            f"payload {warm['payload_sha256'][:16]} != the cold twin's {cold['payload_sha256'][:16]}"
        )
    if cold["cached_tokens"]:
        problems.append(f"the cold twin had {cold['cached_tokens']} cached tokens")
    if result.turn > 1 and warm["cached_tokens"] != result.image_tokens:
        problems.append(f"{warm['cached_tokens']} cached tokens, expected {result.image_tokens}")
    return problems


def summarize_conversation(results: list[TurnResult]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r.warm and "error" not in r.cold]
    per_turn = results[0].image_tokens if results else image_tokens()
    looked = per_turn * len(ok)
    cached = sum(r.warm["cached_tokens"] for r in ok)
    not_sent = sum(
        (r.warm["total_tokens"] - r.warm["transferred_tokens"]) * r.warm["bytes_per_token"]
        for r in ok
    )
    saved = sum(r.cold["latency_ms"] - r.warm["latency_ms"] for r in ok[1:])
    return {
        "turns": len(results),
        "image_tokens_per_turn": per_turn,
        "cached_tokens": cached,
        "hit_rate": cached / looked if looked else 0.0,
        "bytes_not_sent": int(not_sent),
        "time_saved_ms": saved,
        "mismatches": sum(1 for r in results if r.problems),
        "per_turn": [
            {"turn": r.turn, "warm": r.warm, "cold": r.cold, "problems": r.problems}
            for r in results
        ],
    }


def format_conversation(c: dict[str, Any]) -> list[str]:
    """The conversation's lines of the summary table."""
    lines = [
        "",
        f"  conversation: {c['turns']} turns over the same {len(CONVERSATION_IMAGES)} images "
        f"({c['image_tokens_per_turn']} image tokens a turn), each beside a cold twin (same "
        "pixels, new bytes)",
        f"  {'turn':>4} {'tokens':>7} {'cached':>7} {'sent':>7} {'ms':>8} {'twin ms':>8}  check",
    ]
    for t in c["per_turn"]:
        warm, cold = t["warm"], t["cold"]
        if "error" in warm or "error" in cold:
            lines.append(f"  {t['turn']:>4}  " + "; ".join(t["problems"]))
            continue
        lines.append(
            f"  {t['turn']:>4} {warm['total_tokens']:>7,} {warm['cached_tokens']:>7,} "
            f"{warm['transferred_tokens']:>7,} {warm['latency_ms']:>8.1f} {cold['latency_ms']:>8.1f}  "
            + ("same digest" if not t["problems"] else "; ".join(t["problems"]))
        )
    lines.append(
        f"  hit rate {100 * c['hit_rate']:.1f} %, time saved {c['time_saved_ms']:.0f} ms over "
        f"turns 2-{c['turns']}, {c['bytes_not_sent']:,} bytes not sent"
    )
    return lines
