"""The deterministic synthetic payload (docs/DESIGN.md, "Synthetic payload and digest"): the load
generator for tests and benches.

`fill_synthetic` writes tokens [start, start+n) of request (n_total, seed) straight into token
records, chunk by chunk, so a 100k-token payload never needs a second full-size buffer. Runs in
host memory take a numpy route with the same values (tested): it gathers rows straight into the
records, where torch gathers into a temporary and copies that (measured, hidden 3584 bf16: 1024
tokens 0.9 vs 1.0 ms, 8192 tokens 20 vs 48 ms). Device memory takes the torch route.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from common.layout import DEEPSTACK_PREFIX, RecordLayout

_CHUNK_TOKENS = 4096
_HOST_CHUNK_TOKENS = (
    256  # the numpy gather's temporary stays small (1.8 MB at hidden 3584) and is reused
)
_MOD = 2003
# numpy twins of the field dtypes (bfloat16 has none: its rows are copied as 16-bit words).
_NP_WORDS = {
    "bfloat16": np.int16,
    "float16": np.int16,
    "float32": np.int32,
    "int32": np.int32,
    "int64": np.int64,
    "int16": np.int16,
    "uint8": np.uint8,
    "int8": np.int8,
}


@functools.lru_cache(maxsize=8)
def _row_table(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Every possible embeddings row: row c holds value(m = (c + 31*j) mod 2003) for column j.
    A token's row only depends on c = (s*7919 + i*131) mod 2003, so a payload is a gather."""
    c = torch.arange(_MOD, dtype=torch.int64)
    j = torch.arange(hidden, dtype=torch.int64)
    m = (c[:, None] + j[None, :] * 31) % _MOD
    values = (m.to(torch.float32) / torch.tensor(float(_MOD), dtype=torch.float32)) - torch.tensor(
        0.5, dtype=torch.float32
    )
    return values.to(dtype)


def _row_index(seed: int, i):
    """Row of `_row_table` holding token i's embeddings (i: a torch or numpy int64 array)."""
    return (seed * 7919 + i * 131) % _MOD


def _token_id(seed: int, i):
    return (seed + i) % 65536


FIELD_SEED_MUL = 1009
"""A [hidden] field at record index x > 0 (a deepstack level) takes the embeddings' values for
seed s + 1009 * x: the same formula, the field's index mixed into the seed."""


def field_seed(seed: int, index: int) -> int:
    return seed + FIELD_SEED_MUL * index


def synthetic_fields(
    seed: int, start: int, n: int, hidden: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The synthetic values of tokens [start, start+n): embeddings, token_ids, mrope_positions
    (a deepstack field's come from `_deepstack_rows`, by its record index)."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    return {
        "embeddings": _row_table(hidden, dtype).index_select(0, _row_index(seed, i)),
        "token_ids": _token_id(seed, i).to(torch.int32),
        "mrope_positions": torch.stack((i, 2 * i, 3 * i), dim=1).to(torch.int32),
    }


def _deepstack_rows(
    seed: int, index: int, start: int, n: int, hidden: int, dtype: torch.dtype
) -> torch.Tensor:
    """The values of the deepstack field at record index `index`, tokens [start, start+n)."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    return _row_table(hidden, dtype).index_select(0, _row_index(field_seed(seed, index), i))


def fill_synthetic(records: torch.Tensor, record: RecordLayout, seed: int, start: int) -> None:
    """Write the synthetic values of tokens [start, start+len(records)) into uint8 records."""
    emb_field = record.field("embeddings")
    hidden = emb_field.spec.per_token_shape[0]
    dtype = getattr(torch, emb_field.spec.dtype)
    n = records.shape[0]
    if records.device.type == "cpu":
        host = records.numpy()
        for lo in range(0, n, _HOST_CHUNK_TOKENS):
            _fill_host(host[lo : lo + _HOST_CHUNK_TOKENS], record, seed, start + lo, hidden, dtype)
    else:
        _fill_torch(records, record, seed, start, hidden, dtype)


def _fill_torch(
    records: torch.Tensor,
    record: RecordLayout,
    seed: int,
    start: int,
    hidden: int,
    dtype: torch.dtype,
) -> None:
    """`fill_synthetic` with torch ops (device memory), chunk by chunk."""
    from common.pool import field_of  # local: pool imports torch-heavy code only when needed

    n = records.shape[0]
    for lo in range(0, n, _CHUNK_TOKENS):
        hi = min(n, lo + _CHUNK_TOKENS)
        values = synthetic_fields(seed, start + lo, hi - lo, hidden, dtype)
        for index, f in enumerate(record.fields):
            view = field_of(records[lo:hi], f)
            if f.name in values:
                view.copy_(values[f.name].to(view.device))
            elif f.name.startswith(DEEPSTACK_PREFIX):
                rows = _deepstack_rows(seed, index, start + lo, hi - lo, hidden, dtype)
                view.copy_(rows.to(view.device))
            else:
                view.zero_()  # extra configured fields: zeros in synthetic payloads


def _words(records: np.ndarray, field) -> np.ndarray:
    """The field's bytes in records [n, record_bytes] as a numpy view of same-size words [n, *shape]."""
    raw = records[:, field.offset : field.offset + field.bytes_per_token]
    return raw.view(_NP_WORDS[field.spec.dtype]).reshape(
        records.shape[0], *field.spec.per_token_shape
    )


def _fill_host(
    records: np.ndarray,
    record: RecordLayout,
    seed: int,
    start: int,
    hidden: int,
    dtype: torch.dtype,
) -> None:
    """`fill_synthetic` of a host-memory run with numpy: the same values (the seed is a
    uint32, so the int64 arithmetic never overflows on either route)."""
    n = records.shape[0]
    i = np.arange(start, start + n, dtype=np.int64)
    table = _row_table(hidden, dtype)
    words = table.view({2: torch.int16, 4: torch.int32}[table.element_size()]).numpy()
    for index, f in enumerate(record.fields):
        out = _words(records, f)
        if f.name == "embeddings":
            out[...] = words[_row_index(seed, i)]
        elif f.name.startswith(DEEPSTACK_PREFIX):
            out[...] = words[_row_index(field_seed(seed, index), i)]
        elif f.name == "token_ids":
            out[...] = _token_id(seed, i).astype(np.int32)
        elif f.name == "mrope_positions":
            out[...] = np.stack((i, 2 * i, 3 * i), axis=1).astype(np.int32)
        else:
            out[...] = 0
