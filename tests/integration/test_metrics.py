"""Metrics scraped by a real Prometheus server from a real encoder and a real
two-rank language instance, checked through Prometheus' HTTP API; and `promtool check metrics`
on the raw /metrics text of every process.

The workload is sequential so every count is exact: request A (500 tokens, 1 round), request B
(3,000 tokens through a 1,024-token pool: 3 rounds, 2 resumes), request C failed by the
encoder's test-only transport fault on its first write (fault injection: a healthy loopback
Mooncake never fails), and one Generate refused as bad input before any transfer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from common.layout import RecordLayout, default_fields
from common.pb.epd.v1 import language_pb2
from services.language.ranks import free_port
from tests.conftest import Pair, assert_all_free, language_stub

HIDDEN = 256
BPT = RecordLayout.pack(default_fields(HIDDEN, "bfloat16")).payload_bytes_per_token
A_TOKENS, B_TOKENS, C_TOKENS = 500, 3000, 700
# Two data ranks: every round is two writes. A = writes 1-2, B = writes 3-8 (3 rounds), C's
# first round = writes 9-10, and write 9 fails.
FAIL_NTH = 9


def _http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # 127.0.0.1 only
        return r.read().decode()


class PrometheusServer:
    """A real `prometheus` process on loopback scraping the given targets every second."""

    def __init__(self, targets: dict[str, list[str]]):
        self.dir = tempfile.TemporaryDirectory(prefix="epd-prom-")
        self.port = free_port("127.0.0.1")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()
            ],
        }
        path = f"{self.dir.name}/prometheus.yml"
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        self.log = open(f"{self.dir.name}/prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "/usr/bin/prometheus",
                f"--config.file={path}",
                f"--storage.tsdb.path={self.dir.name}/data",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if "Ready" in _http_get(f"http://127.0.0.1:{self.port}/-/ready", 1.0):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prometheus did not start: {open(self.log.name).read()[-2000:]}"
                )
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        body = json.loads(_http_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.dir.cleanup()


async def eventually(
    prom: PrometheusServer, expectations: dict[str, float], timeout: float = 20.0
) -> None:
    """Every expression reaches its exact value (scrapes happen every second)."""
    deadline = time.monotonic() + timeout
    while True:
        got = {expr: await asyncio.to_thread(prom.value, expr) for expr in expectations}
        wrong = {
            e: (got[e], want)
            for e, want in expectations.items()
            if got[e] is None or abs(got[e] - want) > 1e-6
        }
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError("Prometheus values (got, want): " + json.dumps(wrong, indent=1))
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def stack():
    enc_port, lang_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    pair = Pair(
        hidden=HIDDEN,
        language_blocks=8,
        initial_tokens=1024,
        encoder_args=["--metrics-port", str(enc_port), "--transport-fault", f"fail_nth={FAIL_NTH}"],
        language_args=["--metrics-port", str(lang_port), "--tp", "2"],
    )
    try:
        assert (
            pair.encoder.info["metrics_port"] == enc_port
            and pair.language.info["metrics_port"] == lang_port
        )
        prom = PrometheusServer(
            {
                "epd-encoder": [f"127.0.0.1:{enc_port}"],
                "epd-language": [f"127.0.0.1:{lang_port}", f"127.0.0.1:{lang_port + 1}"],
            }
        )
    except BaseException:
        pair.stop()
        raise
    yield pair, prom, {"encoder": enc_port, "language": lang_port}
    prom.stop()
    pair.stop()


async def test_prometheus_scrapes_exact_counts_after_rounds_and_a_failure(stack):
    pair, prom, ports = stack
    stub = language_stub(pair.language.address)
    for tokens in (A_TOKENS, B_TOKENS):
        reply = await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=tokens))
        assert reply.total_tokens == tokens
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Generate(language_pb2.GenerateRequest(synthetic_tokens=C_TOKENS))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()  # transport
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Generate(language_pb2.GenerateRequest())
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_all_free((pair.encoder.address, "encoder"), (pair.language.address, "language"))

    ok_bytes = (A_TOKENS + B_TOKENS) * BPT
    expect = {
        'count(up{job=~"epd-.*"} == 1)': 3,
        # encoder: one transfer per request, serving both data ranks
        'epd_requests_total{role="encoder",outcome="success"}': 2,
        'epd_requests_total{role="encoder",outcome="failed"}': 1,
        'epd_requests_total{role="encoder",outcome="cancelled"}': 0,
        'epd_failures_total{role="encoder",reason="transport"}': 1,
        'sum(epd_failures_total{role="encoder"})': 1,
        'epd_transfer_bytes_total{role="encoder"}': 2 * ok_bytes,
        'epd_transfer_seconds_count{role="encoder"}': 2,
        'epd_rounds_per_request_count{role="encoder"}': 2,
        'epd_rounds_per_request_sum{role="encoder"}': 1 + 3,
        'epd_rounds_per_request_bucket{role="encoder",le="1.0"}': 1,
        'epd_resumes_total{role="encoder"}': 2,
        'epd_inflight_transfers{role="encoder"}': 0,
        'epd_pool_blocks{role="encoder",state="used"}': 0,
        'epd_pool_blocks{role="encoder",state="free"}': 2048,
        'epd_integrity_failures_total{role="encoder"}': 0,
        'epd_encode_seconds_count{role="encoder"}': 3,
        'epd_alloc_wait_seconds_count{role="encoder"}': 3,
        'sum(epd_rpc_seconds_count{job="epd-encoder",method="Init",code="OK"})': 3 * 2,
        'sum(epd_rpc_seconds_count{job="epd-encoder",method="Resume",code="OK"})': 2 * 2,
        # Rank 0 follows its statuses on the Encode's own call (EncodeStream), rank 1 on Status.
        'sum(epd_rpc_seconds_count{job="epd-encoder",method="EncodeStream"})': 3,
        'sum(epd_rpc_seconds_count{job="epd-encoder",method="Status"})': 3,
        # language: every data rank reports its own part
        'sum(epd_requests_total{role="language",outcome="success"})': 2 * 2,
        'sum(epd_requests_total{role="language",outcome="failed"})': 2 * 1,
        'sum(epd_failures_total{role="language",reason="transport"})': 2,
        'sum(epd_failures_total{role="language"})': 2,
        'sum(epd_rpc_seconds_count{job="epd-language",method="Generate"})': 4,
        'sum(epd_rpc_seconds_count{job="epd-language",method="Generate",code="OK"})': 2,
        'sum(epd_rpc_seconds_count{job="epd-language",method="Generate",code="UNAVAILABLE"})': 1,
        'sum(epd_rpc_seconds_count{job="epd-language",method="Generate",code="INVALID_ARGUMENT"})': 1,
    }
    for rank in (0, 1):
        r = f'role="language",rank="{rank}"'
        expect.update(
            {
                f'epd_requests_total{{{r},outcome="success"}}': 2,
                f"epd_transfer_bytes_total{{{r}}}": ok_bytes,
                f"epd_transfer_seconds_count{{{r}}}": 2,
                f"epd_rounds_per_request_sum{{{r}}}": 4,
                f"epd_resumes_total{{{r}}}": 2,
                f"epd_inflight_transfers{{{r}}}": 0,
                f'epd_pool_blocks{{{r},state="used"}}': 0,
                f'epd_pool_blocks{{{r},state="free"}}': 8,
                f"epd_integrity_failures_total{{{r}}}": 0,
                # A: 1 allocation; B: initial + 2 resumes; C: initial
                f"epd_alloc_wait_seconds_count{{{r}}}": 1 + 3 + 1,
            }
        )
    await eventually(prom, expect)
    # The histograms hold real times: a 3-round transfer takes longer than nothing.
    assert prom.value('epd_transfer_seconds_sum{role="encoder"}') > 0
    assert (
        prom.value(
            'histogram_quantile(0.5, sum by (le) (epd_rpc_seconds_bucket{job="epd-encoder",method="Init"}))'
        )
        > 0
    )


def test_promtool_accepts_every_processes_metrics(stack):
    pair, prom, ports = stack
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    for port in (ports["encoder"], ports["language"], ports["language"] + 1):
        text = _http_get(f"http://127.0.0.1:{port}/metrics")
        assert "epd_requests_total" in text and "epd_pool_blocks" in text
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert checked.returncode == 0, (
            f"port {port}: {checked.stdout.decode()} {checked.stderr.decode()}"
        )
        assert not checked.stdout.strip() and not checked.stderr.strip(), (
            checked.stdout,
            checked.stderr,
        )


def test_metrics_port_in_use_is_a_clear_start_up_error():
    import os
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.tools.cli",
                "encoder",
                "--port",
                "0",
                "--pool-blocks",
                "4",
                "--hidden",
                "64",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            timeout=60,
            env={**os.environ, "MC_FORCE_TCP": "1"},
        )
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    assert f"cannot serve /metrics on 127.0.0.1:{port} (metrics_port)" in done.stderr.decode()
    assert b"EPD_READY" not in done.stdout
