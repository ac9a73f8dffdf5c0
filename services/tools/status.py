"""`epd status` and `epd health`: look at a running encoder or language service.

- `epd status ADDR` prints the service's transfers (live ones first, then the bounded history,
  newest first) as a table, then its pool; `epd status ADDR REQUEST_ID` prints one transfer in
  detail with every rank's view. `--json` prints the raw messages (google.protobuf.json_format)
  for scripts. It works against either service: it asks `epd.v1.Language` first and falls back
  to `epd.v1.Encoder` when the server does not implement it (both share the inspection RPCs).
- `epd health ADDR` asks `grpc.health.v1.Health/Check` and exits 0 only when the answer is
  SERVING, so containers can use it as their health check.

Exit codes: 0 success (health: SERVING), 1 the service said no or could not be asked (unknown
request id, unreachable address, deadline passed, NOT_SERVING), 2 bad command-line values.

Entry points used by `services/tools/cli.py`: `add_status_arguments`, `run_status`,
`add_health_arguments`, `run_health`. Only grpc and the generated stubs are imported here (no
torch), so a health check starts fast. Every channel is made by `open_channel` with the
`--tls-*` / `--auth-token-file` flags (services/edge/security.py): TLS, a client certificate and the
bearer token work as for the services' own clients.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import grpc

from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2_grpc
from services.edge import security

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_TIMEOUT_S = 5.0
ERROR_WIDTH = 60  # characters of "reason: message" in the transfers table
DETAIL_LIMIT = 2048  # max characters of a server's error details echoed on stderr

# Asked in this order: a language service also answers health and reflection like an encoder.
SERVICES: tuple[tuple[str, Callable], ...] = (
    ("epd.v1.Language", language_pb2_grpc.LanguageStub),
    ("epd.v1.Encoder", encoder_pb2_grpc.EncoderStub),
)

_STATE_PREFIX = "TRANSFER_STATE_"
_REASON_PREFIX = "FAILURE_REASON_"
_LIVE_STATES = (
    common_pb2.TRANSFER_STATE_BOOTSTRAPPING,
    common_pb2.TRANSFER_STATE_WAITING_FOR_INPUT,
    common_pb2.TRANSFER_STATE_TRANSFERRING,
)


class InspectError(Exception):
    """A failure to report on stderr with exit code 1 (the message names what went wrong)."""


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def parse_address(text: str) -> str:
    """`host:port` (IPv6 as `[addr]:port`); argparse turns the error into exit code 2."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        bare_host = host[1:-1]
    else:
        bare_host = host
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not host:port (write an IPv6 address as [addr]:port)"
            )
    if (
        not sep
        or not bare_host
        or any(c.isspace() or c in "/[]" for c in bare_host.replace(":", ""))
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port!r} is not a number in 1..65535")
    return text


def parse_state(text: str) -> int:
    """A TransferState by name, any case, with or without the TRANSFER_STATE_ prefix."""
    name = text.strip().upper()
    if not name.startswith(_STATE_PREFIX):
        name = _STATE_PREFIX + name
    if name == _STATE_PREFIX + "UNSPECIFIED" or name not in common_pb2.TransferState.keys():  # noqa: SIM118 - an enum wrapper, not a dict
        raise argparse.ArgumentTypeError(
            f"unknown state {text!r} (choose from {', '.join(state_names())})"
        )
    return common_pb2.TransferState.Value(name)


def state_names() -> list[str]:
    return [
        short_state(v)
        for v in common_pb2.TransferState.values()
        if v != common_pb2.TRANSFER_STATE_UNSPECIFIED
    ]


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in 0..{2**32 - 1} (0: no limit), got {value}")
    return value


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show an encoder's or a language service's transfers (live first, then the finished "
        "ones it keeps, newest first) and its pool, or one transfer in detail with every rank's view."
    )
    parser.epilog = (
        "exit codes: 0 shown, 1 unknown request id / unreachable / the call failed, 2 bad arguments"
    )
    parser.add_argument(
        "address", metavar="ADDR", type=parse_address, help="service address host:port"
    )
    parser.add_argument(
        "request_id",
        metavar="REQUEST_ID",
        nargs="?",
        default=None,
        help="show this transfer in detail (default: list every transfer, then the pool)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the raw messages as JSON (for scripts)"
    )
    parser.add_argument(
        "--state",
        dest="states",
        metavar="STATE",
        type=parse_state,
        action="append",
        default=[],
        help=f"list only transfers in this state (repeatable): {', '.join(state_names())}",
    )
    parser.add_argument(
        "--limit", type=_limit, default=0, help="list at most this many transfers (default 0: all)"
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    security.add_client_arguments(parser)


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Ask grpc.health.v1.Health/Check and print the status (for container health checks)."
    )
    parser.epilog = "exit codes: 0 SERVING, 1 anything else (NOT_SERVING, unknown service, unreachable, timeout), 2 bad arguments"
    parser.add_argument(
        "address", metavar="ADDR", type=parse_address, help="service address host:port"
    )
    parser.add_argument(
        "--service",
        default="",
        help="service name to ask about, e.g. epd.v1.Encoder (default '': the whole server)",
    )
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    security.add_client_arguments(parser)


# --------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------


def open_channel(address: str, sec: security.ClientSecurity | None = None) -> grpc.Channel:
    """The channel every command uses: plaintext, or TLS / a bearer token as `sec` says."""
    return (sec or security.ClientSecurity()).sync_channel(address)


def _client_security(command: str, args: argparse.Namespace) -> security.ClientSecurity | None:
    """The flags' ClientSecurity, or None after printing why the files cannot be used."""
    try:
        return security.client_from_args(args)
    except ValueError as e:
        _note(command, str(e))
        return None


def _details(e: grpc.RpcError) -> str:
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    return details if len(details) <= DETAIL_LIMIT else details[:DETAIL_LIMIT] + "..."


def rpc_failure(e: grpc.RpcError, address: str, method: str, timeout: float) -> InspectError:
    """A failed call as a message naming the address (and, for other errors, the method)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNAVAILABLE:
        return InspectError(f"cannot reach {address}: {_details(e)}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return InspectError(f"{address} did not answer {method} within --timeout {timeout:g} s")
    return InspectError(f"{address}: {method} failed: {code.name}: {_details(e)}")


def call_either(channel: grpc.Channel, address: str, method: str, request, timeout: float):
    """Call `method` on the first of SERVICES the server implements: (service name, stub, reply)."""
    for name, stub_cls in SERVICES:
        stub = stub_cls(channel)
        try:
            return name, stub, getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                continue
            if e.code() == grpc.StatusCode.NOT_FOUND and method == "GetTransfer":
                raise InspectError(
                    f"no transfer {request.request_id!r} on {address} ({name}): {_details(e)}"
                ) from None
            raise rpc_failure(e, address, f"{name}/{method}", timeout) from None
    raise InspectError(f"{address} serves neither {' nor '.join(n for n, _ in SERVICES)}")


def _call(stub, name: str, address: str, method: str, request, timeout: float):
    try:
        return getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as e:
        raise rpc_failure(e, address, f"{name}/{method}", timeout) from None


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def short_state(value: int) -> str:
    try:
        return common_pb2.TransferState.Name(value).removeprefix(_STATE_PREFIX)
    except ValueError:
        return str(value)


def short_reason(value: int) -> str:
    try:
        return common_pb2.FailureReason.Name(value).removeprefix(_REASON_PREFIX).lower()
    except ValueError:
        return str(value)


def error_text(info: common_pb2.TransferInfo, width: int | None = None) -> str:
    """`reason: message`, or "-" when the transfer has no error; cut to `width` characters. A
    transfer that ended while a write of it may still land (the write fence) starts with
    `[writes may land]`, ahead of what may be cut."""
    if not info.HasField("error") or (not info.error.reason and not info.error.message):
        return "-"
    text = (
        f"{short_reason(info.error.reason)}: {info.error.message}"
        if info.error.message
        else short_reason(info.error.reason)
    )
    if info.error.writes_may_land:
        text = f"[writes may land] {text}"
    text = " ".join(text.split())  # one line
    if width is not None and len(text) > width:
        text = text[: width - 3] + "..."
    return text


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def is_live(info: common_pb2.TransferInfo) -> bool:
    return info.state in _LIVE_STATES


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()
) -> str:
    """Columns padded to their widest cell; the columns in `right` (indexes) right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        padded = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


TRANSFER_HEADERS = (
    "REQUEST",
    "STATE",
    "ROUNDS",
    "SENT/TOTAL",
    "ALLOC",
    "BYTES",
    "AGE_S",
    "INIT_S",
    "XFER_S",
    "PEER",
    "ERROR",
)


def transfer_row(info: common_pb2.TransferInfo) -> list[str]:
    return [
        info.request_id,
        short_state(info.state),
        str(info.rounds),
        f"{info.sent_tokens}/{info.total_tokens}",
        str(info.allocated_tokens),
        human_bytes(info.bytes),
        _seconds(info.age_seconds),
        _seconds(info.bootstrap_seconds) if info.bootstrap_seconds else "-",
        _seconds(info.transfer_seconds) if info.transfer_seconds and not is_live(info) else "-",
        info.peer or "-",
        error_text(info, ERROR_WIDTH),
    ]


def transfers_text(service: str, address: str, transfers: Sequence[common_pb2.TransferInfo]) -> str:
    live = sum(1 for t in transfers if is_live(t))
    head = f"{service} at {address}: {len(transfers)} transfer(s), {live} live"
    if not transfers:
        return head
    table = format_table(
        TRANSFER_HEADERS, [transfer_row(t) for t in transfers], right=frozenset(range(2, 9))
    )
    return f"{head}\n\n{table}"


def pool_text(pool: common_pb2.PoolInfo) -> str:
    layout = pool.layout
    total = layout.num_blocks or pool.used_blocks + pool.free_blocks + pool.quarantined_blocks
    quarantined = f", {pool.quarantined_blocks} quarantined" if pool.quarantined_blocks else ""
    lines = [
        f"pool: {pool.used_blocks}/{total} blocks used, {pool.free_blocks} free{quarantined}, {pool.waiters} waiting "
        f"(block_size {layout.block_size}, record {layout.record_bytes} B, device {pool.device or '?'}, "
        f"session {pool.session or '-'})"
    ]
    if pool.HasField("embedding_cache"):
        lines.append(f"embedding cache: {cache_text(pool.embedding_cache)}")
    if pool.rank_pools:
        rows = [
            [
                str(rp.rank),
                str(rp.used_blocks),
                str(rp.free_blocks),
                str(rp.quarantined_blocks),
                str(rp.waiters),
                human_bytes(rp.embedding_cache.bytes),
                str(rp.embedding_cache.entries),
                hit_rate(rp.embedding_cache),
            ]
            for rp in pool.rank_pools
        ]
        table = format_table(
            ("RANK", "USED", "FREE", "QUARANTINED", "WAITERS", "CACHED", "IMAGES", "HIT-RATE"),
            rows,
            right=frozenset(range(8)),
        )
        lines += ["", table]
    return "\n".join(lines)


def hit_rate(cache: common_pb2.EmbeddingCacheInfo) -> str:
    looked = cache.hits + cache.misses
    return f"{100.0 * cache.hits / looked:.1f} %" if looked else "-"


def cache_text(cache: common_pb2.EmbeddingCacheInfo) -> str:
    """'3.0 MiB of 512.0 MiB, 4 images; 6 hits, 4 misses (60.0 %), 0 evictions', or 'off'."""
    if not cache.capacity_bytes:
        return "off (--embedding-cache-bytes 0)"
    return (
        f"{human_bytes(cache.bytes)} of {human_bytes(cache.capacity_bytes)}, {cache.entries} "
        f"images; {cache.hits} hits, {cache.misses} misses ({hit_rate(cache)}), "
        f"{cache.evictions} evictions"
    )


def transfer_detail_text(service: str, address: str, info: common_pb2.TransferInfo) -> str:
    share = f" ({100.0 * info.sent_tokens / info.total_tokens:.1f} %)" if info.total_tokens else ""
    if is_live(info):
        transfer = "- (still live)"
    elif info.transfer_seconds:
        transfer = f"{_seconds(info.transfer_seconds)} s (first Init -> end)"
    else:
        transfer = "-"
    bootstrap = (
        f"{_seconds(info.bootstrap_seconds)} s (creation -> first Init)"
        if info.bootstrap_seconds
        else "- (no Init yet)"
        if is_live(info)
        else "-"
    )
    fields = [
        ("request", info.request_id),
        ("service", f"{service} at {address}"),
        ("state", short_state(info.state)),
        ("rounds", str(info.rounds)),
        ("tokens", f"{info.sent_tokens} of {info.total_tokens} sent{share}"),
        ("allocated", f"{info.allocated_tokens} tokens"),
        ("bytes", f"{info.bytes} ({human_bytes(info.bytes)})"),
        ("age", f"{_seconds(info.age_seconds)} s"),
        ("bootstrap", bootstrap),
        ("transfer", transfer),
        ("peer", info.peer or "-"),
        ("error", error_text(info)),
    ]
    width = max(len(k) for k, _ in fields)
    lines = [f"{k.ljust(width)}  {v}" for k, v in fields]
    if info.ranks:
        rows = [
            [
                str(v.rank),
                short_state(v.state),
                str(v.sent_tokens),
                str(v.allocated_tokens),
                v.session or "-",
            ]
            for v in info.ranks
        ]
        table = format_table(
            ("RANK", "STATE", "SENT", "ALLOCATED", "SESSION"), rows, right=frozenset({0, 2, 3})
        )
        lines += ["", "ranks:", *("  " + line for line in table.splitlines())]
    else:
        lines += ["", "ranks: (no rank has reported this request)"]
    return "\n".join(lines)


def as_json(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _note(command: str, message: str) -> None:
    print(f"epd {command}: {message}", file=sys.stderr)


def encoders_text(encoders: Sequence[common_pb2.EncoderState]) -> str:
    """The language's encoders: which are in the rotation, and how busy."""
    rows = [
        [
            e.encoder_id or "-",
            e.address or "(hidden)",
            "retired" if e.retired else ("yes" if e.available else "no"),
            str(e.in_flight),
            str(e.live_transfers),
            str(e.picked),
            e.last_error[:60] or "-",
        ]
        for e in encoders
    ]
    table = format_table(
        ("ENCODER", "ADDRESS", "IN ROTATION", "IN FLIGHT", "LIVE", "PICKED", "LAST ERROR"),
        rows,
        right=frozenset({3, 4, 5}),
    )
    return f"encoders: {sum(e.available for e in encoders)} of {len(encoders)} in the rotation\n\n{table}"


def _status_list(channel: grpc.Channel, args: argparse.Namespace) -> str:
    request = common_pb2.ListTransfersRequest(states=args.states, limit=args.limit)
    name, stub, reply = call_either(channel, args.address, "ListTransfers", request, args.timeout)
    pool = _call(stub, name, args.address, "GetPool", common_pb2.GetPoolRequest(), args.timeout)
    diagnostics = _call(
        stub, name, args.address, "GetDiagnostics", common_pb2.GetDiagnosticsRequest(), args.timeout
    )
    if args.json:
        return json.dumps(
            {
                "service": name,
                "address": args.address,
                "transfers": [as_json(t) for t in reply.transfers],
                "pool": as_json(pool),
                "encoders": [as_json(e) for e in diagnostics.encoders],
            },
            indent=2,
        )
    text = f"{transfers_text(name, args.address, reply.transfers)}\n\n{pool_text(pool)}"
    if diagnostics.encoders:
        text += f"\n\n{encoders_text(diagnostics.encoders)}"
    return text


def _status_one(channel: grpc.Channel, args: argparse.Namespace) -> str:
    request = common_pb2.GetTransferRequest(request_id=args.request_id)
    name, _, info = call_either(channel, args.address, "GetTransfer", request, args.timeout)
    if args.json:
        return json.dumps(
            {"service": name, "address": args.address, "transfer": as_json(info)}, indent=2
        )
    return transfer_detail_text(name, args.address, info)


def run_status(args: argparse.Namespace) -> int:
    """`epd status ADDR [REQUEST_ID]`; returns the exit code."""
    if args.request_id is not None:
        if not args.request_id:
            _note("status", "REQUEST_ID is empty")
            return EXIT_USAGE
        if args.states or args.limit:
            _note(
                "status", "--state and --limit filter the list; they do not apply to one REQUEST_ID"
            )
            return EXIT_USAGE
    sec = _client_security("status", args)
    if sec is None:
        return EXIT_USAGE
    try:
        with open_channel(args.address, sec) as channel:
            text = (
                _status_one(channel, args)
                if args.request_id is not None
                else _status_list(channel, args)
            )
    except InspectError as e:
        _note("status", str(e))
        return EXIT_FAILED
    print(text)
    return EXIT_OK


def run_health(args: argparse.Namespace) -> int:
    """`epd health ADDR`: print the serving status; 0 only when SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sec = _client_security("health", args)
    if sec is None:
        return EXIT_USAGE
    try:
        with open_channel(args.address, sec) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            _note("health", f"{args.address} does not know service {args.service!r}: {_details(e)}")
        else:
            _note(
                "health",
                str(rpc_failure(e, args.address, "grpc.health.v1.Health/Check", args.timeout)),
            )
        return EXIT_FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return EXIT_OK if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED
