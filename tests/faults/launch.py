"""Test-only entry point: start a service as `epd` does, with faults injected from outside.

    python -m tests.faults.launch [--transport-fault SPEC] [--fault SPEC] [--resolve-file PATH]
        encoder|language FLAGS...

The faults go in through the one seam of the services (`services.parts.Parts`):
- `--transport-fault` (tests/faults/transport.py) wraps the encoder's data-plane transport, and
  with `misplan_nth` corrupts the K-th planned write before the encoder's address check;
- `--fault` (tests/faults/rank.py) makes a language rank's Status streams lag or repeat, holds
  pool blocks at start-up, or holds each payload in the consumer and checks it did not change;
- `--resolve-file` answers encoder names from a JSON file `{"name:port": ["ip:port", ...]}`,
  read again at every look-up (every 0.5 s): a test rewrites it to scale a "Service" up or
  down without DNS. Names not in the file are looked up as usual.

Ranks 1..tp-1 of a language instance are started through this launcher too, with the same
faults (`rank=N` in `--fault` picks the rank they apply to). A bad spec exits 2, naming it.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.config import ConfigError
from services.encoder import transfer
from services.language.encoders import lookup
from services.language.held_images import HeldImages
from services.parts import Parts, mooncake_transport
from services.tools import cli
from tests.faults.rank import FaultSpec, FaultyLink, HoldingConsumer
from tests.faults.transport import FaultyTransport, TransportFaultSpec

MODULE = "tests.faults.launch"


def _misplanning(plan_round, misplan):
    """`plan_round` whose result goes through `misplan` (FaultyTransport.plan_fault)."""

    def planned(**kwargs):
        return misplan(plan_round(**kwargs))

    return planned


def file_resolver(path: str):
    """A `Parts.resolve` answering from the JSON file at `path` (see the module docstring)."""

    def resolve(address: str) -> list[str]:
        with open(path) as f:
            table = json.load(f)
        return list(table[address]) if address in table else lookup(address)

    return resolve


def build_parts(transport_fault: str = "", fault: str = "", resolve_file: str = "") -> Parts:
    """The parts of a service with these faults (ConfigError naming a bad spec)."""
    transport_spec = TransportFaultSpec.parse(transport_fault) if transport_fault else None
    rank_spec = FaultSpec.parse(fault) if fault else FaultSpec()

    def make_transport(host, protocol, device, *, purpose, **options):
        inner = mooncake_transport(host, protocol, device, purpose=purpose, **options)
        if purpose != "writes" or transport_spec is None or not transport_spec.active:
            return inner  # the encoder's proof reads and the language's pools stay healthy
        faulty = FaultyTransport(inner, transport_spec)
        if faulty.plan_fault is not None:
            transfer.plan_round = _misplanning(transfer.plan_round, faulty.plan_fault)
        return faulty

    def wrap_link(link, rank):
        lags = rank_spec.status_lag_s or rank_spec.status_dup
        return FaultyLink(link, rank_spec) if lags and rank_spec.applies_to(rank) else link

    def wrap_consumer(consumer, rank):
        if rank_spec.hold_payload_s and rank_spec.applies_to(rank):
            return HoldingConsumer(consumer, rank_spec.hold_payload_s, rank)
        return consumer

    held: list[list[int]] = []  # taken for good: the pool is gone with the process

    def on_rank_started(worker):
        if rank_spec.hold_blocks and rank_spec.applies_to(worker.rank):
            held.append(worker.pool.allocator.try_alloc(rank_spec.hold_blocks) or [])
        if rank_spec.forget_images and rank_spec.applies_to(worker.rank):
            worker.held = HeldImages(0, worker.pool.record)

    command = ("-m", MODULE)
    if transport_fault:
        command += ("--transport-fault", transport_fault)
    if fault:
        command += ("--fault", fault)
    if resolve_file:
        command += ("--resolve-file", resolve_file)
    return Parts(
        make_transport=make_transport,
        wrap_link=wrap_link,
        wrap_consumer=wrap_consumer,
        on_rank_started=on_rank_started,
        rank_command=command,
        **(
            {"resolve": file_resolver(resolve_file), "resolve_every_s": 0.5} if resolve_file else {}
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE, add_help=False)
    parser.add_argument("--transport-fault", default="")
    parser.add_argument("--fault", default="")
    parser.add_argument("--resolve-file", default="")
    faults, rest = parser.parse_known_args(argv)
    try:
        parts = build_parts(faults.transport_fault, faults.fault, faults.resolve_file)
    except ConfigError as e:
        print(f"{MODULE}: invalid fault: {e}", file=sys.stderr)
        return 2
    return cli.main(rest, parts=parts)


if __name__ == "__main__":
    sys.exit(main())
