"""Consumers: what a language rank does with a received payload (`--consumer`).

- `null`: accepts the payload and generates nothing (`first_token_id = -1`).
- `qwen2-vl-prefill` (Qwen2-VL, Qwen2.5-VL) and `qwen3-vl-prefill` (Qwen3-VL): run the language
  part of the encoder's model (`--model`: `tiny`, `tiny-qwen3` or the same checkpoint directory
  as the encoder) on the payload — `inputs_embeds` = the received embeddings, `position_ids` =
  the received M-RoPE (t, h, w) positions and, for Qwen3-VL, the received deepstack fields
  injected as the model does (each level's rows at the image tokens, `visual_pos_masks` = the
  tokens whose id is the image token, added after the decoder layer of that level) — and return
  the greedy first token and a summary of the last position's logits. The M-RoPE position delta
  (needed to go on decoding) is computed here from the positions: max position + 1 - tokens.
  This release runs the whole language model on rank 0 (no tensor-parallel split); other ranks
  receive their copy and release it. A payload that is not a model input — a token id outside the
  vocabulary (e.g. a synthetic load-test payload) or more tokens than the model's context — is
  released without a prefill, with the reason in `skipped`.

The prefill runs in a worker thread, never on the event loop; if the request is cancelled
meanwhile, the consumer still waits for the thread before the payload's blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import torch

from common.config import LanguageConfig
from common.layout import DEEPSTACK_PREFIX
from common.payload import Payload

log = logging.getLogger(__name__)

TOP_K = 8


@dataclasses.dataclass
class ConsumerResult:
    """A consumer's output for one request (GenerateReply carries it)."""

    first_token_id: int = -1
    """Greedy next token after the payload; -1 when the consumer generates nothing."""
    top_token_ids: tuple[int, ...] = ()
    """The last position's highest logits, best first (with `top_logits`)."""
    top_logits: tuple[float, ...] = ()
    logits_norm: float = 0.0
    """L2 norm of the last position's logits (float32)."""
    logits_sum: float = 0.0
    """Sum of the last position's logits (a cheap checksum)."""
    vocab_size: int = 0
    position_delta: int = 0
    """M-RoPE position delta: max position + 1 - tokens (positions of later tokens are i + delta)."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    skipped: str = ""
    """Why no prefill ran (empty when it did)."""


class NullConsumer:
    """Accepts the payload and generates nothing (first_token_id = -1)."""

    name = "null"

    async def consume(self, payload: Payload | None) -> ConsumerResult:
        return ConsumerResult()


class QwenPrefill:
    """Prefill of a Qwen language model on a received payload; returns the first token. Its
    name is the family's consumer (`qwen2-vl-prefill`, `qwen3-vl-prefill`)."""

    def __init__(self, qwen, top_k: int = TOP_K):
        self.qwen = qwen
        self.name = qwen.family.consumer
        self.top_k = top_k
        self._lock = threading.Lock()  # one prefill at a time: they share the cores / the GPU

    @property
    def vocab_size(self) -> int:
        return self.qwen.config.text_config.vocab_size

    @property
    def max_tokens(self) -> int:
        return self.qwen.config.text_config.max_position_embeddings

    def prefill(
        self,
        embeddings: torch.Tensor,
        positions: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        deepstack: Sequence[torch.Tensor] = (),
    ) -> ConsumerResult:
        """embeddings [T, hidden], positions [T, 3] (t, h, w), token_ids [T], per deepstack level
        [T, hidden] → the first token. The deepstack rows go in at the image tokens (found by
        `token_ids`), as the model's own forward puts its vision tower's there."""
        total = int(embeddings.shape[0])
        if len(deepstack) != self.qwen.deepstack_levels:
            raise ValueError(
                f"{len(deepstack)} deepstack field(s) for a model with {self.qwen.deepstack_levels}"
            )
        why = self._not_an_input(total, token_ids)
        if why:
            return ConsumerResult(vocab_size=self.vocab_size, prefill_tokens=0, skipped=why)
        q = self.qwen
        with self._lock, torch.inference_mode():
            started = time.perf_counter()  # the prefill itself, not the wait for the one before
            x = embeddings.to(device=q.device, dtype=q.dtype)[None]
            pos = positions.to(device=q.device, dtype=torch.int64).T[:, None, :]  # [3, 1, T]
            extra = {}
            if deepstack:
                assert token_ids is not None  # the image tokens are where the rows go
                mask = (token_ids.to(q.device) == q.config.image_token_id)[None]  # [1, T]
                extra = dict(
                    visual_pos_masks=mask,
                    deepstack_visual_embeds=[
                        d.to(device=q.device, dtype=q.dtype)[mask[0]] for d in deepstack
                    ],
                )
            hidden = q.model.model.language_model(
                inputs_embeds=x, position_ids=pos, use_cache=False, **extra
            ).last_hidden_state
            logits = q.model.lm_head(hidden[:, -1]).float()[0]
            top = torch.topk(logits, min(self.top_k, logits.shape[0]))
            result = ConsumerResult(
                first_token_id=int(top.indices[0]),
                top_token_ids=tuple(int(i) for i in top.indices),
                top_logits=tuple(float(v) for v in top.values),
                logits_norm=float(torch.linalg.vector_norm(logits)),
                logits_sum=float(logits.sum()),
                vocab_size=int(logits.shape[0]),
                position_delta=int(positions.max()) + 1 - total,
                prefill_tokens=total,
            )
        result.prefill_seconds = time.perf_counter() - started
        return result

    def _not_an_input(self, total: int, token_ids: torch.Tensor | None) -> str:
        if total > self.max_tokens:
            return f"{total} tokens is longer than the model's context ({self.max_tokens})"
        if token_ids is not None and total:
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                return f"token id {bad} is outside the model's vocabulary of {self.vocab_size} (not a model input)"
        return ""

    def _consume(self, payload: Payload) -> ConsumerResult:
        ids = payload.field("token_ids")
        why = self._not_an_input(payload.total_tokens, ids)
        if why:
            log.info("prefill skipped: %s", why)
            return ConsumerResult(vocab_size=self.vocab_size, skipped=why)
        deepstack = [
            payload.field(f"{DEEPSTACK_PREFIX}{k}") for k in range(self.qwen.deepstack_levels)
        ]
        return self.prefill(
            payload.field("embeddings"), payload.field("mrope_positions"), ids, deepstack
        )

    async def consume(self, payload: Payload | None) -> ConsumerResult:
        if payload is None or payload.total_tokens == 0:
            return ConsumerResult()
        work = asyncio.ensure_future(asyncio.to_thread(self._consume, payload))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread reads the payload's blocks until it returns: only then may they be freed.
            await asyncio.gather(work, return_exceptions=True)
            raise


def build_consumer(config: LanguageConfig, rank: int):
    """The consumer of a rank (`config.consumer`); the prefill model runs on rank 0 only."""
    if config.consumer != "null" and rank == 0:
        from services.models.qwen_weights import load_qwen

        started = time.perf_counter()
        consumer = QwenPrefill(
            load_qwen(config.model, config.hidden, config.device, keep=("text",))
        )
        log.info(
            "consumer %s: model %s (hidden %d) loaded in %.1f s",
            consumer.name,
            config.model,
            config.hidden,
            time.perf_counter() - started,
        )
        return consumer
    return NullConsumer()
