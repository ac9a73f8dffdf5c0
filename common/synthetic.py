"""The deterministic synthetic payload of DESIGN §14 (the load generator for tests and benches).

`fill_synthetic` writes tokens [start, start+n) of request (n_total, seed) straight into token
records, chunk by chunk, so a 100k-token payload never needs a second full-size buffer.
"""

from __future__ import annotations

import functools

import torch

from common.layout import RecordLayout

_CHUNK_TOKENS = 4096
_MOD = 2003


@functools.lru_cache(maxsize=8)
def _row_table(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Every possible embeddings row: row c holds value(m = (c + 31*j) mod 2003) for column j.
    A token's row only depends on c = (s*7919 + i*131) mod 2003, so a payload is a gather."""
    c = torch.arange(_MOD, dtype=torch.int64)
    j = torch.arange(hidden, dtype=torch.int64)
    m = (c[:, None] + j[None, :] * 31) % _MOD
    values = (m.to(torch.float32) / torch.tensor(float(_MOD), dtype=torch.float32)) - torch.tensor(0.5, dtype=torch.float32)
    return values.to(dtype)


def synthetic_fields(seed: int, start: int, n: int, hidden: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The §14 values of tokens [start, start+n): embeddings, token_ids, mrope_positions."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    c = (seed * 7919 + i * 131) % _MOD
    return {
        "embeddings": _row_table(hidden, dtype).index_select(0, c),
        "token_ids": ((seed + i) % 65536).to(torch.int32),
        "mrope_positions": torch.stack((i, 2 * i, 3 * i), dim=1).to(torch.int32),
    }


def fill_synthetic(records: torch.Tensor, record: RecordLayout, seed: int, start: int) -> None:
    """Write the synthetic values of tokens [start, start+len(records)) into uint8 records."""
    from common.pool import field_of  # local: pool imports torch-heavy code only when needed

    emb_field = record.field("embeddings")
    hidden = emb_field.spec.per_token_shape[0]
    dtype = getattr(torch, emb_field.spec.dtype)
    n = records.shape[0]
    for lo in range(0, n, _CHUNK_TOKENS):
        hi = min(n, lo + _CHUNK_TOKENS)
        values = synthetic_fields(seed, start + lo, hi - lo, hidden, dtype)
        for f in record.fields:
            view = field_of(records[lo:hi], f)
            if f.name in values:
                view.copy_(values[f.name].to(view.device))
            else:
                view.zero_()  # extra configured fields: zeros in synthetic payloads
