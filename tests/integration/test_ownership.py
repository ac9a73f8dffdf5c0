"""Only the owner may steer a transfer; the encoder writes only inside the blocks it was given;
limits refuse before anything is allocated (docs/SECURITY.md).

A real encoder process; the language ranks are `TestRank`s in this process (real Mooncake TCP,
their own pools), so every case can check that *no byte* changed anywhere: the victim's whole
pool and the attacker's whole pool are compared byte for byte before and after, besides the
victim transfer's state, the listing and the encoder's pool. The victim is a live transfer held
mid-round (round 1 delivered, Resume pending); after the attacks it completes with the right
bytes. `test_limits_through_a_real_language` and `test_two_language_processes_*` use real
language processes too.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import torch

from common.pb.epd.v1 import (
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
)
from services.tools.reference_payload import expected_digest
from tests.conftest import ServiceProcess, assert_all_free
from tests.integration.rank_harness import TestRank

HIDDEN = 256
BLOCK = 16
RANK_BLOCKS = 32
MAX_IMAGES = 2
MAX_IMAGE_BYTES = 4096
MAX_PER_PEER = 3

TRANSFERRING, SUCCESS, FAILED = 3, 4, 5
PD, IA, RE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)

pytestmark = pytest.mark.timeout(180)


def rid(prefix: str = "own") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def encoder():
    p = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "256",
        "--resume-timeout-s",
        "60",
        "--bootstrap-timeout-s",
        "60",
        "--max-images",
        str(MAX_IMAGES),
        "--max-image-bytes",
        str(MAX_IMAGE_BYTES),
        "--max-transfers-per-peer",
        str(MAX_PER_PEER),
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def ranks():
    """The victim and the attacker: two language instances, each with its own pool (created
    before the encoder first writes: Mooncake peers cache segment descriptors)."""
    victim = TestRank(
        hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS, language_id=rid("victim")
    )
    attacker = TestRank(
        hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS, language_id=rid("attacker")
    )
    yield victim, attacker
    victim.close()
    attacker.close()


@pytest.fixture
async def enc(encoder, ranks):
    async with grpc.aio.insecure_channel(encoder.address) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        for r in ranks:
            await r.register(stub)
        yield stub
    for r in ranks:
        assert not r.release_all(), "a test rank still held blocks"


# ---------------------------------------------------------------------------- helpers


async def expect(
    awaitable, code: grpc.StatusCode, *needles: str, absent: tuple[str, ...] = ()
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    e = info.value
    assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()!r}"
    for needle in needles:
        assert needle in e.details(), (
            f"{code.name} message does not name {needle!r}: {e.details()!r}"
        )
    for secret in absent:
        assert secret not in e.details(), f"{code.name} message reveals {secret!r}: {e.details()!r}"
    return e.details()


async def drain(call) -> list:
    return [st async for st in call]


class Statuses:
    """One rank's Status stream read in the background."""

    def __init__(self, stub, rank: TestRank, request_id: str):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.call = stub.Status(rank.status_request(request_id))
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for st in self.call:
            self.queue.put_nowait(st)

    async def until(self, state: int, timeout: float = 20.0):
        while True:
            st = await asyncio.wait_for(self.queue.get(), timeout)
            if st.state == state or st.state == FAILED:
                return st

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def fill(rank: TestRank, value: int) -> None:
    """Every byte of the rank's pool set to `value` (so any write shows)."""
    rank.pool.slab.fill_(value)


def memory(rank: TestRank) -> torch.Tensor:
    return rank.pool.slab.clone()


async def state_of(stub, request_id: str) -> tuple:
    t = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    return (
        t.state,
        t.sent_tokens,
        t.total_tokens,
        t.rounds,
        t.allocated_tokens,
        t.peer,
        t.error.reason,
        tuple((r.rank, r.sent_tokens, r.allocated_tokens, r.session) for r in t.ranks),
    )


async def pool_used(stub) -> tuple[int, int]:
    p = await stub.GetPool(common_pb2.GetPoolRequest())
    return p.used_blocks, p.waiters


async def hold_victim(enc, victim: TestRank, request_id: str, total: int = 100, seed: int = 7):
    """Victim transfer with round 1 (32 tokens) delivered and its Resume pending."""
    blocks = victim.alloc(2)
    await enc.Init(victim.init_request(request_id, blocks))
    statuses = Statuses(enc, victim, request_id)
    await enc.Encode(victim.encode_request(request_id, total, seed))
    st = await statuses.until(TRANSFERRING)
    assert (st.state, st.sent_tokens) == (TRANSFERRING, 2 * BLOCK), st
    assert victim.mismatches(victim.read(blocks, 2 * BLOCK), seed, 0) == []
    return blocks, statuses


async def finish_victim(
    enc,
    victim: TestRank,
    request_id: str,
    blocks,
    statuses: Statuses,
    total: int = 100,
    seed: int = 7,
) -> None:
    """Resume the victim to the end; every round must hold the synthetic payload's bytes."""
    sent = 2 * BLOCK
    while True:
        victim.free(blocks)
        blocks = victim.alloc(2)
        await enc.Resume(victim.resume_request(request_id, sent, blocks))
        st = await statuses.until(SUCCESS if sent + 2 * BLOCK >= total else TRANSFERRING)
        assert st.state != FAILED, st
        n = st.sent_tokens - sent
        assert victim.mismatches(victim.read(blocks, n), seed, sent) == [], (
            f"round at {sent} holds wrong bytes"
        )
        sent = st.sent_tokens
        if st.state == SUCCESS:
            break
    victim.free(blocks)
    await statuses.close()


# ---------------------------------------------------------------------------- ownership


async def test_another_instance_cannot_steer_a_live_transfer(encoder, enc, ranks):
    """Init, Resume, Status, Cancel, Encode and EncodeStream of the victim's request id by another language
    instance: PERMISSION_DENIED naming the request id (not the owner), nothing changes — not the
    transfer, not the encoder's pool, not one byte of either pool; the victim then completes."""
    victim, attacker = ranks
    request_id = rid()
    fill(attacker, 0x5A)
    blocks, statuses = await hold_victim(enc, victim, request_id)
    # Bytes outside the victim's allocation are a pattern that any stray write would change.
    for b in range(RANK_BLOCKS):
        if b not in blocks:
            victim.pool.slab[b].fill_(0xA5)
    before = (
        await state_of(enc, request_id),
        await pool_used(enc),
        memory(victim),
        memory(attacker),
    )

    async def unchanged(what: str) -> None:
        after = (
            await state_of(enc, request_id),
            await pool_used(enc),
            memory(victim),
            memory(attacker),
        )
        assert after[:2] == before[:2], f"{what} changed the transfer or the encoder's pool"
        assert torch.equal(after[2], before[2]), f"{what} changed bytes of the victim's pool"
        assert torch.equal(after[3], before[3]), f"{what} changed bytes of the attacker's pool"

    mine = attacker.alloc(4, clear=False)
    owner = victim.language_id
    await expect(enc.Init(attacker.init_request(request_id, mine)), PD, request_id, absent=(owner,))
    await unchanged("Init by another instance")
    await expect(
        enc.Resume(attacker.resume_request(request_id, 2 * BLOCK, mine)),
        PD,
        request_id,
        absent=(owner,),
    )
    await unchanged("Resume by another instance")
    await expect(
        drain(enc.Status(attacker.status_request(request_id))), PD, request_id, absent=(owner,)
    )
    # A Status stream opened and dropped by an intruder must not end the victim's transfer either.
    await expect(
        drain(enc.Status(victim.status_request(request_id, language_id=""))), PD, request_id
    )
    await unchanged("Status by another instance")
    for cancel in (
        attacker.cancel_request(request_id, "integrity: forged"),
        victim.cancel_request(request_id, language_id=""),  # no language_id at all
        attacker.cancel_request(request_id, language_id="x" * 30),
    ):  # an unknown one
        await expect(enc.Cancel(cancel), PD, request_id, absent=(owner,))
    await unchanged("Cancel by another instance")
    await expect(
        enc.Encode(attacker.encode_request(request_id, 5000, 99)), PD, request_id, absent=(owner,)
    )
    await unchanged("Encode by another instance")
    await expect(
        drain(enc.EncodeStream(attacker.encode_request(request_id, 5000, 99))),
        PD,
        request_id,
        absent=(owner,),
    )
    await unchanged("EncodeStream by another instance")
    # Empty language_id where one is needed: INVALID_ARGUMENT, nothing changes.
    await expect(
        enc.Init(attacker.init_request(rid(), mine, language_id="")), IA, "language_id is empty"
    )
    await expect(
        enc.Resume(attacker.resume_request(request_id, 2 * BLOCK, mine, language_id="")),
        IA,
        "language_id is empty",
    )
    await unchanged("calls without a language_id")
    attacker.free(mine)

    await finish_victim(enc, victim, request_id, blocks, statuses)
    outside = [b for b in range(RANK_BLOCKS) if b not in blocks]
    assert bool((victim.pool.slab[outside] == 0xA5).all()), "the victim's other blocks were written"
    assert torch.equal(memory(attacker), before[3])
    info = await enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    assert info.state == SUCCESS and info.peer == owner
    await assert_all_free((encoder.address, "encoder"))


async def test_the_owner_cancels_by_transfer_id_or_client_request_id(encoder, enc, ranks):
    """The owner's Cancel works (by the transfer id, or by the client's request id when the
    transfer id is `LANGUAGE_ID/REQUEST_ID`); an equal client request id of another instance is
    never the one cancelled."""
    victim, attacker = ranks
    client_id = rid("same")
    ids = {r: f"{r.language_id}/{client_id}" for r in ranks}
    for r in ranks:
        await enc.Encode(r.encode_request(ids[r], 50, 1))
    await expect(enc.Cancel(attacker.cancel_request(ids[victim])), PD, ids[victim])
    reply = await enc.Cancel(attacker.cancel_request(client_id, "attacker cancels its own"))
    assert reply.cancelled
    assert (await state_of(enc, ids[attacker]))[0] == FAILED
    assert (await state_of(enc, ids[victim]))[0] != FAILED, (
        "the other instance's transfer was cancelled"
    )
    reply = await enc.Cancel(victim.cancel_request(ids[victim]))
    assert reply.cancelled
    await assert_all_free((encoder.address, "encoder"))


async def test_register_cannot_claim_another_instances_pool(encoder, enc, ranks):
    """A Register describing memory that is not the caller's (another instance's pool, under any
    spelling of its session, or the caller's own pool stretched over it) fails the proof of
    possession: PERMISSION_DENIED; the victim's registration stays and its transfers go on writing
    where they should. (Both ranks live in this process, so they share one Mooncake session: the
    proof, not the session, tells the pools apart.)"""
    victim, attacker = ranks
    request_id = rid()
    fill(attacker, 0x5A)
    blocks, statuses = await hold_victim(enc, victim, request_id)
    before = (await state_of(enc, request_id), memory(victim), memory(attacker))
    # 1. The victim's own layout (same base address) under the attacker's language_id.
    await expect(
        attacker.register_claiming(enc, layout=victim.layout()),
        PD,
        "does not hold this registration's nonce",
        absent=(victim.language_id,),
    )
    # ... also when the session is spelled another way (same listener).
    host, port = victim.session.rsplit(":", 1)
    assert host == "127.0.0.1"
    for alias in (f"localhost:{port}", f"127.0.0.2:{port}", f"127.1:{port}"):
        await expect(
            attacker.register_claiming(enc, session=alias, layout=victim.layout()),
            PD,
            "Mooncake session",
        )
    # 2. The attacker's pool, but with num_blocks stretched so its blocks reach the victim's pool.
    stretched = attacker.layout()
    lo, hi = sorted((attacker.pool.base_address, victim.pool.base_address))
    stretched.base_address = lo
    stretched.num_blocks = (hi - lo) // (BLOCK * stretched.record_bytes) + RANK_BLOCKS
    await expect(attacker.register_claiming(enc, layout=stretched), PD, "Mooncake session")
    # ... and, whichever side of the attacker's pool the victim's lies, the claim stretched from
    # the attacker's pool over the victim's, block-aligned with the attacker's own blocks: one end
    # of the claim is the attacker's own proof area (a proof read at one end only passes it), the
    # other lies in or beyond the victim's pool.
    bb = BLOCK * stretched.record_bytes
    own = attacker.layout()
    over = attacker.layout()
    if victim.pool.base_address < attacker.pool.base_address:  # stretched downwards
        k = -(-(attacker.pool.base_address - victim.pool.base_address) // bb)
        over.base_address = own.base_address - k * bb
        over.num_blocks = RANK_BLOCKS + k
        assert over.base_address + over.num_blocks * bb == own.base_address + RANK_BLOCKS * bb
    else:  # stretched upwards
        victim_end = victim.pool.base_address + RANK_BLOCKS * bb
        over.num_blocks = RANK_BLOCKS + -(
            -(victim_end - (own.base_address + RANK_BLOCKS * bb)) // bb
        )
    assert over.base_address <= victim.pool.base_address
    assert over.base_address + over.num_blocks * bb >= victim.pool.base_address + RANK_BLOCKS * bb
    await expect(attacker.register_claiming(enc, layout=over), PD, "Mooncake session")
    # 3. The attacker registering its own pool again is fine (idempotent), and writes only there.
    await attacker.register(enc)
    assert (await state_of(enc, request_id)) == before[0]
    assert torch.equal(memory(victim), before[1]) and torch.equal(memory(attacker), before[2])
    await finish_victim(enc, victim, request_id, blocks, statuses)
    await assert_all_free((encoder.address, "encoder"))


async def test_forged_block_ids_are_invalid_argument(encoder, enc, ranks):
    """Block ids outside the registered pool (or repeated) at Init and Resume: INVALID_ARGUMENT
    naming the block, no transfer opened, no byte written."""
    victim, attacker = ranks
    fill(victim, 0xA5)
    fill(attacker, 0x5A)
    before = (await pool_used(enc), memory(victim), memory(attacker))
    request_id = rid()
    for bad, needle in (
        ([RANK_BLOCKS], f"dst block id {RANK_BLOCKS} is out of range"),
        ([0, 2**31], f"dst block id {2**31} is out of range"),
        ([3, 3], "dst block id 3 appears more than once"),
    ):
        await expect(enc.Init(attacker.init_request(request_id, bad)), IA, needle)
    await expect(
        enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id)),
        grpc.StatusCode.NOT_FOUND,
    )
    # At Resume too, on the attacker's own held transfer.
    blocks, statuses = await hold_victim(enc, attacker, request_id)
    held = await state_of(enc, request_id)
    fill_after_round = memory(attacker)
    await expect(
        enc.Resume(attacker.resume_request(request_id, 2 * BLOCK, [RANK_BLOCKS + 5])),
        IA,
        f"dst block id {RANK_BLOCKS + 5} is out of range",
    )
    assert await state_of(enc, request_id) == held
    assert torch.equal(memory(attacker), fill_after_round) and torch.equal(
        memory(victim), before[1]
    )
    await enc.Cancel(attacker.cancel_request(request_id))
    await statuses.close()
    attacker.free(blocks)
    assert await pool_used(enc) == before[0]
    await assert_all_free((encoder.address, "encoder"))


# ---------------------------------------------------------------------------- limits

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e2e1a7b30000000049454e44ae426082"
)


async def test_image_limits_are_invalid_argument_before_anything_is_allocated(encoder, enc, ranks):
    victim, attacker = ranks
    before = await pool_used(enc)
    memories = memory(victim), memory(attacker)
    too_many = encoder_pb2.EncodeRequest(
        request_id=rid(),
        language_id=victim.language_id,
        rank_count=1,
        text="hi",
        images=[common_pb2.Image(data=PNG, mime_type="image/png")] * (MAX_IMAGES + 1),
    )
    await expect(enc.Encode(too_many), IA, f"{MAX_IMAGES + 1} images", f"max_images={MAX_IMAGES}")
    big = encoder_pb2.EncodeRequest(
        request_id=rid(),
        language_id=victim.language_id,
        rank_count=1,
        text="hi",
        images=[
            common_pb2.Image(data=PNG, mime_type="image/png"),
            common_pb2.Image(data=PNG + b"\0" * MAX_IMAGE_BYTES, mime_type="image/png"),
        ],
    )
    await expect(
        enc.Encode(big),
        IA,
        "images[1]",
        f"{len(PNG) + MAX_IMAGE_BYTES} bytes",
        f"max_image_bytes={MAX_IMAGE_BYTES}",
    )
    for req in (too_many, big):
        await expect(
            enc.GetTransfer(common_pb2.GetTransferRequest(request_id=req.request_id)),
            grpc.StatusCode.NOT_FOUND,
        )
    assert await pool_used(enc) == before
    assert torch.equal(memory(victim), memories[0]) and torch.equal(memory(attacker), memories[1])
    await assert_all_free((encoder.address, "encoder"))


async def test_too_many_transfers_of_one_peer_is_resource_exhausted(encoder, enc, ranks):
    """The (MAX_PER_PEER + 1)-th live transfer of one language identity, opened by Encode or by
    Init: RESOURCE_EXHAUSTED naming the peer and the limit, nothing allocated; another peer is
    not affected; once one ends, the peer may open another."""
    victim, attacker = ranks
    ids = [rid("lim") for _ in range(MAX_PER_PEER)]
    for request_id in ids:
        await enc.Encode(attacker.encode_request(request_id, 20, 1))
    before = await pool_used(enc)
    fill(attacker, 0x5A)
    fill(victim, 0xA5)
    memories = memory(victim), memory(attacker)
    extra = rid("lim")
    await expect(
        enc.Encode(attacker.encode_request(extra, 20, 1)),
        RE,
        attacker.language_id,
        f"max_transfers_per_peer={MAX_PER_PEER}",
        f"{MAX_PER_PEER} live transfers",
    )
    mine = attacker.alloc(1, clear=False)
    await expect(
        enc.Init(attacker.init_request(extra, mine)),
        RE,
        attacker.language_id,
        f"max_transfers_per_peer={MAX_PER_PEER}",
    )
    assert await pool_used(enc) == before
    assert torch.equal(memory(victim), memories[0]) and torch.equal(memory(attacker), memories[1])
    await expect(
        enc.GetTransfer(common_pb2.GetTransferRequest(request_id=extra)), grpc.StatusCode.NOT_FOUND
    )
    # Another language instance still gets its transfers.
    other = rid("lim")
    await enc.Encode(victim.encode_request(other, 20, 1))
    await enc.Cancel(victim.cancel_request(other))
    # One of the peer's transfers ends: the peer may open one more.
    await enc.Cancel(attacker.cancel_request(ids[0]))
    await enc.Encode(attacker.encode_request(extra, 20, 1))
    for request_id in [*ids[1:], extra]:
        await enc.Cancel(attacker.cancel_request(request_id))
    attacker.free(mine)
    await assert_all_free((encoder.address, "encoder"))


# ---------------------------------------------------------------------------- address check (fault injected)


async def test_misplanned_write_fails_the_request_with_no_byte_written_fault_injected(
    ranks, unique_id
):
    """`--transport-fault misplan_nth=1` moves the first planned write's first piece past its own
    end (into blocks of the same pool the request was not given), as a planning bug would: the
    encoder's address check refuses the round before submitting anything — the request fails with
    `invalid`, both pools are freed, and not one byte of the destination pool changed. The next
    request on the same encoder is planned correctly and arrives intact."""
    enc_proc = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "64",
        "--transport-fault",
        "misplan_nth=1",
    )
    victim, _ = ranks
    try:
        async with grpc.aio.insecure_channel(enc_proc.address) as ch:
            stub = encoder_pb2_grpc.EncoderStub(ch)
            await victim.register(stub)
            fill(victim, 0xA5)
            before = memory(victim)
            request_id = unique_id("misplan")
            blocks = victim.alloc(2, clear=False)
            await stub.Init(victim.init_request(request_id, blocks))
            statuses = Statuses(stub, victim, request_id)
            await stub.Encode(victim.encode_request(request_id, 2 * BLOCK, 3))
            st = await statuses.until(SUCCESS)
            assert st.state == FAILED and st.error.reason == common_pb2.FAILURE_REASON_INVALID, st
            assert (
                "refused before any write" in st.error.message and "outside" in st.error.message
            ), st.error.message
            await statuses.close()
            assert torch.equal(memory(victim), before), (
                "a misplanned round wrote into the destination pool"
            )
            victim.free(blocks)
            await assert_all_free((enc_proc.address, "encoder"))
            # The fault fired once; the next request is planned right and lands intact.
            request_id = unique_id("after")
            blocks = victim.alloc(2)
            await stub.Init(victim.init_request(request_id, blocks))
            statuses = Statuses(stub, victim, request_id)
            await stub.Encode(victim.encode_request(request_id, 2 * BLOCK, 4))
            assert (await statuses.until(SUCCESS)).state == SUCCESS
            assert victim.mismatches(victim.read(blocks, 2 * BLOCK), 4, 0) == []
            await statuses.close()
            victim.free(blocks)
            await assert_all_free((enc_proc.address, "encoder"))
    finally:
        enc_proc.stop()


async def test_misplanned_later_part_of_a_round_writes_nothing_outside_fault_injected(
    ranks, unique_id
):
    """A round written in parts (the rank asked for progress every block): `misplan_nth=2`
    corrupts the plan of the round's second part. The first part landed in the first block (as it
    should); the second part is refused before it is written: the request fails with `invalid`,
    the second block and every block outside the allocation are untouched."""
    victim, _ = ranks
    enc_proc = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "256",
        "--transport-fault",
        "misplan_nth=2",
    )
    try:
        async with grpc.aio.insecure_channel(enc_proc.address) as ch:
            stub = encoder_pb2_grpc.EncoderStub(ch)
            await victim.register(stub)
            fill(victim, 0xA5)
            before = memory(victim)
            request_id = unique_id("misplan-part")
            # Parts need the payload's sums, which Encode builds for payloads above 1 MiB.
            blocks = victim.alloc(2, clear=False)
            init = victim.init_request(request_id, blocks)
            init.progress_tokens = BLOCK
            await stub.Init(init)
            statuses = Statuses(stub, victim, request_id)
            await stub.Encode(victim.encode_request(request_id, 3000, 3))
            st = await statuses.until(SUCCESS)
            assert st.state == FAILED and st.error.reason == common_pb2.FAILURE_REASON_INVALID, st
            assert f"refused before writing tokens [{BLOCK}, {2 * BLOCK})" in st.error.message, (
                st.error.message
            )
            await statuses.close()
            after = memory(victim)
            assert victim.mismatches(victim.read(blocks[:1], BLOCK), 3, 0) == [], (
                "the first part did not land"
            )
            untouched = [b for b in range(RANK_BLOCKS) if b != blocks[0]]
            assert torch.equal(after[untouched], before[untouched]), (
                "a refused part wrote into the pool"
            )
            victim.free(blocks)
            await assert_all_free((enc_proc.address, "encoder"))
    finally:
        enc_proc.stop()


async def test_one_misplanned_rank_means_no_rank_gets_a_byte_fault_injected(ranks, unique_id):
    """Two data ranks; `misplan_nth=2` corrupts only the second rank's plan of round 1. Every
    rank's plan is checked before any write is submitted, so the first rank (whose plan was
    fine) receives nothing either: the request fails with `invalid` on both, both pools unchanged."""
    victim, _ = ranks
    second = TestRank(
        hidden=HIDDEN,
        block_size=BLOCK,
        num_blocks=RANK_BLOCKS,
        language_id=victim.language_id,
        rank=1,
    )
    enc_proc = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "64",
        "--transport-fault",
        "misplan_nth=2",
    )
    try:
        async with grpc.aio.insecure_channel(enc_proc.address) as ch:
            stub = encoder_pb2_grpc.EncoderStub(ch)
            both = (victim, second)
            for r in both:
                await r.register(stub)
                fill(r, 0xA5)
            before = [memory(r) for r in both]
            request_id = unique_id("misplan2")
            held = [r.alloc(2, clear=False) for r in both]
            statuses = []
            for r, blocks in zip(both, held):
                await stub.Init(r.init_request(request_id, blocks, rank_count=2))
                statuses.append(Statuses(stub, r, request_id))
            await stub.Encode(victim.encode_request(request_id, 2 * BLOCK, 3, rank_count=2))
            for s in statuses:
                st = await s.until(SUCCESS)
                assert (
                    st.state == FAILED and st.error.reason == common_pb2.FAILURE_REASON_INVALID
                ), st
                assert "rank 1 refused before any write" in st.error.message, st.error.message
                await s.close()
            for r, mem, blocks in zip(both, before, held):
                assert torch.equal(memory(r), mem), (
                    f"rank {r.rank} received bytes of a refused round"
                )
                r.free(blocks)
            await assert_all_free((enc_proc.address, "encoder"))
    finally:
        enc_proc.stop()
        second.release_all()
        second.close()


# ---------------------------------------------------------------------------- real language processes


async def test_two_language_processes_cannot_touch_each_others_requests(encoder):
    """Two real language instances on one encoder: a raw client using the second instance's
    language_id cannot Cancel or Status the first one's transfer; both instances' own requests
    succeed with the right digest."""
    # Small pools: the first instance's request streams through in ~50 rounds while the other pokes at it.
    common = [
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "4",
        "--initial-tokens",
        "64",
        "--encoder",
        encoder.address,
    ]
    first_id, second_id = rid("first"), rid("second")
    first = ServiceProcess("language", *common, "--language-id", first_id)
    second = ServiceProcess("language", *common, "--language-id", second_id)
    try:
        async with (
            grpc.aio.insecure_channel(first.address) as c1,
            grpc.aio.insecure_channel(second.address) as c2,
            grpc.aio.insecure_channel(encoder.address) as ce,
        ):
            lang1, lang2 = language_pb2_grpc.LanguageStub(c1), language_pb2_grpc.LanguageStub(c2)
            enc = encoder_pb2_grpc.EncoderStub(ce)
            # A long request on the first instance; while it runs (or once it ended) the second's id pokes at it.
            big = asyncio.ensure_future(
                lang1.Generate(
                    language_pb2.GenerateRequest(
                        request_id="shared-id",
                        synthetic_tokens=3000,
                        synthetic_seed=5,
                        want_digest=True,
                    )
                )
            )
            info = None
            for _ in range(400):
                listing = await enc.ListTransfers(
                    common_pb2.ListTransfersRequest()
                )  # live or just ended
                info = next((t for t in listing.transfers if t.request_id == "shared-id"), None)
                if info is not None:
                    break
                await asyncio.sleep(0.01)
            assert info is not None, (
                f"the first instance's transfer never showed on the encoder: {big}"
            )
            assert info.peer == first_id
            transfer_id = f"{first_id}/shared-id"
            await expect(
                enc.Cancel(
                    common_pb2.CancelRequest(
                        request_id=transfer_id, reason="x", language_id=second_id
                    )
                ),
                PD,
                "shared-id",
            )
            # By the client's request id alone: the refusal does not reveal whose it is.
            await expect(
                enc.Cancel(
                    common_pb2.CancelRequest(
                        request_id="shared-id", reason="x", language_id=second_id
                    )
                ),
                PD,
                "shared-id",
                absent=(first_id,),
            )
            await expect(
                drain(
                    enc.Status(
                        encoder_pb2.StatusRequest(request_id=transfer_id, language_id=second_id)
                    )
                ),
                PD,
                "shared-id",
            )
            # The second instance may use the same client request id for its own request.
            own = await lang2.Generate(
                language_pb2.GenerateRequest(
                    request_id="shared-id", synthetic_tokens=300, synthetic_seed=6, want_digest=True
                )
            )
            reply = await big
            assert reply.payload_sha256 == expected_digest(3000, 5, HIDDEN)
            assert own.payload_sha256 == expected_digest(300, 6, HIDDEN)
        await assert_all_free(
            (encoder.address, "encoder"), (first.address, "language"), (second.address, "language")
        )
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize(
    "language_limits", [False, True], ids=["encoder-refuses", "language-refuses"]
)
async def test_limits_through_a_real_language(encoder, language_limits):
    """A Generate with too many images, or an oversized image, through a real language process:
    INVALID_ARGUMENT naming the limit — from the encoder (the language's defaults are larger), or
    from the language's own front door before it reserves anything or calls the encoder (its
    limits are smaller); both pools stay free and the encoder never saw the request."""
    limits = ("--max-images", "1", "--max-image-bytes", "100") if language_limits else ()
    lang = ServiceProcess(
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
        *limits,
    )
    max_images, max_bytes = (1, 100) if language_limits else (MAX_IMAGES, MAX_IMAGE_BYTES)
    try:
        async with (
            grpc.aio.insecure_channel(lang.address) as ch,
            grpc.aio.insecure_channel(encoder.address) as ce,
        ):
            stub, enc = language_pb2_grpc.LanguageStub(ch), encoder_pb2_grpc.EncoderStub(ce)
            seen = len((await enc.ListTransfers(common_pb2.ListTransfersRequest())).transfers)
            png = common_pb2.Image(data=PNG, mime_type="image/png")
            await expect(
                stub.Generate(
                    language_pb2.GenerateRequest(
                        request_id=rid("many"), text="x", images=[png] * (max_images + 1)
                    )
                ),
                IA,
                f"{max_images + 1} images",
                f"max_images={max_images}",
            )
            huge = common_pb2.Image(data=PNG + b"\0" * max_bytes, mime_type="image/png")
            await expect(
                stub.Generate(
                    language_pb2.GenerateRequest(request_id=rid("huge"), text="x", images=[huge])
                ),
                IA,
                "images[0]",
                f"{len(PNG) + max_bytes} bytes",
                f"max_image_bytes={max_bytes}",
            )
            if language_limits:  # refused at the front door: the encoder never heard of them
                assert (
                    len((await enc.ListTransfers(common_pb2.ListTransfersRequest())).transfers)
                    == seen
                )
        await assert_all_free((encoder.address, "encoder"), (lang.address, "language"))
    finally:
        lang.stop()
