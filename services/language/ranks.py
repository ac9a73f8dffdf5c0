"""The processes of a multi-rank language instance (docs/DESIGN.md, 'Several TP ranks').

Rank 0 (the `epd language` process) starts ranks 1..tp-1 as child processes of the same
command with `--rank R --dist-init URL`; they join the gloo group, register with the encoder,
and serve no gRPC of their own. A child dies with its parent (PR_SET_PDEATHSIG), and a child
whose rank group ends or breaks shuts down.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from common.config import LanguageConfig
from services.edge import rpc
from services.parts import Parts

log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def config_to_argv(config: LanguageConfig) -> list[str]:
    """Flags that rebuild `config` in a child process."""
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value == "" and f.metadata.get("choices"):
            continue  # unset: the child resolves the same default (embedding_cache_scope)
        elif isinstance(value, tuple):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(
    config: LanguageConfig, language_id: str, dist_init: str, command: Sequence[str]
) -> list[subprocess.Popen]:
    """Ranks 1..tp-1 as child processes: the interpreter runs `command`, then `language` and
    the flags that rebuild the rank's config."""
    children = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")}  # the flags say it all
    for rank in range(1, config.tp):
        # Each rank process serves its own /metrics (rank R on metrics_port + R).
        child = dataclasses.replace(
            config,
            rank=rank,
            dist_init=dist_init,
            language_id=language_id,
            port=0,
            metrics_port=config.metrics_port + rank if config.metrics_port else 0,
        )
        argv = [sys.executable, *command, "language", *config_to_argv(child)]
        # No preexec_fn: it forces fork() in a process with gRPC threads (fork handlers skipped,
        # broken pollers); the child sets its own parent-death signal instead (run_rank).
        children.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env))
    return children


def stop(children: list[subprocess.Popen], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for c in children:
        if c.returncode is None and c.poll() is None:
            try:
                c.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.terminate()
    for c in children:
        try:
            c.wait(5)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
        except ChildProcessError:
            pass


async def run_rank(config: LanguageConfig, parts: Parts) -> int:
    """Ranks 1..tp-1: join the group, register, then follow rank 0 until it ends the group."""
    from services.language.rank_group import DistributedGroup
    from services.language.worker import RankWorker

    _die_with_parent()
    if os.getppid() == 1:  # rank 0 died before we could ask to be told
        return 1
    group = DistributedGroup(config.rank, config.tp, config.dist_init)
    worker = RankWorker(config, config.rank, group, config.language_id, parts=parts)
    done = asyncio.Event()
    broken: list[str] = []

    def on_broken(why: str) -> None:
        broken.append(why)
        done.set()

    group.bind(worker.on_admit, on_broken, done.set, worker.pool_stats)
    stop_signal = asyncio.ensure_future(rpc.termination_event().wait())
    stop_signal.add_done_callback(lambda _: done.set())
    try:
        await group.start()
        await worker.start()
        await group.begin()
        assert worker.transport is not None  # worker.start() made it
        log.info(
            "language %s rank %d of %d ready, session %s, %s rank",
            config.language_id,
            config.rank,
            config.tp,
            worker.transport.session,
            "data" if worker.is_data_rank else "dummy",
        )
        await done.wait()
    finally:
        stop_signal.cancel()
        await worker.close()
        await group.close()
    if broken:
        log.error("rank %d: %s", config.rank, broken[0])
        return 1
    return 0
