"""The Qwen2-VL encoder model, built from Hugging Face `transformers` classes.

Nothing here re-implements the model: preprocessing is the library's (slow, PIL-based)
`Qwen2VLImageProcessorPil` (smart resize to multiples of 28 within min/max pixels, 14x14 patches,
2x2 merge), image embeddings come from the model's vision tower (`get_image_features`), text
embeddings from the language model's embedding table, and M-RoPE positions from the model's own
`get_rope_index`. The payload is the full per-token input embeddings (text and image rows merged,
exactly what `Qwen2VLModel.forward` feeds its language model), the token ids and the (t, h, w)
positions. The M-RoPE position delta (max position + 1 - tokens, needed to continue decoding) is
not a payload field: the language side computes it from `mrope_positions`.

Weights:
- `tiny`: a small Qwen2-VL built from a config with seeded random weights — no download, hidden
  size = the pool's `--hidden`, fast on a few CPU cores. The encoder and the language service
  build the very same model (same config, same seed, same torch).
- a directory: a local checkpoint (Qwen2-VL-2B/7B-Instruct ...) loaded with `from_pretrained`
  (never from the network), with its tokenizer when it has one.

Text is the raw prompt (apply the chat template on the client when the checkpoint wants one).
Images go where the text has a placeholder — `<image>`, `<|image_pad|>` or
`<|vision_start|><|image_pad|><|vision_end|>`, one per image, in order — or, when the text has
none, all before the text. Without a tokenizer file, text is tokenized byte by byte (UTF-8 bytes
are ids 0..255; the tiny vocabulary's special tokens have their own ids).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.errors import FailedPrecondition, InvalidArgument, shown
from common.layout import RecordLayout
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

log = logging.getLogger(__name__)

MODEL_NAME = "qwen2-vl"
TINY = "tiny"
TINY_SEED = 20240829
"""Seed of the tiny model's weights; both services use it, so they hold the same model."""

# Qwen2-VL-7B-Instruct's preprocessor_config.json: 4 .. 16384 tokens per image.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384
PATCH_SIZE = 14
MERGE_SIZE = 2
MAX_ASPECT_RATIO = 200
"""The library's smart resize refuses images more elongated than this."""
MAX_DECODE_PIXELS = 1 << 28
"""Images above this many pixels are refused before they are decoded (decompression bombs)."""
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}

# The tiny model's vocabulary: UTF-8 bytes 0..255, then Qwen2-VL's special tokens.
TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|vision_start|>": 259,
    "<|vision_end|>": 260,
    "<|vision_pad|>": 261,
    "<|image_pad|>": 262,
    "<|video_pad|>": 263,
}
TINY_VOCAB = 320
TINY_TEXT_LAYERS = 2
TINY_VISION_DEPTH = 1
TINY_VISION_DIM = 32
TINY_MAX_POSITIONS = 32768
TINY_INIT_STD = 0.1
"""Wider than the library's 0.02, so the random model's logits are spread out (ties would make
"the same first token" a coin toss rather than a check)."""

IMAGE_PLACEHOLDER = re.compile(
    r"(?:<\|vision_start\|>)?<\|image_pad\|>(?:<\|vision_end\|>)?|<image>"
)


def is_checkpoint_name(name: str) -> bool:
    return name not in ("bytes", TINY) and (
        os.sep in name or name.startswith(".") or os.path.isdir(name)
    )


def tiny_head_dim(hidden: int) -> int:
    """Attention head size of the tiny model for a hidden size (ValueError when none fits)."""
    for head_dim in (32, 16):
        if hidden % head_dim == 0:
            return head_dim
    raise ValueError(f"the tiny model needs a hidden size that is a multiple of 16, got {hidden}")


def tiny_config(hidden: int):
    """The tiny Qwen2-VL config: text hidden = `hidden`, 2 decoder layers, a 1-block vision tower."""
    from transformers import Qwen2VLConfig

    head_dim = tiny_head_dim(hidden)
    heads = hidden // head_dim
    half = head_dim // 2  # M-RoPE sections (t, h, w) split the rotary half
    hw = 3 * half // 8  # as Qwen2-VL's [16, 24, 24] splits 64
    s = TINY_SPECIAL_TOKENS
    # Extra keywords become config attributes (PreTrainedConfig); its typed __init__ omits them.
    return Qwen2VLConfig(  # type: ignore[call-arg]
        text_config=dict(
            vocab_size=TINY_VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=TINY_TEXT_LAYERS,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=TINY_MAX_POSITIONS,
            initializer_range=TINY_INIT_STD,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [half - 2 * hw, hw, hw],
                "rope_theta": 1e6,
            },
            bos_token_id=s["<|endoftext|>"],
            eos_token_id=s["<|im_end|>"],
            pad_token_id=None,
        ),
        vision_config=dict(
            depth=TINY_VISION_DEPTH,
            embed_dim=TINY_VISION_DIM,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=2,
            initializer_range=TINY_INIT_STD,
        ),
        image_token_id=s["<|image_pad|>"],
        video_token_id=s["<|video_pad|>"],
        vision_start_token_id=s["<|vision_start|>"],
        vision_end_token_id=s["<|vision_end|>"],
        initializer_range=TINY_INIT_STD,
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QwenVL:
    """A Qwen2-VL model with what preprocessing needs; `source` is `tiny` or the checkpoint path."""

    source: str
    model: Any
    """`Qwen2VLForConditionalGeneration`, eval mode, on `device` (parts the role does not need dropped)."""
    processor: Any
    """`Qwen2VLImageProcessorPil`."""
    tokenize: Callable[[str], list[int]]
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def hidden(self) -> int:
        return self.model.config.text_config.hidden_size


def _offline() -> None:
    # No hub access at run time, ever: local files or nothing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_qwen2vl(
    name: str, hidden: int, device: str = "cpu", keep: Sequence[str] = ("vision", "text")
) -> QwenVL:
    """`tiny` (seeded, hidden = `hidden`) or a checkpoint directory. `keep` names the parts the
    caller runs: "vision" (vision tower + embedding table, the encoder) and/or "text" (decoder
    layers + lm_head, the prefill); the others are dropped to save memory."""
    _offline()
    from transformers import PreTrainedConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    dev = torch.device(device)
    if name == TINY:
        config = tiny_config(hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = Qwen2VLForConditionalGeneration(config)
        dtype = torch.float32
        processor = Qwen2VLImageProcessorPil(
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            patch_size=PATCH_SIZE,
            merge_size=MERGE_SIZE,
            temporal_patch_size=2,
        )
        tokenize: Callable[[str], list[int]] = ByteTokenizer(TINY_SPECIAL_TOKENS)
    else:
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FailedPrecondition(
                f"model={name!r}: not 'tiny' and not a checkpoint directory with a config.json"
            )
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            name, dtype=dtype, local_files_only=True
        )
        processor = (
            Qwen2VLImageProcessorPil.from_pretrained(name, local_files_only=True)
            if os.path.isfile(os.path.join(name, "preprocessor_config.json"))
            else Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        )
        tokenize = _checkpoint_tokenizer(name, model.config)
    text_config = model.config.text_config
    assert isinstance(text_config, PreTrainedConfig)  # the config's __post_init__ made it one
    if text_config.hidden_size != hidden:
        raise FailedPrecondition(
            f"model={name!r} has hidden size {text_config.hidden_size} but the pool's hidden is {hidden}; "
            f"start with --hidden {text_config.hidden_size}"
        )
    if "text" not in keep:
        model.model.language_model.layers = torch.nn.ModuleList()
        model.lm_head = None
    if "vision" not in keep:
        model.model.visual = None
    # PreTrainedModel.to is @wraps(torch.nn.Module.to): typeshed's _Wrapped takes `self` first.
    model = model.to(dev).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    return QwenVL(name, model, processor, tokenize, dev, dtype)


class ByteTokenizer:
    """The byte-level fallback: UTF-8 bytes are ids 0..255, known special-token strings their ids."""

    def __init__(self, specials: dict[str, int]):
        self.specials = dict(specials)
        self._split = (
            re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")
            if specials
            else None
        )

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for part in parts:
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids


def _checkpoint_tokenizer(path: str, config) -> Callable[[str], list[int]]:
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if any(os.path.isfile(os.path.join(path, f)) for f in files):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return lambda text: tok(text, add_special_tokens=False)["input_ids"] if text else []
    log.warning("checkpoint %s has no tokenizer files: text is tokenized byte by byte", path)
    return ByteTokenizer(
        {
            "<|vision_start|>": config.vision_start_token_id,
            "<|vision_end|>": config.vision_end_token_id,
            "<|image_pad|>": config.image_token_id,
        }
    )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageInfo:
    index: int
    format: str
    width: int
    height: int
    grid_h: int
    """Patch rows after the resize (resized height / 14)."""
    grid_w: int

    @property
    def tokens(self) -> int:
        return (self.grid_h // MERGE_SIZE) * (self.grid_w // MERGE_SIZE)


def smart_resize(
    height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """The image processor's own resize rule (imported, not re-implemented)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as rule

    return rule(
        height, width, factor=PATCH_SIZE * MERGE_SIZE, min_pixels=min_pixels, max_pixels=max_pixels
    )


def image_tokens(
    width: int, height: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> int:
    """Tokens one image of this size becomes: (H/28)·(W/28) after the smart resize."""
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    return (h // (PATCH_SIZE * MERGE_SIZE)) * (w // (PATCH_SIZE * MERGE_SIZE))


def probe_image(index: int, data: bytes, mime: str, min_pixels: int, max_pixels: int):
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
    side = PATCH_SIZE * MERGE_SIZE
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
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    return img, ImageInfo(index, fmt, width, height, h // PATCH_SIZE, w // PATCH_SIZE)


def decode_image(img, info: ImageInfo):
    """Decode every pixel (a truncated or corrupt file fails here) and convert to RGB."""
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise InvalidArgument(
            f"images[{info.index}]: corrupt {info.format} data ({info.width}x{info.height}): {e}"
        ) from None


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


class QwenEncoderModel:
    """Encoder model `qwen2-vl`: `token_count` from the image sizes (headers only), `prepare`
    decodes every image (before anything is allocated), `encode_into` runs the vision tower and
    the embedding table and writes embeddings, token ids and M-RoPE positions into the pool."""

    name = MODEL_NAME

    def __init__(self, qwen: QwenVL, cache: EmbeddingCache | None = None):
        self.qwen = qwen
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
        cached = inputs.scratch.get(MODEL_NAME)
        if cached is not None:
            return cached
        opened, infos = [], []
        for i, (data, mime) in enumerate(inputs.images):
            img, info = probe_image(i, data, mime, self.min_pixels, self.max_pixels)
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
        inputs.scratch[MODEL_NAME] = plan
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

    def embeddings(self, plan: Plan) -> torch.Tensor:
        """[T, hidden] input embeddings in the model's dtype: text rows from the embedding table,
        image-pad rows replaced by the vision tower's merged patch features, as the model does."""
        q = self.qwen
        ids = plan.token_ids.to(q.device)
        embeds = q.model.get_input_embeddings()(ids)
        self.last_timings = {"preprocess_s": 0.0, "vision_s": 0.0}  # this request's, summed
        if plan.images:
            # One image at a time, cache or not: a batch's matrix shapes change the rounding, so
            # only rows computed alone are the same bytes whichever other images come with them.
            feats = torch.cat([self._image_rows(plan, k) for k in range(len(plan.images))], dim=0)
            mask = ids == self.image_token
            embeds = embeds.masked_scatter(mask[:, None], feats.to(embeds.dtype))
        return embeds

    def _vision(self, decoded: list[Any], images: list[ImageInfo]) -> torch.Tensor:
        """The vision tower's merged patch rows of these images, in order, on the model's device."""
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
        feats = q.model.model.get_image_features(
            batch["pixel_values"].to(q.device), grid.to(q.device)
        ).pooler_output
        self.last_timings["preprocess_s"] += t1 - t0
        self.last_timings["vision_s"] += time.perf_counter() - t1
        return torch.cat(feats, dim=0)

    def _image_rows(self, plan: Plan, k: int) -> torch.Tensor:
        """Image k's rows: from the cache, or computed alone (and kept when there is a cache)."""
        assert plan.decoded is not None  # prepare() ran
        if self.cache is None:
            return self._vision([plan.decoded[k]], [plan.images[k]])
        key = partitioned(plan.keys[k], plan.partition)
        rows = self.cache.get(key)
        if rows is not None and rows.shape[0] == plan.images[k].tokens:
            plan.cached.add(k)
            return rows.to(self.qwen.device)
        rows = self._vision([plan.decoded[k]], [plan.images[k]])
        self.cache.put(key, rows)
        return rows

    def encode(self, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(embeddings [T, hidden], token_ids [T], mrope_positions [T, 3], position delta) — in
        one process, no pool: what `encode_into` writes, and what tests compare against."""
        self.prepare(inputs)
        plan = self.plan(inputs)
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            embeds = self.embeddings(plan)
            pos, delta = self.positions(plan)
        log.debug(
            "encoded %d tokens (%s) in %.3f s %s",
            plan.total,
            ", ".join(f"{i.width}x{i.height} {i.format} -> {i.tokens}" for i in plan.images)
            or "text only",
            time.perf_counter() - started,
            self.last_timings if plan.images else "",
        )
        return embeds, plan.token_ids, pos, delta

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
        embeds, ids, pos, _ = self.encode(inputs)
        plan = inputs.scratch.pop(MODEL_NAME)  # decoded images no longer needed
        inputs.scratch[IMAGES] = EncodedImages(self.image_spans(plan, pos), frozenset(plan.cached))
        start = 0
        for run in runs:
            k = run.shape[0]
            for f in record.fields:
                view = field_of(run, f)
                if f.name == "embeddings":
                    view.copy_(embeds[start : start + k].to(device=view.device, dtype=view.dtype))
                elif f.name == "token_ids":
                    view.copy_(ids[start : start + k].to(device=view.device, dtype=view.dtype))
                elif f.name == "mrope_positions":
                    view.copy_(pos[start : start + k].to(device=view.device, dtype=view.dtype))
                else:
                    view.zero_()
            start += k
        if start != embeds.shape[0]:
            raise FailedPrecondition(f"runs hold {start} tokens, the payload has {embeds.shape[0]}")


def fingerprint(qwen: QwenVL) -> str:
    """What makes one model's vision rows differ from another's, hashed: its source, its
    configuration, the image processor's settings, the device type, and a sample of every weight
    tensor (shape, dtype, first and last values: cheap even for a 7B checkpoint)."""
    digest = hashlib.sha256()
    digest.update(f"{qwen.source}\0{qwen.device.type}\0{qwen.dtype}\0".encode())
    digest.update(qwen.config.to_json_string(use_diff=False).encode())
    digest.update(json.dumps(qwen.processor.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in qwen.model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def load_encoder_model(
    name: str, hidden: int, device: str = "cpu", cache: EmbeddingCache | None = None
) -> QwenEncoderModel:
    t0 = time.perf_counter()
    model = QwenEncoderModel(load_qwen2vl(name, hidden, device, keep=("vision",)), cache)
    log.info(
        "encoder model %s (%s, hidden %d) loaded in %.1f s",
        MODEL_NAME,
        name,
        hidden,
        time.perf_counter() - t0,
    )
    return model
