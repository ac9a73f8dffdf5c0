"""A hostile client against real processes and real Mooncake: each test tries one
attack that worked on the code before this suite, as someone holding the shared token (or, for
the ownership cases, another client certificate of the same CA) would, and checks that it is
refused with the right code, that nothing changed — no byte of the victim's pool, no transfer —
and that the victim still works.

The attacker here is this test process: its own `TestRank`s (real pools on a real Mooncake engine)
and raw gRPC calls. Nothing is faked.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import urllib.request
import uuid

import grpc
import pytest
import torch

from common.pb.epd.v1 import (
    bench_pb2,
    bench_pb2_grpc,
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
)
from services.language import rank_group
from services.language.ranks import free_port
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, ServiceProcess, assert_all_free
from tests.integration.rank_harness import TestRank
from tests.integration.test_security import GRPCURL, TOKEN, Certs

HIDDEN = 64
VICTIM = f"victim-lang-{uuid.uuid4().hex[:8]}"  # the mutual-TLS pair's language_id
BLOCK = 16
PD, IA, FP, RE = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
NF, UNAUTH, UNIMPL = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
)

pytestmark = pytest.mark.timeout(240)


def rid(prefix: str = "evil") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def expect(awaitable, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await awaitable
    details = e.value.details() or ""
    assert e.value.code() == code, f"expected {code.name}, got {e.value.code().name}: {details}"
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    return details


async def generate_ok(lang_stub, tokens: int = 300, seed: int = 3) -> None:
    """The victim still works: a Generate with the digest the payload formula gives."""
    reply = await lang_stub.Generate(
        language_pb2.GenerateRequest(
            request_id=rid("victim"), synthetic_tokens=tokens, synthetic_seed=seed, want_digest=True
        ),
        timeout=60,
    )
    assert reply.payload_sha256 == expected_digest(tokens, seed, HIDDEN, "bfloat16")


@pytest.fixture(scope="module")
def pair():
    """A plaintext pair (the default), bench surface off (the default)."""
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=256,
        language_blocks=64,
        encoder_args=("--max-transfers-per-peer", "4", "--max-transfers-per-identity", "6"),
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def attacker_rank():
    rank = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=32, language_id=rid("attacker"))
    yield rank
    rank.close()


# ------------------------------------------------------------------------------------ 1. alias session


async def test_register_through_an_alias_of_the_victims_session_is_refused(pair, attacker_rank):
    """The victim language's session and pool address (read from inspection, which shows them to
    this identity: plaintext, everyone is one identity) re-spelt as 127.0.0.2:PORT reach the same
    Mooncake listener. Register with them must fail the proof of possession; the encoder then
    refuses to write there, and the victim's pool is untouched."""
    lang = language_pb2_grpc.LanguageStub(grpc.aio.insecure_channel(pair.language.address))
    enc = encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(pair.encoder.address))
    victim_pool = await lang.GetPool(common_pb2.GetPoolRequest())
    port = victim_pool.session.rpartition(":")[2]
    attacker = rid("attacker-lang")
    for alias in (f"127.0.0.2:{port}", f"localhost:{port}", victim_pool.session):
        challenge = await enc.Challenge(encoder_pb2.ChallengeRequest(language_id=attacker, rank=0))
        # The attacker has the nonce, but no way to put it into the victim's memory: its own pool
        # gets it instead (the best it can do without the data plane).
        async with attacker_rank.pool.proving(challenge.nonce):
            await expect(
                enc.Register(
                    encoder_pb2.RegisterRequest(
                        language_id=attacker,
                        rank=0,
                        session=alias,
                        layout=victim_pool.layout,
                        proof_nonce=challenge.nonce,
                    )
                ),
                PD,
                "does not hold this registration's nonce",
            )
    # Without a registration nothing can be aimed at the victim's blocks.
    await expect(
        enc.Encode(
            encoder_pb2.EncodeRequest(
                request_id=rid(), synthetic_tokens=400, rank_count=1, language_id=attacker
            )
        ),
        FP,
        "has not called Register",
    )
    await expect(
        enc.Init(
            encoder_pb2.InitRequest(
                request_id=rid(),
                language_id=attacker,
                rank=0,
                rank_count=1,
                dst_blocks=list(range(32)),
                allocated_tokens=32 * BLOCK,
            )
        ),
        FP,
        "has not called Register",
    )
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))
    await generate_ok(lang)


async def test_register_without_a_challenge_or_with_a_made_up_nonce_is_refused(pair, attacker_rank):
    enc = encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(pair.encoder.address))
    request = attacker_rank.register_request(language_id=rid("attacker-lang"))
    await expect(enc.Register(request), FP, "call Challenge first")
    request.proof_nonce = os.urandom(32)
    await expect(enc.Register(request), FP, "no Challenge outstanding")
    await enc.Challenge(encoder_pb2.ChallengeRequest(language_id=request.language_id, rank=0))
    async with attacker_rank.pool.proving(request.proof_nonce):  # its own nonce, in its own pool
        await expect(enc.Register(request), PD, "not the nonce this encoder handed out")


# ------------------------------------------------------------------------------------ 2. bench surface


async def test_bench_rpcs_are_not_served_by_default(pair):
    """RawWrite used to be served by every encoder (on epd.v1.Encoder), MeasureLink by every
    language: both are UNIMPLEMENTED now, on their old and their new service."""
    async with (
        grpc.aio.insecure_channel(pair.encoder.address) as ech,
        grpc.aio.insecure_channel(pair.language.address) as lch,
    ):
        raw = bench_pb2.RawWriteRequest(
            language_id="x", rank=0, dst_blocks=[0], tokens=16, repeats=1
        )
        await expect(ech.unary_unary("/epd.v1.Encoder/RawWrite")(raw.SerializeToString()), UNIMPL)
        await expect(bench_pb2_grpc.BenchStub(ech).RawWrite(raw), UNIMPL)
        measure = bench_pb2.MeasureLinkRequest(tokens=16, repeats=1)
        await expect(
            lch.unary_unary("/epd.v1.Language/MeasureLink")(measure.SerializeToString()), UNIMPL
        )
        await expect(bench_pb2_grpc.BenchStub(lch).MeasureLink(measure), UNIMPL)


async def test_a_bench_write_sends_only_bytes_the_bench_wrote():
    """With --enable-bench, RawWrite into the caller's own pool: every byte that lands is the
    bench's pattern, never what earlier requests left in the encoder's freed source blocks."""
    encoder = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "8",
        "--enable-bench",
    )
    rank = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=16, language_id=rid("bench"))
    try:
        async with grpc.aio.insecure_channel(encoder.address) as ch:
            enc, bench = encoder_pb2_grpc.EncoderStub(ch), bench_pb2_grpc.BenchStub(ch)
            await rank.register(enc)
            # A "secret" payload fills every source block, then the transfer ends and frees them.
            secret = rid()
            await enc.Encode(rank.encode_request(secret, 8 * BLOCK, seed=11))
            await enc.Cancel(rank.cancel_request(secret))
            await assert_all_free((encoder.address, "encoder"))
            blocks = rank.alloc(8)
            await bench.RawWrite(
                bench_pb2.RawWriteRequest(
                    language_id=rank.language_id,
                    rank=0,
                    dst_blocks=blocks,
                    tokens=8 * BLOCK,
                    repeats=1,
                )
            )
            landed = torch.cat([rank.pool.slab[b].flatten() for b in blocks])
            assert bool((landed == 0xA5).all()), "the bench write carried bytes it did not write"
            rank.free(blocks)
            await assert_all_free((encoder.address, "encoder"))
    finally:
        rank.close()
        encoder.stop()


# ------------------------------------------------------------------------------------ 5. limits


async def test_the_per_peer_limit_cannot_be_bypassed_with_more_language_ids(pair, attacker_rank):
    """--max-transfers-per-peer 4 counts per language_id, which the caller picks: eight Encodes
    under eight made-up ids used to be accepted, each holding source blocks. Now an Encode names
    a language its caller registered (with proof), and the identity as a whole is bounded
    (--max-transfers-per-identity 6)."""
    enc = encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(pair.encoder.address))
    for _ in range(8):
        await expect(
            enc.Encode(
                encoder_pb2.EncodeRequest(
                    request_id=rid(), synthetic_tokens=100, rank_count=1, language_id=rid("made-up")
                )
            ),
            FP,
            "has not called Register",
        )
    second = TestRank(
        hidden=HIDDEN,
        block_size=BLOCK,
        num_blocks=8,
        language_id=rid("attacker-2"),
        transport=attacker_rank.transport,
    )
    ids: list = []
    try:
        await attacker_rank.register(enc)
        await second.register(enc)
        live = await enc.ListTransfers(common_pb2.ListTransfersRequest(states=[1, 2, 3]))
        room = 6 - len(live.transfers)  # plaintext: the victim language is this same identity
        ids, refused = [], []
        for i in range(8):
            rank = attacker_rank if i % 2 else second
            request_id = rid()
            try:
                await enc.Encode(rank.encode_request(request_id, 100))
                ids.append((rank, request_id))
            except grpc.aio.AioRpcError as e:
                assert e.code() == RE, e.details()
                refused.append(e.details())
        assert len(ids) == room and len(refused) == 8 - room, (room, len(ids), refused)
        assert all("max_transfers_per_identity=6" in d for d in refused), refused
    finally:
        for rank, request_id in ids:
            await enc.Cancel(rank.cancel_request(request_id))
        second.close()
    await assert_all_free((pair.encoder.address, "encoder"))


async def test_a_huge_block_list_is_refused_without_stalling_the_encoder(pair, attacker_rank):
    """An Init with ten million block ids (≈ 30 MB) used to be validated on the event loop for
    seconds. It is refused by its length against the registered pool, and the encoder keeps
    answering others meanwhile."""
    enc = encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(pair.encoder.address))
    await attacker_rank.register(enc)
    huge = encoder_pb2.InitRequest(
        request_id=rid(),
        language_id=attacker_rank.language_id,
        rank=0,
        rank_count=1,
        dst_blocks=range(10_000_000),
        allocated_tokens=BLOCK * 10_000_000,
    )
    loop = asyncio.get_running_loop()
    call = asyncio.ensure_future(
        expect(enc.Init(huge, timeout=60), IA, "10000000 dst_blocks for a pool of 32")
    )
    worst = 0.0
    while not call.done():
        started = loop.time()
        await enc.GetDiagnostics(common_pb2.GetDiagnosticsRequest(), timeout=30)
        worst = max(worst, loop.time() - started)
        await asyncio.sleep(0.02)
    await call
    # Generous: the old code stalled its loop ~4 s per such call on this machine.
    assert worst < 2.0, f"the encoder stalled {worst:.2f} s while refusing the list"
    await assert_all_free((pair.encoder.address, "encoder"))


def test_a_broken_rank_group_admits_nothing():
    group = rank_group.LocalGroup()
    group._break("rank 1 exited")
    with pytest.raises(rank_group.Unavailable) as e:
        group.admit("r1", 128, False)
    assert "rank group is broken" in e.value.message and "r1" in e.value.message


# ------------------------------------------------------------------------------------ 4. token pair


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    c = Certs(tmp_path_factory.mktemp("certs"))
    c.leaf("tenant-b", c.ca)
    c.leaf("ops", c.ca)
    return c


@pytest.fixture(scope="module")
def token_pair(certs):
    token = ("--auth-token-file", certs.path("token"))
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=64,
        encoder_args=(*token, "--metrics-port", str(free_port("127.0.0.1"))),
        language_args=token,
    )
    yield p
    p.stop()


async def test_inspection_and_reflection_need_the_token(token_pair):
    for address, stub_class in (
        (token_pair.encoder.address, encoder_pb2_grpc.EncoderStub),
        (token_pair.language.address, language_pb2_grpc.LanguageStub),
    ):
        async with grpc.aio.insecure_channel(address) as ch:
            stub = stub_class(ch)
            for call in (
                stub.ListTransfers(common_pb2.ListTransfersRequest()),
                stub.GetPool(common_pb2.GetPoolRequest()),
                stub.GetDiagnostics(common_pb2.GetDiagnosticsRequest()),
                stub.GetTransfer(common_pb2.GetTransferRequest(request_id="x")),
            ):
                await expect(call, UNAUTH)
            # Reflection, as the real grpcurl asks for it.
            listed = await asyncio.to_thread(
                subprocess.run,
                [GRPCURL, "-plaintext", address, "list"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert listed.returncode != 0 and "Unauthenticated" in listed.stderr, listed
            health = await ch.unary_unary("/grpc.health.v1.Health/Check")(b"")  # probes stay open
            assert health == b"\x08\x01"  # SERVING


async def test_refused_calls_are_counted_without_their_body_being_read(token_pair):
    """The refusal happens before the request is read, and still shows on the dashboard's
    "RPC errors by code" panel: epd_rpc_seconds_count{code="UNAUTHENTICATED"}."""

    def refused(method: str) -> float:
        url = f"http://127.0.0.1:{token_pair.encoder.info['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        found = re.findall(
            rf'^epd_rpc_seconds_count{{[^}}]*method="{method}"[^}}]*code="UNAUTHENTICATED"[^}}]*}} (\S+)$',
            text,
            re.M,
        ) + re.findall(
            rf'^epd_rpc_seconds_count{{[^}}]*code="UNAUTHENTICATED"[^}}]*method="{method}"[^}}]*}} (\S+)$',
            text,
            re.M,
        )
        return sum(float(v) for v in found)

    before = refused("Encode")
    async with grpc.aio.insecure_channel(token_pair.encoder.address) as ch:
        for _ in range(3):
            await expect(
                encoder_pb2_grpc.EncoderStub(ch).Encode(
                    encoder_pb2.EncodeRequest(request_id=rid(), synthetic_tokens=100, rank_count=1)
                ),
                UNAUTH,
            )
    assert refused("Encode") - before == 3


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def test_unauthenticated_big_requests_do_not_grow_memory(token_pair):
    """16 concurrent Generates of 48 MB each, without the token: all UNAUTHENTICATED, and the
    language does not buffer their bodies (it grew by ~900 MB before)."""
    pid = token_pair.language.proc.pid
    before = _rss(pid)
    body = language_pb2.GenerateRequest(
        request_id="big", images=[common_pb2.Image(data=b"\x89PNG" + bytes(48 << 20))]
    )
    async with grpc.aio.insecure_channel(
        token_pair.language.address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        stub = language_pb2_grpc.LanguageStub(ch)
        results = await asyncio.gather(
            *(stub.Generate(body, timeout=60) for _ in range(16)), return_exceptions=True
        )
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == UNAUTH for r in results), results
    growth = _rss(pid) - before
    assert growth < 256 << 20, f"the language grew by {growth >> 20} MB"


async def test_open_inspection_hides_sessions_and_addresses(certs):
    """--open-inspection lets a caller without the token look, but not at the way into the data
    plane: the pool's Mooncake session and base address are blanked for it."""
    token = ("--auth-token-file", certs.path("token"))
    encoder = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "32",
        "--open-inspection",
        *token,
    )
    try:
        async with grpc.aio.insecure_channel(encoder.address) as ch:
            pool = await encoder_pb2_grpc.EncoderStub(ch).GetPool(common_pb2.GetPoolRequest())
            assert (
                pool.session == ""
                and pool.layout.base_address == 0
                and pool.layout.num_blocks == 32
            )
        async with grpc.aio.insecure_channel(encoder.address, interceptors=None) as ch:
            pool = await encoder_pb2_grpc.EncoderStub(ch).GetPool(
                common_pb2.GetPoolRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
            assert (
                pool.session and pool.layout.base_address
            )  # the token holder is this instance's identity
    finally:
        encoder.stop()


# ------------------------------------------------------------------------------------ 6. two identities


@pytest.fixture(scope="module")
def mtls_pair(certs):
    enc = certs.service_args("encoder", token=None)
    lang = certs.service_args("language-a", token=None) + [
        "--admin-identity",
        "cert:ops",
        "--language-id",
        VICTIM,
    ]
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=512,
        language_blocks=64,
        encoder_args=enc,
        language_args=lang,
    )
    yield p
    p.stop()


async def test_only_the_caller_who_made_a_generate_can_see_or_cancel_it(certs, mtls_pair):
    """Tenant A's Generate (held: its payload is bigger than the language's pool, so it takes
    several rounds) is invisible to tenant B and cannot be cancelled by it; the operator named in
    --admin-identity sees it; A's Generate completes with the right digest."""
    address = mtls_pair.language.address
    tokens = 64 * BLOCK * 6
    async with (
        certs.client("client", token=None).aio_channel(address) as a_ch,
        certs.client("tenant-b", token=None).aio_channel(address) as b_ch,
        certs.client("ops", token=None).aio_channel(address) as ops_ch,
    ):
        a, b, ops = (language_pb2_grpc.LanguageStub(c) for c in (a_ch, b_ch, ops_ch))
        request_id = rid("tenant-a")
        call = asyncio.ensure_future(
            a.Generate(
                language_pb2.GenerateRequest(
                    request_id=request_id,
                    synthetic_tokens=tokens,
                    synthetic_seed=5,
                    want_digest=True,
                ),
                timeout=120,
            )
        )
        while True:  # until the Generate is known (A sees it)
            try:
                await a.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() == NF
                await asyncio.sleep(0.01)
        await expect(
            b.Cancel(common_pb2.CancelRequest(request_id=request_id, reason="hostile")), NF
        )
        await expect(b.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id)), NF)
        assert request_id not in {
            t.request_id
            for t in (await b.ListTransfers(common_pb2.ListTransfersRequest())).transfers
        }
        pool = await b.GetPool(common_pb2.GetPoolRequest())
        assert pool.session == "" and pool.layout.base_address == 0
        assert request_id in {
            t.request_id
            for t in (await ops.ListTransfers(common_pb2.ListTransfersRequest())).transfers
        }
        assert (await ops.GetPool(common_pb2.GetPoolRequest())).session
        reply = await call
        assert reply.payload_sha256 == expected_digest(tokens, 5, HIDDEN, "bfloat16")
        assert reply.rounds > 1
        # The operator may cancel anyone's: a second Generate of A's, cancelled by ops.
        second = rid("tenant-a")
        call = asyncio.ensure_future(
            a.Generate(
                language_pb2.GenerateRequest(request_id=second, synthetic_tokens=tokens),
                timeout=120,
            )
        )
        while True:
            try:
                cancelled = await ops.Cancel(
                    common_pb2.CancelRequest(request_id=second, reason="operator")
                )
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() == NF
                await asyncio.sleep(0.01)
        if cancelled.cancelled:
            await expect(call, grpc.StatusCode.CANCELLED)
        else:
            await call  # it had finished already
    ops_client = certs.client("ops", token=None)
    async with (
        ops_client.aio_channel(mtls_pair.encoder.address) as ech,
        ops_client.aio_channel(address) as lch,
    ):
        for stub in (encoder_pb2_grpc.EncoderStub(ech), language_pb2_grpc.LanguageStub(lch)):
            for _ in range(100):
                pool = await stub.GetPool(common_pb2.GetPoolRequest())
                if pool.used_blocks == 0 and not pool.quarantined_blocks:
                    break
                await asyncio.sleep(0.05)
            assert (
                pool.used_blocks == 0
                and pool.quarantined_blocks == 0
                and pool.free_blocks == pool.layout.num_blocks
            )


async def test_a_transfer_id_under_another_instances_prefix_is_refused(certs, mtls_pair):
    """The language names its transfers LANGUAGE_ID/REQUEST_ID. Another identity, with a proven
    registration of its own, must not pre-create ids under the victim's prefix (the victim's
    Generate of that id would find it taken), by Encode or by Init."""
    attacker = TestRank(
        hidden=HIDDEN, block_size=BLOCK, num_blocks=16, language_id=rid("tenant-b-lang")
    )
    try:
        async with certs.client("tenant-b", token=None).aio_channel(
            mtls_pair.encoder.address
        ) as ch:
            enc = encoder_pb2_grpc.EncoderStub(ch)
            await attacker.register(enc)
            taken = f"{VICTIM}/next-request"
            await expect(
                enc.Encode(
                    encoder_pb2.EncodeRequest(
                        request_id=taken,
                        synthetic_tokens=100,
                        rank_count=1,
                        language_id=attacker.language_id,
                    )
                ),
                PD,
                "prefix",
            )
            blocks = attacker.alloc(8)
            await expect(enc.Init(attacker.init_request(taken, blocks)), PD, "prefix")
            attacker.free(blocks)
            # ... nor act as the victim by naming its language_id.
            await expect(
                enc.Encode(
                    encoder_pb2.EncodeRequest(
                        request_id=taken, synthetic_tokens=100, rank_count=1, language_id=VICTIM
                    )
                ),
                FP,
                "has not called Register",
            )
            pool = await enc.GetPool(common_pb2.GetPoolRequest())
            assert pool.used_blocks == 0
            assert not (
                await enc.ListTransfers(common_pb2.ListTransfersRequest())
            ).transfers  # none of its own
    finally:
        attacker.close()
    async with certs.client("client", token=None).aio_channel(mtls_pair.language.address) as ch:
        await generate_ok(language_pb2_grpc.LanguageStub(ch))


# ------------------------------------------------------------------------------------ 8. exposure


def test_the_mooncake_listeners_wider_than_host_are_reported(pair):
    log = pair.encoder.stderr_tail(400)
    assert "listens on:" in log and f"gRPC {pair.encoder.address}" in log, log[-2000:]
    assert "listen(s) on every interface" in log and "Mooncake" in log, log[-2000:]


async def test_registrations_are_bounded_per_identity_and_the_idle_oldest_gives_way():
    """--max-sessions-per-identity 2: a third registration of the same identity replaces its least
    recently used idle one (which registers again when it needs to), while a registration in use
    by a live transfer is never dropped: then the newcomer gets RESOURCE_EXHAUSTED."""
    encoder = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--block-size",
        str(BLOCK),
        "--pool-blocks",
        "32",
        "--max-sessions-per-identity",
        "2",
    )
    ranks = [
        TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=8, language_id=rid(f"bounded-{i}"))
        for i in range(3)
    ]
    try:
        async with grpc.aio.insecure_channel(encoder.address) as ch:
            enc = encoder_pb2_grpc.EncoderStub(ch)
            first, second, third = ranks
            await first.register(enc)
            await second.register(enc)
            busy = rid()
            await enc.Encode(
                second.encode_request(busy, 200)
            )  # the second is in use: waiting for a Resume
            await enc.Init(second.init_request(busy, second.alloc(4)))
            await third.register(enc)  # replaces the first (idle, oldest)
            await expect(
                enc.Init(first.init_request(rid(), first.alloc(1))), FP, "has not called Register"
            )
            also_busy = rid()
            await enc.Encode(third.encode_request(also_busy, 200))
            await enc.Init(third.init_request(also_busy, third.alloc(4)))
            await expect(
                first.register(enc), RE, "max_sessions_per_identity=2"
            )  # both others in use
            await enc.Cancel(second.cancel_request(busy))
            await enc.Cancel(third.cancel_request(also_busy))
            await first.register(enc)  # idle ones give way again
            await assert_all_free((encoder.address, "encoder"))
    finally:
        for rank in ranks:
            rank.close()
        encoder.stop()


async def test_a_pool_claimed_past_the_end_of_the_address_space_is_invalid_argument(
    pair, attacker_rank
):
    """A base address near 2**64 used to make the proof read's address overflow inside the
    engine's binding (UNKNOWN, a TypeError); it is bad input, named."""
    enc = encoder_pb2_grpc.EncoderStub(grpc.aio.insecure_channel(pair.encoder.address))
    layout = attacker_rank.layout()
    layout.base_address = 2**64 - 4096
    await expect(
        attacker_rank.register_claiming(enc, language_id=rid("overflow"), layout=layout),
        IA,
        "base_address 0xfffffffffffff000",
        "64-bit address space",
    )
