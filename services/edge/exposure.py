"""What this process listens on, read from the kernel, for the start-up log and the warning that
some listeners are wider than `--host`.

Mooncake's handshake and data listeners bind every interface (0.0.0.0 / [::]) whatever address
the engine is given, and version 0.3.13 has no setting to change that; so does torch.distributed's
rendezvous store of a TP group (docs/SECURITY.md). So each process reports what it really listens
on instead of what it was asked to bind.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

log = logging.getLogger(__name__)

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _socket_inodes(pid: int | str) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _address(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # Four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else str(address)


def listening_sockets(pid: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` (default: this one) listens on; [] where
    /proc is missing."""
    inodes = _socket_inodes(pid)
    found = set()
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != _LISTEN or parts[9] not in inodes:
                continue
            host_hex, port_hex = parts[1].split(":")
            found.add((_address(host_hex, v6), int(port_hex, 16)))
    return sorted(found, key=lambda hp: (hp[1], hp[0]))


def is_wildcard(address: str) -> bool:
    return address in ("0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def describe(sockets: list[tuple[str, int]]) -> str:
    return ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in sockets)


def _mooncake_ports() -> range:
    """Where Mooncake picks its ports (its defaults, or MC_MIN_RPC_PORT / MC_MAX_RPC_PORT)."""
    try:
        return range(
            int(os.environ.get("MC_MIN_RPC_PORT", 15000)),
            int(os.environ.get("MC_MAX_RPC_PORT", 17000)) + 1,
        )
    except ValueError:
        return range(15000, 17001)


def _guess(address: str, port: int) -> str:
    if is_wildcard(address) and port in _mooncake_ports():
        return "Mooncake data"
    return "other (e.g. gloo between TP ranks)"


def report(role: str, host: str, known: dict[int, str]) -> None:
    """Log what `role` listens on (`known` names ports: gRPC, metrics, Mooncake handshake); WARNING
    when `host` is a loopback address but something listens on every interface."""
    sockets = listening_sockets()
    if not sockets:
        return
    named = ", ".join(f"{known.get(p) or _guess(a, p)} {describe([(a, p)])}" for a, p in sockets)
    log.info("%s listens on: %s", role, named)
    wide = [(a, p) for a, p in sockets if is_wildcard(a)]
    if wide and is_loopback(host):
        log.warning(
            "%s: --host is %s but %s listen(s) on every interface (the Mooncake transfer engine, and "
            "torch.distributed's rendezvous with --tp > 1, bind all interfaces and have no setting for it); "
            "nothing authenticates them: keep these ports reachable only by EPD processes (firewall, "
            "network namespace, NetworkPolicy; docs/SECURITY.md)",
            role,
            host,
            describe(wide),
        )
