"""The fast tier's fake engine (tests/protocol/inprocess_engine.py): Mooncake's address checks,
its return codes, and that production code never reaches it."""

from __future__ import annotations

import ctypes
import pathlib

import pytest

from common.errors import TransportError
from common.transport import MooncakeTransport
from tests.protocol.inprocess_engine import INVALID_BATCH, InProcessEngine, sessions

pytestmark = pytest.mark.protocol

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Side:
    """An engine with one registered 256-byte buffer, filled with `fill`."""

    def __init__(self, fill: int):
        self.engine = InProcessEngine()
        self.buf = ctypes.create_string_buffer(bytes([fill]) * 256, 256)
        self.addr = ctypes.addressof(self.buf)
        assert self.engine.register_memory(self.addr, 256, "cpu:0") == 0

    @property
    def bytes(self) -> bytes:
        return self.buf.raw


@pytest.fixture
def pair():
    return Side(0xAA), Side(0x00)


def test_every_engine_has_its_own_session():
    a, b = InProcessEngine(), InProcessEngine("10.0.0.1")
    assert a.session != b.session and a.session.startswith("127.0.0.1:")
    assert b.session == f"10.0.0.1:{b.get_rpc_port()}"
    assert {a.session, b.session} <= set(sessions())


def test_a_write_copies_between_registered_buffers(pair):
    src, dst = pair
    rc = src.engine.batch_transfer_sync_write(
        dst.engine.session, [src.addr, src.addr + 10], [dst.addr + 100, dst.addr], [8, 4]
    )
    assert rc == 0
    assert dst.bytes[100:108] == b"\xaa" * 8 and dst.bytes[0:4] == b"\xaa" * 4
    assert dst.bytes[4:100] == b"\x00" * 96 and dst.bytes[108:] == b"\x00" * 148


def test_submitted_writes_are_final_at_their_first_check_and_then_freed(pair):
    src, dst = pair
    batch = src.engine.transfer_submit_write(dst.engine.session, src.addr, dst.addr, 256)
    assert dst.bytes == b"\xaa" * 256
    assert src.engine.open_batches == 1
    assert src.engine.transfer_check_status(batch) == 1
    assert src.engine.open_batches == 0
    with pytest.raises(AssertionError, match="unknown or already final"):
        src.engine.transfer_check_status(batch)  # the binding would abort


REFUSED = {
    # name: (target, src offset, dst offset, length)
    "unknown-session": ("127.0.0.1:1", 0, 0, 8),
    "destination-past-the-end": (None, 0, 250, 8),
    "destination-before-the-start": (None, 0, -8, 8),
    "source-not-registered": (None, 252, 0, 8),
    "zero-length": (None, 0, 0, 0),
}


@pytest.mark.parametrize(
    "target, src_at, dst_at, length", list(REFUSED.values()), ids=list(REFUSED)
)
def test_refused_calls_copy_nothing(pair, target, src_at, dst_at, length):
    src, dst = pair
    target = target or dst.engine.session
    good = (src.addr, dst.addr + 16, 4)  # in bounds, but in the same call: not copied either
    bad = (src.addr + src_at, dst.addr + dst_at, length)
    rc = src.engine.batch_transfer_sync_write(target, *map(list, zip(good, bad)))
    assert rc == -1
    batch = src.engine.transfer_submit_write(target, *bad)
    if target == "127.0.0.1:1":
        assert batch == INVALID_BATCH  # the binding cannot open the segment: nothing submitted
    else:
        assert src.engine.transfer_check_status(batch) == -1  # FAILED, and freed
    # A read the other way round: the same checks, with the roles of the buffers swapped.
    assert src.engine.transfer_sync_read(target, src.addr + src_at, dst.addr + dst_at, length) == -1
    assert dst.bytes == b"\x00" * 256 and src.bytes == b"\xaa" * 256
    assert src.engine.writes == 0 and len(src.engine.refused) == 3


def test_unregistered_memory_is_out_of_reach(pair):
    src, dst = pair
    assert dst.engine.unregister_memory(dst.addr) == 0
    assert dst.engine.unregister_memory(dst.addr) != 0
    assert (
        src.engine.batch_transfer_sync_write(dst.engine.session, [src.addr], [dst.addr], [8]) == -1
    )
    assert dst.bytes == b"\x00" * 256


def test_overlapping_registrations_are_refused(pair):
    src, _dst = pair
    assert src.engine.register_memory(src.addr + 128, 256, "cpu:0") != 0
    assert src.engine.register_memory(src.addr, 0, "cpu:0") != 0


def test_a_read_copies_from_the_peer(pair):
    src, dst = pair
    assert dst.engine.transfer_sync_read(src.engine.session, dst.addr + 8, src.addr, 16) == 0
    assert dst.bytes[8:24] == b"\xaa" * 16 and dst.bytes[:8] == b"\x00" * 8


@pytest.mark.parametrize("wait", ["poll", "spin"])
def test_through_the_real_transport(wait):
    """MooncakeTransport on the fake: writes land, out-of-bounds ones raise TransportError."""
    a = MooncakeTransport("127.0.0.1", engine=InProcessEngine(), wait=wait)
    b = MooncakeTransport("127.0.0.1", engine=InProcessEngine(), wait=wait)
    src = ctypes.create_string_buffer(b"\x11" * 64, 64)
    dst = ctypes.create_string_buffer(64)
    a.register(ctypes.addressof(src), 64)
    b.register(ctypes.addressof(dst), 64)
    a.write_sync(b.session, [(ctypes.addressof(src), ctypes.addressof(dst), 32)])
    assert dst.raw == b"\x11" * 32 + b"\x00" * 32
    with pytest.raises(TransportError, match=f"to {b.session}"):
        a.write_sync(b.session, [(ctypes.addressof(src), ctypes.addressof(dst) + 48, 32)])
    with pytest.raises(TransportError, match="read of 8 bytes"):
        b.read_sync(a.session, ctypes.addressof(dst), ctypes.addressof(src) + 60, 8)
    b.read_sync(a.session, ctypes.addressof(dst) + 32, ctypes.addressof(src), 8)
    assert dst.raw[32:40] == b"\x11" * 8
    for t in (a, b):
        t.close()
        assert t.late_pieces == 0 and not t._engine.registered and not t._engine.open_batches


def test_production_code_never_imports_the_fake():
    """It lives under tests/ and only a Parts built by test code hands it to a transport."""
    for package in ("common", "services"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "inprocess_engine" not in text and "InProcessEngine" not in text, path
            assert "from tests" not in text and "import tests" not in text, path
