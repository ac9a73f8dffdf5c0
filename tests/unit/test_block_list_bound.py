"""A block-id list is refused by its length before any id is looked at: the encoder's
Init handler gets a list that cannot be iterated, as long as a forged one could be, and must
answer INVALID_ARGUMENT without touching it. In-process protocol tier: the servicer
is called directly with a fake gRPC context (no process, no Mooncake)."""

from __future__ import annotations

import pytest

from common.config import EncoderConfig
from services.encoder.service import EncoderService, EncoderServicer
from services.encoder.transfer import PeerSession


class Untouchable:
    """A sequence of `n` block ids whose ids must never be read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        raise AssertionError("the block ids were read before their count was checked")

    def __getitem__(self, i):
        raise AssertionError("the block ids were read before their count was checked")


class Aborted(Exception):
    pass


class FakeContext:
    """Just what the servicer's error mapping and peer_identity use."""

    def __init__(self):
        self.code = None
        self.details = ""

    async def abort(self, code, details, trailing_metadata=()):
        self.code, self.details = code, details
        raise Aborted(details)

    def auth_context(self):
        return {}


class Request:
    """An Init request with a forged dst_blocks (protobuf would not hold Untouchable)."""

    def __init__(self, n: int, **fields):
        self.dst_blocks = Untouchable(n)
        for k, v in fields.items():
            setattr(self, k, v)


@pytest.fixture
def servicer():
    service = EncoderService(EncoderConfig(hidden=16, block_size=4, pool_blocks=8))
    geometry = service.pool.geometry  # the same layout, 8 blocks
    service.sessions[("lang", 0)] = PeerSession("lang", 0, "127.0.0.1:1", geometry, 0, "anonymous")
    return EncoderServicer(service)


async def test_a_block_list_longer_than_the_pool_is_refused_unread(servicer):
    context = FakeContext()
    n = 10_000_000
    request = Request(
        n,
        request_id="r",
        language_id="lang",
        rank=0,
        rank_count=1,
        allocated_tokens=4 * n,
        progress_tokens=0,
        held_images=[],
    )
    with pytest.raises(Aborted):
        await servicer.Init(request, context)
    assert context.code.name == "INVALID_ARGUMENT", context.details
    assert f"{n} dst_blocks for a pool of 8 blocks" in context.details
    assert not servicer.s.transfers.live
