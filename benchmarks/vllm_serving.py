"""vLLM with the lminfinite plugin vs vLLM without it vs `lminfinite serve`, on SmolLM2-135M-Instruct (CPU).

Each server is started on 127.0.0.1 and driven with the official `openai` client:

- throughput and latency: 1, 4 and 16 concurrent conversations, each of `--turns` turns (a ~`--prompt-tokens`
  user message per turn, `--new-tokens` streamed greedy tokens per answer): generated tokens/s over the wall
  time, TTFT (request sent -> first token) and ITL (mean gap between streamed tokens), medians over requests;
- KV memory per request (vLLM servers): one request of 4x L and one of 16x L prompt tokens; while its answer
  streams, vLLM's `vllm:kv_cache_usage_perc` times the pool gives the blocks it holds, times the bytes per
  block (2 x layers x KV heads x head size x 4 bytes x block size).

    .venv-vllm/bin/python benchmarks/vllm_serving.py --out benchmarks/results/vllm_serving.json

`lminfinite serve` runs from the same venv (the library on transformers 5.19). The prompts are within
SmolLM2's 8192-token context so that vLLM without the plugin serves them too.
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
BLOCK = 128
READY = {"vllm": "Application startup complete", "lminfinite": "Uvicorn running"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, folder: str, port: int, plugin: bool, timeout: float = 900) -> subprocess.Popen:
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(2 << 30),
               "--max-num-batched-tokens", "1024", "--max-model-len", "32768" if plugin else "8192"]  # fmt: skip
        if plugin:
            cmd += ["--hf-overrides", json.dumps({"lminfinite": {"n_global": G, "n_local": L}})]
    else:
        cmd = [sys.executable, "-m", "lminfinite.cli", "serve", "--model", folder, "--served-model-name", "smollm2",
               "--port", str(port), "--n-global", str(G), "--n-local", str(L), "--max-concurrency", "16"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, tail = threading.Event(), []

    def read():
        for line in proc.stdout:
            tail.append(line)
            del tail[:-50]
            if READY[kind] in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError(f"{kind} server did not start:\n{''.join(tail)}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def conversation(client, texts: list[str], new_tokens: int, extra: dict) -> list[dict]:
    messages, records = [], []
    for text in texts:
        messages.append({"role": "user", "content": text})
        sent = time.perf_counter()
        stamps, answer = [], ""
        stream = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=new_tokens, temperature=0, stream=True, **extra
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
                answer += chunk.choices[0].delta.content
        messages.append({"role": "assistant", "content": answer})
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        records.append(
            {"ttft": stamps[0] - sent if stamps else None, "itl": statistics.mean(gaps) if gaps else None,
             "chunks": len(stamps)}
        )  # fmt: skip
    return records


def load(client, conversations: int, turns: list[str], new_tokens: int, extra: dict) -> dict:
    start_time = time.perf_counter()
    with ThreadPoolExecutor(conversations) as pool:
        results = list(pool.map(lambda _: conversation(client, turns, new_tokens, extra), range(conversations)))
    wall = time.perf_counter() - start_time
    flat = [r for conv in results for r in conv]
    tokens = sum(r["chunks"] for r in flat)
    return {
        "conversations": conversations,
        "requests": len(flat),
        "generated_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_median_s": round(statistics.median(r["ttft"] for r in flat if r["ttft"] is not None), 3),
        "itl_median_ms": round(1000 * statistics.median(r["itl"] for r in flat if r["itl"] is not None), 1),
    }


def metrics(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/metrics", timeout=30).text


def kv_per_request(client, base: str, ids: list[int], bytes_per_block: int) -> dict:
    text = metrics(base)
    pool = int(re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text).group(1))
    stream = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0, stream=True)
    blocks = None
    for chunk in stream:
        if blocks is None and chunk.choices and chunk.choices[0].text:
            usage = float(re.search(r"^vllm:kv_cache_usage_perc(?:\{[^}]*\})? (\S+)$", metrics(base), re.M).group(1))
            blocks = round(usage * pool)
    return {"prompt_tokens": len(ids), "blocks": blocks, "kv_mib": round(blocks * bytes_per_block / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/vllm_serving.json")
    parser.add_argument("--servers", default="plugin,vanilla,lminfinite")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import openai

    import lminfinite
    from lminfinite.models import smollm2_path
    from lminfinite.models.assets import asset
    from lminfinite.models.gguf import cached_entry

    model, tokenizer = lminfinite.load_model("smollm2")
    folder = str(cached_entry(smollm2_path()))
    cfg = model.config
    bytes_per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * BLOCK
    del model
    text = asset("corpora", "alice_pg11.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    turns = [tokenizer.decode(ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens]) for i in range(args.turns)]
    report = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "n_global": G,
        "n_local": L,
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs; one run",
        "turns": args.turns,
        "prompt_tokens_per_turn": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "servers": {},
    }
    for name in args.servers.split(","):
        kind = "lminfinite" if name == "lminfinite" else "vllm"
        port = free_port()
        proc = start(kind, folder, port, plugin=name == "plugin")
        try:
            base = f"http://127.0.0.1:{port}"
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=3600)
            extra = {"extra_body": {"ignore_eos": True}} if kind == "vllm" else {}
            rows = [load(client, int(c), turns, args.new_tokens, extra) for c in args.concurrency.split(",")]
            entry = {"load": rows}
            if kind == "vllm":
                entry["kv_per_request"] = [kv_per_request(client, base, ids[: k * L], bytes_per_block) for k in (4, 16)]
            report["servers"][name] = entry
            print(name, json.dumps(entry), flush=True)
        finally:
            stop(proc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
