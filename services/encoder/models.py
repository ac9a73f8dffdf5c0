"""Encoder models: how a request's inputs become payload records.

An `EncoderModel` knows `token_count(inputs)` cheaply (before anything is allocated) and
`encode_into(inputs, runs, record)` fills the source-pool records of an allocation.

- Requests with `synthetic_tokens > 0` always use the synthetic payload (docs/DESIGN.md,
  'Synthetic payload and digest').
- `bytes`: a dependency-free text model — one token per UTF-8 byte, embeddings from a seeded
  table, positions (i, i, i). It has no vision tower, so images are validated and then refused.
- `tiny`, `tiny-qwen3` or a checkpoint directory: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model
  (services/models/qwen.py), built from Hugging Face transformers' classes. Models may also have `prepare(inputs)`: work that must
  succeed before anything is allocated (decoding every image), run after `token_count`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch

from common.errors import FailedPrecondition, InvalidArgument, shown
from common.layout import RecordLayout
from common.models import TINY_MODELS
from common.parallel import run_split
from common.pool import field_of
from common.synthetic import fill_synthetic
from services.models.embedding_cache import EmbeddingCache

SUPPORTED_IMAGE_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}


@dataclasses.dataclass(frozen=True)
class EncodeInputs:
    """A request's inputs, transport-free."""

    images: tuple[tuple[bytes, str], ...]
    """(data, mime_type) per image."""
    text: str
    synthetic_tokens: int = 0
    synthetic_seed: int = 0
    scope: str = ""
    """EncodeRequest.cache_scope: mixed into every image's key (`image_digest`)."""
    partition: str = ""
    """The caller's identity under --embedding-cache-scope identity ("" shared): this cache's
    entries for one caller never serve another."""
    scratch: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """A model's per-request work kept between `token_count`, `prepare` and `encode_into`."""


class EncoderModel(Protocol):
    name: str

    def token_count(self, inputs: EncodeInputs) -> int: ...

    def encode_into(
        self, inputs: EncodeInputs, runs: Sequence[torch.Tensor], record: RecordLayout
    ) -> None: ...


def validate_images(images: Sequence[tuple[bytes, str]]) -> None:
    """Cheap checks on image bytes before any work: non-empty, PNG or JPEG by magic number."""
    for i, (data, mime) in enumerate(images):
        if not data:
            raise InvalidArgument(f"images[{i}]: data is empty")
        kind = next(
            (k for k, magic in SUPPORTED_IMAGE_TYPES.items() if data.startswith(magic)), None
        )
        if kind is None:
            raise InvalidArgument(
                f"images[{i}]: not a PNG or JPEG image (mime_type={shown(mime)}, first bytes {data[:8]!r})"
            )
        if mime and mime != kind:
            raise InvalidArgument(f"images[{i}]: mime_type={shown(mime)} but the data is {kind}")


class SyntheticModel:
    """The deterministic synthetic payload (docs/DESIGN.md, 'Synthetic payload and digest')."""

    name = "synthetic"

    def token_count(self, inputs: EncodeInputs) -> int:
        return inputs.synthetic_tokens

    def encode_into(
        self, inputs: EncodeInputs, runs: Sequence[torch.Tensor], record: RecordLayout
    ) -> None:
        def fill(segments: list[torch.Tensor], start: int) -> None:
            for run in segments:
                fill_synthetic(run, record, inputs.synthetic_seed, start)
                start += run.shape[0]

        # Every token's values depend only on its index, so big payloads fill in parallel parts.
        run_split(fill, list(runs), 0)


class ByteTextModel:
    """One token per UTF-8 byte of the text; embeddings from a seeded [256, hidden] table."""

    name = "bytes"

    def __init__(self, hidden: int, dtype: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self._table = torch.randn((256, hidden), generator=gen).to(getattr(torch, dtype))

    def token_count(self, inputs: EncodeInputs) -> int:
        if inputs.images:
            raise FailedPrecondition(
                f"images[0]: the encoder's model {self.name!r} has no vision tower; "
                "send text only or synthetic_tokens"
            )
        return len(inputs.text.encode("utf-8"))

    def encode_into(
        self, inputs: EncodeInputs, runs: Sequence[torch.Tensor], record: RecordLayout
    ) -> None:
        ids = torch.tensor(list(inputs.text.encode("utf-8")), dtype=torch.int64)
        start = 0
        for run in runs:
            k = run.shape[0]
            chunk = ids[start : start + k]
            pos = torch.arange(start, start + k, dtype=torch.int32)
            for f in record.fields:
                view = field_of(run, f)
                if f.name == "embeddings":
                    view.copy_(self._table[chunk].to(view.device))
                elif f.name == "token_ids":
                    view.copy_(chunk.to(torch.int32).to(view.device))
                elif f.name == "mrope_positions":
                    view.copy_(torch.stack((pos, pos, pos), dim=1).to(view.device))
                else:
                    view.zero_()
            start += k


def load_model(
    name: str, hidden: int, dtype: str, device: str = "cpu", cache: EmbeddingCache | None = None
) -> EncoderModel:
    """`bytes`, a tiny Qwen model (`tiny`: Qwen2-VL, `tiny-qwen3`: Qwen3-VL; seeded, hidden size
    `hidden`) or a Qwen checkpoint directory; `cache` keeps the vision rows of images seen
    before (every deepstack level with them)."""
    if name == "bytes":
        return ByteTextModel(hidden, dtype)
    from services.models import qwen, qwen_weights

    if name in TINY_MODELS or qwen_weights.is_checkpoint_name(name):
        return qwen.load_encoder_model(name, hidden, device, cache)
    raise InvalidArgument(
        f"model={name!r}: unknown encoder model (available: 'bytes', "
        f"{', '.join(repr(t) for t in TINY_MODELS)} or a checkpoint directory)"
    )
