"""Raw garbage on the services' ports (hostile input).

Random bytes, HTTP/1.1 requests, truncated or malformed HTTP/2, and storms of connections that
are opened and dropped go to the gRPC port of the encoder and of the language service, and to
their Mooncake ports (the session "host:port" in the EPD_READY line, plus every other TCP port
the processes listen on, e.g. Mooncake's data port). After each kind of abuse both processes
must be alive and SERVING, and a normal multi-round Generate must succeed with the right digest
(which also moves the payload over Mooncake), with every pool free afterwards. Only 127.0.0.1 is
ever connected to.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.epd.v1 import language_pb2, language_pb2_grpc
from services.edge.exposure import listening_sockets
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, ServiceProcess, assert_all_free

HIDDEN = 64
BLOCK = 16
INITIAL_TOKENS = 256
LANGUAGE_BLOCKS = 64
LOOPBACK = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
U64 = 2**64 - 1

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=1024,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL_TOKENS,
        encoder_args=("--max-request-tokens", "5000"),
    )
    yield p
    p.stop()


def services(pair: Pair) -> list[ServiceProcess]:
    return [pair.encoder, pair.language]


def session_port(p: ServiceProcess) -> int:
    host, _, port = p.info["session"].rpartition(":")
    assert host in (LOOPBACK, "localhost"), (
        f"{p.role} Mooncake session {p.info['session']!r} is not on loopback"
    )
    return int(port)


def listening_ports(pid: int) -> set[int]:
    """Every TCP port process `pid` listens on (Linux /proc); empty where /proc is missing."""
    return {port for _address, port in listening_sockets(pid)}


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ---------------------------------------------------------------------------- raw connections


async def poke(
    port: int,
    payload: bytes = b"",
    *,
    read_s: float = 0.3,
    half_close: bool = False,
    rst: bool = False,
    chunks: int = 1,
) -> bytes:
    """Connect to 127.0.0.1:port, send payload (in `chunks` pieces), read what comes back for
    read_s seconds, then close (with a TCP reset when rst). Connection errors are the peer's right."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
    except (TimeoutError, OSError) as e:
        raise AssertionError(f"cannot connect to {LOOPBACK}:{port}: {e!r}") from None
    data = b""
    try:
        step = max(1, -(-len(payload) // chunks))
        for i in range(0, len(payload), step):
            writer.write(payload[i : i + step])
            await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), read_s)
        except TimeoutError:
            pass
    except (ConnectionError, OSError):
        pass
    finally:
        if rst:
            sock = writer.get_extra_info("socket")
            try:  # already gone when the peer closed first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return data


def random_payloads(seed: int, count: int) -> list[bytes]:
    rnd = random.Random(seed)
    sizes = [1, 2, 7, 9, 23, 24, 25, 100, 1000, 4096, 65536, 1 << 20]
    return [rnd.randbytes(rnd.choice(sizes)) for _ in range(count)]


# ---------------------------------------------------------------------------- HTTP/2 frames


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return (
        struct.pack(">I", n)[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream & 0x7FFFFFFF)
        + payload
    )


(
    DATA,
    HEADERS,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    PUSH_PROMISE,
    PING,
    GOAWAY,
    WINDOW_UPDATE,
    CONTINUATION,
) = range(10)
END_STREAM, END_HEADERS = 0x1, 0x4


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, no Huffman (RFC 7541 §6.2.2); names/values < 127 bytes."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
    return bytes(out)


def grpc_headers(path: str) -> bytes:
    return hpack_literal(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", LOOPBACK),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


SETTINGS_EMPTY = frame(SETTINGS, 0, 0, b"")

HTTP2_GARBAGE = {
    "oversized-frame": PREFACE
    + SETTINGS_EMPTY
    + frame(DATA, 0, 1, b"x" * 32, length=(1 << 24) - 1),
    "data-on-idle-stream": PREFACE + SETTINGS_EMPTY + frame(DATA, END_STREAM, 1, b"hello"),
    "bad-settings": PREFACE
    + frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0xFFFFFFFF) + struct.pack(">HI", 0x5, 1)),
    "settings-wrong-length": PREFACE + frame(SETTINGS, 0, 0, b"\x00\x01\x02"),
    "garbage-hpack": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS, 1, bytes(range(256)) * 4),
    "zero-window-update": PREFACE
    + SETTINGS_EMPTY
    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
    "rst-idle-stream": PREFACE + SETTINGS_EMPTY + frame(RST_STREAM, 0, 7, struct.pack(">I", 8)),
    "continuation-alone": PREFACE + SETTINGS_EMPTY + frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
    "priority-on-itself": PREFACE
    + SETTINGS_EMPTY
    + frame(PRIORITY, 0, 3, struct.pack(">IB", 3, 255)),
    "push-promise-from-client": PREFACE
    + SETTINGS_EMPTY
    + frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"),
    "unknown-frame-types": PREFACE
    + SETTINGS_EMPTY
    + b"".join(frame(t, 0xFF, t, b"?" * t) for t in range(10, 40)),
    "ping-flood": PREFACE
    + SETTINGS_EMPTY
    + b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(2000)),
    "goaway-then-data": PREFACE
    + SETTINGS_EMPTY
    + frame(GOAWAY, 0, 0, struct.pack(">II", 0, 2))
    + b"\x00" * 100,
    "even-stream-id": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS, 2, grpc_headers("/x/y")),
    "grpc-message-claims-4GB": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS, 1, grpc_headers("/epd.v1.Language/Generate"))
    + frame(DATA, END_STREAM, 1, b"\x00\xff\xff\xff\xff" + b"\x00" * 16),
    "grpc-compressed-flag-without-encoding": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS, 1, grpc_headers("/epd.v1.Language/Generate"))
    + frame(DATA, END_STREAM, 1, b"\x01\x00\x00\x00\x04garb"),
    "grpc-truncated-message": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS, 1, grpc_headers("/epd.v1.Encoder/Init"))
    + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x10\x00\x0a\x03ab"),
    "grpc-unknown-method": PREFACE
    + SETTINGS_EMPTY
    + frame(HEADERS, END_HEADERS | END_STREAM, 1, grpc_headers("/epd.v1.Encoder/DropTables")),
    "many-streams-no-end": PREFACE
    + SETTINGS_EMPTY
    + b"".join(
        frame(HEADERS, END_HEADERS, 2 * i + 1, grpc_headers("/epd.v1.Language/Generate"))
        for i in range(300)
    ),
}

HTTP1 = {
    "get": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "post-grpc": (
        b"POST /epd.v1.Language/Generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/grpc\r\n"
        b"Content-Length: 5\r\n\r\n\x00\x00\x00\x00\x00"
    ),
    "h2c-upgrade": (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    ),
    "connect": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
    "huge-header": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: "
    + b"j" * (1 << 20)
    + b"\r\n\r\n",
    "pipelined": b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" * 50,
    "http09": b"GET /\r\n",
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303")
    + bytes(32)
    + b"\x00\x00\x02\x13\x01\x01\x00",
}


# ---------------------------------------------------------------------------- the check after each abuse


async def still_working(pair: Pair, n: int = 1000, seed: int = 11) -> None:
    """Alive, SERVING, a multi-round Generate with the right digest, every pool free."""
    for p in services(pair):
        assert p.proc.poll() is None, (
            f"{p.role} died (exit {p.proc.returncode}):\n{p.stderr_tail()}"
        )
    for p, name in ((pair.encoder, "epd.v1.Encoder"), (pair.language, "epd.v1.Language")):
        async with grpc.aio.insecure_channel(p.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", name):
                r = await asyncio.wait_for(
                    stub.Check(health_pb2.HealthCheckRequest(service=service)), 10
                )
                assert r.status == health_pb2.HealthCheckResponse.SERVING, (
                    f"{p.role} {service!r}: {r.status}"
                )
    async with grpc.aio.insecure_channel(pair.language.address) as ch:
        reply = await language_pb2_grpc.LanguageStub(ch).Generate(
            language_pb2.GenerateRequest(synthetic_tokens=n, synthetic_seed=seed, want_digest=True),
            timeout=30,
        )
    assert reply.total_tokens == n and reply.rounds >= 2 and reply.integrity_verified, reply
    assert reply.payload_sha256 == expected_digest(n, seed, HIDDEN), "wrong payload after garbage"
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))


# ---------------------------------------------------------------------------- gRPC ports


async def test_random_bytes_on_the_grpc_ports(pair):
    for i, p in enumerate(services(pair)):
        payloads = random_payloads(100 + i, 40)
        await asyncio.gather(
            *(
                poke(p.port, data, half_close=k % 2 == 0, rst=k % 3 == 0, chunks=1 + k % 4)
                for k, data in enumerate(payloads)
            )
        )
        # Random bytes after a valid preface: the connection is HTTP/2, the frames are not.
        await asyncio.gather(
            *(poke(p.port, PREFACE + data, rst=k % 2 == 0) for k, data in enumerate(payloads[:20]))
        )
    await still_working(pair, seed=1)


@pytest.mark.parametrize("name", list(HTTP1))
async def test_http1_on_the_grpc_ports(pair, name):
    for p in services(pair):
        await poke(p.port, HTTP1[name], read_s=0.5)
    await still_working(pair, n=600, seed=2)


async def test_truncated_http2_preface_held_open_during_a_generate(pair):
    """Every proper prefix of the HTTP/2 preface, left hanging while real work goes on."""
    held = []
    for p in services(pair):
        for k in range(1, len(PREFACE)):
            reader, writer = await asyncio.open_connection(LOOPBACK, p.port)
            writer.write(PREFACE[:k])
            await writer.drain()
            held.append(writer)
    try:
        await still_working(pair, seed=3)  # while ~50 half-open connections hang
    finally:
        for w in held:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in held), return_exceptions=True)
    await asyncio.gather(
        *(
            poke(p.port, PREFACE[:k], rst=True, read_s=0.05)
            for p in services(pair)
            for k in range(1, len(PREFACE))
        )
    )
    await still_working(pair, seed=4)


@pytest.mark.parametrize("name", list(HTTP2_GARBAGE))
async def test_malformed_http2_on_the_grpc_ports(pair, name):
    for p in services(pair):
        await poke(p.port, HTTP2_GARBAGE[name], read_s=0.3)
    await still_working(pair, n=600, seed=5)


async def test_many_connections_opened_and_dropped(pair):
    """Storms of connections: closed at once, reset, closed after the preface, and idle ones held
    during a Generate. Afterwards the processes hold no more file descriptors than before (slack
    for gRPC's own)."""
    before = {p.role: open_fds(p.proc.pid) for p in services(pair)}
    for p in services(pair):
        for start in range(0, 300, 100):
            await asyncio.gather(
                *(
                    poke(p.port, b"" if k % 3 == 0 else PREFACE, rst=k % 3 == 1, read_s=0.01)
                    for k in range(start, start + 100)
                )
            )
    idle = []
    for p in services(pair):
        for _ in range(50):
            idle.append((await asyncio.open_connection(LOOPBACK, p.port))[1])
    try:
        await still_working(pair, seed=6)
    finally:
        for w in idle:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in idle), return_exceptions=True)
    await still_working(pair, seed=7)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        after = {p.role: open_fds(p.proc.pid) for p in services(pair)}
        if (
            all(after[r] <= before[r] + 16 for r in before)
            or asyncio.get_running_loop().time() > deadline
        ):
            break
        await asyncio.sleep(0.2)
    assert all(after[r] <= before[r] + 16 for r in before), (
        f"file descriptors before {before}, after {after}"
    )


# ---------------------------------------------------------------------------- Mooncake ports


def mooncake_garbage(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    hdr = struct.Struct("<QQB7x")  # what a Mooncake TCP data header looks like: size, addr, opcode
    return [
        *random_payloads(seed, 16),
        HTTP1["get"],
        HTTP1["huge-header"],
        PREFACE,
        b'{"json": true}\n' * 100,
        b"\xff" * 64,
        b"\x00" * 4096,
        struct.pack("<I", 0xFFFFFFFF) + rnd.randbytes(64),  # a length prefix claiming 4 GiB
        struct.pack("<Q", 2**63) * 8,
        hdr.pack(8, 0x1000, 1) + b"A" * 8,  # write 8 bytes to an address nobody registered
        hdr.pack(1 << 40, 0x1000, 0),  # read 1 TiB from it
        hdr.pack(U64, 0, 1) + rnd.randbytes(1000),  # size 2**64-1 at address 0
        hdr.pack(16, U64 - 7, 1) + b"B" * 16,  # a range that wraps around the address space
    ]


def mooncake_ports(p: ServiceProcess) -> list[int]:
    """The session port from EPD_READY first, then every other port the process listens on."""
    session = session_port(p)
    others = sorted(listening_ports(p.proc.pid) - {session, p.port})
    return [session, *others]


async def test_garbage_on_the_mooncake_ports(pair):
    tried = {}
    for i, p in enumerate(services(pair)):
        ports = mooncake_ports(p)
        tried[p.role] = ports
        for port in ports:
            payloads = mooncake_garbage(200 + i)
            await asyncio.gather(
                *(
                    poke(port, data, half_close=k % 2 == 1, rst=k % 3 == 0, read_s=0.3)
                    for k, data in enumerate(payloads)
                )
            )
            for start in range(0, 200, 100):  # connections opened and dropped
                await asyncio.gather(
                    *(
                        poke(port, b"", rst=k % 2 == 0, read_s=0.01)
                        for k in range(start, start + 100)
                    )
                )
    await still_working(pair, n=2000, seed=8)
    assert all(tried.values()), tried


async def test_garbage_on_the_mooncake_ports_during_a_generate(pair):
    """The same garbage while a multi-round transfer is moving over Mooncake."""

    async def abuse():
        for p in services(pair):
            for port in mooncake_ports(p):
                await asyncio.gather(
                    *(
                        poke(port, data, rst=k % 2 == 0, read_s=0.1)
                        for k, data in enumerate(mooncake_garbage(300))
                    )
                )

    await asyncio.gather(abuse(), still_working(pair, n=5000, seed=9))
    await still_working(pair, seed=10)
