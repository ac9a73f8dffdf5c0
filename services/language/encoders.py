"""One language rank's set of encoders: a link per encoder, registration with each,
and (rank 0) the live view the front door picks from.

Every rank of an instance holds the same ordered list of encoder addresses (rank 0 expands DNS
names before it starts the other ranks and hands them the expanded list), so an admission can
name its encoder by index. Each rank registers with every encoder at start-up, in the
background: start-up waits for one registration, an encoder that is down keeps being retried
and joins the rotation once it answers. Rank 0 polls every encoder every `POLL_S` (health
Check, GetPool, GetDiagnostics) into `EncoderView`s (services/language/selection.py); an
encoder that is NOT_SERVING or unreachable leaves the rotation until a poll finds it SERVING.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

from common import errors
from common.layout import PoolGeometry
from common.states import FailureReason
from services.language.encoder_link import GrpcEncoderLink, Prove
from services.language.selection import EncoderSelector, EncoderView, ImageAffinity

log = logging.getLogger(__name__)

POLL_S = 0.5
POLL_TIMEOUT_S = 1.0
REGISTER_RETRY_S = 1.0
RESOLVE_S = 10.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def lookup(address: str, getaddrinfo: Callable = socket.getaddrinfo) -> list[str]:
    """Every IPv4 `ip:port` the host of `address` resolves to, sorted; [] when it does not
    resolve; an IP literal is itself."""
    host, port = split_address(address)
    if _is_ip(host):
        return [address]
    try:
        infos = getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return [f"{ip}:{port}" for ip in sorted({info[4][0] for info in infos})]


def resolve_addresses(
    addresses: Sequence[str], resolve: Callable[[str], list[str]] = lookup
) -> tuple[list[str], list[str]]:
    """Expand every `name:port` whose name resolves to several IPv4 addresses (e.g. a compose
    service scaled with `--scale encoder=N`: one DNS name, N A records) into one `ip:port` per
    address, in sorted order; IP literals and names with one address stay as given; a name that
    does not resolve stays too (the link keeps trying). Returns (addresses, DNS names): every
    name given (expanded or not), for `EncoderDirectory` to look up again."""
    out: list[str] = []
    names: list[str] = []
    for address in addresses:
        ips = [address] if _is_ip(split_address(address)[0]) else resolve(address)
        if not _is_ip(split_address(address)[0]):
            names.append(address)
        if len(ips) > 1:
            out.extend(ip for ip in ips if ip not in out)
        elif address not in out:
            out.append(address)
    return out, names


class EncoderDirectory:
    """Links, registrations and (rank 0) the live view of every encoder of one rank."""

    def __init__(
        self,
        addresses: Sequence[str],
        language_id: str,
        *,
        policy: str = "least-loaded",
        wrap: Callable = lambda link: link,
        dns_names: Sequence[str] = (),
        sec=None,
        resolve: Callable[[str], list[str]] = lookup,
        resolve_every_s: float = RESOLVE_S,
    ):
        if not addresses:
            raise errors.InvalidArgument("encoder: at least one --encoder host:port is required")
        self.language_id = language_id
        self._sec = sec  # services.edge.security.ClientSecurity of every link (None: plaintext)
        self._wrap = wrap
        self.links: list = []
        self.views: list[EncoderView] = []
        self.selector = EncoderSelector(policy)
        self.affinity = ImageAffinity()  # rank 0: which encoder had which images encoded
        self.dns_names = list(dns_names)
        self._resolve = resolve
        self._resolve_every_s = resolve_every_s
        self._tasks: list[asyncio.Task] = []
        self._registration: tuple[int, str, PoolGeometry, Prove] | None = (
            None  # (rank, session, geometry, prove): GrpcEncoderLink.register
        )
        self._registered: asyncio.Event | None = None  # made by start() (needs the running loop)
        self._watch = False
        for address in addresses:
            self._add(address)

    def _add(self, address: str) -> int:
        index = len(self.links)
        self.links.append(self._wrap(GrpcEncoderLink(address, self.language_id, self._sec)))
        self.views.append(EncoderView(index, address))
        return index

    @property
    def available(self) -> int:
        return sum(1 for v in self.views if v.selectable)

    def name(self, index: int) -> str:
        link = self.links[index]
        return link.encoder_id or link.address

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self,
        rank: int,
        session: str,
        geometry: PoolGeometry,
        prove: Prove,
        *,
        watch: bool,
        timeout: float = 60.0,
    ) -> None:
        """Register with every encoder (in the background); return once one registration
        succeeded (Unavailable naming every address after `timeout`). `watch`: poll the live view."""
        self._registration = (rank, session, geometry, prove)
        self._registered = asyncio.Event()
        self._watch = watch
        for index in range(len(self.links)):
            self._spawn(index)
        if watch and self.dns_names:
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._resolve_loop(), name="encoder-dns")
            )
        try:
            await asyncio.wait_for(self._registered.wait(), timeout)
            if not any(v.registered for v in self.views):  # every encoder refused our layout
                problems = "; ".join(f"{v.address}: {v.last_error}" for v in self.views)
                await self.close()
                raise errors.FailedPrecondition(
                    f"every encoder refused this instance's registration ({problems})"
                )
        except TimeoutError:
            problems = "; ".join(f"{v.address}: {v.last_error or 'no answer'}" for v in self.views)
            await self.close()
            raise errors.Unavailable(
                f"no encoder could be registered with within {timeout:.0f} s ({problems})"
            ) from None

    def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(
            loop.create_task(self._register_loop(index), name=f"encoder-register-{index}")
        )
        if self._watch:
            self._tasks.append(
                loop.create_task(self._poll_loop(index), name=f"encoder-watch-{index}")
            )

    async def _register_loop(self, index: int) -> None:
        view, link = self.views[index], self.links[index]
        reported = False
        while True:
            # start() set both before it spawned this loop
            assert self._registration is not None and self._registered is not None
            try:
                await link.register(*self._registration, timeout=max(REGISTER_RETRY_S, 2.0))
                view.registered = True
                view.available = True  # it just answered; the next poll says more
                view.last_error = ""
                self._registered.set()
                if reported:
                    log.info("encoder %s is reachable again: registered", view.address)
                return
            except (
                errors.FailedPrecondition,
                errors.Unauthenticated,
                errors.PermissionDenied,
            ) as e:
                # layout mismatch, wrong token, a pool the encoder cannot read our proof from: final
                view.last_error = e.message
                view.refused = True
                log.error("encoder %s refused our registration: %s", view.address, e.message)
                if all(v.refused for v in self.views):
                    self._registered.set()  # nothing left to wait for: start() reports the refusals
                return
            except errors.EpdError as e:
                view.last_error = e.message
                if not reported:
                    log.warning(
                        "encoder %s: not registered yet (%s); retrying in the background",
                        view.address,
                        e.message,
                    )
                    reported = True
            await asyncio.sleep(REGISTER_RETRY_S)

    async def _poll_loop(self, index: int) -> None:
        view, link = self.views[index], self.links[index]
        while not view.retired:
            inflight_before = view.inflight
            try:
                serving, free, used, waiters, live = await link.load(POLL_TIMEOUT_S)
                was = view.available
                view.available = serving
                if serving:
                    view.free_blocks, view.used_blocks, view.waiters = free, used, waiters
                    view.live_transfers, view.inflight_at_poll = live, inflight_before
                    view.last_error = ""
                else:
                    view.last_error = "NOT_SERVING"
                if was != serving:
                    log.info(
                        "encoder %s %s the rotation (%s)",
                        view.address,
                        "joins" if serving else "leaves",
                        "SERVING" if serving else "NOT_SERVING",
                    )
            except errors.EpdError as e:
                if view.available:
                    log.warning("encoder %s leaves the rotation: %s", view.address, e.message)
                view.available = False
                view.last_error = e.message
            await asyncio.sleep(POLL_S)

    async def _resolve_loop(self) -> None:
        """Rank 0: DNS names (a Kubernetes headless Service, a scaled compose service) are looked
        up again every `resolve_every_s`; new addresses join (registered and watched like the
        others), vanished ones simply stop answering and leave the rotation. A name kept as such
        at start-up (one address then) that now has several is retired in favour of one entry per
        address — its link still finishes the requests it has, but takes no new ones, so no
        encoder is counted twice. The other ranks of the instance learn a new encoder from the
        first admission that names it (`link_for`)."""
        while True:
            await asyncio.sleep(self._resolve_every_s)
            for name in self.dns_names:
                try:
                    found = await asyncio.to_thread(self._resolve, name)
                except Exception as e:  # noqa: BLE001 - a resolver hiccup must not end the loop
                    log.info("re-resolving %s: %s", name, e)
                    continue
                self._resolved(name, found)

    def _resolved(self, name: str, found: Sequence[str]) -> None:
        """Apply one look-up of `name` (see `_resolve_loop`)."""
        by_name = next((v for v in self.views if v.address == name and not v.retired), None)
        if by_name is not None:
            if len(found) <= 1:
                return  # the name's own link reaches its one address
            by_name.retired = True
            by_name.available = False
            log.info(
                "encoder name %s now has %d addresses: one encoder per address from now on",
                name,
                len(found),
            )
        for address in found:
            if address not in (v.address for v in self.views):
                log.info("encoder %s found by DNS (%s)", address, name)
                self._spawn(self._add(address))

    async def link_for(self, address: str, index: int, timeout: float = 30.0):
        """The link to the encoder an admission names: by its address (rank 0 found it, maybe
        after this rank started), else by rank 0's index. An address this rank does not know yet
        joins, registered before it is used (Unavailable when that fails within `timeout`)."""
        if not address or (index < len(self.views) and self.views[index].address == address):
            return self.links[index]  # rank 0, or a rank that knows the same list
        known = next((v.index for v in self.views if v.address == address and not v.retired), None)
        if known is not None:
            return self.links[known]
        assert self._registration is not None  # start() ran before any admission
        index = self._add(address)
        log.info("encoder %s joins (named by an admission)", address)
        link = self.links[index]
        try:
            await link.register(*self._registration, timeout=timeout)
        except errors.EpdError as e:
            self.views[index].last_error = e.message
            self._spawn(index)  # keep trying for the next request
            raise errors.Unavailable(
                f"encoder {address}: this rank could not register with it: {e.message}",
                reason=FailureReason.PEER_LOST,
            ) from None
        self.views[index].registered = self.views[index].available = True
        return link

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for link in self.links:
            await link.close()

    # ------------------------------------------------------------------ selection (rank 0)

    def pick(self, exclude: Sequence[int] = (), images: Sequence[bytes] = ()) -> EncoderView | None:
        """An encoder for a request with these images (by `image_digest`), or None."""
        return self.selector.pick(
            self.views, exclude, self.affinity.held(images) if images else None
        )
