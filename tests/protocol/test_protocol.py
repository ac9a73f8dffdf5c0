"""The transfer protocol end to end, in one process (the fast tier: see tests/protocol/harness.py).

Each scenario runs the real encoder and language services over real gRPC on loopback, with
memcpy for the data plane, and checks outcomes: the delivered payload's digest against the
independent reference (services/tools/reference_payload.py), the number of rounds, both sides'
states and failure reasons, the client's status code. The harness checks on exit that every pool
of both services is fully free (nothing used, quarantined or waited for; no live transfer).

Rounds: the language pool holds 256 tokens (16 blocks of 16) per rank and reserves 64 tokens
before it knows the size; each resume round takes what the pool has free, so a request of N > 64
tokens needs 1 + ceil((N - 64) / 256) rounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import grpc
import pytest

from common.pb.epd.v1 import common_pb2
from common.states import FailureReason, StatusUpdate, TransferState
from services.encoder import transfer as encoder_transfer
from services.tools.reference_payload import expected_digest
from tests.faults.launch import _misplanning
from tests.faults.transport import FaultyTransport
from tests.protocol.harness import (
    BLOCK,
    HIDDEN,
    INITIAL_TOKENS,
    LANGUAGE_BLOCKS,
    STEP_TIMEOUT_S,
    Tier,
    protocol_tier,
)
from tests.protocol.links import ForgingLink, PausingLink

pytestmark = pytest.mark.protocol

POOL_TOKENS = LANGUAGE_BLOCKS * BLOCK  # 256
SUCCESS = common_pb2.TRANSFER_STATE_SUCCESS
FAILED = common_pb2.TRANSFER_STATE_FAILED
TRANSFERRING = common_pb2.TRANSFER_STATE_TRANSFERRING


def rounds_for(n: int) -> int:
    """Rounds of an n-token request on the tier's default language pool."""
    return 1 if n <= INITIAL_TOKENS else 1 + math.ceil((n - INITIAL_TOKENS) / POOL_TOKENS)


async def delivered(tier: Tier, n: int, seed: int, *, request_id: str = "", **fields):
    """Generate n tokens; check the reply against the reference and both services' views."""
    reply = await tier.generate(n, seed, request_id=request_id, **fields)
    assert reply.total_tokens == n
    assert reply.payload_sha256 == expected_digest(n, seed, tier.hidden), (n, seed)
    assert reply.ranks[0].received_tokens == n and reply.ranks[0].rounds == reply.rounds
    if request_id:
        enc = await tier.encoder_transfer(request_id)
        assert (enc.state, enc.sent_tokens, enc.total_tokens, enc.rounds) == (
            SUCCESS,
            n,
            n,
            reply.rounds,
        ), enc
        lang = await tier.language_transfer(request_id)
        assert (lang.state, lang.sent_tokens, lang.rounds) == (SUCCESS, n, reply.rounds), lang
    return reply


async def failed(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call, STEP_TIMEOUT_S)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    return e.value


async def failed_on_both(tier: Tier, request_id: str, reason: int, *, encoder_state=FAILED):
    """Both services' views of a failed request: (encoder's, language's) TransferInfo."""
    enc = await tier.encoder_transfer(request_id)
    assert enc.state == encoder_state, enc
    if encoder_state == FAILED:
        assert enc.error.reason == reason, enc.error
        assert not enc.error.writes_may_land, enc.error
    lang = await tier.language_transfer(request_id)
    assert lang.state == FAILED and lang.error.reason == reason, lang
    return enc, lang


# ---------------------------------------------------------------------------- sizes and rounds

SIZES = {
    "one-token": 1,
    "single-round": 50,
    "exactly-the-initial-reservation": INITIAL_TOKENS,
    "one-token-over-the-reservation": INITIAL_TOKENS + 1,
    "multi-round": 200,
    "reservation-plus-whole-pool": INITIAL_TOKENS + POOL_TOKENS,
    "larger-than-the-pool": 1000,
    "four-pools-streamed": 4 * POOL_TOKENS + 100,
}


@pytest.mark.parametrize("n", list(SIZES.values()), ids=list(SIZES))
async def test_payload_arrives_intact_in_the_expected_rounds(tier, n):
    reply = await delivered(tier, n, seed=n, request_id=f"size-{n}")
    assert reply.rounds == rounds_for(n)
    assert reply.initial_allocated_tokens == INITIAL_TOKENS
    assert reply.integrity_verified
    assert reply.bytes == n * tier.language.pool.record.payload_bytes_per_token


async def test_blocks_are_reused_across_requests_and_rounds(tier):
    """Requests in a row on one tier, each streaming through the same small pool."""
    for i, n in enumerate((1000, 30, 700, 257)):
        reply = await delivered(tier, n, seed=100 + i)
        assert reply.rounds == rounds_for(n)


async def test_concurrent_requests_share_the_pool(tier):
    sizes = (40, 300, 900, 64, 513)
    replies = await asyncio.gather(*(tier.generate(n, seed=200 + i) for i, n in enumerate(sizes)))
    for i, (n, reply) in enumerate(zip(sizes, replies)):
        assert reply.payload_sha256 == expected_digest(n, 200 + i, HIDDEN), n


VARIANTS = {
    "init-after-encode": {"language": {"early_init": False}},
    "early-init-own-rpc": {"language": {"carry_init": False}},
    "overlapped-rounds": {"language": {"overlap_rounds": True}},
    # Payloads above 1 MiB (hidden 1024): rounds' checksums from the Encode's payload sums, and
    # rounds written in parts, each reported as it lands (progress statuses).
    "payload-sums": {"encoder": {"hidden": 1024}, "language": {"hidden": 1024}},
    "progress-statuses": {
        "encoder": {"hidden": 1024},
        "language": {"hidden": 1024, "progress_tokens": 32},
    },
    "spin-wait-writes": {"encoder": {"write_wait": "spin"}},
    "no-integrity": {"encoder": {"integrity": False}, "language": {"integrity": False}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_protocol_variants_deliver_the_same_payload(variant):
    links: list[ForgingLink] = []

    def record(link, rank):  # forges nothing: records what the rank was sent
        links.append(ForgingLink(link, lambda st, _delivered: [st]))
        return links[-1]

    async with protocol_tier(**VARIANTS[variant], wrap_link=record) as tier:
        for n in (50, 1000):
            reply = await delivered(tier, n, seed=7, request_id=f"{variant}-{n}")
            if variant == "overlapped-rounds":
                assert reply.rounds >= rounds_for(n)
                assert (reply.overlapped_rounds > 0) == (n > INITIAL_TOKENS)
            else:
                assert reply.rounds == rounds_for(n)
                assert reply.overlapped_rounds == 0
            assert reply.integrity_verified == (variant != "no-integrity")
            assert reply.early_init == (variant != "init-after-encode")
            landed = [st.landed_tokens for st in links[0].delivered if st.landed_tokens]
            assert bool(landed) == (variant == "progress-statuses" and n > INITIAL_TOKENS), landed


# ---------------------------------------------------------------------------- several TP ranks

TP = {
    "tp2-rank1-dummy": ("0", [0]),
    "tp2-both-data-ranks": ("", [0, 1]),
}


@pytest.mark.parametrize("data_ranks, data", list(TP.values()), ids=list(TP))
async def test_tp2_ranks_agree_and_every_data_rank_holds_the_payload(data_ranks, data):
    async with protocol_tier(language={"tp": 2, "data_ranks": data_ranks}) as tier:
        assert [r.rank for r in tier.ranks] == [1]  # rank 1 runs in this process
        pool = await tier.stub.GetPool(common_pb2.GetPoolRequest())
        assert [rp.rank for rp in pool.rank_pools] == [0, 1]  # rank 1's pool via the collective
        for n in (50, 300, 1000):
            reply = await tier.generate(n, seed=n, request_id=f"tp-{n}")
            want = expected_digest(n, n, HIDDEN)
            assert reply.payload_sha256 == want and reply.rounds == rounds_for(n)
            for r in reply.ranks:
                assert r.data_rank == (r.rank in data), r
                if r.data_rank:
                    assert (r.payload_sha256, r.received_tokens, r.rounds) == (
                        want,
                        n,
                        reply.rounds,
                    )
                else:  # a dummy rank receives nothing
                    assert (r.payload_sha256, r.received_tokens) == ("", 0)
            enc = await tier.encoder_transfer(f"tp-{n}")
            assert enc.state == SUCCESS and [v.rank for v in enc.ranks] == data


async def test_tp2_a_failure_on_rank_1_fails_the_request_on_every_rank():
    """Rank 1 alone gets a forged status (a wrong checksum for the last round): the ranks agree
    on failure (integrity) everywhere, rank 0 drops what it received, and both ranks' pools
    end free. (The last round, so that no Resume of rank 0 races rank 1's Cancel: see the tier's
    report on the reason the ranks agree on when one does.)"""

    def forge(st, _delivered):
        return [_flip_checksum(st)] if st.state == TransferState.SUCCESS else [st]

    links: list[ForgingLink] = []

    def wrap(link, rank):
        if rank != 1:
            return link
        links.append(ForgingLink(link, forge))
        return links[-1]

    async with protocol_tier(language={"tp": 2}, wrap_link=wrap) as tier:
        error = await failed(
            tier.generate(300, 1, request_id="tp-forged"), grpc.StatusCode.DATA_LOSS
        )
        assert "integrity" in error.details(), error.details()
        lang = await tier.language_transfer("tp-forged")
        assert lang.state == FAILED and lang.error.reason == common_pb2.FAILURE_REASON_INTEGRITY
        # What each rank had seen when they agreed: rank 1 accepted round 1 only; rank 0 may or
        # may not have taken in round 2 by then (it drops whatever it holds).
        rows = [(v.rank, v.state, v.sent_tokens) for v in lang.ranks]
        assert rows[1] == (1, FAILED, INITIAL_TOKENS) and rows[0][:2] == (0, FAILED), rows
        assert rows[0][2] in (INITIAL_TOKENS, 300), rows
        enc = await tier.encoder_transfer("tp-forged")
        assert (enc.state, enc.rounds) == (SUCCESS, 2)  # the encoder had finished its part
        assert len(links) == 1 and links[0].delivered  # rank 1's link (in this process)
        links[0].forge = None
        await delivered(tier, 300, 2)  # the instance goes on


@pytest.mark.parametrize("attempt", range(8))
async def test_tp2_a_failure_on_rank_1_in_round_1_is_integrity_on_every_rank(attempt):
    """Rank 1 refuses round 1 of three (a forged round number) while rank 0 asks for round 2:
    rank 0's Resume may reach the encoder after rank 1's Cancel ended the transfer. The refusal
    it gets then carries the reason the transfer ended with, so the ranks agree on integrity,
    not on a failure of rank 0's own call (repeated: the two calls race)."""

    def forge(st, _delivered):
        if st.round == 1 and st.round_tokens:
            return [dataclasses.replace(st, round=2)]
        return [st]

    def wrap(link, rank):
        return ForgingLink(link, forge) if rank == 1 else link

    async with protocol_tier(language={"tp": 2}, wrap_link=wrap) as tier:
        rid = f"tp-race-{attempt}"
        error = await failed(tier.generate(600, 1, request_id=rid), grpc.StatusCode.DATA_LOSS)
        lang = await tier.language_transfer(rid)
        assert lang.error.reason == common_pb2.FAILURE_REASON_INTEGRITY, (lang.error, error)
        enc = await tier.encoder_transfer(rid)
        assert enc.error.reason == common_pb2.FAILURE_REASON_INTEGRITY, enc.error


# ---------------------------------------------------------------------------- cancel


async def test_cancel_between_rounds_fails_both_sides_and_frees_everything():
    links: list[PausingLink] = []

    def wrap(link, rank):
        links.append(PausingLink(link, pause_at=2))
        return links[-1]

    async with protocol_tier(wrap_link=wrap) as tier:
        call = asyncio.ensure_future(tier.generate(1000, 3, request_id="to-cancel"))
        await asyncio.wait_for(links[0].reached.wait(), STEP_TIMEOUT_S)
        # Two rounds received; the encoder waits for the Resume of round 3.
        lang = await tier.language_transfer("to-cancel")
        assert (lang.state, lang.rounds, lang.sent_tokens) == (
            TRANSFERRING,
            2,
            INITIAL_TOKENS + POOL_TOKENS,
        )
        enc = await tier.encoder_transfer("to-cancel")
        assert (enc.state, enc.rounds) == (TRANSFERRING, 2)

        reply = await tier.stub.Cancel(
            common_pb2.CancelRequest(request_id="to-cancel", reason="the test says so")
        )
        assert reply.cancelled and reply.state == FAILED
        error = await failed(call, grpc.StatusCode.CANCELLED)
        assert "the test says so" in error.details()
        enc, lang = await failed_on_both(tier, "to-cancel", common_pb2.FAILURE_REASON_CANCELLED)
        assert enc.rounds == 2 and lang.rounds == 2
        links[0].release.set()
        await delivered(tier, 1000, 4)


async def test_cancel_of_a_finished_request_changes_nothing(tier):
    await delivered(tier, 100, 5, request_id="done")
    reply = await tier.stub.Cancel(common_pb2.CancelRequest(request_id="done", reason="late"))
    assert not reply.cancelled and reply.state == SUCCESS
    assert (await tier.encoder_transfer("done")).state == SUCCESS


# ---------------------------------------------------------------------------- forged statuses


def _first_round(change):
    """A forgery that applies `change` to the status of round 1 only."""

    def forge(st: StatusUpdate, _delivered):
        return [change(st)] if st.round == 1 and st.round_tokens else [st]

    return forge


def _after_round(k: int, extra):
    """A forgery that delivers round k's status, then `extra(delivered)` (never sent)."""

    def forge(st: StatusUpdate, delivered):
        if st.round == k and st.round_tokens:
            return [st, extra([*delivered, st])]
        return [st]

    return forge


def _flip_checksum(st: StatusUpdate) -> StatusUpdate:
    sums = tuple((f, v ^ 1 if f == "embeddings" else v) for f, v in st.checksums)
    return dataclasses.replace(st, checksums=sums)


FORGERIES = {
    "sent-beyond-the-allocation": (
        _first_round(
            lambda st: dataclasses.replace(
                st, sent_tokens=st.sent_tokens + BLOCK, round_tokens=st.round_tokens + BLOCK
            )
        ),
        "inconsistent status (sent_tokens=80, round_tokens=80",
    ),
    "an-allocation-never-given": (
        _first_round(lambda st: dataclasses.replace(st, allocated_tokens=st.allocated_tokens * 2)),
        "allocated_tokens=128 does not match this rank's allocation of 64 tokens",
    ),
    "a-skipped-round-number": (
        _first_round(lambda st: dataclasses.replace(st, round=2)),
        "round number 2 after round 0",
    ),
    "a-wrong-checksum": (
        _first_round(_flip_checksum),
        "round 1: checksum of field 'embeddings' over tokens [0, 64)",
    ),
    "success-before-the-end": (
        _first_round(lambda st: dataclasses.replace(st, state=TransferState.SUCCESS)),
        "SUCCESS with sent_tokens=64 < total_tokens=600",
    ),
    "the-total-changes": (
        _after_round(
            1,
            lambda d: dataclasses.replace(
                d[-1], total_tokens=601, sent_tokens=d[-1].sent_tokens + BLOCK, round=2
            ),
        ),
        "total_tokens changed from 600 to 601",
    ),
    "a-state-going-back": (
        _after_round(1, lambda d: dataclasses.replace(d[0], state=TransferState.BOOTSTRAPPING)),
        "state BOOTSTRAPPING after round 1",
    ),
    "an-earlier-round-again": (
        _after_round(2, lambda d: next(s for s in d if s.round == 1 and s.round_tokens)),
        "TRANSFERRING status with sent_tokens=64 round 1 after 320 tokens in 2 round(s)",
    ),
}


@pytest.mark.parametrize("forge, needle", list(FORGERIES.values()), ids=list(FORGERIES))
async def test_a_forged_status_fails_the_request_with_integrity(forge, needle):
    """A status the encoder did not send (or not so) is refused by the rank: the client gets
    DATA_LOSS naming what was wrong, the rank cancels the transfer on the encoder with reason
    integrity, nothing leaks, and the next request is unharmed."""
    links: list[ForgingLink] = []

    def wrap(link, rank):
        links.append(ForgingLink(link, forge))
        return links[-1]

    async with protocol_tier(wrap_link=wrap) as tier:
        error = await failed(tier.generate(600, 9, request_id="forged"), grpc.StatusCode.DATA_LOSS)
        assert needle in error.details(), error.details()
        await failed_on_both(tier, "forged", common_pb2.FAILURE_REASON_INTEGRITY)
        links[0].forge = None
        await delivered(tier, 600, 10)


# ---------------------------------------------------------------------------- injected write faults

WRITE_FAULTS = {
    # spec, tokens, client code, reason, the encoder's state, rounds the language received
    "the-only-write-fails": (
        "fail_nth=1",
        50,
        grpc.StatusCode.UNAVAILABLE,
        common_pb2.FAILURE_REASON_TRANSPORT,
        FAILED,
        0,
    ),
    "round-3-write-fails": (
        "fail_nth=3",
        600,
        grpc.StatusCode.UNAVAILABLE,
        common_pb2.FAILURE_REASON_TRANSPORT,
        FAILED,
        2,
    ),
    "round-1-corrupted-of-4": (
        "corrupt_nth=1",
        600,
        grpc.StatusCode.DATA_LOSS,
        common_pb2.FAILURE_REASON_INTEGRITY,
        FAILED,
        1,
    ),
    # The last round is verified after the encoder ended the transfer: only the language fails.
    "last-round-corrupted": (
        "corrupt_nth=2",
        200,
        grpc.StatusCode.DATA_LOSS,
        common_pb2.FAILURE_REASON_INTEGRITY,
        SUCCESS,
        2,
    ),
}


@pytest.mark.parametrize(
    "spec, n, code, reason, encoder_state, received",
    list(WRITE_FAULTS.values()),
    ids=list(WRITE_FAULTS),
)
async def test_an_injected_write_fault_fails_the_request_cleanly(
    spec, n, code, reason, encoder_state, received
):
    async with protocol_tier(wrap_writes=lambda t: FaultyTransport(t, spec)) as tier:
        error = await failed(tier.generate(n, 11, request_id="faulty"), code)
        faulty = tier.writes
        if "fail" in spec:
            assert (
                faulty.failed == [int(spec.split("=")[1])] and "injected fault" in error.details()
            )
        else:
            assert faulty.corrupted == [int(spec.split("=")[1])]
            assert "checksum of field" in error.details(), error.details()
        enc, lang = await failed_on_both(tier, "faulty", reason, encoder_state=encoder_state)
        assert lang.rounds == received
        await delivered(tier, n, 12)  # later writes are healthy


async def test_a_misplanned_write_is_refused_before_anything_is_written(monkeypatch):
    """A round planned outside the blocks it was given (a planning bug, injected) is refused by
    the encoder's address check: `invalid` on both sides, nothing written, nothing leaked."""

    def wrap(transport):
        faulty = FaultyTransport(transport, "misplan_nth=2")
        monkeypatch.setattr(
            encoder_transfer,
            "plan_round",
            _misplanning(encoder_transfer.plan_round, faulty.plan_fault),
        )
        return faulty

    async with protocol_tier(wrap_writes=wrap) as tier:
        writes_before = tier.writes.writes
        error = await failed(
            tier.generate(600, 13, request_id="misplanned"), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "refused before any write" in error.details(), error.details()
        assert tier.writes.writes == writes_before + 1  # round 1 only
        enc, lang = await failed_on_both(tier, "misplanned", common_pb2.FAILURE_REASON_INVALID)
        assert (enc.rounds, lang.rounds) == (1, 1)
        await delivered(tier, 600, 14)


async def test_a_late_write_keeps_the_blocks_fenced_until_it_landed():
    """The write fence: a write reported failed whose bytes land 0.4 s later keeps its blocks
    quarantined on both sides until then; the next request, in a language pool of exactly one
    round, waits for those blocks and gets its own bytes."""
    async with protocol_tier(
        wrap_writes=lambda t: FaultyTransport(t, "late_nth=1,late_s=0.4"),
        language={"pool_blocks": INITIAL_TOKENS // BLOCK},
    ) as tier:
        await failed(tier.generate(50, 15, request_id="late"), grpc.StatusCode.UNAVAILABLE)
        enc_pool = await tier.encoder_stub.GetPool(common_pb2.GetPoolRequest())
        lang_pool = await tier.stub.GetPool(common_pb2.GetPoolRequest())
        assert enc_pool.quarantined_blocks > 0 and lang_pool.quarantined_blocks > 0
        assert (await tier.encoder_transfer("late")).error.writes_may_land
        reply = await delivered(tier, 50, 16)  # needs the fenced blocks: waits for the landing
        assert tier.writes.late == [1]
        assert reply.total_seconds > 0.1
        enc = await tier.encoder_transfer("late")
        assert enc.error.reason == common_pb2.FAILURE_REASON_TRANSPORT
        assert not enc.error.writes_may_land


# ---------------------------------------------------------------------------- the harness itself


async def test_every_transport_of_the_tier_is_an_in_process_one(tier):
    made = sorted((m.service, m.purpose) for m in tier.transports)
    assert made == [("encoder", "proofs"), ("encoder", "writes"), ("language", "pool")]
    for m in tier.transports:
        assert m.transport._engine is m.engine and m.transport.session == m.engine.session
    # The language registered its in-process pool, proven by a read through the proof engine.
    pool = next(m for m in tier.transports if m.purpose == "pool")
    assert [p.session for p in tier.encoder.sessions.values()] == [pool.engine.session]


async def test_the_harness_catches_a_leaked_block():
    with pytest.raises(AssertionError, match="language pool: used 1"):
        async with protocol_tier() as tier:
            assert tier.language.pool.allocator.try_alloc(1) is not None


def test_reasons_match_the_proto():
    """The numbers the tests compare with are the domain's (common/states.py)."""
    assert common_pb2.FAILURE_REASON_INTEGRITY == FailureReason.INTEGRITY
    assert common_pb2.TRANSFER_STATE_TRANSFERRING == TransferState.TRANSFERRING
