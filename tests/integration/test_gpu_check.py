"""`make gpu-check` (scripts/gpu-check.sh, scripts/gpu_check_install.py,
services/tools/gpu_check.py) on this machine, which has no GPU:

- without CUDA it says so and exits 77 within seconds, whichever Python it is given;
- the CPU rehearsal (GPU_CHECK_DEVICE=cpu) runs every step a GPU run runs, between real
  processes over Mooncake TCP, and writes the table and the JSON; the RDMA step is skipped
  without /dev/infiniband;
- a step that fails (here: an encoder limit injected through the environment) is its own line,
  the others still run, and the exit status is 1;
- the installer keeps what the host has, never installs a PyTorch, and pins the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.tools import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600):
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MC_FORCE_TCP": "1", **(env or {})},
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    "python, why",
    [
        (sys.executable, "torch.cuda.is_available() is False"),  # this venv: a CPU PyTorch
        ("/bin/false", "no PyTorch in /bin/false"),  # a Python that cannot import torch
    ],
    ids=["cpu-torch", "no-torch"],
)
def test_without_cuda_it_says_so_and_exits_77_within_seconds(python, why):
    done, seconds = run(["bash", "scripts/gpu-check.sh"], env={"PY": python})
    assert done.returncode == 77, done.stdout + done.stderr
    assert done.stdout.startswith("gpu-check: no CUDA device"), done.stdout
    assert why in done.stdout and seconds < 15


def test_make_gpu_check_says_no_cuda_device():
    make = shutil.which("make")
    assert make is not None
    done, seconds = run([make, "-s", "gpu-check"], env={"PY": sys.executable})
    assert "gpu-check: no CUDA device" in done.stdout and seconds < 15
    assert done.returncode != 0  # make's own 2: the script's 77 is in its message
    assert "Error 77" in done.stderr


def test_the_module_alone_exits_77_without_cuda(tmp_path):
    done, _ = run(
        [sys.executable, "-m", "services.tools.gpu_check"],
        env={"GPU_CHECK_OUT": str(tmp_path / "out.json")},
    )
    assert (done.returncode, done.stdout.strip()) == (77, "gpu-check: no CUDA device")
    assert not (tmp_path / "out.json").exists()


def test_the_cpu_rehearsal_runs_every_step_and_reports_them(tmp_path):
    out = tmp_path / "gpu-check.json"
    done, seconds = run(
        [sys.executable, "-m", "services.tools.gpu_check"],
        env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_OUT": str(out)},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rehearsal"] and report["ok"] and report["device"] == "cpu"
    names = [c["check"] for c in report["checks"]]
    assert names == list(gpu_check.STEPS)
    rdma = os.path.exists("/dev/infiniband")
    for c in report["checks"]:
        want = "skip" if c["check"] == "transfer-rdma" and not rdma else "pass"
        assert c["result"] == want, c
        assert f"  {c['check']:<18} {c['result']:<5} {c['figure']}" in done.stdout  # the table
    figures = {c["check"]: c["figure"] for c in report["checks"]}
    assert (
        "digests equal" in figures["transfer-tcp"]
        and "digests equal" in figures["transfer-unchecked"]
    )
    assert "DATA_LOSS" in figures["integrity-gpu"]
    assert "single_round_ratio[1024]" in figures["bench"]
    assert "not a GPU check" in done.stdout
    assert seconds < gpu_check.TOTAL_BUDGET_S


def test_a_failing_step_is_its_own_line_and_the_exit_is_1(tmp_path):
    out = tmp_path / "gpu-check.json"
    done, _ = run(
        [sys.executable, "-m", "services.tools.gpu_check"],
        env={
            "GPU_CHECK_DEVICE": "cpu",
            "GPU_CHECK_OUT": str(out),
            "GPU_CHECK_STEPS": "environment,transfer-tcp,transfer-rdma",
            # Fault: every service child refuses payloads above 50 tokens.
            "EPD_MAX_REQUEST_TOKENS": "50",
        },
    )
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {c["check"]: (c["result"], c["figure"]) for c in report["checks"]}
    assert results["environment"][0] == "pass"
    assert (
        results["transfer-tcp"][0] == "fail"
        and "max_request_tokens=50" in results["transfer-tcp"][1]
    )
    assert results["transfer-rdma"][0] in ("skip", "fail")
    assert not report["ok"] and "FAILED: transfer-tcp" in done.stdout


def test_an_unknown_step_is_named():
    done, _ = run(
        [sys.executable, "-m", "services.tools.gpu_check"],
        env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_STEPS": "transfer,bench"},
    )
    assert done.returncode == 2 and "unknown step(s) ['transfer']" in done.stderr


def _installer():
    spec = importlib.util.spec_from_file_location(
        "gpu_check_install", ROOT / "scripts" / "gpu_check_install.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installer_keeps_the_hosts_packages_and_never_installs_torch(tmp_path, monkeypatch):
    """The host the issue describes: a CUDA PyTorch, transformers 5.17, grpcio, protobuf,
    prometheus-client and uvloop; no Mooncake, no grpcio-health-checking or -reflection."""
    inst = _installer()
    host = {
        "torch": "2.11.0+cu130",
        "transformers": "5.17.0",
        "grpcio": "1.80.0",
        "protobuf": "7.35.1",
        "prometheus-client": "0.21.0",
        "uvloop": "0.21.0",
        "numpy": "2.3.0",
        "pillow": "11.0.0",
        "grpcio-status": "1.80.0",
    }
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(inst, "installed", lambda name: host.get(name))

    def pip(*args):
        calls.append(args)
        for spec in args:  # what pip would install becomes installed
            name = spec.split("=")[0].split(">")[0]
            if name in ("mooncake-transfer-engine", "grpcio-health-checking", "grpcio-reflection"):
                host[name] = "x"
        return 0

    monkeypatch.setattr(inst, "pip", pip)
    assert inst.main(tmp_path / "constraints.txt") == 0
    (first,) = calls  # the project itself is not installed: the check runs from the checkout
    assert first[:2] == ("-c", str(tmp_path / "constraints.txt"))
    assert sorted(first[2:]) == [
        "grpcio-health-checking==1.80.0",  # follows the host's grpcio
        "grpcio-reflection==1.80.0",
        "mooncake-transfer-engine>=0.3.12.post1",  # the gpu extra
    ]
    assert not any(a.split("=")[0].split(">")[0] == "torch" for c in calls for a in c)
    pins = (tmp_path / "constraints.txt").read_text().splitlines()
    assert any(p.lower().startswith("torch==") for p in pins)  # whatever torch this venv has stays


def test_an_older_host_protobuf_is_shadowed_in_the_venv(tmp_path, monkeypatch):
    """The generated stubs need the project's protobuf: an older host one gets the project's
    range installed into the venv (the host's own stays), and is not pinned."""
    inst = _installer()
    host = {"torch": "2.11.0", "grpcio": "1.80.0", "protobuf": "5.29.0"}
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(inst, "installed", lambda name: host.get(name))

    def pip(*args):
        calls.append(args)
        for name, _spec in inst.requirements():
            host.setdefault(name, "x")
        return 0

    monkeypatch.setattr(inst, "pip", pip)
    assert inst.main(tmp_path / "constraints.txt") == 0
    assert "protobuf>=7.35.1,<8" in calls[0]
    pins = (tmp_path / "constraints.txt").read_text().lower().splitlines()
    assert not any(p.startswith("protobuf==") for p in pins)


def test_the_installer_stops_without_a_pytorch(tmp_path, monkeypatch):
    inst = _installer()
    monkeypatch.setattr(inst, "installed", lambda name: None)
    monkeypatch.setattr(inst, "pip", lambda *a: pytest.fail("pip must not run"))
    assert inst.main(tmp_path / "constraints.txt") == 1
