"""services.tools.reference_payload (numpy) against a straightforward torch rendering of the
synthetic payload (docs/DESIGN.md, "Synthetic payload and digest")."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.tools import reference_payload as ref

REPO = Path(__file__).resolve().parents[2]
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_payload(n: int, seed: int, hidden: int, dtype: str) -> dict[str, torch.Tensor]:
    """The synthetic payload, written as plainly as possible with torch."""
    i = torch.arange(n, dtype=torch.int64)
    j = torch.arange(hidden, dtype=torch.int64)
    m = (seed * 7919 + i[:, None] * 131 + j[None, :] * 31) % 2003
    values = m.to(torch.float32) / torch.tensor(2003, dtype=torch.float32) - torch.tensor(
        0.5, dtype=torch.float32
    )
    return {
        "embeddings": values.to(TORCH_DTYPES[dtype]).contiguous(),
        "token_ids": ((seed + i) % 65536).to(torch.int32),
        "mrope_positions": torch.stack([i, 2 * i, 3 * i], dim=1).to(torch.int32).contiguous(),
    }


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()  # host is little-endian


def torch_digest(n: int, seed: int, hidden: int, dtype: str) -> str:
    p = torch_payload(n, seed, hidden, dtype)
    h = hashlib.sha256()
    for name in ("embeddings", "token_ids", "mrope_positions"):
        h.update(torch_bytes(p[name]))
    return h.hexdigest()


CASES = [
    # (n, seed, hidden, dtype)
    (1, 0, 8, "bfloat16"),
    (7, 1, 16, "bfloat16"),
    (130, 12345, 64, "bfloat16"),
    (2003, 3, 48, "bfloat16"),  # exactly one period
    (2004, 3, 48, "bfloat16"),  # one period + 1 row
    (4500, 99, 96, "bfloat16"),  # two periods + a partial one
    (300, 65530, 32, "bfloat16"),  # token ids wrap past 65535
    (70000, 65535, 4, "bfloat16"),  # wraps at i=1, and i itself passes 65536
    (257, 2**32 - 1, 40, "bfloat16"),  # largest uint32 seed
    (2100, 7, 24, "float16"),
    (300, 65534, 33, "float16"),
    (2100, 7, 24, "float32"),
    (5, 65535, 1, "float32"),
    (3, 424242, 3584, "bfloat16"),  # Qwen2-VL-7B width
    (3, 424242, 3584, "float16"),
]


@pytest.mark.parametrize("n,seed,hidden,dtype", CASES)
def test_digest_matches_torch(n, seed, hidden, dtype):
    assert ref.expected_digest(n, seed, hidden, dtype) == torch_digest(n, seed, hidden, dtype)


@pytest.mark.parametrize("n,seed,hidden,dtype", [c for c in CASES if c[0] <= 5000])
def test_payload_arrays_match_torch(n, seed, hidden, dtype):
    got = ref.synthetic_payload(n, seed, hidden, dtype)
    want = torch_payload(n, seed, hidden, dtype)
    for name in ("embeddings", "token_ids", "mrope_positions"):
        assert got[name].shape == tuple(want[name].shape), name
        assert got[name].tobytes() == torch_bytes(want[name]), name


def test_token_ids_wrap():
    p = ref.synthetic_payload(4, 65534, 2)
    assert p["token_ids"].tolist() == [65534, 65535, 0, 1]
    assert p["token_ids"].dtype == np.dtype("<i4")
    assert p["mrope_positions"].tolist() == [[0, 0, 0], [1, 2, 3], [2, 4, 6], [3, 6, 9]]


def test_empty_payload_digest():
    assert ref.expected_digest(0, 5, 16) == hashlib.sha256(b"").hexdigest()


def test_digest_depends_on_every_input():
    base = ref.expected_digest(100, 1, 16, "bfloat16")
    assert ref.expected_digest(101, 1, 16, "bfloat16") != base
    assert ref.expected_digest(100, 2, 16, "bfloat16") != base
    assert ref.expected_digest(100, 1, 17, "bfloat16") != base
    assert ref.expected_digest(100, 1, 16, "float16") != base
    # seeds congruent mod 2003 give the same embeddings but different token ids
    assert ref.expected_digest(100, 1 + 2003, 16) != base


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = random_bits.view(np.float32)
    values = values[np.isfinite(values)]
    # exact ties (low half == 0x8000) with both even and odd kept halves, and near-ties
    highs = rng.integers(0, 0x7F7F, size=2000, dtype=np.uint32) << np.uint32(16)
    ties = np.concatenate(
        [
            highs | np.uint32(0x8000),
            highs | np.uint32(0x7FFF),
            highs | np.uint32(0x8001),
            highs | np.uint32(0x18000),
        ]
    )
    ties = ties.astype(np.uint32).view(np.float32)
    specials = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -0.5,
            1e-40,
            -1e-40,
            np.finfo(np.float32).max,
            np.finfo(np.float32).tiny,
        ],
        dtype=np.float32,
    )
    allv = np.concatenate([values, ties[np.isfinite(ties)], specials]).astype(np.float32)
    want = torch.from_numpy(allv).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = ref.float32_to_bfloat16_bits(allv)
    assert np.array_equal(got, want)


def test_large_payload_memory_is_bounded():
    """100k tokens x hidden 3584 in bf16 is ~717 MB of payload; the digest must not hold it."""
    code = (
        "import resource, sys\n"
        "from services.tools import reference_payload as ref\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "d = ref.expected_digest(100_000, 123, 3584, 'bfloat16')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(d), (after - before) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=REPO,
    ).stdout.split()
    assert out[0] == "64"
    assert int(out[1]) < 200, f"digest grew RSS by {out[1]} MiB"


def test_reference_module_does_not_import_torch_or_project_code():
    code = (
        "import sys\n"
        "import services.tools.reference_payload\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')"
        " or m == 'common' or m.startswith('common.')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=REPO,
    ).stdout.strip()
    assert out == ""


def test_bad_arguments():
    with pytest.raises(ValueError):
        ref.expected_digest(10, 1, 16, "int8")
    with pytest.raises(ValueError):
        ref.expected_digest(-1, 1, 16)
    with pytest.raises(ValueError):
        ref.expected_digest(10, 2**32, 16)
    assert ref.canonical_dtype("torch.bfloat16") == "bfloat16"
    assert ref.canonical_dtype("BF16") == "bfloat16"
    assert ref.payload_bytes(10, 16, "bfloat16") == 10 * (32 + 16)


# ------------------------------------------------------------------ deepstack fields

DEEPSTACK_CASES = [
    # (n, seed, hidden, dtype, levels)
    (7, 1, 16, "bfloat16", 1),
    (2004, 3, 48, "bfloat16", 3),  # past one period, three levels (Qwen3-VL)
    (300, 2**32 - 1, 32, "float16", 2),  # the largest seed: s + 1009*x passes 2**32
    (50, 9, 8, "float32", 3),
]


def torch_deepstack_digest(n: int, seed: int, hidden: int, dtype: str, levels: int) -> str:
    """The written rule (DESIGN, "Synthetic payload and digest"): deepstack_k, the field at
    record index x = 3 + k, is the embeddings' formula for seed s + 1009*x, hashed after the
    default three fields in record order."""
    h = hashlib.sha256()
    base = torch_payload(n, seed, hidden, dtype)
    for name in ("embeddings", "token_ids", "mrope_positions"):
        h.update(torch_bytes(base[name]))
    for k in range(levels):
        h.update(torch_bytes(torch_payload(n, seed + 1009 * (3 + k), hidden, dtype)["embeddings"]))
    return h.hexdigest()


@pytest.mark.parametrize("n,seed,hidden,dtype,levels", DEEPSTACK_CASES)
def test_deepstack_digest_follows_the_written_rule(n, seed, hidden, dtype, levels):
    assert ref.expected_digest(n, seed, hidden, dtype, deepstack_levels=levels) == (
        torch_deepstack_digest(n, seed, hidden, dtype, levels)
    )
    assert ref.expected_digest(n, seed, hidden, dtype, deepstack_levels=levels) != (
        ref.expected_digest(n, seed, hidden, dtype)
    )


@pytest.mark.parametrize("n,seed,hidden,dtype,levels", DEEPSTACK_CASES)
def test_the_pools_synthetic_fill_writes_the_reference_deepstack_rows(
    n, seed, hidden, dtype, levels
):
    """Both routes of common/synthetic.py (numpy for host memory, torch for a device) write what
    the reference says, field by field."""
    from common import synthetic
    from common.layout import RecordLayout, payload_fields
    from common.pool import field_of

    record = RecordLayout.pack(payload_fields(hidden, dtype, levels))
    want = ref.synthetic_payload(n, seed, hidden, dtype, deepstack_levels=levels)
    host = torch.zeros((n, record.record_bytes), dtype=torch.uint8)
    synthetic.fill_synthetic(host, record, seed, 0)
    device = torch.zeros_like(host)
    synthetic._fill_torch(device, record, seed, 0, hidden, TORCH_DTYPES[dtype])
    for records in (host, device):
        for f in record.fields:
            assert torch_bytes(field_of(records, f)) == want[f.name].tobytes(), f.name
