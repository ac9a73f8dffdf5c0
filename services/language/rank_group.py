"""Agreement between the TP ranks of one language instance (docs/DESIGN.md, 'Several TP ranks').

Every rank keeps, per admitted request, a `LocalView` of what it observed: (total, sent, failed,
not_ready, ...). The ranks agree on each request's fate by a collective over those views, taken
in the same order of admission on every rank, and a pure rule (`decide`):

- any rank failed            -> FAIL on every rank (reason: the largest failure code);
- every rank ready, no fail  -> DELIVER on every rank, in admission order;
- otherwise                  -> undecided, look again at the next step.

So a rank whose Status stream lags or repeats only delays the decision; it cannot change it.
Admissions (new requests, decided by rank 0's front door) travel in the same collective, so all
ranks see the same requests in the same order.

`LocalGroup` is the one-rank case (no torch.distributed). `DistributedGroup` runs the steps in
a thread: one `all_gather` of a fixed-size int64 tensor per step over a gloo group, paced by
rank 0 (immediately on news from rank 0, else every `step_interval_s` while requests are open,
and every `heartbeat_s` when idle so a dead rank is noticed). A failed collective means a rank
is gone: every open request fails with `peer_lost` and the group reports itself broken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable

import torch

from common.errors import Unavailable, shown
from common.states import FailureReason

log = logging.getLogger(__name__)

MAX_REQUEST_ID_BYTES = 128
MAX_HELD = 8  # image keys an admission carries (held_images.MAX_PROPOSED)
ENCODER_ADDRESS_BYTES = 64  # an admission's encoder address ("" when longer: by index only)
HELD_KEY_BYTES = 32  # one key: a SHA-256
ADMIT_KEY_BYTES = MAX_REQUEST_ID_BYTES + 8  # an admission's key: the request id, "#2" on a failover


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """What every rank needs to know about an admitted request."""

    seq: int
    request_id: str
    initial_tokens: int
    want_digest: bool = False
    encoder: int = 0
    """Index of the encoder serving it in the instance's ordered encoder list (rank 0 picks)."""
    encoder_address: str = ""
    """Its address (at most ENCODER_ADDRESS_BYTES): a rank that does not know it yet (rank 0
    found it by DNS since) adds it."""
    held: tuple[str, ...] = ()
    """Keys of the request's images whose rows rank 0 holds (at most MAX_HELD): each data rank
    claims those it holds too, and the encoder skips the rows every data rank claimed."""


@dataclasses.dataclass(frozen=True)
class RankRow:
    """One rank's observation of one request (one row of the collective)."""

    total: int = 0
    sent: int = 0
    failed: int = 0  # FailureReason value, 0 = not failed
    not_ready: int = 1  # 0 once the rank holds the whole payload (or is a dummy rank)
    state: int = 0  # TransferState, for inspection
    allocated: int = 0
    rounds: int = 0
    digest: bytes = b""  # sha256 of the rank's payload when asked for

    FIELDS = 8 + 4  # words in the packed form (digest: 4 x 8 bytes)


@dataclasses.dataclass(frozen=True)
class Decision:
    deliver: bool
    reason: FailureReason = FailureReason.UNSPECIFIED
    total: int = 0
    rows: tuple[RankRow, ...] = ()
    decided_at: float = 0.0


def decide(rows: list[RankRow] | tuple[RankRow, ...]) -> Decision | None:
    """The agreed outcome of one request from every rank's row, or None while undecided."""
    failed = max(r.failed for r in rows)
    if failed:
        return Decision(
            False, FailureReason(failed), max(r.total for r in rows), tuple(rows), time.monotonic()
        )
    if max(r.not_ready for r in rows) == 0:
        return Decision(
            True,
            FailureReason.UNSPECIFIED,
            max(r.total for r in rows),
            tuple(rows),
            time.monotonic(),
        )
    return None


class LocalView:
    """This rank's observation of one request; written by the event loop, read by the step thread
    (a single tuple assignment, so readers always see a consistent row)."""

    def __init__(self):
        self.row = RankRow()
        self.changed_at = time.monotonic()

    def update(self, **kw) -> None:
        self.row = dataclasses.replace(self.row, **kw)
        self.changed_at = time.monotonic()


class RankGroup:
    """The interface the language service uses; see the module docstring."""

    rank: int
    world_size: int

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.views: dict[str, LocalView] = {}
        self.rows: dict[
            str, tuple[RankRow, ...]
        ] = {}  # latest rows of every rank (rank 0: inspection)
        self._decisions: dict[str, asyncio.Future] = {}
        self._on_admit: Callable[[RequestSpec], None] | None = None
        self._on_broken: Callable[[str], None] | None = None
        self._on_shutdown: Callable[[], None] | None = None
        self._seq = 0
        self.broken: str = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool_stats: Callable[[], tuple[int, ...]] = lambda: (0,) * RANK_STATS
        self.rank_pools: list[tuple[int, ...]] = []  # rank 0: every rank's pool_stats

    def bind(
        self,
        on_admit: Callable[[RequestSpec], None],
        on_broken: Callable[[str], None],
        on_shutdown: Callable[[], None] | None = None,
        pool_stats: Callable[[], tuple[int, ...]] = lambda: (0,) * RANK_STATS,
    ) -> None:
        """Callbacks, run on the event loop: a request was admitted on this rank; the group broke;
        rank 0 ended the group (the other ranks then shut down). `pool_stats` gives this rank's
        RANK_STATS numbers (blocks used, free, waiting, quarantined, then its held image rows);
        rank 0 sees every rank's in `rank_pools`."""
        self.loop = asyncio.get_running_loop()
        self.pool_stats = pool_stats
        self._on_admit = on_admit
        self._on_broken = on_broken
        self._on_shutdown = on_shutdown

    async def start(self) -> None:
        pass

    async def begin(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def admit(
        self,
        request_id: str,
        initial_tokens: int,
        want_digest: bool,
        encoder: int = 0,
        held: tuple[str, ...] = (),
        encoder_address: str = "",
    ) -> RequestSpec:
        """Rank 0: add a request; every rank's on_admit runs for it (rank 0's before this returns
        for LocalGroup, at the next step for DistributedGroup). `request_id` is the admission's
        key (a failed-over attempt is admitted again as `ID#2`); `encoder` the encoder's index.
        A broken group admits nothing: Unavailable at once (no decision would ever come)."""
        raise NotImplementedError

    def _next_spec(
        self,
        request_id: str,
        initial_tokens: int,
        want_digest: bool,
        encoder: int,
        held: tuple[str, ...],
        encoder_address: str,
    ) -> RequestSpec:
        """The next admission's spec (Unavailable when the group is broken), within what the
        collective carries: at most MAX_HELD keys, an address of at most ENCODER_ADDRESS_BYTES
        (a longer one is left out: the ranks go by the index)."""
        self._check_admissible(request_id)
        self._seq += 1
        fits = len(encoder_address.encode()) <= ENCODER_ADDRESS_BYTES
        return RequestSpec(
            self._seq,
            request_id,
            initial_tokens,
            want_digest,
            encoder,
            encoder_address if fits else "",
            held[:MAX_HELD],
        )

    def _check_admissible(self, request_id: str) -> None:
        if self.broken:
            raise Unavailable(
                f"request {shown(request_id)}: the language instance's rank group is broken "
                f"({self.broken}); it admits no request",
                reason=FailureReason.PEER_LOST,
            )

    def view(self, request_id: str) -> LocalView:
        return self.views[request_id]

    def decision(self, request_id: str) -> asyncio.Future:
        return self._decisions[request_id]

    def changed(self) -> None:
        """A local view changed: look for a decision soon."""

    async def refresh(self) -> None:
        """Make `rank_pools` current."""
        self.rank_pools = [self.pool_stats()]

    def forget(self, request_id: str) -> None:
        self.views.pop(request_id, None)
        self._decisions.pop(request_id, None)
        self.rows.pop(request_id, None)

    def _shutdown_by_leader(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()

    # -- shared by implementations, always on the event loop
    def _admitted(self, spec: RequestSpec) -> None:
        assert self.loop is not None and self._on_admit is not None, "bind() first"
        self.views[spec.request_id] = LocalView()
        self._decisions[spec.request_id] = self.loop.create_future()
        self._on_admit(spec)

    def _decided(self, request_id: str, decision: Decision) -> None:
        self.rows[request_id] = decision.rows
        fut = self._decisions.get(request_id)
        if fut is not None and not fut.done():
            fut.set_result(decision)

    def _break(self, why: str) -> None:
        if self.broken:
            return
        self.broken = why
        log.error("rank group broken: %s", why)
        for _request_id, fut in list(self._decisions.items()):
            if not fut.done():
                fut.set_result(Decision(False, FailureReason.PEER_LOST, 0, (), time.monotonic()))
        if self._on_broken is not None:
            self._on_broken(why)


class LocalGroup(RankGroup):
    """One rank: a request is decided as soon as its own view is."""

    def __init__(self):
        super().__init__(0, 1)

    def admit(
        self,
        request_id: str,
        initial_tokens: int,
        want_digest: bool,
        encoder: int = 0,
        held: tuple[str, ...] = (),
        encoder_address: str = "",
    ) -> RequestSpec:
        spec = self._next_spec(
            request_id, initial_tokens, want_digest, encoder, held, encoder_address
        )
        self._admitted(spec)
        return spec

    def changed(self) -> None:
        for request_id, view in list(self.views.items()):
            fut = self._decisions.get(request_id)
            if fut is None or fut.done():
                continue
            d = decide([view.row])
            if d is not None:
                self._decided(request_id, d)


# ---------------------------------------------------------------------------- distributed

RANK_STATS = 10  # pool used, free, waiters, quarantined; held rows capacity, bytes, entries, hits, misses, evictions
_HEADER = 4 + RANK_STATS  # shutdown, n_admissions, n_open, step, the rank's stats
_KEY_WORDS = ADMIT_KEY_BYTES // 8
_ADDRESS_WORDS = 1 + ENCODER_ADDRESS_BYTES // 8  # length, address
_HELD_WORDS = 1 + MAX_HELD * HELD_KEY_BYTES // 8  # count, keys
# seq, initial_tokens, want_digest, key length, encoder, key, encoder address, held keys
_ADMIT_WORDS = 5 + _KEY_WORDS + _ADDRESS_WORDS + _HELD_WORDS


class DistributedGroup(RankGroup):
    """N ranks in one torch.distributed gloo group; see the module docstring."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        *,
        max_open: int = 256,
        max_admit: int = 32,
        step_interval_s: float = 0.002,
        heartbeat_s: float = 1.0,
        init_timeout_s: float = 120.0,
    ):
        super().__init__(rank, world_size)
        self.init_method = init_method
        self.max_open = max_open
        self.max_admit = max_admit
        self.step_interval_s = step_interval_s
        self.heartbeat_s = heartbeat_s
        self.init_timeout_s = init_timeout_s
        self._open: list[str] = []  # identical on every rank: admitted, not yet decided
        self._pending: list[RequestSpec] = []  # rank 0: admitted by the front door, not yet sent
        self._cv = threading.Condition()
        self._news = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._steps = 0
        self._width = _HEADER + max_open * RankRow.FIELDS + max_admit * _ADMIT_WORDS
        self._step_waiters: list[asyncio.Future] = []

    async def start(self) -> None:
        """Join the group (a rendezvous of every rank)."""
        import torch.distributed as dist

        def init() -> None:
            # The collectives can wait for a long time when idle; failures surface as errors
            # from the peers' closed sockets, not from this timeout.
            dist.init_process_group(
                "gloo",
                init_method=self.init_method,
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(days=365),
            )

        await asyncio.wait_for(asyncio.to_thread(init), self.init_timeout_s)

    async def begin(self) -> None:
        """Wait until every rank is ready (registered with the encoder), then start stepping.
        The barrier runs before the step thread exists: collectives must never interleave."""
        import torch.distributed as dist

        await asyncio.to_thread(dist.barrier)
        self._thread = threading.Thread(
            target=self._run, name=f"rank-group-{self.rank}", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly; the process is ending anyway
            pass

    def admit(
        self,
        request_id: str,
        initial_tokens: int,
        want_digest: bool,
        encoder: int = 0,
        held: tuple[str, ...] = (),
        encoder_address: str = "",
    ) -> RequestSpec:
        assert self.rank == 0, "only rank 0 admits requests"
        spec = self._next_spec(
            request_id, initial_tokens, want_digest, encoder, held, encoder_address
        )
        # The view and decision exist at once on rank 0, so Generate can wait on them.
        assert self.loop is not None, "bind() first"
        self.views[spec.request_id] = LocalView()
        self._decisions[spec.request_id] = self.loop.create_future()
        with self._cv:
            self._pending.append(spec)
            self._news = True
            self._cv.notify_all()
        return spec

    def changed(self) -> None:
        if self.rank == 0:
            with self._cv:
                self._news = True
                self._cv.notify_all()

    async def refresh(self) -> None:
        """Rank 0: take one more step now and return once it completed (fresh rank_pools)."""
        assert self.loop is not None, "bind() first"
        fut = self.loop.create_future()
        with self._cv:
            self._step_waiters.append(fut)
            self._news = True
            self._cv.notify_all()
        await asyncio.wait_for(fut, 10)

    # ------------------------------------------------------------------ step thread

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None, "bind() runs before begin()"
        try:
            while True:
                if self.rank == 0 and not self._wait_for_work():
                    self._step(shutdown=True)
                    return
                if not self._step(shutdown=False):
                    loop.call_soon_threadsafe(self._shutdown_by_leader)
                    return
        except Exception as e:  # noqa: BLE001 - a peer is gone (or the group was torn down under us)
            if not self._stop:
                loop.call_soon_threadsafe(self._break, f"rank {self.rank}: collective failed: {e}")

    def _wait_for_work(self) -> bool:
        """Rank 0: block until there is something to step for; False on shutdown."""
        with self._cv:
            while not self._stop:
                if self._news or self._pending:
                    self._news = False
                    return True
                timeout = self.step_interval_s if self._open else self.heartbeat_s
                if not self._cv.wait(timeout):
                    return True  # tick (open requests) or heartbeat (idle)
            return False

    def _step(self, shutdown: bool) -> bool:
        import torch
        import torch.distributed as dist

        assert self.loop is not None, "bind() runs before begin()"
        admit: list[RequestSpec] = []
        if self.rank == 0:
            with self._cv:
                room = max(0, min(self.max_admit, self.max_open - len(self._open)))
                admit, self._pending = self._pending[:room], self._pending[room:]
        mine = torch.zeros(self._width, dtype=torch.int64)
        mine[0] = 1 if shutdown else 0
        mine[1] = len(admit)
        mine[2] = len(self._open)
        mine[3] = self._steps
        mine[4:_HEADER] = torch.tensor(self.pool_stats())
        for i, request_id in enumerate(self._open):
            view = self.views.get(request_id)
            row = view.row if view is not None else RankRow()
            _pack_row(mine, _HEADER + i * RankRow.FIELDS, row)
        base = _HEADER + self.max_open * RankRow.FIELDS
        for i, spec in enumerate(admit):
            _pack_admit(mine, base + i * _ADMIT_WORDS, spec)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        self._steps += 1
        leader = gathered[0]
        self.rank_pools = [tuple(int(x) for x in g[4:_HEADER].tolist()) for g in gathered]
        if any(int(g[2]) != len(self._open) for g in gathered):
            raise RuntimeError(f"ranks disagree on open requests: {[int(g[2]) for g in gathered]}")
        decided: list[tuple[str, Decision]] = []
        for i, request_id in enumerate(self._open):
            rows = tuple(_unpack_row(g, _HEADER + i * RankRow.FIELDS) for g in gathered)
            d = decide(rows)
            if d is not None:
                decided.append((request_id, d))
            elif self.rank == 0:
                self.rows[request_id] = rows
        done = {request_id for request_id, _ in decided}
        self._open = [r for r in self._open if r not in done]
        specs = [_unpack_admit(leader, base + i * _ADMIT_WORDS) for i in range(int(leader[1]))]
        self._open.extend(s.request_id for s in specs)
        if decided or specs:
            self.loop.call_soon_threadsafe(self._apply, decided, specs)
        with self._cv:
            waiters, self._step_waiters = self._step_waiters, []
        for fut in waiters:
            self.loop.call_soon_threadsafe(_set_if_pending, fut)
        return int(leader[0]) == 0

    def _apply(self, decided: list[tuple[str, Decision]], specs: list[RequestSpec]) -> None:
        assert self._on_admit is not None, "bind() first"
        for request_id, d in decided:  # in admission order: consumers see the same order
            self._decided(request_id, d)
        for spec in specs:
            if self.rank == 0:
                self._on_admit(spec)  # view and future were made by admit()
            else:
                self._admitted(spec)


def _set_if_pending(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _pack_row(t, at: int, row: RankRow) -> None:
    t[at : at + 7] = torch.tensor(
        [row.total, row.sent, row.failed, row.not_ready, row.state, row.allocated, row.rounds]
    )
    t[at + 7] = 1 if row.digest else 0
    if row.digest:
        for k in range(4):
            t[at + 8 + k] = int.from_bytes(row.digest[8 * k : 8 * k + 8], "little", signed=True)


def _unpack_row(t, at: int) -> RankRow:
    v = t[at : at + RankRow.FIELDS].tolist()
    digest = b"".join(int(x).to_bytes(8, "little", signed=True) for x in v[8:12]) if v[7] else b""
    return RankRow(
        total=v[0],
        sent=v[1],
        failed=v[2],
        not_ready=v[3],
        state=v[4],
        allocated=v[5],
        rounds=v[6],
        digest=digest,
    )


def _pack_admit(t, at: int, spec: RequestSpec) -> None:
    raw = spec.request_id.encode("utf-8")
    t[at] = spec.seq
    t[at + 1] = spec.initial_tokens
    t[at + 2] = 1 if spec.want_digest else 0
    t[at + 3] = len(raw)
    t[at + 4] = spec.encoder
    _pack_bytes(t, at + 5, raw.ljust(ADMIT_KEY_BYTES, b"\0"))
    address = spec.encoder_address.encode()
    t[at + 5 + _KEY_WORDS] = len(address)
    _pack_bytes(t, at + 6 + _KEY_WORDS, address.ljust(ENCODER_ADDRESS_BYTES, b"\0"))
    held = at + 5 + _KEY_WORDS + _ADDRESS_WORDS
    t[held] = len(spec.held)
    _pack_bytes(t, held + 1, b"".join(bytes.fromhex(key) for key in spec.held))


def _pack_bytes(t, at: int, raw: bytes) -> None:
    for k in range(len(raw) // 8):
        t[at + k] = int.from_bytes(raw[8 * k : 8 * k + 8], "little", signed=True)


def _unpack_bytes(words: list[int]) -> bytes:
    return b"".join(int(x).to_bytes(8, "little", signed=True) for x in words)


def _unpack_admit(t, at: int) -> RequestSpec:
    v = t[at : at + _ADMIT_WORDS].tolist()
    raw = _unpack_bytes(v[5 : 5 + _KEY_WORDS])[: v[3]]
    at = 5 + _KEY_WORDS
    address = _unpack_bytes(v[at + 1 : at + _ADDRESS_WORDS])[: v[at]]
    held = at + _ADDRESS_WORDS
    keys = _unpack_bytes(v[held + 1 :])
    step = HELD_KEY_BYTES
    return RequestSpec(
        seq=v[0],
        request_id=raw.decode("utf-8"),
        initial_tokens=v[1],
        want_digest=bool(v[2]),
        encoder=v[4],
        encoder_address=address.decode(),
        held=tuple(keys[i * step : (i + 1) * step].hex() for i in range(v[held])),
    )
