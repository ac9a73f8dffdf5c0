"""The encoder's per-request transfer state machine (`services/encoder/transfer.py`).

`EncoderTransfer` records what Init, Encode and Resume say and runs one task that writes each
round to every data rank and publishes the status every rank reads. Its outside world is a
`TransferEnv`; here that is `FakeEnv`, a fake that records every write instead of handing it to
Mooncake and fails or holds back the writes a test asks it to. The source pool is a real (tiny,
CPU) `BlockPool`, so the test can see which blocks are used, free or quarantined; the language
ranks are plain `PeerSession`s whose pools exist only as addresses.

What is checked, from the module's documented behaviour:

- BOOTSTRAPPING until every data rank sent Init (WAITING_FOR_INPUT) and Encode handed over the
  payload, then rounds of min(remaining, every rank's allocation) tokens, each written to every
  rank before its status is published: TRANSFERRING after a round that is not the last (then
  a Resume from every rank starts the next), SUCCESS after the last;
- a duplicate or stale Resume is a no-op; Init and Resume that do not fit are refused;
- a write that fails, a missing Init/Encode/Resume past its deadline, a cancel and a failed
  Encode all end the request FAILED with their reason, the source blocks back in the pool;
- a write that may still land keeps the source blocks quarantined and the status stream open
  (FAILED with writes_may_land) until it is final, then one more FAILED without it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence

import pytest

from common.errors import (
    AlreadyExists,
    EpdError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TransportError,
    Unavailable,
)
from common.fence import LateWrites, WriteFence
from common.layout import FieldSpec, PoolGeometry, RecordLayout
from common.plan import blocks_for_tokens
from common.pool import BlockPool
from common.states import FailureReason, ImageSpan, StatusUpdate, TransferState
from services.encoder import transfer as transfer_module
from services.encoder.transfer import EncoderTransfer, PeerSession

S = TransferState
R = FailureReason

RECORD = RecordLayout.pack([FieldSpec("embeddings", "float32", (4,))])
SRC_BLOCK = 4  # tokens per block of the encoder's pool
SRC_BLOCKS = 16
DST_BLOCK = 4  # tokens per block of every language rank's pool
DST_BLOCKS = 32
LANGUAGE = "lang"
PRINCIPAL = "anonymous"
REQUEST = f"{LANGUAGE}/req-1"
WAIT_S = 2.0  # the most any step of a test may take before it counts as hung


def session_of(rank: int) -> str:
    return f"10.0.0.{rank + 1}:17000"


def peer(rank: int, *, language_id: str = LANGUAGE) -> PeerSession:
    geometry = PoolGeometry(RECORD, DST_BLOCK, DST_BLOCKS, base_address=(rank + 1) << 32)
    return PeerSession(language_id, rank, session_of(rank), geometry, 0, PRINCIPAL)


def blocks(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


@dataclasses.dataclass(frozen=True)
class Write:
    session: str
    triples: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _src, _dst, length in self.triples)

    @property
    def tokens(self) -> int:
        return self.nbytes // RECORD.record_bytes

    def dst_blocks(self, rank: int) -> set[int]:
        """The destination block ids this write touches (of `rank`'s pool)."""
        base = (rank + 1) << 32
        block_bytes = DST_BLOCK * RECORD.record_bytes
        touched: set[int] = set()
        for _src, dst, length in self.triples:
            touched.update(
                range((dst - base) // block_bytes, (dst - base + length - 1) // block_bytes + 1)
            )
        return touched


class FakeTelemetry:
    """A fake Telemetry: records what the transfer reports."""

    def __init__(self):
        self.ended: list[tuple[TransferState, FailureReason, int]] = []
        self.bytes = 0
        self.resumes = 0
        self.fenced = 0
        self.fence_releases = 0
        self.integrity_failures = 0

    def transfer_ended(self, state, reason, *, seconds, rounds) -> None:
        self.ended.append((state, reason, rounds))

    def bytes_moved(self, nbytes) -> None:
        self.bytes += nbytes

    def resumed(self, overlapped: bool = False) -> None:
        self.resumes += 1

    def alloc_waited(self, seconds) -> None:
        pass

    def integrity_failed(self) -> None:
        self.integrity_failures += 1

    def encoded(self, seconds) -> None:
        pass

    def write_fenced(self) -> None:
        self.fenced += 1

    def fence_released(self, seconds) -> None:
        self.fence_releases += 1


class FakeEnv:
    """A fake TransferEnv: writes are recorded, not performed.

    Each write is tracked by the transfer's fence the way the real transport does it (a worker
    future, final when the write returns). `faults[i]` makes the i-th write (0-based, in order of
    submission) raise; a `TransportError` carrying `in_flight` leaves those pieces tracked by the
    fence until the test settles them. With `gate` set, writes wait for it before returning."""

    def __init__(
        self,
        *,
        integrity: bool = False,
        bootstrap_timeout_s: float = 5.0,
        resume_timeout_s: float = 5.0,
        quarantine_max_s: float = 5.0,
    ):
        self.pool = BlockPool(RECORD, SRC_BLOCK, SRC_BLOCKS)
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.resume_timeout_s = resume_timeout_s
        self.integrity = integrity
        self.telemetry = FakeTelemetry()
        self.quarantine_max_s = quarantine_max_s
        self.writes: list[Write] = []
        self.faults: dict[int, BaseException] = {}
        self.gate: asyncio.Event | None = None
        self.running: list[concurrent.futures.Future] = []
        self.checksum_calls: list[tuple[tuple[int, ...], int, int]] = []
        self.finished: list[EncoderTransfer] = []

    async def write(
        self, session: str, triples: Sequence[tuple[int, int, int]], fence: WriteFence
    ) -> None:
        index = len(self.writes)
        self.writes.append(Write(session, tuple(triples)))
        worker = concurrent.futures.Future()  # the write on its worker thread, as the fence sees it
        fence.track(worker)
        try:
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.running.append(worker)  # the caller stopped waiting; the write goes on
            raise
        error = self.faults.get(index)
        if error is not None:
            worker.set_exception(error)
            raise error
        worker.set_result(None)

    async def round_checksums(
        self, blocks: Sequence[int], start: int, n_tokens: int
    ) -> dict[str, int]:
        self.checksum_calls.append((tuple(blocks), start, n_tokens))
        return {"embeddings": fake_checksum(start, n_tokens)}

    def on_finished(self, transfer: EncoderTransfer) -> None:
        self.finished.append(transfer)

    @property
    def src_used(self) -> int:
        return self.pool.allocator.used_count

    @property
    def src_quarantined(self) -> int:
        return self.pool.allocator.quarantined_count


def fake_checksum(start: int, n_tokens: int) -> int:
    """A made-up checksum that names the token range it is over."""
    return start * 1_000_000 + n_tokens


class FakePayloadSums:
    """A fake PayloadSums (what Encode computes for any round's checksums): answers with
    `fake_checksum` of the range asked for, without reading the payload."""

    def checksums(self, start: int, count: int, runs) -> dict[str, int]:
        return {"embeddings": fake_checksum(start, count)}


class Harness:
    """One transfer, its task started, and every status its feed published (read as a Status
    stream reads it)."""

    def __init__(self, env: FakeEnv, *, rank_count: int = 1):
        self.env = env
        self.rank_count = rank_count
        self.transfer = EncoderTransfer(REQUEST, env)
        self.transfer.start()
        self.statuses: list[StatusUpdate] = []
        self.follower = asyncio.get_running_loop().create_task(self._follow())
        self.src: list[int] = []

    async def _follow(self) -> None:
        async for status in self.transfer.statuses():
            self.statuses.append(status)

    @property
    def states(self) -> list[TransferState]:
        return [s.state for s in self.statuses]

    @property
    def status(self) -> StatusUpdate:
        return self.transfer.status

    def init(
        self, rank: int, dst: list[int], *, progress_tokens: int = 0, held: frozenset = frozenset()
    ) -> None:
        self.transfer.add_rank(
            rank,
            self.rank_count,
            peer(rank),
            dst,
            len(dst) * DST_BLOCK,
            progress_tokens=progress_tokens,
            held=held,
        )

    def encode(self, total_tokens: int, **payload) -> None:
        self.begin_encode()
        assert self.attach(total_tokens, **payload)

    def begin_encode(self) -> None:
        self.transfer.begin_encode(self.rank_count, LANGUAGE, PRINCIPAL)

    def attach(self, total_tokens: int, **payload) -> bool:
        self.src = self.env.pool.allocator.try_alloc(blocks_for_tokens(total_tokens, SRC_BLOCK))
        return self.transfer.attach_payload(self.src, total_tokens, **payload)

    def resume(self, rank: int, sent_tokens: int, dst: list[int]) -> bool:
        return self.transfer.resume(rank, sent_tokens, dst, len(dst) * DST_BLOCK)

    async def until(self, predicate, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; statuses: {self.states}")
            await asyncio.sleep(0.001)

    async def round_done(self, sent_tokens: int) -> None:
        await self.until(lambda: self.status.sent_tokens >= sent_tokens, f"sent={sent_tokens}")

    async def ended(self) -> None:
        """The task ended and the status stream is over."""
        await asyncio.wait_for(self.transfer.done.wait(), WAIT_S)
        await asyncio.wait_for(asyncio.shield(self.follower), WAIT_S)

    async def settle(self) -> None:
        """Let every ready task run (nothing here sleeps on a timer)."""
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
async def harness():
    made: list[Harness] = []

    async def make(env: FakeEnv | None = None, **kw) -> Harness:
        h = Harness(env or FakeEnv(), **kw)
        made.append(h)
        await h.settle()  # the status stream is read from the start
        return h

    yield make
    for h in made:  # a failed test must not leave its tasks behind
        for task in (h.transfer.task, h.follower, h.transfer.fence_task):
            if task is not None and not task.done():
                task.cancel()
        for worker in h.env.running:
            if not worker.done():
                worker.set_result(None)
        tasks = [t for t in (h.transfer.task, h.follower, h.transfer.fence_task) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def assert_clean_end(h: Harness) -> None:
    """The request ended and left nothing behind: no source block held, the live table told once."""
    assert h.env.src_used == 0
    assert h.env.src_quarantined == 0
    assert h.env.finished == [h.transfer]
    assert not h.transfer.writes_may_land


# ------------------------------------------------------------------ rounds


@pytest.mark.parametrize("order", ["init-then-encode", "encode-then-init"])
async def test_one_round(harness, order):
    h = await harness()
    assert h.status.state == S.BOOTSTRAPPING
    if order == "init-then-encode":
        h.init(0, blocks(0, 3))
        assert h.status.state == S.WAITING_FOR_INPUT
        h.encode(10)
    else:
        h.encode(10)
        await h.settle()
        assert h.status.state == S.BOOTSTRAPPING and not h.env.writes  # no Init yet
        h.init(0, blocks(0, 3))
    await h.ended()

    assert h.states == [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.SUCCESS]
    final = h.statuses[-1]
    assert (final.sent_tokens, final.total_tokens, final.round, final.round_tokens) == (
        10,
        10,
        1,
        10,
    )
    assert final.reason == R.UNSPECIFIED and not final.writes_may_land
    assert [w.session for w in h.env.writes] == [session_of(0)]
    assert h.env.writes[0].tokens == 10
    assert h.env.writes[0].dst_blocks(0) <= set(blocks(0, 3))
    assert (h.transfer.state, h.transfer.rounds, h.transfer.sent_tokens) == (S.SUCCESS, 1, 10)
    assert h.env.telemetry.ended == [(S.SUCCESS, R.UNSPECIFIED, 1)]
    assert h.env.telemetry.bytes == 10 * RECORD.payload_bytes_per_token
    assert_clean_end(h)


@pytest.mark.parametrize(
    ("total", "allocations", "round_tokens"),
    [
        (10, [2, 1], [8, 2]),  # blocks per Init/Resume -> tokens per round
        (20, [2, 1, 2], [8, 4, 8]),
        (13, [1, 1, 1, 1], [4, 4, 4, 1]),
        (16, [1, 4], [4, 12]),  # the last allocation may be larger than what is left
    ],
    ids=[
        "two-rounds",
        "three-rounds-varying-allocations",
        "four-rounds",
        "last-allocation-too-big",
    ],
)
async def test_several_rounds_via_resume(harness, total, allocations, round_tokens):
    h = await harness()
    h.encode(total)
    h.init(0, blocks(0, allocations[0]))
    sent = 0
    for i, n in enumerate(round_tokens):
        sent += n
        await h.round_done(sent)
        await h.settle()
        last = i == len(round_tokens) - 1
        assert h.status.state == (S.SUCCESS if last else S.TRANSFERRING)
        assert (h.status.sent_tokens, h.status.round, h.status.round_tokens) == (sent, i + 1, n)
        assert len(h.env.writes) == i + 1, "a round waits for its Resume"
        assert h.env.writes[i].tokens == n
        if not last:
            next_blocks = blocks(8 * (i + 1), allocations[i + 1])
            assert h.resume(0, sent, next_blocks) is False
    await h.ended()

    assert h.states[:2] == [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT]
    assert h.states[2:] == [S.TRANSFERRING] * (len(round_tokens) - 1) + [S.SUCCESS]
    assert [s.sent_tokens for s in h.statuses[2:]] == [
        sum(round_tokens[: i + 1]) for i in range(len(round_tokens))
    ]
    # each round writes into the blocks given for it (its Init's or its Resume's)
    for i, write in enumerate(h.env.writes):
        given = blocks(0, allocations[0]) if i == 0 else blocks(8 * i, allocations[i])
        assert write.dst_blocks(0) <= set(given)
    assert h.env.telemetry.resumes == len(round_tokens) - 1
    assert h.env.telemetry.ended == [(S.SUCCESS, R.UNSPECIFIED, len(round_tokens))]
    assert_clean_end(h)


def written_tokens(write: Write, rank: int, first_block: int) -> set[int]:
    """Round-relative tokens a write puts into `rank`'s blocks first_block, first_block + 1, ..."""
    base = (rank + 1) << 32
    out: set[int] = set()
    for _src, dst, length in write.triples:
        first = (dst - base) // RECORD.record_bytes - first_block * DST_BLOCK
        out.update(range(first, first + length // RECORD.record_bytes))
    return out


IMAGES = (
    ImageSpan(0, 4, 8, "a" * 64, (3, 3, 3)),
    ImageSpan(1, 16, 4, "b" * 64, (9, 9, 9)),
)


async def test_rows_every_rank_holds_are_not_written_and_the_statuses_say_so(harness):
    h = await harness(rank_count=2)
    h.encode(24, images=IMAGES)
    h.init(0, blocks(0, 6), held=frozenset({"a" * 64, "b" * 64}))
    h.init(1, blocks(0, 6), held=frozenset({"a" * 64}))  # rank 1 does not hold image 1
    await h.ended()
    # Image 0 is held by both ranks: not written to either. Image 1 only by rank 0: to both.
    assert [s.reused for s in h.statuses[-1].images] == [True, False]
    assert h.statuses[-1].images[0].first_position == (3, 3, 3)
    for rank in (0, 1):
        [write] = [w for w in h.env.writes if w.session == session_of(rank)]
        assert written_tokens(write, rank, 0) == set(range(24)) - set(range(4, 12))
    assert h.env.telemetry.bytes == 2 * 16 * RECORD.payload_bytes_per_token
    assert_clean_end(h)


async def test_reused_rows_across_rounds_are_skipped_in_each(harness):
    h = await harness()
    span = ImageSpan(0, 6, 12, "c" * 64, (0, 0, 0))  # tokens 6..17: rounds [0, 8) [8, 16) [16, 24)
    h.encode(24, images=(span,))
    h.init(0, blocks(0, 2), held=frozenset({"c" * 64}))
    for sent in (8, 16):
        await h.round_done(sent)
        assert h.resume(0, sent, blocks(sent, 2)) is False
    await h.ended()
    # Round 1 writes its tokens 0..5, round 2 is all reused rows (no write), round 3 its 2..7.
    first, last = h.env.writes
    assert written_tokens(first, 0, 0) == set(range(6))
    assert written_tokens(last, 0, 16) == set(range(2, 8))
    assert h.status.round == 3
    await h.ended()
    assert h.statuses[-1].images == (dataclasses.replace(span, reused=True),)
    assert_clean_end(h)


async def test_every_rank_gets_every_round_sized_by_the_smallest_allocation(harness):
    h = await harness(rank_count=2)
    h.encode(24)
    h.init(0, blocks(0, 2))  # 8 tokens
    await h.settle()
    assert h.status.state == S.BOOTSTRAPPING and not h.env.writes  # rank 1 has not sent Init
    h.init(1, blocks(0, 4))  # 16 tokens
    await h.round_done(8)
    assert sorted(w.session for w in h.env.writes) == [session_of(0), session_of(1)]
    assert all(w.tokens == 8 for w in h.env.writes)

    assert h.resume(1, 8, blocks(10, 4)) is False
    await h.settle()
    assert len(h.env.writes) == 2, "the next round waits for every rank's Resume"
    assert h.status.state == S.TRANSFERRING
    assert h.resume(0, 8, blocks(20, 4)) is False
    await h.ended()

    assert h.states == [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING, S.SUCCESS]
    round_two = h.env.writes[2:]
    assert sorted(w.session for w in round_two) == [session_of(0), session_of(1)]
    assert all(w.tokens == 16 for w in round_two)
    by_session = {w.session: w for w in round_two}
    assert by_session[session_of(0)].dst_blocks(0) <= set(blocks(20, 4))
    assert by_session[session_of(1)].dst_blocks(1) <= set(blocks(10, 4))
    assert h.env.telemetry.bytes == 2 * 24 * RECORD.payload_bytes_per_token
    assert_clean_end(h)


async def test_a_round_in_parts_publishes_what_landed(harness):
    """A rank that asks for progress every 6 tokens gets the round in parts of 8 (whole blocks),
    and a status after each part but the last."""
    h = await harness(FakeEnv(integrity=True))
    h.init(0, blocks(0, 5), progress_tokens=6)  # 20 tokens
    h.encode(20, sums=FakePayloadSums())
    await h.ended()

    assert [w.tokens for w in h.env.writes] == [8, 8, 4]
    progress = [s for s in h.statuses if s.landed_tokens]
    assert [s.landed_tokens for s in progress] == [8, 16]
    assert all(s.sent_tokens == 0 and s.round == 0 for s in progress), "the round is not over"
    assert [s.landed_checksums for s in progress] == [
        (("embeddings", fake_checksum(0, 8)),),
        (("embeddings", fake_checksum(0, 16)),),
    ]
    assert h.statuses[-1].state == S.SUCCESS
    assert h.statuses[-1].checksums == (("embeddings", fake_checksum(0, 20)),)
    assert h.env.checksum_calls == []  # the sums answered: no pass over the payload
    assert_clean_end(h)


# ------------------------------------------------------------------ integrity checksums


async def test_each_rounds_checksums_are_computed_when_encode_gave_none(harness):
    h = await harness(FakeEnv(integrity=True))
    h.init(0, blocks(0, 2))
    h.encode(12)
    await h.round_done(8)
    h.resume(0, 8, blocks(4, 1))
    await h.ended()

    assert h.env.checksum_calls == [(tuple(h.src), 0, 8), (tuple(h.src), 8, 4)]
    rounds = [s for s in h.statuses if s.state in (S.TRANSFERRING, S.SUCCESS)]
    assert [s.checksums for s in rounds] == [
        (("embeddings", fake_checksum(0, 8)),),
        (("embeddings", fake_checksum(8, 4)),),
    ]


async def test_a_one_round_payload_uses_the_checksums_from_encode(harness):
    h = await harness(FakeEnv(integrity=True))
    h.init(0, blocks(0, 4))
    h.encode(12, checksums=(("embeddings", 42),))
    await h.ended()
    assert h.env.checksum_calls == []
    assert h.statuses[-1].checksums == (("embeddings", 42),)


async def test_without_integrity_no_checksums_are_sent(harness):
    h = await harness(FakeEnv(integrity=False))
    h.init(0, blocks(0, 4))
    h.encode(12, checksums=(("embeddings", 42),))
    await h.ended()
    assert h.env.checksum_calls == []
    assert h.statuses[-1].checksums == ()


# ------------------------------------------------------------------ Resume


async def test_a_duplicate_or_stale_resume_is_a_noop(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(24)
    assert h.resume(0, 0, blocks(0, 2)) is True  # repeats the Init's allocation
    await h.round_done(8)

    assert h.resume(0, 8, blocks(4, 2)) is False
    assert h.resume(0, 8, blocks(10, 2)) is True  # the same Resume again: ignored
    await h.round_done(16)
    await h.settle()
    assert len(h.env.writes) == 2
    assert h.env.writes[1].dst_blocks(0) <= set(blocks(4, 2)), "the first Resume's blocks"
    assert h.resume(0, 8, blocks(10, 2)) is True  # stale: that round is over
    await h.settle()
    assert len(h.env.writes) == 2 and h.status.state == S.TRANSFERRING

    assert h.resume(0, 16, blocks(12, 2)) is False
    await h.ended()
    assert len(h.env.writes) == 3
    assert h.states == [
        S.BOOTSTRAPPING,
        S.WAITING_FOR_INPUT,
        S.TRANSFERRING,
        S.TRANSFERRING,
        S.SUCCESS,
    ]
    assert h.env.telemetry.resumes == 2


@pytest.mark.parametrize(
    ("rank", "sent_tokens", "dst", "allocated_tokens", "error", "message"),
    [
        (1, 8, blocks(4, 2), 8, FailedPrecondition, "rank 1 never sent Init"),
        (0, 12, blocks(4, 2), 8, FailedPrecondition, "is ahead of the 8 tokens"),
        (0, 8, [], 0, InvalidArgument, "dst_blocks is empty"),
        (0, 8, blocks(4, 2), 4, InvalidArgument, "allocated_tokens=4 must equal"),
        (0, 8, [4, 4], 8, InvalidArgument, "appears more than once"),
        (0, 8, [4, DST_BLOCKS], 8, InvalidArgument, f"dst block id {DST_BLOCKS} is out of range"),
        (
            0,
            8,
            blocks(0, DST_BLOCKS + 1),
            (DST_BLOCKS + 1) * DST_BLOCK,
            InvalidArgument,
            "for a pool of",
        ),
    ],
    ids=[
        "rank-without-init",
        "ahead-of-the-encoder",
        "no-blocks",
        "tokens-not-blocks",
        "block-twice",
        "block-out-of-range",
        "more-blocks-than-the-pool",
    ],
)
async def test_a_resume_that_does_not_fit_is_refused_and_changes_nothing(
    harness, rank, sent_tokens, dst, allocated_tokens, error, message
):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    with pytest.raises(error, match=message):
        h.transfer.resume(rank, sent_tokens, dst, allocated_tokens)
    await h.settle()
    assert h.status.state == S.TRANSFERRING and len(h.env.writes) == 1
    assert h.resume(0, 8, blocks(4, 2)) is False  # a good Resume still goes through
    await h.ended()
    assert h.status.state == S.SUCCESS


async def test_a_resume_after_the_end_is_refused(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(8)
    await h.ended()
    with pytest.raises(FailedPrecondition, match="already ended"):
        h.resume(0, 8, blocks(4, 2))


# ------------------------------------------------------------------ Init refusals


async def test_init_refusals(harness):
    h = await harness(rank_count=2)
    h.init(0, blocks(0, 2))
    with pytest.raises(AlreadyExists, match="rank 0 has already sent Init"):
        h.init(0, blocks(4, 2))
    with pytest.raises(InvalidArgument, match="rank_count=3 differs"):
        h.transfer.add_rank(1, 3, peer(1), blocks(0, 2), 8)
    with pytest.raises(PermissionDenied, match="belongs to another language instance"):
        h.transfer.add_rank(1, 2, peer(1, language_id="other"), blocks(0, 2), 8)
    assert sorted(h.transfer.ranks) == [0]
    await h.transfer.cancel("test over")
    with pytest.raises(FailedPrecondition, match="already ended"):
        h.init(1, blocks(0, 2))


async def test_a_second_encode_is_refused(harness):
    h = await harness()
    h.encode(8)
    with pytest.raises(AlreadyExists, match="already encoded"):
        h.begin_encode()


# ------------------------------------------------------------------ cancel


async def test_cancel_between_rounds(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    assert await h.transfer.cancel("the client gave up") is True
    await h.ended()

    assert h.states == [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING, S.FAILED]
    final = h.statuses[-1]
    assert final.reason == R.CANCELLED and final.message == "the client gave up"
    assert not final.writes_may_land
    assert len(h.env.writes) == 1
    assert h.env.telemetry.ended == [(S.FAILED, R.CANCELLED, 1)]
    assert_clean_end(h)
    assert await h.transfer.cancel("again") is False  # already ended
    with pytest.raises(FailedPrecondition, match="already ended"):
        h.resume(0, 8, blocks(4, 2))


async def test_cancel_with_another_reason(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    assert await h.transfer.cancel("rank 0 found a mismatch", R.INTEGRITY) is True
    await h.ended()
    assert h.statuses[-1].reason == R.INTEGRITY
    assert h.env.telemetry.integrity_failures == 1
    assert_clean_end(h)


async def test_cancel_waits_for_the_write_in_flight(harness):
    env = FakeEnv()
    env.gate = asyncio.Event()
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.until(lambda: env.writes, "the first write")
    cancel = asyncio.get_running_loop().create_task(h.transfer.cancel("stop"))
    await h.settle()
    assert not cancel.done(), "cancel answered while a write was in flight"
    assert h.status.state == S.WAITING_FOR_INPUT
    env.gate.set()
    assert await asyncio.wait_for(cancel, WAIT_S) is True
    await h.ended()
    assert h.statuses[-1].state == S.FAILED and h.statuses[-1].reason == R.CANCELLED
    assert len(env.writes) == 1, "no round after the cancel"
    assert_clean_end(h)


async def test_cancel_of_a_live_transfer_is_not_reported_as_already_ended(harness):
    """`cancel` is documented to answer False only when the request had ended already (and
    CancelReply.cancelled: "false when the transfer had already ended")."""
    env = FakeEnv()
    env.gate = asyncio.Event()
    env.faults[0] = TransportError("mooncake write returned -1")
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.until(lambda: env.writes, "the first write")
    assert not h.status.state.terminal
    cancel = asyncio.get_running_loop().create_task(h.transfer.cancel("stop"))
    await h.settle()
    env.gate.set()  # the write in flight fails while the cancel waits for it
    answered = await asyncio.wait_for(cancel, WAIT_S)
    await h.ended()
    assert h.statuses[-1].state == S.FAILED
    assert answered is True


async def test_cancel_before_anything_arrived(harness):
    h = await harness()
    assert await h.transfer.cancel("never mind") is True
    await h.ended()
    assert h.states == [S.BOOTSTRAPPING, S.FAILED]
    assert h.env.writes == []
    assert h.env.finished == [h.transfer]


async def test_a_payload_arriving_after_a_cancel_goes_back_to_its_caller(harness):
    """Cancel during Encode waits until the Encode handed its blocks back; attach_payload says
    the transfer ended (False) and the caller keeps the blocks to free."""
    h = await harness()
    h.init(0, blocks(0, 2))
    h.begin_encode()
    cancel = asyncio.get_running_loop().create_task(h.transfer.cancel("stop"))
    await h.until(lambda: h.status.state == S.FAILED, "FAILED")
    await h.settle()
    assert not cancel.done(), "cancel answered while Encode still filled source blocks"
    assert h.attach(8) is False
    assert await asyncio.wait_for(cancel, WAIT_S) is True
    assert h.env.src_used == len(h.src)  # the caller's to free
    h.env.pool.allocator.free(h.src)
    assert h.env.writes == []


async def test_the_task_cancelled_at_shutdown_fails_the_request(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    h.transfer.task.cancel()
    await h.ended()
    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == R.CANCELLED
    assert final.message == "encoder shutting down"
    assert_clean_end(h)


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TransportError("mooncake write returned -1"), R.TRANSPORT),
        (RuntimeError("engine exploded"), R.TRANSPORT),
        (Internal("no reason of its own"), R.TRANSPORT),
        (Unavailable("peer went away"), R.PEER_LOST),
        (EpdError("write too slow", reason=R.TIMEOUT), R.TIMEOUT),
    ],
    ids=["transport-error", "any-exception", "error-without-reason", "peer-lost", "own-reason"],
)
@pytest.mark.parametrize("failing_round", [1, 2])
async def test_a_failed_write_fails_the_request(harness, error, reason, failing_round):
    env = FakeEnv()
    env.faults[failing_round - 1] = error
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(16)
    if failing_round == 2:
        await h.round_done(8)
        h.resume(0, 8, blocks(4, 2))
    await h.ended()

    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == reason
    assert f"round {failing_round} write failed" in final.message
    assert not final.writes_may_land
    assert final.sent_tokens == 8 * (failing_round - 1)
    expected_states = [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT] + [S.TRANSFERRING] * (
        failing_round - 1
    )
    assert h.states == expected_states + [S.FAILED]
    assert h.env.telemetry.ended == [(S.FAILED, reason, failing_round - 1)]
    assert_clean_end(h)


async def test_a_write_failing_to_one_rank_fails_every_rank(harness):
    env = FakeEnv()
    env.faults[1] = TransportError("rank 1 unreachable")
    h = await harness(env, rank_count=2)
    h.init(0, blocks(0, 2))
    h.init(1, blocks(0, 2))
    h.encode(8)
    await h.ended()
    assert len(env.writes) == 2  # both ranks' writes were submitted and waited for
    assert h.statuses[-1].state == S.FAILED and h.statuses[-1].reason == R.TRANSPORT
    assert_clean_end(h)


async def test_a_misplanned_round_is_refused_before_any_write(harness, monkeypatch):
    """A planner bug (here: every piece aimed one pool further on) must never reach a write."""
    slab = DST_BLOCKS * DST_BLOCK * RECORD.record_bytes
    plan_round = transfer_module.plan_round

    def misplanned_round(**kw):
        return [(src, dst + slab, n) for src, dst, n in plan_round(**kw)]

    monkeypatch.setattr(transfer_module, "plan_round", misplanned_round)
    env = FakeEnv()
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(8)
    await h.ended()
    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == R.INVALID
    assert "refused before any write" in final.message
    assert env.writes == []
    assert_clean_end(h)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ResourceExhausted("no source blocks"), R.RESOURCE_EXHAUSTED),
        (InvalidArgument("bad image"), R.INVALID),
    ],
    ids=["resource-exhausted", "invalid"],
)
async def test_a_failed_encode_fails_the_request(harness, error, reason):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.begin_encode()
    h.transfer.encode_failed(error)
    await h.ended()
    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == reason
    assert final.message == f"Encode failed: {error.message}"
    assert h.env.writes == []
    assert h.env.finished == [h.transfer]


# ------------------------------------------------------------------ deadlines


@pytest.mark.parametrize(
    ("arrives", "message"),
    [
        ("encode-only", "no Init from every data rank within bootstrap_timeout_s=0.05"),
        ("init-only", "no Encode within bootstrap_timeout_s=0.05"),
        ("nothing", "no Init from every data rank"),
    ],
    ids=["encode-only", "init-only", "nothing"],
)
async def test_bootstrap_deadline(harness, arrives, message):
    h = await harness(FakeEnv(bootstrap_timeout_s=0.05))
    if arrives == "encode-only":
        h.encode(8)
    elif arrives == "init-only":
        h.init(0, blocks(0, 2))
    await h.ended()
    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == R.TIMEOUT
    assert message in final.message
    assert h.env.writes == []
    assert_clean_end(h)


async def test_an_encode_in_progress_suspends_the_bootstrap_deadline(harness):
    h = await harness(FakeEnv(bootstrap_timeout_s=0.05))
    h.init(0, blocks(0, 2))
    h.begin_encode()
    await asyncio.sleep(0.1)
    assert h.status.state == S.WAITING_FOR_INPUT
    assert h.attach(8)
    await h.ended()
    assert h.states[-1] == S.SUCCESS


async def test_resume_deadline_names_the_ranks_that_did_not_resume(harness):
    h = await harness(FakeEnv(resume_timeout_s=0.05), rank_count=3)
    for rank in range(3):
        h.init(rank, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    h.resume(1, 8, blocks(4, 2))
    await h.ended()
    final = h.statuses[-1]
    assert final.state == S.FAILED and final.reason == R.TIMEOUT
    assert "no Resume from rank(s) [0, 2] within resume_timeout_s=0.05" in final.message
    assert len(h.env.writes) == 3
    assert_clean_end(h)


# ------------------------------------------------------------------ the write fence


def in_flight_failure() -> tuple[TransportError, LateWrites]:
    """A write that gave up at its deadline with one piece still running."""
    late = LateWrites(pieces=1, nbytes=4096, session=session_of(0))
    return TransportError("write timed out", in_flight=late), late


async def test_a_write_that_may_still_land_holds_the_source_blocks_until_it_is_final(harness):
    env = FakeEnv()
    env.faults[0], late = in_flight_failure()
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(8)
    await asyncio.wait_for(h.transfer.done.wait(), WAIT_S)

    assert h.status.state == S.FAILED and h.status.reason == R.TRANSPORT
    assert h.status.writes_may_land
    assert h.transfer.writes_may_land
    assert env.src_quarantined == len(h.src) and env.src_used == 0
    assert h.transfer.quarantined_blocks == h.src
    assert env.finished == [], "still in the live table while a write may land"
    assert not h.follower.done(), "the status stream stays open"
    assert env.telemetry.fenced == 1

    late.piece_final(True)
    await h.ended()
    assert h.states == [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.FAILED, S.FAILED]
    assert [s.writes_may_land for s in h.statuses[2:]] == [True, False]
    assert h.statuses[-1].reason == R.TRANSPORT
    assert env.telemetry.fence_releases == 1
    assert h.transfer.quarantined_blocks == []
    assert_clean_end(h)


async def test_source_blocks_come_back_after_quarantine_max_s_even_if_never_final(harness):
    env = FakeEnv(quarantine_max_s=0.05)
    env.faults[0], _late = in_flight_failure()
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(8)
    await h.ended()
    # The stream ends still saying a write may land: nobody knows that it stopped.
    assert [s.writes_may_land for s in h.statuses[2:]] == [True, True]
    assert env.src_quarantined == 0 and env.src_used == 0
    assert env.finished == [h.transfer]


async def test_a_write_still_running_at_shutdown_keeps_its_blocks_fenced(harness):
    env = FakeEnv()
    env.gate = asyncio.Event()  # the write never returns by itself
    h = await harness(env)
    h.init(0, blocks(0, 2))
    h.encode(8)
    await h.until(lambda: env.writes, "the write")
    h.transfer.task.cancel()
    await asyncio.wait_for(h.transfer.done.wait(), WAIT_S)
    assert h.status.state == S.FAILED and h.status.writes_may_land
    assert env.src_quarantined == len(h.src)

    for worker in env.running:  # the engine reports the write final
        worker.set_result(None)
    await h.ended()
    assert not h.statuses[-1].writes_may_land
    assert_clean_end(h)


# ------------------------------------------------------------------ the status feed


async def test_a_late_subscriber_sees_the_current_status_first(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(16)
    await h.round_done(8)
    late_reader = h.transfer.statuses()
    first = await asyncio.wait_for(anext(late_reader), WAIT_S)
    assert first.state == S.TRANSFERRING and first.sent_tokens == 8
    h.resume(0, 8, blocks(4, 2))
    rest = [s async for s in late_reader]
    assert [s.state for s in rest] == [S.SUCCESS]
    await h.ended()


async def test_the_status_stream_ends_at_a_terminal_status(harness):
    h = await harness()
    h.init(0, blocks(0, 2))
    h.encode(8)
    await h.ended()
    after_the_end = [s async for s in h.transfer.statuses()]
    assert [s.state for s in after_the_end] == [S.SUCCESS]
