"""Service processes started, watched and stopped as a group: one `ServiceProcess` per
`epd encoder` / `epd language`, ready once it printed its `EPD_READY {json}` line, and
`ServiceGroup`, encoders then a language wired to them. Used by `epd demo`, `epd bench` and the
tests."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

READY_PREFIX = "EPD_READY"
LOOPBACK = "127.0.0.1"
SERVICE_MODULE = "services.tools.cli"
"""What `python -m` runs for a service: the `epd` command."""


class ServiceStartError(RuntimeError):
    """A service exited or timed out before it reported ready."""


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """The JSON object of an ``EPD_READY {...}`` line, None for any other line; ValueError
    when the line is a malformed ready line."""
    text = line.strip()
    if not text.startswith(READY_PREFIX):
        return None
    body = text[len(READY_PREFIX) :].strip()
    try:
        info = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed ready line {text!r}: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("port"), int) or info["port"] <= 0:
        raise ValueError(f"ready line without a valid port: {text!r}")
    return info


class ServiceProcess:
    """One service child process: started with stdout piped (for the ready line) and stderr in
    a file (so a chatty child never blocks on a full pipe)."""

    def __init__(
        self,
        role: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.role = role
        self.argv = list(argv)
        self.env = env
        self.log_dir = Path(log_dir) if log_dir else None
        self.log_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None
        self._log: IO[bytes] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stdout_seen: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def port(self) -> int:
        if not self.info:
            raise RuntimeError(f"{self.role} is not ready")
        return int(self.info["port"])

    @property
    def address(self) -> str:
        """host:port of its gRPC server (the services here listen on 127.0.0.1)."""
        host = (self.info or {}).get("host") or LOOPBACK
        return f"{host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL, as a crash would (no graceful stop), and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def start(self) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.log_dir / f"{self.role}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        else:
            self._log = tempfile.TemporaryFile(prefix=f"epd-demo-{self.role}-")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=self.env,
            close_fds=True,
        )
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"{self.role}-stdout", daemon=True
        )
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:  # keeps draining after READY
                self._lines.put(raw.decode("utf-8", errors="replace"))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the ``EPD_READY`` line; ServiceStartError on exit, bad line or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceStartError(
                    self._describe(f"{self.role} did not report ready within {timeout:g} s")
                )
            try:
                line = self._lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is exiting
                try:
                    rc = self.proc.wait(timeout=5)
                    msg = f"{self.role} exited with code {rc} before it was ready"
                except subprocess.TimeoutExpired:
                    msg = f"{self.role} closed its stdout before it was ready"
                raise ServiceStartError(self._describe(msg))
            try:
                info = parse_ready_line(line)
            except ValueError as e:
                raise ServiceStartError(self._describe(f"{self.role}: {e}")) from None
            if info is None:
                self._stdout_seen.append(line.rstrip("\n"))
                del self._stdout_seen[:-10]
                continue
            if info.get("role") not in (None, self.role):
                raise ServiceStartError(
                    self._describe(f"{self.role}: ready line reports role {info.get('role')!r}")
                )
            self.info = info
            return info

    def stderr_tail(self, max_lines: int = 40, max_bytes: int = 16384) -> str:
        if self._log is None or self._log.closed:
            return ""
        try:
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            start = max(0, size - max_bytes)
            data = os.pread(fd, size - start, start)  # pread: the child's offset is untouched
        except OSError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        if start > 0 and lines:
            lines = lines[1:]  # first line is probably cut
        return "\n".join(lines[-max_lines:])

    def _describe(self, msg: str) -> str:
        parts = [msg, "  command: " + " ".join(self.argv)]
        if self._stdout_seen:
            parts.append("  stdout:\n" + "\n".join("    " + s for s in self._stdout_seen))
        tail = self.stderr_tail()
        parts.append(
            ("  stderr (last lines):\n" + "\n".join("    " + s for s in tail.splitlines()))
            if tail
            else "  stderr: (empty)"
        )
        if self.log_path is not None:
            parts.append(f"  full log: {self.log_path}")
        return "\n".join(parts)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        rc = None
        proc = self.proc
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            finally:
                if proc.poll() is None:  # interrupted while waiting: do not leave it behind
                    with contextlib.suppress(OSError):
                        proc.kill()
            rc = proc.poll()
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return rc

    def close(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


def project_root() -> Path:
    """The directory that holds the `services` and `common` packages."""
    return Path(__file__).resolve().parents[2]


def child_env(base: dict[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    """Environment of the service children: Mooncake over TCP, the project importable,
    unbuffered stdout (belt and braces for the ready line). `drop`: the starting tool's own
    `EPD_*` variables, which it passes to the services as flags where they share them."""
    from services.tools.cli import known_env_names  # the services' settings, no more

    env = dict(os.environ if base is None else base)
    # The services reject unknown EPD_* variables: the tools' own ones (EPD_REQUESTS, ...) are
    # meant for the tool, and the settings it shares with them are passed as flags anyway.
    keep = known_env_names() - set(drop)
    for name in [k for k in env if k.startswith("EPD_") and k not in keep]:
        del env[name]
    env["MC_FORCE_TCP"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    root = str(project_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def add_process_arguments(
    parser: argparse.ArgumentParser, *, encoder_example: str, language_example: str
) -> None:
    """--encoder-arg / --language-arg: extra arguments for every encoder / language process started."""
    for role, example in (("encoder", encoder_example), ("language", language_example)):
        parser.add_argument(
            f"--{role}-arg",
            action="append",
            default=[],
            metavar="ARG",
            help=f"extra argument for every {role} process (repeatable), e.g. --{role}-arg={example}",
        )


def service_argv(role: str, *flags: str, module: str = SERVICE_MODULE) -> list[str]:
    """The command of one `epd encoder|language` process on 127.0.0.1, on an ephemeral port."""
    return [sys.executable, "-m", module, role, "--host", LOOPBACK, "--port", "0", *flags]


class ServiceGroup:
    """Encoders, then one language instance wired to all of them: started in that order (every
    encoder ready before the language starts), stopped in the reverse order. A failed start
    stops what had started and raises `ServiceStartError` (every service's output in it).

    `language_argv` gets the encoders' `host:port` addresses, in order; `on_ready(process,
    seconds)` is told of each service once it is ready."""

    def __init__(
        self,
        encoder_argvs: Sequence[Sequence[str]],
        language_argv: Callable[[list[str]], Sequence[str]],
        *,
        env: dict[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
        on_ready: Callable[[ServiceProcess, float], None] | None = None,
    ) -> None:
        self._encoder_argvs = [list(a) for a in encoder_argvs]
        self._language_argv = language_argv
        self._env = env
        self._log_dir = log_dir
        self._ready_timeout = ready_timeout
        self._on_ready = on_ready or (lambda process, seconds: None)
        self.encoders: list[ServiceProcess] = []
        self.language: ServiceProcess | None = None

    def start(self) -> ServiceGroup:
        try:
            started = time.monotonic()
            for argv in self._encoder_argvs:
                encoder = ServiceProcess("encoder", argv, self._env, self._log_dir)
                self.encoders.append(encoder)
                encoder.start()
            for encoder in self.encoders:
                encoder.wait_ready(self._ready_timeout)
                self._on_ready(encoder, time.monotonic() - started)
            started = time.monotonic()
            language = self._language_argv([e.address for e in self.encoders])
            self.language = ServiceProcess("language", language, self._env, self._log_dir)
            self.language.start()
            self.language.wait_ready(self._ready_timeout)
            self._on_ready(self.language, time.monotonic() - started)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def processes(self) -> list[ServiceProcess]:
        """Every service started so far, in start order."""
        return self.encoders + ([self.language] if self.language else [])

    def stop(self, timeout: float = 10.0) -> None:
        """Idempotent: the language first (it holds the encoders' transfers), then the encoders."""
        for process in self.processes[::-1]:
            process.stop(timeout)
            process.close()

    def __enter__(self) -> ServiceGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
