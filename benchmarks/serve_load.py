"""Serve under load, on loopback: throughput and time to first token at 1, 4 and 16 concurrent clients, and the
latency of turn k of a long conversation with session reuse vs a server that re-prefills the whole history.

Each server is `lminfinite serve` in its own process on 127.0.0.1 (a free port); the clients are the official
`openai` async client in this process. Bounded: a fixed number of requests per client and a time limit per
phase (whatever finished by then is counted).

1. load: C clients (C = 1, 4, 16), each sending `--requests` streaming chat requests one after the other
   (fresh conversations, greedy, `--max-tokens` tokens with ignore_eos so every answer has the same length):
   requests/s, generated tokens/s, p50/p95 time to first token, p50 request latency.
2. conversation: one client whose user messages are paragraphs of `--turn-chars` characters (a user pasting
   text), greedy answers of `--turn-tokens` tokens, until the history passes `--history-mult` x n_local tokens
   (or `--turns`), against the server with session reuse and, in lockstep turn by turn, against a second one
   started with `--no-session-reuse`: time to first token and latency of every turn, prompt and prefilled tokens.
3. reuse rate: the same conversation with sampled answers (temperature 0.8, a seed) on the reuse server: how
   many turns continued their session by token prefix, by text splice, or missed.

Context: `raw_decode` is the model's own one-token forward speed in this process (a worker thread, no server),
measured before and after; on a shared machine the absolute figures move with its load. The servers run with
`--threads 1` by default: on the 2-core machine these figures come from, shared with other jobs, torch's two
intra-op threads made a one-token forward of stories260K about 7x slower than one thread.

    python benchmarks/serve_load.py [--model stories260K] [--n-local 256] [--clients 1,4,16] [--requests 4]
        [--max-tokens 32] [--turn-chars 200] [--threads 1] [--turn-tokens 16] [--history-mult 10] [--phase-seconds 240]

Writes benchmarks/results/serve_load.json and serve_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import RESULTS, environment
from openai import AsyncOpenAI, OpenAI

from lminfinite.serve.metrics import parse_metrics

KEY = "bench-key"
USER_LINES = [
    "Tell me a story about a cat.",
    "What did the cat find in the garden?",
    "Was the dog happy?",
    "Why did Lily cry?",
    "Where is the red ball?",
    "Then the sun came out and they played.",
    "What did mom say?",
    "Say something nice to Tom.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lminfinite serve` in a subprocess on 127.0.0.1."""

    def __init__(self, args, reuse: bool):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lminfinite.cli", "serve", "--model", args.model, "--port", str(self.port)]
        cmd += ["--n-global", str(args.n_global), "--n-local", str(args.n_local), "--api-key", KEY]
        cmd += ["--max-concurrency", str(max(args.clients) + 4), "--max-tokens-cap", "4096", "--log-level", "warning"]
        cmd += [] if reuse else ["--no-session-reuse"]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 300 s")
            time.sleep(0.3)
        client = OpenAI(base_url=f"{self.url}/v1", api_key=KEY)
        self.model = client.models.list().data[0].id
        # warm-up: the first forwards of a process are slow
        client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(f"{self.url}/metrics").text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)


def raw_decode(args, steps: int = 64) -> dict:
    """The model's own speed in this process, without the server: one-token forwards through a LambdaCache, in a
    thread of its own like the server's model worker (on an oversubscribed CPU, torch's intra-op threads make the
    same forwards in the main thread much slower)."""
    import threading

    out: list[dict] = []
    thread = threading.Thread(target=lambda: out.append(_raw_decode(args, steps)))
    thread.start()
    thread.join()
    return out[0]


def _raw_decode(args, steps: int) -> dict:
    import torch

    import lminfinite

    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = lminfinite.load_model(args.model)
    lminfinite.enable(model, n_global=args.n_global, n_local=args.n_local)
    cache = lminfinite.LambdaCache.for_model(model)
    with torch.inference_mode():
        model(input_ids=torch.arange(3, 3 + args.n_local).unsqueeze(0), cache=cache, use_cache=True)
        for _ in range(8):  # warm-up
            model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
    seconds = (time.perf_counter() - start) / steps
    return {"ms_per_token": round(seconds * 1e3, 2), "tokens_per_s": round(1 / seconds, 1)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(client: AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, **kw) -> dict:
    """Stream one chat completion: time to first token, latency, content, usage."""
    start = time.perf_counter()
    first, parts, usage = None, [], None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {
        "ttft_s": (first or end) - start,
        "latency_s": end - start,
        "content": "".join(parts),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
    }


async def load_phase(server: Server, clients: int, args) -> dict:
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=args.phase_seconds)
    deadline = time.perf_counter() + args.phase_seconds
    done: list[dict] = []

    async def worker(w: int) -> None:
        for i in range(args.requests):
            if time.perf_counter() > deadline:
                return
            messages = [{"role": "user", "content": f"{USER_LINES[(w + i) % 8]} (client {w}, request {i})"}]
            kw = dict(temperature=0, extra_body={"ignore_eos": True})
            done.append(await one_request(client, server.model, messages, args.max_tokens, **kw))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft_s"] for r in done]
    tokens = sum(r["completion_tokens"] for r in done)
    return {
        "phase": "load",
        "clients": clients,
        "requests": len(done),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(done) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p95_s": round(pct(ttft, 0.95), 4),
        "latency_p50_s": round(pct([r["latency_s"] for r in done], 0.5), 4),
    }


def user_turns(n: int, chars: int) -> list[str]:
    """`n` user messages of about `chars` characters: consecutive paragraphs of TinyStories (a user pasting text)."""
    from lminfinite.models.assets import asset

    text = asset("corpora", "tinystories_train_head.txt").read_text(encoding="utf-8")
    out, pos = [], 0
    while len(out) < n:
        end = text.find(" ", pos + chars)
        out.append(text[pos:end].strip())
        pos = end
    return out


class Conversation:
    """One client's conversation with one server: the turn loop's state and its per-turn rows."""

    def __init__(self, server: Server, args, label: str, sampled: bool = False):
        self.server, self.label = server, label
        self.client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=args.phase_seconds)
        self.kw = dict(temperature=0.8, seed=1234) if sampled else dict(temperature=0)
        self.history: list[dict] = []
        self.rows: list[dict] = []
        self.tokens = args.turn_tokens

    async def turn(self, message: str) -> dict:
        self.history.append({"role": "user", "content": message})
        before = self.server.metrics()
        r = await one_request(self.client, self.server.model, self.history, self.tokens, **self.kw)
        after = self.server.metrics()
        self.history.append({"role": "assistant", "content": r.pop("content")})

        def delta(name: str) -> int:
            return int(after[name] - before[name])

        kinds = ("token_prefix", "text_splice", "miss", "new", "disabled")
        looked = {k: delta(f'lminfinite_session_lookups_total{{result="{k}"}}') for k in kinds}
        r.update(
            server=self.label,
            turn=len(self.rows) + 1,
            prefilled_tokens=delta("lminfinite_prefilled_tokens_total"),
            lookup=max(looked, key=looked.get),
            server_rss_mb=round(after["lminfinite_process_resident_memory_bytes"] / 2**20, 1),
            cache_bytes=int(after["lminfinite_cache_bytes"]),
        )
        self.rows.append(r)
        return r


async def conversations(pairs: list[Conversation], args) -> None:
    """Drive the conversations in lockstep (turn k on each server, one after the other), so that a change of the
    machine's load hits them alike, until the history passes history_mult x n_local, --turns or the time limit."""
    deadline = time.perf_counter() + args.phase_seconds
    for message in user_turns(args.turns, args.turn_chars):
        rows = [await c.turn(message) for c in pairs]
        if time.perf_counter() > deadline or rows[0]["prompt_tokens"] > args.history_mult * args.n_local:
            break
    for c in pairs:
        await c.client.close()


def summarize_turns(rows: list[dict], n_local: int) -> dict:
    """Medians over the turns whose history is shorter than n_local (first turn excluded), and over the last 5."""

    def med(rows: list[dict], key: str):
        return round(statistics.median(r[key] for r in rows), 4) if rows else None

    short = [r for r in rows[1:] if r["prompt_tokens"] < n_local]
    last = rows[-5:]
    return {
        "turns": len(rows),
        "last_prompt_tokens": rows[-1]["prompt_tokens"],
        "ttft_short_history_s": med(short, "ttft_s"),
        "ttft_last5_s": med(last, "ttft_s"),
        "latency_short_history_s": med(short, "latency_s"),
        "latency_last5_s": med(last, "latency_s"),
        "prefilled_last5": med(last, "prefilled_tokens"),
        "server_rss_mb_first_last": [rows[0]["server_rss_mb"], rows[-1]["server_rss_mb"]],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    load = result["load"]
    c = [r["clients"] for r in load]
    ax = axes[0]
    ax.plot(c, [r["tokens_per_s"] for r in load], "o-", label="generated tokens/s")
    ax.plot(c, [r["requests_per_s"] * 10 for r in load], "s--", label="requests/s x10")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_title("throughput")
    ax.legend()
    ax = axes[1]
    ax.plot(c, [r["ttft_p50_s"] for r in load], "o-", label="p50")
    ax.plot(c, [r["ttft_p95_s"] for r in load], "s--", label="p95")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("seconds")
    ax.set_title("time to first token")
    ax.legend()
    ax = axes[2]
    for label, color in (("session reuse", "C0"), ("no session reuse", "C3")):
        rows = [r for r in result["conversation"] if r["server"] == label]
        x = [r["prompt_tokens"] for r in rows]
        ax.plot(x, [r["ttft_s"] for r in rows], "o-", color=color, ms=3, label=f"{label}: time to first token")
        ax.plot(x, [r["latency_s"] for r in rows], ":", color=color, label=f"{label}: turn latency")
    ax.axvline(result["config"]["n_local"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("history length (prompt tokens)")
    ax.set_ylabel("seconds")
    ax.set_title(f"long conversation, {result['config']['turn_tokens']} tokens per answer")
    ax.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"lminfinite serve: {cfg['model']}, G={cfg['n_global']}, L={cfg['n_local']}, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stories260K")
    p.add_argument("--n-global", type=int, default=4)
    p.add_argument("--n-local", type=int, default=256)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client in the load phase")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer in the load phase")
    p.add_argument("--turns", type=int, default=60, help="most turns of the conversation")
    p.add_argument("--turn-chars", type=int, default=200, help="characters per user message in the conversation")
    p.add_argument("--history-mult", type=float, default=10, help="stop the conversation past this x n_local")
    p.add_argument("--turn-tokens", type=int, default=16, help="tokens per answer in the conversation")
    p.add_argument("--phase-seconds", type=float, default=240, help="time limit of each phase")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the servers (0: torch's default)")
    p.add_argument("--out", default=str(RESULTS / "serve_load"), help="path without extension for .json and .png")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]

    result = {"benchmark": "serve_load", "environment": environment(), "config": {**vars(args)}}
    start = time.perf_counter()
    result["raw_decode"] = raw_decode(args)
    print("raw decode (no server):", json.dumps(result["raw_decode"]), flush=True)
    server = Server(args, reuse=True)
    try:
        result["load"] = []
        for clients in args.clients:
            row = asyncio.run(load_phase(server, clients, args))
            print(json.dumps(row), flush=True)
            result["load"].append(row)
        baseline = Server(args, reuse=False)
        try:
            reuse, fresh = Conversation(server, args, "session reuse"), Conversation(baseline, args, "no session reuse")
            asyncio.run(conversations([reuse, fresh], args))
        finally:
            baseline.stop()
        sampled = Conversation(server, args, "session reuse, sampled", sampled=True)
        asyncio.run(conversations([sampled], args))
    finally:
        server.stop()
    result["conversation"] = reuse.rows + fresh.rows
    result["sampled_conversation"] = sampled.rows

    def rate(rows: list[dict]) -> float:
        return round(sum(r["lookup"] in ("token_prefix", "text_splice") for r in rows[1:]) / max(1, len(rows) - 1), 3)

    result["reuse_rate"] = {
        "greedy": rate(reuse.rows),
        "sampled": rate(sampled.rows),
        "sampled_by_kind": {
            k: sum(r["lookup"] == k for r in sampled.rows[1:]) for k in ("token_prefix", "text_splice", "miss")
        },
    }
    result["summary"] = {
        "session reuse": summarize_turns(reuse.rows, args.n_local),
        "no session reuse": summarize_turns(fresh.rows, args.n_local),
    }
    result["raw_decode_after"] = raw_decode(args)  # the machine may have changed meanwhile
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("summary", "reuse_rate", "raw_decode", "raw_decode_after")}, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
