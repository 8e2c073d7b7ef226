"""The terminal chat: `repl(backend)` reads one user message per line and streams the answers.

It talks to any `ChatBackend` (an object with `send(text) -> Iterator[str]`, `reset()` and `stats() -> dict`):
a local `Chat`, or `lminfinite.serve.client.RemoteChat` for a running server.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Protocol, TextIO


class ChatBackend(Protocol):
    """What the terminal loop needs: a local `Chat` or a client of a chat server."""

    def send(self, text: str) -> Iterator[str]: ...

    def reset(self) -> None: ...

    def stats(self) -> dict: ...


HELP = "commands: /reset (forget the conversation), /stats (tokens seen, cache size), /exit; Ctrl-C stops an answer"


def format_stats(stats: dict) -> str:
    """One line for /stats."""
    parts = [f"turns {stats.get('turns', '?')}", f"tokens seen {stats.get('tokens_seen', '?')}"]
    if "cache_columns" in stats:
        parts.append(f"cache {stats['cache_columns']} columns")
    if "cache_bytes" in stats:
        parts.append(f"{stats['cache_bytes'] / 2**20:.1f} MiB")
    if stats.get("store_bytes"):
        parts.append(f"block memory {stats['store_bytes'] / 2**20:.1f} MiB")
    if "n_global" in stats and "n_local" in stats:
        parts.append(f"G={stats['n_global']} L={stats['n_local']}")
    if stats.get("last_tokens_per_s"):
        parts.append(f"last answer {stats['last_tokens_per_s']} tok/s")
    return ", ".join(parts)


def repl(
    backend: ChatBackend,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    banner: str | None = None,
) -> int:
    """The terminal chat: one line per user message; `/reset`, `/stats`, `/exit` (or `/quit`), `/help`.

    Ctrl-C stops the current answer (the conversation is kept); Ctrl-C at an empty prompt twice in a
    row, Ctrl-D or the end of a piped input exits. With a TTY the prompt is shown; with piped input
    each answer is printed on its own line, so a scripted conversation can be fed one line per turn.
    Returns the exit code (0)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tty = stdin.isatty() and stdout.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if banner:
        print(banner, file=stderr)
    interrupts = 0
    while True:
        try:
            line = input("you> ") if tty and stdin is sys.stdin else stdin.readline()
            if not tty and not line:
                break
        except EOFError:
            break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                break
            print("\n(Ctrl-C again, Ctrl-D or /exit to quit)", file=stderr)
            continue
        interrupts = 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/help":
            print(HELP, file=stderr)
            continue
        if text == "/reset":
            backend.reset()
            print("(conversation reset)", file=stderr)
            continue
        if text == "/stats":
            print(format_stats(backend.stats()), file=stdout, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {HELP}", file=stderr)
            continue
        _stream_answer(backend, text, stdout, stderr, tty)
    if tty:
        print(file=stdout)
    return 0


def _stream_answer(backend: ChatBackend, text: str, stdout: TextIO, stderr: TextIO, tty: bool) -> None:
    if tty:
        print("bot> ", end="", file=stdout, flush=True)
    pieces = None
    try:
        pieces = backend.send(text)
        for piece in pieces:
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", file=stdout, flush=True)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            while True:
                try:
                    close()  # runs the backend's clean-up now (a local Chat feeds its last token)
                    break
                except KeyboardInterrupt:
                    continue
