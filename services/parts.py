"""The parts a service builds that a harness may replace from outside: the one seam.

Production runs with `Parts()`: Mooncake engines, the encoder links and the prefill consumer as
configured, rank processes started with `epd language`. Two harnesses replace parts, and nothing
else in the services knows about either:

- the fast protocol tests give both services in-process transports (memcpy between registered
  buffers) instead of Mooncake engines;
- the fault-injection launcher of the tests wraps transports, links and the consumer, holds
  blocks, and answers encoder names from a file (a scaled Kubernetes Service, without DNS), to
  provoke what cannot be arranged from outside a process.

No setting selects a part: a `Parts` other than the default exists only in code that builds one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.transport import MooncakeTransport

if TYPE_CHECKING:
    from services.language.worker import RankWorker


def mooncake_transport(host: str, protocol: str, device: str, *, purpose: str, **options: Any):
    """A Mooncake engine of this process. `purpose` says what it is for: `writes` (the encoder's
    data plane), `proofs` (the encoder's reads of Register proofs) or `pool` (a language rank's);
    `options` are `MooncakeTransport`'s keyword arguments."""
    del purpose  # every production engine is built the same way
    return MooncakeTransport(host, protocol, device, **options)


def _same(part: Any, rank: int) -> Any:
    del rank
    return part


def _nothing(worker: RankWorker) -> None:
    del worker


def _lookup(address: str) -> list[str]:
    from services.language.encoders import lookup  # the language's part: imported when used

    return lookup(address)


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a service builds through this seam (the defaults are production's)."""

    make_transport: Callable[..., MooncakeTransport] = mooncake_transport
    """Builds each transport the process uses (see `mooncake_transport` for the arguments);
    called in a worker thread, since an engine's start-up blocks."""

    wrap_link: Callable[[Any, int], Any] = _same
    """Applied to every encoder link a language rank builds: `(link, rank) -> link`."""

    wrap_consumer: Callable[[Any, int], Any] = _same
    """Applied to a language rank's prefill consumer: `(consumer, rank) -> consumer`."""

    on_rank_started: Callable[[RankWorker], None] = _nothing
    """Called once a language rank registered its pool and found its encoders."""

    resolve: Callable[[str], list[str]] = _lookup
    """How a language instance looks an encoder's `name:port` up: every `ip:port` it resolves to
    ([] when it does not), at start-up and again every `resolve_every_s`."""

    resolve_every_s: float = 10.0
    """How often rank 0 looks its encoders' DNS names up again."""

    rank_command: tuple[str, ...] = ("-m", "services.tools.cli")
    """How rank 0 of a multi-rank language instance starts ranks 1..tp-1: the Python interpreter
    runs these arguments, then `language` and the rank's flags."""
