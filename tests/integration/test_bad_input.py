"""Bad input to the real services (docs/DESIGN.md, "Failure semantics": a malformed or
inconsistent RPC).

Every case checks three things: the exact gRPC status code, a message that names the offending
value or field, and that nothing changed — the transfer as GetTransfer shows it, the listing, the
encoder's pool, and the test rank's own pool. The encoder protocol is driven by hand from a
`TestRank` living in this process (tests/integration/rank_harness.py), so a transfer can be
held mid-round while bad messages are thrown at it. Every test ends with its transfers finished
and every pool fully free.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import uuid

import grpc
import pytest
import torch

from common.integrity import checksums as compute_checksums
from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from tests.conftest import ServiceProcess, assert_all_free
from tests.integration.rank_harness import TestRank

HIDDEN = 256
BLOCK = 16
ENCODER_BLOCKS = 256
RANK_BLOCKS = 64
MAX_TOKENS = 1000

BOOTSTRAPPING, WAITING, TRANSFERRING, SUCCESS, FAILED = 1, 2, 3, 4, 5
TERMINAL = (SUCCESS, FAILED)

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def encoder():
    p = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        str(ENCODER_BLOCKS),
        "--resume-timeout-s",
        "60",
        "--max-request-tokens",
        str(MAX_TOKENS),
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def language(encoder):
    p = ServiceProcess(
        "language",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "64",
        "--initial-tokens",
        "64",
        "--encoder",
        encoder.address,
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def rank():
    """The module's main test rank (pool of 64 blocks of 16 tokens)."""
    r = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS)
    yield r
    r.close()


@pytest.fixture
async def enc(encoder):
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        yield encoder_pb2_grpc.EncoderStub(ch)


@pytest.fixture
async def lang(language):
    async with grpc.aio.insecure_channel(language.address) as ch:
        yield language_pb2_grpc.LanguageStub(ch)


@pytest.fixture
async def reg(rank, enc):
    """The main rank, registered with the encoder (Register is idempotent)."""
    await rank.register(enc)
    yield rank
    leaked = (
        rank.release_all()
    )  # freed either way, so one failure does not spill into the next test
    assert not leaked, f"test rank still held blocks {leaked}"


def rid(prefix: str = "bad") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------- helpers


async def expect_error(awaitable, code: grpc.StatusCode, *needles) -> grpc.aio.AioRpcError:
    """Await an RPC that must fail with `code` and a message containing every needle."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    e = info.value
    assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()!r}"
    for needle in needles:
        assert str(needle) in (e.details() or ""), (
            f"{code.name} message does not name {needle!r}: {e.details()!r}"
        )
    if os.environ.get("SHOW_DETAILS"):  # SHOW_DETAILS=1 pytest -s: eyeball every message
        print(f"\n  {code.name}: {e.details()}")
    return e


async def drain(call) -> None:
    async for _ in call:
        pass


async def snapshot(stub, request_id: str) -> tuple:
    """What must not change: the transfer as GetTransfer shows it (without its age)."""
    t = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    return (
        t.state,
        t.sent_tokens,
        t.total_tokens,
        t.rounds,
        t.allocated_tokens,
        t.bytes,
        t.peer,
        t.error.reason,
        t.error.message,
        tuple((r.rank, r.state, r.sent_tokens, r.allocated_tokens, r.session) for r in t.ranks),
    )


async def pool_state(stub) -> tuple[int, int, int]:
    p = await stub.GetPool(common_pb2.GetPoolRequest())
    return p.used_blocks, p.free_blocks, p.waiters


async def listing(stub) -> list[tuple]:
    reply = await stub.ListTransfers(common_pb2.ListTransfersRequest())
    return [
        (t.request_id, t.state, t.sent_tokens, t.total_tokens, t.rounds) for t in reply.transfers
    ]


async def assert_absent(stub, request_id: str) -> None:
    await expect_error(
        stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id)),
        grpc.StatusCode.NOT_FOUND,
        request_id,
    )


class StatusWatcher:
    """Reads one rank's Status stream in the background; statuses are taken in order."""

    def __init__(self, stub, rank: TestRank, request_id: str):
        self.rank = rank
        self.call = stub.Status(rank.status_request(request_id))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seen: list = []
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for st in self.call:
                await self.queue.put(st)
        except BaseException as e:  # noqa: BLE001 - surfaced to the reader
            await self.queue.put(e)
            return
        await self.queue.put(None)  # stream ended

    async def next(self, timeout: float = 15.0):
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        assert item is not None, (
            f"Status stream ended; statuses so far: {[s.state for s in self.seen]}"
        )
        self.seen.append(item)
        return item

    async def until(self, predicate, timeout: float = 15.0):
        while True:
            st = await self.next(timeout)
            if predicate(st):
                return st
            assert st.state not in TERMINAL, f"transfer ended early: {st}"

    async def quiet(self, seconds: float = 0.3) -> None:
        """No new status within `seconds`."""
        await asyncio.sleep(seconds)
        assert self.queue.empty(), f"unexpected status: {self.queue.get_nowait()}"

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def hold_at_round_1(enc, rank: TestRank, request_id: str, n: int = 100, seed: int = 1):
    """Init with one block (16 tokens), Encode n tokens; return once round 1 is published."""
    blocks = rank.alloc(1)
    rank.clear(blocks)
    await enc.Init(rank.init_request(request_id, blocks))
    w = StatusWatcher(enc, rank, request_id)
    reply = await enc.Encode(rank.encode_request(request_id, n, seed))
    assert reply.total_tokens == n
    st = await w.until(lambda s: s.state == TRANSFERRING)
    assert (st.sent_tokens, st.total_tokens, st.round, st.round_tokens) == (BLOCK, n, 1, BLOCK)
    assert rank.mismatches(rank.read(blocks, BLOCK), seed, 0) == [], (
        "round 1 bytes differ from the synthetic payload"
    )
    return blocks, w


async def cancel_held(enc, w: StatusWatcher, request_id: str) -> None:
    reply = await enc.Cancel(w.rank.cancel_request(request_id))  # as the owner
    assert reply.cancelled and reply.state == FAILED
    st = await w.until(lambda s: s.state in TERMINAL)
    assert st.state == FAILED
    await w.close()


async def small_transfer(enc, rank: TestRank, request_id: str, n: int = 20, seed: int = 3):
    """A whole single-round transfer into `rank`; checks the bytes; returns the final TransferInfo."""
    blocks = rank.alloc(math.ceil(n / rank.block_size))
    rank.clear(blocks)
    try:
        await enc.Init(rank.init_request(request_id, blocks))
        w = StatusWatcher(enc, rank, request_id)
        await enc.Encode(rank.encode_request(request_id, n, seed))
        st = await w.until(lambda s: s.state in TERMINAL)
        await w.close()
        assert st.state == SUCCESS, f"transfer failed: {st.error}"
        assert rank.mismatches(rank.read(blocks, n), seed, 0) == []
    finally:
        rank.free(blocks)
    return await enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))


async def all_free(encoder, *ranks: TestRank) -> None:
    await assert_all_free((encoder.address, "encoder"))
    for r in ranks:
        assert r.used_blocks == 0, f"test rank {r.language_id} still holds {r.used_blocks} blocks"


# ---------------------------------------------------------------------------- 1. Register


async def test_register_layout_mismatch_is_failed_precondition_and_stores_nothing(
    encoder, enc, rank
):
    new_lang = rid("lang")
    cases = [
        (rank.layout(hidden=128), ("embeddings", "per_token_shape", "128", "256")),
        (rank.layout(dtype="float16"), ("embeddings", "dtype", "float16", "bfloat16")),
    ]
    missing = rank.layout()
    del missing.fields[2]  # no mrope_positions
    cases.append((missing, ("mrope_positions",)))
    for layout, needles in cases:
        await expect_error(
            enc.Register(rank.register_request(language_id=new_lang, layout=layout)),
            grpc.StatusCode.FAILED_PRECONDITION,
            new_lang,
            *needles,
        )
    # Nothing was stored for the new language: its Init is refused as unregistered.
    request_id = rid()
    blocks = rank.alloc(1)
    try:
        await expect_error(
            enc.Init(rank.init_request(request_id, blocks, language_id=new_lang)),
            grpc.StatusCode.FAILED_PRECONDITION,
            new_lang,
            "Register",
        )
    finally:
        rank.free(blocks)
    await assert_absent(enc, request_id)
    await all_free(encoder, rank)


def _block_size_3(lay):
    lay.block_size = 3


def _num_blocks_0(lay):
    lay.num_blocks = 0


def _base_address_0(lay):
    lay.base_address = 0


def _bytes_per_token_wrong(lay):
    lay.fields[0].bytes_per_token = 511


def _unknown_dtype(lay):
    lay.fields[1].dtype = "float64x"


def _offset_past_record(lay):
    lay.fields[2].offset = lay.record_bytes


def _no_fields(lay):
    del lay.fields[:]


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (_block_size_3, ("block_size", "3")),
        (_num_blocks_0, ("num_blocks", "0")),
        (_base_address_0, ("base_address",)),
        (_bytes_per_token_wrong, ("embeddings", "bytes_per_token", "511", "512")),
        (_unknown_dtype, ("token_ids", "float64x")),
        (_offset_past_record, ("mrope_positions", "offset", "record_bytes")),
        (_no_fields, ("fields",)),
    ],
    ids=[
        "block_size=3",
        "num_blocks=0",
        "base_address=0",
        "bytes_per_token",
        "dtype",
        "offset",
        "no-fields",
    ],
)
async def test_register_malformed_layout_is_invalid_argument(encoder, enc, reg, mutate, needles):
    layout = reg.layout()
    mutate(layout)
    # Same (language_id, rank) as the good registration, with a session nothing listens on: had
    # the bad Register replaced the good one, the transfer below would be written to nowhere.
    await expect_error(
        enc.Register(reg.register_request(session="127.0.0.1:9", layout=layout)),
        grpc.StatusCode.INVALID_ARGUMENT,
        *needles,
    )
    info = await small_transfer(enc, reg, rid())
    assert info.state == SUCCESS and [r.session for r in info.ranks] == [reg.session]
    await all_free(encoder, reg)


@pytest.mark.parametrize(
    "field, value, code, needles",
    [
        ("language_id", "", grpc.StatusCode.INVALID_ARGUMENT, ("language_id",)),
        ("session", "", grpc.StatusCode.INVALID_ARGUMENT, ("session",)),
        ("session", "no-port", grpc.StatusCode.INVALID_ARGUMENT, ("session", "no-port")),
        ("session", "127.0.0.1:99999", grpc.StatusCode.INVALID_ARGUMENT, ("session", "99999")),
        ("session", ":7000", grpc.StatusCode.INVALID_ARGUMENT, ("session", ":7000")),
        ("layout", None, grpc.StatusCode.INVALID_ARGUMENT, ("layout",)),
    ],
    ids=[
        "no-language_id",
        "no-session",
        "session-no-port",
        "session-port-99999",
        "session-no-host",
        "no-layout",
    ],
)
async def test_register_malformed_request(encoder, enc, reg, field, value, code, needles):
    """Sent for the rank's own (language_id, rank): had it been taken, it would replace the good
    registration and the transfer below would go nowhere."""
    req = reg.register_request()
    if value is None:
        req.ClearField(field)
    else:
        setattr(req, field, value)
    await expect_error(enc.Register(req), code, *needles)
    info = await small_transfer(enc, reg, rid())
    assert [r.session for r in info.ranks] == [reg.session]
    await all_free(encoder, reg)


async def test_register_mismatch_does_not_replace_a_good_registration(encoder, enc, reg):
    await expect_error(
        enc.Register(reg.register_request(session="127.0.0.1:9", layout=reg.layout(hidden=128))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "128",
    )
    info = await small_transfer(enc, reg, rid())
    assert [r.session for r in info.ranks] == [reg.session]
    await all_free(encoder, reg)


async def test_register_is_idempotent(encoder, enc, reg):
    first = await reg.register(enc)
    second = await reg.register(enc)
    assert first == second
    assert first.layout.block_size == BLOCK and first.layout.num_blocks == ENCODER_BLOCKS
    assert [f.name for f in first.layout.fields] == ["embeddings", "token_ids", "mrope_positions"]
    # Repeating it mid-transfer disturbs nothing: the held transfer still completes.
    request_id = rid()
    blocks, w = await hold_at_round_1(enc, reg, request_id, n=100, seed=6)
    before = await snapshot(enc, request_id)
    assert await reg.register(enc) == first
    assert await snapshot(enc, request_id) == before
    reg.free(blocks)
    rest = reg.alloc(6)  # 96 tokens for the remaining 84
    assert not (await enc.Resume(reg.resume_request(request_id, BLOCK, rest))).duplicate
    st = await w.until(lambda s: s.state in TERMINAL)
    await w.close()
    assert (st.state, st.sent_tokens, st.round) == (SUCCESS, 100, 2)
    assert reg.mismatches(reg.read(rest, 84), 6, BLOCK) == []
    reg.free(rest)
    await all_free(encoder, reg)


async def test_reregister_with_a_new_session_replaces_it(encoder, enc):
    language_id = rid("lang")
    old = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=8, language_id=language_id)
    new = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=8, language_id=language_id)
    try:
        # The stale registration: the old pool (a restarted rank registers its new one, with proof).
        await old.register(enc)
        await new.register(enc)
        old_blocks = old.alloc(8)
        old.clear(old_blocks)
        info = await small_transfer(enc, new, rid(), n=40, seed=11)
        assert info.state == SUCCESS
        assert [r.session for r in info.ranks] == [new.session]
        # Nothing went to the stale pool.
        assert not old.pool.slab.any()
        old.free(old_blocks)
        await all_free(encoder, old, new)
    finally:
        old.close()
        new.close()


# ---------------------------------------------------------------------------- 2. Init


@pytest.mark.parametrize(
    "blocks, allocated, needles",
    [
        ([0, 1], 20, ("allocated_tokens=20", "block_size")),
        ([0, 1], 0, ("allocated_tokens=0",)),
        ([999], BLOCK, ("999", str(RANK_BLOCKS))),
        ([5, RANK_BLOCKS], 2 * BLOCK, (str(RANK_BLOCKS), "out of range")),
        ([3, 4, 3], 3 * BLOCK, ("3", "more than once")),
        ([], 0, ("dst_blocks",)),
    ],
    ids=["misaligned-20", "zero-tokens", "block-999", "block-64", "duplicate-block", "no-blocks"],
)
async def test_init_bad_allocation_is_invalid_argument(
    encoder, enc, reg, blocks, allocated, needles
):
    request_id = rid()
    before, pool_before = await listing(enc), await pool_state(enc)
    await expect_error(
        enc.Init(reg.init_request(request_id, blocks, allocated)),
        grpc.StatusCode.INVALID_ARGUMENT,
        request_id,
        *needles,
    )
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    assert await pool_state(enc) == pool_before
    await all_free(encoder, reg)


@pytest.mark.parametrize(
    "held, needle",
    [
        (["not-a-key"], "held_images[0]='not-a-key'"),
        (["AB" * 32], "held_images[0]="),  # upper-case hex is not the key's spelling
        (["ab" * 32, "cd" * 31], "held_images[1]="),
        (["ab" * 32] * 100, "100 held_images"),
    ],
    ids=["not-hex", "upper-case", "short", "too-many"],
)
async def test_init_bad_held_images_is_invalid_argument(encoder, enc, reg, held, needle):
    request_id = rid()
    before, pool_before = await listing(enc), await pool_state(enc)
    req = reg.init_request(request_id, [0])
    req.held_images.extend(held)
    await expect_error(enc.Init(req), grpc.StatusCode.INVALID_ARGUMENT, request_id, needle)
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    assert await pool_state(enc) == pool_before
    await all_free(encoder, reg)


async def _streamed(call) -> list:
    return [update async for update in call]


@pytest.mark.parametrize("method", ["Encode", "EncodeStream"])
async def test_encode_overlong_cache_scope_is_invalid_argument(encoder, enc, reg, method):
    request_id = rid()
    before, pool_before = await listing(enc), await pool_state(enc)
    req = reg.encode_request(request_id, 40, seed=5)
    req.cache_scope = "s" * 129
    call = enc.Encode(req) if method == "Encode" else _streamed(enc.EncodeStream(req))
    await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, request_id, "cache_scope has 129")
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    assert await pool_state(enc) == pool_before
    await all_free(encoder, reg)


async def test_init_unregistered_language_is_failed_precondition(encoder, enc, reg):
    request_id, stranger = rid(), rid("stranger")
    before = await listing(enc)
    await expect_error(
        enc.Init(reg.init_request(request_id, [0], language_id=stranger)),
        grpc.StatusCode.FAILED_PRECONDITION,
        stranger,
    )
    # Registered language, unregistered rank.
    req = reg.init_request(request_id, [0])
    req.rank = 7
    await expect_error(enc.Init(req), grpc.StatusCode.FAILED_PRECONDITION, "rank 7")
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    await all_free(encoder, reg)


async def test_init_empty_request_id_and_zero_rank_count_are_invalid_argument(encoder, enc, reg):
    before = await listing(enc)
    await expect_error(
        enc.Init(reg.init_request("", [0])), grpc.StatusCode.INVALID_ARGUMENT, "request_id"
    )
    request_id = rid()
    await expect_error(
        enc.Init(reg.init_request(request_id, [0], rank_count=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rank_count=0",
    )
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    await all_free(encoder, reg)


async def test_bad_init_leaves_a_transfer_created_by_encode_unchanged(encoder, enc, reg):
    """Init may follow Encode: a bad Init then must not touch the waiting transfer."""
    request_id = rid()
    await enc.Encode(reg.encode_request(request_id, 40, seed=4))
    before = await snapshot(enc, request_id)
    assert before[0] == BOOTSTRAPPING
    pool_before = await pool_state(enc)
    for blocks, allocated, code, needle in [
        ([0, 1], 20, grpc.StatusCode.INVALID_ARGUMENT, "allocated_tokens=20"),
        ([999], BLOCK, grpc.StatusCode.INVALID_ARGUMENT, "999"),
        ([2, 2], 2 * BLOCK, grpc.StatusCode.INVALID_ARGUMENT, "2"),
    ]:
        await expect_error(enc.Init(reg.init_request(request_id, blocks, allocated)), code, needle)
        assert await snapshot(enc, request_id) == before
        assert await pool_state(enc) == pool_before
    req = reg.init_request(request_id, [0, 1, 2], rank_count=2)
    await expect_error(enc.Init(req), grpc.StatusCode.INVALID_ARGUMENT, "rank_count=2")
    assert await snapshot(enc, request_id) == before
    # A good Init still completes it.
    blocks = reg.alloc(3)
    w = StatusWatcher(enc, reg, request_id)
    await enc.Init(reg.init_request(request_id, blocks))
    st = await w.until(lambda s: s.state in TERMINAL)
    await w.close()
    assert st.state == SUCCESS and st.sent_tokens == 40
    assert reg.mismatches(reg.read(blocks, 40), 4, 0) == []
    reg.free(blocks)
    await all_free(encoder, reg)


# ---------------------------------------------------------------------------- 3. unknown ids


async def test_unknown_request_id_is_not_found_on_the_encoder(encoder, enc, reg):
    unknown = rid("unknown")
    before = await listing(enc)
    await expect_error(
        enc.Resume(reg.resume_request(unknown, 16, [0])), grpc.StatusCode.NOT_FOUND, unknown
    )
    await expect_error(
        drain(enc.Status(reg.status_request(unknown))), grpc.StatusCode.NOT_FOUND, unknown
    )
    await expect_error(
        enc.GetTransfer(common_pb2.GetTransferRequest(request_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        unknown,
    )
    await expect_error(
        enc.Cancel(common_pb2.CancelRequest(request_id=unknown, reason="x")),
        grpc.StatusCode.NOT_FOUND,
        unknown,
    )
    # And an empty id is malformed, not unknown.
    for call in (
        enc.GetTransfer(common_pb2.GetTransferRequest()),
        enc.Cancel(common_pb2.CancelRequest()),
        drain(enc.Status(reg.status_request(""))),
        enc.Resume(reg.resume_request("", 16, [0])),
    ):
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "request_id")
    assert await listing(enc) == before
    await all_free(encoder, reg)


async def test_unknown_request_id_is_not_found_on_the_language(encoder, language, lang):
    unknown = rid("unknown")
    before = await listing(lang)
    await expect_error(
        lang.GetTransfer(common_pb2.GetTransferRequest(request_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        unknown,
    )
    await expect_error(
        lang.Cancel(common_pb2.CancelRequest(request_id=unknown, reason="x")),
        grpc.StatusCode.NOT_FOUND,
        unknown,
    )
    await expect_error(
        lang.GetTransfer(common_pb2.GetTransferRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id",
    )
    await expect_error(
        lang.Cancel(common_pb2.CancelRequest()), grpc.StatusCode.INVALID_ARGUMENT, "request_id"
    )
    assert await listing(lang) == before
    await assert_all_free((encoder.address, "encoder"), (language.address, "language"))


# ---------------------------------------------------------------------------- 4. Resume ahead


async def test_resume_ahead_of_the_encoder_is_failed_precondition(encoder, enc, reg):
    request_id = rid()
    blocks, w = await hold_at_round_1(enc, reg, request_id)
    before, pool_before = await snapshot(enc, request_id), await pool_state(enc)
    assert before[:4] == (TRANSFERRING, 16, 100, 1)
    reg.free(blocks)
    nxt = reg.alloc(2)
    for sent in (17, 32, 100, 2**40):
        await expect_error(
            enc.Resume(reg.resume_request(request_id, sent, nxt)),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"sent_tokens={sent}",
            "16",
        )
        assert await snapshot(enc, request_id) == before
        assert await pool_state(enc) == pool_before
    # A rank that never sent Init may not resume.
    other = reg.resume_request(request_id, 16, nxt)
    other.rank = 3
    await expect_error(enc.Resume(other), grpc.StatusCode.FAILED_PRECONDITION, "rank 3")
    # Another language may not resume it.
    await expect_error(
        enc.Resume(reg.resume_request(request_id, 16, nxt, language_id="intruder")),
        grpc.StatusCode.PERMISSION_DENIED,
        request_id,
    )
    # A right sent_tokens with a malformed allocation.
    for bad_blocks, allocated, needle in [
        (nxt, 20, "allocated_tokens=20"),
        ([999], BLOCK, "999"),
        ([nxt[0], nxt[0]], 2 * BLOCK, str(nxt[0])),
        ([], 0, "dst_blocks"),
    ]:
        await expect_error(
            enc.Resume(reg.resume_request(request_id, 16, bad_blocks, allocated)),
            grpc.StatusCode.INVALID_ARGUMENT,
            needle,
        )
        assert await snapshot(enc, request_id) == before
    await w.quiet(0.2)
    assert not reg.pool.slab[nxt].any(), "a refused Resume wrote into the rank's blocks"
    await cancel_held(enc, w, request_id)
    reg.free(nxt)
    await all_free(encoder, reg)


async def test_resume_ahead_before_the_first_round(encoder, enc, reg):
    request_id = rid()
    blocks = reg.alloc(1)
    await enc.Init(reg.init_request(request_id, blocks))
    before = await snapshot(enc, request_id)
    assert before[0] == WAITING and before[1] == 0
    await expect_error(
        enc.Resume(reg.resume_request(request_id, 16, blocks)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "sent_tokens=16",
    )
    assert await snapshot(enc, request_id) == before
    w = StatusWatcher(enc, reg, request_id)
    await cancel_held(enc, w, request_id)
    reg.free(blocks)
    await all_free(encoder, reg)


# ---------------------------------------------------------------------------- 5. duplicate Resume


async def test_duplicate_resume_is_a_no_op_and_a_hand_driven_transfer_completes(encoder, enc, reg):
    request_id, n, seed = rid(), 100, 5
    alloc, w = await hold_at_round_1(enc, reg, request_id, n=n, seed=seed)
    stash = []
    handled = 0
    st = w.seen[-1]
    rounds_seen = [st.round]
    while True:
        got = st.sent_tokens - handled
        records = reg.read(alloc, got)
        if st.checksums:
            assert dict(compute_checksums([records], reg.record, handled)) == {
                c.field: c.value for c in st.checksums
            }, f"round {st.round}: checksums differ"
        stash.append(records)
        reg.free(alloc)
        handled = st.sent_tokens
        if st.state == SUCCESS:
            break
        alloc = reg.alloc(1)
        reg.clear(alloc)
        resume = reg.resume_request(request_id, handled, alloc)
        assert (await enc.Resume(resume)).duplicate is False
        if handled == BLOCK:
            # The identical Resume at once: whether or not round 2 is already out, a no-op.
            assert (await enc.Resume(resume)).duplicate is True
            st = await w.until(lambda s: s.sent_tokens > handled)
            assert (st.state, st.sent_tokens, st.round) == (TRANSFERRING, 2 * BLOCK, 2)
            before, pool_before = await snapshot(enc, request_id), await pool_state(enc)
            assert before[:4] == (TRANSFERRING, 2 * BLOCK, n, 2)
            round2 = reg.read(alloc, BLOCK)
            reg.clear(alloc)  # any second write would show up here
            other = reg.alloc(1)
            for dup in (
                resume,  # identical, again
                reg.resume_request(request_id, 0, alloc),  # older than everything
                reg.resume_request(request_id, BLOCK, other),
            ):  # old, other blocks
                assert (await enc.Resume(dup)).duplicate is True
            await w.quiet(0.3)
            assert await snapshot(enc, request_id) == before, (
                "a duplicate Resume changed the transfer"
            )
            assert await pool_state(enc) == pool_before
            assert not reg.pool.slab[alloc].any(), "a duplicate Resume wrote again"
            assert not reg.pool.slab[other].any(), "a duplicate Resume wrote into other blocks"
            reg.free(other)
            reg.pool.copy_in(alloc, 0, round2)  # put round 2 back for the normal path
        else:
            st = await w.until(lambda s: s.sent_tokens > handled)
        rounds_seen.append(st.round)
    await w.close()
    assert rounds_seen == list(range(1, 8)), f"rounds {rounds_seen}"
    payload = torch.cat(stash)
    assert payload.shape[0] == n
    assert reg.mismatches(payload, seed, 0) == [], (
        "received payload differs from the synthetic payload"
    )
    info = await enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    assert (info.state, info.sent_tokens, info.total_tokens, info.rounds) == (SUCCESS, n, n, 7)
    # A late duplicate of an already-served Resume is still a no-op.
    assert (await enc.Resume(reg.resume_request(request_id, 96, [0]))).duplicate is True
    await all_free(encoder, reg)


# ---------------------------------------------------------------------------- 6. duplicate Init


async def test_duplicate_init_is_already_exists(encoder, enc, reg):
    request_id = rid()
    # Before Encode (the transfer is waiting for input).
    first = reg.alloc(1)
    await enc.Init(reg.init_request(request_id, first))
    before, pool_before = await snapshot(enc, request_id), await pool_state(enc)
    spare = reg.alloc(2)
    for blocks in (first, spare):
        await expect_error(
            enc.Init(reg.init_request(request_id, blocks)),
            grpc.StatusCode.ALREADY_EXISTS,
            "rank 0",
            request_id,
        )
        assert await snapshot(enc, request_id) == before
        assert await pool_state(enc) == pool_before
    # Mid-transfer.
    w = StatusWatcher(enc, reg, request_id)
    await enc.Encode(reg.encode_request(request_id, 100, 2))
    await w.until(lambda s: s.state == TRANSFERRING)
    held, pool_held = await snapshot(enc, request_id), await pool_state(enc)
    await expect_error(
        enc.Init(reg.init_request(request_id, spare)), grpc.StatusCode.ALREADY_EXISTS, "rank 0"
    )
    assert await snapshot(enc, request_id) == held
    assert await pool_state(enc) == pool_held
    await w.quiet(0.2)
    assert not reg.pool.slab[spare].any()
    await cancel_held(enc, w, request_id)
    # After it ended.
    await expect_error(
        enc.Init(reg.init_request(request_id, spare)), grpc.StatusCode.ALREADY_EXISTS, "rank 0"
    )
    assert (await snapshot(enc, request_id))[0] == FAILED
    reg.free(first)
    reg.free(spare)
    await all_free(encoder, reg)


# ---------------------------------------------------------------------------- 7. Encode


async def test_encode_above_max_request_tokens_is_refused_before_allocation(encoder, enc, reg):
    request_id = rid()
    before, pool_before = await listing(enc), await pool_state(enc)
    await expect_error(
        enc.Encode(reg.encode_request(request_id, MAX_TOKENS + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1001",
        str(MAX_TOKENS),
        "max_request_tokens",
    )
    assert await pool_state(enc) == pool_before
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    # With an Init already waiting, the refusal leaves that transfer as it was.
    blocks = reg.alloc(RANK_BLOCKS - 1)  # 1008 tokens
    await enc.Init(reg.init_request(request_id, blocks))
    waiting = await snapshot(enc, request_id)
    await expect_error(
        enc.Encode(reg.encode_request(request_id, 10**6)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1000000",
        str(MAX_TOKENS),
    )
    assert await snapshot(enc, request_id) == waiting
    assert await pool_state(enc) == pool_before
    # Exactly the limit is fine.
    w = StatusWatcher(enc, reg, request_id)
    await enc.Encode(reg.encode_request(request_id, MAX_TOKENS, 8))
    st = await w.until(lambda s: s.state in TERMINAL)
    await w.close()
    assert st.state == SUCCESS and st.sent_tokens == MAX_TOKENS and st.round == 1
    assert reg.mismatches(reg.read(blocks, MAX_TOKENS), 8, 0) == []
    reg.free(blocks)
    await all_free(encoder, reg)


async def test_encode_without_anything_to_encode_is_invalid_argument(encoder, enc, reg):
    request_id = rid()
    pool_before = await pool_state(enc)
    await expect_error(
        enc.Encode(reg.encode_request(request_id, 0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        request_id,
        "synthetic_tokens=0",
    )
    await assert_absent(enc, request_id)
    assert await pool_state(enc) == pool_before
    await all_free(encoder, reg)


async def test_duplicate_encode_is_already_exists(encoder, enc, reg):
    request_id = rid()
    blocks, w = await hold_at_round_1(enc, reg, request_id)
    before, pool_before = await snapshot(enc, request_id), await pool_state(enc)
    for n in (100, 50):
        await expect_error(
            enc.Encode(reg.encode_request(request_id, n, 1)),
            grpc.StatusCode.ALREADY_EXISTS,
            request_id,
        )
        assert await snapshot(enc, request_id) == before
        assert await pool_state(enc) == pool_before
    await w.quiet(0.2)
    await cancel_held(enc, w, request_id)
    reg.free(blocks)
    # After the request ended: still refused, and nothing is allocated for it.
    pool_after = await pool_state(enc)
    await expect_error(
        enc.Encode(reg.encode_request(request_id, 100, 1)),
        grpc.StatusCode.ALREADY_EXISTS,
        request_id,
    )
    assert await pool_state(enc) == pool_after
    assert (await snapshot(enc, request_id))[0] == FAILED
    # Also for an Encode that came first (the transfer waits for Init, holding the payload).
    second = rid()
    await enc.Encode(reg.encode_request(second, 30, 1))
    waiting, pool_waiting = await snapshot(enc, second), await pool_state(enc)
    await expect_error(
        enc.Encode(reg.encode_request(second, 30, 1)), grpc.StatusCode.ALREADY_EXISTS, second
    )
    assert await snapshot(enc, second) == waiting
    assert await pool_state(enc) == pool_waiting
    await enc.Cancel(reg.cancel_request(second))
    # Two Encodes of one new id at once: exactly one is taken.
    third = rid()
    results = await asyncio.gather(
        *(enc.Encode(reg.encode_request(third, MAX_TOKENS, 1)) for _ in range(2)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1, results
    assert errors[0].code() == grpc.StatusCode.ALREADY_EXISTS and third in errors[0].details()
    assert (await pool_state(enc))[0] == pool_waiting[0] - 2 + math.ceil(MAX_TOKENS / BLOCK), (
        "the refused Encode allocated source blocks"
    )
    await enc.Cancel(reg.cancel_request(third))
    await all_free(encoder, reg)


@pytest.mark.parametrize(
    "image, needles",
    [
        (common_pb2.Image(data=b"", mime_type="image/png"), ("images[0]", "empty")),
        (common_pb2.Image(data=b"GIF89a....", mime_type="image/gif"), ("images[0]", "image/gif")),
        (
            common_pb2.Image(data=b"\x89PNG\r\n\x1a\n....", mime_type="image/jpeg"),
            ("images[0]", "image/jpeg"),
        ),
    ],
    ids=["empty", "gif", "mime-mismatch"],
)
async def test_encode_with_a_bad_image_is_invalid_argument(encoder, enc, reg, image, needles):
    request_id = rid()
    before, pool_before = await listing(enc), await pool_state(enc)
    req = reg.encode_request(request_id, 0)
    req.text = "describe"
    req.images.append(image)
    await expect_error(enc.Encode(req), grpc.StatusCode.INVALID_ARGUMENT, *needles)
    await assert_absent(enc, request_id)
    assert await listing(enc) == before
    assert await pool_state(enc) == pool_before
    await all_free(encoder, reg)


# ---------------------------------------------------------------------------- 8. Generate, ListTransfers


async def test_generate_with_nothing_to_encode_is_invalid_argument(encoder, language, lang):
    request_id = rid()
    before = await listing(lang)
    await expect_error(
        lang.Generate(language_pb2.GenerateRequest(request_id=request_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        request_id,
        "synthetic_tokens=0",
    )
    await expect_error(
        lang.Generate(language_pb2.GenerateRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "synthetic_tokens=0",
    )
    await assert_absent(lang, request_id)
    assert await listing(lang) == before
    await assert_all_free((encoder.address, "encoder"), (language.address, "language"))


@pytest.mark.parametrize("states", [[42], [3, 42], [-1]], ids=["42", "3+42", "-1"])
async def test_list_transfers_with_an_unknown_state_is_invalid_argument(
    encoder, language, enc, lang, states
):
    bad = states[-1]
    # The proto field is an enum: a value outside it still travels (open enums), as an int.
    for stub in (enc, lang):
        before = await listing(stub)
        await expect_error(
            stub.ListTransfers(common_pb2.ListTransfersRequest(states=states)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "states",
            str(bad),
        )
        assert await listing(stub) == before
    await assert_all_free((encoder.address, "encoder"), (language.address, "language"))


# ---------------------------------------------------------------------------- 9. language start-up


@pytest.mark.parametrize(
    "args, needles",
    [
        (("--hidden", "128"), ("embeddings", "per_token_shape", "128", "256")),
        (
            ("--hidden", str(HIDDEN), "--dtype", "float16"),
            ("embeddings", "dtype", "float16", "bfloat16"),
        ),
    ],
    ids=["hidden", "dtype"],
)
async def test_language_with_a_different_layout_refuses_to_start(encoder, args, needles):
    with pytest.raises(RuntimeError) as info:
        ServiceProcess(
            "language",
            *args,
            "--block-size",
            str(BLOCK),
            "--pool-blocks",
            "8",
            "--encoder",
            encoder.address,
            ready_timeout=60,
        )
    message = str(info.value)
    exited = re.search(r"exited with code (-?\d+) before it was ready", message)
    assert exited and exited.group(1) != "0", message
    for needle in needles:
        assert needle in message, f"start-up error does not name {needle!r}:\n{message}"
    await assert_all_free((encoder.address, "encoder"))


# ---------------------------------------------------------------------------- Generate whose Encode is refused


@pytest.mark.parametrize(
    "request_kw, needles",
    [
        (dict(synthetic_tokens=MAX_TOKENS + 1), ("1001", str(MAX_TOKENS))),
        (
            dict(text="look", images=[common_pb2.Image(data=b"GIF89a....", mime_type="image/gif")]),
            ("images[0]",),
        ),
    ],
    ids=["above-max", "not-an-image"],
)
async def test_generate_whose_encode_is_refused_fails_at_once_with_the_encoders_code(
    encoder, language, lang, request_kw, needles
):
    """The encoder refuses the Encode at once; the language must pass that on at once, not sit on
    its Init (holding its blocks) until the encoder's bootstrap_timeout_s (30 s) gives up."""
    request_id = rid()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await lang.Generate(
            language_pb2.GenerateRequest(request_id=request_id, **request_kw), timeout=4
        )
    elapsed = loop.time() - started
    await wait_all_free((encoder.address, "encoder"), (language.address, "language"))
    e = info.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        f"expected INVALID_ARGUMENT at once, got {e.code().name} after {elapsed:.1f} s: {e.details()!r}"
    )
    for needle in needles:
        assert needle in e.details(), f"message does not name {needle!r}: {e.details()!r}"
    assert elapsed < 3, f"took {elapsed:.1f} s"


async def wait_all_free(*addresses_and_kinds, timeout: float = 5.0) -> None:
    """assert_all_free, allowing `timeout` seconds for clean-up still in progress."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await assert_all_free(*addresses_and_kinds)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
