"""Fixtures of the fast protocol tier (tests/protocol, marker `protocol`).

Both services run in the pytest process, over real gRPC on 127.0.0.1 ephemeral ports, with
in-process transfer engines (tests/protocol/inprocess_engine.py) instead of Mooncake: no child
process, no Mooncake, milliseconds per scenario. The harness is tests/protocol/harness.py;
`tier` is one encoder + one single-rank language instance with the harness's defaults (hidden 64,
block_size 16, a 256-token language pool, 64 initial tokens), checked fully free on exit.
Scenarios that need other settings or parts use `protocol_tier(...)` directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.protocol.harness import Tier, protocol_tier


@pytest.fixture
async def tier() -> AsyncIterator[Tier]:
    async with protocol_tier() as running:
        yield running
