"""`epd demo`'s flags: definitions (each also read from `EPD_<FLAG>`), checks, and what they imply."""

from __future__ import annotations

import argparse
import os
from typing import Any

from services.tools import reference_payload
from services.tools.supervise import add_process_arguments

KINDS = ("multi10", "small", "boundary", "medium")
"""Request kinds, in the order the workload cycles through them (longest first, so the big
requests start early and the wall time stays short)."""


KIND_DESCRIPTIONS = {
    "small": "far below the initial allocation (1-500 tokens)",
    "boundary": "at / just around the initial allocation",
    "multi10": "larger than 10x the language pool (>= 10 rounds)",
    "medium": "2-4 rounds",
    "image": "generated PNG/JPEG images, the tiny Qwen model + prefill",
}


DTYPE_CHOICES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


BOUNDARY_OFFSETS = (0, 1, 5, -1, 2, "block")
"""Offsets from the initial allocation, cycled through by the `boundary` requests."""


def _env_default(flag: str, default: Any) -> Any:
    """`EPD_<FLAG_NAME>` from the environment, else `default` (every flag reads its env
    variable; a command-line flag wins). argparse converts string defaults with `type=`."""
    return os.environ.get("EPD_" + flag.lstrip("-").replace("-", "_").upper(), default)


def _env_flag(flag: str) -> bool:
    value = os.environ.get("EPD_" + flag.lstrip("-").replace("-", "_").upper(), "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `epd demo` flags to `parser`. Every flag also reads `EPD_<FLAG>`."""
    d = _env_default
    parser.add_argument(
        "--requests",
        type=_positive_int,
        default=d("--requests", 24),
        help="number of requests to send (default 24); any value >= 4 covers every request kind",
    )
    parser.add_argument(
        "--tp",
        type=_positive_int,
        default=d("--tp", 1),
        help="language tensor-parallel ranks (only 1 for now)",
    )
    parser.add_argument(
        "--encoders",
        type=_positive_int,
        default=d("--encoders", 1),
        help="number of encoder instances (1 to 8); the language spreads requests over them",
    )
    parser.add_argument(
        "--kill-encoder-after",
        type=float,
        default=d("--kill-encoder-after", 0.0),
        metavar="S",
        help="SIGKILL the last encoder S seconds into the workload (0 = never; needs --encoders >= 2): "
        "requests fail over to the others, the summary counts failed-over and failed requests",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=_env_flag("--json"),
        help="print one JSON object on stdout instead of the table",
    )
    parser.add_argument(
        "--hidden",
        type=_positive_int,
        default=d("--hidden", 256),
        help="embedding width = the tiny model's hidden size (default 256, so the "
        "prefill of many-thousand-token image requests stays fast on a CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=d("--dtype", "bfloat16"),
        help="embeddings dtype (default bfloat16)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive_int,
        default=d("--block-size", 128),
        help="tokens per block (default 128)",
    )
    parser.add_argument(
        "--initial-tokens",
        type=_positive_int,
        default=d("--initial-tokens", 8192),
        help="language initial allocation in tokens (default 8192)",
    )
    parser.add_argument(
        "--language-pool-blocks",
        type=_positive_int,
        default=d("--language-pool-blocks", 96),
        help="language pool size in blocks (default 96 = 12288 tokens at "
        "block size 128, so the big requests exceed the whole pool)",
    )
    parser.add_argument(
        "--encoder-pool-blocks",
        type=_positive_int,
        default=d("--encoder-pool-blocks", 4096),
        help="encoder source pool size in blocks (default 4096)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=d("--concurrency", 8),
        help="requests in flight at once (default 8)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=d("--seed", 1),
        help="seed of the workload mix and the synthetic payload seeds",
    )
    parser.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=d("--startup-timeout", 60.0),
        help="seconds to wait for each service to report ready (default 60)",
    )
    parser.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=d("--request-timeout", 300.0),
        help="deadline of each Generate call in seconds (default 300)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        default=_env_flag("--no-progress"),
        help="no progress bar (it is only drawn when stderr is a terminal)",
    )
    parser.add_argument(
        "--log-dir",
        default=d("--log-dir", None),
        help="keep the services' stderr logs in this directory "
        "(default: temporary files, shown on failure)",
    )
    parser.add_argument(
        "--model",
        default=d("--model", "tiny"),
        help="'tiny' (default): both services run a small seeded Qwen2-VL and image "
        "requests are added; 'tiny-qwen3': the same with a small seeded Qwen3-VL (3 "
        "deepstack fields per token); 'none': synthetic requests only (null consumer); "
        "PATH: a local Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (GPU hosts; --hidden "
        "must match it)",
    )
    parser.add_argument(
        "--image-requests",
        type=_non_negative_int,
        default=d("--image-requests", 6),
        help="requests with generated images (default 6; none with --model none)",
    )
    parser.add_argument(
        "--conversation-turns",
        type=_non_negative_int,
        default=d("--conversation-turns", 4),
        help="after the workload, a chat of this many turns over the same images, each turn "
        "beside a cold twin (same pixels, new bytes): hit rate, time saved, bytes not sent "
        "(default 4; 0 or --model none: none)",
    )
    add_process_arguments(
        parser, encoder_example="--model=tiny", language_example="--alloc-policy=fixed"
    )
    from services.edge import security

    security.add_client_arguments(parser)  # used by the demo's client and passed to both services


def validate_args(args: argparse.Namespace) -> str | None:
    """An error message for flags the demo cannot run with, else None."""
    if not 1 <= args.tp <= 8:
        return f"--tp {args.tp}: the demo runs 1 to 8 language ranks"
    if not 1 <= args.encoders <= 8:
        return f"--encoders {args.encoders}: the demo runs 1 to 8 encoders"
    if getattr(args, "kill_encoder_after", 0) and args.encoders < 2:
        return "--kill-encoder-after needs --encoders 2 or more (someone must take over)"
    try:
        reference_payload.canonical_dtype(args.dtype)
    except ValueError as e:
        return str(e)
    return None


def demo_env_names() -> set[str]:
    """The `EPD_*` variables that `epd demo`'s own flags read."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {
        "EPD_" + opt[2:].replace("-", "_").upper()
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }


def uses_model(args: argparse.Namespace) -> bool:
    """Whether the services run a Qwen model (`--model tiny`, `tiny-qwen3` or a checkpoint), not
    just synthetic payloads."""
    return getattr(args, "model", "none") not in ("none", "", "bytes")


def service_dtype(args: argparse.Namespace) -> str:
    return reference_payload.canonical_dtype(args.dtype)
