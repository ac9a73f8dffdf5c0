"""One request's result, the checks of a reply against the reference, and the run's summary."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from services.tools import reference_payload
from services.tools.demo._flags import KIND_DESCRIPTIONS, KINDS
from services.tools.demo._workload import PlannedRequest

if TYPE_CHECKING:  # annotations only: the modules use each other
    from services.tools.demo._report import Progress


@dataclasses.dataclass
class RequestResult:
    """What happened to one planned request."""

    request: PlannedRequest
    latency_s: float = 0.0
    """Client-side wall time of the Generate call."""
    rpc_ok: bool = False
    error_code: str = ""
    """gRPC status code name when the call failed (e.g. ``RESOURCE_EXHAUSTED``)."""
    error_message: str = ""
    total_tokens: int = 0
    rounds: int = 0
    bytes: int = 0
    transfer_seconds: float = 0.0
    total_seconds: float = 0.0
    integrity_verified: bool = False
    payload_sha256: str = ""
    rank_sha256: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """(rank, digest) of every data rank's own payload (tp > 1: each rank is checked)."""
    expected_sha256: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    """Why a reply does not match the request (empty when it does)."""
    first_token_id: int = -1
    """The consumer's first generated token (-1: none, e.g. the null consumer or a synthetic payload)."""
    consumer: str = ""
    top_token_ids: list[int] = dataclasses.field(default_factory=list)
    top_logits: list[float] = dataclasses.field(default_factory=list)
    logits_norm: float = 0.0
    prefill_seconds: float = 0.0
    prefill_skipped: str = ""
    position_delta: int = 0
    encoder: str = ""
    """The encoder that served it (GenerateReply.encoder)."""
    attempts: int = 0
    failed_over_from: str = ""

    @property
    def status(self) -> str:
        """``ok``, ``failed`` (the RPC failed) or ``mismatch`` (a reply with wrong content)."""
        if not self.rpc_ok:
            return "failed"
        return "mismatch" if self.problems else "ok"


def check_reply(result: RequestResult, expected_sha256: str) -> list[str]:
    """Compare a successful reply with the request and the reference digest; set and return
    `result.problems`."""
    req = result.request
    problems = []
    result.expected_sha256 = expected_sha256
    if result.total_tokens != req.tokens:
        problems.append(f"total_tokens {result.total_tokens} != requested {req.tokens}")
    if not result.integrity_verified:
        problems.append("integrity_verified is false")
    if not result.payload_sha256:
        problems.append("no payload_sha256 in the reply")
    elif result.payload_sha256.lower() != expected_sha256.lower():
        problems.append(f"payload_sha256 {result.payload_sha256} != reference {expected_sha256}")
    for rank, digest in result.rank_sha256:
        if digest.lower() != expected_sha256.lower():
            problems.append(
                f"rank {rank} payload_sha256 {digest or '(none)'} != reference {expected_sha256}"
            )
    result.problems = problems
    return problems


def check_image_reply(result: RequestResult, expect_first_token: bool = True) -> list[str]:
    """An image request's reply: the token count the size rule predicts (when exact), every data
    rank holding the same payload, and a first token from the prefill consumer."""
    req = result.request
    problems = []
    if req.exact_tokens and result.total_tokens != req.tokens:
        problems.append(
            f"total_tokens {result.total_tokens} != {req.tokens} predicted from the image sizes"
        )
    if not result.integrity_verified:
        problems.append("integrity_verified is false")
    digests = {d.lower() for _, d in result.rank_sha256}
    if len(digests) > 1:
        problems.append(f"data ranks hold different payloads: {sorted(result.rank_sha256)}")
    if expect_first_token:
        if result.first_token_id < 0:
            problems.append(
                f"no first token (consumer {result.consumer or '?'}"
                f"{': ' + result.prefill_skipped if result.prefill_skipped else ''})"
            )
        elif result.top_token_ids and result.top_token_ids[0] != result.first_token_id:
            problems.append(
                f"first_token_id {result.first_token_id} is not the top logit {result.top_token_ids[0]}"
            )
    result.problems = problems
    return problems


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between closest ranks (as
    numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _group_stats(results: Sequence[RequestResult]) -> dict[str, Any]:
    answered = [r for r in results if r.rpc_ok]
    latencies = [r.latency_s * 1000.0 for r in answered]
    rounds = [r.rounds for r in answered]
    return {
        "requests": len(results),
        "succeeded": sum(r.status == "ok" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "mismatches": sum(r.status == "mismatch" for r in results),
        "tokens": sum(r.total_tokens for r in answered),
        "bytes": sum(r.bytes for r in answered),
        "rounds_max": max(rounds, default=0),
        "rounds_total": sum(rounds),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
    }


def summarize(
    results: Sequence[RequestResult], wall_seconds: float, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The demo's result object (what `--json` prints). Keys other tools rely on (docs/DESIGN.md): requests, succeeded,
    failed, mismatches, tokens, bytes, rounds_max, rounds_total, gbps, p50_ms, p99_ms."""
    out = _group_stats(results)
    out["gbps"] = float(f"{out['bytes'] / wall_seconds / 1e9:.6g}") if wall_seconds > 0 else 0.0
    out["wall_seconds"] = round(wall_seconds, 6)
    out["requested_tokens"] = sum(r.request.tokens for r in results)
    if out["mismatches"]:
        out["integrity"] = "MISMATCH"
    elif out["succeeded"]:
        out["integrity"] = "OK"
    else:
        out["integrity"] = "UNVERIFIED"
    kinds: dict[str, Any] = {}
    for kind in (*KINDS, "image"):
        group = [r for r in results if r.request.kind == kind]
        if not group:
            continue
        stats = _group_stats(group)
        answered = [r for r in group if r.rpc_ok]
        stats["description"] = KIND_DESCRIPTIONS[kind]
        stats["tokens_min"] = min((r.request.tokens for r in group), default=0)
        stats["tokens_max"] = max((r.request.tokens for r in group), default=0)
        stats["rounds_min"] = min((r.rounds for r in answered), default=0)
        stats["expected_min_rounds"] = min(r.request.min_rounds for r in group)
        kinds[kind] = stats
    out["kinds"] = kinds
    out["errors"] = [
        {
            "request_id": r.request.request_id,
            "kind": r.request.kind,
            "tokens": r.request.tokens,
            "seed": r.request.seed,
            "status": r.status,
            "code": r.error_code or None,
            "message": r.error_message if r.status == "failed" else "; ".join(r.problems),
        }
        for r in results
        if r.status != "ok"
    ]
    out["synthetic_requests"] = sum(1 for r in results if r.request.kind != "image")
    out["digests_matched"] = sum(
        1 for r in results if r.request.kind != "image" and r.status == "ok"
    )
    out["per_request"] = [
        {
            "request_id": r.request.request_id,
            "kind": r.request.kind,
            "tokens": r.total_tokens or r.request.tokens,
            "rounds": r.rounds,
            "first_token_id": r.first_token_id,
            "latency_ms": round(r.latency_s * 1000.0, 3),
            "status": r.status,
        }
        for r in results
    ]
    out["image_requests"] = [
        {
            "request_id": r.request.request_id,
            "name": r.request.name,
            "images": [f"{w}x{h} {fmt}" for w, h, fmt in r.request.images],
            "expected_tokens": r.request.tokens if r.request.exact_tokens else None,
            "tokens": r.total_tokens,
            "rounds": r.rounds,
            "first_token_id": r.first_token_id,
            "top_token_ids": r.top_token_ids,
            "top_logits": [round(v, 4) for v in r.top_logits],
            "logits_norm": round(r.logits_norm, 4),
            "mrope_position_delta": r.position_delta,
            "prefill_ms": round(r.prefill_seconds * 1000.0, 3),
            "latency_ms": round(r.latency_s * 1000.0, 3),
            "prefill_skipped": r.prefill_skipped,
            "status": r.status,
        }
        for r in results
        if r.request.kind == "image"
    ]
    per_encoder: dict[str, int] = {}
    for r in results:
        if r.rpc_ok and r.encoder:
            per_encoder[r.encoder] = per_encoder.get(r.encoder, 0) + 1
    out["per_encoder"] = dict(sorted(per_encoder.items()))
    out["failed_over"] = sum(1 for r in results if r.rpc_ok and r.failed_over_from)
    out["failed_over_requests"] = [
        {"request_id": r.request.request_id, "from": r.failed_over_from, "to": r.encoder}
        for r in results
        if r.rpc_ok and r.failed_over_from
    ]
    if config:
        out["config"] = dict(config)
    return out


def verify_results(
    results: Sequence[RequestResult],
    hidden: int,
    dtype: str,
    progress: Progress | None = None,
    digest: Callable[..., str] | None = None,
    workers: int | None = None,
    deepstack_levels: int = 0,
) -> int:
    """Check every answered reply against the reference digest (in a thread pool: hashlib and
    numpy release the GIL), the payload having `deepstack_levels` deepstack fields. Returns the
    number of mismatches."""
    digest = digest or reference_payload.expected_digest
    for r in results:
        if r.rpc_ok and r.request.kind == "image":
            check_image_reply(r, expect_first_token=bool(r.consumer and r.consumer != "null"))
            if progress is not None:
                progress.advance(failed=bool(r.problems))
    answered = [r for r in results if r.rpc_ok and r.request.kind != "image"]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(
                digest, r.request.tokens, r.request.seed, hidden, dtype, deepstack_levels
            ): r
            for r in answered
        }
        for fut in concurrent.futures.as_completed(futures):
            r = futures[fut]
            check_reply(r, fut.result())
            if progress is not None:
                progress.advance(failed=bool(r.problems))
    return sum(1 for r in results if r.rpc_ok and r.problems)
