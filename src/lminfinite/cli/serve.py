"""`lminfinite serve`: the OpenAI-compatible server (lminfinite.serve) from the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import CliError, memory_arg, new_command, nonneg_int, positive_int

DESCRIPTION = """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics) whose conversations never run out of context: each conversation keeps its bounded
LambdaCache, and a request that extends a kept conversation (same API key) prefills only its new
tokens. Binds 127.0.0.1 unless --host says otherwise; logs no prompt text unless --log-prompts.
API keys: --api-key (repeatable), --api-key-file (one per line) or $LMINFINITE_API_KEY; none: no
authentication and one shared session space. --memory adds block memory: each session also keeps the tokens
that left its window in blocks (its own store; /metrics shows lminfinite_store_bytes), and each token attends
the few blocks that match it best."""

EPILOG = """examples:
  lminfinite serve --model smollm2 --n-local 8192 --api-key KEY
  lminfinite serve --model stories260K --n-local 64 --port 8001 --max-sessions 8
  lminfinite serve --model smollm2 --n-local 512 --memory 16:128:int8
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY'); \\
print(c.chat.completions.create(model='smollm2', messages=[{'role': 'user', 'content': 'Hi'}]))\""""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def port_arg(text: str) -> int:
    value = nonneg_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return value


def add_command(sub, model_options) -> None:
    p = new_command(
        sub,
        "serve",
        "OpenAI-compatible server with conversations that outlive the window",
        DESCRIPTION,
        EPILOG,
        [model_options],
        run_serve,
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=port_arg, default=8000, help="TCP port (0: any free port)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accepted API key (repeatable)")
    g.add_argument("--api-key-file", metavar="FILE", help="file with accepted API keys, one per line")
    g.add_argument("--served-model-name", help="model id clients send (default: --model, or a file's stem)")
    g.add_argument("--log-prompts", action="store_true", help="log prompt text (off: only sizes and timings)")
    g.add_argument(
        "--memory",
        nargs="?",
        const="",
        metavar="K:BS:DTYPE:SCOPE",
        type=memory_arg,
        help="block memory per session: each token also attends the K best blocks of BS tokens that left the "
        "window, stored as DTYPE (float16, float32, int8), chosen for all heads of a layer (SCOPE shared) or per kv "
        "head (heads); --memory alone: 8:128:float16:shared",
    )
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    g.add_argument(
        "--threads",
        type=positive_int,
        help="torch intra-op threads (default: torch's choice; on a small or busy CPU, 1 can be much faster)",
    )
    s = p.add_argument_group("sessions and limits")
    s.add_argument("--max-sessions", type=nonneg_int, default=64, help="kept conversations, all keys together")
    s.add_argument("--max-cache-mb", type=positive_float, default=1024.0, help="memory budget of all kept caches")
    s.add_argument(
        "--max-sessions-per-key",
        type=nonneg_int,
        help="kept conversations per API key (default: --max-sessions shared evenly among the keys)",
    )
    s.add_argument(
        "--max-cache-mb-per-key",
        type=positive_float,
        help="cache memory per API key (default: --max-cache-mb shared evenly among the keys)",
    )
    s.add_argument("--no-session-reuse", action="store_true", help="prefill every prompt in full (a baseline)")
    s.add_argument("--max-concurrency", type=positive_int, default=16, help="requests in flight; 429 beyond")
    s.add_argument(
        "--max-long-prompts",
        type=positive_int,
        default=2,
        help="prompts of more than a quarter of --max-prompt-tokens characters tokenized at once; 429 beyond",
    )
    s.add_argument("--max-tokens-cap", type=positive_int, default=2048, help="largest max_tokens (chat default)")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=131072, help="largest prompt, whole history")
    s.add_argument("--max-body-mb", type=positive_float, default=16.0, help="largest request body")
    s.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request")
    s.add_argument(
        "--read-timeout",
        type=positive_float,
        default=30.0,
        help="seconds to receive a request's head, and again its body (408 beyond)",
    )
    s.add_argument(
        "--max-connections", type=positive_int, default=256, help="open HTTP connections (503 and closed beyond)"
    )
    s.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=10.0,
        help="on SIGTERM or Ctrl-C, seconds open requests get before they end with a 503 (streams: an error event)",
    )
    s.add_argument(
        "--step-tokens",
        type=positive_int,
        default=256,
        help="most prompt tokens one request feeds per forward before the next request's turn (round-robin)",
    )


def api_keys(args) -> tuple[str, ...]:
    keys = list(args.api_key)
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        try:
            keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--api-key-file {path}: {e}") from None
    if not keys and os.environ.get("LMINFINITE_API_KEY", "").strip():
        keys.append(os.environ["LMINFINITE_API_KEY"].strip())
    if any(not k.strip() for k in keys):
        raise CliError("--api-key must not be empty")
    return tuple(k.strip() for k in keys)


def run_serve(args) -> int:
    import logging

    try:
        from ..serve.app import create_app
        from ..serve.runner import make_server
    except ImportError as e:
        from ..eval.errors import MissingDependency

        raise MissingDependency(f"serve needs the 'serve' extra: pip install 'lminfinite[serve]' ({e})") from e
    import lminfinite

    from ..serve.config import ServeConfig
    from ..serve.runner import served_name
    from . import _say, _setup

    keys = api_keys(args)
    try:
        config = ServeConfig(
            model_name=args.served_model_name or served_name(args.model),
            api_keys=keys,
            max_sessions=args.max_sessions,
            max_cache_mb=args.max_cache_mb,
            max_sessions_per_key=args.max_sessions_per_key,
            max_cache_mb_per_key=args.max_cache_mb_per_key,
            max_concurrency=args.max_concurrency,
            max_long_prompts=args.max_long_prompts,
            max_tokens_cap=args.max_tokens_cap,
            max_prompt_tokens=args.max_prompt_tokens,
            max_body_mb=args.max_body_mb,
            request_timeout=args.request_timeout,
            read_timeout=args.read_timeout,
            max_connections=args.max_connections,
            shutdown_grace=args.shutdown_grace,
            step_tokens=min(args.step_tokens, args.chunk_size),
            session_reuse=not args.no_session_reuse,
            log_prompts=args.log_prompts,
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        _say(f"lminfinite: warning: serving on {args.host} without an API key: anyone who can reach it can use it")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, _ = _setup(args)
    try:
        lminfinite.enable(model, n_global=args.n_global, n_local=args.n_local, memory=args.memory)
    except ValueError as e:
        raise CliError(str(e)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(model, tokenizer, config)
    _say(
        f"lminfinite serve: {config.model_name} (G={args.n_global}, L={args.n_local}"
        + (f", block memory {args.memory.blocks} x {args.memory.block_size}" if args.memory else "")
        + f") on http://{args.host}:{args.port}/v1"
        f" ({'API key required' if keys else 'no API key'})"
    )
    # on SIGTERM or Ctrl-C, requests still running near the end of --shutdown-grace end with a 503 (an error
    # event and [DONE] for a stream), never cut off
    try:
        make_server(app, args.host, args.port, args.log_level, access_log=False).run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it deferred once it has shut down (as uvicorn.run ignores)
        pass
    return 0
