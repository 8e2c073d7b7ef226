"""Block memory everywhere a method is chosen: eval methods, the CLI (ppl, passkey, generate, chat --memory),
the server (--memory, store bytes in /metrics), the lm-eval model (method=memory), and the library's
generate / stream / prefill / score on a cache that carries the stores. stories260K with a small window."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest
import torch
from helpers import ids, tiny_model

import lminfinite
from lminfinite import BlockMemory, LambdaCache, cli
from lminfinite.eval import methods
from lminfinite.eval.errors import BadValue
from lminfinite.models.assets import asset

G, L = 4, 64
TINY = asset("corpora", "tinystories_train_head.txt")


def test_method_specs():
    assert methods.get("memory").memory == BlockMemory()
    m = methods.get("memory:8:32:int8")
    assert (m.memory.blocks, m.memory.block_size, m.memory.dtype) == (8, 32, "int8")
    assert methods.get("memory:8") == methods.get("memory") == methods.get("memory:8:128:float16")
    assert methods.get("memory:8:128:float16:shared").memory == BlockMemory(shared=True)
    assert methods.get("memory:4:64:int8:heads").memory == BlockMemory(
        blocks=4, block_size=64, dtype="int8", shared=False
    )
    assert [x.name for x in methods.parse("lminfinite,memory:4:16,topk:2")] == ["lminfinite", "memory:4:16", "topk:2"]
    for bad in (
        "memory:0",
        "memory:4:16:bf16",
        "memory:a",
        "memory:4:16:int8:1",
        "memory:4:16:int8:heads:1",
        "memoryx",
    ):
        with pytest.raises(BadValue):
            methods.get(bad)
    with pytest.raises(BadValue, match="listed twice"):
        methods.parse("memory,memory:8:128")
    with pytest.raises(BadValue, match="need n_local >= 128"):
        methods.get("memory").check(10, 64)


def test_method_switches_the_model(stories):
    model, _ = stories
    method = methods.get("memory:4:16")
    with method.applied(model, G, L):
        assert lminfinite.config_of(model).memory == BlockMemory(blocks=4, block_size=16)
    assert not lminfinite.is_enabled(model)


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _methods(payload) -> set[str]:
    """Every "method" value anywhere in a JSON payload."""
    if isinstance(payload, dict):
        found = {payload["method"]} if isinstance(payload.get("method"), str) else set()
        return found.union(*(_methods(v) for v in payload.values()))
    if isinstance(payload, list):
        return set().union(*(_methods(v) for v in payload))
    return set()


@pytest.mark.slow
def test_cli_ppl_and_passkey_take_memory(stories_path, tmp_path):
    out = tmp_path / "ppl.json"
    argv = ["ppl", "--model", stories_path, "--data", TINY, "--max-length", 512, "--windows", 1, "--n-local", L]
    assert run(*argv, "--n-global", G, "--methods", "lminfinite,memory:4:16", "--out", out, "--no-progress") == 0
    assert {"lminfinite", "memory:4:16"} <= _methods(json.loads(out.read_text()))
    out = tmp_path / "passkey.json"
    argv = ["passkey", "--model", stories_path, "--lengths", 256, "--samples", 2, "--n-local", L, "--n-global", G]
    assert run(*argv, "--methods", "memory:4:16:int8", "--out", out, "--no-progress") == 0
    assert "memory:4:16:int8" in _methods(json.loads(out.read_text()))


@pytest.mark.slow
def test_cli_generate_and_chat_take_memory(stories_path, capsys, monkeypatch):
    argv = ["generate", "--model", stories_path, "--n-local", L, "--n-global", G, "--max-new-tokens", 80]
    assert run(*argv, "--prompt", "Once upon a time", "--method", "memory:4:16") == 0
    assert len(capsys.readouterr().out.strip()) > 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time there was a cat.\n/stats\n"))
    argv = ["chat", "--model", stories_path, "--n-local", L, "--n-global", G, "--max-new-tokens", 150]
    assert run(*argv, "--memory", "4:16:int8") == 0
    out = capsys.readouterr().out
    assert "block memory" in out  # /stats shows the store once the conversation passed the window
    assert run("chat", "--model", stories_path, "--memory", "4:5") == 2  # a clear error, exit code 2
    assert "invalid --memory" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_keeps_a_store(stories):
    from lminfinite.chat import Chat

    model, tok = stories
    chat = Chat(model, tok, n_global=G, n_local=L, memory=BlockMemory(blocks=2, block_size=16), max_new_tokens=120)
    "".join(chat.send("Once upon a time there was a little dog named Max."))
    stats = chat.stats()
    assert stats["store_bytes"] > 0 and stats["cache_columns"] <= G + L - 1
    assert lminfinite.config_of(model).memory == BlockMemory(blocks=2, block_size=16)
    lminfinite.disable(model)


@pytest.mark.slow
def test_server_with_memory_shows_store_bytes():
    from lminfinite.serve.metrics import parse_metrics
    from lminfinite.serve.runner import ServerThread, load

    app, model, _ = load("stories260K", n_global=G, n_local=L, memory=BlockMemory(blocks=2, block_size=16))
    srv = ServerThread(app).start()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        done = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=150)
        assert done.usage.completion_tokens > 0
        values = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
        assert values["lminfinite_store_bytes"] > 0
        assert values["lminfinite_cache_bytes"] >= values["lminfinite_store_bytes"]
    finally:
        srv.stop()


def test_serve_cli_refuses_bad_memory(capsys):
    assert run("serve", "--model", "stories260K", "--n-local", 64, "--memory", "4:128") == 2
    assert "block_size=128 > n_local=64" in capsys.readouterr().err


def test_lm_eval_model_takes_memory(stories):
    pytest.importorskip("lm_eval")
    from lminfinite.integrations.lm_eval import LMInfiniteLM

    model, tok = stories
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method="memory:2:16", n_local=L, n_global=G, chunk_size=64)
    assert lm.settings["memory"] == {"blocks": 2, "block_size": 16, "dtype": "float16", "shared": True}
    assert lminfinite.config_of(model).memory == BlockMemory(blocks=2, block_size=16)
    lminfinite.disable(model)
    lm = LMInfiniteLM(pretrained=model, tokenizer=tok, method="memory:2:16:int8:heads", n_local=L, n_global=G)
    assert lm.settings["memory"] == {"blocks": 2, "block_size": 16, "dtype": "int8", "shared": False}
    assert lminfinite.config_of(model).memory == BlockMemory(blocks=2, block_size=16, dtype="int8", shared=False)
    with pytest.raises(BadValue, match="takes no top_k"):
        LMInfiniteLM(pretrained=model, tokenizer=tok, method="memory", n_local=256, top_k=3)
    lminfinite.disable(model)


MEM = BlockMemory(block_size=4, representatives=2, blocks=2, chunk=1)


def test_prefill_score_generate_and_stream_carry_the_store():
    model = lminfinite.enable(tiny_model("llama", max_position_embeddings=64), n_global=2, n_local=8, memory=MEM)
    x = ids(120, seed=3)
    # score() through a cache in chunks == one forward without a cache (memory over the forward's own blocks)
    nll = lminfinite.score(model, x, chunk_size=16)
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0], ref, atol=1e-4, rtol=1e-4)
    # prefill() then generate() continues from the cache's stores
    cache = lminfinite.prefill(model, x[:, :-1], chunk_size=32)
    assert isinstance(cache, LambdaCache) and cache.store_tokens() > 0
    gen = model.generate(x, cache=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    fresh = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, fresh)
    # stream() on a memory-enabled model
    from helpers import CharTokenizer

    text = "".join(lminfinite.stream(model, CharTokenizer(), "abcdefghij" * 10, max_new_tokens=20, chunk_size=16))
    assert isinstance(text, str)
