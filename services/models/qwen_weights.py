"""Qwen vision-language weights: the seeded tiny models and local checkpoints, loaded with
Hugging Face `transformers` classes (nothing re-implemented).

- `tiny`: a small Qwen2-VL, and `tiny-qwen3`: a small Qwen3-VL with 3 deepstack levels, each
  built from a config with seeded random weights — no download, text hidden size = the pool's
  `--hidden`, fast on a few CPU cores. The encoder and the language service build the very same
  model (same config, same seed, same torch).
- a directory: a local checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE, the family
  read from its config.json's `model_type`: `common/models.py`) loaded with `from_pretrained`
  (never from the network), with its tokenizer when it has one.

The image processor is the library's slow, PIL-based `Qwen2VLImageProcessorPil`, which every one
of these families uses; only its patch size, bounds and normalisation differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from common.config import ConfigError, describe_model
from common.errors import FailedPrecondition
from common.models import QWEN2_VL, QWEN3_VL, TINY_DEEPSTACK_LEVELS, TINY_MODELS, ModelFamily

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_QWEN3 = "tiny-qwen3"
TINY_SEED = 20240829
"""Seed of the tiny models' weights; both services use it, so they hold the same model."""

# The tiny vocabulary: UTF-8 bytes 0..255, then the Qwen-VL special tokens.
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
TINY_QWEN3_TEXT_LAYERS = TINY_DEEPSTACK_LEVELS + 1
"""The text model adds deepstack level K after its decoder layer K: one layer per level (so
every level reaches the logits, and a wrong one shows), then one more."""
TINY_VISION_DEPTH = 1
TINY_QWEN3_VISION_DEPTH = TINY_DEEPSTACK_LEVELS
"""One vision block per deepstack level: each block's output is also a deepstack feature."""
TINY_VISION_DIM = 32
TINY_QWEN3_POSITION_GRID = 16
"""Side of the tiny Qwen3-VL vision tower's learned position grid (interpolated to any image)."""
TINY_MAX_POSITIONS = 32768
TINY_INIT_STD = 0.1
"""Wider than the library's 0.02, so the random model's logits are spread out (ties would make
"the same first token" a coin toss rather than a check)."""


def is_checkpoint_name(name: str) -> bool:
    return (
        name != "bytes"
        and name not in TINY_MODELS
        and (os.sep in name or name.startswith(".") or os.path.isdir(name))
    )


def tiny_head_dim(hidden: int) -> int:
    """Attention head size of the tiny models for a hidden size (ValueError when none fits)."""
    for head_dim in (32, 16):
        if hidden % head_dim == 0:
            return head_dim
    raise ValueError(f"the tiny models need a hidden size that is a multiple of 16, got {hidden}")


def _tiny_text(
    hidden: int,
    mrope_section: list[int],
    layers: int = TINY_TEXT_LAYERS,
    rope_extra: dict | None = None,
    **extra,
) -> dict:
    """The tiny models' text config: `layers` decoder layers, M-RoPE split as `mrope_section`."""
    head_dim = tiny_head_dim(hidden)
    heads = hidden // head_dim
    s = TINY_SPECIAL_TOKENS
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=TINY_MAX_POSITIONS,
        initializer_range=TINY_INIT_STD,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": mrope_section,
            "rope_theta": 1e6,
            **(rope_extra or {}),
        },
        bos_token_id=s["<|endoftext|>"],
        eos_token_id=s["<|im_end|>"],
        pad_token_id=None,
        **extra,
    )


def _special_ids() -> dict:
    s = TINY_SPECIAL_TOKENS
    return dict(
        image_token_id=s["<|image_pad|>"],
        video_token_id=s["<|video_pad|>"],
        vision_start_token_id=s["<|vision_start|>"],
        vision_end_token_id=s["<|vision_end|>"],
    )


def tiny_config(hidden: int):
    """The tiny Qwen2-VL config: text hidden = `hidden`, 2 decoder layers, a 1-block vision tower."""
    from transformers import Qwen2VLConfig

    half = tiny_head_dim(hidden) // 2  # M-RoPE sections (t, h, w) split the rotary half
    hw = 3 * half // 8  # as Qwen2-VL's [16, 24, 24] splits 64
    # Extra keywords become config attributes (PreTrainedConfig); its typed __init__ omits them.
    return Qwen2VLConfig(  # type: ignore[call-arg]
        text_config=_tiny_text(hidden, [half - 2 * hw, hw, hw]),
        vision_config=dict(
            depth=TINY_VISION_DEPTH,
            embed_dim=TINY_VISION_DIM,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=QWEN2_VL.patch_size,
            spatial_merge_size=QWEN2_VL.merge_size,
            temporal_patch_size=2,
            initializer_range=TINY_INIT_STD,
        ),
        initializer_range=TINY_INIT_STD,
        **_special_ids(),
    )


def tiny_qwen3_config(hidden: int):
    """The tiny Qwen3-VL config: text hidden = `hidden`, 4 decoder layers (the first 3 each take
    a deepstack level), a 3-block vision tower whose every block also gives a deepstack feature
    (3 levels, as the released checkpoints have), interleaved M-RoPE."""
    from transformers import Qwen3VLConfig

    half = tiny_head_dim(hidden) // 2
    hw = 5 * half // 16  # as Qwen3-VL's [24, 20, 20] splits 64
    return Qwen3VLConfig(  # type: ignore[call-arg]
        text_config=_tiny_text(
            hidden,
            [half - 2 * hw, hw, hw],
            layers=TINY_QWEN3_TEXT_LAYERS,
            head_dim=tiny_head_dim(hidden),
            rope_extra={"mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=TINY_QWEN3_VISION_DEPTH,
            hidden_size=TINY_VISION_DIM,
            intermediate_size=2 * TINY_VISION_DIM,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=QWEN3_VL.patch_size,
            spatial_merge_size=QWEN3_VL.merge_size,
            temporal_patch_size=2,
            num_position_embeddings=TINY_QWEN3_POSITION_GRID**2,
            deepstack_visual_indexes=list(range(TINY_DEEPSTACK_LEVELS)),
            initializer_range=TINY_INIT_STD,
        ),
        initializer_range=TINY_INIT_STD,
        **_special_ids(),
    )


TINY_CONFIGS = {TINY: tiny_config, TINY_QWEN3: tiny_qwen3_config}


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QwenVL:
    """A Qwen vision-language model with what preprocessing needs; `source` is a tiny model's
    name or the checkpoint path."""

    source: str
    family: ModelFamily
    model: Any
    """The family's `...ForConditionalGeneration`, eval mode, on `device` (parts the role does
    not need dropped)."""
    processor: Any
    """`Qwen2VLImageProcessorPil`."""
    tokenize: Callable[[str], list[int]]
    device: torch.device
    dtype: torch.dtype
    deepstack_levels: int = 0
    """Deepstack features its vision tower gives per image token (Qwen3-VL: 3; else 0)."""

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


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
"""Where a checkpoint keeps its image processor's settings: the first file is the released
checkpoints'; transformers 5's `save_pretrained` of a whole processor writes the second, with
the image processor's settings inside."""


def _processor(family: ModelFamily, path: str = ""):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if path and any(os.path.isfile(os.path.join(path, f)) for f in PROCESSOR_FILES):
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    if path:
        log.warning(
            "checkpoint %s has no %s: the image processor takes %s's settings",
            path,
            " or ".join(PROCESSOR_FILES),
            family.name,
        )
    return Qwen2VLImageProcessorPil(
        min_pixels=family.min_pixels,
        max_pixels=family.max_pixels,
        patch_size=family.patch_size,
        merge_size=family.merge_size,
        temporal_patch_size=2,
        image_mean=list(family.image_mean),
        image_std=list(family.image_std),
    )


def load_qwen(
    name: str, hidden: int, device: str = "cpu", keep: Sequence[str] = ("vision", "text")
) -> QwenVL:
    """A tiny model (seeded, hidden = `hidden`) or a checkpoint directory of any known family.
    `keep` names the parts the caller runs: "vision" (vision tower + embedding table, the
    encoder) and/or "text" (decoder layers + lm_head, the prefill); the others are dropped to
    save memory."""
    try:
        info = describe_model("model", name, hidden)
    except ConfigError as e:
        raise FailedPrecondition(str(e)) from None
    _offline()
    import transformers

    family = info.family
    cls = getattr(transformers, family.model_class)
    dev = torch.device(device)
    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name](hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = cls(config)
        dtype = torch.float32
        processor = _processor(family)
        tokenize: Callable[[str], list[int]] = ByteTokenizer(TINY_SPECIAL_TOKENS)
    else:
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        model = cls.from_pretrained(name, dtype=dtype, local_files_only=True)
        processor = _processor(family, name)
        tokenize = _checkpoint_tokenizer(name, model.config)
    if "text" not in keep:
        model.model.language_model.layers = torch.nn.ModuleList()
        model.lm_head = None
    if "vision" not in keep:
        model.model.visual = None
    model = model.to(dev).eval()
    model.requires_grad_(False)
    return QwenVL(name, family, model, processor, tokenize, dev, dtype, info.deepstack_levels)


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
