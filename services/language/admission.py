"""One request's admission on the language side, in one place: the initial reservation, the rank
group's admission and the Init, early (alongside the Encode) or late (after it returned).

The front door (service.py) opens an `Admission` per attempt and walks it:

    admission = Admission(...)           # refuses a key in use before anything is reserved
    carried = await admission.early()    # reserve now + admit; the Init for the Encode to carry
    total = await encode(carried)        #   (one message, not two), or its own RPC, sent first
    admission.encode_returned()
    admission.late()                     # not early: admit now, every rank reserves and Inits
    outcome = await admission.outcome()  # what every rank did, once they agreed

Every rank's worker (worker.py) then runs the request's receive task: it takes the early blocks
and the carried Init (`EarlyReservations.take`) and follows the Encode that carries it, or
reserves its own blocks and Inits the transfer (receiver.py). Nothing else on the language side
reserves or admits.

The blocks an early Init names belong to that receive task from the moment the Init can leave,
so its `close()` and the write fence cover them whatever happens to the attempt; a reservation no
task took (its task was cancelled before it ran, at shutdown) is quarantined rather than freed
when an Encode may have carried its Init.

Size-first (`--alloc-policy auto`): nothing is reserved before the Encode. Rank 0's Status
stream is opened with the Encode (`AnnouncedSize`), the encoder says the payload's size on it
once its source blocks are held and before its model runs (EncodeRequest.announce_size), and the
request is admitted then with exactly that reservation (`late(initial_tokens)`): every rank's Init
goes out while the model runs, and rank 0's receive task takes the stream
(`RankWorker.stream_ahead`). An encoder that says nothing gives the size in its Encode reply
instead, and the admission follows it.

Why two paths. An early reservation is made before the payload exists, so it is bounded: a pool
full of reservations waiting for encoder source blocks, held by transfers waiting for those
reservations, would be a deadlock only timeouts could break (see `EarlyReservations.reserve`).
A request that cannot reserve early, or an instance of several ranks, admits after the Encode.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common import errors
from common.plan import blocks_for_tokens
from common.pool import BlockPool
from common.states import StatusUpdate, TransferState
from services.language.rank_group import RankGroup, RequestSpec
from services.language.receive_options import CarriedInit

if TYPE_CHECKING:
    from services.language.receiver import StatusSource
    from services.language.worker import RankOutcome, RankWorker

log = logging.getLogger(__name__)
_END = object()


class AnnouncedSize:
    """A size-first request's Status stream, opened alongside its Encode: it reads ahead until the
    encoder says the payload's size (a status before the first round with total_tokens set), the
    stream ends or fails, or the transfer moves on; then it is the stream again, giving what it
    read ahead first. The reading is its own task, so waiting for the size can be given up at any
    point without losing a status."""

    def __init__(self, stream: StatusSource):
        self._stream = stream
        self._statuses = stream.__aiter__()
        self._ahead: collections.deque[Any] = collections.deque()
        self._settled = asyncio.Event()
        self.total_tokens = 0
        """The size the encoder said (0: it said none before the stream ended or moved on)."""
        self._reader = asyncio.ensure_future(self._read_ahead())

    async def _read_ahead(self) -> None:
        try:
            while True:
                st = await self._statuses.__anext__()
                self._ahead.append(st)
                waiting = st.state in (TransferState.BOOTSTRAPPING, TransferState.WAITING_FOR_INPUT)
                if waiting and st.total_tokens:
                    self.total_tokens = st.total_tokens
                    return
                if not waiting:  # a round, or the end: the receive task takes it from here
                    return
        except StopAsyncIteration:
            self._ahead.append(_END)
        except errors.EpdError as e:
            self._ahead.append(e)
        finally:
            self._settled.set()

    async def size(self) -> int:
        """The payload's size once the encoder said it; 0 when it will not say (see above)."""
        await self._settled.wait()
        return self.total_tokens

    def __aiter__(self) -> AnnouncedSize:
        return self

    async def __anext__(self) -> StatusUpdate:
        await self._settled.wait()
        if self._ahead:
            item = self._ahead.popleft()
            if item is _END:
                raise StopAsyncIteration
            if isinstance(item, BaseException):
                raise item
            return item
        return await self._statuses.__anext__()

    def close(self) -> None:
        self._reader.cancel()
        self._stream.close()


class EarlyReservations:
    """A rank's blocks reserved for requests whose Encode has not returned yet, and their Inits:
    carried by the Encode (`carry`), or sent on their own, which the Encode then waits for."""

    def __init__(self, pool: BlockPool, *, carry: bool = True):
        self.pool = pool
        self.carry = carry
        self._blocks: dict[str, list[int]] = {}  # until the request's receive task takes them
        self._carried: dict[str, CarriedInit] = {}  # the Init for the Encode to carry, likewise
        self._pending: dict[str, int] = {}  # blocks of those whose Encode has not returned yet
        # Early Inits sent on their own: resolved once the Init is on its way (or its receive ended).
        self._init_issued: dict[str, asyncio.Future[None]] = {}

    def reserve(self, key: str, tokens: int, bound_tokens: int) -> bool:
        """Reserve the initial allocation of a request whose Encode has not returned yet, so that
        its Init goes out alongside the Encode instead of after it. Only without waiting, and only
        while the blocks so reserved stay within `pool - bound_tokens`, where `bound_tokens` is the
        largest initial allocation a request admitted after its Encode may wait for: such a
        request then always gets its blocks once the transfers under way end, so reservations
        waiting for encoder source blocks can never hold the destination blocks that the holders
        of those source blocks wait for (no deadlock between the two pools). True when reserved."""
        bs = self.pool.block_size
        n = blocks_for_tokens(min(tokens, self.pool.num_blocks * bs), bs)
        limit = self.pool.num_blocks - blocks_for_tokens(
            min(bound_tokens, self.pool.num_blocks * bs), bs
        )
        if key in self._blocks or sum(self._pending.values()) + n > limit:
            return False
        blocks = self.pool.allocator.try_alloc(n)
        if blocks is None:
            return False
        self._blocks[key] = blocks
        self._pending[key] = n
        if not self.carry:
            self._init_issued[key] = asyncio.get_running_loop().create_future()
        return True

    def carry_init(
        self,
        key: str,
        transfer_id: str,
        rank: int,
        rank_count: int,
        progress_tokens: int,
        held_images: tuple[str, ...] = (),
    ) -> CarriedInit:
        """The Init naming `key`'s early blocks, for its Encode to carry; the receive task takes
        it with the blocks and follows the Encode."""
        blocks = self._blocks[key]
        carried = CarriedInit(
            transfer_id,
            rank,
            rank_count,
            blocks,
            len(blocks) * self.pool.block_size,
            progress_tokens,
            held_images,
        )
        self._carried[key] = carried
        return carried

    def take(self, key: str) -> tuple[list[int] | None, CarriedInit | None]:
        """The receive task of `key` takes its early blocks and carried Init (None: it reserves
        its own, or sends its own Init)."""
        return self._blocks.pop(key, None), self._carried.pop(key, None)

    async def init_issued(self, key: str) -> None:
        """Wait until the early Init of `key`, sent on its own, has been issued (or its receive
        ended without one). The Encode then follows it on the same channel: the encoder handles
        the cheap Init first instead of after the Encode's work, and its round can start as soon
        as the payload is encoded (traced: ~0.4 ms of a 64-token request)."""
        fut = self._init_issued.get(key)
        if fut is not None:
            await asyncio.shield(fut)

    def init_sent(self, key: str) -> None:
        """The receive task of `key` issued its Init, or sends none (a dummy rank)."""
        fut = self._init_issued.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def encode_returned(self, key: str) -> None:
        """The Encode of an early-reserved request returned (either way): its blocks no longer
        count against the early budget (it holds encoder source blocks or nothing)."""
        self._pending.pop(key, None)

    def release(self, key: str, *, init_unsent: bool = False) -> None:
        """The request's task ended: give back an early reservation it never took (it was
        cancelled before it ran) and wake whoever waits for its Init. Blocks a carried Init names
        are quarantined for good (the encoder may be told of them, and no task can fence them),
        unless `init_unsent`: no Encode will carry it."""
        blocks = self._blocks.pop(key, None)
        carried = self._carried.pop(key, None)
        self._pending.pop(key, None)
        self.init_sent(key)
        if blocks is None:
            return
        if carried is not None and not init_unsent:
            self.pool.allocator.quarantine(blocks)
            log.warning(
                "request %s: %d early block(s) quarantined until shutdown: its carried Init may "
                "reach the encoder and no receive took them",
                key,
                len(blocks),
            )
        else:
            self.pool.allocator.free(blocks)


class Admission:
    """One attempt of one request, from its reservation to every rank's outcome (rank 0)."""

    def __init__(
        self,
        worker: RankWorker,
        group: RankGroup,
        key: str,
        *,
        initial_tokens: int,
        want_digest: bool,
        encoder: int,
        early_allowed: bool,
        bound_tokens: int,
        fingerprint: str = "",
        images: Sequence[bytes] = (),
    ):
        self.worker = worker
        self.group = group
        self.key = key
        self.initial_tokens = initial_tokens
        self.want_digest = want_digest
        self.encoder = encoder
        self._early_allowed = early_allowed
        self._bound_tokens = bound_tokens
        self.is_early = False
        self.spec: RequestSpec | None = None
        self.outcome_future: asyncio.Future[RankOutcome] | None = None
        self._check_free()  # refused before anything is reserved, claimed or encoded
        # The rows rank 0 holds of the request's images (`images`: their `image_digest`s) under
        # the encoder whose model has `fingerprint`, claimed for this attempt; the receive takes
        # the claim, the caller drops it when the attempt ends before (RankWorker.drop_claim).
        self.held = worker.claim_images(key, fingerprint, images)

    def _check_free(self) -> None:
        if self.key in self.group.views:  # a client id equal to another request's failover key
            raise errors.AlreadyExists(
                f"request_id {errors.shown(self.key)} is already in use (by a failover)"
            )

    def _admit(self) -> None:
        self._check_free()
        self.spec = self.group.admit(
            self.key,
            self.initial_tokens,
            self.want_digest,
            encoder=self.encoder,
            held=self.held,
            encoder_address=self.worker.encoders.views[self.encoder].address,
        )
        self.outcome_future = self.worker.outcome(self.key)

    async def early(self) -> CarriedInit | None:
        """Reserve and admit before the Encode when the pool has room to spare. Returns the Init
        for the Encode to carry; sent on its own instead (not `carry`), it is on its way first."""
        early = self.worker.early
        self.is_early = self._early_allowed and early.reserve(
            self.key, self.initial_tokens, self._bound_tokens
        )
        if not self.is_early:
            return None
        self.worker.telemetry.early_init()
        carried = None
        if early.carry:
            carried = early.carry_init(
                self.key,
                self.worker.transfer_id(self.key),
                self.worker.rank,
                self.worker.rank_count,
                self.worker.progress_tokens,
                self.held,
            )
        try:
            self._admit()
        except BaseException:
            early.release(self.key, init_unsent=True)  # no Encode, no task: the blocks are free
            raise
        if carried is None:
            await early.init_issued(self.key)
        return carried

    def encode_returned(self) -> None:
        self.worker.early.encode_returned(self.key)

    def late(self, initial_tokens: int = 0) -> None:
        """Admit now unless admitted already (early, or size-first once the size was said):
        every rank reserves and Inits in its receive task. `initial_tokens`: the reservation,
        when the size decides it (size-first) rather than the policy's guess."""
        if self.spec is None:
            if initial_tokens:
                self.initial_tokens = initial_tokens
            self._admit()

    async def outcome(self) -> RankOutcome:
        """Every rank's part once the ranks agreed. Shielded: a cancelled Generate must not cancel
        the rank's outcome, which records what every rank did (inspection) once the front door
        ended it (`RankWorker.fail_local`)."""
        assert self.outcome_future is not None  # admitted, early or late
        return await asyncio.shield(self.outcome_future)
