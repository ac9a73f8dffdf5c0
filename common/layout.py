"""Token-record layout of a block pool (docs/DESIGN.md, "Pools and token records").

Every token's fields are packed together in one fixed-size record: embeddings, then token_ids,
then mrope_positions, then extras, each at an aligned offset; the record is padded to 16 bytes.
A run of consecutive tokens is therefore one contiguous byte range across all fields.
Pure data: no torch, grpc or mooncake here.
"""

from __future__ import annotations

import dataclasses
import math

FIELD_ALIGN = 4  # every field starts at a multiple of this (checksums read 32-bit words)
RECORD_ALIGN = 16  # record size is padded to this

# dtype name -> bytes per element; names are torch's (`torch.<name>`).
DTYPE_SIZES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "int16": 2,
}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One per-token tensor of the payload."""

    name: str
    """Field name, e.g. ``embeddings``."""
    dtype: str
    """Element dtype as a torch dtype name, e.g. ``bfloat16``."""
    per_token_shape: tuple[int, ...]
    """Shape of one token's value: ``(hidden,)``, ``()`` or ``(3,)``."""

    @property
    def bytes_per_token(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.per_token_shape)


@dataclasses.dataclass(frozen=True)
class FieldLayout:
    """A field placed at `offset` bytes inside the token record."""

    spec: FieldSpec
    """What the field holds."""
    offset: int
    """Byte offset of the field inside the record."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bytes_per_token(self) -> int:
        return self.spec.bytes_per_token


def default_fields(hidden: int, dtype: str = "bfloat16") -> tuple[FieldSpec, ...]:
    """The default payload: embeddings [hidden], token_ids [] int32, mrope_positions [3] int32."""
    return (
        FieldSpec("embeddings", dtype, (hidden,)),
        FieldSpec("token_ids", "int32", ()),
        FieldSpec("mrope_positions", "int32", (3,)),
    )


DEEPSTACK_PREFIX = "deepstack_"
MAX_DEEPSTACK_LEVELS = 8


def payload_fields(
    hidden: int, dtype: str = "bfloat16", deepstack_levels: int = 0
) -> tuple[FieldSpec, ...]:
    """A payload's fields: the default three, then one `deepstack_K` [hidden] field (the
    embeddings' dtype) per deepstack level of the model (Qwen3-VL's visual features injected
    into its first decoder layers; 0 for Qwen2-VL)."""
    return default_fields(hidden, dtype) + tuple(
        FieldSpec(f"{DEEPSTACK_PREFIX}{k}", dtype, (hidden,)) for k in range(deepstack_levels)
    )


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    """The packed layout of one token record."""

    fields: tuple[FieldLayout, ...]
    """Fields in layout order (the order of the digest)."""
    record_bytes: int
    """Bytes per token record, padded to RECORD_ALIGN."""

    @classmethod
    def pack(cls, specs: tuple[FieldSpec, ...] | list[FieldSpec]) -> RecordLayout:
        if not specs:
            raise ValueError("a record needs at least one field")
        seen: set[str] = set()
        placed = []
        offset = 0
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"duplicate field name {spec.name!r}")
            if spec.dtype not in DTYPE_SIZES:
                raise ValueError(
                    f"field {spec.name!r}: unsupported dtype {spec.dtype!r} (one of {sorted(DTYPE_SIZES)})"
                )
            if any(d <= 0 for d in spec.per_token_shape):
                raise ValueError(
                    f"field {spec.name!r}: per-token shape {spec.per_token_shape} has a non-positive size"
                )
            seen.add(spec.name)
            # Aligned to the element size too, so every field can be viewed in place as its dtype.
            offset = _round_up(offset, max(FIELD_ALIGN, DTYPE_SIZES[spec.dtype]))
            placed.append(FieldLayout(spec, offset))
            offset += spec.bytes_per_token
        return cls(tuple(placed), _round_up(offset, RECORD_ALIGN))

    def field(self, name: str) -> FieldLayout:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def deepstack_levels(self) -> int:
        return sum(1 for n in self.names if n.startswith(DEEPSTACK_PREFIX))

    @property
    def payload_bytes_per_token(self) -> int:
        """Bytes of real field data per token (without padding)."""
        return sum(f.bytes_per_token for f in self.fields)

    def differences(self, other: RecordLayout) -> list[str]:
        """Human-readable differences between two record layouts (empty when compatible)."""
        diffs = []
        if self.names != other.names:
            diffs.append(f"fields {list(other.names)} != {list(self.names)}")
            here, there = self.deepstack_levels, other.deepstack_levels
            if here != there:
                # Where each side's count comes from: its model, or --deepstack-levels without one.
                diffs.append(
                    f"deepstack levels {there} != {here}: both services need the same count, "
                    f"from the same family of --model, or from --deepstack-levels where no "
                    f"model runs (a language with the null consumer)"
                )
        else:
            for mine, theirs in zip(self.fields, other.fields):
                for attr in ("dtype", "per_token_shape"):
                    a, b = getattr(mine.spec, attr), getattr(theirs.spec, attr)
                    if a != b:
                        diffs.append(f"field {mine.name!r} {attr} {b!r} != {a!r}")
                if mine.offset != theirs.offset:
                    diffs.append(f"field {mine.name!r} offset {theirs.offset} != {mine.offset}")
        if self.record_bytes != other.record_bytes:
            diffs.append(f"record_bytes {other.record_bytes} != {self.record_bytes}")
        return diffs


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """Where a pool is and how it is cut into blocks: what a peer needs to write into it."""

    record: RecordLayout
    """Token-record layout shared by every block."""
    block_size: int
    """Tokens per block."""
    num_blocks: int
    """Blocks in the pool."""
    base_address: int = 0
    """Address of the slab's first byte (as registered with the transfer engine)."""

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.record.record_bytes

    @property
    def slab_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def proof_address(self) -> int:
        """Where the pool's tail proof area starts: right after its last block, inside the memory
        registered with the transfer engine (`PROOF_AREA_BYTES`). Register's proof of possession
        reads the encoder's nonce back from here and from `head_proof_address`."""
        return self.base_address + self.slab_bytes

    @property
    def head_proof_address(self) -> int:
        """Where the pool's head proof area starts: `PROOF_AREA_BYTES` right before its first
        block. With the nonce at both ends, a claimed pool must begin and end where the caller
        put it: a claim stretched over a neighbouring pool of the same process fails at the end
        that is not the caller's. Negative for a claim too close to address 0 (never valid)."""
        return self.base_address - PROOF_AREA_BYTES


# The proof areas around every pool's blocks, one before and one after: PROOF_LANES lanes of
# PROOF_LANE_BYTES each. A language rank puts a Register nonce into lane 0 of both; an encoder
# reads proofs into lanes of its own, one per read.
PROOF_LANE_BYTES = 64
PROOF_LANES = 16
PROOF_AREA_BYTES = PROOF_LANE_BYTES * PROOF_LANES


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
