"""Transport security and authentication: mutual TLS, the bearer token, inspection
protection, the message size limit and `peer_identity`.

Certificates are made here with the `cryptography` package (a CA, a second unrelated CA, and
certificates usable as both server and client, SAN 127.0.0.1 and a DNS name). In-process tests
run a real `rpc.GrpcServer` (TLS on a 127.0.0.1 port, a generic echo service plus health and
reflection) to check the interceptor and identity cheaply; the others run real encoder and
language processes, the real `epd status` / `epd health` commands and the real grpcurl binary.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import pathlib
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb.epd.v1 import (
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
)
from services.edge import rpc
from services.edge.security import ClientSecurity, ServerSecurity, peer_identity
from services.tools import supervise
from services.tools.reference_payload import expected_digest
from tests.conftest import ROOT, Pair, ServiceProcess

GRPCURL = str(ROOT / ".venv" / "bin" / "grpcurl")
TOKEN = "s3cret-token-for-tests"
HIDDEN = 128


# ------------------------------------------------------------------------------------ certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca, cn: str, *, ips=("127.0.0.1",), dns=()):
    """A certificate for both ends of a connection (serverAuth + clientAuth), signed by `ca`."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


class Certs:
    """PEM files in `root`: ca.pem; NAME.pem / NAME.key for each leaf; other-ca.pem and its leaves."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.ca = make_ca("epd test CA")
        self.other_ca = make_ca("some other CA")
        self._write_cert("ca", self.ca[1])
        self._write_cert("other-ca", self.other_ca[1])
        self.leaf("encoder", self.ca, dns=("encoder.epd.test",))
        self.leaf("language-a", self.ca)
        self.leaf("client", self.ca)
        self.leaf("dns-only", self.ca, ips=(), dns=("encoder.epd.test",))
        self.leaf("intruder", self.other_ca)
        self.leaf("fake-encoder", self.other_ca)
        (root / "token").write_text(TOKEN + "\n")
        (root / "wrong-token").write_text("not-the-token\n")

    def _write_cert(self, name: str, cert) -> None:
        (self.root / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, ca, **kw) -> None:
        key, cert = make_leaf(ca, name, **kw)
        self._write_cert(name, cert)
        (self.root / f"{name}.key").write_bytes(_pem_key(key))

    def path(self, name: str) -> str:
        return str(self.root / name)

    def service_args(
        self, leaf: str, *, ca: str = "ca.pem", token: str | None = "token"
    ) -> list[str]:
        args = [
            "--tls-cert",
            self.path(f"{leaf}.pem"),
            "--tls-key",
            self.path(f"{leaf}.key"),
            "--tls-ca",
            self.path(ca),
        ]
        return args + (["--auth-token-file", self.path(token)] if token else [])

    def client(
        self,
        leaf: str | None = "client",
        *,
        ca: str = "ca.pem",
        token: str | None = TOKEN,
        server_name: str = "",
        max_message_bytes: int = 64 << 20,
    ) -> ClientSecurity:
        return ClientSecurity(
            ca=(self.root / ca).read_bytes() if ca else b"",
            cert=(self.root / f"{leaf}.pem").read_bytes() if leaf else b"",
            key=(self.root / f"{leaf}.key").read_bytes() if leaf else b"",
            token=token or "",
            server_name=server_name,
            max_message_bytes=max_message_bytes,
        )

    def cli_args(self, leaf: str = "client", *, token: bool = True) -> list[str]:
        args = [
            "--tls-ca",
            self.path("ca.pem"),
            "--tls-cert",
            self.path(f"{leaf}.pem"),
            "--tls-key",
            self.path(f"{leaf}.key"),
        ]
        return args + (["--auth-token-file", self.path("token")] if token else [])


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


# ------------------------------------------------------------------------------------ in-process server

ECHO = (
    "epd.v1.Encoder"  # the echo methods pose as encoder methods, so they are classified like them
)


class EchoServer:
    """A real rpc.GrpcServer (TLS, token interceptor, health, reflection) whose methods answer
    with the caller's `peer_identity`: unary `Init` (protected), unary `GetPool` (inspection),
    server-streaming `Status` (protected). `calls` counts handler runs."""

    def __init__(self, sec: ServerSecurity):
        self.calls = 0
        self.sec = sec

        def ident(request: bytes, context) -> bytes:
            self.calls += 1
            return json.dumps({"identity": peer_identity(context), "size": len(request)}).encode()

        async def unary(request, context):
            return ident(request, context)

        async def stream(request, context):
            for _ in range(2):
                yield ident(request, context)

        handlers = {
            "Init": grpc.unary_unary_rpc_method_handler(unary),
            "GetPool": grpc.unary_unary_rpc_method_handler(unary),
            "Status": grpc.unary_stream_rpc_method_handler(stream),
        }
        self.server = rpc.GrpcServer(
            ECHO,
            lambda s: s.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(ECHO, handlers),)
            ),
            sec=sec,
        )

    async def __aenter__(self):
        self.port = await self.server.start("127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(0)

    async def call(self, client: ClientSecurity, method: str, payload: bytes = b"x", **kw) -> dict:
        async with client.aio_channel(self.address) as ch:
            if method == "Status":
                call = ch.unary_stream(f"/{ECHO}/Status")(payload, timeout=5, **kw)
                replies = [json.loads(r) async for r in call]
                return replies[-1]
            return json.loads(await ch.unary_unary(f"/{ECHO}/{method}")(payload, timeout=5, **kw))


def server_security(
    certs: Certs,
    *,
    leaf="encoder",
    mutual=True,
    token=True,
    protect=False,
    max_message_bytes=64 << 20,
) -> ServerSecurity:
    return ServerSecurity(
        cert=(certs.root / f"{leaf}.pem").read_bytes(),
        key=(certs.root / f"{leaf}.key").read_bytes(),
        ca=(certs.root / "ca.pem").read_bytes() if mutual else b"",
        token=TOKEN if token else "",
        open_inspection=not protect,
        max_message_bytes=max_message_bytes,
    )


async def expect_code(code: grpc.StatusCode, coro) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value
    return info.value.details() or ""


async def health(client: ClientSecurity, address: str) -> int:
    async with client.aio_channel(address) as ch:
        return (
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        ).status


async def test_mtls_identity_is_the_client_certificate_cn(certs):
    async with EchoServer(server_security(certs, token=False)) as srv:
        assert (await srv.call(certs.client("language-a", token=None), "Init"))[
            "identity"
        ] == "cert:language-a"
        assert (await srv.call(certs.client("client", token=None), "Status"))[
            "identity"
        ] == "cert:client"
        # A client certificate from another CA, or none, fails the handshake: no handler runs.
        for bad in (certs.client("intruder", token=None), certs.client(None, token=None)):
            await expect_code(grpc.StatusCode.UNAVAILABLE, srv.call(bad, "Init"))
            await expect_code(grpc.StatusCode.UNAVAILABLE, health(bad, srv.address))
        # A client trusting only the other CA rejects this server's certificate.
        await expect_code(
            grpc.StatusCode.UNAVAILABLE,
            srv.call(certs.client("intruder", ca="other-ca.pem", token=None), "Init"),
        )
        assert srv.calls == 3  # Init once, Status twice


async def test_server_name_override_for_a_certificate_without_the_ip(certs):
    async with EchoServer(server_security(certs, leaf="dns-only", token=False)) as srv:
        await expect_code(
            grpc.StatusCode.UNAVAILABLE, srv.call(certs.client(token=None), "Init")
        )  # SAN has no IP
        ok = await srv.call(certs.client(token=None, server_name="encoder.epd.test"), "Init")
        assert ok["identity"] == "cert:client"


async def test_token_checked_once_in_constant_time_and_never_echoed(certs):
    # One-way TLS (no client certificates) + token: the identity is "token".
    async with EchoServer(server_security(certs, mutual=False, protect=False)) as srv:
        one_way = lambda token: certs.client(None, token=token)  # noqa: E731
        assert (await srv.call(one_way(TOKEN), "Init"))["identity"] == "token"
        assert (await srv.call(one_way(TOKEN), "Status"))["identity"] == "token"
        assert srv.calls == 3
        missing = await expect_code(
            grpc.StatusCode.UNAUTHENTICATED, srv.call(one_way(None), "Init")
        )
        assert "needs authentication" in missing and "authorization: Bearer" in missing
        wrong = await expect_code(
            grpc.StatusCode.UNAUTHENTICATED, srv.call(one_way("guess"), "Status")
        )
        assert "not the server's token" in wrong and TOKEN not in wrong and "guess" not in wrong
        bad_scheme = await expect_code(
            grpc.StatusCode.UNAUTHENTICATED,
            srv.call(one_way(None), "Init", metadata=(("authorization", TOKEN),)),
        )
        assert "Bearer" in bad_scheme and TOKEN not in bad_scheme
        assert srv.calls == 3  # refused calls ran no handler
        # Health and (flag off) inspection stay open; a valid token there still identifies.
        assert await health(one_way(None), srv.address) == health_pb2.HealthCheckResponse.SERVING
        assert (await srv.call(one_way(None), "GetPool"))["identity"] == "anonymous"
        assert (await srv.call(one_way(TOKEN), "GetPool"))["identity"] == "token"


async def test_protect_inspection_and_reflection(certs):
    async with EchoServer(server_security(certs, mutual=False, protect=True)) as srv:
        no_token = certs.client(None, token=None)
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, srv.call(no_token, "GetPool"))
        assert (await srv.call(certs.client(None), "GetPool"))["identity"] == "token"
        assert await health(no_token, srv.address) == health_pb2.HealthCheckResponse.SERVING
        # Reflection (a bidirectional stream) through the real grpcurl binary.
        base = [GRPCURL, "-cacert", certs.path("ca.pem")]
        run = lambda *argv: asyncio.to_thread(  # noqa: E731 (the server runs on this event loop)
            subprocess.run, argv, capture_output=True, text=True, timeout=30
        )
        out = await run(*base, srv.address, "list")
        assert out.returncode != 0 and "Unauthenticated" in out.stderr, out
        out = await run(*base, "-H", f"authorization: Bearer {TOKEN}", srv.address, "list")
        assert out.returncode == 0 and ECHO in out.stdout, out


async def test_message_size_limit_both_ways(certs):
    async with EchoServer(server_security(certs, token=False, max_message_bytes=256 * 1024)) as srv:
        client = certs.client(token=None)
        assert (await srv.call(client, "Init", b"x" * 200_000))["size"] == 200_000
        details = await expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, srv.call(client, "Init", b"x" * 300_000)
        )
        assert "larger than max" in details and "262144" in details
        # The client's own limit refuses before sending.
        small = certs.client(token=None, max_message_bytes=100_000)
        details = await expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED, srv.call(small, "Init", b"x" * 150_000)
        )
        assert "larger than max" in details
        assert srv.calls == 1


# ------------------------------------------------------------------------------------ real processes


async def pools_free(
    client: ClientSecurity,
    encoder: str,
    language: str,
    *,
    encoder_client: ClientSecurity | None = None,
) -> None:
    """Both pools fully free and no transfer live, asked over the secured channels."""
    for address, stub_cls, sec in (
        (encoder, encoder_pb2_grpc.EncoderStub, encoder_client or client),
        (language, language_pb2_grpc.LanguageStub, client),
    ):
        async with sec.aio_channel(address) as ch:
            stub = stub_cls(ch)
            for _ in range(100):
                pool = await stub.GetPool(common_pb2.GetPoolRequest(), timeout=5)
                if pool.used_blocks == 0 and all(rp.used_blocks == 0 for rp in pool.rank_pools):
                    break
                await asyncio.sleep(0.05)
            assert (
                pool.used_blocks == 0
                and pool.free_blocks == pool.layout.num_blocks
                and pool.waiters == 0
            )
            assert all(rp.used_blocks == 0 for rp in pool.rank_pools)
            live = await stub.ListTransfers(
                common_pb2.ListTransfersRequest(states=[1, 2, 3]), timeout=5
            )
            assert not live.transfers


def epd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("EPD_")},
    )


@pytest.fixture(scope="module")
def mtls_pair(certs):
    """Encoder and a 2-rank language instance, mutual TLS + token between all of them."""
    pair = Pair(
        hidden=HIDDEN,
        language_blocks=32,
        initial_tokens=1024,
        encoder_blocks=512,
        encoder_args=certs.service_args("encoder"),
        language_args=[*certs.service_args("language-a"), "--tp", "2"],
    )
    yield pair
    pair.stop()


async def test_generate_end_to_end_with_mtls_and_token(certs, mtls_pair):
    client = certs.client()
    async with client.aio_channel(mtls_pair.language.address) as ch:
        stub = language_pb2_grpc.LanguageStub(ch)
        reply = await stub.Generate(
            language_pb2.GenerateRequest(
                request_id="tls-1", synthetic_tokens=3000, synthetic_seed=7, want_digest=True
            ),
            timeout=60,
        )
    assert reply.total_tokens == 3000 and reply.rounds >= 2
    assert reply.payload_sha256 == expected_digest(3000, 7, HIDDEN)
    assert [r.payload_sha256 for r in reply.ranks] == [
        reply.payload_sha256
    ] * 2  # rank 1 dialled over mTLS too
    await pools_free(client, mtls_pair.encoder.address, mtls_pair.language.address)


async def test_wrong_or_missing_token_changes_nothing(certs, mtls_pair):
    enc, lang = mtls_pair.encoder.address, mtls_pair.language.address
    for token in (None, "wrong"):
        client = certs.client(token=token)
        async with client.aio_channel(lang) as lch, client.aio_channel(enc) as ech:
            lstub, estub = language_pb2_grpc.LanguageStub(lch), encoder_pb2_grpc.EncoderStub(ech)
            calls = [
                lstub.Generate(
                    language_pb2.GenerateRequest(request_id="intruder-1", synthetic_tokens=500),
                    timeout=10,
                ),
                lstub.Cancel(common_pb2.CancelRequest(request_id="tls-1"), timeout=10),
                estub.Register(
                    encoder_pb2.RegisterRequest(
                        language_id="x",
                        session="127.0.0.1:1",
                        layout=common_pb2.PoolLayout(block_size=128, num_blocks=4),
                    ),
                    timeout=10,
                ),
                estub.Encode(
                    encoder_pb2.EncodeRequest(
                        request_id="intruder-2", synthetic_tokens=500, rank_count=1, language_id="x"
                    ),
                    timeout=10,
                ),
                estub.Init(
                    encoder_pb2.InitRequest(
                        request_id="intruder-2",
                        language_id="x",
                        rank_count=1,
                        dst_blocks=[0],
                        allocated_tokens=128,
                    ),
                    timeout=10,
                ),
                estub.Cancel(common_pb2.CancelRequest(request_id="tls-1"), timeout=10),
            ]
            for call in calls:
                details = await expect_code(grpc.StatusCode.UNAUTHENTICATED, call)
                assert TOKEN not in details

            async def status_stream():
                async for _ in estub.Status(
                    encoder_pb2.StatusRequest(request_id="tls-1"), timeout=10
                ):
                    raise AssertionError("Status streamed without a token")

            await expect_code(grpc.StatusCode.UNAUTHENTICATED, status_stream())

            async def encode_stream():
                async for _ in estub.EncodeStream(
                    encoder_pb2.EncodeRequest(
                        request_id="intruder-3", synthetic_tokens=500, rank_count=1, language_id="x"
                    ),
                    timeout=10,
                ):
                    raise AssertionError("EncodeStream streamed without a token")

            await expect_code(grpc.StatusCode.UNAUTHENTICATED, encode_stream())
    # Still a client certificate but no token: health open, inspection not (protected by default).
    open_client = certs.client(token=None)
    assert await health(open_client, enc) == health_pb2.HealthCheckResponse.SERVING
    async with open_client.aio_channel(enc) as ech:
        await expect_code(
            grpc.StatusCode.UNAUTHENTICATED,
            encoder_pb2_grpc.EncoderStub(ech).ListTransfers(common_pb2.ListTransfersRequest()),
        )
    async with certs.client().aio_channel(enc) as ech, certs.client().aio_channel(lang) as lch:
        for stub in (encoder_pb2_grpc.EncoderStub(ech), language_pb2_grpc.LanguageStub(lch)):
            transfers = (await stub.ListTransfers(common_pb2.ListTransfersRequest())).transfers
            assert not [t for t in transfers if "intruder" in t.request_id]
            assert all(
                t.state == common_pb2.TRANSFER_STATE_SUCCESS
                for t in transfers
                if t.request_id.startswith("tls-1")
            )
    await pools_free(certs.client(), enc, lang)


def test_epd_status_health_and_grpcurl_with_tls(certs, mtls_pair):
    lang, enc = mtls_pair.language.address, mtls_pair.encoder.address
    out = epd("health", enc, *certs.cli_args(token=False))
    assert out.returncode == 0 and out.stdout.strip() == "SERVING", out
    out = epd("status", lang, "--json", *certs.cli_args())
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["service"] == "epd.v1.Language"
    # Without TLS settings the handshake fails: a clear error, exit 1.
    out = epd("health", enc)
    assert out.returncode == 1 and "cannot reach" in out.stderr, out
    out = epd("status", enc, *certs.cli_args("intruder"))
    assert out.returncode == 1, out
    out = epd("health", enc, "--tls-ca", certs.path("missing.pem"))
    assert out.returncode == 2 and "tls_ca" in out.stderr, out
    # The real grpcurl with -cacert/-cert/-key (+ the token header for a protected method).
    tls = [
        GRPCURL,
        "-cacert",
        certs.path("ca.pem"),
        "-cert",
        certs.path("client.pem"),
        "-key",
        certs.path("client.key"),
    ]
    out = subprocess.run([*tls, lang, "list"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "Unauthenticated" in out.stderr, (
        out
    )  # reflection is protected by default
    out = subprocess.run(
        [*tls, "-H", f"authorization: Bearer {TOKEN}", lang, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "epd.v1.Language" in out.stdout, out
    out = subprocess.run(
        [
            *tls,
            "-H",
            f"authorization: Bearer {TOKEN}",
            "-d",
            '{"synthetic_tokens": 300}',
            lang,
            "epd.v1.Language/Generate",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and int(json.loads(out.stdout)["total_tokens"]) == 300, out
    out = subprocess.run(
        [*tls, "-d", '{"synthetic_tokens": 300}', lang, "epd.v1.Language/Generate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "Unauthenticated" in out.stderr, out
    asyncio.run(pools_free(certs.client(), enc, lang))


def _never_ready(role: str, *args: str, wait_s: float = 8.0) -> str:
    """Start a service that must not become ready; its stderr after `wait_s` (or its exit)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}
    proc = supervise.ServiceProcess(
        role, supervise.service_argv(role, *args), env=supervise.child_env(environ)
    )
    proc.start()
    try:
        with pytest.raises(supervise.ServiceStartError):
            proc.wait_ready(wait_s)
        return proc.stderr_tail(200, 65536)
    finally:
        proc.stop()


def test_language_rejects_an_encoder_certificate_from_another_ca(certs):
    fake = ServiceProcess(
        "encoder",
        "--hidden",
        str(HIDDEN),
        "--pool-blocks",
        "64",
        *certs.service_args("fake-encoder", ca="other-ca.pem"),
    )
    try:
        err = _never_ready(
            "language",
            "--hidden",
            str(HIDDEN),
            "--pool-blocks",
            "16",
            "--encoder",
            fake.address,
            *certs.service_args("language-a"),
        )
        # The language's own log says why it cannot register (not just "Deadline Exceeded").
        line = next((ln for ln in err.splitlines() if "not registered yet" in ln), "")
        assert "cannot connect" in line and "CERTIFICATE_VERIFY_FAILED" in line, err

        # The fake encoder saw no registration.
        async def no_sessions():
            async with certs.client("fake-encoder", ca="other-ca.pem").aio_channel(
                fake.address
            ) as ch:
                pool = await encoder_pb2_grpc.EncoderStub(ch).GetPool(
                    common_pb2.GetPoolRequest(), timeout=5
                )
                assert pool.used_blocks == 0

        asyncio.run(no_sessions())
    finally:
        fake.stop()


def test_language_with_the_wrong_token_fails_at_start(certs, mtls_pair):
    err = _never_ready(
        "language",
        "--hidden",
        str(HIDDEN),
        "--pool-blocks",
        "16",
        "--encoder",
        mtls_pair.encoder.address,
        *certs.service_args("language-a", token="wrong-token"),
        wait_s=30,
    )
    assert "UNAUTHENTICATED" in err or "token" in err, err
    assert "refused our registration" in err and TOKEN not in err and "not-the-token" not in err


def test_token_only_protect_inspection_and_oversized_generate(certs):
    """Plaintext + token + --protect-inspection, and a 256 KiB message limit."""
    token = [
        "--auth-token-file",
        certs.path("token"),
        "--protect-inspection",
        "--max-message-bytes",
        str(256 * 1024),
    ]
    pair = Pair(
        hidden=HIDDEN,
        language_blocks=16,
        initial_tokens=1024,
        encoder_blocks=128,
        encoder_args=token,
        language_args=token,
    )
    try:

        async def run():
            plain = ClientSecurity(token=TOKEN)
            for address in (pair.encoder.address, pair.language.address):
                kind = "language" if address == pair.language.address else "encoder"
                await expect_code(
                    grpc.StatusCode.UNAUTHENTICATED, _list(ClientSecurity(), address, kind)
                )
                await _list(plain, address, kind)
                assert (
                    await health(ClientSecurity(), address)
                    == health_pb2.HealthCheckResponse.SERVING
                )
            async with plain.aio_channel(
                pair.language.address, options=[("grpc.max_send_message_length", 1 << 24)]
            ) as ch:
                stub = language_pb2_grpc.LanguageStub(ch)
                big = common_pb2.Image(data=b"\x89PNG" + b"\0" * 300_000, mime_type="image/png")
                details = await expect_code(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    stub.Generate(
                        language_pb2.GenerateRequest(request_id="too-big", text="hi", images=[big]),
                        timeout=10,
                    ),
                )
                assert "larger than max" in details and str(256 * 1024) in details
                ok = await stub.Generate(
                    language_pb2.GenerateRequest(
                        request_id="fits", synthetic_tokens=700, want_digest=True
                    ),
                    timeout=60,
                )
                assert ok.payload_sha256 == expected_digest(700, 0, HIDDEN)
            await pools_free(plain, pair.encoder.address, pair.language.address)
            async with plain.aio_channel(pair.language.address) as ch:
                listed = (
                    await language_pb2_grpc.LanguageStub(ch).ListTransfers(
                        common_pb2.ListTransfersRequest()
                    )
                ).transfers
                assert [t.request_id for t in listed] == ["fits"]

        asyncio.run(run())
        out = epd("status", pair.encoder.address)
        assert (
            out.returncode == 1 and "UNAUTHENTICATED" in out.stderr and TOKEN not in out.stderr
        ), out
        out = epd("status", pair.encoder.address, "--auth-token-file", certs.path("token"))
        assert out.returncode == 0, out
        out = epd("health", pair.encoder.address)
        assert out.returncode == 0, out
    finally:
        pair.stop()


async def _list(client: ClientSecurity, address: str, kind: str):
    async with client.aio_channel(address) as ch:
        stub = (
            language_pb2_grpc.LanguageStub if kind == "language" else encoder_pb2_grpc.EncoderStub
        )(ch)
        return await stub.ListTransfers(common_pb2.ListTransfersRequest(), timeout=5)


def test_demo_with_mutual_tls_and_token(certs, tmp_path):
    """`epd demo` passes its --tls-* / --auth-token-file flags to both services it starts and
    uses them for its own client; every reply verified against the reference."""
    out = epd(
        "demo",
        "--model",
        "none",
        "--requests",
        "4",
        "--json",
        "--log-dir",
        str(tmp_path),
        *certs.cli_args("encoder"),
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["succeeded"] == 4 and summary["failed"] == 0 and summary["mismatches"] == 0, (
        summary
    )
    for role in ("encoder", "language"):
        assert "mutual TLS, bearer token" in (tmp_path / f"{role}.log").read_text()


def test_method_classes():
    from services.edge.security import method_class

    assert (
        method_class("/grpc.health.v1.Health/Check")
        == method_class("/grpc.health.v1.Health/Watch")
        == "open"
    )
    for m in (
        "/epd.v1.Encoder/GetTransfer",
        "/epd.v1.Language/ListTransfers",
        "/epd.v1.Encoder/GetPool",
        "/epd.v1.Language/GetDiagnostics",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert method_class(m) == "inspection", m
    for m in (
        "/epd.v1.Encoder/Cancel",
        "/epd.v1.Language/Cancel",
        "/epd.v1.Encoder/Register",
        "/epd.v1.Encoder/Init",
        "/epd.v1.Encoder/Status",
        "/epd.v1.Encoder/EncodeStream",
        "/epd.v1.Language/Generate",
        "/epd.v1.Encoder/RawWrite",
        "/x.Y/GetPool",
    ):
        assert method_class(m) == "protected", m


@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
async def test_health_watch_stream_works_and_is_open(certs, token):
    """Health's Watch writes with context.write(): the token and parse wrappers must keep that
    working (the parse wrapper used to answer UNKNOWN)."""
    async with EchoServer(server_security(certs, mutual=False, protect=True, token=token)) as srv:
        async with certs.client(None, token=None).aio_channel(srv.address) as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            call.cancel()


def test_language_dials_an_encoder_certificate_by_its_dns_name(certs):
    """An encoder whose certificate names only `encoder.epd.test` (no IP SAN), dialled by IP:
    the language checks the name given by --tls-server-name."""
    pair = Pair(
        hidden=HIDDEN,
        language_blocks=16,
        initial_tokens=1024,
        encoder_blocks=64,
        encoder_args=certs.service_args("dns-only", token=None),
        language_args=[
            *certs.service_args("language-a", token=None),
            "--tls-server-name",
            "encoder.epd.test",
        ],
    )
    try:

        async def run():
            client = certs.client(token=None)
            async with client.aio_channel(pair.language.address) as ch:
                reply = await language_pb2_grpc.LanguageStub(ch).Generate(
                    language_pb2.GenerateRequest(
                        synthetic_tokens=1500, synthetic_seed=3, want_digest=True
                    ),
                    timeout=60,
                )
            assert reply.payload_sha256 == expected_digest(1500, 3, HIDDEN) and reply.rounds == 2
            # The encoder's certificate does not name 127.0.0.1: clients dialling it need the name too.
            await expect_code(grpc.StatusCode.UNAVAILABLE, health(client, pair.encoder.address))
            await pools_free(
                client,
                pair.encoder.address,
                pair.language.address,
                encoder_client=certs.client(token=None, server_name="encoder.epd.test"),
            )

        asyncio.run(run())
    finally:
        pair.stop()
