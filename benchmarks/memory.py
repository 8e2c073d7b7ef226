"""Block memory: prefill and decode time per token, peak memory and store size at 4L, 16L, 32L and 64L.

Methods: plain Λ-attention (`lminfinite`), the top-k extension (`topk`, k=5 from layer 0: its cache keeps
every token and each query scores every middle token) and block memory (`memory`, a `BlockMemory` given by
`--memory K:BS:DTYPE[:SCOPE]`, default 8 blocks of 128 tokens in float16: each query chunk also attends its 8
best blocks). Models: SmolLM2-135M-Instruct (the shared GGUF asset, real weights) and the random Llama of
realistic width of the other benchmarks (`common.REALISTIC`).

Each point runs in its own process: the input (random token ids) goes through `lminfinite.prefill` in
chunks of `--chunk` tokens (timed, peak RSS measured from after set-up), then `--steps` tokens are decoded
one by one on that cache (timed after two warm-up steps). Reported per point: prefill ms per token, decode
ms per token at that context, peak RSS, the window part of the cache and the block stores (MB, and store
bytes per stored token and layer), and, for memory and top-k, the ratio to plain Λ of the same run.

Times are wall-clock and CPU time of the process (`_cpu_` fields), with `--threads` torch threads
(default 1): on a machine shared with other work, wall time swings with the load, while the CPU time of a
one-thread process is what the work itself costs, so the ratios are quoted from CPU time.

    python benchmarks/memory.py                                   # SmolLM2 and the random Llama, L=512
    python benchmarks/memory.py --model smollm2 --mults 4,16 --methods lminfinite,memory
    python benchmarks/memory.py --model llama --n-local 256 --memory 16:128:int8
    python benchmarks/memory.py --model smollm2 --mults 32 --methods lminfinite,memory,memory:8:128:float16:heads \\
        --name scope                                              # one choice per layer or one per kv head

Results: `benchmarks/results/memory_<model>[_<name>].json` and `.png`.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import REALISTIC, parse_args, peak_rss_mb, plot, realistic_model, reset_peak_rss, run_point, save, timed

import lminfinite
from lminfinite.eval.methods import get as get_method

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (real weights)",
    "llama": "random Llama (hidden 2048, 16/4 heads, 4 layers)",
}


def _model(name: str, n_local: int):
    if name == "smollm2":
        model, _ = lminfinite.load_model("smollm2")
        return model.eval()
    return realistic_model(n_local)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `fn()`."""
    cpu = time.process_time()
    wall = timed(fn)
    return wall, time.process_time() - cpu


def point(model: str, method: str, n_local: int, length: int, steps: int, chunk: int, threads: int = 1) -> dict:
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    net = _model(model, n_local)
    get_method(method).enable(net, 10, n_local)
    vocab = net.config.vocab_size
    ids = torch.randint(100, vocab - 100, (1, length), generator=torch.Generator().manual_seed(0))
    lminfinite.prefill(net, ids[:, : 2 * n_local], chunk_size=chunk)  # warm-up
    reset_peak_rss()
    cache = None

    def fill():
        nonlocal cache
        cache = lminfinite.prefill(net, ids, chunk_size=chunk)

    seconds, cpu = _timed(fill)
    prefill_peak = peak_rss_mb()
    token = ids[:, -1:]

    def decode(k):
        nonlocal token
        for _ in range(k):
            logits = net(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)

    decode(2)
    decode_seconds, decode_cpu = _timed(lambda: decode(steps))
    assert cache is not None
    window = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    store = cache.store_bytes()
    stored = cache.store_tokens()
    return {
        "model": model,
        "method": method,
        "length": length,
        "mult": length // n_local,
        "prefill_s": seconds,
        "prefill_ms_per_token": 1e3 * seconds / length,
        "decode_ms_per_token": 1e3 * decode_seconds / steps,
        "prefill_cpu_ms_per_token": 1e3 * cpu / length,
        "decode_cpu_ms_per_token": 1e3 * decode_cpu / steps,
        "threads": threads,
        "peak_rss_mb": max(prefill_peak, peak_rss_mb()),
        "window_mb": window / 2**20,
        "store_mb": store / 2**20,
        "store_bytes_per_token_layer": store / stored if stored else None,
    }


def _ratios(rows: list[dict]) -> None:
    """Add each method's ratio to plain Λ at the same model, length and repeat (run next to it), wall and CPU."""
    base = {(r["model"], r["mult"], r["repeat"]): r for r in rows if r["method"] == "lminfinite"}
    for r in rows:
        b = base.get((r["model"], r["mult"], r["repeat"]))
        if b is not None:
            for kind in ("prefill", "decode"):
                r[f"{kind}_ratio"] = r[f"{kind}_ms_per_token"] / b[f"{kind}_ms_per_token"]
                r[f"{kind}_cpu_ratio"] = r[f"{kind}_cpu_ms_per_token"] / b[f"{kind}_cpu_ms_per_token"]


def _medians(rows: list[dict]) -> list[dict]:
    """One row per (model, method, length): the median of each number over the repeats."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["mult"]), []).append(r)
    out = []
    for runs in groups.values():
        row = {k: v for k, v in runs[0].items() if not isinstance(v, float)}
        row["repeats"] = len(runs)
        for key in (k for k, v in runs[0].items() if isinstance(v, float)):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None  # an even count: the mean of the middle two
        row.pop("repeat", None)
        out.append(row)
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(
        __doc__,
        argv,
        point,
        ("--model", {"choices": ["smollm2", "llama", "both"], "default": "both"}),
        ("--n-local", {"type": int, "default": 512}),
        ("--mults", {"default": "4,16,32,64"}),
        ("--methods", {"default": "lminfinite,memory,topk"}),
        (
            "--memory",
            {"default": "8:128:float16", "help": "K:BS:DTYPE[:SCOPE] of the memory method (default: %(default)s)"},
        ),
        ("--topk-max-mult", {"type": int, "default": 16, "help": "top-k only up to this multiple of L (O(n^2))"}),
        ("--steps", {"type": int, "default": 16}),
        ("--chunk", {"type": int, "default": 2048, "help": "prefill chunk (tokens per forward)"}),
        ("--threads", {"type": int, "default": 1, "help": "torch threads per point"}),
        ("--repeats", {"type": int, "default": 1, "help": "runs of each point, the methods interleaved (medians)"}),
        ("--name", {"default": "", "help": "suffix of the result files: memory_<model>[_<name>].json/.png"}),
    )
    if args is None:
        return []
    models = ["smollm2", "llama"] if args.model == "both" else [args.model]
    methods = [f"memory:{args.memory}" if m == "memory" else m for m in args.methods.split(",")]
    all_rows = []
    for model in models:
        rows = []
        for m, repeat, method in (
            (m, r, method)
            for m in (int(x) for x in args.mults.split(","))
            for r in range(args.repeats)
            for method in methods
        ):
            if method == "topk" and m > args.topk_max_mult:
                continue
            row = run_point(
                __file__,
                model=model,
                method=method,
                n_local=args.n_local,
                length=m * args.n_local,
                steps=args.steps,
                chunk=args.chunk,
                threads=args.threads,
            )
            # `memory` stands for --memory's setting; a memory spec written in --methods keeps its name
            row["method"] = "memory" if method == f"memory:{args.memory}" else method
            row["repeat"] = repeat
            rows.append(row)
            _ratios(rows)
            ratio = ""
            if "prefill_ratio" in row:
                ratio = f" (CPU {row['prefill_cpu_ratio']:.2f}x / {row['decode_cpu_ratio']:.2f}x of lminfinite)"
            print(
                f"{model} {method:22s} {m:3d}L prefill {row['prefill_ms_per_token']:7.2f} ms/token "
                f"(CPU {row['prefill_cpu_ms_per_token']:.2f}), decode {row['decode_ms_per_token']:7.1f} ms/token "
                f"(CPU {row['decode_cpu_ms_per_token']:.1f}){ratio}, peak {row['peak_rss_mb']:6.0f} MB, "
                f"store {row['store_mb']:7.1f} MB",
                flush=True,
            )
        config = {
            "model": MODELS[model] if model == "smollm2" else {MODELS[model]: REALISTIC},
            "n_local": args.n_local,
            "n_global": 10,
            "memory": args.memory,
            "topk": "k=5 from layer 0",
            "chunk": args.chunk,
            "steps": args.steps,
            "threads": args.threads,
            "repeats": args.repeats,
            "runs": rows,  # every run; "results" holds the medians over the repeats
        }
        medians = _medians(rows)
        name = f"memory_{model}_{args.name}" if args.name else f"memory_{model}"
        save(name, config, medians)
        plot(
            name,
            medians,
            "mult",
            [
                ("prefill_cpu_ms_per_token", "prefill CPU ms per token"),
                ("decode_cpu_ms_per_token", "decode CPU ms per token"),
                ("peak_rss_mb", "peak RSS (MB)"),
            ],  # fmt: skip
            "input length / L",
            f"Block memory, {MODELS[model]}, L={args.n_local}",
        )
        all_rows += medians
    return all_rows


if __name__ == "__main__":
    main()
