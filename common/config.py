"""Typed, validated service configuration.

One frozen dataclass per service, built from CLI flags and `EPD_*` environment variables (flags
win). Every field has a docstring; `validate()` rejects impossible values with a message that
names the setting. services/tools/cli.py turns these dataclasses into argparse flags, so the README
table, the flags and the env names all come from the same place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

from common.layout import (
    DTYPE_SIZES,
    MAX_DEEPSTACK_LEVELS,
    FieldSpec,
    RecordLayout,
    payload_fields,
)
from common.models import (
    FAMILIES,
    TINY_DEEPSTACK_LEVELS,
    TINY_MODELS,
    ModelInfo,
    family_of_model_type,
)


class ConfigError(ValueError):
    """An impossible or unknown setting; the message names it."""


ALLOC_POLICIES = ("fixed", "hint", "adaptive", "auto")
PROTOCOLS = ("tcp", "rdma")
WRITE_WAITS = ("poll", "spin")  # how common/transport.py may wait for a write
EMBEDDING_DTYPES = ("bfloat16", "float16", "float32")
CONSUMERS = ("null", "qwen2-vl-prefill", "qwen3-vl-prefill")
ENCODER_POLICIES = ("least-loaded", "round-robin")


def describe_model(setting: str, model: str, hidden: int) -> ModelInfo:
    """A vision-language model name: a tiny one (`TINY_MODELS`, hidden a multiple of 16) or a
    local checkpoint directory whose config.json names a known family and whose text hidden size
    equals the pool's `hidden`. Reads only that config.json, cached while the file is unchanged
    (settings are read often)."""
    config_json = os.path.join(model, "config.json")
    try:
        stamp = os.stat(config_json).st_mtime_ns if model not in TINY_MODELS else 0
        where = os.path.realpath(config_json) if stamp else model
    except OSError:
        stamp, where = 0, model
    return _describe_model(setting, model, hidden, where, stamp)


@functools.lru_cache(maxsize=64)
def _describe_model(setting: str, model: str, hidden: int, where: str, stamp: int) -> ModelInfo:
    tiny = TINY_MODELS.get(model)
    if tiny is not None:
        if hidden % 16:
            raise ConfigError(
                f"{setting}={model!r} needs hidden to be a multiple of 16, got hidden={hidden}"
            )
        levels = TINY_DEEPSTACK_LEVELS if tiny.deepstack else 0
        return ModelInfo(model, tiny, hidden, levels)
    config_json = os.path.join(model, "config.json")
    if not os.path.isfile(config_json):
        raise ConfigError(
            f"{setting}={model!r}: must be one of {tuple(TINY_MODELS)} or a local checkpoint "
            f"directory of {', '.join(f.name for f in FAMILIES)} (no {config_json})"
        )
    try:
        with open(config_json) as f:
            cfg = json.load(f)
        model_type = cfg.get("model_type", "")
        text = cfg.get("text_config") or {}
        vision = cfg.get("vision_config") or {}
        model_hidden = text.get("hidden_size", cfg.get("hidden_size"))
        indexes = vision.get("deepstack_visual_indexes", DEFAULT_DEEPSTACK_INDEXES)
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{setting}={model!r}: cannot read {config_json}: {e}") from None
    family = family_of_model_type(model_type)
    if family is None:
        known = [t for f in FAMILIES for t in f.model_types]
        raise ConfigError(
            f"{setting}={model!r}: {config_json} has model_type={model_type!r}; "
            f"known model types: {known}"
        )
    if not isinstance(model_hidden, int) or isinstance(model_hidden, bool):
        raise ConfigError(
            f"{setting}={model!r}: {config_json} has no integer hidden_size in text_config "
            f"or at its top level (found {model_hidden!r})"
        )
    if model_hidden != hidden:
        raise ConfigError(
            f"{setting}={model!r} has hidden size {model_hidden} but hidden={hidden}: "
            f"the pool's embeddings must be the model's width (set --hidden {model_hidden})"
        )
    levels = 0
    if family.deepstack:
        if not isinstance(indexes, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indexes
        ):
            raise ConfigError(
                f"{setting}={model!r}: {config_json} vision_config.deepstack_visual_indexes="
                f"{indexes!r}: must be a list of layer numbers"
            )
        levels = len(indexes)
        if levels > MAX_DEEPSTACK_LEVELS:
            raise ConfigError(
                f"{setting}={model!r} has {levels} deepstack levels, above the "
                f"{MAX_DEEPSTACK_LEVELS} a payload may carry"
            )
    return ModelInfo(model, family, hidden, levels)


DEFAULT_DEEPSTACK_INDEXES = (8, 16, 24)
"""transformers' Qwen3VLVisionConfig default, for a config.json that leaves it out."""


def check_deepstack_levels(setting: str, levels: int, info: ModelInfo) -> None:
    """An explicit --deepstack-levels must be the model's (0 means: the model's)."""
    if not levels or levels == info.deepstack_levels:
        return
    model = f"model {info.name!r} ({info.family.name})"
    if not info.deepstack_levels:
        raise ConfigError(
            f"{setting}={levels} but {model} fills no deepstack fields: leave it at 0"
        )
    raise ConfigError(
        f"{setting}={levels} but {model} fills {info.deepstack_levels} deepstack fields: "
        f"leave it at 0 (the model's) or set {info.deepstack_levels}"
    )


EVENT_LOOPS = ("auto", "uvloop", "asyncio")
CACHE_SCOPES = ("identity", "shared")


def _setting(
    default,
    help: str,
    *,
    flag: str | None = None,
    choices=None,
    unit: str = "",
    repeat: bool = False,
):
    """A dataclass field carrying the metadata the CLI and README need."""
    meta = {"help": help, "flag": flag, "choices": choices, "unit": unit, "repeat": repeat}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Settings shared by the encoder and the language service."""

    host: str = _setting("127.0.0.1", "address to bind the gRPC server and Mooncake session to")
    """Bind address for gRPC and the Mooncake session (loopback by default)."""
    port: int = _setting(0, "gRPC port (0 = pick a free one and print it in the EPD_READY line)")
    """gRPC port; 0 picks an ephemeral port."""
    metrics_port: int = _setting(
        0, "Prometheus /metrics port, 0 = off (language rank R serves on metrics_port + R)"
    )
    """Port of the Prometheus endpoint on `host`; 0 disables it. Each language rank process
    serves its own endpoint, rank R on `metrics_port + R`."""
    device: str = _setting("cpu", "pool device: cpu or cuda:N")
    """Where the block pool lives: `cpu` or `cuda:N`."""
    protocol: str = _setting("tcp", "Mooncake transport protocol", choices=PROTOCOLS)
    """Mooncake protocol: `tcp` (sets MC_FORCE_TCP=1) or `rdma`."""
    rdma_device: str = _setting("", "RDMA device names for Mooncake (empty = auto)")
    """Mooncake device list for `rdma` (e.g. `mlx5_0`); ignored for tcp."""
    block_size: int = _setting(128, "tokens per block (a power of two)", unit="tokens")
    """Tokens per block; a power of two."""
    pool_blocks: int = _setting(1024, "blocks in the pool", unit="blocks")
    """Blocks in this process's pool."""
    embedding_cache_bytes: int = _setting(
        512 * 2**20,
        "host memory for image rows seen before: the encoder's vision-tower rows, each language "
        "data rank's received rows (0: none kept)",
        unit="bytes",
    )
    """Encoder: a repeated image (same bytes, same model) skips its processing and vision tower;
    its rows come from a least-recently-used cache of at most this many bytes. Language: each data
    rank keeps the records of the images it received, at most this many bytes, and the encoder
    does not send them again while every data rank holds them. Both in host memory."""
    embedding_cache_scope: str = _setting(
        "",
        "who shares kept image rows: 'identity' (each authenticated caller its own) or 'shared' "
        "(everyone); default identity when --auth-token-file or --tls-ca is set, else shared",
        choices=CACHE_SCOPES,
    )
    """A shared cache tells a caller, by timing (and by which encoder serves it), that someone sent
    the same image before. `identity` keeps the rows of each authenticated identity apart: on the
    language, per Generate caller (the encoder keeps them apart for it too); on the encoder, per
    calling language instance as well. Token holders are one identity. See docs/SECURITY.md."""
    hidden: int = _setting(3584, "embedding width (hidden size)", unit="elements")
    """Hidden size of the `embeddings` field."""
    dtype: str = _setting("bfloat16", "embeddings dtype", choices=EMBEDDING_DTYPES)
    """dtype of the `embeddings` field."""
    deepstack_levels: int = _setting(
        0,
        "extra per-token [hidden] fields deepstack_0.. after the default three, one per "
        "deepstack level of the model (Qwen3-VL: 3); 0 = as many as --model has (none "
        "without a model)",
        unit="fields",
    )
    """Fields `deepstack_0`..`deepstack_{N-1}` ([hidden], the embeddings' dtype) after the
    default three. 0 takes the count from the model this service runs (the encoder's `--model`,
    the prefill consumer's): a Qwen3-VL has 3, a Qwen2-VL none. Both services must agree:
    Register compares the layouts. Synthetic payloads fill them with the embeddings' formula,
    the field's index mixed into the seed."""
    alloc_timeout_s: float = _setting(30.0, "longest wait for pool blocks", unit="s")
    """How long an allocation may wait for free blocks before RESOURCE_EXHAUSTED."""
    integrity: bool = _setting(True, "send/verify per-round checksums")
    """Per-round, per-field checksums sent by the encoder and verified by the language."""
    history_size: int = _setting(256, "finished transfers kept for inspection", unit="transfers")
    """How many finished transfers inspection keeps (bounded history)."""
    shutdown_grace_s: float = _setting(
        10.0, "on SIGTERM, how long in-flight transfers may finish", unit="s"
    )
    """Graceful shutdown: new requests get UNAVAILABLE, live transfers get this long, then fail."""
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    """Python logging level."""
    event_loop: str = _setting(
        "auto",
        "asyncio event loop: uvloop when installed (auto), or force one",
        choices=EVENT_LOOPS,
    )
    """`auto` runs on uvloop when it is installed and falls back to asyncio's own loop."""
    torch_threads: int = _setting(
        1, "torch intra-op threads (0 = torch's default: one per core)", unit="threads"
    )
    """1 by default: on shared CPU cores, OpenMP worker threads spin-wait and stall the many small
    tensor operations of a transfer (measured: 64-token checksums 0.25 ms -> 16 ms with 2 threads
    under load). Big checksums and copies are split over worker threads instead."""
    tls_cert: str = _setting(
        "",
        "PEM certificate (chain) of this process: its gRPC server's certificate and, "
        "on the language, its client certificate towards encoders (empty = plaintext)",
    )
    """TLS on (with `tls_key`): the server presents this certificate; the language also presents it
    to encoders. Plaintext when empty (the default)."""
    tls_key: str = _setting("", "PEM private key of --tls-cert")
    """Private key of `tls_cert`."""
    tls_ca: str = _setting(
        "",
        "PEM CA bundle: peers' certificates must chain to it (mutual TLS: callers "
        "must present a client certificate; servers dialled are verified against it)",
    )
    """Mutual TLS: callers of this server must present a certificate chaining to it, and the
    services this process dials (the language's encoders) must present a server certificate that
    chains to it. Needs `tls_cert`."""
    auth_token_file: str = _setting(
        "",
        "file holding a shared secret; every call but health (and inspection, "
        "with --open-inspection) must carry it as 'authorization: Bearer <token>'",
    )
    """Shared-secret authentication without PKI: the file's content (stripped) is checked in constant
    time by one server interceptor and sent by this process's own clients."""
    protect_inspection: bool = _setting(
        False,
        "inspection (GetTransfer, ListTransfers, GetPool, GetDiagnostics) "
        "and reflection need authentication (the default whenever a token "
        "or CA is set; kept for old command lines)",
    )
    """Kept accepted: inspection and reflection already need authentication whenever
    `auth_token_file` or `tls_ca` is set, unless `open_inspection`. Needs `auth_token_file` or `tls_ca`."""
    open_inspection: bool = _setting(
        False,
        "let anyone who reaches the port call inspection (GetTransfer, "
        "ListTransfers, GetPool, GetDiagnostics) and reflection, even with a "
        "token or CA set",
    )
    """Opt out of protected inspection. Even then a caller never sees another instance's Mooncake
    session or pool address (they are blanked), nor another identity's transfers' details when
    identities are told apart (mutual TLS). Health is always open."""
    admin_identity: tuple[str, ...] = _setting(
        (),
        "identity allowed to inspect and cancel every transfer, as "
        "reported in logs: 'cert:<CN>', 'token' or 'anonymous' (repeatable)",
        repeat=True,
    )
    """Operators: these identities see every transfer (with sessions and addresses) and may cancel
    any. Everyone else sees and touches only what its own identity made."""
    max_concurrent_rpcs: int = _setting(
        1024,
        "most RPCs the gRPC server runs at once (more get RESOURCE_EXHAUSTED "
        "before their message is read)",
        unit="calls",
    )
    """gRPC's `maximum_concurrent_rpcs`: bounds the request bodies held in memory at once. Every
    open Status stream and Generate counts."""
    enable_bench: bool = _setting(
        False, "serve the epd.v1.Bench service (raw Mooncake measurements for epd bench)"
    )
    """Off in production: `RawWrite` and `MeasureLink` answer UNIMPLEMENTED. `epd bench` turns it on
    for the processes it starts."""
    max_message_bytes: int = _setting(
        64 * 1024 * 1024, "largest gRPC message sent or received", unit="bytes"
    )
    """Applied to the server and every channel, both directions; a larger message is refused with
    RESOURCE_EXHAUSTED before any handler runs."""
    max_images: int = _setting(64, "most images one request may carry", unit="images")
    """More images → INVALID_ARGUMENT before anything is allocated: at the language's Generate
    (before any block is reserved) and at the encoder's Encode (before any decoding)."""
    max_image_bytes: int = _setting(
        32 * 1024 * 1024, "largest encoded image (PNG/JPEG bytes) of a request", unit="bytes"
    )
    """An image above this many bytes → INVALID_ARGUMENT naming `images[i]`, checked where `max_images` is."""
    quarantine_max_s: float = _setting(
        600.0,
        "longest the write fence keeps blocks quarantined: language, blocks "
        "an encoder never says it stopped writing into; encoder, source "
        "blocks of writes Mooncake never reports final",
        unit="s",
    )
    """The write fence's bound. By then the encoder's write timeout and TCP's retransmission limits
    ended anything of a write: an encoder gone for good, or a piece the engine never reports on,
    must not keep blocks out of the pool forever. Released with a WARNING."""

    @property
    def cache_scope(self) -> str:
        """`embedding_cache_scope`, its default resolved: identity when callers authenticate."""
        if self.embedding_cache_scope:
            return self.embedding_cache_scope
        return "identity" if self.auth_token_file or self.tls_ca else "shared"

    @property
    def record(self) -> RecordLayout:
        return RecordLayout.pack(self.field_specs)

    @property
    def field_specs(self) -> tuple[FieldSpec, ...]:
        return payload_fields(self.hidden, self.dtype, self.layout_deepstack_levels)

    @property
    def model_info(self) -> ModelInfo | None:
        """The vision-language model this service runs, when it runs one."""
        return None

    @property
    def layout_deepstack_levels(self) -> int:
        """The payload's deepstack fields: `deepstack_levels`, or the model's when that is 0."""
        if self.deepstack_levels:
            return self.deepstack_levels
        info = self.model_info
        return info.deepstack_levels if info is not None else 0

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: must be in 0..65535")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port}: must be in 0..65535")
        if not 0 <= self.deepstack_levels <= MAX_DEEPSTACK_LEVELS:
            raise ConfigError(
                f"deepstack_levels={self.deepstack_levels}: must be in 0..{MAX_DEEPSTACK_LEVELS}"
            )
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device):
            raise ConfigError(f"device={self.device!r}: must be 'cpu' or 'cuda:N'")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol={self.protocol!r}: must be one of {PROTOCOLS}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size}: must be a power of two >= 1")
        if self.pool_blocks < 1:
            raise ConfigError(
                f"pool_blocks={self.pool_blocks}: the pool must hold at least one block"
            )
        if self.hidden < 1:
            raise ConfigError(f"hidden={self.hidden}: must be >= 1")
        if self.embedding_cache_bytes < 0:
            raise ConfigError(f"embedding_cache_bytes={self.embedding_cache_bytes}: must be >= 0")
        if self.embedding_cache_scope not in ("", *CACHE_SCOPES):
            raise ConfigError(
                f"embedding_cache_scope={self.embedding_cache_scope!r}: must be one of {CACHE_SCOPES}"
            )
        if self.dtype not in EMBEDDING_DTYPES or self.dtype not in DTYPE_SIZES:
            raise ConfigError(f"dtype={self.dtype!r}: must be one of {EMBEDDING_DTYPES}")
        if self.alloc_timeout_s <= 0:
            raise ConfigError(f"alloc_timeout_s={self.alloc_timeout_s}: must be > 0")
        if self.history_size < 0:
            raise ConfigError(f"history_size={self.history_size}: must be >= 0")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads={self.torch_threads}: must be >= 0")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s={self.shutdown_grace_s}: must be >= 0")
        if not 0 < self.quarantine_max_s <= 86400:
            raise ConfigError(
                f"quarantine_max_s={self.quarantine_max_s}: must be > 0 and at most 86400"
            )
        self._validate_security()

    def _validate_security(self) -> None:
        """TLS files readable, a key that belongs to its certificate, a usable token file; no
        grpc here: the stdlib `ssl` module checks the PEM files."""
        import ssl

        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}: give both or neither"
            )
        if self.tls_ca and not self.tls_cert:
            raise ConfigError(
                f"tls_ca={self.tls_ca!r}: mutual TLS needs this process's own certificate too "
                "(tls_cert and tls_key)"
            )
        for name in ("tls_cert", "tls_key", "tls_ca", "auth_token_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}={path!r}: cannot read it")
        if self.tls_cert:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(
                    f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}: not a PEM certificate and "
                    f"its private key ({e})"
                ) from None
        if self.tls_ca:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=self.tls_ca)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(f"tls_ca={self.tls_ca!r}: not a PEM CA bundle ({e})") from None
        if self.auth_token_file:
            with open(self.auth_token_file, "rb") as f:
                token = f.read().strip()
            if not token:
                raise ConfigError(f"auth_token_file={self.auth_token_file!r}: the file is empty")
            if (
                b"\n" in token
                or b"\r" in token
                or not token.decode("utf-8", "replace").isprintable()
            ):
                raise ConfigError(
                    f"auth_token_file={self.auth_token_file!r}: the token must be one line of "
                    "printable characters"
                )
        if self.protect_inspection and not (self.auth_token_file or self.tls_ca):
            raise ConfigError(
                "protect_inspection=True needs auth_token_file or tls_ca: without them there is "
                "nothing to check"
            )
        if self.protect_inspection and self.open_inspection:
            raise ConfigError(
                "protect_inspection=True and open_inspection=True contradict each other: give one"
            )
        for identity in self.admin_identity:
            if not (
                identity in ("token", "anonymous")
                or (identity.startswith("cert:") and len(identity) > 5)
            ):
                raise ConfigError(
                    f"admin_identity={identity!r}: must be 'cert:<common name>', 'token' or 'anonymous'"
                )
        if not 1 <= self.max_concurrent_rpcs <= 1_000_000:
            raise ConfigError(
                f"max_concurrent_rpcs={self.max_concurrent_rpcs}: must be in 1..1000000"
            )
        if not 64 * 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise ConfigError(
                f"max_message_bytes={self.max_message_bytes}: must be in {64 * 1024}..{2**31 - 1}"
            )
        for name in ("max_images", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ServiceConfig):
    """Settings of `epd encoder`."""

    port: int = _setting(
        50051, "gRPC port (0 = pick a free one and print it in the EPD_READY line)"
    )
    """gRPC port; 0 picks an ephemeral port."""
    pool_blocks: int = _setting(1024, "blocks in the source pool", unit="blocks")
    """Blocks in the encoder's source pool (holds whole payloads while they are sent)."""
    model: str = _setting(
        "bytes",
        "encoder model for non-synthetic requests: 'bytes' (byte-level text only), "
        "'tiny' (a small seeded Qwen2-VL, no download), 'tiny-qwen3' (a small seeded "
        "Qwen3-VL with 3 deepstack levels) or PATH of a local Qwen2-VL, Qwen2.5-VL, "
        "Qwen3-VL or Qwen3-VL-MoE checkpoint (the architecture read from its config.json)",
    )
    """Encoder model: `bytes` embeds UTF-8 text bytes with a seeded table (no images); `tiny` and
    `tiny-qwen3` are a Qwen2-VL and a Qwen3-VL with seeded random weights and hidden size
    `hidden`; a directory is a checkpoint whose config.json `model_type` names its family
    (`common/models.py`; its text hidden size must equal `hidden`)."""
    bootstrap_timeout_s: float = _setting(
        30.0, "longest wait for Init from every data rank (and for Encode)", unit="s"
    )
    """A request not initialised by every data rank (or never encoded) within this fails with `timeout`."""
    resume_timeout_s: float = _setting(
        30.0, "longest wait for Resume after a partial round", unit="s"
    )
    """A partial round not resumed by every data rank within this fails with `timeout`."""
    write_timeout_s: float = _setting(
        30.0,
        "longest one Mooncake write (a round or part of one, to one rank) may take before it "
        "fails with transport (Mooncake's MC_TRANSFER_TIMEOUT, at least 5)",
        unit="s",
    )
    """Bounds a write into a dead link: Mooncake gives up after this (+1 ns per byte) and the
    request fails with `transport`; its TCP connection is dropped earlier, after half of it without
    progress, so nothing of the write can still be read from our blocks once they are freed."""
    write_wait: str = _setting(
        "poll",
        "how a Mooncake write is waited for: 'poll' (submit, then check its status "
        "with short sleeps) or 'spin' (batch_transfer_sync_write, which busy-polls)",
        choices=WRITE_WAITS,
    )
    """`spin` keeps a core busy for the whole write; `poll` leaves it to the TCP copy, the
    checksums and the next request's encode (common/transport.py; docs/BENCHMARKS.md). The bench's
    raw baseline is always `batch_transfer_sync_write`."""
    max_request_tokens: int = _setting(
        1_000_000, "largest payload one request may have", unit="tokens"
    )
    """Encode above this many tokens is rejected with INVALID_ARGUMENT before any allocation."""
    max_transfers_per_peer: int = _setting(
        256,
        "most transfers one language instance (identity) may have live on this encoder",
        unit="transfers",
    )
    """A new transfer beyond this many live ones of the same language identity (its `language_id`,
    bound to its certificate under mutual TLS) gets RESOURCE_EXHAUSTED naming the peer; nothing is allocated."""
    max_transfers_per_identity: int = _setting(
        512,
        "most transfers one authenticated identity may have live on "
        "this encoder, over all its language_ids",
        unit="transfers",
    )
    """The caller picks its `language_id`; this bound does not depend on it. Under a shared token
    every holder is one identity."""
    max_live_transfers: int = _setting(
        2048, "most transfers live on this encoder in all", unit="transfers"
    )
    """A new transfer beyond this gets RESOURCE_EXHAUSTED; nothing is allocated."""
    max_sessions_per_identity: int = _setting(
        256,
        "most (language_id, rank) registrations one identity may hold "
        "(and Register challenges outstanding)",
        unit="sessions",
    )
    """At the bound a new registration replaces the identity's least recently used one that no live
    transfer uses (that language registers again when it next needs to); when every one is in use
    it gets RESOURCE_EXHAUSTED. Under a shared token all language ranks are one identity."""
    max_sessions: int = _setting(
        1024, "most (language_id, rank) registrations this encoder holds in all", unit="sessions"
    )
    """The same over every identity; re-registering an existing one always works."""
    max_status_streams_per_identity: int = _setting(
        512, "most Status streams one identity may keep open", unit="streams"
    )
    """Each data rank of each live transfer keeps one Status stream open."""
    max_status_streams: int = _setting(
        768, "most Status streams open in all (below max_concurrent_rpcs)", unit="streams"
    )
    """Kept below `max_concurrent_rpcs`, so waiting streams cannot take every call slot."""
    encoder_id: str = _setting("", "name reported to peers (default host:port)")
    """Identity reported in RegisterReply and GenerateReply.encoder."""

    def validate(self) -> None:
        super().validate()
        for name in ("bootstrap_timeout_s", "resume_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be > 0")
        if not 5 <= self.write_timeout_s <= 3600:
            raise ConfigError(
                f"write_timeout_s={self.write_timeout_s}: must be in 5..3600 (Mooncake's minimum is 5 s)"
            )
        if self.write_wait not in WRITE_WAITS:
            raise ConfigError(f"write_wait={self.write_wait!r}: must be one of {WRITE_WAITS}")
        if self.max_request_tokens < 1:
            raise ConfigError(f"max_request_tokens={self.max_request_tokens}: must be >= 1")
        for name in (
            "max_transfers_per_peer",
            "max_transfers_per_identity",
            "max_live_transfers",
            "max_sessions_per_identity",
            "max_sessions",
            "max_status_streams_per_identity",
            "max_status_streams",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        # ConfigError for an unknown model or a hidden size that is not the model's. A model
        # whose deepstack levels differ from an explicit --deepstack-levels is no error: the
        # service serves synthetic requests only (it refuses the others, naming both counts).
        if self.model != "bytes":
            describe_model("model", self.model, self.hidden)

    @property
    def model_info(self) -> ModelInfo | None:
        return None if self.model == "bytes" else describe_model("model", self.model, self.hidden)


@dataclasses.dataclass(frozen=True)
class LanguageConfig(ServiceConfig):
    """Settings of `epd language`."""

    port: int = _setting(
        50052, "gRPC port (0 = pick a free one and print it in the EPD_READY line)"
    )
    """gRPC port; 0 picks an ephemeral port."""
    pool_blocks: int = _setting(256, "blocks in the destination pool (per rank)", unit="blocks")
    """Blocks in each rank's destination pool."""
    encoder: tuple[str, ...] = _setting((), "encoder address host:port (repeatable)", repeat=True)
    """Encoder addresses; each request goes to one of them (`encoder_policy`). A name that resolves
    to several addresses (a scaled compose service) stands for all of them."""
    encoder_file: str = _setting(
        "", "file with more encoder addresses, one host:port per line ('#' comments)"
    )
    """Encoders read from a file at start-up, added after `--encoder`."""
    encoder_policy: str = _setting(
        "least-loaded", "how a request's encoder is picked", choices=ENCODER_POLICIES
    )
    """`least-loaded` (fewest transfers in flight, then most free source blocks) or `round-robin`."""
    tp: int = _setting(1, "tensor-parallel ranks of this language instance", unit="ranks")
    """TP size: rank 0 (this process) starts ranks 1..tp-1 as processes in one gloo group."""
    data_ranks: str = _setting("", "comma-separated ranks that receive data (default: all)")
    """Which ranks receive a copy of the payload; the others are dummy ranks."""
    initial_tokens: int = _setting(
        8192, "tokens reserved before the real size is known", unit="tokens"
    )
    """Initial allocation of the `fixed` policy (clamped to the pool); `auto` falls back to it
    for a payload larger than the pool."""
    alloc_policy: str = _setting("fixed", "initial allocation policy", choices=ALLOC_POLICIES)
    """`fixed` (initial_tokens), `hint` (the client's expected_tokens), `adaptive`, or `auto`
    (size-first: the encoder says the payload's size before its model runs, and the ranks reserve
    exactly that; a payload larger than the pool gets initial_tokens and resume rounds)."""
    adaptive_min_tokens: int = _setting(1024, "lower bound of the adaptive policy", unit="tokens")
    """Smallest initial allocation `adaptive` may choose."""
    adaptive_max_tokens: int = _setting(65536, "upper bound of the adaptive policy", unit="tokens")
    """Largest initial allocation `adaptive` may choose."""
    early_init: bool = _setting(
        True, "send the Init alongside the Encode when the pool has room to spare"
    )
    """Single-rank instances reserve the initial allocation and send the Init while the Encode runs,
    when the pool can take it at once and keeps room for the largest initial allocation of a request
    admitted after its Encode (so the two pools cannot deadlock); otherwise after the Encode."""
    encode_stream: bool = _setting(
        True,
        "rank 0 follows its Status stream on the Encode's own call (Encoder.EncodeStream): "
        "one call per request fewer on each side",
    )
    """When rank 0 receives data: the Encode and rank 0's statuses share one server-streaming
    call. An encoder that does not serve it (UNIMPLEMENTED) gets the Encode and the Status stream
    as two calls, as with this off."""
    carry_init: bool = _setting(
        True,
        "an early Init travels inside its Encode (EncodeRequest.init), one message "
        "instead of two; off: its own Init RPC just ahead of the Encode",
    )
    """With `early_init`: the Encode carries the rank's Init and the encoder handles it first, so the
    request's critical path has one gRPC call fewer on each side. An encoder that refuses it (e.g.
    restarted and no longer knows our session) or does not know the field still runs the Encode;
    the rank then sends the Init on its own."""
    progress_tokens: int = _setting(
        0,
        "ask the encoder for a progress status every N tokens of a round, so what "
        "landed is verified while the rest is written (0 = whole rounds)",
        unit="tokens",
    )
    """InitRequest.progress_tokens: a round of more than this many tokens is written in parts, each
    part's checksums reported as it lands, so verification overlaps the write (integrity only). Off by
    default: it pays where checksums are expensive and cores are spare (a CPU pool on a many-core
    host); on 2 shared vCPUs the parts' checks take the write's CPU and big rounds got slower
    (docs/BENCHMARKS.md)."""
    overlap_rounds: bool = _setting(
        False,
        "resume into free blocks before copying out and verifying the round "
        "just received, so those overlap the next round's write",
    )
    """Double-buffered rounds: when a round arrives, more than one round remains, and the pool has
    blocks to spare right now (at least as many as the round used; taken only when no other
    allocation waits), the Resume goes out at once and the round is copied out and verified while
    the encoder writes the next one. The round before the last is not overlapped, so a round that
    fails its check still fails the transfer on the encoder (cancelled with reason `integrity`,
    never ended as a success first). Otherwise: copy out and verify, free, allocate, Resume.
    Off by default: the overlapped rounds are smaller (the free blocks only, not those plus the
    round's own), and on 2 shared vCPUs the extra rounds cost more than the overlap saved
    (docs/BENCHMARKS.md: 8192 tokens through a two-round pool, 7 rounds in 70-74 ms with it,
    5 rounds in 58-68 ms without)."""
    consumer: str = _setting(
        "null",
        "what receives the payload ('null': releases it; 'qwen2-vl-prefill' (Qwen2-VL, "
        "Qwen2.5-VL) and 'qwen3-vl-prefill' (Qwen3-VL, Qwen3-VL-MoE): run the model's "
        "language part and "
        "return the first token)",
        choices=CONSUMERS,
    )
    """Consumer the received payload is handed to (services/language/consumers.py)."""
    model: str = _setting(
        "tiny",
        "weights of the prefill consumer: 'tiny', 'tiny-qwen3' or PATH of the "
        "encoder's checkpoint (ignored by the null consumer)",
    )
    """The weights the prefill consumer runs: `tiny` / `tiny-qwen3` (seeded, hidden size `hidden`)
    or the same checkpoint directory as the encoder's `--model`; its family must be the
    consumer's."""
    tls_server_name: str = _setting(
        "",
        "name checked against the encoders' server certificates instead of the "
        "address's host (for certificates whose SAN is a DNS name)",
    )
    """TLS server-name override for the channels to encoders (`grpc.ssl_target_name_override`)."""
    language_id: str = _setting("", "identity of this language instance (default: a UUID)")
    """Identity sent with Register/Init/Resume; unique per instance."""
    generate_timeout_s: float = _setting(
        600.0, "upper bound of one Generate when the client sets no deadline", unit="s"
    )
    """Generate fails with DEADLINE_EXCEEDED after this long."""
    quarantine_grace_s: float = _setting(
        15.0,
        "after a transfer ended without the encoder confirming it, how long "
        "its blocks stay quarantined once the encoder answers again",
        unit="s",
    )
    """Blocks the encoder may still write into (its Cancel got no answer) are neither free nor
    handed out until the encoder answered a Cancel of that transfer and then stayed reachable this
    long, plus as long as it had been unreachable: what a failed write left in the encoder's kernel
    arrives after the link is back (measured ~4.5 s after a 3.3 s cut)."""
    rank_pool_blocks: str = _setting(
        "", "per-rank pool size overrides, e.g. '1:64,2:32' (default: --pool-blocks)"
    )
    """Ranks whose pool differs from `pool_blocks` (ranks on GPUs with less free memory)."""
    consumer_log: str = _setting(
        "", "append each consumed request id to PATH.rankN (audit of delivery order)"
    )
    """Path prefix of a per-rank log of consumed request ids, in consumption order."""
    rank: int = _setting(
        0, "this process's TP rank (rank 0 sets it for the rank processes it starts)"
    )
    """TP rank of this process; 0 is the front door and starts ranks 1..tp-1."""
    dist_init: str = _setting(
        "", "torch.distributed init method of the rank group (rank 0 sets it)"
    )
    """Rendezvous of the rank group, e.g. tcp://127.0.0.1:PORT; chosen by rank 0."""

    @property
    def model_info(self) -> ModelInfo | None:
        """The prefill consumer's model; the null consumer runs none (`model` is ignored)."""
        if self.consumer == "null" or self.consumer not in CONSUMERS:
            return None
        return describe_model("model", self.model, self.hidden)

    def validate(self) -> None:
        super().validate()
        for addr in self.encoder:
            if not re.fullmatch(r"[^\s:]+:[0-9]{1,5}", addr):
                raise ConfigError(f"encoder={addr!r}: must be host:port")
        if self.encoder_file:
            self.encoder_addresses()  # ConfigError naming the file and line
        if self.encoder_policy not in ENCODER_POLICIES:
            raise ConfigError(
                f"encoder_policy={self.encoder_policy!r}: must be one of {ENCODER_POLICIES}"
            )
        if not 0 <= self.quarantine_grace_s <= 3600:
            raise ConfigError(f"quarantine_grace_s={self.quarantine_grace_s}: must be in 0..3600")
        if not self.quarantine_grace_s <= self.quarantine_max_s <= 86400:
            raise ConfigError(
                f"quarantine_max_s={self.quarantine_max_s}: must be in quarantine_grace_s "
                f"({self.quarantine_grace_s})..86400"
            )
        if not 1 <= self.tp <= 64:
            raise ConfigError(f"tp={self.tp}: must be in 1..64")
        if not 0 <= self.rank < self.tp:
            raise ConfigError(f"rank={self.rank}: must be in 0..{self.tp - 1}")
        if self.metrics_port and self.rank == 0 and self.metrics_port + self.tp - 1 > 65535:
            raise ConfigError(
                f"metrics_port={self.metrics_port}: ranks 0..{self.tp - 1} serve on metrics_port + rank, "
                "which must stay <= 65535"
            )
        if self.rank_pool_blocks:
            self.pool_blocks_of(0)  # validates the syntax
        if self.data_ranks:
            try:
                ranks = [int(r) for r in self.data_ranks.split(",")]
            except ValueError:
                raise ConfigError(
                    f"data_ranks={self.data_ranks!r}: must be comma-separated rank numbers"
                ) from None
            if (
                not ranks
                or any(not 0 <= r < self.tp for r in ranks)
                or len(set(ranks)) != len(ranks)
            ):
                raise ConfigError(
                    f"data_ranks={self.data_ranks!r}: must be distinct ranks in 0..{self.tp - 1}"
                )
        if self.initial_tokens < 1:
            raise ConfigError(f"initial_tokens={self.initial_tokens}: must be >= 1")
        if self.alloc_policy not in ALLOC_POLICIES:
            raise ConfigError(
                f"alloc_policy={self.alloc_policy!r}: must be one of {ALLOC_POLICIES}"
            )
        if not 1 <= self.adaptive_min_tokens <= self.adaptive_max_tokens:
            raise ConfigError(
                f"adaptive_min_tokens={self.adaptive_min_tokens}, adaptive_max_tokens={self.adaptive_max_tokens}: "
                "need 1 <= min <= max"
            )
        if self.consumer not in CONSUMERS:
            raise ConfigError(f"consumer={self.consumer!r}: must be one of {CONSUMERS}")
        info = self.model_info
        if info is not None:
            if info.family.consumer != self.consumer:
                raise ConfigError(
                    f"consumer={self.consumer!r} does not run model {info.name!r} "
                    f"({info.family.name}): use --consumer {info.family.consumer}"
                )
            check_deepstack_levels("deepstack_levels", self.deepstack_levels, info)
            if 0 not in self.data_rank_list:
                raise ConfigError(
                    f"consumer={self.consumer!r} runs the model on rank 0, so rank 0 must be a data rank "
                    f"(data_ranks={self.data_ranks!r})"
                )
        if self.progress_tokens < 0:
            raise ConfigError(
                f"progress_tokens={self.progress_tokens}: must be >= 0 (0 = whole rounds)"
            )
        if self.generate_timeout_s <= 0:
            raise ConfigError(f"generate_timeout_s={self.generate_timeout_s}: must be > 0")
        if self.tls_server_name and not self.tls_cert:
            raise ConfigError(
                f"tls_server_name={self.tls_server_name!r}: only used with TLS (tls_cert, tls_key, tls_ca)"
            )

    def encoder_addresses(self) -> tuple[str, ...]:
        """`encoder` followed by the lines of `encoder_file` (blank lines and '#' comments skipped),
        without repeats, in order."""
        out = list(self.encoder)
        if self.encoder_file:
            try:
                with open(self.encoder_file) as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise ConfigError(
                    f"encoder_file={self.encoder_file!r}: cannot read it: {e.strerror}"
                ) from None
            for n, line in enumerate(lines, 1):
                addr = line.split("#", 1)[0].strip()
                if not addr:
                    continue
                if not re.fullmatch(r"[^\s:]+:[0-9]{1,5}", addr):
                    raise ConfigError(
                        f"encoder_file={self.encoder_file!r} line {n}: {addr!r} must be host:port"
                    )
                out.append(addr)
        return tuple(dict.fromkeys(out))

    def pool_blocks_of(self, rank: int) -> int:
        """Pool blocks of `rank`, with the `rank_pool_blocks` overrides applied."""
        blocks = self.pool_blocks
        for item in filter(None, self.rank_pool_blocks.split(",")):
            try:
                r, n = (int(x) for x in item.split(":"))
            except ValueError:
                raise ConfigError(
                    f"rank_pool_blocks={self.rank_pool_blocks!r}: items must be RANK:BLOCKS"
                ) from None
            if not 0 <= r < self.tp or n < 1:
                raise ConfigError(
                    f"rank_pool_blocks={self.rank_pool_blocks!r}: rank {r} or blocks {n} out of range"
                )
            if r == rank:
                blocks = n
        return blocks

    @property
    def data_rank_list(self) -> tuple[int, ...]:
        if not self.data_ranks:
            return tuple(range(self.tp))
        return tuple(int(r) for r in self.data_ranks.split(","))
