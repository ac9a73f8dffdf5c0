"""`epd demo`: start an encoder and a language service on loopback, send a mixed workload in
which some requests need many transfer rounds, verify every byte, print a summary.

With `--model tiny` (the default) both services run a small seeded Qwen2-VL (`tiny-qwen3`: a
Qwen3-VL, whose payloads carry three deepstack fields) and the workload adds
requests with real images the demo generates; their token counts are checked against the
image-size rule recomputed here (`_images`). Synthetic payloads are checked against
`services.tools.reference_payload`, an independent numpy implementation.

One module per concern: `_flags`, `_workload`, `_images`, `_client`, `_results`, `_report`, `_run`;
the service processes are `services.tools.supervise`'s. `services/tools/cli.py` uses
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

from services.tools.demo._client import event_loop_runner, run_workload
from services.tools.demo._flags import (
    BOUNDARY_OFFSETS,
    DTYPE_CHOICES,
    KIND_DESCRIPTIONS,
    KINDS,
    add_arguments,
    demo_env_names,
    service_dtype,
    uses_model,
    validate_args,
)
from services.tools.demo._images import (
    IMAGE_PLACEHOLDER,
    QWEN2_TOKENS,
    QWEN3_TOKENS,
    TokenRule,
    expected_image_request_tokens,
    make_image,
    qwen_image_tokens,
    token_rule,
)
from services.tools.demo._report import Progress, format_failures, format_table
from services.tools.demo._results import (
    RequestResult,
    check_image_reply,
    check_reply,
    percentile,
    summarize,
    verify_results,
)
from services.tools.demo._run import _run, encoder_argv, language_argv, run
from services.tools.demo._workload import (
    IMAGE_SET,
    PlannedRequest,
    image_payloads,
    initial_allocation_tokens,
    min_rounds,
    plan_images,
    plan_workload,
)

__all__ = [
    "BOUNDARY_OFFSETS",
    "DTYPE_CHOICES",
    "IMAGE_PLACEHOLDER",
    "IMAGE_SET",
    "KINDS",
    "KIND_DESCRIPTIONS",
    "PlannedRequest",
    "Progress",
    "QWEN2_TOKENS",
    "QWEN3_TOKENS",
    "TokenRule",
    "RequestResult",
    "ServiceProcess",
    "ServiceStartError",
    "_run",
    "add_arguments",
    "check_image_reply",
    "check_reply",
    "child_env",
    "demo_env_names",
    "encoder_argv",
    "event_loop_runner",
    "expected_image_request_tokens",
    "format_failures",
    "format_table",
    "image_payloads",
    "initial_allocation_tokens",
    "language_argv",
    "make_image",
    "min_rounds",
    "parse_ready_line",
    "percentile",
    "plan_images",
    "plan_workload",
    "qwen_image_tokens",
    "token_rule",
    "run",
    "run_workload",
    "service_dtype",
    "summarize",
    "uses_model",
    "validate_args",
    "verify_results",
]
