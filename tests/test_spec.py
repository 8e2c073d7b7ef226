"""The attention function against the method as the paper states it, one query and key at a time.

The method (Han et al., arXiv 2308.16137, Section 3; restated in `src/lminfinite/rule.py` and the README's
"How it works"): a query at i attends keys j with i - j < L at their true distance, the first G tokens
beyond that at distance D (RoPE: the query rotated to position D, the key at position 0), nothing else.

This reference starts from unrotated q/k and applies RoPE itself: local keys at the true distance,
starting keys with the query at position D and the key at position 0. It checks the whole path:
rule, re-rotation, merge in one softmax, GQA. The same loops with ALiBi biases (-slope * distance,
distance D for starting keys) and with the top-k extension (a query's k best middle keys, scored
and seen like starting keys).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lminfinite.attention import lambda_attention_forward
from lminfinite.config import LambdaConfig
from lminfinite.plan import PLAN_KWARG, build_plan, build_specs
from lminfinite.positions import Alibi, Rope


class _Rotary(torch.nn.Module):
    def __init__(self, dim, theta=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim))

    def cos_sin(self, pos):
        freqs = pos.float()[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos()[None], emb.sin()[None]  # (1, T, d)


def _rot(x, rotary, pos):
    cos, sin = rotary.cos_sin(pos)
    out, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return out


def spec_attention(q_raw, k_raw, v, G, L, D, rotary=None, slopes=None, top_k=0, sinks=False):
    """Loops over queries and keys; q_raw/k_raw unrotated (1, H, T, d). RoPE when `rotary` is given,
    ALiBi when `slopes` are. `sinks`: the StreamingLLM-style baseline, starting key j at its own
    position and the query at min(D, i)."""
    H, T, d = q_raw.shape[1], q_raw.shape[2], q_raw.shape[3]
    rep = H // k_raw.shape[1]
    out = torch.zeros(1, H, T, v.shape[-1])

    def logit(h, i, j, qpos, kpos):
        qi, kj = q_raw[:, h : h + 1, i : i + 1], k_raw[:, h // rep : h // rep + 1, j : j + 1]
        if rotary is not None:
            qi, kj = _rot(qi, rotary, torch.tensor([qpos])), _rot(kj, rotary, torch.tensor([kpos]))
        bias = 0.0 if slopes is None else -float(slopes[h]) * (qpos - kpos)
        return float((qi * kj).sum()) / math.sqrt(d) + bias

    for h in range(H):
        for i in range(T):
            logits, vals, middle = [], [], []
            for j in range(i + 1):
                if i - j < L:
                    logits.append(logit(h, i, j, i, j))
                elif j < G:
                    logits.append(logit(h, i, j, min(D, i), j) if sinks else logit(h, i, j, D, 0))
                else:
                    middle.append((logit(h, i, j, D, 0), j))  # a middle key, scored at distance D
                    continue
                vals.append(v[0, h // rep, j])
            for score, j in sorted(middle, key=lambda m: (-m[0], m[1]))[:top_k]:  # ties: earlier key
                logits.append(score)
                vals.append(v[0, h // rep, j])
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).float()
            out[0, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


def _call(q, k, v, cfg, rope=None, alibi=None):
    """lambda_attention_forward on one unpadded sequence, as a model's layer 0 would call it: everything it
    needs is in the plan it is handed (one layer spec, the token indices)."""
    layers = build_specs(cfg, windows=[None], ropes=[rope], alibi=alibi)
    plan = build_plan(cfg, layers, torch.ones(1, q.shape[2], dtype=torch.bool))
    module = torch.nn.Module()
    module.layer_idx = 0
    out, _ = lambda_attention_forward(module, q, k, v, None, scaling=q.shape[-1] ** -0.5, **{PLAN_KWARG: plan})
    return out


def _qkv(H=4, Hkv=2, T=29, d=16):
    torch.manual_seed(0)
    return torch.randn(1, H, T, d), torch.randn(1, Hkv, T, d), torch.randn(1, Hkv, T, d)


BACKENDS = ["naive", "torch", "flex"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "G,L,D,top_k", [(3, 8, 8, 0), (0, 5, 5, 0), (2, 6, 4, 0), (4, 7, 7, 0), (2, 6, 6, 3), (0, 5, 4, 1)]
)
def test_attention_function_matches_the_written_method(backend, G, L, D, top_k):
    q_raw, k_raw, v = _qkv()
    rotary = _Rotary(q_raw.shape[-1])
    pos = torch.arange(q_raw.shape[2])
    q, k = _rot(q_raw, rotary, pos), _rot(k_raw, rotary, pos)
    cfg = LambdaConfig(n_global=G, n_local=L, limit_distance=D, backend=backend, block_size=5, top_k=top_k)
    out = _call(q, k, v, cfg, rope=Rope(rotary))
    expected = spec_attention(q_raw, k_raw, v, G, L, D, rotary=rotary, top_k=top_k).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,L,D,top_k", [(3, 8, 8, 0), (2, 6, 4, 0), (2, 6, 6, 2)])
def test_alibi_attention_matches_the_written_method(backend, G, L, D, top_k):
    q, k, v = _qkv(H=4, Hkv=4)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    cfg = LambdaConfig(n_global=G, n_local=L, limit_distance=D, backend=backend, block_size=5, top_k=top_k)
    out = _call(q, k, v, cfg, alibi=Alibi(slopes, D))
    expected = spec_attention(q, k, v, G, L, D, slopes=slopes, top_k=top_k).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alibi", [False, True])
def test_own_sink_positions_match_the_written_baseline(backend, alibi):
    """sink_positions="own" (the `sinks` eval method): starting key j seen at distance min(D, i) - j."""
    G, L, D = 3, 6, 9
    q_raw, k_raw, v = _qkv(H=4, Hkv=4 if alibi else 2)
    with pytest.warns(UserWarning, match="limit_distance=9 > n_local=6"):  # as the `sinks` method uses it
        cfg = LambdaConfig(n_global=G, n_local=L, limit_distance=D, backend=backend, block_size=5, sink_positions="own")
    if alibi:
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
        out = _call(q_raw, k_raw, v, cfg, alibi=Alibi(slopes, D, sinks=True))
        expected = spec_attention(q_raw, k_raw, v, G, L, D, slopes=slopes, sinks=True)
    else:
        rotary = _Rotary(q_raw.shape[-1])
        pos = torch.arange(q_raw.shape[2])
        out = _call(_rot(q_raw, rotary, pos), _rot(k_raw, rotary, pos), v, cfg, rope=Rope(rotary))
        expected = spec_attention(q_raw, k_raw, v, G, L, D, rotary=rotary, sinks=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
