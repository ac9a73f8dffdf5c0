"""The `epd` command: encoder | language | demo | status | health.

Flags are generated from the config dataclasses (common/config.py), so every setting has a flag
`--some-name` and an environment variable `EPD_SOME_NAME`; flags win over the environment.
Unknown `EPD_*` variables are rejected at start-up, naming the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import typing

from common.config import ConfigError, EncoderConfig, LanguageConfig
from common.errors import EpdError
from services.parts import Parts

if typing.TYPE_CHECKING:
    from services.encoder.service import EncoderService
    from services.language.service import LanguageService

ENV_PREFIX = "EPD_"
CONFIGS = {"encoder": EncoderConfig, "language": LanguageConfig}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(cls, f: dataclasses.Field):
    return typing.get_type_hints(cls)[f.name]


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = _field_type(cls, f)
        help_text = f"{meta.get('help', '')} (env {_env(f.name)}; default {f.default!r})"
        if kind is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif meta.get("repeat"):
            parser.add_argument(
                _flag(f.name), dest=f.name, action="append", default=None, help=help_text
            )
        else:
            conv = {int: int, float: float}.get(kind, str)
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                type=conv,
                default=None,
                choices=meta.get("choices"),
                help=help_text,
            )


def _parse_env_value(cls, f: dataclasses.Field, raw: str):
    kind = _field_type(cls, f)
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if f.metadata.get("repeat"):
            return tuple(v for v in raw.split(",") if v)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(
            f"{_env(f.name)}={raw!r}: not a valid {getattr(kind, '__name__', kind)}"
        ) from None


def known_env_names() -> set[str]:
    names = {_env(f.name) for cls in CONFIGS.values() for f in dataclasses.fields(cls)}
    return names


def build_config(cls, args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None):
    """Flags win over EPD_* variables, which win over defaults; then validate()."""
    environ = os.environ if environ is None else environ
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known_env_names())
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]} in the environment (known: {sorted(known_env_names())})"
        )
    values = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = tuple(given) if f.metadata.get("repeat") else given
        elif _env(f.name) in environ:
            values[f.name] = _parse_env_value(cls, f, environ[_env(f.name)])
    config = cls(**values)
    config.validate()
    return config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _event_loop_policy(kind: str = "auto") -> str:
    """Install uvloop's policy unless told not to; the name of the loop that will run."""
    if kind == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ConfigError("event_loop='uvloop': uvloop is not installed") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(role: str, config, parts: Parts) -> int:
    from services.edge import rpc

    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)

    service: EncoderService | LanguageService
    extra = {}
    if role == "encoder":
        from services.encoder.service import EncoderService

        service = EncoderService(config, parts=parts)
    else:
        from services.language.service import LanguageService

        if config.rank != 0:
            from services.language.ranks import run_rank

            return await run_rank(config, parts)
        service = LanguageService(config, parts=parts)
    stop = rpc.termination_event()
    try:
        await service.start()
        if role == "language":
            assert isinstance(service, LanguageService)
            extra = {"tp": config.tp, "rank_pids": service.rank_pids}
        assert service.transport is not None  # start() made it
        rpc.announce_ready(
            role=role,
            port=service.port,
            host=config.host,
            session=service.transport.session,
            metrics_port=service.metrics_port,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            pool_blocks=config.pool_blocks,
            block_size=config.block_size,
            record_bytes=service.pool.record.record_bytes,
            **extra,
        )
        await stop.wait()
        logging.getLogger(role).info("%s: termination signal, shutting down", role)
    finally:
        await service.shutdown()
    return 0


def _run_service(role: str, args: argparse.Namespace, parts: Parts) -> int:
    try:
        config = build_config(CONFIGS[role], args)
    except ConfigError as e:
        print(f"epd {role}: invalid setting: {e}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    try:
        loop_kind = _event_loop_policy(config.event_loop)
    except ConfigError as e:
        print(f"epd {role}: invalid setting: {e}", file=sys.stderr)
        return 2
    logging.getLogger(role).info("starting %s on %s", role, loop_kind)
    try:
        return asyncio.run(_serve(role, config, parts))
    except EpdError as e:
        print(f"epd {role}: {e.message}", file=sys.stderr)
        return 1


def make_parser() -> argparse.ArgumentParser:
    from services.tools import demo, status

    parser = argparse.ArgumentParser(prog="epd", description="EPD embedding transfer services")
    sub = parser.add_subparsers(dest="command", required=True)
    for role, cls in CONFIGS.items():
        p = sub.add_parser(role, help=f"run the {role} service", description=cls.__doc__)
        add_config_arguments(p, cls)
    p = sub.add_parser(
        "demo",
        help="start an encoder and a language service on loopback and verify a mixed workload",
    )
    demo.add_arguments(p)
    p = sub.add_parser(
        "bench", help="measure the performance yardsticks as ratios against raw Mooncake writes"
    )
    from services.tools import bench

    bench.add_arguments(p)
    p = sub.add_parser(
        "status", help="show a service's transfers and pool, or one transfer in detail"
    )
    status.add_status_arguments(p)
    p = sub.add_parser(
        "health", help="ask a service's grpc.health.v1 status; exit 0 only when SERVING"
    )
    status.add_health_arguments(p)
    return parser


def main(argv: list[str] | None = None, *, parts: Parts | None = None) -> int:
    """Run `epd`. `parts`: what the services build through the seam (services/parts.py); only
    a test harness passes one."""
    args = make_parser().parse_args(argv)
    if args.command in CONFIGS:
        return _run_service(args.command, args, parts or Parts())
    if args.command == "demo":
        from services.tools import demo

        _event_loop_policy()
        return demo.run(args)
    if args.command == "bench":
        from services.tools import bench

        _event_loop_policy()
        return bench.run(args)
    if args.command in ("status", "health"):
        from services.tools import status

        return status.run_status(args) if args.command == "status" else status.run_health(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
