"""The attention function against the method as written in DESIGN.md, one query and key at a time.

This reference starts from unrotated q/k and applies RoPE itself: local keys at the true distance,
starting keys with the query at position D and the key at position 0. It checks the whole path:
rule, re-rotation, merge in one softmax, GQA.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lminfinite.attention import lambda_attention_forward
from lminfinite.config import LambdaConfig
from lminfinite.context import ForwardContext, LambdaState, candidate_columns
from lminfinite.positions import Rope


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


def spec_attention(q_raw, k_raw, v, G, L, D, rotary):
    """Loops over queries and keys; q_raw/k_raw unrotated (1, H, T, d)."""
    H, T, d = q_raw.shape[1], q_raw.shape[2], q_raw.shape[3]
    rep = H // k_raw.shape[1]
    out = torch.zeros(1, H, T, v.shape[-1])
    for h in range(H):
        kh = h // rep
        for i in range(T):
            logits, vals = [], []
            for j in range(i + 1):
                if i - j < L:
                    qi = _rot(q_raw[:, h : h + 1, i : i + 1], rotary, torch.tensor([i]))
                    kj = _rot(k_raw[:, kh : kh + 1, j : j + 1], rotary, torch.tensor([j]))
                elif j < G:
                    qi = _rot(q_raw[:, h : h + 1, i : i + 1], rotary, torch.tensor([D]))
                    kj = _rot(k_raw[:, kh : kh + 1, j : j + 1], rotary, torch.tensor([0]))
                else:
                    continue
                logits.append(float((qi * kj).sum()) / math.sqrt(d))
                vals.append(v[0, kh, j])
            p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).float()
            out[0, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("G,L,D", [(3, 8, 8), (0, 5, 5), (2, 6, 4), (4, 7, 7)])
def test_attention_function_matches_the_written_method(backend, G, L, D):
    torch.manual_seed(0)
    H, Hkv, T, d = 4, 2, 29, 16
    q_raw, k_raw, v = torch.randn(1, H, T, d), torch.randn(1, Hkv, T, d), torch.randn(1, Hkv, T, d)
    rotary = _Rotary(d)
    pos = torch.arange(T)
    q, k = _rot(q_raw, rotary, pos), _rot(k_raw, rotary, pos)

    cfg = LambdaConfig(n_global=G, n_local=L, limit_distance=D, backend=backend, block_size=5)
    rope = Rope(rotary)
    state = LambdaState(config=cfg, num_layers=1, previous_attn="sdpa", layer_ropes={0: rope})
    idx = pos[None]
    state.ctx = ForwardContext(q_idx=idx, q_pos=idx, k_idx=idx, n_candidates=candidate_columns(idx, G))
    module = torch.nn.Module()
    module.layer_idx = 0
    module._lminfinite = state
    out, _ = lambda_attention_forward(module, q, k, v, None, scaling=d**-0.5)

    expected = spec_attention(q_raw, k_raw, v, G, L, D, rotary).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
