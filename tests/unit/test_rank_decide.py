"""The agreement rule of a language instance's TP ranks: `services.language.rank_group.decide`.

Every rank contributes one `RankRow` per open request; `decide` turns the rows of one request
into the outcome every rank applies. The rule, as the module documents it:

- any rank failed            -> FAIL on every rank, reason: the largest failure code;
- every rank ready, no fail  -> DELIVER on every rank;
- otherwise                  -> undecided (None), look again at the next step.

A rank whose view lags or repeats only delays the decision, it cannot change it; so the
outcome does not depend on which rank reported what first. A dummy rank (one that receives no
payload) reports itself ready with a total of 0, so the agreed total is the payload size the
data ranks report. The expectations below are written from that rule, never computed with
`decide`. The one-rank `LocalGroup`, which applies the same rule to its own view, is checked at
the end.
"""

from __future__ import annotations

import hashlib
import itertools
import time

import pytest

from common.errors import Unavailable
from common.states import FailureReason, TransferState
from services.language.rank_group import Decision, LocalGroup, RankRow, decide

R = FailureReason
PAYLOAD_TOKENS = 12_000
DIGEST_A = hashlib.sha256(b"payload a").digest()
DIGEST_B = hashlib.sha256(b"payload b").digest()


def ready(total: int = PAYLOAD_TOKENS, digest: bytes = b"") -> RankRow:
    """A data rank that holds the whole payload."""
    return RankRow(
        total=total,
        sent=total,
        not_ready=0,
        state=int(TransferState.SUCCESS),
        rounds=1,
        digest=digest,
    )


def dummy() -> RankRow:
    """A dummy rank: receives nothing, ready at once, knows no total."""
    return RankRow(not_ready=0, state=int(TransferState.SUCCESS))


def receiving(sent: int = 4096, total: int = PAYLOAD_TOKENS) -> RankRow:
    """A data rank still receiving (or whose status stream lags)."""
    return RankRow(
        total=total, sent=sent, not_ready=1, state=int(TransferState.TRANSFERRING), rounds=1
    )


def failed(reason: FailureReason, total: int = PAYLOAD_TOKENS) -> RankRow:
    """A data rank whose receive failed."""
    return RankRow(total=total, failed=int(reason), not_ready=1, state=int(TransferState.FAILED))


UNDECIDED = None
DELIVER = "deliver"

# (id, rows in rank order, expected: UNDECIDED, DELIVER or the failure reason, expected total)
CASES = [
    # every rank ready, none failed: deliver
    ("one-rank-ready", [ready()], DELIVER, PAYLOAD_TOKENS),
    ("three-ranks-ready", [ready(), ready(), ready()], DELIVER, PAYLOAD_TOKENS),
    ("data-rank-and-dummy-ready", [ready(), dummy()], DELIVER, PAYLOAD_TOKENS),
    ("dummy-rank-0-then-data-ranks", [dummy(), ready(), ready()], DELIVER, PAYLOAD_TOKENS),
    ("ready-with-equal-digests", [ready(digest=DIGEST_A), ready(digest=DIGEST_A)], DELIVER, None),
    # nobody failed, someone not ready: undecided
    ("fresh-rows-nobody-reported", [RankRow(), RankRow()], UNDECIDED, None),
    ("one-rank-receiving", [receiving()], UNDECIDED, None),
    ("one-of-three-lags", [ready(), ready(), receiving()], UNDECIDED, None),
    ("rank-0-lags-others-ready", [receiving(), ready(), dummy()], UNDECIDED, None),
    ("dummy-ready-data-rank-receiving", [dummy(), receiving()], UNDECIDED, None),
    (
        "all-tokens-sent-but-not-reported-ready",
        [ready(), receiving(sent=PAYLOAD_TOKENS)],
        UNDECIDED,
        None,
    ),
    ("nobody-ready", [receiving(), receiving(sent=0)], UNDECIDED, None),
    # any rank failed: fail everywhere, at once, with the largest reason code
    ("one-rank-failed", [failed(R.TRANSPORT)], R.TRANSPORT, PAYLOAD_TOKENS),
    ("failed-while-others-ready", [ready(), failed(R.INTEGRITY), ready()], R.INTEGRITY, None),
    ("failed-while-others-receiving", [receiving(), failed(R.TIMEOUT)], R.TIMEOUT, None),
    ("failed-beside-dummy", [failed(R.CANCELLED), dummy()], R.CANCELLED, PAYLOAD_TOKENS),
    ("every-rank-same-reason", [failed(R.TRANSPORT), failed(R.TRANSPORT)], R.TRANSPORT, None),
    ("timeout-and-peer-lost", [failed(R.TIMEOUT), failed(R.PEER_LOST)], R.PEER_LOST, None),
    ("peer-lost-and-timeout", [failed(R.PEER_LOST), failed(R.TIMEOUT)], R.PEER_LOST, None),
    ("cancelled-and-integrity", [failed(R.CANCELLED), failed(R.INTEGRITY)], R.INTEGRITY, None),
    (
        "invalid-is-the-largest-code",
        [failed(R.RESOURCE_EXHAUSTED), failed(R.INVALID), failed(R.TRANSPORT)],
        R.INVALID,
        None,
    ),
    (
        "three-reasons-and-a-ready-rank",
        [failed(R.TIMEOUT), ready(), failed(R.RESOURCE_EXHAUSTED), failed(R.CANCELLED)],
        R.RESOURCE_EXHAUSTED,
        None,
    ),
    (
        "failed-before-the-total-was-known",
        [failed(R.TIMEOUT, total=0), receiving(sent=0, total=0)],
        R.TIMEOUT,
        0,
    ),
    (
        "failed-and-marked-ready-still-fails",
        [ready(), RankRow(total=PAYLOAD_TOKENS, failed=int(R.TRANSPORT), not_ready=0)],
        R.TRANSPORT,
        PAYLOAD_TOKENS,
    ),
]


def check(decision: Decision | None, expected, expected_total: int | None) -> None:
    if expected is UNDECIDED:
        assert decision is None
        return
    assert isinstance(decision, Decision)
    if expected == DELIVER:
        assert decision.deliver is True
        assert decision.reason == FailureReason.UNSPECIFIED
    else:
        assert decision.deliver is False
        assert decision.reason == expected
        assert isinstance(decision.reason, FailureReason)
    if expected_total is not None:
        assert decision.total == expected_total


@pytest.mark.parametrize(
    ("rows", "expected", "expected_total"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rule(rows, expected, expected_total):
    check(decide(rows), expected, expected_total)


@pytest.mark.parametrize(
    ("rows", "expected", "expected_total"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_order_of_the_ranks_does_not_change_the_outcome(rows, expected, expected_total):
    for order in itertools.permutations(rows):
        check(decide(list(order)), expected, expected_total)


@pytest.mark.parametrize(
    ("rows", "expected", "expected_total"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_tuple_of_rows_decides_like_a_list(rows, expected, expected_total):
    check(decide(tuple(rows)), expected, expected_total)


def test_the_decision_keeps_every_ranks_row_in_rank_order():
    rows = [ready(digest=DIGEST_A), dummy(), ready(digest=DIGEST_A)]
    decision = decide(rows)
    assert decision is not None
    assert decision.rows == (rows[0], rows[1], rows[2])
    assert isinstance(decision.rows, tuple)


@pytest.mark.parametrize(
    "rows",
    [[ready(), ready()], [ready(), failed(R.TRANSPORT)]],
    ids=["deliver", "fail"],
)
def test_the_decision_is_stamped_with_the_monotonic_clock_when_taken(rows):
    before = time.monotonic()
    decision = decide(rows)
    after = time.monotonic()
    assert before <= decision.decided_at <= after


def test_the_rows_given_are_not_modified():
    rows = [ready(), failed(R.TIMEOUT)]
    snapshot = list(rows)
    decide(rows)
    assert rows == snapshot


def test_a_lagging_rank_only_delays_the_decision():
    """Step by step, as the collective would see it: rank 1's status lags behind rank 0's."""
    steps = [
        [receiving(sent=0), RankRow()],
        [receiving(sent=8192), receiving(sent=0)],
        [ready(), receiving(sent=8192)],
        [ready(), receiving(sent=8192)],  # rank 1 repeats itself: still undecided
        [ready(), ready()],
    ]
    outcomes = [decide(rows) for rows in steps]
    assert outcomes[:4] == [None, None, None, None]
    check(outcomes[4], DELIVER, PAYLOAD_TOKENS)


def test_a_failure_is_decided_at_the_first_step_that_shows_it():
    steps = [
        [receiving(sent=0), receiving(sent=0), receiving(sent=0)],
        [receiving(), failed(R.TRANSPORT), receiving(sent=0)],
    ]
    assert decide(steps[0]) is None
    check(decide(steps[1]), R.TRANSPORT, PAYLOAD_TOKENS)


def test_the_same_rows_give_the_same_outcome_every_time():
    rows = [ready(), failed(R.CANCELLED), failed(R.PEER_LOST)]
    first, second = decide(rows), decide(list(rows))
    assert (first.deliver, first.reason, first.total, first.rows) == (
        second.deliver,
        second.reason,
        second.total,
        second.rows,
    )


@pytest.mark.parametrize(
    "rows",
    [
        [ready(digest=DIGEST_A), ready(digest=DIGEST_B)],
        [ready(total=PAYLOAD_TOKENS), ready(total=PAYLOAD_TOKENS - 4)],
    ],
    ids=["digests-differ", "totals-differ"],
)
def test_disagreeing_payloads_are_not_decide_s_concern(rows):
    """The rule looks at `failed` and `not_ready` only: data ranks that report different digests
    or totals are still delivered. Comparing what each data rank holds is left to whoever reads
    the rows kept in the decision (GenerateReply.ranks shows each data rank's digest)."""
    decision = decide(rows)
    assert decision is not None and decision.deliver
    assert decision.rows == tuple(rows)


# ------------------------------------------------------------------ the one-rank group


class Callbacks:
    """What the service binds to a rank group: records the admissions and the break."""

    def __init__(self):
        self.admitted: list[str] = []
        self.broken: list[str] = []

    def on_admit(self, spec) -> None:
        self.admitted.append(spec.request_id)

    def on_broken(self, why: str) -> None:
        self.broken.append(why)


async def bound_local_group() -> tuple[LocalGroup, Callbacks]:
    group = LocalGroup()
    callbacks = Callbacks()
    group.bind(callbacks.on_admit, callbacks.on_broken)
    return group, callbacks


async def test_local_group_decides_its_own_view_by_the_same_rule():
    group, callbacks = await bound_local_group()
    group.admit("delivered", 8192, want_digest=False)
    group.admit("failed", 8192, want_digest=False)
    group.admit("open", 8192, want_digest=False)
    assert callbacks.admitted == ["delivered", "failed", "open"]

    group.view("delivered").update(total=100, sent=100, not_ready=0)
    group.view("failed").update(failed=int(R.INTEGRITY))
    group.view("open").update(total=100, sent=50)
    group.changed()

    delivered = group.decision("delivered").result()
    assert delivered.deliver and delivered.total == 100
    failure = group.decision("failed").result()
    assert not failure.deliver and failure.reason == R.INTEGRITY
    assert not group.decision("open").done()


async def test_a_local_decision_is_taken_once():
    group, _ = await bound_local_group()
    group.admit("r", 8192, want_digest=False)
    group.view("r").update(total=10, sent=10, not_ready=0)
    group.changed()
    group.view("r").update(failed=int(R.TRANSPORT))  # too late: already delivered
    group.changed()
    assert group.decision("r").result().deliver


async def test_a_broken_group_fails_open_requests_with_peer_lost_and_admits_nothing():
    group, callbacks = await bound_local_group()
    group.admit("open", 8192, want_digest=False)
    group._break("rank 1: collective failed")
    decision = group.decision("open").result()
    assert not decision.deliver and decision.reason == R.PEER_LOST
    assert callbacks.broken == ["rank 1: collective failed"]
    with pytest.raises(Unavailable) as refused:
        group.admit("next", 8192, want_digest=False)
    assert refused.value.reason == R.PEER_LOST
