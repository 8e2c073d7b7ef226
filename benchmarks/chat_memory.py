"""Flat memory over a long chat: a scripted conversation of many turns on SmolLM2-135M-Instruct, far past
the LM-Infinite window, recording after each turn the process RSS and the LambdaCache's size.

Each user turn is a passage of a real book (the assets' Alice in Wonderland, read in order) followed by
a question about it, so the conversation grows by a few hundred tokens per turn; answers are greedy and
at most --max-new-tokens long. Writes results/chat_memory/chat_memory_L{n_local}.json and .png (RSS and
cache size against tokens seen, with the size a full KV cache would have, computed from the model's
shape, for comparison).

    nice -n 10 .venv/bin/python benchmarks/chat_memory.py --n-local 512 --tokens 20480 --max-new-tokens 32 --threads 1
    nice -n 10 .venv/bin/python benchmarks/chat_memory.py --n-local 8192 --tokens 12288 --passage-words 600 \
        --max-new-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Who is in this passage, and what happens?",
    "What is the mood of this passage?",
    "Summarize this in one sentence.",
    "What might happen next?",
]


def rss_mb() -> float:
    """Resident set size of this process now (MB), from /proc (Linux); else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def passages(words_per_turn: int):
    from lminfinite.models.assets import asset, read_text

    words = read_text(asset("corpora", "alice_pg11.txt")).split()
    i = 0
    while True:
        chunk = words[i : i + words_per_turn]
        if len(chunk) < words_per_turn:
            i = 0
            continue
        i += words_per_turn
        yield " ".join(chunk)


def full_kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-global", type=int, default=10)
    p.add_argument("--n-local", type=int, default=512)
    p.add_argument("--tokens", type=int, default=5632, help="stop once the conversation has this many tokens")
    p.add_argument("--max-turns", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer per turn")
    p.add_argument("--passage-words", type=int, default=120, help="words of the book per user turn")
    p.add_argument("--max-seconds", type=float, default=3600, help="stop after this long (the JSON says so)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "chat_memory"))
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG beside a results JSON")
    args = p.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    from lminfinite.chat import Chat
    from lminfinite.models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - start
    chat = Chat(model, tokenizer, n_global=args.n_global, n_local=args.n_local, max_new_tokens=args.max_new_tokens)
    per_token = full_kv_bytes_per_token(model)
    gc.collect()
    rows = [{"turn": 0, "tokens_seen": 0, "cache_bytes": 0, "cache_columns": 0, "rss_mb": rss_mb(), "seconds": 0.0}]
    print(f"{args.model} loaded in {load_s:.1f} s; RSS {rows[0]['rss_mb']:.0f} MB; G={chat.n_global} L={chat.n_local}")
    source = passages(args.passage_words)
    stopped = "tokens"
    t0 = time.perf_counter()
    for turn in range(1, args.max_turns + 1):
        text = f"{next(source)}\n\n{QUESTIONS[turn % len(QUESTIONS)]}"
        answer = "".join(chat.send(text))
        stats = chat.stats()
        gc.collect()
        row = {
            "turn": turn,
            "tokens_seen": stats["tokens_seen"],
            "cache_bytes": stats["cache_bytes"],
            "cache_columns": stats["cache_columns"],
            "rss_mb": round(rss_mb(), 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "prompt_tokens": stats["last_prompt_tokens"],
            "answer_tokens": stats["last_answer_tokens"],
            "answer": answer[:200],
        }
        rows.append(row)
        print(
            f"turn {turn:3d}: {row['tokens_seen']:6d} tokens, cache {row['cache_columns']:5d} columns "
            f"{row['cache_bytes'] / 2**20:6.1f} MB, RSS {row['rss_mb']:7.1f} MB, {row['seconds']:7.1f} s | "
            f"{answer[:60]!r}",
            flush=True,
        )
        if stats["tokens_seen"] >= args.tokens:
            break
        if time.perf_counter() - t0 > args.max_seconds:
            stopped = "max_seconds"
            break
    else:
        stopped = "max_turns"

    after_window = [r for r in rows if r["tokens_seen"] >= chat.n_global + chat.n_local]
    summary = {
        "turns": len(rows) - 1,
        "tokens_seen": rows[-1]["tokens_seen"],
        "stopped_by": stopped,
        "rss_mb_first_turn": rows[1]["rss_mb"] if len(rows) > 1 else None,
        "rss_mb_last_turn": rows[-1]["rss_mb"],
        "rss_mb_min_after_window": min((r["rss_mb"] for r in after_window), default=None),
        "rss_mb_max_after_window": max((r["rss_mb"] for r in after_window), default=None),
        "cache_mb_max": max(r["cache_bytes"] for r in rows) / 2**20,
        "full_kv_cache_mb_at_end": rows[-1]["tokens_seen"] * per_token / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    payload = {
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "n_global": chat.n_global,
        "n_local": chat.n_local,
        "full_kv_bytes_per_token": per_token,
        "load_seconds": round(load_s, 1),
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "summary": summary,
        "turns": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"chat_memory_L{chat.n_local}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(payload, stem.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["turns"][1:]  # row 0 is the model just loaded, before any forward
    x = [r["tokens_seen"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    top.plot(x, [r["rss_mb"] for r in rows], marker="o", markersize=3, label="process RSS (measured)")
    top.set_ylabel("RSS (MB)")
    low = min(r["rss_mb"] for r in rows)
    top.set_ylim(0, max(r["rss_mb"] for r in rows) * 1.15 if low > 0 else None)
    cache = [r["cache_bytes"] / 2**20 for r in rows]
    bottom.plot(x, cache, marker="o", markersize=3, label="LambdaCache (measured)")
    full = [t * payload["full_kv_bytes_per_token"] / 2**20 for t in x]
    bottom.plot(x, full, linestyle="--", color="gray", label="a full KV cache would hold (computed)")
    bottom.set_ylabel("KV cache (MB)")
    bottom.set_xlabel("tokens in the conversation")
    window = payload["n_global"] + payload["n_local"]
    for ax, where in ((top, "lower right"), (bottom, "upper left")):
        ax.axvline(window, color="red", linewidth=0.8, linestyle=":", label=f"G + L = {window}")
        ax.grid(alpha=0.3)
        ax.legend(loc=where, fontsize=8)
    s = payload["summary"]
    fig.suptitle(
        f"{payload['model']}: chat of {s['turns']} turns, {s['tokens_seen']} tokens, "
        f"G={payload['n_global']} L={payload['n_local']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
