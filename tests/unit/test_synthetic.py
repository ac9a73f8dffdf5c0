"""The synthetic payload's numpy route (host memory) writes exactly what the torch route (device
memory) writes, for every field kind, dtype, seed, start and chunking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import synthetic
from common.layout import FieldSpec, RecordLayout, default_fields


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    seed=st.integers(0, 2**40),
    start=st.integers(0, 10**6),
    dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    hidden=st.sampled_from([16, 48, 64]),
    extra=st.booleans(),
    chunk=st.sampled_from([1, 5, 4096]),
)
def test_numpy_route_equals_torch_route(n, seed, start, dtype, hidden, extra, chunk):
    specs = list(default_fields(hidden, dtype))
    if extra:  # a configured field the synthetic payload has no values for: zeros
        specs.append(FieldSpec("deepstack", "float32", (2, 3)))
    record = RecordLayout.pack(specs)
    # Runs are strided views into a bigger slab, as in the pools; the bytes around them stay put.
    numpy_slab = torch.full((n + 4, record.record_bytes), 7, dtype=torch.uint8)
    torch_slab = numpy_slab.clone()
    hidden_of, dtype_of = hidden, getattr(torch, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "_CHUNK_TOKENS", chunk)  # runs filled in several chunks too
        mp.setattr(synthetic, "_HOST_CHUNK_TOKENS", chunk)
        synthetic.fill_synthetic(numpy_slab[2 : 2 + n], record, seed, start)
        synthetic._fill_torch(torch_slab[2 : 2 + n], record, seed, start, hidden_of, dtype_of)
    assert torch.equal(numpy_slab, torch_slab)
