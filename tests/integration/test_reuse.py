"""A repeated image: encoded once, and not sent again where every data rank still holds its rows.

Real encoder and language processes with the tiny Qwen2-VL, real Mooncake TCP. The oracle is a
second pair with both caches off (`--embedding-cache-bytes 0`): every payload digest with reuse
must equal its digest there, and the token counts come from the image processor's own resize rule
(`qwen_images.image_tokens`). Each scenario ends with every pool free.

- tp=1 (the Init carried by the Encode) and tp=2 (each rank's own Init, rank 0's proposal carried
  by the admission);
- the same image after other texts, in another order, several images with one repeated;
- a large image whose rows cross round boundaries, in a payload larger than the pool;
- rank 1 without the rows (fault injection `forget_images`): nothing is skipped, on either rank;
- rows evicted on the language side (a store that holds one image): received again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import pytest

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from services.language.ranks import free_port
from services.models import qwen_images
from services.tools import demo
from tests.conftest import Pair, ServiceProcess, assert_all_free, language_stub
from tests.integration.test_inspection import epd
from tests.integration.test_scale import in_rotation
from tests.integration.test_security import Certs

HIDDEN = 64
BLOCK = 128
LANGUAGE_BLOCKS = 6  # 768 tokens: the large image's payload does not fit
INITIAL_TOKENS = 256

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SMALL = (320, 240, "png")  # 99 tokens
OTHER = (200, 200, "jpeg")
WIDE = (448, 160, "png")
LARGE = (1120, 980, "png")  # 1,400 tokens: several rounds, more than the pool


def make_pair(
    *language_args: str, cache: bool = True, fault: str = "", metrics: bool = False
) -> Pair:
    off = () if cache else ("--embedding-cache-bytes", "0")
    ports = [("--metrics-port", str(free_port("127.0.0.1"))) if metrics else () for _ in "el"]
    return Pair(
        hidden=HIDDEN,
        block_size=BLOCK,
        encoder_blocks=64,
        language_blocks=LANGUAGE_BLOCKS,
        initial_tokens=INITIAL_TOKENS,
        encoder_args=["--model", "tiny", "--max-request-tokens", "3000", *off, *ports[0]],
        language_args=[
            *off,
            *ports[1],
            *language_args,
            *(("--fault", fault) if fault else ()),
        ],
    )


@pytest.fixture(scope="module")
def plain():
    p = make_pair(cache=False)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def reuse():
    p = make_pair(metrics=True)
    yield p
    p.stop()


def image(spec: tuple[int, int, str], seed: int) -> common_pb2.Image:
    w, h, fmt = spec
    return common_pb2.Image(data=demo.make_image(w, h, fmt, seed=seed), mime_type=f"image/{fmt}")


def tokens_of(spec: tuple[int, int, str]) -> int:
    return qwen_images.image_tokens(spec[0], spec[1])


async def generate(language: str, request_id: str, images, text: str) -> language_pb2.GenerateReply:
    return await language_stub(language).Generate(
        language_pb2.GenerateRequest(
            request_id=request_id, images=images, text=text, want_digest=True
        ),
        timeout=120,
    )


async def same_as_plain(
    pair: Pair | ServiceProcess, plain: Pair, request_id: str, images, text: str
) -> language_pb2.GenerateReply:
    """Generate on `pair` (or on a language process); its digest must equal the digest of the
    same request on `plain`, with no cache."""
    language = pair.language.address if isinstance(pair, Pair) else pair.address
    reply, expected = await asyncio.gather(
        generate(language, request_id, images, text),
        generate(plain.language.address, request_id, images, text),
    )
    assert reply.payload_sha256 == expected.payload_sha256, request_id
    assert reply.total_tokens == expected.total_tokens
    assert reply.integrity_verified
    assert expected.cached_tokens == 0 and expected.transferred_tokens == expected.total_tokens
    return reply


async def all_free(*pairs: Pair) -> None:
    for p in pairs:
        await assert_all_free((p.encoder.address, "encoder"), (p.language.address, "language"))


async def test_repeated_image_after_other_text_is_not_sent_again(reuse, plain, unique_id):
    x = image(SMALL, seed=11)
    n = tokens_of(SMALL)
    first = await same_as_plain(reuse, plain, unique_id("a"), [x], "What is in <image>?")
    assert (first.cached_tokens, first.transferred_tokens) == (0, first.total_tokens)

    again = await same_as_plain(
        reuse, plain, unique_id("b"), [x], "And now, in a few more words: <image>"
    )
    assert again.cached_tokens == n
    assert again.transferred_tokens == again.total_tokens - n
    assert again.ranks[0].reused_tokens == n
    assert again.ranks[0].transferred_tokens == again.total_tokens - n
    # Both hit: the encoder's cache (no vision tower) and rank 0's held rows (nothing sent).
    assert await cache_hits(reuse.encoder, 'role="encoder"') >= 1
    assert await cache_hits(reuse.language, 'rank="0",role="language"') >= 1
    await all_free(reuse, plain)


async def cache_hits(service: ServiceProcess, labels: str) -> float:
    """epd_embedding_cache_hits_total{labels} from the service's /metrics."""
    url = f"http://127.0.0.1:{service.info['metrics_port']}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    text = await asyncio.to_thread(scrape)
    found = re.search(
        r"^epd_embedding_cache_hits_total\{" + re.escape(labels) + r"\} (\S+)$", text, re.M
    )
    assert found, text
    return float(found.group(1))


async def test_several_images_one_repeated_in_another_order(reuse, plain, unique_id):
    a, b, c = image(OTHER, seed=21), image(WIDE, seed=22), image(SMALL, seed=23)
    await same_as_plain(reuse, plain, unique_id("ab"), [a, b], "Compare <image> with <image>.")
    # b again, now first, beside a new image c; a is held but not in this request.
    reply = await same_as_plain(
        reuse, plain, unique_id("cb"), [b, c], "First <image>, then <image>."
    )
    assert reply.cached_tokens == tokens_of(WIDE)
    assert reply.transferred_tokens == reply.total_tokens - tokens_of(WIDE)
    # The same image twice in one request: the first is received, the second is not new.
    twice = await same_as_plain(reuse, plain, unique_id("cc"), [c, c], "<image> and <image> again")
    assert twice.transferred_tokens == twice.total_tokens - 2 * tokens_of(SMALL)
    await all_free(reuse, plain)


async def test_large_image_across_rounds_and_larger_than_the_pool(reuse, plain, unique_id):
    big = image(LARGE, seed=31)
    n = tokens_of(LARGE)
    assert n > LANGUAGE_BLOCKS * BLOCK  # the payload cannot be in the pool at once
    first = await same_as_plain(reuse, plain, unique_id("1"), [big], "Describe <image>.")
    assert first.rounds >= 3
    again = await same_as_plain(reuse, plain, unique_id("2"), [big], "Once more: <image>")
    assert again.rounds == first.rounds  # the rounds are the same; their writes are smaller
    assert (again.cached_tokens, again.transferred_tokens) == (n, again.total_tokens - n)
    await all_free(reuse, plain)


async def test_rows_evicted_on_the_language_are_received_again(plain, unique_id):
    # A language store of one small image's records: the second image evicts the first.
    record_bytes = 160  # 64 bf16 + int32 + 3 int32, padded to 16
    pair = make_pair("--embedding-cache-bytes", str(tokens_of(SMALL) * record_bytes + 1))
    try:
        x, y = image(SMALL, seed=41), image(SMALL, seed=42)
        n = tokens_of(SMALL)
        await same_as_plain(pair, plain, unique_id("x"), [x], "<image>")
        kept = await same_as_plain(pair, plain, unique_id("x2"), [x], "<image>?")
        assert kept.transferred_tokens == kept.total_tokens - n
        await same_as_plain(pair, plain, unique_id("y"), [y], "<image>")  # evicts x
        back = await same_as_plain(pair, plain, unique_id("x3"), [x], "<image>!")
        assert back.transferred_tokens == back.total_tokens  # received again
        assert back.cached_tokens == n  # the encoder's cache still had its rows
        await all_free(pair, plain)
    finally:
        pair.stop()


async def test_tp2_every_data_rank_fills_the_same_rows(plain, unique_id):
    pair = make_pair("--tp", "2")
    try:
        x = image(WIDE, seed=51)
        n = tokens_of(WIDE)
        await same_as_plain(pair, plain, unique_id("1"), [x], "<image> in short")
        reply = await same_as_plain(pair, plain, unique_id("2"), [x], "<image> at length")
        assert reply.transferred_tokens == reply.total_tokens - n
        assert [r.reused_tokens for r in reply.ranks] == [n, n]
        assert len({r.payload_sha256 for r in reply.ranks}) == 1
        # Each rank holds the image and found it once (epd status and GetPool show every rank).
        ran = await epd("status", pair.language.address)
        assert ran.returncode == 0, ran
        assert "embedding cache: " in ran.stdout and "1 hits" in ran.stdout, ran.stdout
        rows = [line.split() for line in ran.stdout.splitlines()]
        header = next(r for r in rows if r[:1] == ["RANK"])
        assert header[-3:] == ["CACHED", "IMAGES", "HIT-RATE"], header
        # Rank 0 looks up every image of a request (1 miss, then 1 hit), rank 1 only what rank 0
        # proposed (1 hit).
        for rank, rate in (("0", "50.0"), ("1", "100.0")):
            row = next(r for r in rows if r[:1] == [rank] and len(r) > len(header))
            assert row[-3:] == ["1", rate, "%"], row
        await all_free(pair, plain)
    finally:
        pair.stop()


async def test_tp2_a_rank_without_the_rows_means_none_are_skipped(plain, unique_id):
    pair = make_pair("--tp", "2", fault="rank=1,forget_images=1")
    try:
        x = image(WIDE, seed=61)
        await same_as_plain(pair, plain, unique_id("1"), [x], "<image> in short")
        reply = await same_as_plain(pair, plain, unique_id("2"), [x], "<image> at length")
        # Rank 0 holds the rows and proposed them; rank 1 does not: every rank receives them.
        assert reply.transferred_tokens == reply.total_tokens
        assert [r.reused_tokens for r in reply.ranks] == [0, 0]
        assert reply.cached_tokens == tokens_of(WIDE)  # the encoder's own cache served them
        await all_free(pair, plain)
    finally:
        pair.stop()


@contextlib.contextmanager
def two_encoders(*a_args: str):
    """Encoders A (with `a_args`) and B, and a language using both, in A, B order; every pool
    checked free afterwards by the test, every process stopped."""
    common = ("--hidden", str(HIDDEN), "--block-size", str(BLOCK), "--model", "tiny")
    a = ServiceProcess("encoder", *common, "--pool-blocks", "64", *a_args)
    b = lang = None
    try:
        b = ServiceProcess("encoder", *common, "--pool-blocks", "64")
        lang = ServiceProcess(
            "language",
            *common[:4],
            *("--pool-blocks", "16", "--encoder", a.address, "--encoder", b.address),
            *("--metrics-port", str(free_port("127.0.0.1"))),
        )
        yield a, b, lang
    finally:
        for s in (lang, b, a):
            if s is not None:
                s.stop()


async def test_a_repeated_image_goes_to_the_encoder_that_holds_it(unique_id):
    with two_encoders() as (a, b, lang):
        await in_rotation(lang, 2)
        stub = language_stub(lang.address)
        x, y = image(SMALL, seed=71), image(OTHER, seed=72)

        async def ask(images, text):
            return await stub.Generate(
                language_pb2.GenerateRequest(request_id=unique_id("q"), images=images, text=text),
                timeout=120,
            )

        first = await ask([x], "<image> one")
        repeats = [await ask([x], f"<image> turn {k}") for k in range(4)]
        # Load alone would alternate (a tie goes round-robin): the holder wins every time.
        assert {r.encoder for r in repeats} == {first.encoder}
        assert all(r.cached_tokens == tokens_of(SMALL) for r in repeats)
        other = await ask([y], "<image> new")
        assert other.encoder != first.encoder  # no holder: the next in turn
        await assert_all_free(
            (a.address, "encoder"), (b.address, "encoder"), (lang.address, "language")
        )


async def test_identity_scope_keeps_each_callers_rows_apart(tmp_path, unique_id):
    """With mutual TLS the default scope is `identity`: a second client sending the same image
    finds nothing kept for it, on either side; its own repeat does. A language instance set to
    `shared` (same encoder) lets one client's repeat of another's image hit."""
    certs = Certs(tmp_path)
    common = ("--hidden", str(HIDDEN), "--block-size", str(BLOCK), "--model", "tiny")
    enc = ServiceProcess(
        "encoder", *common, "--pool-blocks", "64", *certs.service_args("encoder", token=None)
    )
    langs: list[ServiceProcess] = []
    try:
        for extra in ((), ("--embedding-cache-scope", "shared")):
            langs.append(
                ServiceProcess(
                    "language",
                    *common[:4],
                    "--pool-blocks",
                    "16",
                    "--encoder",
                    enc.address,
                    *certs.service_args("language-a", token=None),
                    *extra,
                )
            )
        x = [image(SMALL, seed=81)]
        n = tokens_of(SMALL)

        async def ask(lang: ServiceProcess, who: str) -> language_pb2.GenerateReply:
            async with certs.client(who, token=None).aio_channel(lang.address) as channel:
                return await language_pb2_grpc.LanguageStub(channel).Generate(
                    language_pb2.GenerateRequest(
                        request_id=unique_id(who), images=x, text="<image>", want_digest=True
                    ),
                    timeout=120,
                )

        scoped, shared = langs
        first = await ask(scoped, "client")
        other = await ask(scoped, "language-a")  # another identity, the same image
        assert (other.cached_tokens, other.transferred_tokens) == (0, other.total_tokens)
        again = await ask(scoped, "client")
        assert (again.cached_tokens, again.transferred_tokens) == (n, again.total_tokens - n)
        assert first.payload_sha256 == other.payload_sha256 == again.payload_sha256

        await ask(shared, "client")
        theirs = await ask(shared, "language-a")
        assert (theirs.cached_tokens, theirs.transferred_tokens) == (n, theirs.total_tokens - n)
        assert theirs.payload_sha256 == first.payload_sha256
        for address, stub in [(lang.address, language_pb2_grpc.LanguageStub) for lang in langs] + [
            (enc.address, encoder_pb2_grpc.EncoderStub)
        ]:
            async with certs.client("language-a", token=None).aio_channel(address) as channel:
                pool = await stub(channel).GetPool(common_pb2.GetPoolRequest())
            assert (pool.used_blocks, pool.quarantined_blocks, pool.waiters) == (0, 0, 0), address
    finally:
        for s in (*langs, enc):
            s.stop()


async def test_failover_to_another_encoder_still_skips_the_held_rows(plain, unique_id):
    """Injected fault: encoder A's 2nd write fails before any byte counts. The repeat goes to A
    (it holds the image), fails over to B as ID#2, claims the rows again under B's fingerprint
    (the same seeded model: the same key) and B does not send them."""
    with two_encoders("--transport-fault", "fail_nth=2") as (a, b, lang):
        await in_rotation(lang, 2)  # without a request: A's writes are counted from the first
        x = [image(SMALL, seed=91)]
        n = tokens_of(SMALL)
        first = await same_as_plain(lang, plain, unique_id("1"), x, "<image> first")
        assert first.encoder.endswith(a.address.rsplit(":", 1)[1]) and first.attempts == 1, first
        again = await same_as_plain(lang, plain, unique_id("2"), x, "<image> again")
        assert again.attempts == 2 and again.failed_over_from == first.encoder, again
        assert (again.cached_tokens, again.transferred_tokens) == (n, again.total_tokens - n)
        await assert_all_free(
            (a.address, "encoder"), (b.address, "encoder"), (lang.address, "language")
        )
