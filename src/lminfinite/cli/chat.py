"""The `lminfinite chat` command: an interactive chat in the terminal, one bounded cache per conversation.

`add_command(sub, model_options)` adds it to the `lminfinite` parser (listed in COMMAND_MODULES).
`run_chat()` builds a backend -- `local_backend()`: a `lminfinite.chat.Chat` on a loaded model -- and
hands it to `lminfinite.chat.repl()`, which talks to any object with `send(text) -> Iterator[str]`,
`reset()` and `stats()`, so a remote backend (a chat server's client) plugs in beside the local one.
"""

from __future__ import annotations

import sys

from . import CliError, memory_arg, new_command, nonneg_int, temperature_arg, top_p_arg

DESCRIPTION = """Chat with a model in the terminal, for as long as you like: the conversation lives in one
LM-Infinite cache (the first --n-global tokens and the last --n-local), so memory stays flat however long
it gets. Each turn prefills only its new tokens. Answers stream as they are generated.

With --memory, the tokens that leave the window are kept in blocks (block memory), and each new token also
attends the few blocks that match it best, so a fact from far back in the conversation can still be found;
that store grows with the conversation (/stats shows its size).

In the chat: /reset forgets the conversation, /stats shows tokens seen and the cache's size, /exit (or
Ctrl-D) quits; Ctrl-C stops the current answer and keeps the conversation. With input piped in (not a
terminal), each line is one user message and each answer is printed on one line."""

EXAMPLES = """examples:
  lminfinite chat                                   # SmolLM2-135M-Instruct (the bundled GGUF, else the hub)
  lminfinite chat --model smollm2 --n-local 1024 --system "You are a terse assistant."
  lminfinite chat --n-local 512 --memory                    # block memory: 8 blocks of 128 tokens
  lminfinite chat --n-local 512 --memory 8:64:int8          # 8 blocks of 64 tokens, stored in int8
  lminfinite chat --model path/to/model.gguf --do-sample --temperature 0.7 --top-p 0.9
  printf 'Hi!\\nWhat is 2+2?\\n/stats\\n' | lminfinite chat --max-new-tokens 64"""


def add_command(sub, model_options) -> None:
    p = new_command(
        sub, "chat", "chat with a model in the terminal (flat memory)", DESCRIPTION, EXAMPLES, [model_options], run_chat
    )
    p.set_defaults(model="smollm2")
    g = p.add_argument_group("chat")
    g.add_argument("--system", help="system message (models with a chat template)")
    g.add_argument(
        "--max-new-tokens",
        type=nonneg_int,
        default=512,
        help="longest answer in tokens; 0: until the end-of-turn token (default 512)",
    )
    g.add_argument(
        "--memory",
        nargs="?",
        const="",
        metavar="K:BS:DTYPE:SCOPE",
        type=memory_arg,
        help="block memory: each token also attends the K best blocks of BS tokens that left the window, stored "
        "as DTYPE (float16, float32, int8), chosen for all heads of a layer (SCOPE shared) or per kv head (heads); "
        "--memory alone: 8:128:float16:shared",
    )
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=temperature_arg, default=1.0, help="sampling temperature > 0 (default 1.0)")
    g.add_argument("--top-p", type=top_p_arg, help="nucleus sampling: keep the smallest set of mass top-p, in (0, 1]")
    g.add_argument(
        "--sample-top-k",
        type=nonneg_int,
        metavar="K",
        help="sample among the K most likely tokens; 0 or unset: all (not LM-Infinite's top-k middle tokens)",
    )
    r = p.add_argument_group("remote (instead of loading --model)")
    r.add_argument(
        "--server", metavar="URL", help="chat with a running `lminfinite serve` (or OpenAI-compatible) server"
    )
    r.add_argument("--api-key", help="API key for --server (default: $LMINFINITE_API_KEY)")


def local_backend(args):
    """A `Chat` on the model named by --model, with the command's settings."""
    from ..chat import Chat
    from . import _setup

    model, tokenizer, _ = _setup(args)
    if args.system and not getattr(tokenizer, "chat_template", None):
        raise CliError(f"--system needs a chat model; {args.model} has no chat template")
    return Chat(
        model,
        tokenizer,
        n_global=args.n_global,
        n_local=args.n_local,
        memory=args.memory,
        system=args.system,
        max_new_tokens=args.max_new_tokens or None,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.sample_top_k,
        top_p=args.top_p,
        seed=args.seed,
        chunk_size=args.chunk_size,
    )


def remote_backend(args):
    """A `lminfinite.serve.client.RemoteChat` on the server at --server (the server's model and window)."""
    import os

    from ..serve.client import RemoteChat, RemoteChatError

    if args.sample_top_k is not None:
        raise CliError("--sample-top-k does not work with --server (the OpenAI API has no top-k)")
    if args.memory is not None:
        raise CliError("--memory does not work with --server (the server's method is set by `lminfinite serve`)")
    try:
        return RemoteChat(
            args.server,
            api_key=args.api_key or os.environ.get("LMINFINITE_API_KEY"),
            system=args.system,
            max_tokens=args.max_new_tokens or None,
            temperature=args.temperature if args.do_sample else 0.0,
            top_p=(args.top_p or 1.0) if args.do_sample else 1.0,
            seed=args.seed,
        )
    except (ValueError, RemoteChatError) as e:
        raise CliError(f"--server {args.server}: {e}") from None


def run_chat(args) -> int:
    from ..chat import repl

    if not args.do_sample and (args.top_p is not None or args.sample_top_k is not None or args.temperature != 1.0):
        print("lminfinite: note: --temperature/--top-p/--sample-top-k apply with --do-sample only", file=sys.stderr)
    if args.server:
        backend = remote_backend(args)
        return repl(
            backend, banner=f"{backend.url}: {backend.model} (remote). /reset, /stats, /exit; Ctrl-C stops an answer."
        )
    backend = local_backend(args)
    template = "chat template" if backend.templated else "no chat template: plain text continuation"
    banner = (
        f"{args.model}: G={backend.n_global} L={backend.n_local}"
        + (f", block memory {args.memory.blocks} x {args.memory.block_size} tokens" if args.memory else "")
        + f", {template}. "
        "/reset, /stats, /exit; Ctrl-C stops an answer."
    )
    return repl(backend, banner=banner)
