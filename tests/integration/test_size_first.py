"""Size-first reservation (`--alloc-policy auto`) between real processes over Mooncake TCP.

- The encoder says the payload's size on the Status stream before any Init, and only when the
  Encode asks (EncodeRequest.announce_size): driven by hand from a rank in the test process.
- A language instance under `auto`, with no client hints: every payload its pool can hold comes
  in one round into exactly its own blocks; a larger one falls back to --initial-tokens and
  resume rounds. Digests against the independent reference, the counts read from /metrics.
"""

from __future__ import annotations

import asyncio
import math
import re
import urllib.request

import pytest

from common.pb.epd.v1 import encoder_pb2, language_pb2
from common.states import TransferState
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, ServiceProcess, assert_all_free, encoder_stub, language_stub
from tests.integration.rank_harness import TestRank

HIDDEN = 64
STEP_S = 20.0


@pytest.fixture(scope="module")
def encoder():
    process = ServiceProcess("encoder", "--hidden", str(HIDDEN), "--pool-blocks", "64")
    yield process
    process.stop()


@pytest.mark.parametrize("announce", [True, False], ids=["announce_size", "not-asked"])
async def test_the_encoder_says_the_size_before_any_init_only_when_asked(encoder, announce):
    enc = encoder_stub(encoder.address)
    rank = TestRank(hidden=HIDDEN, block_size=16, num_blocks=64)
    rid = f"announce-{announce}"
    n, seed = 300, 4
    try:
        await rank.register(enc)
        request = rank.status_request(rid)
        request.await_transfer = True
        stream = enc.Status(request)
        encode = rank.encode_request(rid, n, seed)
        encode.announce_size = announce
        reply = await enc.Encode(encode)
        assert reply.total_tokens == n
        before_init = []
        if announce:  # the size comes with no Init sent: nothing else could bring it
            while not before_init or not before_init[-1].total_tokens:
                before_init.append(await asyncio.wait_for(stream.read(), STEP_S))
            assert before_init[-1].state == TransferState.BOOTSTRAPPING
            assert before_init[-1].total_tokens == n and before_init[-1].sent_tokens == 0
        blocks = rank.alloc(math.ceil(n / rank.block_size))
        await enc.Init(rank.init_request(rid, blocks))
        statuses = list(before_init)
        while not statuses or statuses[-1].state != TransferState.SUCCESS:
            statuses.append(await asyncio.wait_for(stream.read(), STEP_S))
        # Before the Init the transfer is BOOTSTRAPPING (one rank: its Init moves it on); only
        # when asked does a status of that state carry the size.
        said = [st.total_tokens for st in statuses if st.state == TransferState.BOOTSTRAPPING]
        assert (n in said) == announce, said
        assert set(said) <= {0, n}
        assert statuses[-1].round == 1 and statuses[-1].sent_tokens == n
        assert rank.mismatches(rank.read(blocks, n), seed, 0) == []
        rank.free(blocks)
        stream.cancel()
        await assert_all_free((encoder.address, "encoder"))
    finally:
        rank.close()


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}{{(.*)}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_auto_reserves_what_the_encoder_said_and_falls_back_beyond_the_pool():
    metrics_port = free_port("127.0.0.1")
    block, blocks, initial = 128, 96, 8192  # a 12288-token pool
    pair = Pair(
        hidden=HIDDEN,
        block_size=block,
        language_blocks=blocks,
        initial_tokens=initial,
        language_args=("--alloc-policy", "auto", "--metrics-port", str(metrics_port)),
    )
    try:
        stub = language_stub(pair.language.address)

        def generate(n: int, seed: int):
            return stub.Generate(
                language_pb2.GenerateRequest(
                    synthetic_tokens=n, synthetic_seed=seed, want_digest=True
                ),
                timeout=60,
            )

        # Those the pool holds at once, then one larger than the pool alone (its resume rounds
        # then get the whole pool).
        sizes = [100, 5000, 8193, 12288, 20000]
        replies = list(await asyncio.gather(*(generate(n, i) for i, n in enumerate(sizes[:-1]))))
        replies.append(await generate(sizes[-1], len(sizes) - 1))
        for i, (n, reply) in enumerate(zip(sizes, replies)):
            assert reply.payload_sha256 == expected_digest(n, i, HIDDEN), n
            if n <= block * blocks:
                assert reply.rounds == 1, n
                assert reply.initial_allocated_tokens == math.ceil(n / block) * block, n
            else:
                assert reply.initial_allocated_tokens == initial
                assert reply.rounds == 1 + math.ceil((n - initial) / (block * blocks))
        name = "epd_size_first_admissions_total"
        assert _metric(metrics_port, name, reservation="exact") == 4
        assert _metric(metrics_port, name, reservation="default") == 1
        await assert_all_free(
            (pair.encoder.address, "encoder"), (pair.language.address, "language")
        )
    finally:
        pair.stop()


def test_the_announce_flag_is_in_the_encode_request():
    """The field the `auto` policy relies on keeps its number (outside tools may set it)."""
    field = encoder_pb2.EncodeRequest.DESCRIPTOR.fields_by_name["announce_size"]
    assert field.number == 10
