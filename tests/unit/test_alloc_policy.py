"""The language service's initial-reservation policies (`services/language/policy.py`).

How many tokens a rank reserves before the payload's size is known, per the module's rules:

- `fixed`: always `initial_tokens`;
- `hint`: the client's `expected_tokens` when given (> 0), else `initial_tokens`;
- `adaptive`: a high quantile (p90 by default) of the recent totals fed to `observe`, clamped to
  [min_tokens, max_tokens]; `initial_tokens` until enough history exists;
- `auto` (size-first): the size the encoder said when the pool can hold it, else
  `initial_tokens` (resume rounds bring the rest);
- every answer is clamped to the pool's capacity, so the first allocation can always succeed;
- `max_initial_tokens` is the largest answer `initial_tokens` can ever give.

The quantile is the nearest-rank one: the smallest observed total that at least 90% of the
recent totals do not exceed. Expected values are worked out by hand from these rules.
"""

from __future__ import annotations

import random

import pytest

from services.language.policy import AllocationPolicy

POOL = 256 * 64  # a pool of 256 blocks of 64 tokens
INITIAL = 8192
MIN = 1024
MAX = 12_288
HISTORY_NEEDED = 8
"""Totals `adaptive` needs before it trusts them (the module's "enough history")."""


def adaptive(
    *, initial: int = INITIAL, pool: int = POOL, min_tokens: int = MIN, max_tokens: int = MAX, **kw
) -> AllocationPolicy:
    return AllocationPolicy(
        "adaptive", initial, pool, min_tokens=min_tokens, max_tokens=max_tokens, **kw
    )


def fed(policy: AllocationPolicy, totals) -> AllocationPolicy:
    for total in totals:
        policy.observe(total)
    return policy


# ------------------------------------------------------------------ fixed and hint

FIXED_AND_HINT = [
    # (id, kind, initial_tokens, pool_tokens, expected_tokens, answer)
    ("fixed-initial", "fixed", INITIAL, POOL, 0, INITIAL),
    ("fixed-ignores-the-hint", "fixed", INITIAL, POOL, 3000, INITIAL),
    ("fixed-clamped-to-pool", "fixed", INITIAL, 4096, 0, 4096),
    ("fixed-initial-equal-to-pool", "fixed", POOL, POOL, 0, POOL),
    ("hint-given", "hint", INITIAL, POOL, 3000, 3000),
    ("hint-larger-than-initial", "hint", INITIAL, POOL, 15_000, 15_000),
    ("hint-of-one-token", "hint", INITIAL, POOL, 1, 1),
    ("hint-absent-uses-initial", "hint", INITIAL, POOL, 0, INITIAL),
    ("hint-negative-uses-initial", "hint", INITIAL, POOL, -5, INITIAL),
    ("hint-clamped-to-pool", "hint", INITIAL, POOL, POOL + 1, POOL),
    ("hint-absent-initial-clamped-to-pool", "hint", INITIAL, 2048, 0, 2048),
]


@pytest.mark.parametrize(
    ("kind", "initial", "pool", "expected_tokens", "answer"),
    [c[1:] for c in FIXED_AND_HINT],
    ids=[c[0] for c in FIXED_AND_HINT],
)
def test_fixed_and_hint(kind, initial, pool, expected_tokens, answer):
    policy = AllocationPolicy(kind, initial, pool)
    assert policy.initial_tokens(expected_tokens) == answer


@pytest.mark.parametrize("kind", ["fixed", "hint"])
def test_fixed_and_hint_do_not_learn(kind):
    policy = fed(AllocationPolicy(kind, INITIAL, POOL), [100] * 50)
    assert policy.initial_tokens() == INITIAL


def test_the_default_argument_is_no_hint():
    assert AllocationPolicy("hint", INITIAL, POOL).initial_tokens() == INITIAL


@pytest.mark.parametrize("kind", ["Fixed", "p90", "", "hints"])
def test_an_unknown_policy_is_refused_by_name(kind):
    with pytest.raises(ValueError, match=f"alloc_policy={kind!r}"):
        AllocationPolicy(kind, INITIAL, POOL)


# ------------------------------------------------------------------ adaptive

ADAPTIVE = [
    # (id, totals observed in order, answer)
    ("no-history-uses-initial", [], INITIAL),
    ("one-total-is-not-enough", [2000], INITIAL),
    ("seven-totals-are-not-enough", [2000] * 7, INITIAL),
    ("eight-equal-totals", [2000] * 8, 2000),
    # 8 totals: 90% of 8 is 7.2, so the 8th smallest (the largest)
    ("eight-totals-p90-is-the-largest", [1100, 1200, 1300, 1400, 1500, 1600, 1700, 5000], 5000),
    # 10 totals: the 9th smallest
    ("ten-totals-p90-is-the-ninth", [1000 + 100 * i for i in range(1, 11)], 1900),
    ("ten-totals-shuffled", [1500, 1900, 1100, 2000, 1300, 1700, 1200, 1800, 1400, 1600], 1900),
    # 20 totals 2001..2020 (step 1): the 18th smallest
    ("twenty-totals-p90-is-the-eighteenth", [2000 + i for i in range(1, 21)], 2018),
    # one outlier among 20 does not move p90
    ("one-outlier-in-twenty-is-ignored", [3000] * 19 + [12_000], 3000),
    # three outliers among 20 (15%) do
    ("three-outliers-in-twenty-count", [3000] * 17 + [9000] * 3, 9000),
    ("below-min-clamped-up", [100] * 10, MIN),
    ("above-max-clamped-down", [50_000] * 10, MAX),
    ("exactly-min", [MIN] * 10, MIN),
    ("exactly-max", [MAX] * 10, MAX),
    # p90 below the floor although initial_tokens (before history) was above it
    ("learns-smaller-than-initial", [2048] * 12, 2048),
    ("learns-larger-than-initial", [10_000] * 12, 10_000),
]


@pytest.mark.parametrize(
    ("totals", "answer"), [c[1:] for c in ADAPTIVE], ids=[c[0] for c in ADAPTIVE]
)
def test_adaptive_answer(totals, answer):
    policy = fed(adaptive(), totals)
    assert policy.initial_tokens() == answer


def test_adaptive_switches_from_initial_to_the_quantile_at_enough_history():
    policy = adaptive()
    answers = []
    for _ in range(HISTORY_NEEDED + 2):
        answers.append(policy.initial_tokens())
        policy.observe(3000)
    answers.append(policy.initial_tokens())
    assert answers == [INITIAL] * HISTORY_NEEDED + [3000] * 3


def test_adaptive_ignores_the_clients_hint():
    policy = adaptive()
    assert policy.initial_tokens(expected_tokens=5000) == INITIAL
    fed(policy, [2000] * 10)
    assert policy.initial_tokens(expected_tokens=5000) == 2000


def test_adaptive_follows_only_the_recent_window():
    policy = adaptive(window=10)
    fed(policy, [11_000] * 10)
    assert policy.initial_tokens() == 11_000
    fed(policy, [2000] * 9)  # one large total left in the last 10: p90 is the 9th smallest
    assert policy.initial_tokens() == 2000
    fed(policy, [2000])  # the large totals have all left the window
    assert policy.initial_tokens() == 2000
    fed(policy, [4000] * 2)  # two of the last 10: the 9th smallest is 4000
    assert policy.initial_tokens() == 4000


def test_adaptive_with_the_default_window_forgets_after_256_totals():
    policy = adaptive()
    fed(policy, [11_000] * 256)
    assert policy.initial_tokens() == 11_000
    fed(policy, [2000] * 230)  # 26 large left of 256: more than 10%
    assert policy.initial_tokens() == 11_000
    fed(policy, [2000] * 1)  # 25 large of 256 (9.8%): p90 is a small one
    assert policy.initial_tokens() == 2000


@pytest.mark.parametrize(
    ("quantile", "answer"),
    [(0.5, 1500), (0.75, 1800), (1.0, 2000), (0.1, 1100)],
    ids=["median", "p75", "max", "p10"],
)
def test_adaptive_quantile_setting(quantile, answer):
    # 10 totals 1100..2000: the nearest-rank q-quantile is the ceil(q * 10)-th smallest
    policy = fed(adaptive(quantile=quantile), [1000 + 100 * i for i in range(1, 11)])
    assert policy.initial_tokens() == answer


def test_adaptive_history_is_clamped_to_the_pool():
    policy = fed(adaptive(pool=4096, max_tokens=65_536), [10_000] * 10)
    assert policy.initial_tokens() == 4096


def test_adaptive_min_above_the_pool_is_clamped_to_the_pool():
    policy = fed(adaptive(pool=512, min_tokens=1024), [100] * 10)
    assert policy.initial_tokens() == 512


def test_adaptive_initial_above_the_pool_is_clamped_to_the_pool():
    assert adaptive(initial=POOL * 2).initial_tokens() == POOL


def test_adaptive_before_history_is_not_held_to_its_bounds():
    """`initial_tokens` until enough history exists: the [min, max] bounds are the adaptive
    answer's, not the start-up value's."""
    assert adaptive(initial=512, min_tokens=1024).initial_tokens() == 512
    assert adaptive(initial=20_000, max_tokens=12_288, pool=65_536).initial_tokens() == 20_000


def test_adaptive_tracks_a_shifting_workload():
    rng = random.Random(7)
    policy = adaptive(window=50)
    fed(policy, [rng.randint(1500, 2500) for _ in range(50)])
    small = policy.initial_tokens()
    assert 2200 <= small <= 2500
    fed(policy, [rng.randint(6000, 7000) for _ in range(50)])
    large = policy.initial_tokens()
    assert 6700 <= large <= 7000


def test_a_reservation_covers_at_least_90_percent_of_recent_requests():
    rng = random.Random(11)
    totals = [rng.randint(MIN, MAX) for _ in range(200)]
    policy = fed(adaptive(), totals)
    answer = policy.initial_tokens()
    covered = sum(1 for t in totals if t <= answer)
    assert covered >= 0.9 * len(totals)
    # and it is the smallest observed total that does so
    assert answer in totals
    assert sum(1 for t in totals if t < answer) < 0.9 * len(totals)


# ------------------------------------------------------------------ max_initial_tokens

MAX_INITIAL = [
    # (id, kind, initial, pool, min, max, answer)
    ("fixed-is-initial", "fixed", INITIAL, POOL, MIN, MAX, INITIAL),
    ("fixed-clamped-to-pool", "fixed", INITIAL, 4096, MIN, MAX, 4096),
    ("hint-can-ask-for-the-whole-pool", "hint", INITIAL, POOL, MIN, MAX, POOL),
    ("adaptive-max-above-initial", "adaptive", INITIAL, POOL, MIN, MAX, MAX),
    ("adaptive-initial-above-max", "adaptive", 14_000, POOL, MIN, MAX, 14_000),
    ("adaptive-clamped-to-pool", "adaptive", INITIAL, 4096, MIN, MAX, 4096),
]


@pytest.mark.parametrize(
    ("kind", "initial", "pool", "min_tokens", "max_tokens", "answer"),
    [c[1:] for c in MAX_INITIAL],
    ids=[c[0] for c in MAX_INITIAL],
)
def test_max_initial_tokens(kind, initial, pool, min_tokens, max_tokens, answer):
    policy = AllocationPolicy(kind, initial, pool, min_tokens=min_tokens, max_tokens=max_tokens)
    assert policy.max_initial_tokens() == answer


@pytest.mark.parametrize("kind", ["fixed", "hint", "adaptive"])
@pytest.mark.parametrize(
    ("initial", "pool"), [(INITIAL, POOL), (14_000, POOL), (INITIAL, 4096), (512, POOL)]
)
def test_no_answer_exceeds_max_initial_tokens_or_the_pool(kind, initial, pool):
    rng = random.Random(3)
    policy = AllocationPolicy(kind, initial, pool, min_tokens=MIN, max_tokens=MAX, window=16)
    bound = policy.max_initial_tokens()
    assert bound <= pool
    for _ in range(100):
        answer = policy.initial_tokens(expected_tokens=rng.choice([0, rng.randint(1, 2 * POOL)]))
        assert answer <= bound
        policy.observe(rng.randint(1, 2 * POOL))


# ------------------------------------------------------------------ auto (size-first)

AUTO = [
    # (id, initial_tokens, pool_tokens, the size the encoder said, answer)
    ("auto-exact", INITIAL, POOL, 3000, 3000),
    ("auto-one-token", INITIAL, POOL, 1, 1),
    ("auto-above-initial", INITIAL, POOL, 15_000, 15_000),
    ("auto-the-whole-pool", INITIAL, POOL, POOL, POOL),
    ("auto-larger-than-pool-falls-back", INITIAL, POOL, POOL + 1, INITIAL),
    ("auto-fallback-clamped-to-pool", 2 * POOL, POOL, 3 * POOL, POOL),
    ("auto-no-size-falls-back", INITIAL, POOL, 0, INITIAL),
]


@pytest.mark.parametrize(
    ("initial", "pool", "total", "answer"), [c[1:] for c in AUTO], ids=[c[0] for c in AUTO]
)
def test_auto_reserves_the_said_size_when_the_pool_holds_it(initial, pool, total, answer):
    policy = AllocationPolicy("auto", initial, pool)
    assert policy.size_first
    assert policy.sized_tokens(total) == answer
    assert policy.sized_tokens(total) <= policy.max_initial_tokens() == pool


@pytest.mark.parametrize("kind", ["fixed", "hint", "adaptive"])
def test_only_auto_is_size_first(kind):
    assert not AllocationPolicy(kind, INITIAL, POOL).size_first


def test_an_unknown_policy_is_named():
    with pytest.raises(ValueError, match="'sized'.*fixed, hint, adaptive, auto"):
        AllocationPolicy("sized", INITIAL, POOL)
