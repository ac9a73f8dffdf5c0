"""The fast protocol tier's harness: both services in this process, real gRPC, no Mooncake.

`protocol_tier(...)` starts an `EncoderService` and then a `LanguageService` in the running event
loop, on 127.0.0.1 ephemeral ports, over real `grpc.aio`. Their data planes are real
`MooncakeTransport`s whose engine is an `InProcessEngine` (memcpy between registered buffers,
tests/protocol/inprocess_engine.py), handed to the services through their one seam
(`services.parts.Parts.make_transport`). What the seam offers besides is used as is: `wrap_link`
(the language's encoder links) for forged statuses and paused rounds, and the encoder's
data-plane transport can be wrapped (e.g. with tests/faults/transport.py's `FaultyTransport`).

On exit, after a body that passed, every pool must be fully free (GetPool and ListTransfers of
both services, every rank: the invariants of tests/conftest.py's `assert_all_free`), both services
are shut down, and then the pools, transfer tables, engines and rank tasks are checked directly.

Several TP ranks (`LanguageConfig.tp > 1`) run in this process too. Production starts ranks
1..tp-1 as processes (`services.language.ranks.spawn`) and joins them in a gloo group
(`DistributedGroup`, torch.distributed: one default group per process, so two ranks cannot share
one). For the tier's duration, `services.language.service.DistributedGroup` and
`services.language.ranks.spawn` are replaced (test-side patching; production code is unchanged):

- `InProcessGroup` *is* the production `DistributedGroup` — its step thread, packing, admission
  order and `decide` rule all run — except that its collective goes through an in-process
  `_Hub` instead of gloo: its `all_gather` is routed to the hub by the step thread that calls it,
  and its start-up barrier is the hub's;
- the spawned "processes" are `InProcessRank`s: a `RankWorker` of rank R with its own pool,
  in-process engine and encoder links, run by an asyncio task as `services.language.ranks.run_rank`
  runs it (without its process-only parts: the parent-death signal and SIGTERM handler). They
  look like `subprocess.Popen` to the language service (pid, poll, wait, terminate, kill), so its
  rank watcher and its shutdown (`ranks.stop`) run unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import subprocess
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch
import torch.distributed

from common.config import EncoderConfig, LanguageConfig
from common.pb.epd.v1 import common_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from common.states import TransferState
from common.transport import MooncakeTransport
from services.encoder.service import EncoderService
from services.language import ranks as ranks_module
from services.language import service as language_module
from services.language.rank_group import DistributedGroup
from services.language.service import LanguageService
from services.language.worker import RankWorker
from services.parts import Parts
from tests.protocol.inprocess_engine import InProcessEngine

HOST = "127.0.0.1"
HIDDEN = 64
BLOCK = 16
ENCODER_BLOCKS = 256  # 4096 tokens of source pool
LANGUAGE_BLOCKS = 16  # 256 tokens per rank
INITIAL_TOKENS = 64
STEP_TIMEOUT_S = 10.0
"""Longest any single protocol step of the tier may take (a hang fails the test quickly)."""
LIVE_STATES = (
    TransferState.BOOTSTRAPPING,
    TransferState.WAITING_FOR_INPUT,
    TransferState.TRANSFERRING,
)
_MC_ENV = ("MC_FORCE_TCP", "MC_TRANSFER_TIMEOUT", "MC_TCP_PROGRESS_TIMEOUT_SEC")


def encoder_config(**overrides: Any) -> EncoderConfig:
    """The tier's encoder: loopback, ephemeral port, no metrics, a small pool of 64-wide records."""
    values: dict[str, Any] = {
        "host": HOST,
        "port": 0,
        "metrics_port": 0,
        "hidden": HIDDEN,
        "block_size": BLOCK,
        "pool_blocks": ENCODER_BLOCKS,
        "shutdown_grace_s": 2.0,
        "bootstrap_timeout_s": STEP_TIMEOUT_S,
        "resume_timeout_s": STEP_TIMEOUT_S,
        "alloc_timeout_s": STEP_TIMEOUT_S,
        "write_timeout_s": 5.0,
    }
    values.update(overrides)
    return EncoderConfig(**values)


def language_config(encoder_port: int, **overrides: Any) -> LanguageConfig:
    """The tier's language instance, pointed at the tier's encoder."""
    values: dict[str, Any] = {
        "host": HOST,
        "port": 0,
        "metrics_port": 0,
        "hidden": HIDDEN,
        "block_size": BLOCK,
        "pool_blocks": LANGUAGE_BLOCKS,
        "initial_tokens": INITIAL_TOKENS,
        "encoder": (f"{HOST}:{encoder_port}",),
        "shutdown_grace_s": 2.0,
        "alloc_timeout_s": STEP_TIMEOUT_S,
        "generate_timeout_s": 30.0,
    }
    values.update(overrides)
    return LanguageConfig(**values)


# ---------------------------------------------------------------------------- transports


@dataclasses.dataclass
class MadeTransport:
    """One transport the tier's parts built."""

    service: str  # "encoder" or "language"
    purpose: str  # "writes", "proofs" or "pool"
    engine: InProcessEngine
    transport: Any  # the MooncakeTransport, or what wrapped it


def inprocess_parts(
    service: str,
    made: list[MadeTransport],
    *,
    wrap_writes: Callable[[MooncakeTransport], Any] | None = None,
    wrap_link: Callable[[Any, int], Any] | None = None,
) -> Parts:
    """The seam's parts for one service of the tier: in-process engines for every transport
    (`wrap_writes` around the encoder's data-plane one), `wrap_link` around each encoder link."""

    def make_transport(host: str, protocol: str, device: str, *, purpose: str, **options):
        engine = InProcessEngine(host)
        transport: Any = MooncakeTransport(host, protocol, device, engine=engine, **options)
        if purpose == "writes" and wrap_writes is not None:
            transport = wrap_writes(transport)
        made.append(MadeTransport(service, purpose, engine, transport))
        return transport

    extra = {} if wrap_link is None else {"wrap_link": wrap_link}
    return Parts(make_transport=make_transport, **extra)


# ---------------------------------------------------------------------------- rank group


class _Hub:
    """The collective of one in-process rank group: a reusable rendezvous of `world_size` ranks
    (all_gather, barrier). `broken` makes every waiting and later call raise, as a gloo
    collective does once a peer is gone."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._cv = threading.Condition()
        self._generation = 0
        self._slots: dict[int, Any] = {}
        self._result: list[Any] = []
        self.broken = ""

    def _exchange(self, rank: int, value: Any, timeout: float | None = None) -> list[Any]:
        with self._cv:
            if self.broken:
                raise RuntimeError(self.broken)
            generation = self._generation
            self._slots[rank] = value
            if len(self._slots) == self.world_size:
                self._result = [self._slots[r] for r in range(self.world_size)]
                self._slots = {}
                self._generation += 1
                self._cv.notify_all()
            else:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._generation == generation:
                    if self.broken:
                        raise RuntimeError(self.broken)
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self._slots.pop(rank, None)
                        raise RuntimeError(f"rank {rank}: collective timed out after {timeout} s")
                    self._cv.wait(left)
            # Valid until this rank contributes again: the next round needs every rank.
            return self._result

    def all_gather(self, rank: int, tensor: torch.Tensor, out: list[torch.Tensor]) -> None:
        for dst, src in zip(out, self._exchange(rank, tensor.clone()), strict=True):
            dst.copy_(src)

    def barrier(self, rank: int, timeout: float) -> None:
        self._exchange(rank, None, timeout)

    def break_(self, why: str) -> None:
        with self._cv:
            self.broken = self.broken or why
            self._cv.notify_all()


_current = threading.local()  # .group: the InProcessGroup whose step thread this is
_real_all_gather = torch.distributed.all_gather


def _routed_all_gather(tensor_list, tensor, group=None, async_op=False):
    """torch.distributed.all_gather while in-process groups exist: a step thread of one goes to
    its hub; any other caller gets torch's own."""
    me = getattr(_current, "group", None)
    if me is None:
        return _real_all_gather(tensor_list, tensor, group=group, async_op=async_op)
    me.hub.all_gather(me.rank, tensor, tensor_list)
    return None


class InProcessGroup(DistributedGroup):
    """The production rank group with an in-process collective (see the module docstring)."""

    def __init__(self, hub: _Hub, rank: int, world_size: int, init_method: str, **kw: Any):
        super().__init__(rank, world_size, init_method, **kw)
        self.hub = hub

    async def start(self) -> None:
        pass  # no process group to join: the hub is the rendezvous

    async def begin(self) -> None:
        # DistributedGroup.begin with the hub's barrier: every rank registered, then stepping.
        await asyncio.to_thread(self.hub.barrier, self.rank, STEP_TIMEOUT_S)
        self._thread = threading.Thread(
            target=self._run, name=f"rank-group-{self.rank}", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        # DistributedGroup.close without tearing down torch.distributed's default group, which
        # is not ours (and does not exist in this process).
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STEP_TIMEOUT_S)

    def _run(self) -> None:
        _current.group = self
        try:
            super()._run()
        finally:
            _current.group = None


class InProcessRank:
    """Rank R of a language instance as an asyncio task, posing as its process (Popen-like)."""

    def __init__(self, config: LanguageConfig, parts: Parts, hub: _Hub):
        self.config = config
        self.rank = config.rank
        self.pid = os.getpid()
        self.returncode: int | None = None
        self.error: BaseException | None = None
        self.worker: RankWorker | None = None
        self.group: InProcessGroup | None = None
        self._hub = hub
        self._parts = parts
        self._exited = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.task = self._loop.create_task(self._run(), name=f"inprocess-rank-{self.rank}")

    async def _run(self) -> None:
        # services.language.ranks.run_rank, less the process-only parts.
        cfg = self.config
        self.group = group = InProcessGroup(self._hub, cfg.rank, cfg.tp, cfg.dist_init)
        self.worker = worker = RankWorker(cfg, cfg.rank, group, cfg.language_id, parts=self._parts)
        done = asyncio.Event()
        broken: list[str] = []
        group.bind(
            worker.on_admit,
            lambda why: (broken.append(why), done.set()),
            done.set,
            worker.pool_stats,
        )
        code = 1
        try:
            await group.start()
            await worker.start()
            await group.begin()
            await done.wait()
            code = 1 if broken else 0
        except BaseException as e:
            self.error = e
            self._hub.break_(f"rank {self.rank} failed: {e!r}")
            raise
        finally:
            try:
                await worker.close()
                await group.close()
            finally:
                self.returncode = code
                self._exited.set()

    # -- subprocess.Popen, as services/language/ranks.py and service.py use it (any thread)
    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"in-process rank {self.rank}", timeout)
        return self.returncode

    def terminate(self) -> None:
        self._loop.call_soon_threadsafe(self.task.cancel)

    kill = terminate


@contextlib.contextmanager
def inprocess_ranks(parts: Parts, ranks_out: list[InProcessRank]):
    """While open, a LanguageService with tp > 1 made in this process runs its ranks 1..tp-1 as
    `InProcessRank`s joined by `InProcessGroup`s (see the module docstring)."""
    hubs: dict[str, _Hub] = {}
    names = itertools.count()

    def make_group(rank: int, world_size: int, init_method: str, **kw: Any) -> InProcessGroup:
        hub = hubs.setdefault(init_method, _Hub(world_size))
        return InProcessGroup(hub, rank, world_size, init_method, **kw)

    def spawn(config: LanguageConfig, language_id: str, dist_init: str, command) -> list:
        del command  # no process to start
        hub = hubs.setdefault(dist_init, _Hub(config.tp))
        children = []
        for rank in range(1, config.tp):
            child = dataclasses.replace(
                config,
                rank=rank,
                dist_init=dist_init,
                language_id=language_id,
                port=0,
                metrics_port=0,
            )
            children.append(InProcessRank(child, parts, hub))
        ranks_out.extend(children)
        return children

    saved = (language_module.DistributedGroup, ranks_module.spawn, torch.distributed.all_gather)
    language_module.DistributedGroup = make_group
    ranks_module.spawn = spawn
    torch.distributed.all_gather = _routed_all_gather
    try:
        yield lambda: f"inprocess://group-{next(names)}"
    finally:
        for hub in hubs.values():
            hub.break_("the in-process rank group was torn down")
        language_module.DistributedGroup, ranks_module.spawn, torch.distributed.all_gather = saved


# ---------------------------------------------------------------------------- the tier


@dataclasses.dataclass
class Tier:
    """A running encoder + language pair of the fast tier."""

    encoder: EncoderService
    language: LanguageService
    channel: grpc.aio.Channel
    stub: language_pb2_grpc.LanguageStub
    encoder_stub: encoder_pb2_grpc.EncoderStub
    transports: list[MadeTransport]
    ranks: list[InProcessRank]

    @property
    def encoder_address(self) -> str:
        return f"{HOST}:{self.encoder.port}"

    @property
    def language_address(self) -> str:
        return f"{HOST}:{self.language.port}"

    @property
    def hidden(self) -> int:
        return self.language.config.hidden

    @property
    def writes(self) -> Any:
        """The encoder's data-plane transport (as wrapped by `wrap_writes`)."""
        return next(m.transport for m in self.transports if m.purpose == "writes")

    @property
    def language_pool_tokens(self) -> int:
        return self.language.pool.num_blocks * self.language.pool.block_size

    async def generate(
        self,
        tokens: int,
        seed: int = 0,
        *,
        request_id: str = "",
        timeout: float = STEP_TIMEOUT_S,
        **fields: Any,
    ) -> language_pb2.GenerateReply:
        """A Generate of a synthetic payload, with its digest asked for."""
        return await self.stub.Generate(
            language_pb2.GenerateRequest(
                request_id=request_id,
                synthetic_tokens=tokens,
                synthetic_seed=seed,
                want_digest=True,
                **fields,
            ),
            timeout=timeout,
        )

    async def encoder_transfer(self, request_id: str) -> common_pb2.TransferInfo:
        """The encoder's view of a Generate's transfer (found by the client's request id)."""
        return await self.encoder_stub.GetTransfer(
            common_pb2.GetTransferRequest(request_id=request_id), timeout=STEP_TIMEOUT_S
        )

    async def language_transfer(self, request_id: str) -> common_pb2.TransferInfo:
        return await self.stub.GetTransfer(
            common_pb2.GetTransferRequest(request_id=request_id), timeout=STEP_TIMEOUT_S
        )

    async def assert_all_free(self, settle_s: float = 2.0) -> None:
        """Every pool of both services fully free, no waiter, no live transfer, as GetPool and
        ListTransfers report them (the invariants of tests/conftest.py's `assert_all_free`).
        Ranks 1..N-1 release a request's blocks just after rank 0 replied: they get `settle_s`."""
        live = [int(s) for s in LIVE_STATES]
        for kind, stub in (("encoder", self.encoder_stub), ("language", self.stub)):
            deadline = time.monotonic() + settle_s
            while True:
                pool = await stub.GetPool(common_pb2.GetPoolRequest(), timeout=STEP_TIMEOUT_S)
                busy = [
                    rp
                    for rp in pool.rank_pools[1:]  # rank 0 and the encoder: free at once
                    if rp.used_blocks or rp.waiters or rp.quarantined_blocks
                ]
                if not busy or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            what = f"{kind} pool"
            assert (pool.used_blocks, pool.quarantined_blocks, pool.waiters) == (0, 0, 0), (
                f"{what}: used {pool.used_blocks}, quarantined {pool.quarantined_blocks}, "
                f"waiters {pool.waiters}"
            )
            assert pool.free_blocks == pool.layout.num_blocks, what
            for rp in pool.rank_pools:  # language: every TP rank's pool
                assert (rp.used_blocks, rp.quarantined_blocks, rp.waiters) == (0, 0, 0), (
                    f"{kind} rank {rp.rank}: used {rp.used_blocks}, quarantined "
                    f"{rp.quarantined_blocks}, waiters {rp.waiters}"
                )
            listed = await stub.ListTransfers(
                common_pb2.ListTransfersRequest(states=live), timeout=STEP_TIMEOUT_S
            )
            assert not listed.transfers, f"{kind}: live transfers left: {listed.transfers}"


def _workers(tier: Tier) -> list[RankWorker]:
    return [tier.language.worker, *(r.worker for r in tier.ranks if r.worker is not None)]


def assert_shut_down_clean(tier: Tier) -> None:
    """After shutdown: nothing used, quarantined or waited for in any pool, no live transfer,
    no rank task, no write piece or batch id left over, every rank exited 0."""
    pools = [("encoder", tier.encoder.pool)] + [
        (f"language rank {w.rank}", w.pool) for w in _workers(tier)
    ]
    for name, pool in pools:
        a = pool.allocator
        assert (a.used_count, a.quarantined_count, a.waiters) == (0, 0, 0), (
            f"{name}: used {a.used_count}, quarantined {a.quarantined_count}, waiters {a.waiters}"
        )
        assert a.free_count == pool.num_blocks, name
    assert not tier.encoder.transfers.live, tier.encoder.transfers.live
    assert not tier.language.requests.live, tier.language.requests.live
    for w in _workers(tier):
        assert not w._tasks, f"rank {w.rank}: request tasks left: {w._tasks}"
        assert not w._quarantines, f"rank {w.rank}: quarantines left: {w._quarantines}"
    for made in tier.transports:
        assert made.engine.open_batches == 0, f"{made.service} {made.purpose}: batch ids left"
        assert made.transport.late_pieces == 0, f"{made.service} {made.purpose}: late pieces"
        assert not made.engine.registered, f"{made.service} {made.purpose}: memory left registered"
    for r in tier.ranks:
        assert r.returncode == 0, f"in-process rank {r.rank}: exit {r.returncode}, {r.error!r}"


_executors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, concurrent.futures.Executor] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def protocol_tier(
    *,
    encoder: dict[str, Any] | None = None,
    language: dict[str, Any] | None = None,
    wrap_writes: Callable[[MooncakeTransport], Any] | None = None,
    wrap_link: Callable[[Any, int], Any] | None = None,
) -> AsyncIterator[Tier]:
    """Start the tier's encoder then language (config overrides in `encoder` / `language`), yield
    the running `Tier`; on exit after a passing body, check every pool free, shut both down, check
    again (see `assert_shut_down_clean`)."""
    loop = asyncio.get_running_loop()
    if loop not in _executors:
        # One process runs what is two or three in production (encoder, rank 0, rank 1): room
        # for each one's worker threads (an in-process rank's watcher holds one for good).
        _executors[loop] = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="tier")
        loop.set_default_executor(_executors[loop])
    env = {k: os.environ.get(k) for k in _MC_ENV}  # MooncakeTransport sets them process-wide
    made: list[MadeTransport] = []
    ranks: list[InProcessRank] = []
    language_parts = inprocess_parts("language", made, wrap_link=wrap_link)
    enc = EncoderService(
        encoder_config(**(encoder or {})),
        parts=inprocess_parts("encoder", made, wrap_writes=wrap_writes),
    )
    lang: LanguageService | None = None
    passed = False
    try:
        with inprocess_ranks(language_parts, ranks) as group_name:
            await asyncio.wait_for(enc.start(), STEP_TIMEOUT_S)
            overrides = dict(language or {})
            if overrides.get("tp", 1) > 1:
                overrides.setdefault("dist_init", group_name())
            lang = LanguageService(language_config(enc.port, **overrides), parts=language_parts)
            await asyncio.wait_for(lang.start(), STEP_TIMEOUT_S)
            channel = grpc.aio.insecure_channel(f"{HOST}:{lang.port}")
            encoder_channel = grpc.aio.insecure_channel(f"{HOST}:{enc.port}")
            tier = Tier(
                enc,
                lang,
                channel,
                language_pb2_grpc.LanguageStub(channel),
                encoder_pb2_grpc.EncoderStub(encoder_channel),
                made,
                ranks,
            )
            try:
                yield tier
                await tier.assert_all_free()
                passed = True
            finally:
                await channel.close()
                await encoder_channel.close()
                await lang.shutdown()
                lang = None
                await enc.shutdown()
                for r in ranks:  # stopped by the language's shutdown; their task must be over
                    await asyncio.wait({r.task}, timeout=STEP_TIMEOUT_S)
            if passed:
                assert_shut_down_clean(tier)
    finally:
        if lang is not None:  # start-up failed half-way
            await lang.shutdown()
        await enc.shutdown()
        for r in ranks:
            if not r.task.done():
                r.task.cancel()
                await asyncio.gather(r.task, return_exceptions=True)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
