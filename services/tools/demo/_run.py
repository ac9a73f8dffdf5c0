"""`epd demo` itself: start the services, run the workload, verify, print, exit code."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from services.tools import reference_payload
from services.tools.demo._client import event_loop_runner, run_workload
from services.tools.demo._conversation import run_conversation, summarize_conversation
from services.tools.demo._flags import (
    KINDS,
    demo_env_names,
    service_dtype,
    uses_model,
    validate_args,
)
from services.tools.demo._images import token_rule
from services.tools.demo._report import Progress, format_failures, format_table
from services.tools.demo._results import summarize, verify_results
from services.tools.demo._workload import (
    image_payloads,
    initial_allocation_tokens,
    plan_images,
    plan_workload,
)
from services.tools.supervise import ServiceGroup, ServiceStartError, child_env, service_argv


def model_deepstack_levels(args: argparse.Namespace) -> int:
    """Deepstack fields of the payload: the model's (Qwen3-VL: 3), none without a model."""
    if not uses_model(args):
        return 0
    from common.config import describe_model

    return describe_model("--model", args.model, args.hidden).deepstack_levels


def encoder_argv(args: argparse.Namespace) -> list[str]:
    """The command of each encoder the demo starts."""
    return service_argv(
        "encoder",
        "--block-size",
        str(args.block_size),
        "--pool-blocks",
        str(args.encoder_pool_blocks),
        "--hidden",
        str(args.hidden),
        "--dtype",
        service_dtype(args),
        *(["--model", args.model] if uses_model(args) else []),
        *_security_argv(args),
        *getattr(args, "encoder_arg", []),
    )


def language_argv(args: argparse.Namespace, encoders: Sequence[str]) -> list[str]:
    """The command of the language the demo starts, using the encoders at these addresses."""
    return service_argv(
        "language",
        *(flag for address in encoders for flag in ("--encoder", address)),
        "--block-size",
        str(args.block_size),
        "--pool-blocks",
        str(args.language_pool_blocks),
        "--hidden",
        str(args.hidden),
        "--dtype",
        service_dtype(args),
        "--initial-tokens",
        str(args.initial_tokens),
        *(["--tp", str(args.tp)] if getattr(args, "tp", 1) > 1 else []),
        *(
            ["--consumer", token_rule(args.model).consumer, "--model", args.model]
            if uses_model(args)
            else []
        ),
        *_security_argv(args, language=True),
        *getattr(args, "language_arg", []),
    )


def _security_argv(args: argparse.Namespace, *, language: bool = False) -> list[str]:
    """The demo's --tls-* / --auth-token-file flags, for the services it starts."""
    from services.edge import security

    return security.service_argv(args, language=language)


def _note(msg: str) -> None:
    sys.stderr.write(f"epd demo: {msg}\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Run `epd demo`; returns the exit code (0 only when every request succeeded and every
    payload matches the reference, 1 otherwise, 2 for unsupported flags, 130 on Ctrl-C)."""
    return _run(args, encoder_argv=encoder_argv, language_argv=language_argv)


def _run(
    args: argparse.Namespace,
    *,
    encoder_argv: Callable[[argparse.Namespace], list[str]],
    language_argv: Callable[[argparse.Namespace, Sequence[str]], list[str]],
    env: dict[str, str] | None = None,
) -> int:
    error = validate_args(args)
    if error:
        _note(error)
        return 2
    from services.edge import security

    try:
        sec = security.client_from_args(args) if hasattr(args, "tls_ca") else None
    except ValueError as e:
        _note(str(e))
        return 2
    dtype = reference_payload.canonical_dtype(args.dtype)
    pool_tokens = args.language_pool_blocks * args.block_size
    initial = initial_allocation_tokens(
        args.initial_tokens, args.block_size, args.language_pool_blocks
    )
    plan = plan_workload(
        args.requests,
        seed=args.seed,
        block_size=args.block_size,
        initial_tokens=args.initial_tokens,
        language_pool_blocks=args.language_pool_blocks,
        encoder_pool_blocks=args.encoder_pool_blocks,
    )
    n_images = getattr(args, "image_requests", 0) if uses_model(args) else 0
    image_plan = plan_images(
        n_images,
        seed=args.seed,
        first_index=len(plan),
        block_size=args.block_size,
        initial_tokens=args.initial_tokens,
        language_pool_blocks=args.language_pool_blocks,
        exact_tokens=args.model in ("tiny", "tiny-qwen3"),
        rule=token_rule(getattr(args, "model", "none")),
    )
    # The slow image requests start first, the largest first, so the wall time stays short.
    plan = sorted(image_plan, key=lambda p: -p.tokens) + plan
    config = {
        "concurrency": args.concurrency,
        "hidden": args.hidden,
        "dtype": dtype,
        "block_size": args.block_size,
        "language_pool_blocks": args.language_pool_blocks,
        "language_pool_tokens": pool_tokens,
        "initial_tokens": args.initial_tokens,
        "initial_allocation_tokens": initial,
        "encoder_pool_blocks": args.encoder_pool_blocks,
        "seed": args.seed,
        "tp": args.tp,
        "encoders": args.encoders,
        "model": getattr(args, "model", "none"),
        "image_requests": n_images,
    }
    show_progress = not args.no_progress and sys.stderr.isatty()
    env = child_env(drop=demo_env_names()) if env is None else env

    services = ServiceGroup(
        [encoder_argv(args) for _ in range(args.encoders)],
        lambda addresses: language_argv(args, addresses),
        env=env,
        log_dir=args.log_dir,
        ready_timeout=args.startup_timeout,
        on_ready=lambda p, seconds: _note(f"{p.role} ready on {p.address} ({seconds:.1f} s)"),
    )
    old_sigterm = None
    if threading.current_thread() is threading.main_thread():

        def _on_sigterm(signum, frame):
            raise KeyboardInterrupt

        old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        services.start()
        encoders, language = services.encoders, services.language
        assert language is not None

        # ---- workload
        images = {}
        if image_plan:
            t0 = time.monotonic()
            images = {p.request_id: image_payloads(p) for p in image_plan}
            _note(
                f"generated {sum(len(v) for v in images.values())} images for {len(image_plan)} image requests "
                f"({sum(len(d) for v in images.values() for d, _ in v) / 1e6:.1f} MB, "
                f"{time.monotonic() - t0:.1f} s)"
            )
        kinds = ", ".join(
            f"{sum(p.kind == k for p in plan)} {k}"
            for k in (*KINDS, "image")
            if any(p.kind == k for p in plan)
        )
        _note(
            f"sending {len(plan)} requests ({kinds}), {args.concurrency} in flight, "
            f"{sum(p.tokens for p in plan):,} tokens in all"
        )
        progress = Progress(len(plan), enabled=show_progress, label="requests")
        progress.start()
        killer = None
        if getattr(args, "kill_encoder_after", 0) and len(encoders) > 1:
            victim = encoders[-1]

            def kill() -> None:
                if victim.proc is not None and victim.proc.poll() is None:
                    victim.proc.kill()
                    config["killed_encoder"] = victim.address
                    _note(
                        f"killed the encoder on {victim.address} {args.kill_encoder_after:g} s into the workload"
                    )

            killer = threading.Timer(args.kill_encoder_after, kill)
            killer.daemon = True
            killer.start()
        with event_loop_runner() as runner:
            results, wall = runner.run(
                run_workload(
                    language.address,
                    plan,
                    concurrency=args.concurrency,
                    request_timeout=args.request_timeout,
                    block_size=args.block_size,
                    encoder_pool_blocks=args.encoder_pool_blocks,
                    progress=progress,
                    connect_timeout=args.startup_timeout,
                    images=images,
                    sec=sec,
                )
            )
        progress.finish()
        if killer is not None:
            killer.cancel()

        # ---- verification (after the workload, so it does not skew the timings)
        answered = sum(r.rpc_ok for r in results)
        progress.start(label="verify  ", total=answered, fail_label="mismatches")
        verify_results(
            results,
            args.hidden,
            dtype,
            progress=progress,
            deepstack_levels=model_deepstack_levels(args),
        )
        progress.finish()
        for r in results:
            if r.rpc_ok and r.rounds and r.rounds < r.request.min_rounds:
                _note(
                    f"warning: {r.request.request_id} reports {r.rounds} rounds, fewer than "
                    f"the {r.request.min_rounds} its size needs"
                )
        for svc in services.processes:
            if not svc.running():
                _note(
                    f"warning: {svc.role} exited during the demo "
                    f"(code {svc.proc.returncode if svc.proc else '?'})"
                )

        summary = summarize(results, wall, config)
        turns = getattr(args, "conversation_turns", 0) if uses_model(args) else 0
        if turns:
            _note(f"a conversation of {turns} turns over the same images")
            with event_loop_runner() as runner:
                chat = runner.run(
                    run_conversation(
                        language.address,
                        turns,
                        seed=args.seed,
                        request_timeout=args.request_timeout,
                        sec=sec,
                        rule=token_rule(args.model),
                    )
                )
            summary["conversation"] = summarize_conversation(chat)
        if args.json:
            sys.stdout.write(json.dumps(summary, sort_keys=False) + "\n")
        else:
            sys.stdout.write(format_table(summary))
        sys.stdout.flush()
        ok = summary["succeeded"] == summary["requests"] and not (
            summary.get("conversation", {}).get("mismatches")
        )
        if config.get("killed_encoder") and not summary["mismatches"]:
            # Requests that had received bytes from the killed encoder fail (never retried): expected.
            ok = all(r.rpc_ok or r.error_code == "UNAVAILABLE" for r in results)
        if not ok:
            sys.stderr.write(format_failures(results))
            for svc in services.processes:
                tail = svc.stderr_tail(max_lines=15)
                if tail:
                    sys.stderr.write(
                        f"epd demo: {svc.role} stderr (last lines):\n"
                        + "\n".join("    " + s for s in tail.splitlines())
                        + "\n"
                    )
            sys.stderr.flush()
        return 0 if ok else 1
    except ServiceStartError as e:
        _note(str(e))
        return 1
    except KeyboardInterrupt:
        if show_progress:
            sys.stderr.write("\n")
        _note("interrupted; stopping the services")
        return 130
    except TimeoutError:
        _note(f"could not connect to the language service within {args.startup_timeout:g} s")
        return 1
    finally:
        services.stop()
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
