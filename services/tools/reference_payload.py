"""An independent reference for the synthetic payload and its digest (docs/DESIGN.md, 'Synthetic
payload and digest').

This module deliberately uses numpy only -- no torch and nothing from ``common`` or
``services`` -- so that ``epd demo`` checks the services' payload code instead of repeating it.

Synthetic payload (``synthetic_tokens = n``, ``synthetic_seed = s``), token ``i``, column ``j``:

- ``token_ids[i] = (s + i) mod 65536`` (int32)
- ``mrope_positions[i] = (i, 2i, 3i)`` (int32)
- ``embeddings[i][j] = float32(m) / float32(2003) - float32(0.5)`` with
  ``m = (s*7919 + i*131 + j*31) mod 2003``, cast to the embeddings dtype with torch's rounding
  (round to nearest, ties to even).

- ``deepstack_k[i][j]`` (``k`` < the payload's deepstack levels; the field's record index is
  ``x = 3 + k``): the embeddings' formula for seed ``s + 1009*x``, in the embeddings' dtype.

Digest: SHA-256 over embeddings [n, hidden], then token_ids [n], then mrope_positions [n, 3],
then deepstack_0, deepstack_1, ... [n, hidden], each C-contiguous little-endian.

Because 2003 is prime, row ``i`` depends only on ``(s*7919 + i*131) mod 2003``, and stepping
``i`` by one steps that value by 131 (mod 2003): the embeddings byte stream is periodic with a
period of 2003 rows. The digest therefore hashes one period (at most 2003 x hidden values) over
and over, so its memory use is bounded whatever ``n`` is.
"""

from __future__ import annotations

import hashlib

import numpy as np

MODULUS = 2003
"""Period of the embedding values (a prime)."""
SEED_MUL = 7919
ROW_MUL = 131
COL_MUL = 31
TOKEN_ID_MOD = 65536
FIELD_SEED_MUL = 1009
"""A deepstack field at record index x uses seed s + 1009*x."""

_DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

_ROW_CHUNK = 256  # rows of the period computed at once (bounds the int64 temporaries)
_INT_CHUNK = 1 << 16  # tokens of token_ids / mrope_positions hashed at once


def canonical_dtype(dtype: str) -> str:
    """``"bf16"``, ``"torch.bfloat16"``, ... -> ``"bfloat16"``; ``ValueError`` if unsupported."""
    name = str(dtype).strip().lower()
    if name.startswith("torch."):
        name = name[len("torch.") :]
    try:
        return _DTYPE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unsupported embeddings dtype {dtype!r}; expected one of bfloat16, float16, float32"
        ) from None


def element_size(dtype: str) -> int:
    """Bytes per embeddings element of ``dtype``."""
    return 4 if canonical_dtype(dtype) == "float32" else 2


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest, ties to even.

    Same as torch's ``tensor.to(torch.bfloat16)`` for finite values (NaN is never produced by
    the synthetic formula and is not handled specially here).
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = bits + np.uint32(0x7FFF) + lsb  # wraps only for NaN/inf patterns
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> an array whose little-endian bytes are the embeddings in ``dtype``."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values).astype("<u2", copy=False)
    if dtype == "float16":
        return values.astype("<f2")
    return values.astype("<f4", copy=False)


def _row_bases(seed: int, start: int, count: int) -> np.ndarray:
    """``(s*7919 + i*131) mod 2003`` for ``i`` in ``[start, start+count)`` (int64)."""
    base0 = (int(seed) * SEED_MUL + int(start) * ROW_MUL) % MODULUS
    return (base0 + np.arange(count, dtype=np.int64) * ROW_MUL) % MODULUS


def _embedding_rows(seed: int, start: int, count: int, hidden: int, dtype: str) -> np.ndarray:
    """Embeddings rows ``[start, start+count)`` as a C-contiguous [count, hidden] array."""
    out = np.empty((count, hidden), dtype="<f4" if dtype == "float32" else "<u2")
    if dtype == "float16":
        out = out.view("<f2")
    cols = (np.arange(hidden, dtype=np.int64) * COL_MUL) % MODULUS
    for lo in range(0, count, _ROW_CHUNK):
        hi = min(count, lo + _ROW_CHUNK)
        m = (_row_bases(seed, start + lo, hi - lo)[:, None] + cols[None, :]) % MODULUS
        values = m.astype(np.float32) / np.float32(MODULUS) - np.float32(0.5)
        out[lo:hi] = _cast(values, dtype)
    return out


def _token_ids(seed: int, start: int, count: int) -> np.ndarray:
    i = np.arange(start, start + count, dtype=np.int64)
    return ((int(seed) + i) % TOKEN_ID_MOD).astype("<i4")


def _mrope_positions(start: int, count: int) -> np.ndarray:
    i = np.arange(start, start + count, dtype=np.int64)
    # int64 -> int32 wraps like torch's .to(torch.int32) would (only for i >= 2**31 / 3).
    return (i[:, None] * np.array([1, 2, 3], dtype=np.int64)[None, :]).astype("<i4")


def synthetic_payload(
    n_tokens: int, seed: int, hidden: int, dtype: str = "bfloat16", deepstack_levels: int = 0
) -> dict[str, np.ndarray]:
    """The whole payload as numpy arrays (for small ``n``; tests and debugging).

    ``embeddings`` is returned as raw little-endian element bits for bfloat16 (uint16, since
    numpy has no bfloat16), as float16 or float32 otherwise.
    """
    dtype = canonical_dtype(dtype)
    _check(n_tokens, seed, hidden)
    out = {
        "embeddings": _embedding_rows(seed, 0, n_tokens, hidden, dtype),
        "token_ids": _token_ids(seed, 0, n_tokens),
        "mrope_positions": _mrope_positions(0, n_tokens),
    }
    for k in range(deepstack_levels):
        out[f"deepstack_{k}"] = _embedding_rows(
            seed + FIELD_SEED_MUL * (3 + k), 0, n_tokens, hidden, dtype
        )
    return out


def payload_bytes(
    n_tokens: int, hidden: int, dtype: str = "bfloat16", deepstack_levels: int = 0
) -> int:
    """Bytes covered by the digest: every field's size summed."""
    row = int(hidden) * element_size(dtype)
    return int(n_tokens) * (row + 4 + 12 + deepstack_levels * row)


def _hash_rows(h, seed: int, n: int, hidden: int, dtype: str) -> None:
    """Embeddings-formula rows [0, n) for `seed`: one period of (at most) 2003 rows, hashed
    repeatedly."""
    period = _embedding_rows(seed, 0, min(n, MODULUS), hidden, dtype)
    period_bytes = memoryview(period.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy stubs lack __buffer__ on 3.11
    row_bytes = hidden * period.itemsize
    full, rest = divmod(n, MODULUS)
    for _ in range(full):
        h.update(period_bytes)
    if rest:
        h.update(period_bytes[: rest * row_bytes])


def expected_digest(
    n_tokens: int, seed: int, hidden: int, dtype: str = "bfloat16", deepstack_levels: int = 0
) -> str:
    """Hex SHA-256 of the synthetic payload of ``n_tokens`` tokens for ``seed``."""
    dtype = canonical_dtype(dtype)
    _check(n_tokens, seed, hidden)
    n = int(n_tokens)
    h = hashlib.sha256()
    _hash_rows(h, seed, n, hidden, dtype)
    for lo in range(0, n, _INT_CHUNK):
        h.update(_token_ids(seed, lo, min(_INT_CHUNK, n - lo)).tobytes())
    for lo in range(0, n, _INT_CHUNK):
        h.update(_mrope_positions(lo, min(_INT_CHUNK, n - lo)).tobytes())
    for k in range(deepstack_levels):
        _hash_rows(h, seed + FIELD_SEED_MUL * (3 + k), n, hidden, dtype)
    return h.hexdigest()


def _check(n_tokens: int, seed: int, hidden: int) -> None:
    if int(n_tokens) < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if int(hidden) <= 0:
        raise ValueError(f"hidden must be > 0, got {hidden}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be a uint32, got {seed}")
