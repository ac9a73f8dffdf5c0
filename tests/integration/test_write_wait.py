"""How the encoder waits for a Mooncake write (`--write-wait`): `poll` (the default: submit each
piece, check its status with short sleeps) and `spin` (Mooncake's busy-waiting
batch_transfer_sync_write) deliver the same bytes; a polled write to a peer that is not there
fails with a clear TransportError. Real Mooncake engines over TCP, real processes."""
# (every other integration test runs the default, `poll`)

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import torch

from common.errors import TransportError
from common.pb.epd.v1 import language_pb2
from common.transport import MooncakeTransport
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 256


async def test_spinning_waits_deliver_the_right_bytes():
    """`poll` is the default, which every other test runs on; here the services on `spin`."""
    wait = "spin"
    p = Pair(
        hidden=HIDDEN,
        encoder_blocks=256,
        language_blocks=16,
        initial_tokens=1024,
        encoder_args=("--write-wait", wait),
    )
    try:
        stub = language_stub(p.language.address)
        sizes = [1, 700, 1024, 2049, 5000]  # one round, and several through a 2048-token pool
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(
                    stub.Generate(
                        language_pb2.GenerateRequest(
                            synthetic_tokens=n, synthetic_seed=i, want_digest=True
                        )
                    )
                    for i, n in enumerate(sizes)
                )
            ),
            120,
        )
        for i, (n, reply) in enumerate(zip(sizes, replies)):
            assert reply.payload_sha256 == expected_digest(n, i, HIDDEN), (wait, n)
        await assert_all_free((p.encoder.address, "encoder"), (p.language.address, "language"))
    finally:
        p.stop()


RECEIVER = """
import sys, time, torch
from common.transport import MooncakeTransport
t = MooncakeTransport("127.0.0.1", "tcp")
buf = torch.zeros(8 << 20, dtype=torch.uint8)
t.register(buf.data_ptr(), buf.numel(), "cpu:0")
print(t.session, buf.data_ptr(), flush=True)
sys.stdin.readline()  # until the test is done
print(int(buf[:4 << 20].sum()), int(buf[4 << 20:].sum()), flush=True)
"""


async def test_polled_and_spinning_writes_between_processes_and_a_missing_peer():
    """One engine here, one in a child process: both waits move the bytes; a write to a port
    where nothing listens raises TransportError once nothing is in flight."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen(
        [sys.executable, "-c", RECEIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=root,
        env={**os.environ, "MC_FORCE_TCP": "1"},
    )
    t = MooncakeTransport("127.0.0.1", "tcp")
    try:
        session, dst = child.stdout.readline().decode().split()
        dst = int(dst)
        src = torch.ones(4 << 20, dtype=torch.uint8)
        t.register(src.data_ptr(), src.numel(), "cpu:0")
        half = 2 << 20
        # Two pieces per write, as a round whose blocks form two runs.
        await t.write(
            session,
            [(src.data_ptr(), dst, half), (src.data_ptr() + half, dst + half, half)],
            wait="poll",
        )
        await t.write(session, [(src.data_ptr(), dst + (4 << 20), 4 << 20)], wait="spin")
        started = time.monotonic()
        with pytest.raises(
            TransportError,
            match=r"Mooncake write of 4096 bytes in 1 pieces to 127\.0\.0\.1:1 failed",
        ):
            await t.write("127.0.0.1:1", [(src.data_ptr(), dst, 4096)], wait="poll")
        assert time.monotonic() - started < 30
        out, _ = child.communicate(b"\n", timeout=60)
        assert out.decode().split() == [
            str(4 << 20),
            str(4 << 20),
        ]  # every byte of both writes landed
    finally:
        if child.poll() is None:
            child.kill()
        t.close()


def test_an_unknown_wait_is_refused_by_name():
    with pytest.raises(ValueError, match="wait='busy'"):
        MooncakeTransport("127.0.0.1", "tcp", wait="busy")
