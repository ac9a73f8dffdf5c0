"""Property-based fuzzing of every RPC of both services on live processes (hostile input).

Random, out-of-range, huge, empty, duplicated and out-of-order inputs go to every Encoder and
Language RPC of a real encoder + language pair (small pools: hidden 64, 16-token blocks,
`--max-request-tokens 5000`). The properties, checked for every example (docs/DESIGN.md):

- no crash: both processes stay alive and health stays SERVING;
- bad input gets its domain code (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
  FAILED_PRECONDITION ...), never UNKNOWN, INTERNAL or a transport-level code, and a non-empty
  message naming the offending field or value; where the right answer is known exactly (an oracle
  written from docs/DESIGN.md), the exact code and the words of the message are checked;
- valid requests mixed in succeed (and are cleaned up);
- afterwards nothing changed: both pools fully free, no live transfer (`assert_all_free`), no
  open Status stream (GetDiagnostics), the test rank's own pool free; every Status stream ends (a
  hanging one fails by timeout); at the very end the services' asyncio task counts are back to
  where they started.

Besides one test per RPC (and a stateful one: Init/Encode/Resume/Cancel/Status in any order on
one request id) there are tests at the wire level: unusual but valid encodings (fields out of
order, singular fields repeated, explicit defaults, packed/unpacked/split repeated fields,
unknown fields) must mean exactly what the canonical encoding means, and undecodable bodies are
INVALID_ARGUMENT; plus very long strings, whose echo in an error message must not outgrow gRPC's
metadata limit, and gigantic dst_blocks lists, which must be refused without stalling the encoder.

Each hypothesis example runs on one event loop owned by the module (`Live.run`), with channels
that live as long as the module. `database=None` keeps hypothesis from writing into the repo;
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from common.pb.epd.v1 import (
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
)
from services.tools.reference_payload import expected_digest
from tests.conftest import Pair, assert_all_free
from tests.integration.rank_harness import TestRank

HIDDEN = 64
BLOCK = 16
MAX_TOKENS = 5000
BIG_RANK_BLOCKS = 26_000
ENCODER_BLOCKS = 1024
LANGUAGE_BLOCKS = 64
INITIAL_TOKENS = 256
RANK_BLOCKS = 64

U32 = 2**32 - 1
U64 = 2**64 - 1

BOOTSTRAPPING, WAITING, TRANSFERRING, SUCCESS, FAILED = 1, 2, 3, 4, 5
TERMINAL = (SUCCESS, FAILED)

OK = None  # "the call succeeds", in expectations
C = grpc.StatusCode
IA, NF, AE, FP, CANCELLED = (
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.ALREADY_EXISTS,
    C.FAILED_PRECONDITION,
    C.CANCELLED,
)
PD = C.PERMISSION_DENIED
NEVER = {C.UNKNOWN, C.INTERNAL, C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.UNIMPLEMENTED, C.DATA_LOSS}

MAGIC = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
}  # what the encoder accepts

pytestmark = pytest.mark.timeout(300)


def fuzz(n: int):
    """hypothesis settings for live-process fuzzing: n examples, no deadline, no database."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# ---------------------------------------------------------------------------- live processes

LANGUAGE_ID = f"fuzz-language-{uuid.uuid4().hex[:8]}"
"""The language process's id: its transfers on the encoder are its own (ownership)."""


class Live:
    """The module's pair, its test rank (and a big one), and one event loop with long-lived
    channels."""

    def __init__(self, pair: Pair, rank: TestRank, big: TestRank):
        self.pair = pair
        self.rank = rank
        self.big = big
        self.loop = asyncio.new_event_loop()
        self.run(self._open())

    async def _open(self) -> None:
        self.enc_ch = grpc.aio.insecure_channel(self.pair.encoder.address)
        self.lang_ch = grpc.aio.insecure_channel(self.pair.language.address)
        self.enc = encoder_pb2_grpc.EncoderStub(self.enc_ch)
        self.lang = language_pb2_grpc.LanguageStub(self.lang_ch)
        await self.rank.register(self.enc)
        self.baseline = await diagnostics(self)

    def run(self, coro, timeout: float = 60.0):
        """Run one example's coroutine; a hang fails instead of hanging the suite."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        async def _close():
            await self.enc_ch.close()
            await self.lang_ch.close()

        self.run(_close())
        self.loop.close()

    @property
    def language_id(self) -> str:
        return self.rank.language_id


@pytest.fixture(scope="module")
def pair():
    p = Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=ENCODER_BLOCKS,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL_TOKENS,
        # Every accepted fuzzed Register adds a registration: room for all of them.
        encoder_args=(
            "--max-request-tokens",
            str(MAX_TOKENS),
            "--max-sessions-per-identity",
            "100000",
            "--max-sessions",
            "100000",
        ),
        language_args=("--language-id", LANGUAGE_ID),
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def live(pair):
    rank = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=RANK_BLOCKS)
    # A big pool (~66 MB) for the Init of 25,001 block ids; made with the test rank, before the
    # encoder first reads or writes this process's memory (Mooncake caches what a session has).
    big = TestRank(hidden=HIDDEN, block_size=BLOCK, num_blocks=BIG_RANK_BLOCKS)
    lv = Live(pair, rank, big)
    yield lv
    lv.close()
    big.close()
    rank.close()


# ---------------------------------------------------------------------------- checks


async def outcome(awaitable, timeout: float = 20.0):
    """(reply, None) or (None, AioRpcError); a call that does not answer in time fails the test."""
    try:
        return await asyncio.wait_for(awaitable, timeout), None
    except grpc.aio.AioRpcError as e:
        return None, e
    except TimeoutError:
        raise AssertionError(f"call did not answer within {timeout} s") from None


def show(e: grpc.aio.AioRpcError | None) -> str:
    return "OK" if e is None else f"{e.code().name}: {(e.details() or '')[:300]!r}"


class AnyOf(tuple):
    """A needle satisfied by any one of its strings."""


def check_error(
    e, code: grpc.StatusCode | set | None, needles=(), what: str = "", any_of=()
) -> None:
    """The call failed with `code` (or one of a set), a non-empty message containing every needle
    and, if `any_of` is given, at least one of those."""
    codes = code if isinstance(code, (set, frozenset, tuple)) else {code}
    assert e is not None, f"{what}: expected {sorted(c.name for c in codes)}, the call succeeded"
    got = e.code()
    assert got not in NEVER, f"{what}: bad input answered with {show(e)}"
    assert got in codes, f"{what}: expected {sorted(c.name for c in codes)}, got {show(e)}"
    details = e.details() or ""
    assert details.strip(), f"{what}: {got.name} with an empty message"
    for needle in needles:
        if isinstance(needle, AnyOf):
            assert any(n in details for n in needle), (
                f"{what}: {got.name} message names none of {list(needle)}: {details[:500]!r}"
            )
        else:
            assert str(needle) in details, (
                f"{what}: {got.name} message does not name {needle!r}: {details[:500]!r}"
            )
    if any_of:
        assert any(str(n) in details for n in any_of), (
            f"{what}: {got.name} message names none of {list(any_of)}: {details[:500]!r}"
        )


def check_expected(reply, e, expect, what: str) -> None:
    """expect = (None,) for success or (code, needles...)."""
    code, *needles = expect
    if code is OK:
        assert e is None, f"{what}: expected success, got {show(e)}"
    else:
        check_error(e, code, needles, what)


async def health(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        r = await asyncio.wait_for(stub.Check(health_pb2.HealthCheckRequest(service="")), 10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: health {r.status}"


async def invariants(lv: Live, settle_s: float = 5.0) -> None:
    """No crash, SERVING, every pool free, no live transfer, the test rank holds nothing."""
    for p in (lv.pair.encoder, lv.pair.language):
        assert p.proc.poll() is None, (
            f"{p.role} died (exit {p.proc.returncode}):\n{p.stderr_tail()}"
        )
    await health(lv.pair.encoder.address)
    await health(lv.pair.language.address)
    deadline = asyncio.get_running_loop().time() + settle_s
    while True:  # a refused Generate's clean-up on the encoder may still be finishing
        try:
            await assert_all_free(
                (lv.pair.encoder.address, "encoder"), (lv.pair.language.address, "language")
            )
            enc, lang = await diagnostics(lv)
            assert enc.live_transfers == 0 and lang.live_transfers == 0, (
                f"live transfers: {enc} {lang}"
            )
            assert enc.status_streams == 0, (
                f"encoder Status streams still open: {enc.status_streams}"
            )
            break
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert lv.rank.used_blocks == 0, f"test rank still holds {lv.rank.used_blocks} blocks"


async def diagnostics(lv: Live):
    """GetDiagnostics of the encoder and the language service."""
    req = common_pb2.GetDiagnosticsRequest()
    return await lv.enc.GetDiagnostics(req, timeout=10), await lv.lang.GetDiagnostics(
        req, timeout=10
    )


async def absent(stub, request_id: str) -> None:
    _, e = await outcome(stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id)))
    check_error(e, NF, (), f"GetTransfer of {request_id[:60]!r} (must not exist)")


async def cancel_and_check(stub, request_id: str, what: str, language_id: str) -> None:
    """Cancel a transfer a valid request opened (it may have ended already), as its owner
    `language_id`: it must be terminal after."""
    reply, e = await outcome(
        stub.Cancel(
            common_pb2.CancelRequest(
                request_id=request_id, reason="fuzz clean-up", language_id=language_id
            )
        )
    )
    assert e is None, f"{what}: Cancel failed: {show(e)}"
    info = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    assert info.state in TERMINAL, f"{what}: state {info.state} after Cancel"


async def drain_status(call, timeout: float = 10.0) -> tuple[list, grpc.aio.AioRpcError | None]:
    """Every status of a stream that must end within `timeout`."""
    seen = []

    async def pump():
        async for st_ in call:
            seen.append(st_)

    try:
        await asyncio.wait_for(pump(), timeout)
    except grpc.aio.AioRpcError as e:
        return seen, e
    except TimeoutError:
        call.cancel()
        raise AssertionError(  # noqa: B904 - the timeout is the finding
            f"Status stream did not end within {timeout} s (statuses {[s.state for s in seen]})"
        )
    return seen, None


async def first_status(call, timeout: float = 10.0):
    """The first status of a stream (or its error), then the stream is closed from our side."""
    try:
        async for st_ in _aiter_timeout(call, timeout):
            return st_, None
        return None, None
    except grpc.aio.AioRpcError as e:
        return None, e
    finally:
        call.cancel()


async def _aiter_timeout(call, timeout):
    it = call.__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise AssertionError(f"no status within {timeout} s") from None


def unique(prefix: str = "") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------- strategies

# Long enough to be long, short enough that an error message echoing two of them stays under gRPC's 8 KiB
# soft metadata limit (longer values are test_very_long_strings_get_their_domain_code's business).
WEIRD = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n\r",
    "../../../etc/passwd",
    "%s%s%n%x",
    "'; DROP TABLE t;--",
    "💥",
    "🧨" * 30,
    "\u202eevil",
    "名前",
    "\ufeff",
    "\U0010ffff",
    "e\u0301",
    "a" * 1000,
    "é" * 300,
    ":",
    "::",
    "[::1]:80",
    "null",
    "None",
    "-1",
    str(U32),
    str(U64),
    '{"json": 1}',
    "\\",
    "'\"",
    "\r\n\r\n",
]
utf8 = st.characters(codec="utf-8")
strange = st.one_of(
    st.sampled_from(WEIRD),
    st.text(utf8, max_size=48),
    st.text(
        st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "So", "Mn", "Co"]), max_size=24
    ),
)
uint32 = st.one_of(
    st.sampled_from([0, 1, 2, 15, 16, 17, 63, 64, 65, 2**31 - 1, 2**31, U32 - 1, U32]),
    st.integers(0, U32),
)
uint64 = st.one_of(
    st.sampled_from([0, 1, 16, 2**32, 2**63 - 1, 2**63, U64 - 1, U64]), st.integers(0, U64)
)
int32 = st.one_of(
    st.sampled_from([-(2**31), -1, 0, 6, 7, 42, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1)
)

big_random_bytes = st.integers(0, 2**16).map(lambda s: random.Random(s).randbytes(1 << 20))
image_data = st.one_of(
    st.builds(
        lambda m, b: m + b,
        st.sampled_from([b"", *MAGIC.values(), b"GIF89a", b"\x89PNG", b"\xff\xd8"]),
        st.binary(max_size=64),
    ),
    big_random_bytes,
    st.builds(lambda m, b: m + b, st.sampled_from(list(MAGIC.values())), big_random_bytes),
)
mime = st.one_of(
    st.sampled_from(["", "image/png", "image/jpeg", "image/gif", "text/plain", "IMAGE/PNG"]),
    strange,
)
images = st.lists(
    st.builds(lambda d, m: common_pb2.Image(data=d, mime_type=m), image_data, mime), max_size=3
)
texts = st.one_of(
    st.just(""),
    strange,
    st.text(utf8, max_size=400),
    st.integers(MAX_TOKENS - 3, MAX_TOKENS + 3).map(lambda n: "x" * n),
    st.integers(1, 1700).map(lambda n: "€" * n),
)  # 3 bytes per character
synthetic = st.one_of(
    st.just(0),
    st.integers(1, 300),
    st.integers(1, MAX_TOKENS),
    st.sampled_from([MAX_TOKENS, MAX_TOKENS + 1, 2**31, U32]),
    st.integers(MAX_TOKENS + 1, U32),
)


def image_problem(imgs) -> tuple | None:
    """The encoder's answer to images when synthetic_tokens == 0 (PNG/JPEG, no VLM)."""
    for i, im in enumerate(imgs):
        if not im.data:
            return (IA, f"images[{i}]")
        kind = next((k for k, m in MAGIC.items() if im.data.startswith(m)), None)
        if kind is None:
            return (IA, f"images[{i}]")
        if im.mime_type and im.mime_type != kind:
            return (IA, f"images[{i}]", "mime_type")
    if imgs:
        return (FP, "images[0]", "vision tower")
    return None


def token_expectation(synthetic_tokens: int, text: str, imgs) -> tuple[tuple | None, int]:
    """(error expectation or None, total tokens) of a request's payload (synthetic wins)."""
    if synthetic_tokens > 0:
        total = synthetic_tokens
    else:
        bad = image_problem(imgs)
        if bad:
            return bad, 0
        total = len(text.encode("utf-8"))
    if total < 1:
        return (IA, "synthetic_tokens=0"), 0
    if total > MAX_TOKENS:
        return (IA, str(total), str(MAX_TOKENS)), total
    return None, total


def _prefix_problem(lv: Live, request_id: str):
    """A new transfer id shaped `LANGUAGE_ID/...` needs a prefix the caller registered: None when
    fine, (PD, ...) when not, "unknown" for a prefix an earlier Register example may have taken."""
    prefix, slash, _ = request_id.partition("/")
    if not slash or prefix in (lv.language_id, LANGUAGE_ID):
        return None
    return "unknown" if prefix.startswith("fzreg-") else (PD, "prefix")


# ---------------------------------------------------------------------------- Encoder.Encode


@fuzz(120)
@given(
    id_kind=st.sampled_from(["fresh"] * 5 + ["empty"]),
    prefix=strange,
    synthetic_tokens=synthetic,
    seed=uint32,
    text=texts,
    imgs=images,
    rank_count=uint32,
    language=st.one_of(st.just("real"), strange),
)
def test_fuzz_encode(
    live, id_kind, prefix, synthetic_tokens, seed, text, imgs, rank_count, language
):
    async def case():
        request_id = "" if id_kind == "empty" else unique(prefix)
        req = encoder_pb2.EncodeRequest(
            request_id=request_id,
            images=imgs,
            text=text,
            synthetic_tokens=synthetic_tokens,
            synthetic_seed=seed,
            rank_count=rank_count,
            language_id=live.language_id if language == "real" else language,
        )
        bad, total = token_expectation(synthetic_tokens, text, imgs)
        if not request_id:
            bad = (IA, "request_id")
        elif req.language_id not in ("", live.language_id):
            bad = (
                FP,
                "has not called Register",
            )  # an Encode names a language its caller registered
        elif _prefix_problem(live, request_id):
            bad = _prefix_problem(live, request_id)
            if bad == "unknown":
                return
        reply, e = await outcome(live.enc.Encode(req))
        note(f"Encode -> {show(e)}")
        if bad:
            check_expected(reply, e, bad, "Encode")
            if request_id:
                await absent(live.enc, request_id)
        else:
            assert e is None, f"valid Encode ({total} tokens) failed: {show(e)}"
            assert reply.total_tokens == total and reply.request_id == request_id
            info = await live.enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
            assert info.total_tokens == total and info.state in (BOOTSTRAPPING, WAITING), info
            await cancel_and_check(live.enc, request_id, "Encode", req.language_id)
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- Encoder.Register


def _good_layout(lv: Live) -> common_pb2.PoolLayout:
    return lv.rank.layout()


def _session_ok(session: str) -> bool:
    host, _, port = session.rpartition(":")
    if not host or any(c.isspace() for c in session):
        return False
    try:
        return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    except ValueError:
        return False


sessions = st.one_of(
    strange,
    st.sampled_from(
        [
            "127.0.0.1:9",
            "127.0.0.1:0",
            "127.0.0.1:1",
            "127.0.0.1:65535",
            "127.0.0.1:65536",
            ":80",
            "h:",
            "h: 80",
            "h:0080",
            "h:+80",
            "h:-1",
            "h:80 ",
            "[::1]:80",
            "a:b:c:80",
            "💥:80",
            "h:99999999999999999999",
            "h\x00:80",
            "h:\u00b2",
        ]
    ),
    st.builds(
        lambda h, port: f"{h}:{port}",
        st.text(utf8, min_size=1, max_size=12),
        st.integers(-5, 70000),
    ),
)


def _proof_addresses(layout: common_pb2.PoolLayout) -> tuple[int, int]:
    """Where a claimed pool's proof areas are, by the protocol's definition (encoder.proto
    ChallengeReply): 1024 bytes right before its blocks, and right after them."""
    end = layout.base_address + layout.num_blocks * layout.block_size * layout.record_bytes
    return layout.base_address - 1024, end


async def _proven_register(lv: Live, req: encoder_pb2.RegisterRequest):
    """Register as a real rank does (Challenge, the nonce in the test rank's proof area), whatever
    `req` claims; (reply, error) of the Register (or of the Challenge, when it is refused)."""
    challenge, e = await outcome(
        lv.enc.Challenge(encoder_pb2.ChallengeRequest(language_id=req.language_id, rank=req.rank))
    )
    if e is not None:
        return None, e
    req.proof_nonce = challenge.nonce
    async with lv.rank.pool.proving(challenge.nonce):
        return await outcome(lv.enc.Register(req))


REGISTER_MUTATIONS = [
    # one mutation of an otherwise valid RegisterRequest per example; the expectation is set in the test
    "none",
    "language_id_empty",
    "session",
    "no_layout",
    "block_size",
    "num_blocks",
    "base_address",
    "no_fields",
    "dtype",
    "bytes_per_token",
    "offset",
    "shape",
    "shape_consistent",
    "rename",
    "swap",
    "duplicate_field",
    "record_bytes",
    "extra_field",
    "rank",
]


@fuzz(160)
@given(
    mutation=st.sampled_from(REGISTER_MUTATIONS),
    lang=strange,
    session=sessions,
    value32=uint32,
    value64=uint64,
    shape=st.lists(
        st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, -1, 1, 3, 64, 2**62]), max_size=4
    ),
    dtype=st.one_of(
        st.sampled_from(["", "float64", "int8", "bf16", "bfloat16", "int32", "float32", "uint8"]),
        strange,
    ),
    field_index=st.integers(0, 2),
    rank=uint32,
)
def test_fuzz_register(
    live, mutation, lang, session, value32, value64, shape, dtype, field_index, rank
):
    async def case():
        language_id = (
            "fzreg-" + lang
        )  # never the test rank's id: a taken Register must not disturb it
        # Every example describes the test rank's pool, on its real session, with its proof.
        req = encoder_pb2.RegisterRequest(
            language_id=language_id, rank=rank, session=live.rank.session, layout=_good_layout(live)
        )
        lay = req.layout
        f = lay.fields[field_index]
        expect: tuple = (OK,)
        any_of: tuple = ()
        if mutation == "language_id_empty":
            req.language_id, expect = "", (IA, "language_id")
        elif mutation == "session":
            req.session = session
            expect = (OK,) if _session_ok(session) else (IA, "session")
        elif mutation == "no_layout":
            req.ClearField("layout")
            expect = (IA, "layout")
        elif mutation == "block_size":
            lay.block_size = value32
            expect = (
                (OK,)
                if value32 >= 1 and value32 & (value32 - 1) == 0
                else (IA, "block_size", value32)
            )
        elif mutation == "num_blocks":
            lay.num_blocks = value32
            expect = (OK,) if value32 >= 1 else (IA, "num_blocks")
        elif mutation == "base_address":
            lay.base_address = value64
            end = (
                value64 + lay.num_blocks * lay.block_size * lay.record_bytes + 1024
            )  # + the proof area
            expect = (OK,) if value64 and end <= 2**64 else (IA, "base_address")
        elif mutation == "no_fields":
            del lay.fields[:]
            expect = (IA, "fields")
        elif mutation == "dtype":
            f.dtype = dtype
            expect = (
                (OK,) if dtype == ("bfloat16" if field_index == 0 else "int32") else ({IA, FP},)
            )
            any_of = ("dtype", f.name)
        elif mutation == "bytes_per_token":
            f.bytes_per_token = value64
            good = _good_layout(live).fields[field_index].bytes_per_token
            expect = (OK,) if value64 == good else (IA, "bytes_per_token", value64)
        elif mutation == "offset":
            f.offset = value64
            good = _good_layout(live).fields[field_index].offset
            expect = (OK,) if value64 == good else ({IA, FP}, "offset")
        elif mutation == "shape":
            del f.per_token_shape[:]
            f.per_token_shape.extend(shape)
            good = list(_good_layout(live).fields[field_index].per_token_shape)
            expect = (OK,) if shape == good else ({IA, FP},)
            any_of = ("per_token_shape", "bytes_per_token", f.name)
        elif (
            mutation == "shape_consistent"
        ):  # bytes_per_token recomputed: only the encoder's layout differs
            dims = [abs(d) % 7 + 1 for d in shape] or [5]
            del f.per_token_shape[:]
            f.per_token_shape.extend(dims)
            size = {"bfloat16": 2, "int32": 4}[f.dtype]
            n = 1
            for d in dims:
                n *= d
            f.bytes_per_token = size * n
            lay.record_bytes = max(
                lay.record_bytes, max(x.offset + x.bytes_per_token for x in lay.fields)
            )
            good = list(_good_layout(live).fields[field_index].per_token_shape)
            expect = (
                (OK,)
                if dims == good and lay.record_bytes == _good_layout(live).record_bytes
                else ({IA, FP},)
            )
            any_of = ("per_token_shape", "record_bytes", "offset", f.name)
        elif mutation == "rename":
            f.name = lang
            expect = (
                (OK,) if lang == _good_layout(live).fields[field_index].name else (FP, "fields")
            )
        elif mutation == "swap":
            a, b = common_pb2.FieldLayout(), common_pb2.FieldLayout()
            a.CopyFrom(lay.fields[0])
            b.CopyFrom(lay.fields[field_index])
            lay.fields[0].CopyFrom(b)
            lay.fields[field_index].CopyFrom(a)
            expect = (OK,) if field_index == 0 else (FP, "fields")
        elif mutation == "duplicate_field":
            lay.fields.add().CopyFrom(f)
            expect = ({IA, FP},)
            any_of = ("fields", f.name)
        elif mutation == "record_bytes":
            lay.record_bytes = value64
            good = _good_layout(live).record_bytes
            expect = (OK,) if value64 == good else ({IA, FP}, "record_bytes")
        elif mutation == "extra_field":
            extra = lay.fields.add(
                name=lang or "extra",
                dtype="uint8",
                per_token_shape=[1],
                bytes_per_token=1,
                offset=lay.record_bytes,
            )
            lay.record_bytes += 16
            expect = ({IA, FP},)
            any_of = ("fields", "record_bytes", extra.name)
        elif mutation == "rank":
            req.rank = rank
        if expect[0] is OK and (
            req.session != live.rank.session
            or _proof_addresses(req.layout) != _proof_addresses(_good_layout(live))
        ):
            # A well-formed claim on memory where the nonce is not: another session (nothing of
            # ours listens there), or a pool whose ends are not where the test rank put it.
            expect = (PD, "Mooncake session")
        reply, e = await _proven_register(live, req)
        note(f"Register[{mutation}] -> {show(e)}")
        code, *needles = expect
        if code is OK:
            assert e is None, f"valid Register ({mutation}) failed: {show(e)}"
            assert reply.encoder_id
            assert [x.name for x in reply.layout.fields] == [
                "embeddings",
                "token_ids",
                "mrope_positions",
            ]
            assert reply.layout.block_size == BLOCK and reply.layout.num_blocks == ENCODER_BLOCKS
        else:
            check_error(e, code, needles, f"Register[{mutation}]", any_of=any_of)
        await invariants(live)

    live.run(case())


@pytest.mark.parametrize(
    "session",
    ["127.0.0.1:\u00b2", "127.0.0.1:\u0668\u0660", "127.0.0.1:\uff18\uff10"],
    ids=["superscript-two", "arabic-indic-80", "fullwidth-80"],
)
def test_register_session_port_must_be_ascii_digits(live, session):
    """A Mooncake session is 'host:port' with a decimal port 1..65535. Python's
    str.isdigit() also accepts '²' (int() then raises: UNKNOWN) and other scripts' digits (which
    Mooncake cannot parse): all must be INVALID_ARGUMENT naming the session."""

    async def case():
        req = encoder_pb2.RegisterRequest(
            language_id=unique("fzreg-port"), rank=0, session=session, layout=_good_layout(live)
        )
        _, e = await outcome(live.enc.Register(req))
        check_error(e, IA, ("session",), f"Register with session={session!r}")
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- Encoder.Init

BLOCK_KINDS = ["valid"] * 4 + [
    "empty",
    "dup",
    "out_of_range",
    "gigantic_dups",
    "gigantic_out",
    "gigantic_late_out",
]
ALLOC_KINDS = ["consistent"] * 4 + ["plus_one", "minus_one", "zero", "max", "random"]


@st.composite
def dst_blocks(draw, num_blocks: int = RANK_BLOCKS) -> tuple[str, list[int]]:
    kind = draw(st.sampled_from(BLOCK_KINDS))
    valid = draw(st.lists(st.integers(0, num_blocks - 1), min_size=1, max_size=8, unique=True))
    if kind == "valid":
        return kind, valid
    if kind == "empty":
        return kind, []
    if kind == "dup":
        pos = draw(st.integers(0, len(valid)))
        return kind, valid[:pos] + [draw(st.sampled_from(valid))] + valid[pos:]
    if kind == "out_of_range":
        bad = draw(
            st.one_of(
                st.sampled_from([num_blocks, num_blocks + 1, U32]), st.integers(num_blocks, U32)
            )
        )
        pos = draw(st.integers(0, len(valid) - 1))
        return kind, valid[:pos] + [bad] + valid[pos + 1 :]
    n = draw(st.sampled_from([10_000, 100_000, 1_000_000]))
    if kind == "gigantic_dups":
        return kind, [i % num_blocks for i in range(n)]
    if kind == "gigantic_out":
        return kind, [U32] * n
    return kind, [i % num_blocks for i in range(n)] + [U32]  # gigantic_late_out


def allocated_for(kind: str, blocks: list[int], random_value: int) -> int:
    good = len(blocks) * BLOCK
    return {
        "consistent": good,
        "plus_one": good + 1,
        "minus_one": max(good - 1, 0),
        "zero": 0,
        "max": U64,
        "random": random_value,
    }[kind]


def allocation_problem(
    blocks: list[int], allocated: int, num_blocks: int = RANK_BLOCKS
) -> tuple | None:
    """Init/Resume: allocated_tokens == len(blocks) * block_size, ids inside the pool, no
    repeats. With one fault the message must name it; with several, any one of them (the order
    the service checks them in is its own business)."""
    out = [b for b in blocks if b >= num_blocks]
    seen, dups = set(), []
    for b in blocks:
        if b in seen:
            dups.append(b)
        seen.add(b)
    faults = []
    if not blocks:
        faults.append(("dst_blocks",))
    if len(blocks) > num_blocks:
        faults.append(("dst_blocks", str(len(blocks))))
    if allocated != len(blocks) * BLOCK:
        faults.append((f"allocated_tokens={allocated}",))
    if out:
        faults.append((str(out[0]), "out of range"))
    if dups:
        faults.append((str(dups[0]), "more than once"))
    if not faults:
        return None
    if len(faults) == 1:
        return (IA, *faults[0])
    return (
        IA,
        AnyOf(["dst_blocks", "dst block", f"allocated_tokens={allocated}", *map(str, out[:3])]),
    )


@fuzz(120)
@given(
    id_kind=st.sampled_from(["fresh"] * 6 + ["empty"]),
    prefix=strange,
    lang_kind=st.sampled_from(["real"] * 6 + ["empty", "other"]),
    other=strange,
    rank=st.one_of(st.just(0), st.just(0), uint32),
    rank_count=st.one_of(st.sampled_from([0, 1, 1, 1, 2, U32]), uint32),
    blocks=dst_blocks(),
    alloc_kind=st.sampled_from(ALLOC_KINDS),
    alloc_random=uint64,
)
def test_fuzz_init(
    live, id_kind, prefix, lang_kind, other, rank, rank_count, blocks, alloc_kind, alloc_random
):
    block_kind, block_list = blocks
    allocated = allocated_for(alloc_kind, block_list, alloc_random)

    async def case():
        request_id = "" if id_kind == "empty" else unique(prefix)
        language_id = {"real": live.language_id, "empty": "", "other": "unregistered-" + other}[
            lang_kind
        ]
        req = encoder_pb2.InitRequest(
            request_id=request_id,
            language_id=language_id,
            rank=rank,
            rank_count=rank_count,
            dst_blocks=block_list,
            allocated_tokens=allocated,
        )
        if not request_id:
            expect = (IA, "request_id")
        elif rank_count < 1:
            expect = (IA, "rank_count=0")
        elif lang_kind == "empty":
            expect = (IA, "language_id is empty")
        elif lang_kind != "real" or rank != 0:
            expect = (FP, f"rank {rank}", "Register")
        else:
            expect = (
                allocation_problem(block_list, allocated)
                or _prefix_problem(live, request_id)
                or (OK,)
            )
            if expect == "unknown":
                return
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply, e = await outcome(live.enc.Init(req))
        note(
            f"Init[{block_kind}, {len(block_list)} ids, allocated {allocated}] -> {show(e)} "
            f"in {loop.time() - started:.2f} s"
        )
        check_expected(reply, e, expect, f"Init[{block_kind}/{alloc_kind}]")
        if expect[0] is OK:
            assert reply.state == (WAITING if rank_count == 1 else BOOTSTRAPPING), reply
            info = await live.enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
            assert [r.rank for r in info.ranks] == [0] and info.allocated_tokens == allocated
            await cancel_and_check(live.enc, request_id, "Init", live.language_id)
        elif request_id:
            await absent(live.enc, request_id)
        await invariants(live)

    live.run(case())


async def _big_peer(lv: Live) -> str:
    """A registered language with a big pool (the module's `big` rank: same record layout, 26,000
    blocks) that nothing is ever written to."""
    language_id = unique("fzreg-bigpool")
    await lv.big.register(lv.enc, language_id=language_id)
    return language_id


@pytest.mark.parametrize("n", [25_000])
def test_gigantic_dst_blocks_with_a_late_duplicate_is_refused_quickly(live, n):
    """A peer with a big pool sends n distinct block ids and then a repeat of the first: the Init
    must be refused with INVALID_ARGUMENT at once, and the encoder must keep answering others
    (health) meanwhile: validation must not be quadratic in len(dst_blocks)."""

    async def case():
        language_id = await _big_peer(live)
        blocks = list(range(n)) + [0]
        req = encoder_pb2.InitRequest(
            request_id=unique("gigantic"),
            language_id=language_id,
            rank=0,
            rank_count=1,
            dst_blocks=blocks,
            allocated_tokens=len(blocks) * BLOCK,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        init = asyncio.ensure_future(outcome(live.enc.Init(req), timeout=120))
        await asyncio.sleep(0.05)
        probe_started = loop.time()
        await health(live.pair.encoder.address)
        probe_s = loop.time() - probe_started
        reply, e = await init
        elapsed = loop.time() - started
        check_error(e, IA, ("more than once",), "Init with a late duplicate")
        assert elapsed < 2.0 and probe_s < 1.0, (
            f"Init of {n + 1} block ids took {elapsed:.1f} s and blocked the encoder "
            f"(a health check waited {probe_s:.1f} s)"
        )
        await absent(live.enc, req.request_id)
        await invariants(live)

    live.run(case(), timeout=180)


# ---------------------------------------------------------------------------- Encoder.Resume (on a held transfer)


async def hold_round_1(lv: Live, n: int = 40, seed: int = 3):
    """Init with one block, a Status reader, Encode n tokens: the transfer waits for Resume after 16."""
    request_id = unique("held")
    blocks = lv.rank.alloc(1)
    await lv.enc.Init(lv.rank.init_request(request_id, blocks))
    call = lv.enc.Status(lv.rank.status_request(request_id))
    await lv.enc.Encode(lv.rank.encode_request(request_id, n, seed))
    async for st_ in _aiter_timeout(call, 10):
        if st_.state == TRANSFERRING:
            assert st_.sent_tokens == BLOCK
            break
        assert st_.state not in TERMINAL, st_
    return request_id, blocks, call


async def snapshot(stub, request_id: str) -> tuple:
    t = await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
    return (
        t.state,
        t.sent_tokens,
        t.total_tokens,
        t.rounds,
        t.allocated_tokens,
        t.bytes,
        t.peer,
        t.error.reason,
        t.error.message,
        tuple((r.rank, r.state, r.sent_tokens, r.allocated_tokens, r.session) for r in t.ranks),
    )


async def pool_state(stub) -> tuple:
    p = await stub.GetPool(common_pb2.GetPoolRequest())
    return p.used_blocks, p.free_blocks, p.waiters


@fuzz(80)
@given(
    id_kind=st.sampled_from(["held"] * 6 + ["empty", "unknown"]),
    prefix=strange,
    lang_kind=st.sampled_from(["real"] * 5 + ["empty", "other"]),
    other=strange,
    rank=st.one_of(st.just(0), st.just(0), st.just(0), uint32),
    sent=st.one_of(
        st.just(BLOCK),
        st.just(BLOCK),
        st.sampled_from([0, 1, BLOCK - 1, BLOCK + 1, 40, 41, U64]),
        uint64,
    ),
    blocks=dst_blocks(),
    alloc_kind=st.sampled_from(ALLOC_KINDS),
    alloc_random=uint64,
)
def test_fuzz_resume(
    live, id_kind, prefix, lang_kind, other, rank, sent, blocks, alloc_kind, alloc_random
):
    block_kind, block_list = blocks

    async def case():
        request_id, first, call = await hold_round_1(live)
        held = list(first)
        new_blocks = list(block_list)
        if (
            block_kind == "valid"
        ):  # real free blocks of the test rank, so a taken Resume writes into them
            got = live.rank.alloc(len(new_blocks))
            held += got
            new_blocks = got
        allocated = allocated_for(alloc_kind, new_blocks, alloc_random)
        target = {"held": request_id, "empty": "", "unknown": unique(prefix)}[id_kind]
        language_id = {"real": live.language_id, "empty": "", "other": "unregistered-" + other}[
            lang_kind
        ]
        req = encoder_pb2.ResumeRequest(
            request_id=target,
            language_id=language_id,
            rank=rank,
            sent_tokens=sent,
            dst_blocks=new_blocks,
            allocated_tokens=allocated,
        )
        if not target:
            expect = (IA, "request_id")
        elif id_kind == "unknown":
            expect = (NF, "request_id")
        elif lang_kind == "empty":
            expect = (IA, "language_id is empty")
        elif lang_kind == "other":
            expect = (PD, target)  # another instance's request
        elif rank != 0:
            expect = (FP, f"rank {rank}")
        elif sent > BLOCK:
            expect = (FP, f"sent_tokens={sent}")
        elif sent < BLOCK:
            expect = ("duplicate",)
        else:
            expect = allocation_problem(new_blocks, allocated) or (OK,)
        before, pool_before = await snapshot(live.enc, request_id), await pool_state(live.enc)
        reply, e = await outcome(live.enc.Resume(req))
        note(f"Resume[{id_kind}, sent={sent}, {block_kind}/{alloc_kind}] -> {show(e)}")
        try:
            if expect[0] == "duplicate":
                assert e is None and reply.duplicate, (
                    f"an old Resume must be a no-op, got {show(e)} {reply}"
                )
            elif expect[0] is OK:
                assert e is None and not reply.duplicate, f"valid Resume failed: {show(e)}"
            else:
                check_expected(reply, e, expect, f"Resume[{block_kind}/{alloc_kind}]")
            if expect[0] is not OK:  # nothing changed
                assert await snapshot(live.enc, request_id) == before
                assert await pool_state(live.enc) == pool_before
        finally:
            await cancel_and_check(live.enc, request_id, "Resume", live.language_id)
            _, err = await drain_status(call)
            assert err is None, f"Status of the held transfer ended with {show(err)}"
            live.rank.free(held)
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- lookups on both services


@fuzz(120)
@given(
    service=st.sampled_from(["encoder", "language"]),
    rpc=st.sampled_from(
        ["GetTransfer", "Cancel", "Status", "Resume", "ListTransfers", "GetPool", "GetDiagnostics"]
    ),
    id_kind=st.sampled_from(["unknown"] * 4 + ["empty"]),
    prefix=strange,
    reason=strange,
    rank=uint32,
    states=st.lists(st.one_of(st.integers(0, 5), int32), max_size=6),
    limit=uint32,
)
def test_fuzz_lookups(live, service, rpc, id_kind, prefix, reason, rank, states, limit):
    """GetTransfer, Cancel, Status, Resume, ListTransfers, GetPool with ids nobody used, empty ids,
    unknown enum values and huge limits."""

    async def case():
        stub = live.enc if service == "encoder" else live.lang
        request_id = "" if id_kind == "empty" else unique(prefix)
        missing = (IA, "request_id") if not request_id else (NF, "request_id")
        what = f"{service}.{rpc}"
        if rpc in ("Status", "Resume") and service == "language":
            return  # the Language service has no such RPC
        if rpc == "GetTransfer":
            reply, e = await outcome(
                stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
            )
            check_expected(reply, e, missing, what)
        elif rpc == "Cancel":
            reply, e = await outcome(
                stub.Cancel(common_pb2.CancelRequest(request_id=request_id, reason=reason))
            )
            check_expected(reply, e, missing, what)
        elif rpc == "Status":
            seen, e = await drain_status(
                stub.Status(encoder_pb2.StatusRequest(request_id=request_id, rank=rank))
            )
            assert not seen
            check_expected(None, e, missing, what)
        elif rpc == "Resume":
            reply, e = await outcome(
                stub.Resume(
                    encoder_pb2.ResumeRequest(
                        request_id=request_id,
                        language_id=live.language_id,
                        rank=rank,
                        sent_tokens=rank,
                        dst_blocks=[rank],
                        allocated_tokens=BLOCK,
                    )
                )
            )
            check_expected(reply, e, missing, what)
        elif rpc == "ListTransfers":
            reply, e = await outcome(
                stub.ListTransfers(common_pb2.ListTransfersRequest(states=states, limit=limit))
            )
            unknown = next((s for s in states if not 0 <= s <= 5), None)
            if unknown is not None:
                check_error(e, IA, ("states", str(unknown)), what)
            else:
                assert e is None, f"{what}: {show(e)}"
                if limit:
                    assert len(reply.transfers) <= limit
                if states:
                    assert all(t.state in states for t in reply.transfers)
        elif rpc == "GetDiagnostics":
            reply, e = await outcome(stub.GetDiagnostics(common_pb2.GetDiagnosticsRequest()))
            assert e is None, f"{what}: {show(e)}"
            assert reply.live_transfers == 0 and reply.threads >= 1 and reply.rss_bytes > 0, reply
        else:
            reply, e = await outcome(stub.GetPool(common_pb2.GetPoolRequest()))
            assert e is None, f"{what}: {show(e)}"
            assert reply.layout.block_size == BLOCK and reply.used_blocks == 0
        note(f"{what} -> {show(e)}")
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- out-of-order sequences on one request

OPS = st.one_of(
    st.tuples(st.just("init"), st.sampled_from([1, 1, 1, 2]), st.integers(1, 4)),
    st.tuples(
        st.just("encode"), st.sampled_from([1, 15, 16, 17, 40, 100, 0, MAX_TOKENS + 1]), uint32
    ),
    st.tuples(
        st.just("resume"),
        st.sampled_from(["current", "current", "ahead", "zero", "huge"]),
        st.integers(0, 4),
    ),
    st.tuples(st.just("cancel"), strange),
    st.tuples(st.just("status"), st.sampled_from([99, 99, U32, 0])),
    st.tuples(st.just("get"), st.just(0)),
    st.tuples(st.just("list"), st.just(0)),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.01, 0.05])),
)
SEQ_CODES = {
    "init": {IA, FP, AE},
    "encode": {IA, FP, AE},
    "resume": {IA, FP, NF},
    "cancel": {NF},
    "status": {NF},
    "get": {NF},
    "list": set(),
}


@fuzz(120)
@given(ops=st.lists(OPS, min_size=1, max_size=8))
@example(ops=[("resume", "current", 1), ("init", 1, 1), ("encode", 40, 1)])  # Resume before Init
@example(
    ops=[("init", 1, 1), ("cancel", "x"), ("init", 1, 1), ("encode", 40, 1)]
)  # Init after Cancel
@example(ops=[("encode", 40, 1), ("cancel", "integrity: fuzz"), ("encode", 40, 1), ("init", 1, 2)])
@example(
    ops=[
        ("status", 99),
        ("init", 2, 1),
        ("status", 0),
        ("encode", 100, 3),
        ("resume", "current", 2),
    ]
)
def test_fuzz_out_of_order(live, ops):
    """Any order of Init, Encode, Resume, Cancel, Status, GetTransfer on one request id: every
    answer is success or a domain code with a message, the request's Status stream ends once it
    is cancelled, and everything is free afterwards."""

    async def case():
        request_id = unique("seq")
        held: list[int] = []
        rank = live.rank
        try:
            for op, a, *rest in ops:
                b = rest[0] if rest else None
                e = None
                if op == "init":
                    blocks = rank.alloc(b)
                    _, e = await outcome(
                        live.enc.Init(rank.init_request(request_id, blocks, rank_count=a))
                    )
                    if e is None:
                        held += blocks
                    else:
                        rank.free(blocks)
                elif op == "encode":
                    _, e = await outcome(live.enc.Encode(rank.encode_request(request_id, a, b)))
                elif op == "resume":
                    info, _ = await outcome(
                        live.enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
                    )
                    current = info.sent_tokens if info is not None else 0
                    sent = {"current": current, "ahead": current + 1, "zero": 0, "huge": U64}[a]
                    blocks = rank.alloc(b) if b else []
                    reply, e = await outcome(
                        live.enc.Resume(rank.resume_request(request_id, sent, blocks))
                    )
                    if e is None and not reply.duplicate:
                        held += blocks
                    else:
                        rank.free(blocks)
                elif op == "cancel":
                    _, e = await outcome(live.enc.Cancel(rank.cancel_request(request_id, a)))
                elif op == "status":
                    _, e = await first_status(
                        live.enc.Status(
                            encoder_pb2.StatusRequest(
                                request_id=request_id, rank=a, language_id=rank.language_id
                            )
                        )
                    )
                elif op == "get":
                    _, e = await outcome(
                        live.enc.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id))
                    )
                elif op == "list":
                    _, e = await outcome(live.enc.ListTransfers(common_pb2.ListTransfersRequest()))
                else:
                    await asyncio.sleep(a)
                note(f"{op}({a}, {b}) -> {show(e)}")
                if e is not None:
                    check_error(e, SEQ_CODES[op], (), f"{op} in {ops}")
        finally:
            _, e = await outcome(live.enc.Cancel(rank.cancel_request(request_id, "done")))
            if e is None:
                seen, err = await drain_status(
                    live.enc.Status(
                        encoder_pb2.StatusRequest(
                            request_id=request_id, rank=99, language_id=rank.language_id
                        )
                    )
                )
                assert err is None and seen and seen[-1].state in TERMINAL, (
                    f"Status after Cancel: {[s.state for s in seen]} {show(err)}"
                )
            else:
                check_error(e, NF, (), "final Cancel")
            rank.free(held)
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- Language.Generate

STRANGER_REASONS = [
    "",
    "fuzz",
    "integrity: stranger",
    "timeout: stranger",
    "transport: x",
    "peer_lost: x",
    "resource_exhausted: x",
    "invalid: x",
    "unspecified: x",
    "INTEGRITY",
    "cancelled",
]
FAILURE_CODES = {  # the code a request failed on the encoder with this CancelRequest.failure ends with
    "FAILURE_REASON_UNSPECIFIED": CANCELLED,
    "FAILURE_REASON_TIMEOUT": C.DEADLINE_EXCEEDED,
    "FAILURE_REASON_CANCELLED": CANCELLED,
    "FAILURE_REASON_TRANSPORT": C.UNAVAILABLE,
    "FAILURE_REASON_INTEGRITY": C.DATA_LOSS,
    "FAILURE_REASON_RESOURCE_EXHAUSTED": C.RESOURCE_EXHAUSTED,
    "FAILURE_REASON_PEER_LOST": C.UNAVAILABLE,
    "FAILURE_REASON_INVALID": IA,
}
UNKNOWN_FAILURE = 99  # not a FailureReason: the Cancel itself is refused


async def until_known(stub, request_id: str, gen: asyncio.Future, timeout: float = 5.0) -> None:
    """Wait until `stub`'s service knows the request (or the Generate ended), to interrupt it mid-way."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not gen.done() and asyncio.get_running_loop().time() < deadline:
        try:
            await stub.GetTransfer(common_pb2.GetTransferRequest(request_id=request_id), timeout=5)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.002)


def failure_code(failure: int) -> grpc.StatusCode:
    """The code a request cancelled on the encoder with CancelRequest.failure ends with (the
    free-text reason never matters)."""
    return FAILURE_CODES[common_pb2.FailureReason.Name(failure)]


@fuzz(100)
@given(
    id_kind=st.sampled_from(["fresh"] * 6 + ["empty", "too_long", "exactly_128"]),
    prefix=st.text(utf8, max_size=16),
    content=st.sampled_from(["synthetic"] * 3 + ["text", "images", "nothing", "images+synthetic"]),
    synthetic_tokens=synthetic,
    seed=uint32,
    text=texts,
    imgs=images,
    expected_tokens=uint64,
    want_digest=st.booleans(),
    mode=st.sampled_from(["once"] * 4 + ["cancel", "twice", "deadline", "enc_cancel"]),
    delay=st.floats(0, 0.05),
    stranger_reason=st.one_of(st.sampled_from(STRANGER_REASONS), strange),
    stranger_failure=st.sampled_from([*common_pb2.FailureReason.values(), UNKNOWN_FAILURE]),
    busy_tokens=st.integers(1, MAX_TOKENS),
)
@example(
    id_kind="fresh",
    prefix="",
    content="synthetic",
    synthetic_tokens=MAX_TOKENS,
    seed=U32,
    text="",
    imgs=[],
    expected_tokens=U64,
    want_digest=True,
    mode="once",
    delay=0.0,
    stranger_reason="",
    stranger_failure=0,
    busy_tokens=1,
)
@example(
    id_kind="fresh",
    prefix="",
    content="synthetic",
    synthetic_tokens=3000,
    seed=1,
    text="",
    imgs=[],
    expected_tokens=0,
    want_digest=True,
    mode="twice",
    delay=0.0,
    stranger_reason="",
    stranger_failure=0,
    busy_tokens=1,
)
def test_fuzz_generate(
    live,
    id_kind,
    prefix,
    content,
    synthetic_tokens,
    seed,
    text,
    imgs,
    expected_tokens,
    want_digest,
    mode,
    delay,
    stranger_reason,
    stranger_failure,
    busy_tokens,
):
    """Generate with any inputs; sometimes cancelled while it runs (by its client, or by a stranger
    calling the encoder's Cancel with any reason), sometimes with a tiny client deadline, sometimes
    sent twice at once with the same request id (one runs, the other is refused: the id is in use)."""
    if mode in (
        "cancel",
        "enc_cancel",
        "deadline",
    ):  # something worth interrupting: a valid, often multi-round request
        content, synthetic_tokens = "synthetic", busy_tokens

    async def case():
        uid = uuid.uuid4().hex[:10]
        request_id = {
            "fresh": f"{prefix}-{uid}",
            "empty": "",
            "too_long": f"{prefix}{'x' * 129}{uid}",
            "exactly_128": uid + "é" * ((128 - len(uid)) // 2),
        }[id_kind]
        n = synthetic_tokens if "synthetic" in content else 0
        req = language_pb2.GenerateRequest(
            request_id=request_id,
            synthetic_tokens=n,
            synthetic_seed=seed,
            expected_tokens=expected_tokens,
            want_digest=want_digest,
            text=text if content == "text" else "",
            images=imgs if "images" in content else [],
        )
        if len(request_id.encode()) > 128:
            expect, total = (IA, "request_id", "128"), 0
        else:
            bad, total = token_expectation(req.synthetic_tokens, req.text, req.images)
            expect = bad or (OK,)

        def check_one(reply, e, what):
            if expect[0] is not OK:
                return check_expected(reply, e, expect, what)
            assert e is None, f"{what}: valid Generate ({total} tokens) failed: {show(e)}"
            assert reply.total_tokens == total and reply.integrity_verified, reply
            assert reply.request_id == (request_id or reply.request_id) and reply.request_id
            assert reply.rounds == 1 if total <= INITIAL_TOKENS else reply.rounds >= 2, reply
            if want_digest:
                if n:
                    assert reply.payload_sha256 == expected_digest(total, seed, HIDDEN), (
                        "wrong payload digest"
                    )
                else:
                    assert len(reply.payload_sha256) == 64

        if mode != "deadline":
            gen = asyncio.ensure_future(outcome(live.lang.Generate(req), timeout=30))
        if mode == "twice":
            await asyncio.sleep(delay / 10)
            second = await outcome(live.lang.Generate(req), timeout=30)
            first = await gen
            note(f"Generate x2 [{content}, {total} tokens] -> {show(first[1])}, {show(second[1])}")
            e = second[1]
            if (
                not request_id or expect[0] is not OK
            ):  # independent requests, or refused before the id matters
                for k, (reply, e) in enumerate((first, second)):
                    if e is not None and e.code() == AE and request_id:
                        check_error(e, AE, (), f"Generate #{k + 1}")
                    else:
                        check_one(reply, e, f"Generate #{k + 1}")
            else:
                ran = [o for o in (first, second) if o[1] is None]
                assert ran, (
                    f"neither Generate of {request_id!r} ran: {show(first[1])}, {show(second[1])}"
                )
                check_one(*ran[0], "Generate")
                for reply, e in (first, second):
                    if (
                        e is not None
                    ):  # the one that came while the id was in use (or after it ended)
                        check_error(e, {AE, FP}, (), "the second Generate of one request id")
        elif mode == "deadline":
            reply, e = await outcome(live.lang.Generate(req, timeout=delay * 4 + 0.001), timeout=30)
            note(
                f"Generate[{content}, {total} tokens] with a {delay * 4 + 0.001:.3f} s deadline -> {show(e)}"
            )
            if e is not None and e.code() in (C.DEADLINE_EXCEEDED, CANCELLED):
                pass  # the client's deadline passed: the services must still clean up (invariants below)
            else:
                check_one(reply, e, f"Generate[{content}] with a deadline")
        elif mode == "enc_cancel" and request_id and expect[0] is OK:
            await until_known(live.enc, request_id, gen)
            await asyncio.sleep(delay / 5)
            # As the language instance itself (only the owner may Cancel on the encoder).
            _, cancel_e = await outcome(
                live.enc.Cancel(
                    common_pb2.CancelRequest(
                        request_id=request_id,
                        reason=stranger_reason,
                        language_id=LANGUAGE_ID,
                        failure=stranger_failure,
                    )
                )
            )
            reply, e = await gen
            note(
                f"Generate -> {show(e)}; encoder Cancel({stranger_reason[:40]!r}, "
                f"failure={stranger_failure}) -> {show(cancel_e)}"
            )
            if stranger_failure == UNKNOWN_FAILURE:
                # Refused, naming the value; the request goes on as if nothing happened.
                assert cancel_e is not None and cancel_e.code() in (IA, NF), show(cancel_e)
                assert cancel_e.code() == NF or str(UNKNOWN_FAILURE) in cancel_e.details()
                check_one(reply, e, "Generate after a refused encoder Cancel")
            elif cancel_e is not None:
                check_error(cancel_e, NF, (), "encoder Cancel of a request it has not seen yet")
            if stranger_failure == UNKNOWN_FAILURE:
                pass
            elif e is None:
                check_one(reply, e, "Generate cancelled on the encoder too late")
            else:
                # The language reports the reason the encoder failed the request with (Cancel
                # carries it as CancelRequest.failure), or refuses a request whose id the encoder
                # already ended.
                allowed = {failure_code(stranger_failure), FP, IA, AE, CANCELLED}
                assert e.code() in allowed, (
                    f"Generate cancelled on the encoder: {show(e)}, expected one of {allowed}"
                )
                assert (e.details() or "").strip(), "error without a message"
        elif mode == "cancel" and request_id and expect[0] != IA:
            await until_known(live.lang, request_id, gen)
            await asyncio.sleep(delay / 5)
            _, cancel_e = await outcome(
                live.lang.Cancel(common_pb2.CancelRequest(request_id=request_id, reason="fuzz"))
            )
            reply, e = await gen
            note(f"Generate[{content}, {total} tokens] -> {show(e)}; Cancel -> {show(cancel_e)}")
            if cancel_e is not None:
                check_error(cancel_e, NF, (), "Cancel of a Generate not yet admitted")
            if e is not None and e.code() == CANCELLED:
                assert (e.details() or "").strip(), "CANCELLED without a message"
            else:
                check_one(reply, e, f"Generate[{content}] with a Cancel")
        else:
            reply, e = await gen
            note(f"Generate[{content}, {total} tokens] -> {show(e)}")
            check_one(reply, e, f"Generate[{content}]")
        event(f"mode={mode}: {'OK' if e is None else e.code().name}")
        await invariants(live)

    live.run(case())


# ---------------------------------------------------------------------------- the wire: unusual encodings


def _varint(n: int) -> bytes:
    n &= U64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _value(fd, value, rnd: random.Random) -> tuple[int, bytes]:
    """(wire type, encoded value) of one element."""
    t = fd.type
    if t == FD.TYPE_STRING:
        raw = value.encode("utf-8")
        return 2, _varint(len(raw)) + raw
    if t == FD.TYPE_BYTES:
        return 2, _varint(len(value)) + value
    if t == FD.TYPE_MESSAGE:
        raw = scramble(value, rnd)
        return 2, _varint(len(raw)) + raw
    if t == FD.TYPE_DOUBLE:
        return 1, struct.pack("<d", value)
    return 0, _varint(int(value))  # (u)int32/64, enum, bool; negatives sign-extended to 10 bytes


def _decoy(fd, rnd: random.Random):
    t = fd.type
    if t == FD.TYPE_STRING:
        return "".join(rnd.choice("abcé💥\x00") for _ in range(rnd.randint(0, 8)))
    if t == FD.TYPE_BYTES:
        return rnd.randbytes(rnd.randint(0, 8))
    if t == FD.TYPE_BOOL:
        return rnd.random() < 0.5
    if t == FD.TYPE_DOUBLE:
        return rnd.random()
    if t in (FD.TYPE_INT64, FD.TYPE_INT32, FD.TYPE_ENUM):
        return rnd.randint(-(2**31), 2**31 - 1)
    return rnd.randint(0, U32 if t == FD.TYPE_UINT32 else U64)


def scramble(msg, rnd: random.Random) -> bytes:
    """A valid but unusual encoding of `msg`: fields in random order, singular scalars sent twice
    (a decoy first: the last one wins), explicit defaults, repeated scalars packed, unpacked or
    split across several packed runs, and unknown fields of every wire type in between."""
    queues: list[list[bytes]] = []
    for fd in msg.DESCRIPTOR.fields:
        chunks: list[bytes] = []
        if fd.is_repeated:
            values = list(getattr(msg, fd.name))
            if not values:
                continue
            packable = fd.type not in (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE)
            if packable and rnd.random() < 0.6:
                runs, i = [], 0
                while i < len(values):
                    j = rnd.randint(i + 1, len(values))
                    runs.append(values[i:j])
                    i = j
                for run in runs:
                    body = b"".join(_value(fd, v, rnd)[1] for v in run)
                    chunks.append(_key(fd.number, 2) + _varint(len(body)) + body)
            else:
                for v in values:
                    wt, body = _value(fd, v, rnd)
                    chunks.append(_key(fd.number, wt) + body)
        elif fd.type == FD.TYPE_MESSAGE:
            if not msg.HasField(fd.name):
                continue
            wt, body = _value(fd, getattr(msg, fd.name), rnd)
            chunks.append(_key(fd.number, wt) + body)
        else:
            value = getattr(msg, fd.name)
            if rnd.random() < 0.5:
                wt, body = _value(fd, _decoy(fd, rnd), rnd)
                chunks.append(_key(fd.number, wt) + body)
            if chunks or value != fd.default_value or rnd.random() < 0.3:
                wt, body = _value(fd, value, rnd)
                chunks.append(_key(fd.number, wt) + body)
        if chunks:
            queues.append(chunks)
    known = {fd.number for fd in msg.DESCRIPTOR.fields}
    for _ in range(rnd.randint(0, 4)):
        number = rnd.choice(
            [n for n in (rnd.randint(1, 40), rnd.randint(1000, 2**29 - 1)) if n not in known]
            or [999]
        )
        wt = rnd.choice([0, 1, 2, 5])
        body = {0: _varint(rnd.randint(0, U64)), 1: rnd.randbytes(8), 5: rnd.randbytes(4)}.get(wt)
        if body is None:
            junk = rnd.randbytes(rnd.randint(0, 32))
            body = _varint(len(junk)) + junk
        queues.append([_key(number, wt) + body])
    out = bytearray()
    while queues:
        q = rnd.choice(queues)
        out += q.pop(0)
        if not q:
            queues.remove(q)
    return bytes(out)


@st.composite
def wire_cases(draw):
    """(service, method, request message, response is a stream): requests with no lasting effect."""
    rid = draw(st.sampled_from(["", "fz-wire-unknown-" + draw(st.text(utf8, max_size=8))]))
    reason = draw(strange)
    states = draw(st.lists(st.one_of(st.integers(0, 5), int32), max_size=5))
    kind = draw(
        st.sampled_from(
            [
                "enc.Encode",
                "enc.Register",
                "enc.Init",
                "enc.Resume",
                "enc.Status",
                "enc.GetTransfer",
                "enc.ListTransfers",
                "enc.Cancel",
                "enc.GetPool",
                "enc.GetDiagnostics",
                "lang.Generate",
                "lang.GetTransfer",
                "lang.ListTransfers",
                "lang.Cancel",
                "lang.GetPool",
                "lang.GetDiagnostics",
            ]
        )
    )
    n = draw(uint32)
    if kind == "enc.Encode":
        msg = encoder_pb2.EncodeRequest(
            request_id=rid,
            synthetic_tokens=draw(st.integers(MAX_TOKENS + 1, U32)),
            synthetic_seed=n,
            rank_count=n,
            language_id=reason,
            text=reason,
        )
    elif kind == "enc.Register":
        lay = common_pb2.PoolLayout(
            block_size=draw(st.sampled_from([0, 3, 16])),
            num_blocks=n,
            base_address=n,
            record_bytes=n,
            fields=[
                common_pb2.FieldLayout(
                    name=reason,
                    dtype="bfloat16",
                    per_token_shape=[HIDDEN, -1],
                    bytes_per_token=n,
                    offset=n,
                )
            ],
        )
        msg = encoder_pb2.RegisterRequest(
            language_id=draw(st.sampled_from(["", "fzreg-wire"])),
            rank=n,
            session=reason,
            layout=lay,
        )
    elif kind == "enc.Init":
        msg = encoder_pb2.InitRequest(
            request_id=rid or "x",
            language_id="unregistered-wire",
            rank=n,
            rank_count=n,
            dst_blocks=draw(st.lists(uint32, max_size=20)),
            allocated_tokens=n,
        )
    elif kind == "enc.Resume":
        msg = encoder_pb2.ResumeRequest(
            request_id=rid,
            language_id=reason,
            rank=n,
            sent_tokens=n,
            dst_blocks=draw(st.lists(uint32, max_size=20)),
            allocated_tokens=n,
        )
    elif kind == "enc.Status":
        msg = encoder_pb2.StatusRequest(request_id=rid, rank=n)
    elif kind.endswith("GetTransfer"):
        msg = common_pb2.GetTransferRequest(request_id=rid)
    elif kind.endswith("ListTransfers"):
        msg = common_pb2.ListTransfersRequest(states=states, limit=n)
    elif kind.endswith("Cancel"):
        msg = common_pb2.CancelRequest(request_id=rid, reason=reason)
    elif kind.endswith("GetPool"):
        msg = common_pb2.GetPoolRequest()
    elif kind.endswith("GetDiagnostics"):
        msg = common_pb2.GetDiagnosticsRequest()
    else:  # lang.Generate, refused before anything starts
        too_long = draw(st.booleans())
        msg = language_pb2.GenerateRequest(
            request_id=("y" * 129) if too_long else "fz-wire-generate",
            synthetic_tokens=n if too_long else 0,
            synthetic_seed=n,
            expected_tokens=n,
            want_digest=draw(st.booleans()),
        )
    service, method = kind.split(".")
    path = f"/epd.v1.{'Encoder' if service == 'enc' else 'Language'}/{method}"
    return service, path, msg, method == "Status"


async def raw_call(lv: Live, service: str, path: str, body: bytes, stream: bool):
    """(code, details, reply bytes) of a call whose request is sent as raw bytes."""
    ch = lv.enc_ch if service == "enc" else lv.lang_ch
    try:
        if stream:
            call = ch.unary_stream(path)(body, timeout=20)
            replies = [r async for r in call]
            return C.OK, "", replies
        return C.OK, "", await ch.unary_unary(path)(body, timeout=20)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", None


@fuzz(160)
@given(case=wire_cases(), seed=st.integers(0, 2**32))
def test_fuzz_wire_encoding(live, case, seed):
    """An unusual but valid encoding of a request means exactly what the canonical one means."""
    service, path, msg, stream = case
    body = scramble(msg, random.Random(seed))
    parsed = type(msg)()
    parsed.ParseFromString(body)
    parsed.DiscardUnknownFields()
    assert parsed == msg, "the test's encoder is wrong"

    async def case_():
        code_a, details_a, reply_a = await raw_call(
            live, service, path, msg.SerializeToString(), stream
        )
        code_b, details_b, reply_b = await raw_call(live, service, path, body, stream)
        note(
            f"{path}: canonical -> {code_a.name} {details_a[:200]!r}; scrambled -> {code_b.name} {details_b[:200]!r}"
        )
        for code, details in ((code_a, details_a), (code_b, details_b)):
            assert code not in NEVER, f"{path}: {code.name}: {details!r}"
            if code != C.OK:
                assert details.strip(), f"{path}: {code.name} with an empty message"
        assert code_b == code_a and details_b == details_a, (
            f"{path}: the scrambled encoding was answered differently: {code_b.name} vs {code_a.name}"
        )
        if path.endswith("GetPool"):
            assert reply_a == reply_b
        await invariants(live)

    live.run(case_())


UNDECODABLE = {
    "corrupt": b"\xff\xff\xff",
    "truncated-varint": b"\x10\x80",
    "length-past-end": b"\x0a\x05ab",
    "bad-utf8-in-string": b"\x0a\x02\xff\xfe",
    "field-number-0": b"\x00\x01",
    "end-group-without-start": b"\x0c",
    "length-2GB": b"\x0a\xff\xff\xff\xff\x07",
}
METHODS = [
    ("enc", "Encode", encoder_pb2.EncodeRequest),
    ("enc", "Register", encoder_pb2.RegisterRequest),
    ("enc", "Init", encoder_pb2.InitRequest),
    ("enc", "Resume", encoder_pb2.ResumeRequest),
    ("enc", "Status", encoder_pb2.StatusRequest),
    ("enc", "GetTransfer", common_pb2.GetTransferRequest),
    ("enc", "ListTransfers", common_pb2.ListTransfersRequest),
    ("enc", "Cancel", common_pb2.CancelRequest),
    ("enc", "GetPool", common_pb2.GetPoolRequest),
    ("enc", "GetDiagnostics", common_pb2.GetDiagnosticsRequest),
    ("lang", "Generate", language_pb2.GenerateRequest),
    ("lang", "GetTransfer", common_pb2.GetTransferRequest),
    ("lang", "ListTransfers", common_pb2.ListTransfersRequest),
    ("lang", "Cancel", common_pb2.CancelRequest),
    ("lang", "GetPool", common_pb2.GetPoolRequest),
    ("lang", "GetDiagnostics", common_pb2.GetDiagnosticsRequest),
]


def test_undecodable_request_bodies_are_invalid_argument(live):
    """A request body that is not a valid protobuf of the method's type is bad input like any
    other: INVALID_ARGUMENT with a message, for every RPC of both services, not UNKNOWN (what
    grpc answers when the generated deserializer raises before any service code runs)."""

    async def case():
        wrong = []
        for service, method, cls in METHODS:
            path = f"/epd.v1.{'Encoder' if service == 'enc' else 'Language'}/{method}"
            for name, body in UNDECODABLE.items():
                try:
                    cls.FromString(body)
                    continue  # this body happens to be valid for this type (e.g. an unknown field)
                except Exception:  # noqa: BLE001 - invalid for this type, as intended
                    pass
                code, details, _ = await raw_call(live, service, path, body, method == "Status")
                if code != IA or not details.strip():
                    wrong.append(f"{path} [{name}]: {code.name} {details[:110]!r}")
        await invariants(live)
        assert not wrong, (
            f"{len(wrong)} undecodable bodies answered without INVALID_ARGUMENT:\n  "
            + "\n  ".join(wrong)
        )

    live.run(case())


# ---------------------------------------------------------------------------- very long strings

LONG = 20_000


def test_very_long_strings_get_their_domain_code(live):
    """A 20 000-character request id (or other string) is bad input like any other: the answer
    must carry the domain code. An error message that echoes the whole value does not fit in the
    client's metadata limit (16 KiB), and the client then sees RESOURCE_EXHAUSTED "Stream
    removed" instead of NOT_FOUND / INVALID_ARGUMENT."""
    long_id = "L" * LONG

    async def case():
        lid = live.language_id
        cases = [
            (
                "enc.GetTransfer",
                live.enc.GetTransfer(common_pb2.GetTransferRequest(request_id=long_id)),
                {NF, IA},
            ),
            ("enc.Cancel", live.enc.Cancel(common_pb2.CancelRequest(request_id=long_id)), {NF, IA}),
            (
                "enc.Resume",
                live.enc.Resume(
                    encoder_pb2.ResumeRequest(
                        request_id=long_id, language_id=lid, dst_blocks=[0], allocated_tokens=BLOCK
                    )
                ),
                {NF, IA},
            ),
            ("enc.Encode", live.enc.Encode(encoder_pb2.EncodeRequest(request_id=long_id)), {IA}),
            (
                "enc.Init",
                live.enc.Init(
                    encoder_pb2.InitRequest(
                        request_id="x",
                        language_id=long_id,
                        rank_count=1,
                        dst_blocks=[0],
                        allocated_tokens=BLOCK,
                    )
                ),
                {FP, IA},
            ),
            (
                "enc.Register.session",
                live.enc.Register(
                    encoder_pb2.RegisterRequest(
                        language_id="fzreg-long", session=long_id, layout=live.rank.layout()
                    )
                ),
                {IA},
            ),
            (
                "enc.Register.language_id",
                live.enc.Register(
                    encoder_pb2.RegisterRequest(
                        language_id=long_id,
                        session="127.0.0.1:9",
                        layout=live.rank.layout(hidden=HIDDEN * 2),
                    )
                ),
                {FP, IA},
            ),
            (
                "enc.Encode.mime_type",
                live.enc.Encode(
                    encoder_pb2.EncodeRequest(
                        request_id=unique("mime"),
                        text="t",
                        images=[common_pb2.Image(data=MAGIC["image/png"], mime_type=long_id)],
                    )
                ),
                {IA},
            ),
            (
                "lang.GetTransfer",
                live.lang.GetTransfer(common_pb2.GetTransferRequest(request_id=long_id)),
                {NF, IA},
            ),
            (
                "lang.Cancel",
                live.lang.Cancel(common_pb2.CancelRequest(request_id=long_id)),
                {NF, IA},
            ),
            (
                "lang.Generate",
                live.lang.Generate(
                    language_pb2.GenerateRequest(request_id=long_id, synthetic_tokens=1)
                ),
                {IA},
            ),
        ]
        wrong = []
        for name, call, codes in cases:
            _, e = await outcome(call)
            if e is None or e.code() not in codes or not (e.details() or "").strip():
                wrong.append(f"{name}: {show(e)[:160]}")
        seen, e = await drain_status(live.enc.Status(encoder_pb2.StatusRequest(request_id=long_id)))
        if e is None or e.code() not in (NF, IA):
            wrong.append(f"enc.Status: {show(e)[:160]}")
        await invariants(live)
        assert not wrong, "answered without the domain code:\n  " + "\n  ".join(wrong)

    live.run(case())


# ---------------------------------------------------------------------------- after everything


def test_zz_nothing_accumulated_after_the_fuzzing(live):
    """Runs last (file order): after every example above, both processes still answer, no
    transfer or Status stream is left, and the number of asyncio tasks is back to where it was
    when the module started (no task outlives its request)."""

    async def case():
        await invariants(live)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            enc, lang = await diagnostics(live)
            base_enc, base_lang = live.baseline
            ok = (
                enc.asyncio_tasks <= base_enc.asyncio_tasks + 4
                and lang.asyncio_tasks <= base_lang.asyncio_tasks + 4
            )
            if ok or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert ok, (
            f"asyncio tasks: encoder {base_enc.asyncio_tasks} -> {enc.asyncio_tasks}, "
            f"language {base_lang.asyncio_tasks} -> {lang.asyncio_tasks}"
        )
        assert (
            enc.history_transfers <= 256 and lang.history_transfers <= 256
        )  # the default --history-size

    live.run(case())
