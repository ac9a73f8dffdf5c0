"""A language rank living in the pytest process, for driving the encoder's protocol by hand.

`TestRank` owns a `common.pool.BlockPool` registered with the process-wide Mooncake engine
(`shared_transport()`: one per pytest process, created lazily — engines are heavy), and builds
the Register/Init/Resume/Status requests a real language rank would send. Because the rank is in
the test process, a test can hold a transfer mid-round, look at the bytes the encoder wrote into
its pool, and send malformed or duplicated messages on purpose.

Several TestRanks may share the one transport; each registers its own pool. Mooncake peers cache
segment descriptors, so create the ranks a module needs before its encoder first writes to them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence

import torch

from common.layout import PoolGeometry, RecordLayout, default_fields
from common.pb.epd.v1 import common_pb2, encoder_pb2
from common.pool import BlockPool, field_of
from common.synthetic import synthetic_fields
from common.transport import MooncakeTransport
from services.edge import rpc

_transport: MooncakeTransport | None = None
_transport_lock = threading.Lock()


def shared_transport() -> MooncakeTransport:
    """The pytest process's one Mooncake engine (TCP on loopback), created on first use."""
    global _transport
    with _transport_lock:
        if _transport is None:
            _transport = MooncakeTransport("127.0.0.1", "tcp")
        return _transport


class TestRank:
    """One language rank: a registered block pool plus request builders."""

    __test__ = False  # not a test class, despite the name

    def __init__(
        self,
        *,
        hidden: int = 256,
        dtype: str = "bfloat16",
        block_size: int = 16,
        num_blocks: int = 64,
        rank: int = 0,
        language_id: str | None = None,
        transport: MooncakeTransport | None = None,
    ):
        self.hidden = hidden
        self.dtype = dtype
        self.rank = rank
        self.language_id = language_id or f"test-rank-{uuid.uuid4().hex[:10]}"
        self.record = RecordLayout.pack(default_fields(hidden, dtype))
        self.pool = BlockPool(self.record, block_size, num_blocks)
        self.transport = transport or shared_transport()
        self.transport.register(self.pool.registered_address, self.pool.registered_bytes)
        self._held: set[int] = set()
        self._closed = False

    # ------------------------------------------------------------------ identity and layout

    @property
    def session(self) -> str:
        return self.transport.session

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def layout(
        self, *, hidden: int | None = None, dtype: str | None = None
    ) -> common_pb2.PoolLayout:
        """This rank's pool layout as Register sends it (a fresh message: safe to mutate).

        `hidden`/`dtype` describe the same slab with another record layout (for mismatch tests).
        """
        geo = self.pool.geometry
        if hidden is not None or dtype is not None:
            record = RecordLayout.pack(default_fields(hidden or self.hidden, dtype or self.dtype))
            geo = PoolGeometry(
                record, geo.block_size, geo.num_blocks, base_address=geo.base_address
            )
        return rpc.geometry_to_pb(geo)

    # ------------------------------------------------------------------ request builders

    def register_request(
        self,
        *,
        language_id: str | None = None,
        session: str | None = None,
        layout: common_pb2.PoolLayout | None = None,
    ) -> encoder_pb2.RegisterRequest:
        return encoder_pb2.RegisterRequest(
            language_id=self.language_id if language_id is None else language_id,
            rank=self.rank,
            session=self.session if session is None else session,
            layout=self.layout() if layout is None else layout,
        )

    async def register(
        self, stub, language_id: str | None = None, **kw
    ) -> encoder_pb2.RegisterReply:
        """Register this rank with the encoder behind `stub` (optionally under another language_id),
        with the proof of possession a real rank gives: Challenge, the nonce into the pool's proof
        area, Register carrying it."""
        if language_id is not None:
            self.language_id = language_id
        return await self.register_claiming(stub, **kw)

    async def register_claiming(self, stub, **kw) -> encoder_pb2.RegisterReply:
        """Register whatever `register_request(**kw)` describes (another language_id, session or
        layout), proving with this rank's own pool: the nonce goes into *its* proof area, so a
        claim on memory that is not this rank's fails the proof. self.language_id is unchanged."""
        request = self.register_request(**kw)
        challenge = await stub.Challenge(
            encoder_pb2.ChallengeRequest(language_id=request.language_id, rank=request.rank)
        )
        request.proof_nonce = challenge.nonce
        async with self.pool.proving(challenge.nonce):
            return await stub.Register(request)

    def init_request(
        self,
        request_id: str,
        blocks: Sequence[int],
        allocated_tokens: int | None = None,
        *,
        rank_count: int = 1,
        language_id: str | None = None,
    ) -> encoder_pb2.InitRequest:
        """Init with `blocks`; allocated_tokens defaults to the consistent len(blocks) * block_size."""
        if allocated_tokens is None:
            allocated_tokens = len(blocks) * self.block_size
        return encoder_pb2.InitRequest(
            request_id=request_id,
            language_id=self.language_id if language_id is None else language_id,
            rank=self.rank,
            rank_count=rank_count,
            dst_blocks=list(blocks),
            allocated_tokens=allocated_tokens,
        )

    def resume_request(
        self,
        request_id: str,
        sent_tokens: int,
        blocks: Sequence[int],
        allocated_tokens: int | None = None,
        *,
        language_id: str | None = None,
    ) -> encoder_pb2.ResumeRequest:
        if allocated_tokens is None:
            allocated_tokens = len(blocks) * self.block_size
        return encoder_pb2.ResumeRequest(
            request_id=request_id,
            language_id=self.language_id if language_id is None else language_id,
            rank=self.rank,
            sent_tokens=sent_tokens,
            dst_blocks=list(blocks),
            allocated_tokens=allocated_tokens,
        )

    def status_request(
        self, request_id: str, *, language_id: str | None = None
    ) -> encoder_pb2.StatusRequest:
        return encoder_pb2.StatusRequest(
            request_id=request_id,
            rank=self.rank,
            language_id=self.language_id if language_id is None else language_id,
        )

    def cancel_request(
        self,
        request_id: str,
        reason: str = "test done",
        *,
        language_id: str | None = None,
        failure: int = 0,
    ) -> common_pb2.CancelRequest:
        """Cancel on the encoder as this rank's language instance (the owner of its transfers)."""
        return common_pb2.CancelRequest(
            request_id=request_id,
            reason=reason,
            language_id=self.language_id if language_id is None else language_id,
            failure=failure,
        )

    def encode_request(
        self, request_id: str, synthetic_tokens: int, seed: int = 0, *, rank_count: int = 1
    ) -> encoder_pb2.EncodeRequest:
        return encoder_pb2.EncodeRequest(
            request_id=request_id,
            synthetic_tokens=synthetic_tokens,
            synthetic_seed=seed,
            rank_count=rank_count,
            language_id=self.language_id,
        )

    # ------------------------------------------------------------------ the pool

    def alloc(self, n_blocks: int, *, clear: bool = True) -> list[int]:
        """n free blocks now, zeroed unless clear=False (AssertionError when the pool cannot give them)."""
        blocks = self.pool.try_alloc(n_blocks)
        assert blocks is not None, (
            f"test rank pool cannot give {n_blocks} blocks ({self.free_blocks} free)"
        )
        self._held.update(blocks)
        if clear:
            self.clear(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        self.pool.free(blocks)
        self._held.difference_update(blocks)

    def release_all(self) -> list[int]:
        """Free every block still held (clean-up after a failed test); returns them."""
        leaked = sorted(self._held)
        if leaked:
            self.free(leaked)
        return leaked

    @property
    def used_blocks(self) -> int:
        return self.pool.allocator.used_count

    @property
    def free_blocks(self) -> int:
        return self.pool.allocator.free_count

    def clear(self, blocks: Sequence[int]) -> None:
        """Zero the records of `blocks` (so a later check sees only what was written since)."""
        for b in blocks:
            self.pool.slab[b].zero_()

    def read(self, blocks: Sequence[int], n_tokens: int, start: int = 0) -> torch.Tensor:
        """A copy of tokens [start, start+n_tokens) of an allocation: uint8 [n_tokens, record_bytes]."""
        out = torch.empty((n_tokens, self.record.record_bytes), dtype=torch.uint8)
        self.pool.copy_out(blocks, start, n_tokens, out)
        return out

    def fields(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed per-field copies of uint8 records."""
        return {f.name: field_of(records, f).clone() for f in self.record.fields}

    def mismatches(self, records: torch.Tensor, seed: int, start: int) -> list[str]:
        """Fields of `records` (tokens start.. of a synthetic payload) that differ from it; [] if all equal."""
        want = synthetic_fields(
            seed, start, records.shape[0], self.hidden, getattr(torch, self.dtype)
        )
        got = self.fields(records)
        return [name for name, value in want.items() if not torch.equal(got[name], value)]

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Unregister the pool from the shared engine (the pool must be fully free)."""
        if self._closed:
            return
        self._closed = True
        address = self.pool.base_address
        engine = self.transport._engine  # the adapter has no per-slab unregister
        if address in self.transport._registered:
            engine.unregister_memory(address)
            del self.transport._registered[address]
        # The slab stays allocated: a later rank's pool must never reuse its addresses while an
        # encoder still holds this rank's registration (it refuses a pool overlapping another
        # language instance's on the same Mooncake session).
        _retired_pools.append(self.pool)


_retired_pools: list[BlockPool] = []
