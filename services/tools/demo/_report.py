"""How the demo shows a run: the summary table, the failures, a progress bar on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from services.tools.demo._images import token_rule

if TYPE_CHECKING:  # annotations only: the modules use each other
    from services.tools.demo._results import RequestResult


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_table(summary: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout (without --json)."""
    s = summary
    cfg = s.get("config") or {}
    lines = []
    if cfg:
        lines.append(
            f"epd demo: {s['requests']} requests, concurrency {cfg.get('concurrency')}, "
            f"hidden {cfg.get('hidden')} {cfg.get('dtype')}, block {cfg.get('block_size')} tokens, "
            f"{cfg.get('tp', 1)} language rank(s)"
        )
        lines.append(
            f"          language pool {cfg.get('language_pool_blocks')} blocks "
            f"({cfg.get('language_pool_tokens', 0):,} tokens), initial allocation "
            f"{cfg.get('initial_allocation_tokens', 0):,} tokens, encoder pool "
            f"{cfg.get('encoder_pool_blocks')} blocks"
        )
        lines.append("")
    synthetic = s.get("synthetic_requests", s["requests"])
    verified = f"{s.get('digests_matched', s['succeeded'])}/{synthetic} digests match the reference"
    if int(cfg.get("tp") or 1) > 1:
        verified += f", on every data rank of {cfg.get('tp')}"
    images = s.get("image_requests") or []
    if images:
        good = sum(1 for r in images if r["status"] == "ok")
        verified += (
            f"; {good}/{len(images)} image requests with the predicted tokens and a first token"
        )
    rows = [
        ("requests", f"{s['requests']}"),
        ("succeeded", f"{s['succeeded']}"),
        ("failed", f"{s['failed']}"),
        ("mismatches", f"{s['mismatches']}"),
        ("tokens", f"{s['tokens']:,}"),
        ("bytes", f"{s['bytes']:,}  ({_fmt_bytes(s['bytes'])})"),
        ("rounds", f"max {s['rounds_max']}, total {s['rounds_total']}"),
        ("wall time", f"{s['wall_seconds']:.2f} s"),
        ("aggregate", f"{s['gbps']:.3f} GB/s"),
        ("latency", f"p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms"),
        ("integrity", f"{s['integrity']} ({verified})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    kinds = s.get("kinds") or {}
    if kinds:
        lines.append("")
        header = (
            f"  {'kind':<9} {'n':>4} {'ok':>4} {'fail':>4} {'mism':>4} "
            f"{'tokens':>17} {'rounds':>8} {'p50 ms':>9} {'p99 ms':>9}  what"
        )
        lines.append(header)
        for kind, k in kinds.items():
            tokens = (
                f"{k['tokens_min']:,}"
                if k["tokens_min"] == k["tokens_max"]
                else f"{k['tokens_min']:,}..{k['tokens_max']:,}"
            )
            rounds = (
                f"{k['rounds_min']}"
                if k["rounds_min"] == k["rounds_max"]
                else f"{k['rounds_min']}..{k['rounds_max']}"
            )
            lines.append(
                f"  {kind:<9} {k['requests']:>4} {k['succeeded']:>4} {k['failed']:>4} "
                f"{k['mismatches']:>4} {tokens:>17} {rounds:>8} {k['p50_ms']:>9.1f} "
                f"{k['p99_ms']:>9.1f}  {k['description']}"
            )
    if images:
        lines.append("")
        lines.append(
            f"  image requests (model {cfg.get('model', '?')}: vision tower on the encoder, "
            f"{token_rule(cfg.get('model', '')).consumer} on the language)"
        )
        lines.append(
            f"  {'request':<10} {'images':<28} {'tokens':>7} {'rounds':>6} {'first token':>11} "
            f"{'top logit':>9} {'prefill ms':>10} {'latency ms':>10}"
        )
        for r in images:
            shapes = r["images"]
            what = (
                shapes[0]
                if len(shapes) == 1
                else f"{len(shapes)} x {shapes[0]}"
                if len(set(shapes)) == 1
                else ",".join(x.split()[0] for x in shapes)
            )
            top = f"{r['top_logits'][0]:.3f}" if r["top_logits"] else "-"
            first = str(r["first_token_id"]) if r["first_token_id"] >= 0 else "-"
            lines.append(
                f"  {r['name']:<10} {what[:28]:<28} {r['tokens']:>7,} {r['rounds']:>6} {first:>11} "
                f"{top:>9} {r['prefill_ms']:>10.1f} {r['latency_ms']:>10.1f}"
                + ("" if r["status"] == "ok" else f"  {r['status'].upper()}")
            )
        skipped = [r for r in s.get("per_request", []) if r["kind"] != "image"]
        if skipped:
            lines.append(
                f"  (the {len(skipped)} synthetic payloads are no model input: the prefill skips "
                f"them, first token -1)"
            )
    if s.get("conversation"):
        from services.tools.demo._conversation import format_conversation

        lines += format_conversation(s["conversation"])
    if len(s.get("per_encoder", {})) > 1 or s.get("failed_over") or cfg.get("killed_encoder"):
        lines.append("")
        spread = ", ".join(f"{name}: {n}" for name, n in s.get("per_encoder", {}).items())
        lines.append(f"  encoders: {spread or '-'} requests served")
        if cfg.get("killed_encoder"):
            lines.append(f"  killed mid-run: {cfg['killed_encoder']}")
        lines.append(
            f"  failed over: {s.get('failed_over', 0)} request(s) (retried once on another encoder), "
            f"failed: {s.get('failed', 0)}"
        )
    return "\n".join(lines) + "\n"


def format_failures(results: Sequence[RequestResult], limit: int = 20) -> str:
    """One line per failed or mismatched request (for stderr)."""
    bad = [r for r in results if r.status != "ok"]
    lines = []
    for r in bad[:limit]:
        q = r.request
        what = (
            f"FAILED {r.error_code}: {r.error_message}"
            if r.status == "failed"
            else "MISMATCH: " + "; ".join(r.problems)
        )
        lines.append(
            f"epd demo: request {q.request_id} ({q.kind}, {q.tokens} tokens, seed {q.seed}): {what}"
        )
    if len(bad) > limit:
        lines.append(f"epd demo: ... and {len(bad) - limit} more")
    return "\n".join(lines) + ("\n" if lines else "")


class Progress:
    """``\\r[#####.....] 12/24 ...`` on a stream, redrawn in place; a no-op when disabled."""

    def __init__(
        self,
        total: int,
        stream: IO[str] | None = None,
        enabled: bool = True,
        width: int = 30,
        label: str = "",
        fail_label: str = "failed",
    ) -> None:
        self.total = total
        self.fail_label = fail_label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.label = label
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._drawn = False

    def start(
        self, label: str | None = None, total: int | None = None, fail_label: str | None = None
    ) -> None:
        if label is not None:
            self.label = label
        if fail_label is not None:
            self.fail_label = fail_label
        if total is not None:
            self.total = total
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.draw()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        self.draw()

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = min(self.width, int(round(frac * self.width)))
        bar = "#" * filled + "." * (self.width - filled)
        extra = f"  {self.fail_label} {self.failed}" if self.failed else ""
        label = f"{self.label} " if self.label else ""
        return (
            f"{label}[{bar}] {self.done}/{self.total}{extra}  "
            f"{time.monotonic() - self.started:.1f} s"
        )

    def draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + self.render() + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
