"""Install what `make gpu-check` needs and the host lacks, into a venv that sees the host's
packages, and never a PyTorch: the host's CUDA build is the one to test.

Standard library only: it runs in the new venv before anything of the project is importable.

- Every runtime requirement of pyproject.toml, plus the `gpu` extra (Mooncake with CUDA), is
  looked up by distribution name. One already installed, at any version, is kept: the host's
  transformers, grpcio, protobuf stay as they are. Only the missing ones are installed, at the
  project's pins, except that gRPC's companions (grpcio-health-checking, grpcio-reflection,
  grpcio-status) follow the host's grpcio version, so grpcio itself is not replaced.
- PyTorch is never installed: when it is missing the check stops here (there is nothing to test).
- protobuf must satisfy the project's range whatever the host has: the generated stubs
  (common/pb) refuse an older runtime. An older host protobuf is shadowed in the venv, not
  replaced on the host.
- A constraints file pins every other distribution already installed, so nothing a missing one
  depends on can replace it (a CPU PyTorch over the host's CUDA one above all).
- GPU_WHEELS=DIR: install from that directory only (`--no-index --find-links DIR`), for a host
  without network.
- The project itself is not installed: the check runs from the checkout, which is importable.

Exit status 0 when everything is there afterwards; 1 (with the missing names) otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRPC_COMPANIONS = ("grpcio-health-checking", "grpcio-reflection", "grpcio-status")
NEVER = ("torch",)
MUST_SATISFY = ("protobuf",)


def requirements() -> list[tuple[str, str]]:
    """(distribution name, requirement as written) of the runtime dependencies and `gpu`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    for req in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]:
        spec = req.split(";")[0].strip()
        marker = req.split(";")[1] if ";" in req else ""
        if "win32" in marker and sys.platform == "win32":
            continue
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]
        out.append((name, spec))
    return out


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def satisfies(spec: str, name: str, have: str) -> bool:
    """Whether version `have` of `name` meets the requirement `spec` (pip's own parser)."""
    from pip._vendor.packaging.specifiers import SpecifierSet

    return have in SpecifierSet(spec[len(name) :].strip())


def pip(*args: str) -> int:
    wheels = os.environ.get("GPU_WHEELS", "")
    source = ["--no-index", "--find-links", wheels] if wheels else []
    command = [sys.executable, "-m", "pip", "install", "-q", *source, *args]
    print("gpu-check: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def main(pinned: Path = ROOT / ".venv-gpu" / "constraints.txt") -> int:
    if installed("torch") is None:
        print("gpu-check: no PyTorch on this host: install its CUDA build first")
        return 1
    missing = []
    for name, spec in requirements():
        have = installed(name)
        if name in MUST_SATISFY and have is not None and not satisfies(spec, name, have):
            missing.append(spec)
            continue
        if name in NEVER or have is not None:
            continue
        grpcio = installed("grpcio")
        if name in GRPC_COMPANIONS and grpcio is not None:
            spec = f"{name}=={grpcio}"
        missing.append(spec)
    pinned.parent.mkdir(exist_ok=True)
    first: dict[str, str] = {}  # the venv's own copy first, as Python would import it
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in MUST_SATISFY:
            first.setdefault(re.sub(r"[-_.]+", "-", name).lower(), f"{name}=={dist.version}")
    pinned.write_text("".join(f"{line}\n" for line in first.values()))
    if missing and pip("-c", str(pinned), *missing) != 0:
        print(f"gpu-check: could not install {missing}")
        return 1
    still = [n for n, _ in requirements() if n not in NEVER and installed(n) is None]
    if still:
        print(f"gpu-check: still missing after installing: {still}")
        return 1
    print(
        "gpu-check: using "
        + ", ".join(f"{n} {installed(n)}" for n in ("torch", "transformers", "grpcio", "protobuf"))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
