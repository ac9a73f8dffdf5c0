"""The synthetic payload's numpy route (small host-memory runs) writes exactly what the torch
route writes, for every field kind, dtype, seed and start."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import synthetic
from common.layout import FieldSpec, RecordLayout, default_fields


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), seed=st.integers(0, 2**40), start=st.integers(0, 10**6),
       dtype=st.sampled_from(["bfloat16", "float16", "float32"]), hidden=st.sampled_from([16, 48, 64]),
       extra=st.booleans())
def test_numpy_route_equals_torch_route(n, seed, start, dtype, hidden, extra):
    specs = list(default_fields(hidden, dtype))
    if extra:  # a configured field the synthetic payload has no values for: zeros
        specs.append(FieldSpec("deepstack", "float32", (2, 3)))
    record = RecordLayout.pack(specs)
    # Runs are strided views into a bigger slab, as in the pools; the bytes around them stay put.
    numpy_slab = torch.full((n + 4, record.record_bytes), 7, dtype=torch.uint8)
    torch_slab = numpy_slab.clone()
    assert n * record.record_bytes <= synthetic.SMALL_FILL_BYTES
    synthetic.fill_synthetic(numpy_slab[2:2 + n], record, seed, start)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "SMALL_FILL_BYTES", -1)  # force the torch route
        synthetic.fill_synthetic(torch_slab[2:2 + n], record, seed, start)
    assert torch.equal(numpy_slab, torch_slab)
