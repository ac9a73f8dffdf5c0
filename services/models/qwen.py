"""The Qwen encoder model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), built from Hugging Face
`transformers` classes (weights: services/models/qwen_weights.py).

Nothing here re-implements the model: preprocessing is the library's image processor (smart
resize, patches, merge: services/models/qwen_images.py), image embeddings come from the model's
vision tower (`get_image_features`), text embeddings from the language model's embedding table,
and M-RoPE positions from the model's own `get_rope_index`. The payload is the full per-token
input embeddings (text and image rows merged, exactly what the model's `forward` feeds its
language model), the token ids and the (t, h, w) positions; for Qwen3-VL also its deepstack
features, one field per level (`deepstack_K`), holding the vision tower's level-K rows on image
tokens and zeros elsewhere: the text model adds them to the hidden states of its first layers at
the image tokens. The M-RoPE position delta (max position + 1 - tokens, needed to continue
decoding) is not a payload field: the language side computes it from `mrope_positions`.

Text is the raw prompt (apply the chat template on the client when the checkpoint wants one).
Images go where the text has a placeholder — `<image>`, `<|image_pad|>` or
`<|vision_start|><|image_pad|><|vision_end|>`, one per image, in order — or, when the text has
none, all before the text; each becomes `<|vision_start|>`, one `<|image_pad|>` per token and
`<|vision_end|>`, as the family's processor expands it. Without a tokenizer file, text is
tokenized byte by byte (UTF-8 bytes are ids 0..255; the tiny vocabulary's special tokens have
their own ids).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from common.errors import FailedPrecondition, InvalidArgument
from common.layout import DEEPSTACK_PREFIX, RecordLayout
from common.pool import field_of
from common.states import ImageSpan
from services.models.embedding_cache import (
    IMAGES,
    EmbeddingCache,
    EncodedImages,
    image_digest,
    image_key,
    partitioned,
)
from services.models.qwen_images import ImageInfo, decode_image, probe_image
from services.models.qwen_weights import QwenVL, fingerprint, load_qwen

log = logging.getLogger(__name__)

PLAN = "qwen-plan"
"""The `EncodeInputs.scratch` key of a request's `Plan`."""

IMAGE_PLACEHOLDER = re.compile(
    r"(?:<\|vision_start\|>)?<\|image_pad\|>(?:<\|vision_end\|>)?|<image>"
)


# --------------------------------------------------------------------------------------------
# The encoder model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What a request becomes, known before the model runs."""

    token_ids: torch.Tensor
    """[T] int64: text ids, and vision-start / image-pad x n / vision-end around each image."""
    images: list[ImageInfo]
    opened: list[Any]
    """PIL images (header read; decoded by `prepare`)."""
    keys: list[str] = dataclasses.field(default_factory=list)
    """Each image's key under this model (`image_key`): its span's key."""
    partition: str = ""
    """Whose cache entries these are (`EncodeInputs.partition`)."""
    decoded: list[Any] | None = None
    cached: set[int] = dataclasses.field(default_factory=set)
    """Images whose rows came from the embedding cache (set by `embeddings`)."""

    @property
    def total(self) -> int:
        return int(self.token_ids.shape[0])


class Encoded(NamedTuple):
    """A request's payload, in one process (no pool): what `encode_into` writes."""

    embeddings: torch.Tensor
    """[T, hidden] in the model's dtype."""
    token_ids: torch.Tensor
    """[T] int64."""
    positions: torch.Tensor
    """[T, 3] M-RoPE (t, h, w)."""
    delta: int
    """M-RoPE position delta: max position + 1 - T."""
    deepstack: tuple[torch.Tensor, ...] = ()
    """Per deepstack level, [T, hidden]: the level's rows on image tokens, zeros elsewhere."""


class QwenEncoderModel:
    """Encoder model of a Qwen family: `token_count` from the image sizes (headers only),
    `prepare` decodes every image (before anything is allocated), `encode_into` runs the vision
    tower and the embedding table and writes embeddings, token ids, M-RoPE positions and any
    deepstack features into the pool."""

    def __init__(self, qwen: QwenVL, cache: EmbeddingCache | None = None):
        self.qwen = qwen
        self.name = qwen.family.name
        self.deepstack_levels = qwen.deepstack_levels
        self.cache = cache if cache is not None and cache.capacity_bytes else None
        # Keys the rows of an image anywhere (this cache, a language rank's held rows).
        self.fingerprint = fingerprint(qwen)
        cfg = qwen.config
        self.vision_start = cfg.vision_start_token_id
        self.vision_end = cfg.vision_end_token_id
        self.image_token = cfg.image_token_id
        size = qwen.processor.size
        self.min_pixels = int(size["shortest_edge"])
        self.max_pixels = int(size["longest_edge"])
        self._lock = threading.Lock()  # one forward at a time: the cores are shared anyway
        self.last_timings: dict[str, float] = {}

    @property
    def source(self) -> str:
        return self.qwen.source

    # ---- before allocation

    def plan(self, inputs) -> Plan:
        cached = inputs.scratch.get(PLAN)
        if cached is not None:
            return cached
        family = self.qwen.family
        opened, infos = [], []
        for i, (data, mime) in enumerate(inputs.images):
            img, info = probe_image(i, data, mime, family, self.min_pixels, self.max_pixels)
            opened.append(img)
            infos.append(info)
        segments = IMAGE_PLACEHOLDER.split(inputs.text)
        slots = len(segments) - 1
        if slots and slots != len(infos):
            raise InvalidArgument(
                f"text has {slots} image placeholder(s) but the request has {len(infos)} image(s)"
            )
        if not slots:
            segments = [""] * len(infos) + [inputs.text]
        ids: list[int] = []
        for k, segment in enumerate(segments):
            ids.extend(self.qwen.tokenize(segment))
            if k < len(infos):
                ids.append(self.vision_start)
                ids.extend([self.image_token] * infos[k].tokens)
                ids.append(self.vision_end)
        plan = Plan(
            torch.tensor(ids, dtype=torch.int64),
            infos,
            opened,
            [image_key(self.fingerprint, image_digest(d, inputs.scope)) for d, _ in inputs.images],
            inputs.partition,
        )
        inputs.scratch[PLAN] = plan
        return plan

    def token_count(self, inputs) -> int:
        return self.plan(inputs).total

    def describe(self, inputs) -> str:
        """Where a request's tokens come from, for error messages: ' (images[0] 2000x2000 -> 5041 tokens, ...)'."""
        plan = self.plan(inputs)
        parts = [
            f"images[{i.index}] {i.width}x{i.height} -> {i.tokens} tokens" for i in plan.images
        ]
        image_rows = sum(i.tokens + 2 for i in plan.images)
        parts.append(f"text {plan.total - image_rows} tokens")
        return " (" + ", ".join(parts) + ")"

    def prepare(self, inputs) -> None:
        plan = self.plan(inputs)
        if plan.decoded is None:
            plan.decoded = [decode_image(img, info) for img, info in zip(plan.opened, plan.images)]

    # ---- the model

    def positions(self, plan: Plan) -> tuple[torch.Tensor, int]:
        """M-RoPE (t, h, w) positions [T, 3] and the position delta, by the model's own rule."""
        ids = plan.token_ids[None]
        grid = (
            torch.tensor([[1, i.grid_h, i.grid_w] for i in plan.images], dtype=torch.int64)
            if plan.images
            else None
        )
        mm = (ids == self.image_token).to(torch.int32)
        pos, delta = self.qwen.model.model.get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=grid
        )
        return pos[:, 0, :].T.contiguous(), int(delta.reshape(-1)[0])

    def embeddings(self, plan: Plan) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[T, hidden] input embeddings in the model's dtype — text rows from the embedding table,
        image-pad rows replaced by the vision tower's merged patch features, as the model does —
        and per deepstack level [T, hidden]: that level's rows on the image-pad rows, zeros
        elsewhere (what the text model adds at the image tokens)."""
        q = self.qwen
        ids = plan.token_ids.to(q.device)
        embeds = q.model.get_input_embeddings()(ids)
        deepstack = tuple(torch.zeros_like(embeds) for _ in range(self.deepstack_levels))
        self.last_timings = {"preprocess_s": 0.0, "vision_s": 0.0}  # this request's, summed
        if plan.images:
            # One image at a time, cache or not: a batch's matrix shapes change the rounding, so
            # only rows computed alone are the same bytes whichever other images come with them.
            rows = torch.cat([self._image_rows(plan, k) for k in range(len(plan.images))], dim=1)
            mask = (ids == self.image_token)[:, None]
            embeds = embeds.masked_scatter(mask, rows[0].to(embeds.dtype))
            deepstack = tuple(
                d.masked_scatter(mask, rows[1 + level].to(d.dtype))
                for level, d in enumerate(deepstack)
            )
        return embeds, deepstack

    def _vision(self, decoded: list[Any], images: list[ImageInfo]) -> torch.Tensor:
        """The vision tower's rows of these images, in order, on the model's device:
        [1 + deepstack levels, tokens, hidden] (the merged patch rows, then each level's)."""
        q = self.qwen
        t0 = time.perf_counter()
        batch = q.processor(images=decoded, return_tensors="pt")
        grid = batch["image_grid_thw"]
        expected = [[1, i.grid_h, i.grid_w] for i in images]
        if grid.tolist() != expected:  # token_count promised a size: hold the processor to it
            raise FailedPrecondition(
                f"image processor grids {grid.tolist()} != predicted {expected}"
            )
        t1 = time.perf_counter()
        out = q.model.model.get_image_features(
            batch["pixel_values"].to(q.device), grid.to(q.device)
        )
        levels = [torch.cat(out.pooler_output, dim=0)]
        if self.deepstack_levels:
            levels += [torch.cat(f, dim=0) for f in out.deepstack_features]
            if len(levels) != 1 + self.deepstack_levels:
                raise FailedPrecondition(
                    f"the vision tower gave {len(levels) - 1} deepstack levels, "
                    f"the model declares {self.deepstack_levels}"
                )
        self.last_timings["preprocess_s"] += t1 - t0
        self.last_timings["vision_s"] += time.perf_counter() - t1
        return torch.stack(levels)

    def _image_rows(self, plan: Plan, k: int) -> torch.Tensor:
        """Image k's rows ([1 + deepstack levels, tokens, hidden]): from the cache, or computed
        alone (and kept, every level, when there is a cache)."""
        assert plan.decoded is not None  # prepare() ran
        if self.cache is None:
            return self._vision([plan.decoded[k]], [plan.images[k]])
        key = partitioned(plan.keys[k], plan.partition)
        rows = self.cache.get(key)
        if rows is not None and rows.shape[:2] == (
            1 + self.deepstack_levels,
            plan.images[k].tokens,
        ):
            plan.cached.add(k)
            return rows.to(self.qwen.device)
        rows = self._vision([plan.decoded[k]], [plan.images[k]])
        self.cache.put(key, rows)
        return rows

    def encode(self, inputs) -> Encoded:
        """The request's payload in one process, no pool: what `encode_into` writes, and what
        tests compare against."""
        self.prepare(inputs)
        plan = self.plan(inputs)
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            embeds, deepstack = self.embeddings(plan)
            pos, delta = self.positions(plan)
        log.debug(
            "encoded %d tokens (%s) in %.3f s %s",
            plan.total,
            ", ".join(f"{i.width}x{i.height} {i.format} -> {i.tokens}" for i in plan.images)
            or "text only",
            time.perf_counter() - started,
            self.last_timings if plan.images else "",
        )
        return Encoded(embeds, plan.token_ids, pos, delta, deepstack)

    def image_spans(self, plan: Plan, pos: torch.Tensor) -> tuple[ImageSpan, ...]:
        """Where each image's rows sit in the payload, keyed for reuse, with its first position."""
        starts = (plan.token_ids == self.image_token).nonzero().reshape(-1).tolist()
        spans, at = [], 0
        for k, info in enumerate(plan.images):
            start = int(starts[at])
            spans.append(
                ImageSpan(
                    k,
                    start,
                    info.tokens,
                    plan.keys[k],
                    tuple(int(v) for v in pos[start].tolist()),
                )
            )
            at += info.tokens
        return tuple(spans)

    def encode_into(self, inputs, runs: Sequence[torch.Tensor], record: RecordLayout) -> None:
        out = self.encode(inputs)
        plan = inputs.scratch.pop(PLAN)  # decoded images no longer needed
        inputs.scratch[IMAGES] = EncodedImages(
            self.image_spans(plan, out.positions), frozenset(plan.cached)
        )
        sources = {
            "embeddings": out.embeddings,
            "token_ids": out.token_ids,
            "mrope_positions": out.positions,
        } | {f"{DEEPSTACK_PREFIX}{k}": d for k, d in enumerate(out.deepstack)}
        start = 0
        for run in runs:
            k = run.shape[0]
            for f in record.fields:
                view = field_of(run, f)
                source = sources.get(f.name)
                if source is None:
                    view.zero_()
                else:
                    view.copy_(source[start : start + k].to(device=view.device, dtype=view.dtype))
            start += k
        if start != out.embeddings.shape[0]:
            raise FailedPrecondition(
                f"runs hold {start} tokens, the payload has {out.embeddings.shape[0]}"
            )


def load_encoder_model(
    name: str, hidden: int, device: str = "cpu", cache: EmbeddingCache | None = None
) -> QwenEncoderModel:
    t0 = time.perf_counter()
    model = QwenEncoderModel(load_qwen(name, hidden, device, keep=("vision",)), cache)
    log.info(
        "encoder model %s (%s, hidden %d, %d deepstack levels) loaded in %.1f s",
        model.name,
        name,
        hidden,
        model.deepstack_levels,
        time.perf_counter() - t0,
    )
    return model
