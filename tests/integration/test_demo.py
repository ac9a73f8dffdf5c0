"""`epd demo` end to end: real processes, real Mooncake TCP, the mixed workload, --json keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.tools.demo._images import QWEN3_TOKENS, qwen_image_tokens
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DEMO_KEYS = {
    "requests",
    "succeeded",
    "failed",
    "mismatches",
    "tokens",
    "bytes",
    "rounds_max",
    "rounds_total",
    "gbps",
    "p50_ms",
    "p99_ms",
}


def run_demo(*flags: str) -> subprocess.CompletedProcess:
    """`epd demo FLAGS` as a user runs it: a process of its own, Mooncake over TCP."""
    return subprocess.run(
        [sys.executable, "-m", "services.tools.cli", "demo", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MC_FORCE_TCP": "1"},
    )


def test_demo_json_succeeds_with_multi_round_requests():
    out = run_demo(
        "--requests",
        "8",
        "--hidden",
        "256",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert set(summary) >= DEMO_KEYS
    assert (
        summary["requests"] == summary["succeeded"] == 8 + 6
    )  # 8 synthetic + 6 image requests (--model tiny)
    assert summary["failed"] == 0 and summary["mismatches"] == 0
    assert summary["rounds_max"] >= 10  # the workload includes requests of >= 10 rounds
    assert summary["tokens"] > 0 and summary["bytes"] > 0 and summary["gbps"] > 0
    images = summary["image_requests"]
    assert len(images) == 6 and all(
        r["first_token_id"] >= 0 and r["tokens"] == r["expected_tokens"] for r in images
    )
    assert sum(r["rounds"] >= 2 for r in images) >= 2 and min(r["tokens"] for r in images) < 100
    assert {r["kind"] for r in summary["per_request"] if r["first_token_id"] >= 0} == {"image"}
    # The conversation (4 turns by default): from turn 2 on every image token is cached and
    # not sent; every turn's payload equals its cold twin's (same pixels, new bytes).
    chat = summary["conversation"]
    assert chat["turns"] == 4 and chat["mismatches"] == 0, chat
    per_image = chat["image_tokens_per_turn"]
    assert per_image == sum(qwen_image_tokens(w, h) for w, h in ((448, 336), (336, 448)))
    assert chat["hit_rate"] == 0.75 and chat["cached_tokens"] == 3 * per_image
    for t in chat["per_turn"]:
        warm, cold = t["warm"], t["cold"]
        assert warm["payload_sha256"] == cold["payload_sha256"] and cold["cached_tokens"] == 0
        sent = warm["total_tokens"] - (per_image if t["turn"] > 1 else 0)
        assert warm["transferred_tokens"] == sent, t
    assert chat["bytes_not_sent"] == 3 * per_image * summary["bytes"] // summary["tokens"]


def test_demo_table_and_exit_code():
    out = run_demo(
        "--requests",
        "4",
        "--hidden",
        "128",
        "--image-requests",
        "2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "conversation: 4 turns" in out.stdout and "hit rate 75.0 %" in out.stdout
    for word in (
        "requests",
        "succeeded",
        "mismatches",
        "rounds",
        "GB/s",
        "p50",
        "p99",
        "integrity",
        "first token",
    ):
        assert word in out.stdout


def test_demo_with_two_ranks_checks_every_rank():
    out = run_demo(
        "--tp",
        "2",
        "--requests",
        "4",
        "--hidden",
        "128",
        "--json",
        "--image-requests",
        "2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert (
        summary["succeeded"] == 4 + 2
        and summary["mismatches"] == 0
        and summary["config"]["tp"] == 2
    )
    assert all(
        r["first_token_id"] >= 0 for r in summary["image_requests"]
    )  # rank 0 prefills; both ranks agree


def test_demo_with_tiny_qwen3_carries_the_deepstack_fields():
    """`epd demo --model tiny-qwen3`: Qwen3-VL's token rule for the image requests, three deepstack
    fields per token in every payload (synthetic digests recomputed with them), and reuse of held
    rows with every field in the conversation."""
    out = run_demo(
        "--model",
        "tiny-qwen3",
        "--requests",
        "4",
        "--image-requests",
        "3",
        "--conversation-turns",
        "2",
        "--hidden",
        "128",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["succeeded"] == 4 + 3 and summary["failed"] == summary["mismatches"] == 0
    assert summary["digests_matched"] == 4  # the reference digest with 3 deepstack fields
    # 128 x bf16 for the embeddings and each of the 3 deepstack levels, + ids and positions.
    assert summary["bytes"] == summary["tokens"] * (4 * 128 * 2 + 4 + 12)
    images = summary["image_requests"]
    assert len(images) == 3 and all(
        r["first_token_id"] >= 0 and r["tokens"] == r["expected_tokens"] for r in images
    )
    chat = summary["conversation"]
    per_image = chat["image_tokens_per_turn"]
    assert (
        per_image
        == sum(qwen_image_tokens(w, h, QWEN3_TOKENS) for w, h in ((448, 336), (336, 448)))
        != sum(qwen_image_tokens(w, h) for w, h in ((448, 336), (336, 448)))
    )
    assert chat["mismatches"] == 0 and chat["cached_tokens"] == per_image, chat
    for t in chat["per_turn"]:
        assert t["warm"]["payload_sha256"] == t["cold"]["payload_sha256"]
