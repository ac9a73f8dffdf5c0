"""Encoder selection (services/language/selection.py), DNS expansion and the encoder file."""

from __future__ import annotations

import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, LanguageConfig
from services.language import encoders
from services.language.encoders import resolve_addresses
from services.language.rank_group import (
    _ADMIT_WORDS,
    ADMIT_KEY_BYTES,
    ENCODER_ADDRESS_BYTES,
    MAX_HELD,
    RequestSpec,
    _pack_admit,
    _unpack_admit,
)
from services.language.selection import (
    AFFINITY_MAX_EXTRA_LOAD,
    EncoderSelector,
    EncoderView,
    ImageAffinity,
)

view_st = st.builds(
    EncoderView,
    index=st.just(0),
    address=st.just(""),
    available=st.booleans(),
    registered=st.booleans(),
    free_blocks=st.integers(0, 100),
    used_blocks=st.integers(0, 100),
    waiters=st.integers(0, 3),
    live_transfers=st.integers(0, 20),
    inflight=st.integers(0, 20),
    inflight_at_poll=st.integers(0, 20),
)


def views_of(raw: list[EncoderView]) -> list[EncoderView]:
    for i, v in enumerate(raw):
        v.index, v.address = i, f"e{i}:1"
    return raw


@settings(max_examples=300, deadline=None)
@given(
    st.lists(view_st, max_size=6),
    st.sampled_from(["least-loaded", "round-robin"]),
    st.sets(st.integers(0, 5)),
)
def test_pick_returns_an_available_registered_not_excluded_encoder_or_none(raw, policy, exclude):
    views = views_of(raw)
    chosen = EncoderSelector(policy).pick(views, exclude)
    ok = [v for v in views if v.available and v.registered and v.index not in exclude]
    if not ok:
        assert chosen is None
    else:
        assert chosen in ok
        if policy == "least-loaded":
            assert chosen.load == min(v.load for v in ok)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30))
def test_round_robin_visits_every_encoder_in_turn(n, picks):
    views = views_of([EncoderView(0, "", available=True, registered=True) for _ in range(n)])
    sel = EncoderSelector("round-robin")
    got = [sel.pick(views).index for _ in range(picks)]
    assert got == [i % n for i in range(picks)]


def test_least_loaded_spreads_a_burst_and_prefers_free_blocks():
    views = views_of(
        [
            EncoderView(0, "", available=True, registered=True, free_blocks=10, used_blocks=90),
            EncoderView(0, "", available=True, registered=True, free_blocks=90, used_blocks=10),
        ]
    )
    sel = EncoderSelector()
    assert sel.pick(views).index == 1  # same load: more free blocks
    counts = [0, 0]
    for _ in range(10):  # each pick counts as in flight at once (as the front door does)
        v = sel.pick(views)
        v.inflight += 1
        counts[v.index] += 1
    assert counts == [5, 5]
    views[0].live_transfers, views[0].inflight_at_poll = 8, 0  # other languages load encoder 0
    assert sel.pick(views).index == 1


def test_an_encoder_holding_the_images_is_preferred_and_load_breaks_ties():
    views = views_of([EncoderView(0, "", available=True, registered=True) for _ in range(3)])
    sel = EncoderSelector()
    affinity = ImageAffinity()
    a, b = b"a" * 32, b"b" * 32
    affinity.remember(2, [a])
    affinity.remember(1, [a, b])
    affinity.remember(2, [b])
    assert affinity.held([a, b, a]) == {1: 2, 2: 2}
    views[2].inflight = 1  # 1 and 2 hold both images: the less loaded one
    assert sel.pick(views, held=affinity.held([a, b])).index == 1
    assert sel.pick(views, held=affinity.held([b"c" * 32])).index == 0  # no holder: least loaded
    # A holder far busier than the least-loaded encoder is passed over.
    views[1].inflight = AFFINITY_MAX_EXTRA_LOAD + 1
    views[2].inflight = AFFINITY_MAX_EXTRA_LOAD + 1
    assert sel.pick(views, held=affinity.held([a])).index == 0
    views[2].inflight = AFFINITY_MAX_EXTRA_LOAD
    assert sel.pick(views, held=affinity.held([a])).index == 2
    # Round-robin ignores what encoders hold.
    rr = EncoderSelector("round-robin")
    assert [rr.pick(views, held={2: 1}).index for _ in range(3)] == [0, 1, 2]


def test_image_affinity_forgets_the_least_recently_sent_first():
    affinity = ImageAffinity(capacity=2)
    affinity.remember(0, [b"1", b"2"])
    affinity.remember(1, [b"1"])  # 1 is now the most recent
    affinity.remember(0, [b"3"])
    assert affinity.held([b"1", b"2", b"3"]) == {0: 2, 1: 1}


def test_unavailable_encoders_leave_and_rejoin_the_rotation():
    views = views_of([EncoderView(0, "", available=True, registered=True) for _ in range(2)])
    sel = EncoderSelector("round-robin")
    views[0].available = False
    assert {sel.pick(views).index for _ in range(4)} == {1}
    views[0].available = True
    assert {sel.pick(views).index for _ in range(4)} == {0, 1}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="encoder_policy='fastest'"):
        EncoderSelector("fastest")


def fake_getaddrinfo(table):
    def lookup(host, port, family, kind):
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    return lookup


def test_dns_names_with_several_addresses_expand_to_each():
    lookup = fake_getaddrinfo(
        {"encoder": ["10.0.0.3", "10.0.0.2", "10.0.0.3"], "single": ["10.0.0.9"]}
    )
    got, expanded = resolve_addresses(
        ["encoder:50051", "single:1", "10.1.1.1:2", "nowhere:3"],
        lambda address: encoders.lookup(address, lookup),
    )
    assert got == ["10.0.0.2:50051", "10.0.0.3:50051", "single:1", "10.1.1.1:2", "nowhere:3"]
    assert expanded == [
        "encoder:50051",
        "single:1",
        "nowhere:3",
    ]  # every name is looked up again later


async def test_a_name_that_grows_to_several_addresses_is_retired_for_one_entry_each():
    """`--scale encoder=1` at start, scaled up later: the name's entry stops taking requests and
    each address becomes an encoder of its own (no encoder counted twice); later look-ups that
    find the same addresses change nothing, new ones join. Async: the directory's links are
    grpc.aio channels, which must be made on a running event loop (made outside one, they ask
    asyncio.get_event_loop(), which raises once an earlier test's asyncio.run has cleared the
    main thread's loop)."""
    from services.language.encoders import EncoderDirectory

    d = EncoderDirectory(["encoder:50051", "10.9.9.9:1"], "lang-t", dns_names=["encoder:50051"])
    try:
        _check_growing_name(d)
    finally:
        await d.close()


def _check_growing_name(d) -> None:
    spawned = []
    d._spawn = spawned.append
    for v in d.views:
        v.available = v.registered = True
    d._resolved(
        "encoder:50051", ["10.0.0.2:50051"]
    )  # still one address: the name's link reaches it
    assert [v.address for v in d.views] == ["encoder:50051", "10.9.9.9:1"] and not spawned
    d._resolved("encoder:50051", ["10.0.0.2:50051", "10.0.0.3:50051"])
    assert [v.address for v in d.views] == [
        "encoder:50051",
        "10.9.9.9:1",
        "10.0.0.2:50051",
        "10.0.0.3:50051",
    ]
    assert spawned == [2, 3] and d.views[0].retired and not d.views[0].selectable
    d._resolved("encoder:50051", ["10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.4:50051"])
    assert spawned == [2, 3, 4] and len(d.views) == 5
    for v in d.views[2:]:
        v.available = v.registered = True
    picks = {d.pick().address for _ in range(8)}
    assert picks == {"10.9.9.9:1", "10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.4:50051"}
    assert d.available == 4


def test_encoder_file_adds_addresses_and_names_a_bad_line(tmp_path):
    f = tmp_path / "encoders"
    f.write_text("# encoders\nb:2\n\n  c:3  # third\na:1\n")
    cfg = LanguageConfig(encoder=("a:1",), encoder_file=str(f))
    cfg.validate()
    assert cfg.encoder_addresses() == ("a:1", "b:2", "c:3")
    f.write_text("b:2\nnot an address\n")
    with pytest.raises(ConfigError, match="line 2: 'not an address' must be host:port"):
        LanguageConfig(encoder=("a:1",), encoder_file=str(f)).validate()
    with pytest.raises(ConfigError, match="encoder_file=.*cannot read"):
        LanguageConfig(encoder_file=str(tmp_path / "missing")).validate()
    with pytest.raises(ConfigError, match="encoder_policy='x'"):
        LanguageConfig(encoder=("a:1",), encoder_policy="x").validate()


@given(
    st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= ADMIT_KEY_BYTES),
    st.integers(0, 63),
    st.lists(st.binary(min_size=32, max_size=32), max_size=MAX_HELD),
    st.text(max_size=20).filter(lambda s: len(s.encode()) <= ENCODER_ADDRESS_BYTES),
)
def test_admission_record_carries_the_key_the_encoder_and_the_held_images(
    key, encoder, held, address
):
    t = torch.zeros(_ADMIT_WORDS + 3, dtype=torch.int64)
    spec = RequestSpec(
        7,
        key,
        1024,
        True,
        encoder,
        encoder_address=address,
        held=tuple(h.hex() for h in held),
    )
    _pack_admit(t, 2, spec)
    assert _unpack_admit(t, 2) == spec
