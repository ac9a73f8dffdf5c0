"""Transport security and authentication of the gRPC edge: TLS credentials, the shared
bearer token, which methods need it, and who the caller is.

- Servers: `ServerSecurity` (from a service config) gives the server credentials (TLS; mutual
  when a CA is set: callers must present a certificate that chains to it) and the token the one
  server interceptor (`services.edge.rpc.AuthInterceptor`) checks.
- Clients: `ClientSecurity` makes every channel of the project (the language's encoder links,
  `epd status`/`epd health`, the demo and bench clients): TLS with the CA, a client certificate,
  an optional server-name override, and the token sent as `authorization: Bearer <token>`
  metadata on every call.
- `peer_identity(context)`: the authenticated identity of the caller of a server method.

Only grpc and the standard library are imported here, so `epd health` stays fast.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import hmac
from collections.abc import Sequence
from typing import Any

import grpc

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Methods anyone who reaches the port may call: probes must work without a secret.
OPEN_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
)
# Read-only views: protected whenever a token or CA is set, unless `open_inspection`. Cancel is
# not here: it ends a transfer.
INSPECTION_NAMES = frozenset({"GetTransfer", "ListTransfers", "GetPool", "GetDiagnostics"})
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
EPD_SERVICES = frozenset({"epd.v1.Encoder", "epd.v1.Language"})

ANONYMOUS = "anonymous"
TOKEN = "token"
CERT_PREFIX = "cert:"

# Set by the server's AuthInterceptor for the call it lets through with a valid token; each RPC
# runs in its own task, so the value never leaks from one call to another.
_token_verified: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "epd_token_verified", default=False
)


def method_class(method: str) -> str:
    """'open' (health), 'inspection' (read-only views, reflection) or 'protected' (the rest:
    Register, Challenge, Encode, Init, Resume, Status, Cancel, Generate, the Bench service, ...)."""
    if method in OPEN_METHODS:
        return "open"
    service, _, name = method.lstrip("/").partition("/")
    if service in REFLECTION_SERVICES or (service in EPD_SERVICES and name in INSPECTION_NAMES):
        return "inspection"
    return "protected"


def read_token(path: str) -> str:
    """The shared secret: the file's content, surrounding whitespace stripped. ValueError (naming
    the file, never the content) when unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"auth_token_file={path!r}: cannot read it: {getattr(e, 'strerror', None) or e}"
        ) from None
    if not token:
        raise ValueError(f"auth_token_file={path!r}: the file is empty")
    if any(c in token for c in "\r\n") or not token.isprintable():
        raise ValueError(
            f"auth_token_file={path!r}: the token must be one line of printable characters"
        )
    return token


def _read_bytes(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{setting}={path!r}: cannot read it: {e.strerror}") from None


def token_matches(expected: str, metadata: Sequence[tuple[str, Any]] | None) -> tuple[bool, str]:
    """(ok, why not): compares the `authorization` bearer token with `expected` in constant time."""
    given = None
    for key, value in metadata or ():
        if key.lower() == AUTH_METADATA_KEY:
            given = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            break
    if given is None:
        return False, "missing"
    if not given.startswith(BEARER_PREFIX):
        return False, "not a bearer token"
    return hmac.compare_digest(
        given[len(BEARER_PREFIX) :].strip().encode(), expected.encode()
    ), "wrong"


# ------------------------------------------------------------------------------------ identity


def peer_identity(context) -> str:
    """The authenticated identity of the caller of the current server method:

    - `"cert:<CN>"` under mutual TLS: the client certificate's subject common name (or, when it
      has none, its first subject alternative name). The handshake already checked that the
      certificate chains to `--tls-ca`, so this names a distinct, verified peer.
    - `"token"` when the call carried the right `--auth-token-file` secret (and no client
      certificate): every token holder is the same identity.
    - `"anonymous"` otherwise (no auth configured, or a method that is open: health, and
      inspection without `--protect-inspection`).

    Works in any handler of a server built by `services.edge.rpc.GrpcServer` (`context` is the
    method's grpc ServicerContext)."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - a context without auth data (tests' fakes) is anonymous
        auth = {}
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key) or []
        if values:
            value = values[0]
            return CERT_PREFIX + (
                value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            )
    return TOKEN if _token_verified.get() else ANONYMOUS


def mark_token_verified() -> None:
    """Called by the server's AuthInterceptor, in the call's own task, once the token checked out."""
    _token_verified.set(True)


# ------------------------------------------------------------------------------------ servers


@dataclasses.dataclass(frozen=True)
class ServerSecurity:
    """A server's TLS material, token and policy, read from the files once at start-up."""

    cert: bytes = b""
    key: bytes = b""
    ca: bytes = b""
    token: str = ""
    open_inspection: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    admin_identities: frozenset[str] = frozenset()
    max_concurrent_rpcs: int | None = None

    @classmethod
    def from_config(cls, config) -> ServerSecurity:
        """From a ServiceConfig (fields tls_cert, tls_key, tls_ca, auth_token_file, open_inspection,
        max_message_bytes, admin_identity, max_concurrent_rpcs); missing fields mean 'off'.
        (`protect_inspection` is the default now and needs no field here.)"""

        def g(name: str, default: Any = "") -> Any:
            return getattr(config, name, default)

        return cls(
            cert=_read_bytes("tls_cert", g("tls_cert")) if g("tls_cert") else b"",
            key=_read_bytes("tls_key", g("tls_key")) if g("tls_key") else b"",
            ca=_read_bytes("tls_ca", g("tls_ca")) if g("tls_ca") else b"",
            token=read_token(g("auth_token_file")) if g("auth_token_file") else "",
            open_inspection=bool(g("open_inspection", False)),
            max_message_bytes=int(g("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)),
            admin_identities=frozenset(g("admin_identity", ()) or ()),
            max_concurrent_rpcs=g("max_concurrent_rpcs", None) or None,
        )

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        return bool(self.cert and self.ca)

    def credentials(self) -> grpc.ServerCredentials | None:
        """None for plaintext; with a CA, clients must present a certificate chaining to it."""
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca or None,
            require_client_auth=bool(self.ca),
        )

    def needs_token(self, method: str) -> bool:
        if not self.token:
            return False
        kind = method_class(method)
        return kind == "protected" or (kind == "inspection" and not self.open_inspection)

    @property
    def own_identity(self) -> str | None:
        """The identity this server's own pool and session belong to, as `peer_identity` names
        callers: every token holder is "token", and without any authentication everyone is
        "anonymous". Under mutual TLS no caller shares the server's certificate as far as we
        check: only admins see them."""
        if self.mutual:
            return None
        return TOKEN if self.token else ANONYMOUS

    def may_see(self, caller: str, owner: str | None) -> bool:
        """Whether `caller` may see (and act on) what `owner` made: the same identity, or an admin."""
        return caller in self.admin_identities or (owner is not None and caller == owner)

    def describe(self) -> str:
        parts = ["mutual TLS" if self.mutual else "TLS" if self.tls else "plaintext"]
        if self.token:
            parts.append(
                "bearer token"
                + (" (inspection open)" if self.open_inspection else " (inspection too)")
            )
        if self.admin_identities:
            parts.append("admins " + ", ".join(sorted(self.admin_identities)))
        return ", ".join(parts)


# ------------------------------------------------------------------------------------ clients


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


def _with_token(metadata, token: str) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in (metadata or ()) if k.lower() != AUTH_METADATA_KEY]
    out.append((AUTH_METADATA_KEY, BEARER_PREFIX + token))
    return out


class _AioTokenBase:
    """Adds `authorization: Bearer <token>` to every call of an aio channel. grpc.aio files an
    interceptor under the first of the four kinds it is an instance of, so each kind gets its own
    class (`_aio_token_interceptors`)."""

    def __init__(self, token: str):
        self._token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            d.method,
            d.timeout,
            grpc.aio.Metadata(*_with_token(d.metadata, self._token)),
            d.credentials,
            d.wait_for_ready,
        )


class _AioTokenUU(_AioTokenBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenUS(_AioTokenBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioTokenSU(_AioTokenBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioTokenSS(_AioTokenBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _aio_token_interceptors(token: str) -> list:
    return [cls(token) for cls in (_AioTokenUU, _AioTokenUS, _AioTokenSU, _AioTokenSS)]


class _SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The same for the blocking channels of `epd status` / `epd health`."""

    def __init__(self, token: str):
        self._token = token

    def _details(self, d) -> _SyncDetails:
        return _SyncDetails(
            d.method,
            d.timeout,
            _with_token(d.metadata, self._token),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """How this process dials a service: TLS when a CA or a client certificate is given (the
    server's certificate is verified against `ca`; `cert`/`key` are presented for mutual TLS),
    `server_name` overrides the name checked against the server certificate (its SAN), `token`
    is sent as bearer metadata on every call."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    server_name: str = ""
    token: str = ""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @classmethod
    def load(
        cls,
        *,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        tls_server_name: str = "",
        auth_token_file: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ClientSecurity:
        """From file paths; ValueError naming the setting when a file cannot be read or the
        certificate and key are not given together."""
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together: give both (mutual TLS) or neither")
        return cls(
            ca=_read_bytes("tls_ca", tls_ca) if tls_ca else b"",
            cert=_read_bytes("tls_cert", tls_cert) if tls_cert else b"",
            key=_read_bytes("tls_key", tls_key) if tls_key else b"",
            server_name=tls_server_name,
            token=read_token(auth_token_file) if auth_token_file else "",
            max_message_bytes=max_message_bytes,
        )

    @classmethod
    def from_config(cls, config) -> ClientSecurity:

        def g(name: str, default: Any = "") -> Any:
            return getattr(config, name, default)

        return cls.load(
            tls_ca=g("tls_ca"),
            tls_cert=g("tls_cert"),
            tls_key=g("tls_key"),
            tls_server_name=g("tls_server_name"),
            auth_token_file=g("auth_token_file"),
            max_message_bytes=int(g("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)),
        )

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def options(self, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
        """Channel options: message size limits (both ways), the server-name override, `extra`."""
        names = {k for k, _ in extra}
        out: list[tuple[str, Any]] = [
            (k, v)
            for k, v in (
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
            )
            if k not in names
        ]
        if self.server_name and self.tls:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out + list(extra)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca or None,
            private_key=self.key or None,
            certificate_chain=self.cert or None,
        )

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        interceptors = _aio_token_interceptors(self.token) if self.token else None
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(
                address, options=self.options(options), interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            address, creds, options=self.options(options), interceptors=interceptors
        )

    def sync_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            channel = grpc.insecure_channel(address, options=self.options(options))
        else:
            channel = grpc.secure_channel(address, creds, options=self.options(options))
        if self.token:
            return grpc.intercept_channel(channel, _SyncTokenInterceptor(self.token))
        return channel


# ------------------------------------------------------------------------------------ client flags

CLIENT_FLAGS = (
    ("tls_ca", "PEM CA bundle the service's certificate must chain to (turns TLS on)"),
    ("tls_cert", "PEM client certificate to present (mutual TLS; with --tls-key)"),
    ("tls_key", "PEM private key of --tls-cert"),
    ("tls_server_name", "name to check the server certificate against instead of ADDR's host"),
    (
        "auth_token_file",
        "file holding the services' shared secret, sent as 'authorization: Bearer <token>'",
    ),
)


def add_client_arguments(parser, *, env_prefix: str = "EPD_") -> None:
    """The flags of a command that dials the services (`epd status`, `epd health`, `epd demo`,
    `epd bench`): each defaults to the same `EPD_*` variable as the services' setting."""
    import os

    group = parser.add_argument_group("transport security (default: plaintext, no token)")
    for name, help_text in CLIENT_FLAGS:
        env = env_prefix + name.upper()
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar="PATH" if name != "tls_server_name" else "NAME",
            default=os.environ.get(env, ""),
            help=f"{help_text} (env {env})",
        )
    env = env_prefix + "MAX_MESSAGE_BYTES"
    # A string default goes through `type`, so a bad EPD_MAX_MESSAGE_BYTES is a usage error naming it.
    group.add_argument(
        "--max-message-bytes",
        dest="max_message_bytes",
        type=_message_bytes,
        default=os.environ.get(env, str(DEFAULT_MAX_MESSAGE_BYTES)),
        help=f"largest gRPC message sent or received (env {env}; default {DEFAULT_MAX_MESSAGE_BYTES})",
    )


def _message_bytes(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of bytes, got {text!r}"
        ) from None
    if not 64 * 1024 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be in {64 * 1024}..{2**31 - 1}, got {value}")
    return value


def client_from_args(args) -> ClientSecurity:
    """ClientSecurity from `add_client_arguments` flags; ValueError naming the flag when a file
    cannot be read."""
    return ClientSecurity.load(
        **{name: getattr(args, name, "") or "" for name, _ in CLIENT_FLAGS},
        max_message_bytes=getattr(args, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
    )


def service_argv(args, *, language: bool = False) -> list[str]:
    """The same settings as flags of `epd encoder` / `epd language` (the demo and bench pass them
    to the services they start; tls_server_name only to the language)."""
    out: list[str] = []
    for name, _ in CLIENT_FLAGS:
        value = getattr(args, name, "")
        if value and (name != "tls_server_name" or language):
            out += ["--" + name.replace("_", "-"), value]
    size = getattr(args, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    if size != DEFAULT_MAX_MESSAGE_BYTES:
        out += ["--max-message-bytes", str(size)]
    return out
