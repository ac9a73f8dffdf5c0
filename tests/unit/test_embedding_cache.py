"""The encoder's embedding cache (services/models/embedding_cache.py): a repeated image skips its
vision tower, and the payload is the same bytes with the cache on and off.

The oracle of the payload is the tiny Qwen2-VL encoder without a cache (the path every request
took before the cache existed); the cache's own bookkeeping is checked against counts written
here, never against the cache's view of itself."""

from __future__ import annotations

import pytest
import torch

from services.encoder.models import EncodeInputs
from services.models import qwen, qwen_weights
from services.models.embedding_cache import EmbeddingCache, image_digest, image_key
from services.tools.demo import make_image

HIDDEN = 64


@pytest.fixture(scope="module")
def plain() -> qwen.QwenEncoderModel:
    return qwen.load_encoder_model("tiny", HIDDEN)


class Counts:
    """What the cache reported (the metrics' view), summed."""

    def __init__(self):
        self.hits = self.misses = self.evictions = 0
        self.held = 0

    def __call__(self, hits, misses, evictions, held):
        self.hits += hits
        self.misses += misses
        self.evictions += evictions
        self.held = held


def cached_model(capacity: int = 64 * 2**20) -> tuple[qwen.QwenEncoderModel, Counts]:
    counts = Counts()
    return qwen.load_encoder_model("tiny", HIDDEN, cache=EmbeddingCache(capacity, counts)), counts


def image(w: int, h: int, seed: int, fmt: str = "png") -> tuple[bytes, str]:
    return make_image(w, h, fmt, seed=seed), f"image/{fmt}"


A, B, C = image(96, 64, 1), image(64, 128, 2, "jpeg"), image(80, 80, 3)


def payload(model: qwen.QwenEncoderModel, images, text: str) -> tuple[torch.Tensor, ...]:
    embeds, ids, pos, _, _ = model.encode(EncodeInputs(tuple(images), text))
    return embeds, ids, pos


def same_bytes(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


# Requests of one conversation: each row is (images, text); images repeat across rows.
CONVERSATIONS = {
    "same image after different texts": [
        ([A], "<image> what is this?"),
        ([A], "and now, in one word: <image>"),
        ([A], "<image>"),
    ],
    "images in another order": [([A, B], "<image><image>"), ([B, A], "first <image> then <image>")],
    "one image repeated in a request": [([A, C, A], "<image> vs <image> vs <image>")],
    "new images among seen ones": [([A], "<image>"), ([C, A, B], "<image><image><image>")],
}


@pytest.mark.parametrize("turns", list(CONVERSATIONS.values()), ids=list(CONVERSATIONS))
def test_the_payload_is_the_same_bytes_with_the_cache_on_and_off(plain, turns):
    model, counts = cached_model()
    seen: set[bytes] = set()
    hits = misses = 0
    for images, text in turns:
        assert same_bytes(payload(model, images, text), payload(plain, images, text))
        for data, _ in images:
            hits, misses = (hits + 1, misses) if data in seen else (hits, misses + 1)
            seen.add(data)
    assert (counts.hits, counts.misses) == (hits, misses)
    assert counts.held == model.cache.nbytes > 0


def test_a_hit_skips_the_vision_tower(plain, monkeypatch):
    model, counts = cached_model()
    payload(model, [A, B], "<image><image>")
    calls = []
    real = model._vision
    monkeypatch.setattr(model, "_vision", lambda *a: calls.append(a) or real(*a))
    assert same_bytes(
        payload(model, [B, A], "<image><image>"), payload(plain, [B, A], "<image><image>")
    )
    assert calls == [] and counts.hits == 2


def test_capacity_bounds_the_bytes_and_the_least_recent_goes_first():
    rows = {k: torch.full((4, 8), float(k)) for k in range(4)}  # 128 bytes each
    counts = Counts()
    cache = EmbeddingCache(3 * 128, counts)
    for k in range(3):
        cache.put(str(k), rows[k])
    assert cache.get("0") is not None  # 0 is now the most recent
    cache.put("3", rows[3])  # 1 is the least recently used
    assert cache.get("1") is None and cache.get("0") is not None and cache.get("2") is not None
    assert (counts.evictions, cache.nbytes, counts.held, len(cache)) == (1, 384, 384, 3)
    cache.put("big", torch.zeros(4, 97))  # larger than the whole cache: not kept
    assert cache.get("big") is None and len(cache) == 3
    kept = cache.get("3")
    assert kept is not None and torch.equal(kept, rows[3])
    rows[3].fill_(-1)  # the cache holds its own copy
    assert torch.equal(cache.get("3"), torch.full((4, 8), 3.0))


def test_zero_bytes_is_no_cache(plain):
    model, counts = cached_model(0)
    assert model.cache is None
    assert same_bytes(payload(model, [A], "<image>"), payload(plain, [A], "<image>"))
    assert (counts.hits, counts.misses) == (0, 0)


def test_the_key_names_the_bytes_and_the_model():
    fp = "model-a"
    a, b = image_digest(A[0]), image_digest(B[0])
    assert image_key(fp, a) == image_key(fp, image_digest(bytes(A[0])))
    assert image_key(fp, a) != image_key(fp, b)
    assert image_key(fp, a) != image_key("model-b", a)


def test_the_fingerprint_tells_models_apart(plain):
    other = qwen.load_encoder_model("tiny", 2 * HIDDEN, cache=EmbeddingCache(1))
    assert qwen_weights.fingerprint(plain.qwen) == qwen_weights.fingerprint(
        qwen_weights.load_qwen("tiny", HIDDEN, keep=("vision",))
    )
    assert qwen_weights.fingerprint(plain.qwen) != other.fingerprint
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        EmbeddingCache(-1)
